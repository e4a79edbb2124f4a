"""What a new user trips over (issue #17), items 6 and 10: thresholds that remove nothing without a
hint, and reports that misstate the target, repeat identical layers, mix MB and MiB, draw no plots, or
leave the model card without what a user of the saved model needs."""

from __future__ import annotations

import json
import re

import pytest
import torch
from conftest import make_tiny_llama

from minigpts.cli import main, sample_data_dir
from minigpts.criteria import UnitScores
from minigpts.distribution import describe_values, score_distribution, threshold_warnings
from minigpts.report import collapse_rows, run_report_markdown

CPU = ["--device", "cpu"]
EVAL = ["--seq-len", "64", "--max-eval-tokens", "512"]
CALIB = ["--calib-tokens", "1024"]
TRAIN = ["--finetune-seq-len", "64", "--max-steps", "2", "--max-val-tokens", "256"]
FIGURES = ("layer_widths", "neuron_magnitudes", "token_frequencies", "bpb_per_stage", "size_vs_bpb")


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny Llama (2 layers) whose tokenizer also knows words the economics sample never uses."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = [
        json.loads(line)["text"]
        for line in (sample_data_dir() / "economics.train.jsonl").read_text().splitlines()
        if line.strip()
    ]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=500,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(
        [*texts, "Quokkas juggle xylophones in Zanzibar; zwölf Jämmerlich. " * 2000], trainer
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>"
    )
    path = tmp_path_factory.mktemp("models") / "base"
    make_tiny_llama(len(tokenizer), max_position_embeddings=256).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def stats_file(model_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("stats") / "stats.safetensors"
    argv = [
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
        path,
    ]
    assert main([str(a) for a in argv]) == 0
    return path


# --------------------------------------------------------------------------------------------------
# 6. score distributions and thresholds that remove nothing


def fake_scores() -> UnitScores:
    mlp = [
        torch.linspace(0.01, 1.0, 64, dtype=torch.float64),
        torch.linspace(0.02, 2.0, 64, dtype=torch.float64),
    ]
    heads = [torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)] * 2
    return UnitScores(mlp=mlp, heads=heads, hidden=torch.linspace(0.5, 1.5, 32, dtype=torch.float64))


def fake_summary(mlp_kept: int, heads_kept: int = 4) -> dict:
    layer = {"mlp": mlp_kept, "mlp_before": 64, "heads": heads_kept, "heads_before": 4, "kv_heads": 2}
    return {"layers": [dict(layer), dict(layer)], "hidden_before": 32, "hidden_after": 32}


def test_distribution_has_min_quantiles_and_max_per_group():
    distribution = score_distribution(fake_scores())
    assert set(distribution) == {"mlp", "heads", "hidden"}
    mlp = distribution["mlp"]
    assert list(mlp) == ["units", "min", "p1", "p5", "p25", "p50", "p75", "p95", "p99", "max"]
    assert mlp["units"] == 128 and mlp["min"] == pytest.approx(0.01) and mlp["max"] == pytest.approx(2.0)
    assert mlp["min"] <= mlp["p1"] <= mlp["p25"] <= mlp["p50"] <= mlp["p99"] <= mlp["max"]
    assert describe_values([3.0])["p50"] == 3.0 and describe_values([]) == {"units": 0}


def test_a_threshold_that_removes_nothing_or_almost_everything_is_warned_about():
    scores = fake_scores()
    quiet = threshold_warnings(scores, fake_summary(32), activation_threshold=0.5)
    assert quiet == []  # removes a useful share: nothing to say
    (nothing,) = threshold_warnings(scores, fake_summary(64), activation_threshold=1e-3)
    assert nothing.startswith("warning: --activation-threshold 0.001 removes no MLP channels")
    assert "--mlp-ratio" in nothing and "--target-params" in nothing
    p25 = score_distribution(scores)["mlp"]["p25"]
    assert f"--activation-threshold {p25:.4g} (the 25% quantile)" in nothing
    (most,) = threshold_warnings(scores, fake_summary(8), activation_threshold=1.95)
    assert "removes 87.5% of the MLP channels" in most
    # --linear-threshold sizes heads and hidden channels; groups the family cannot prune are skipped
    warnings = threshold_warnings(scores, fake_summary(64), linear_threshold=1e-3, groups=("mlp", "heads"))
    assert len(warnings) == 1 and "--linear-threshold 0.001 removes no attention heads" in warnings[0]
    assert "--head-ratio" in warnings[0]


def test_analyze_prints_the_score_distribution(capsys, model_dir, tmp_path):
    code, out, err = run_cli(
        capsys, "analyze", "--model", model_dir, "--data", "sample", *CPU, "--seq-len", "64",
        "--calib-tokens", "256", "--out", tmp_path / "s.safetensors",
    )  # fmt: skip
    assert code == 0, err
    assert "l1 scores per unit (min / quantiles / max)" in out
    for column in ("min", "1%", "25%", "50%", "99%", "max"):
        assert column in out
    assert "MLP channels" in out and "attention heads" in out and "hidden channels" in out
    assert "the paper's thresholds (score ≤ E): 1e-05 removes" in out


def test_prune_dry_run_warns_when_the_paper_thresholds_remove_nothing(capsys, model_dir, stats_file):
    code, out, err = run_cli(
        capsys, "prune", "--model", model_dir, "--stats", stats_file, "--dry-run", *CPU,
        "--activation-threshold", "1e-9", "--linear-threshold", "1e-9",
    )  # fmt: skip
    assert code == 0, err
    assert "l1 scores per unit" in out and "25%" in out
    text = " ".join(out.split())  # rich wraps the caption
    assert "warning: --activation-threshold 1e-09 removes no MLP channels" in text
    assert "warning: --linear-threshold 1e-09 removes no attention heads" in text
    assert "--mlp-ratio R or --target-params F" in text and "(the 25% quantile)" in text


def test_dry_run_with_the_chosen_criterion_and_a_threshold_that_removes_almost_all(
    capsys, model_dir, stats_file
):
    from minigpts.analysis import ActivationStats
    from minigpts.criteria import unit_scores
    from minigpts.models import load_model

    loaded = load_model(str(model_dir), device="cpu")
    scores = unit_scores(loaded.model, ActivationStats.load(stats_file), "wanda")
    p99 = float(torch.quantile(torch.cat(scores.mlp), 0.99))
    code, out, err = run_cli(
        capsys, "prune", "--model", model_dir, "--stats", stats_file, "--dry-run", *CPU,
        "--criterion", "wanda", "--activation-threshold", p99, "--round-to", "1", "--min-mlp", "1",
    )  # fmt: skip
    assert code == 0, err
    assert "wanda scores per unit" in out
    assert re.search(
        r"warning: --activation-threshold \S+ removes 9\d\.\d% of the MLP channels", " ".join(out.split())
    )


def test_run_dry_run_prints_the_distribution_and_the_warning(capsys, model_dir):
    code, out, err = run_cli(
        capsys, "run", "--model", model_dir, "--data", "sample", *CPU, *EVAL, *CALIB, "--dry-run",
        "--activation-threshold", "1e-9",
    )  # fmt: skip
    assert code == 0, err
    assert "l1 scores per unit" in out
    assert "warning: --activation-threshold 1e-09 removes no MLP channels" in " ".join(out.split())


# --------------------------------------------------------------------------------------------------
# 10. reports


def test_identical_neighbouring_layers_are_one_row():
    rows = [[str(i), "768", "6"] for i in range(30)]
    assert collapse_rows(rows) == [["0–29", "768", "6"]]
    rows[10] = ["10", "512", "6"]
    assert [r[0] for r in collapse_rows(rows)] == ["0–9", "10", "11–29"]


def test_report_states_the_requested_fraction_of_the_whole_model():
    report = {
        "stages": {"base": {"params": 1000, "bits_per_byte": 1.0}},
        "plan_summary": {
            "params_before": 1000,
            "params_after": 963,
            "params_after_with_vocab": 798,
            "size_bytes_before": 4000 * 2**10,
            "size_bytes_after": 3852 * 2**10,
            "target": {"target_params": 0.963, "groups": ["mlp"], "achieved": 0.963, "requested": 0.8},
            "notes": ["warning: --linear-threshold 0.001 removes no attention heads"],
        },
    }
    markdown = run_report_markdown(report)
    assert "target: 80.0 % of all parameters (vocabulary included) → 79.8 % achieved" in markdown
    assert "sized to 96.3 %" in markdown  # the structural share is named as such, not as the request
    assert "3.9 MiB → 3.8 MiB" in markdown and " MB" not in markdown
    assert "- warning: --linear-threshold 0.001 removes no attention heads" in markdown


def test_base_license_from_the_front_matter_or_the_alias(tmp_path):
    from minigpts.export import base_license

    (tmp_path / "README.md").write_text("---\nlanguage: en\nlicense: mit\n---\n# a model\n")
    assert base_license(tmp_path) == "mit"
    assert base_license(tmp_path / "nowhere") is None
    assert base_license(None, "smollm2-135m") == "apache-2.0"


def test_run_report_plots_and_model_card(capsys, tmp_path, model_dir):
    mcq = tmp_path / "quiz.jsonl"
    questions = [
        {
            "question": "What happens to price when demand rises?",
            "choices": ["It rises", "It falls"],
            "answer": 0,
        },
        {"question": "GDP measures", "choices": ["output", "rainfall", "height"], "answer": 0},
    ]
    mcq.write_text("".join(json.dumps(q) + "\n" for q in questions))
    out = tmp_path / "run"
    code, stdout, err = run_cli(
        capsys, "run", "--model", model_dir, "--data", "sample", *CPU, *EVAL, *CALIB, *TRAIN,
        "--target-params", "0.5", "--embedding-threshold", "0", "--finetune", "full", "--controls",
        "--mcq", mcq, "--out", out,
    )  # fmt: skip
    assert code == 0, err
    report = json.loads((out / "report.json").read_text())
    markdown = (out / "report.md").read_text()
    base, final = report["stages"]["base"], report["stages"]["finetuned"]

    # (a) the user's request, of the whole model, and what was achieved
    achieved = final["params"] / base["params"]
    assert (
        f"target: 50.0 % of all parameters (vocabulary included) → {100 * achieved:.1f} % achieved"
        in markdown
    )
    # (b) both layers have the same widths: one row
    assert re.search(r"^\| 0–1 \|", markdown, re.M)
    # (c) one unit for sizes
    assert "MiB" in markdown and not re.search(r"\bMB\b", markdown) and not re.search(r"\bMB\b", stdout)
    # (d) plots, linked from report.md
    assert report["figures"] == {key: f"{key}.png" for key in FIGURES}
    for key in FIGURES:
        assert (out / f"{key}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"]({key}.png)" in markdown
    # (e) the model card
    card = (out / "README.md").read_text()
    assert report["protocol"] in card and "Held-out split `test`" in card
    assert str(model_dir.resolve()) in card
    assert "see the base model's license" in card
    assert f"domain data: `{report['data']}`" in card
    bpb_row = next(line for line in card.splitlines() if line.startswith("| bits_per_byte |"))
    assert f"{base['bits_per_byte']:.4g}" in bpb_row and f"{final['bits_per_byte']:.4g}" in bpb_row
    assert "| mcq_quiz_accuracy |" in card
    vocab = report["plan_summary"]["vocab"]
    assert f"| vocabulary | {vocab['before']:,} → {vocab['after']:,} tokens" in card
    assert re.search(r"\| MLP width per layer \| 64 → \d+ \|", card)
    assert "`control_base_finetuned`: the unpruned model fine-tuned with the same budget" in card

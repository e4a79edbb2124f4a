"""The sweep's frontier (largest cut ≤ the base on validation, confirmed on test) and the thesis control
control_general_calibration (the same widths chosen from statistics of general text)."""

from __future__ import annotations

import csv
import json

from conftest import make_tiny_llama

from minigpts.cli import main
from minigpts.report import frontier_lines, sweep_frontier


def _row(setting, size, val, test, criterion="l1"):
    return {
        "model": "m",
        "domain": "law",
        "criterion": criterion,
        "setting": setting,
        "relative_size": size,
        "params": int(size * 100),
        "bpb_base": 1.0,
        "bpb_pruned": test + 0.5,
        "bpb_recovered": test,
        "bpb_val_base": 1.0,
        "bpb_val": val,
    }


def test_frontier_is_the_smallest_size_at_or_below_the_base_on_validation():
    rows = [_row("a", 0.9, 0.95, 0.97), _row("b", 0.7, 1.0, 1.02), _row("c", 0.5, 1.2, 1.1)]
    (point,) = sweep_frontier(rows)
    assert point["found"] and point["setting"] == "b"
    assert abs(point["parameter_reduction"] - 0.3) < 1e-9
    assert point["bpb_test"] == 1.02 and point["confirmed_on_test"] is False
    assert "not confirmed on test" in frontier_lines([point])[0]


def test_frontier_says_none_and_gives_the_closest():
    rows = [_row("a", 0.9, 1.05, 1.04), _row("b", 0.7, 1.3, 1.2)]
    (point,) = sweep_frontier(rows)
    assert not point["found"] and point["setting"] == "a"
    assert "none reaches" in frontier_lines([point])[0]


def test_frontier_per_criterion():
    rows = [_row("x", 0.8, 0.9, 0.9, "l1"), _row("y", 0.6, 0.99, 0.9, "flap")]
    assert [(p["criterion"], p["setting"]) for p in sweep_frontier(rows)] == [("l1", "x"), ("flap", "y")]


def test_sweep_reports_frontier_and_general_calibration_control(tmp_path, tiny_tokenizer, capsys):
    model_dir, out = tmp_path / "tiny", tmp_path / "sweep"
    make_tiny_llama(len(tiny_tokenizer), num_hidden_layers=2).save_pretrained(model_dir)
    tiny_tokenizer.save_pretrained(model_dir)
    corpus = tmp_path / "law.jsonl"
    corpus.write_text(
        "".join(
            json.dumps({"text": f"The court held the contract void, case {i}."}) + "\n" for i in range(40)
        )
    )
    general = tmp_path / "general.jsonl"
    general.write_text(
        "".join(
            json.dumps({"text": f"The river runs past the old mill, story {i}."}) + "\n" for i in range(40)
        )
    )
    args = ["sweep", "--model", model_dir, "--device", "cpu", "--data", corpus, "--out", out]
    args += ["--target-params", "0.9", "0.7", "--finetune", "none", "--controls", "--general-data", general]
    args += ["--vocab-size", "300"]  # a vocabulary cut too: the general-units control joins
    args += [
        "--seq-len",
        "16",
        "--calib-tokens",
        "128",
        "--max-eval-tokens",
        "128",
        "--max-val-tokens",
        "128",
    ]
    assert main([str(a) for a in args]) == 0, capsys.readouterr().err
    stdout = capsys.readouterr().out
    assert "frontier law" in stdout
    with open(out / "sweep.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        assert float(row["bpb_val"]) > 0 and float(row["bpb_val_base"]) > 0
        assert float(row["control_general_bpb"]) > 0
        assert row["control_general_params"] == row["params"]  # same widths, same parameter count
        assert float(row["control_general_units_bpb"]) > 0
    saved = json.loads((out / "sweep.json").read_text())
    (point,) = saved["frontier"]
    assert point["domain"] == "law" and point["setting"] in {r["setting"] for r in rows}
    assert "## Frontier" in (out / "sweep.md").read_text()
    runs = json.loads((out / "sweep_runs.json").read_text())
    control = runs["law"]["settings"]["target=0.7"]["control_general_calibration"]
    assert control["calibration"]["stats"]["data"] == str(general)  # measured on the general text
    assert control["calibration"]["plan_settings"]["calibration_data"] == str(general)
    units = runs["law"]["settings"]["target=0.7"]["control_general_units"]
    assert units["pruned"]["params"] == control["pruned"]["params"]
    assert "domain's vocabulary" in units["calibration"]["plan_settings"]["control"]


def test_run_controls_without_general_data_skip_the_general_control(tmp_path, tiny_tokenizer, capsys):
    model_dir, out = tmp_path / "tiny", tmp_path / "run"
    make_tiny_llama(len(tiny_tokenizer), num_hidden_layers=2).save_pretrained(model_dir)
    tiny_tokenizer.save_pretrained(model_dir)
    corpus = tmp_path / "law.jsonl"
    corpus.write_text(
        "".join(
            json.dumps({"text": f"The court held the contract void, case {i}."}) + "\n" for i in range(40)
        )
    )
    args = ["run", "--model", model_dir, "--device", "cpu", "--data", corpus, "--out", out, "--controls"]
    args += ["--mlp-ratio", "0.5", "--seq-len", "16", "--calib-tokens", "128", "--max-eval-tokens", "128"]
    assert main([str(a) for a in args]) == 0, capsys.readouterr().err
    captured = capsys.readouterr()
    assert "--general-data" in captured.out + captured.err
    stages = json.loads((out / "report.json").read_text())["stages"]
    assert "control_random" in stages and not any("general_calibration" in name for name in stages)


def test_general_units_control_keeps_the_domain_vocabulary_and_the_general_units(tiny_tokenizer):
    """control_general_units separates the unit choice from the vocabulary's: the general control's units
    with the domain plan's vocabulary; only a plan that cuts both structure and vocabulary calls for it."""
    import dataclasses

    import torch

    from minigpts.analysis import analyze
    from minigpts.data import Corpus
    from minigpts.options import PlanOptions
    from minigpts.pipeline import GENERAL_CONTROL, GENERAL_UNITS_CONTROL, general_controls, general_plan_like
    from minigpts.plan import make_plan

    torch.manual_seed(0)
    model = make_tiny_llama(len(tiny_tokenizer), num_hidden_layers=2).eval()
    vocab = len(tiny_tokenizer)
    domain_stats = analyze(model, torch.randint(0, vocab // 2, (4, 16)), progress=False)
    general_stats = analyze(model, torch.randint(vocab // 2, vocab, (4, 16)), progress=False)
    options = PlanOptions(criterion="l1", mlp_ratio=0.5)
    plan = make_plan(model, domain_stats, criterion="l1", mlp_ratio=0.5)
    assert general_controls(plan, options) == [(GENERAL_CONTROL, True)]  # no vocabulary cut: one control
    plan = dataclasses.replace(plan, vocab_keep=list(range(vocab - 100)))
    assert general_controls(plan, options) == [(GENERAL_CONTROL, True), (GENERAL_UNITS_CONTROL, False)]
    text = ["Quokkas juggle xylophones in Zanzibar, story {i}." for i in range(20)]
    general = Corpus("general", {"calibration": text, "train": text}, presplit=True, seed=0)
    full = general_plan_like(model, tiny_tokenizer, plan, general_stats, general, options)
    units = general_plan_like(
        model, tiny_tokenizer, plan, general_stats, general, options, general_vocab=False
    )
    assert units.vocab_keep == plan.vocab_keep and full.vocab_keep != plan.vocab_keep
    assert len(full.vocab_keep) == len(plan.vocab_keep)
    assert (
        units.layers == full.layers and units.layers != plan.layers
    )  # the general text's units, same widths
    assert [len(layer.mlp_keep) for layer in units.layers] == [len(layer.mlp_keep) for layer in plan.layers]

"""Comparing criteria: `sweep --criterion A B C` runs every size for every criterion into one table and plot."""

from __future__ import annotations

import csv
import json

from conftest import make_tiny_llama

from minigpts.cli import build_parser, main
from minigpts.evaluation import decode_speed
from minigpts.sweep import SweepOptions, settings_grid


def test_the_grid_is_criteria_times_sizes():
    options = SweepOptions(model=None, data=["d"], out="o", target_params=[0.8, 0.6], criteria=["l1", "flap"])
    grid = settings_grid(options)
    assert [label for label, _ in grid] == [
        "l1 · target=0.8",
        "l1 · target=0.6",
        "flap · target=0.8",
        "flap · target=0.6",
    ]
    assert [(plan.criterion, plan.target_params) for _, plan in grid] == [
        ("l1", 0.8),
        ("l1", 0.6),
        ("flap", 0.8),
        ("flap", 0.6),
    ]
    one = SweepOptions(model=None, data=["d"], out="o", target_params=[0.5], criteria=["minitron"])
    assert [(label, plan.criterion) for label, plan in settings_grid(one)] == [("target=0.5", "minitron")]


def test_decode_speed_counts_generated_tokens(tiny_llama):
    assert decode_speed(tiny_llama, new_tokens=4, repeats=1) > 0


def test_sweep_compares_criteria_in_one_table(tmp_path, tiny_tokenizer, capsys):
    model_dir, out = tmp_path / "tiny", tmp_path / "compare"
    model = make_tiny_llama(len(tiny_tokenizer), num_hidden_layers=3)
    model.save_pretrained(model_dir)
    tiny_tokenizer.save_pretrained(model_dir)
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text(
        "".join(json.dumps({"text": f"Prices rise when demand rises, lesson {i}."}) + "\n" for i in range(40))
    )
    args = ["sweep", "--model", model_dir, "--device", "cpu", "--data", corpus, "--out", out]
    args += ["--criterion", "l1", "taylor", "random", "--target-params", "0.9", "0.7", "--drop-layers", "1"]
    args += ["--finetune", "none", "--seq-len", "16", "--calib-tokens", "128", "--max-eval-tokens", "128"]
    assert main([str(a) for a in args]) == 0, capsys.readouterr().err
    with open(out / "sweep.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["criterion"], r["setting"]) for r in rows] == [
        ("l1", "l1 · target=0.9"),
        ("l1", "l1 · target=0.7"),
        ("taylor", "taylor · target=0.9"),
        ("taylor", "taylor · target=0.7"),
        ("random", "random · target=0.9"),
        ("random", "random · target=0.7"),
    ]
    for row in rows:  # one corpus, one base: the same base numbers in every row
        assert row["bpb_base"] == rows[0]["bpb_base"] and float(row["bpb_pruned"]) > 0
        assert float(row["decode_tps"]) > 0 and float(row["decode_tps_base"]) > 0
        assert float(row["relative_size"]) < 0.95 and int(row["params"]) > 0
    assert (out / "size_vs_bpb.png").stat().st_size > 0
    markdown = (out / "sweep.md").read_text()
    for header in ("params", "bits/byte base → pruned → recovered", "decode tok/s base → pruned"):
        assert header in markdown
    stats = out / "stats-corpus.safetensors"
    from minigpts.analysis import ActivationStats

    assert ActivationStats.load(stats).taylor_tokens > 0  # taylor among the criteria: its gradient pass ran


def test_sweep_parser_takes_several_criteria():
    args = build_parser().parse_args(["sweep", "--data", "d", "--out", "o", "--criterion", "l1", "flap"])
    assert args.criterion == ["l1", "flap"]
    assert build_parser().parse_args(["sweep", "--data", "d", "--out", "o"]).criterion is None  # default

"""benchmarks/bench_peers.py --tiny: Torch-Pruning and minigpts prune a tiny random Llama to the same widths."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_peers.py"


@pytest.fixture
def bench_peers():
    spec = importlib.util.spec_from_file_location("bench_peers", BENCH)
    module = importlib.util.module_from_spec(spec)
    threads = torch.get_num_threads()
    path = list(sys.path)
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        torch.set_num_threads(threads)
        sys.path[:] = path


def test_tiny_self_check(bench_peers, tmp_path):
    pytest.importorskip("torch_pruning")
    methods = ["base", "tp-magnitude", "tp-taylor", "tp-activation", "l1", "taylor", "tp-magnitude+refit"]
    done = bench_peers.main(
        ["--tiny", "--ratios", "0.5", "--methods", *methods, "--json", str(tmp_path / "r.json")]
    )
    rows = done["rows"]
    assert set(rows) == {"base"} | {f"{m} 50%" for m in methods[1:]}
    # the same width and parameter count through both libraries (main asserts it per model too)
    widths = {row["mlp_width"] for label, row in rows.items() if label != "base"}
    params = {row["params"] for label, row in rows.items() if label != "base"}
    assert widths == {rows["base"]["mlp_width"] // 2} and len(params) == 1
    assert all("equal" in line for line in done["checks"]) and len(done["checks"]) == 3
    # the same score through both libraries keeps the same channels, hence the same model
    assert done["common"]["tp-activation 50%"]["l1"] == 1.0
    assert done["common"]["tp-taylor 50%"]["taylor"] == 1.0
    assert rows["tp-activation 50%"]["bits_per_byte"] == pytest.approx(
        rows["l1 50%"]["bits_per_byte"], abs=1e-5
    )
    assert rows["tp-taylor 50%"]["bits_per_byte"] == pytest.approx(
        rows["taylor 50%"]["bits_per_byte"], abs=1e-5
    )
    # the refit of Torch-Pruning's channels is a different model of the same size
    assert rows["tp-magnitude+refit 50%"]["bits_per_byte"] != rows["tp-magnitude 50%"]["bits_per_byte"]


def test_tiny_mixed_cut(bench_peers, tmp_path):
    """--mixed: MLP channels and heads to a share of the parameters, per-layer and uniform (no Torch-Pruning)."""
    methods = ["wanda+refit", "wanda", "wanda+refit uniform", "depth", "wanda+refit drop=1"]
    done = bench_peers.main(
        ["--tiny", "--methods", "base", "--mixed", "0.8", "--mixed-methods", *methods,
         "--json", str(tmp_path / "r.json"), "--decode-tokens", "4", "--decode-repeats", "1"]
    )  # fmt: skip
    rows = done["rows"]
    assert set(rows) == {"base"} | {f"{m} mixed 20%" for m in methods}
    base = rows["base"]
    for method in methods[:-2]:  # the plan nearest the parameter target, widths only
        row = rows[f"{method} mixed 20%"]
        assert row["params"] / base["params"] == pytest.approx(0.8, abs=0.02)
        assert row["layers"] == base["layers"]
    depth, both = rows["depth mixed 20%"], rows["wanda+refit drop=1 mixed 20%"]
    assert depth["layers"] < base["layers"] and depth["mlp_width"] == base["mlp_width"]
    assert both["layers"] == base["layers"] - 1  # one layer dropped, widths cut for the rest of the target
    assert both["params"] / base["params"] == pytest.approx(0.8, abs=0.02)
    assert all(row["decode_tokens_per_second"] > 0 for row in rows.values())
    uniform = rows["wanda+refit uniform mixed 20%"]
    assert isinstance(uniform["mlp_width"], int) and uniform["mlp_width"] < base["mlp_width"]
    # heads are a group the cut may take (whole GQA groups at this size: the per-layer allocation does)
    assert all(row["heads"] <= base["heads"] for row in rows.values())
    assert any(row["heads"] < base["heads"] for row in rows.values())
    # the refit changes the model, not its size
    refit, sliced = rows["wanda+refit mixed 20%"], rows["wanda mixed 20%"]
    assert refit["params"] == sliced["params"] and refit["bits_per_byte"] != sliced["bits_per_byte"]
    assert all("target_params=0.8" in rows[f"{m} mixed 20%"]["produced_by"] for m in methods if m != "depth")
    assert "drop_layers=1" in depth["produced_by"] and "target_params" not in depth["produced_by"]

"""benchmarks/bench_peers.py --tiny: Torch-Pruning and minigpts prune a tiny random Llama to the same widths."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("torch_pruning")

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

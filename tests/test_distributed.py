"""Data parallelism (issue #18): 2 gloo processes under torchrun give the single-process numbers.

One torchrun launch (tests/distributed_worker.py) runs analysis (first-order sums, second moments,
Fisher and Taylor gradient passes, layer-removal loss; and layer by layer with second moments and
Fisher), evaluation, MCQ scoring and one recovery step with the Trainer's DDP; the same code runs in
this process as the reference.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from minigpts import distributed

HERE = Path(__file__).parent
STRICT = 1e-10  # float64 sums: only the order of the additions differs


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    torchrun = Path(sys.executable).parent / "torchrun"
    if not torchrun.exists():
        pytest.skip(f"torchrun not found next to {sys.executable}")
    tmp = tmp_path_factory.mktemp("ddp")
    out = tmp / "results.pt"
    env = {
        k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")
    }
    env |= {"OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "TOKENIZERS_PARALLELISM": "false"}
    command = [
        str(torchrun),
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(_free_port()),
        str(HERE / "distributed_worker.py"),
        str(out),
        str(tmp),
    ]
    try:
        proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    except subprocess.TimeoutExpired as err:
        pytest.fail(f"torchrun with 2 processes did not finish in 240 s:\n{err.stderr}")
    if proc.returncode != 0 and (
        "Address already in use" in proc.stderr
        or "gloo" in proc.stderr.lower()
        and "connect" in proc.stderr.lower()
    ):
        pytest.skip(f"torchrun cannot start a gloo group on this machine:\n{proc.stderr[-2000:]}")
    assert proc.returncode == 0, proc.stderr[-6000:]
    distributed_results = torch.load(out, weights_only=False)

    sys.path.insert(0, str(HERE))
    from distributed_worker import compute

    assert not distributed.active()
    single = compute(tmp / "single", world=1)
    shutil.rmtree(tmp / "finetune", ignore_errors=True)
    return single, distributed_results


def test_world_size_two(launched):
    _, multi = launched
    assert multi["world_size"] == 2


@pytest.mark.parametrize("dtype", ["float32", "float64", "offload"])
def test_reduced_statistics_equal_single_process(launched, dtype):
    """offload: layer-by-layer analysis of the float64 model, each layer's second moments reduced as
    soon as the layer is done and kept as float32 means (hence float32 precision for them)."""
    single, multi = launched
    one, two = single[f"stats_{dtype}"], multi[f"stats_{dtype}"]
    assert one.keys() == two.keys()
    checked = []
    for name, value in one.items():
        other = two[name]
        if isinstance(value, int | float):
            assert other == value, name
            continue
        values = value if isinstance(value, list) else [value]
        others = other if isinstance(other, list) else [other]
        assert len(values) == len(others), name
        # the float32 model's Taylor scores: its gradients are summed in float32 within a process
        tol = 1e-6 if (dtype == "float32" and name.endswith("taylor")) else STRICT
        tol = 1e-6 if (dtype == "offload" and name.endswith("_gram")) else tol
        for a, b in zip(others, values, strict=True):
            assert _rel(a, b) <= tol, (name, _rel(a, b))
        checked.append(name)
    whole_model = ("mlp_taylor", "layer_loss")  # refused layer by layer
    for name in ("mlp_l2sq", "mlp_gram", "attn_gram", "mlp_mean", "mlp_fisher", "layer_bi") + whole_model:
        assert name in checked or (dtype == "offload" and name in whole_model), name
    assert one["n_tokens"] == two["n_tokens"] == 160


def test_gradient_pass_over_fewer_windows_than_processes(launched):
    """One Fisher window on 2 processes: the process without one joins the reduce, the sums are the same."""
    single, multi = launched
    one, two = single["fisher_one_window"], multi["fisher_one_window"]
    assert one["tokens"] == two["tokens"] == (16, 16)
    for path in ("in_memory", "offload"):
        for a, b in zip(two[path], one[path], strict=True):
            assert a.abs().sum() > 0 and _rel(a, b) <= STRICT, path
    for a, b in zip(one["offload"], one["in_memory"], strict=True):
        assert _rel(a, b) <= 1e-10  # layer by layer = the whole model's pass


def test_evaluation_and_mcq_equal_single_process(launched):
    single, multi = launched
    assert multi["eval"]["tokens"] == single["eval"]["tokens"]
    assert multi["eval"]["bytes"] == single["eval"]["bytes"]
    assert multi["eval"]["nll_sum"] == pytest.approx(single["eval"]["nll_sum"], rel=STRICT)
    assert len(multi["mcq"]) == len(single["mcq"]) == 6
    # MCQ packs each process's questions into its own rows (minigpts.mcq), so a score's matrix
    # products group other tokens than on one process: equal to float rounding (~1e-9), not bit for bit
    for a, b in zip(multi["mcq"], single["mcq"], strict=True):
        assert a == pytest.approx(b, rel=1e-7)


def test_ddp_recovery_step_equals_single_process_step(launched):
    single, multi = launched
    one, two = single["finetune"], multi["finetune"]
    assert one["steps"] == two["steps"] == 1
    assert one["train_tokens"] == two["train_tokens"] == 4 * 16
    assert two["train_loss"] == pytest.approx(one["train_loss"], rel=1e-6)
    # validation loss before (step 0) and after the step: the update agrees too
    assert len(one["val_history"]) == len(two["val_history"]) == 2
    for (s1, l1, *_), (s2, l2, *_) in zip(one["val_history"], two["val_history"], strict=True):
        assert s1 == s2
        assert l2 == pytest.approx(l1, rel=1e-6)
    for name, weight in one["weights"].items():
        assert (two["weights"][name] - weight).abs().max() <= 1e-5, name


def test_single_process_helpers_are_identity():
    assert not distributed.active()
    assert distributed.world_size() == 1 and distributed.rank() == 0
    assert distributed.bounds(7, 2) == (0, 7)
    assert distributed.reduce_numbers(1.5, 2) == [1.5, 2]
    assert distributed.any_true(False) is False
    t = torch.ones(3)
    distributed.reduce([t])
    assert t.tolist() == [1, 1, 1]

"""`minigpts run` interrupted with SIGINT (Ctrl-C) and continued with --resume (issue #17, item 7).

A tiny run is started in a subprocess and interrupted at a known point through the test hook
``MINIGPTS_TEST_INTERRUPT_AFTER`` (``minigpts.pipeline.interrupt_point``: the process sends itself
SIGINT right after the named stage). ``--resume`` must reuse the finished stages from the work dir,
continue fine-tuning from the last checkpoint, and end at the metrics of an uninterrupted run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import make_tiny_llama

from minigpts.pipeline import TEST_INTERRUPT_ENV, work_dir_for

ARGS = [
    "run",
    "--data",
    "sample",
    "--device",
    "cpu",
    "--mlp-ratio",
    "0.5",
    "--seq-len",
    "32",
    "--max-eval-tokens",
    "256",
    "--calib-tokens",
    "512",
    "--fisher-tokens",
    "256",
    "--finetune",
    "full",
    "--finetune-seq-len",
    "32",
    "--max-steps",
    "4",
    "--eval-every",
    "1",
    "--max-val-tokens",
    "128",
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_tokenizer):
    path = tmp_path_factory.mktemp("resume") / "model"
    model = make_tiny_llama(len(tiny_tokenizer), max_position_embeddings=128)
    model.save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


def run(model_dir, out, *extra, interrupt: str | None = None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "COLUMNS": "200"}
    env.pop(TEST_INTERRUPT_ENV, None)
    if interrupt:
        env[TEST_INTERRUPT_ENV] = interrupt
    argv = [sys.executable, "-m", "minigpts.cli", *ARGS, "--model", str(model_dir), "--out", str(out), *extra]
    return subprocess.run(argv, capture_output=True, text=True, env=env, timeout=600)


def metrics(out) -> dict:
    report = json.loads((out / "report.json").read_text())
    return {name: report["stages"][name]["bits_per_byte"] for name in ("base", "pruned", "finetuned")}


@pytest.fixture(scope="module")
def straight(model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("straight") / "out"
    done = run(model_dir, out)
    assert done.returncode == 0, done.stderr
    assert not work_dir_for(out).exists()
    return metrics(out)


@pytest.mark.parametrize(
    ("point", "reused"),
    [
        ("prune", ["analysis: reused", "plan: reused", "base evaluation: reused", "pruning: reused"]),
        ("checkpoint-2", ["pruned evaluation: reused", "finetuned checkpoint"]),
    ],
)
def test_interrupted_run_resumes_to_the_same_metrics(model_dir, tmp_path, straight, point, reused):
    out = tmp_path / "out"
    stopped = run(model_dir, out, interrupt=point)
    assert stopped.returncode == 130, stopped.stderr
    assert "interrupted" in stopped.stderr and not out.exists()
    assert (work_dir_for(out) / "stages").is_dir()

    resumed = run(model_dir, out, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    for line in reused:
        assert line in resumed.stdout, resumed.stdout
    if point.startswith("checkpoint"):
        report = json.loads((out / "report.json").read_text())
        assert report["stages"]["finetuned"]["finetune"]["resumed_from_step"] == 2
    for name, value in metrics(out).items():
        assert value == pytest.approx(straight[name], abs=1e-6), name
    assert not work_dir_for(out).exists()  # a finished run drops its scratch space


def test_rerun_without_resume_after_an_interrupt_says_so_up_front(model_dir, tmp_path):
    out = tmp_path / "out"
    assert run(model_dir, out, interrupt="checkpoint-1").returncode == 130
    again = run(model_dir, out)
    assert again.returncode == 2
    assert again.stderr.strip().count("\n") == 0 and "--resume" in again.stderr
    assert "analyze" not in again.stderr  # said before any stage ran

"""The GPU check's pieces that run anywhere: ``python -m minigpts``, the scripts' syntax, and
bench_generate's device/dtype arm (issue #18 part 4; the check itself needs a CUDA machine)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def test_python_dash_m_runs_the_cli():
    from minigpts import __version__

    done = subprocess.run(
        [sys.executable, "-m", "minigpts", "--version"], capture_output=True, text=True, check=True
    )
    assert __version__ in done.stdout


@pytest.mark.parametrize("script", ["gpu_check.sh", "gpu_bundle.sh"])
def test_scripts_parse(script):
    done = subprocess.run(["bash", "-n", str(ROOT / "benchmarks" / script)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_bench_generate_times_a_copy_in_the_asked_dtype(tmp_path, monkeypatch, tiny_tokenizer, tiny_llama):
    tiny_llama.save_pretrained(tmp_path / "tiny")
    tiny_tokenizer.save_pretrained(tmp_path / "tiny")
    spec = importlib.util.spec_from_file_location("bench_generate", ROOT / "benchmarks" / "bench_generate.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    dtypes = []
    timed = bench.generate_seconds
    monkeypatch.setattr(
        bench, "generate_seconds", lambda model, ids, n: dtypes.append(model.dtype) or timed(model, ids, n)
    )
    argv = ["bench_generate.py", "--model", str(tmp_path / "tiny"), "--dtype", "bfloat16", "--no-llama-cpp"]
    argv += ["--tokens", "3", "--repeats", "1", "--vocab-size", "0", "--depth-ratio", "0"]
    monkeypatch.setattr(sys, "argv", argv + ["--json", str(tmp_path / "rows.json")])
    bench.main()
    rows = json.loads((tmp_path / "rows.json").read_text())
    assert list(rows) == ["transformers bf16"]
    assert [row["cut"] for row in rows["transformers bf16"]] == ["base", "MLP", "MLP + heads"]
    # warm-up + one round for each of the three models, all in bf16; the bytes counted are the fp32 cuts'
    assert dtypes == [torch.bfloat16] * 6
    base, mlp = rows["transformers bf16"][0], rows["transformers bf16"][1]
    assert base["bytes"] == 4 * base["params"] and mlp["bound"] > 1

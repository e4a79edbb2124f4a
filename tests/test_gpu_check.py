"""The GPU check's pieces that run anywhere: ``python -m minigpts``, the scripts' syntax, and
bench_generate's device/dtype arm (issue #18 part 4; the check itself needs a CUDA machine); and
bench_generate's compiled static-cache decode arms, torch.compile and AOTInductor (issue #16)."""

from __future__ import annotations

import importlib.util
import json
import shutil
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


def load_bench_generate():
    spec = importlib.util.spec_from_file_location("bench_generate", ROOT / "benchmarks" / "bench_generate.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_bench_generate_times_a_copy_in_the_asked_dtype(
    tmp_path, monkeypatch, capsys, tiny_tokenizer, tiny_llama
):
    tiny_llama.save_pretrained(tmp_path / "tiny")
    tiny_tokenizer.save_pretrained(tmp_path / "tiny")
    bench = load_bench_generate()
    dtypes = []
    timed = bench.generate_seconds
    monkeypatch.setattr(
        bench, "generate_seconds", lambda model, ids, n: dtypes.append(model.dtype) or timed(model, ids, n)
    )
    argv = ["bench_generate.py", "--model", str(tmp_path / "tiny"), "--dtype", "bfloat16", "--no-llama-cpp"]
    argv += [
        "--no-compile",
        "--no-aot",
        "--no-per-layer",
        "--tokens",
        "3",
        "--repeats",
        "1",
        "--vocab-size",
        "0",
        "--depth-ratio",
        "0",
    ]
    monkeypatch.setattr(sys, "argv", argv + ["--json", str(tmp_path / "rows.json")])
    bench.main()
    rows = json.loads((tmp_path / "rows.json").read_text())
    assert list(rows) == ["transformers bf16"]
    assert [row["cut"] for row in rows["transformers bf16"]] == ["base", "MLP", "MLP + heads"]
    # warm-up + one round for each of the three models, all in bf16; the bytes counted are the fp32 cuts'
    assert dtypes == [torch.bfloat16] * 6
    base, mlp = rows["transformers bf16"][0], rows["transformers bf16"][1]
    assert base["bytes"] == 4 * base["params"] and mlp["bound"] > 1
    # the verdict line names the worst cut's quotient
    worst = min(row["speedup"] / row["bound"] for row in rows["transformers bf16"][1:])
    verdict = "met" if worst >= bench.TARGET_QUOTIENT else "not met"
    out = capsys.readouterr().out
    assert f"quotients {worst:.3f}–" in out and f"≥ 0.9 for every cut {verdict}\n" in out


@pytest.mark.parametrize("heads, depth", [(0.0, 0.0), (0.5, 0.25)])
def test_the_static_cache_decode_loop_decodes_what_generate_does(tiny_tokenizer, tiny_llama, heads, depth):
    """The compiled arm's loop (static cache, explicit positions), run eagerly: generate's greedy ids,
    also on a model with heads and layers removed (renumbered cache slots)."""
    from minigpts.surgery import apply_plan

    bench = load_bench_generate()
    model = apply_plan(tiny_llama, bench.cut_plan(tiny_llama, 0.5, heads, depth)) if heads else tiny_llama
    ids = tiny_tokenizer(bench.PROMPT, return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        reference = model.generate(ids, max_new_tokens=12, min_new_tokens=12, do_sample=False)
    seconds, decoded = bench.compiled_decoder(model, ids, 12, compile_forward=False)()
    assert decoded == reference[0, ids.shape[1] :].tolist()
    assert seconds > 0


@pytest.mark.parametrize("heads, depth", [(0.0, 0.0), (0.5, 0.25)])
def test_the_exportable_decode_step_decodes_what_generate_does(tiny_tokenizer, tiny_llama, heads, depth):
    """The module the AOTInductor arm exports (KV cache as buffers written at explicit positions), run
    eagerly a token at a time: generate's greedy ids, with heads and layers removed too; and a second
    pass over the same buffers gives the same ids (stale entries past the position are masked)."""
    from minigpts.surgery import apply_plan

    bench = load_bench_generate()
    model = apply_plan(tiny_llama, bench.cut_plan(tiny_llama, 0.5, heads, depth)) if heads else tiny_llama
    ids = tiny_tokenizer(bench.PROMPT, return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        reference = model.generate(ids, max_new_tokens=12, min_new_tokens=12, do_sample=False)
    step = bench._DecodeStep(model, ids.shape[1] + 12).eval()
    for _ in range(2):
        tokens = ids[0].tolist()
        with torch.inference_mode():
            for position in range(ids.shape[1] + 11):
                logits = step(torch.tensor([[tokens[position]]]), torch.tensor([position]))
                if position >= ids.shape[1] - 1:
                    tokens.append(int(logits[0, -1].argmax()))
        assert tokens == reference[0].tolist()


@pytest.mark.slow
@pytest.mark.skipif(
    not (shutil.which("c++") or shutil.which("g++")), reason="torch.compile needs a C++ compiler"
)
def test_bench_generate_reports_the_compiled_arms_with_generates_tokens(
    tmp_path, monkeypatch, capsys, tiny_tokenizer
):
    from conftest import make_tiny_llama

    make_tiny_llama(len(tiny_tokenizer)).save_pretrained(tmp_path / "tiny")
    tiny_tokenizer.save_pretrained(tmp_path / "tiny")
    bench = load_bench_generate()
    argv = ["bench_generate.py", "--model", str(tmp_path / "tiny"), "--json", str(tmp_path / "rows.json")]
    argv += ["--no-llama-cpp", "--tokens", "4", "--repeats", "1", "--vocab-size", "0", "--depth-ratio", "0"]
    monkeypatch.setattr(sys, "argv", argv)
    bench.main()
    out = capsys.readouterr().out
    assert out.count("same tokens as generate") == 8, out
    rows = json.loads((tmp_path / "rows.json").read_text())
    assert list(rows) == ["transformers fp32", "transformers fp32 compiled", "transformers fp32 AOTInductor"]
    for arm in ("transformers fp32 compiled", "transformers fp32 AOTInductor"):
        assert [row["cut"] for row in rows[arm]] == ["base", "MLP", "MLP + heads", "per-layer MLP + heads"]
        assert all(row["tok_s"] > 0 for row in rows[arm]) and rows[arm][1]["bound"] > 1

"""Peak memory of the analysis: the whole model in memory vs layer by layer (``analyze_offloaded``).

Issue #18's target: the layer-by-layer analysis of SmolLM2 peaks at ≤ 0.5 × the fp32 model's size in
RSS above the interpreter baseline (the ordinary path: ≥ 1×), with statistics equal to the ordinary
path's (1e-6 relative). Each path runs in a fresh subprocess on the same calibration windows (the
economics sample text); a process's peak is its VmHWM at the end, its baseline its VmRSS once
torch, transformers, the model's transformers classes and minigpts are imported
(resource.getrusage(RUSAGE_CHILDREN), the whole process's peak, is printed too).

    nice -n 10 .venv/bin/python benchmarks/bench_memory.py                    # 2,048 tokens
    .venv/bin/python benchmarks/bench_memory.py --tokens 8192 --moments --fisher-tokens 1024
    .venv/bin/python benchmarks/bench_memory.py --moments --prune             # + prune vs prune --offload

``--prune`` adds the pruning arm: ``minigpts prune`` (by default the MLP halved with Wanda scores and
the error allocation across layers, ``--prune-plan``; refit with --moments) of the same model from the
in-memory statistics, whole vs ``--offload`` (plan, refit, surgery and the shards one layer at a
time), each in a fresh process; the two outputs' tensors must be equal.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def child(args) -> None:
    """One analysis in this (fresh) process; prints a JSON line with its memory figures."""
    import torch

    import minigpts.analysis
    import minigpts.analysis_offload
    import minigpts.models  # noqa: F401  (imported before the baseline is read, as on both paths)

    if args.threads:
        torch.set_num_threads(args.threads)
    windows = torch.load(args.windows)
    # the model's transformers classes are code both paths import (~120 MB of modules): in the baseline
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    MODEL_FOR_CAUSAL_LM_MAPPING[type(AutoConfig.from_pretrained(args.model_dir))]
    options = dict(
        batch_size=args.batch_size,
        progress=False,
        moments=args.moments,
        fisher_tokens=args.fisher_tokens,
    )
    baseline = status_kib("VmRSS")
    started = time.perf_counter()
    if args.child == "memory":
        from minigpts.models import load_model

        model = load_model(args.model_dir, device="cpu").model
        stats = minigpts.analysis.analyze(model, windows, **options)
    else:
        stats = minigpts.analysis_offload.analyze_offloaded(args.model_dir, windows, **options)
    seconds = time.perf_counter() - started
    peak = status_kib("VmHWM")
    stats.save(args.stats)
    print(json.dumps({"baseline_kib": baseline, "peak_kib": peak, "seconds": seconds}))


def prune_child(args) -> None:
    """One `minigpts prune` (whole, or --offload) in this (fresh) process; prints its memory figures."""
    import minigpts.cli
    import minigpts.models
    import minigpts.surgery_offload  # noqa: F401  (imported before the baseline, as on both paths)

    if args.threads:
        torch_threads(args.threads)
    refit = ["--reconstruct", "lstsq" if args.moments else "none"]
    argv = ["prune", "--model", str(args.model_dir), "--stats", args.stats, *args.prune_plan.split(), *refit]
    argv += ["--out", args.out, "--device", "cpu", "--dtype", "float32"]
    baseline = status_kib("VmRSS")
    started = time.perf_counter()
    code = minigpts.cli.main(argv + (["--offload"] if args.child == "prune-offload" else []))
    if code != 0:
        sys.exit(f"prune exited {code}")
    seconds = time.perf_counter() - started
    print(json.dumps({"baseline_kib": baseline, "peak_kib": status_kib("VmHWM"), "seconds": seconds}))


def torch_threads(n: int) -> None:
    import torch

    torch.set_num_threads(n)


def prune_arm(args, stats: Path, tmp: Path) -> None:
    """Peak RSS of `prune` whole vs `prune --offload` from the same statistics; their tensors compared."""
    from safetensors.torch import load_file

    results, tensors = {}, {}
    for mode in ("prune-memory", "prune-offload"):
        out = tmp / mode
        results[mode] = run_child(mode, args, tmp / "windows.pt", stats, ["--out", str(out)])
        tensors[mode] = {k: v for f in sorted(out.glob("*.safetensors")) for k, v in load_file(f).items()}
    for mode, label in (("prune-memory", "prune (whole model)"), ("prune-offload", "prune --offload")):
        r = results[mode]
        above = (r["peak_kib"] - r["baseline_kib"]) / 1024
        print(
            f"{label:<22}{r['baseline_kib'] / 1024:>9.0f}M{r['peak_kib'] / 1024:>9.0f}M{above:>9.0f}M{r['seconds']:>9.1f}s"
        )
    a, b = tensors["prune-memory"], tensors["prune-offload"]
    same = sorted(a) == sorted(b) and all(a[k].equal(b[k]) for k in a)
    print(f"pruned tensors: {'equal' if same else 'DIFFERENT'} ({len(a)} tensors)")


def run_child(mode: str, args, windows: Path, stats: Path, extra: list[str] = ()) -> dict:
    command = (
        [
            sys.executable,
            __file__,
            "--child",
            mode,
            "--model-dir",
            str(args.model_dir),
            "--windows",
            str(windows),
            "--stats",
            str(stats),
            "--batch-size",
            str(args.batch_size),
            "--fisher-tokens",
            str(args.fisher_tokens),
            "--threads",
            str(args.threads or 0),
        ]
        + (["--moments"] if args.moments else [])
        + ["--prune-plan", args.prune_plan]
        + list(extra)
    )
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{mode} analysis failed:\n{done.stderr[-4000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    after = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # the largest child so far (KiB)
    result["rusage_kib"] = after if after > before else None
    return result


def compare(a, b) -> tuple[float, str]:
    """The largest relative difference (to each tensor's largest magnitude) over every statistic."""
    import dataclasses

    import torch

    worst, where = 0.0, ""
    for field in dataclasses.fields(a):
        x, y = getattr(a, field.name), getattr(b, field.name)
        pairs = []
        if isinstance(x, list) and x and isinstance(x[0], torch.Tensor):
            pairs = [(f"{field.name}[{i}]", u, v) for i, (u, v) in enumerate(zip(x, y, strict=True))]
        elif isinstance(x, torch.Tensor):
            pairs = [(field.name, x, y)]
        elif (x is None) != (y is None):
            return float("inf"), field.name
        for name, u, v in pairs:
            u, v = u.double(), v.double()
            scale = u.abs().max().item() or 1.0
            difference = (u - v).abs().max().item() / scale
            if difference > worst:
                worst, where = difference, name
    return worst, where


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m", help="alias, GGUF file or model directory")
    parser.add_argument("--tokens", type=int, default=2048, help="calibration tokens (default 2,048)")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--moments", action="store_true", help="also the second moments ((width)² per layer)")
    parser.add_argument(
        "--fisher-tokens", type=int, default=0, help="tokens of the gradient pass (default 0)"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads in each analysis")
    parser.add_argument(
        "--prune", action="store_true", help="also prune whole vs --offload (peak RSS of each)"
    )
    parser.add_argument(
        "--prune-plan",
        default="--criterion wanda --layout per-layer --mlp-ratio 0.5",
        help="the plan flags of the pruning arm (default: Wanda scores, the error allocation, MLP halved)",
    )
    parser.add_argument(
        "--child", choices=["memory", "offload", "prune-memory", "prune-offload"], help=argparse.SUPPRESS
    )
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    parser.add_argument("--windows", help=argparse.SUPPRESS)
    parser.add_argument("--stats", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        prune_child(args) if args.child.startswith("prune") else child(args)
        return

    import torch

    from minigpts.analysis import ActivationStats
    from minigpts.data import make_windows
    from minigpts.models import _resolve_source, load_tokenizer

    _, path, description = _resolve_source(args.model)  # aliases and GGUF files: converted once
    args.model_dir = path
    tokenizer = load_tokenizer(str(path))
    sample = Path(__file__).resolve().parents[1] / "src/minigpts/sample_data/economics.train.jsonl"
    text = "\n\n".join(json.loads(line)["text"] for line in sample.read_text().splitlines()[:200])
    ids = torch.tensor(tokenizer(text)["input_ids"][: args.tokens])
    windows = make_windows(ids, args.seq_len, max_tokens=args.tokens)
    fp32_mib = 0.0
    from safetensors import safe_open

    for file in sorted(Path(path).glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118
                fp32_mib += math.prod(handle.get_slice(key).get_shape()) * 4 / 2**20

    print(f"model: {description} ({path}), fp32 weights {fp32_mib:.0f} MiB")
    print(
        f"calibration: {windows.numel():,} tokens ({len(windows)} windows of {args.seq_len}), "
        f"batch {args.batch_size}, moments {'on' if args.moments else 'off'}, fisher tokens {args.fisher_tokens}"
    )
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench-memory-") as tmp:
        tmp = Path(tmp)
        torch.save(windows, tmp / "windows.pt")
        for mode in ("memory", "offload"):
            results[mode] = run_child(mode, args, tmp / "windows.pt", tmp / f"{mode}.safetensors")
            results[mode]["stats"] = ActivationStats.load(tmp / f"{mode}.safetensors")
        if args.prune:
            prune_arm(args, tmp / "memory.safetensors", tmp)

    print(f"{'path':<22}{'baseline':>10}{'peak':>10}{'above':>10}{'x fp32':>9}{'rusage':>10}{'seconds':>9}")
    for mode, label in (("memory", "in memory (analyze)"), ("offload", "layer by layer")):
        r = results[mode]
        above = (r["peak_kib"] - r["baseline_kib"]) / 1024
        r["above_mib"] = above
        rusage = f"{r['rusage_kib'] / 1024:.0f}M" if r["rusage_kib"] else "-"
        print(
            f"{label:<22}{r['baseline_kib'] / 1024:>9.0f}M{r['peak_kib'] / 1024:>9.0f}M{above:>9.0f}M"
            f"{above / fp32_mib:>9.2f}{rusage:>10}{r['seconds']:>9.1f}"
        )
    ratio = results["offload"]["above_mib"] / results["memory"]["above_mib"]
    worst, where = compare(results["memory"]["stats"], results["offload"]["stats"])
    offload_x = results["offload"]["above_mib"] / fp32_mib
    memory_x = results["memory"]["above_mib"] / fp32_mib
    print(f"peak above baseline, layer by layer / in memory: {ratio:.2f}")
    print(
        f"target: layer by layer <= 0.5 x fp32 ({offload_x:.2f}: {'ok' if offload_x <= 0.5 else 'MISSED'}), "
        f"in memory >= 1 x ({memory_x:.2f}: {'ok' if memory_x >= 1 else 'MISSED'})"
    )
    print(
        f"statistics: largest relative difference {worst:.2e} ({where or 'none'}): "
        f"{'equal (<= 1e-6)' if worst <= 1e-6 else 'DIFFERENT'}"
    )


if __name__ == "__main__":
    main()

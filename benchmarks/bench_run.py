"""Wall time and peak memory of a whole `minigpts run` on SmolLM2, against the fp32 model size.

    python benchmarks/bench_run.py [--calib-tokens 65536] [--data sample] [-- extra run flags]

The issue's targets: with 65,536 calibration tokens, ≤ 10 minutes and peak RSS ≤ 3 × the fp32
model size (SmolLM2-135M: 538 MB → 1.6 GB). Runs the CLI in a child process and reads its peak RSS
from the kernel (getrusage of children), so the benchmark's own memory is not counted.
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
import time

from minigpts.evaluation import model_size
from minigpts.models import load_model


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data", default="sample")
    parser.add_argument("--calib-tokens", type=int, default=65_536)
    parser.add_argument("--max-eval-tokens", type=int, default=16_384)
    parser.add_argument("extra", nargs="*", help="more `minigpts run` flags (after --)")
    args = parser.parse_args()

    loaded = load_model(args.model, device="cpu")
    fp32_bytes = sum(p.numel() * 4 for p in {id(p): p for p in loaded.model.parameters()}.values())
    del loaded
    with tempfile.TemporaryDirectory() as tmp:
        command = [
            sys.executable, "-m", "minigpts.cli", "run", "--model", args.model, "--data", args.data,
            "--out", f"{tmp}/out", "--device", "cpu", "--calib-tokens", str(args.calib_tokens),
            "--max-eval-tokens", str(args.max_eval_tokens), "--mlp-ratio", "0.5", *args.extra,
        ]  # fmt: skip
        start = time.perf_counter()
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
        seconds = time.perf_counter() - start
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
        saved, _ = model_size(None, f"{tmp}/out")
    print(f"command: {' '.join(command[2:])}")
    print(f"wall time: {seconds / 60:.2f} min (target ≤ 10 min)")
    print(
        f"peak RSS: {peak / 2**20:.0f} MiB = {peak / fp32_bytes:.2f} × the fp32 model ({fp32_bytes / 2**20:.0f} MiB); target ≤ 3.00 ×"
    )
    print(f"saved pruned model: {saved / 2**20:.0f} MiB")


if __name__ == "__main__":
    main()

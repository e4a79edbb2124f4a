"""Recovery that spends its budget well: the same pruned model, one token budget, several recipes.

    python benchmarks/bench_recovery.py [--data sample] [--train-tokens 65536] [--target-params 0.80]
                                        [--work .bench-cache/recovery]

Prunes once with the demo's cut (`make demo`: 80 % of the parameters, per-layer widths by error,
`wanda`, vocabulary seen + expected, refit), then recovers copies of that pruned model on exactly
`--train-tokens` training tokens (windows of 256, 4 per step, fixed seed) with each recipe below and
scores each on the test text that the base's first 8,192 tokens cover (windows of 1024). Every stage
is the `minigpts` command line, so each row is a command a user can rerun. Distillation recipes share
one teacher cache. No timing in the table: each number depends only on the seed, the data and the
budgets (the clock is printed for information).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

PRUNE = [
    "--layout", "per-layer", "--criterion", "wanda",
    "--embedding-threshold", "0", "--vocab-keep-expected", "24576", "--calib-tokens", "16384",
]  # fmt: skip
RECIPES = {
    "full, lr 3e-4": ["--method", "full", "--lr", "3e-4"],
    "distill α 0.5, lr 3e-4": ["--method", "distill", "--lr", "3e-4", "--distill-alpha", "0.5"],
    "distill α 0.25, lr 3e-4": ["--method", "distill", "--lr", "3e-4", "--distill-alpha", "0.25"],
    "distill α 0.1, lr 3e-4": ["--method", "distill", "--lr", "3e-4", "--distill-alpha", "0.1"],
    "distill α 0.5, T 1, lr 3e-4": [
        "--method",
        "distill",
        "--lr",
        "3e-4",
        "--distill-alpha",
        "0.5",
        "--distill-temperature",
        "1",
    ],  # fmt: skip
    "distill α 1 (KL only), lr 3e-4": ["--method", "distill", "--lr", "3e-4", "--distill-alpha", "1"],
    "distill α 0.5, lr 1e-3": ["--method", "distill", "--lr", "1e-3", "--distill-alpha", "0.5"],
    "distill α 0.5, lr 1.5e-4": ["--method", "distill", "--lr", "1.5e-4", "--distill-alpha", "0.5"],
}
EVAL_TOKENS = "8192"


def minigpts(*args: str) -> None:
    command = [sys.executable, "-m", "minigpts.cli", *args]
    print("$ minigpts", " ".join(args), flush=True)
    subprocess.run(command, check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="sample")
    parser.add_argument("--train-tokens", type=int, default=65536)
    parser.add_argument("--target-params", default="0.80", help="the cut (round 2's first table: 0.78)")
    parser.add_argument("--mixed-precision", default="bf16", help="recovery precision (bf16: CPU autocast)")
    parser.add_argument("--recipes", nargs="*", default=list(RECIPES), help="a subset of the recipes")
    parser.add_argument("--work", default=".bench-cache/recovery")
    args = parser.parse_args()
    unknown = sorted(set(args.recipes) - set(RECIPES))
    if unknown:
        parser.error(f"unknown recipes {unknown}; choose from {list(RECIPES)}")
    work = Path(args.work)
    pruned = work / f"pruned-{args.target_params}"
    data = ["--data", args.data]
    if not (pruned / "report.json").is_file():
        cut = ["--target-params", args.target_params, *PRUNE]
        minigpts("run", *data, "--out", str(pruned), "--force", *cut, "--max-eval-tokens", EVAL_TOKENS)
    report = json.loads((pruned / "report.json").read_text())
    base, before = report["base"]["bits_per_byte"], report["pruned"]["bits_per_byte"]
    rows = []
    for name in args.recipes:
        out = pruned.with_name(f"{pruned.name}-" + name.replace(" ", "_").replace(",", "").replace("α", "a"))
        start = time.perf_counter()
        minigpts(
            "finetune", "--model", str(pruned), *data, "--out", str(out), "--force",
            "--max-train-tokens", str(args.train_tokens), "--finetune-seq-len", "256", "--max-val-tokens", "4096",
            "--mixed-precision", args.mixed_precision, "--teacher-cache", str(work / "teacher-cache"),
            *RECIPES[name],
        )  # fmt: skip
        minigpts(
            "eval", "--model", str(out), *data, "--max-eval-tokens", EVAL_TOKENS,
            "--json", str(out / "test.json"), "--force",
        )  # fmt: skip
        bpb = json.loads((out / "test.json").read_text())["bits_per_byte"]
        rows.append((name, bpb, time.perf_counter() - start))
    print(f"\nbase {base:.4f} bits/byte, pruned {report['pruned']['params'] / 1e6:.1f}M params: {before:.4f}")
    print(f"recovery on {args.train_tokens:,} training tokens ({args.mixed_precision}); test bits/byte:")
    print("| recipe | bits/byte | vs base | seconds (information) |\n|---|---:|---:|---:|")
    for name, bpb, seconds in rows:
        print(f"| {name} | {bpb:.4f} | {100 * (bpb / base - 1):+.1f} % | {seconds:.0f} |")


if __name__ == "__main__":
    main()

"""Quality at size, before any training: the refit and the allocation against plain slicing and uniform.

    python benchmarks/bench_quality.py --data economics medical skyrim [--calib-tokens 16384]

For each corpus (a name in ../shared/datasets, or any --data spec), SmolLM2 is analysed once on the
calibration split (with second moments) and every setting prunes a fresh copy; bits/byte on the
test text that the base's first --eval-tokens tokens cover (windows of 1024, the same text for
every row). 16,384 calibration tokens by default, for speed; the library's default is 65,536
(`--calib-tokens 65536`, ~4 min more of analysis per corpus), where the refit gains more (README, the
ridge). Three parts:

- reconstruct: uniform MLP removal (25 %, 50 %), sliced vs the one-shot refit (`--reconstruct lstsq
  --no-sequential`), and the paper's `l1` slicing when another criterion is benched; the target: the
  refit cuts the bits/byte increase over the base by ≥ 35 % (25 %) and ≥ 50 % (50 %).
- sequential: the same refit, layer by layer on the pruned layers' outputs, fitting each
  projection's own outputs (SparseGPT's and Wanda's target), and mixed with the fit of the unpruned
  model's residual stream by held-out windows (`--sequential`, the default); the target: ≤ one-shot,
  and (with the reconstruct part) the same shares of slicing's increase removed.
- allocation: MLP + heads sized by `--target-params` so that 25 % / 50 % of the MLP and attention
  parameters go, all refit: uniform with one common ratio (`--allocation paper`), uniform with the
  error split, per-layer by error (the default), per-layer by the paper's global ranking (with
  `wanda` when the criterion ranks within a layer only, as `refit`); the target: per-layer error ≤
  uniform at equal parameters.

No timing in the results: every number depends only on the seed, the data and the budgets.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

from minigpts.analysis import ActivationStats
from minigpts.data import load_corpus
from minigpts.evaluation import evaluate
from minigpts.models import load_model
from minigpts.pipeline import AnalysisOptions, apply_full_plan, calibration_windows, run_analysis
from minigpts.plan import RANKS_WITHIN_LAYER, make_plan, ranks_across_layers, resolve_criterion

SHARED = Path(__file__).resolve().parents[2] / "shared" / "datasets"


def data_spec(name: str) -> str:
    return str(SHARED / f"{name}.*.jsonl") if (SHARED / f"{name}.train.jsonl").exists() else name


def structural_fraction(model) -> tuple[float, int]:
    """(share of all parameters in MLP + attention projections, all parameters)."""
    total = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    blocks = sum(
        p.numel()
        for n, p in model.named_parameters()
        if ".mlp." in n or ".self_attn." in n and "norm" not in n
    )
    return blocks / total, total


def bench_corpus(name: str, base, tokenizer, args, parts: set[str], share: float) -> dict[str, float]:
    """Every setting of the chosen parts on one corpus: {label: bits/byte (or the share of the increase cut)}."""
    corpus = load_corpus(data_spec(name))
    cache = Path(args.cache) / f"stats-{Path(name).stem}-{args.calib_tokens}.safetensors"
    if cache.exists():
        stats = ActivationStats.load(cache)
    else:
        started = time.perf_counter()
        stats = run_analysis(
            base,
            tokenizer,
            corpus,
            AnalysisOptions(calib_tokens=args.calib_tokens),
            model_name=args.model,
        )
        print(f"{name}: analysis {time.perf_counter() - started:.0f} s", flush=True)
        cache.parent.mkdir(parents=True, exist_ok=True)
        stats.save(cache)
    texts = corpus.split("test")
    rows: dict[str, float] = {}

    def score(label: str, model) -> float:
        result = evaluate(
            model, tokenizer, texts, model_name=label, max_tokens=args.eval_tokens, progress=False,
            budget_tokenizer=tokenizer,
        )  # fmt: skip
        rows[label] = result.bits_per_byte
        params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
        print(f"  {name:12s} {label:44s} {result.bits_per_byte:.4f}  {params / 1e6:6.1f}M", flush=True)
        return result.bits_per_byte

    calibration = calibration_windows(tokenizer, corpus, AnalysisOptions(calib_tokens=args.calib_tokens))

    def pruned(label: str, reconstruct: str, sequential: str | None = None, **plan_kwargs) -> float:
        plan_kwargs.setdefault("criterion", args.criterion)
        plan = make_plan(base, stats, **plan_kwargs)
        model, _ = apply_full_plan(
            copy.deepcopy(base), tokenizer, plan, stats=stats, reconstruct=reconstruct,
            calibration=calibration if sequential else None, ridge=args.ridge,
            sequential_target=sequential or "residual",
        )  # fmt: skip
        return score(label, model)

    base_bpb = score("base", base)
    sliced_at: dict[float, float] = {}
    if "reconstruct" in parts:
        for ratio in (0.25, 0.5):
            sliced = sliced_at[ratio] = pruned(f"uniform MLP {ratio:.0%} sliced", "none", mlp_ratio=ratio)
            refit = pruned(f"uniform MLP {ratio:.0%} refit", "lstsq", mlp_ratio=ratio)
            cut = 1 - (refit - base_bpb) / (sliced - base_bpb)
            rows[f"refit cuts the increase at {ratio:.0%}"] = cut
            print(f"  {name:12s} refit removes {cut:.1%} of the increase at MLP {ratio:.0%}", flush=True)
            if args.criterion != "l1":  # the paper's method is l1 sliced: the share of its increase too
                paper = pruned(
                    f"uniform MLP {ratio:.0%} sliced, l1 (the paper)", "none", mlp_ratio=ratio, criterion="l1"
                )
                cut = 1 - (refit - base_bpb) / (paper - base_bpb)
                rows[f"refit cuts the paper's increase at {ratio:.0%}"] = cut
                print(
                    f"  {name:12s} refit removes {cut:.1%} of the paper's increase at MLP {ratio:.0%}",
                    flush=True,
                )
    if "sequential" in parts:
        for ratio in (0.25, 0.5):
            for target, label in (
                ("self", "own outputs (SparseGPT's target)"),
                ("residual", "mixed, --sequential"),
            ):
                refit = pruned(
                    f"uniform MLP {ratio:.0%} refit, sequential, {label}",
                    "lstsq",
                    sequential=target,
                    mlp_ratio=ratio,
                )
                if target == "residual" and ratio in sliced_at:  # the library's default refit
                    cut = 1 - (refit - base_bpb) / (sliced_at[ratio] - base_bpb)
                    rows[f"sequential refit (the default) cuts the increase at {ratio:.0%}"] = cut
                    print(
                        f"  {name:12s} sequential refit (the default) removes {cut:.1%} of the increase "
                        f"at MLP {ratio:.0%}",
                        flush=True,
                    )
    if "allocation" in parts:
        for removed in (0.25, 0.5):
            target = 1 - removed * share
            for layout, allocation in (
                ("uniform", "paper"),
                ("uniform", "error"),
                ("per-layer", "error"),
                ("per-layer", "paper"),
            ):
                label, criterion = f"{removed:.0%} of MLP+attn, {layout} {allocation}", args.criterion
                if (
                    ranks_across_layers(layout, allocation)
                    and resolve_criterion(criterion) in RANKS_WITHIN_LAYER
                ):
                    label, criterion = f"{label}, wanda", "wanda"  # one ranking needs comparable scores
                pruned(
                    label,
                    "lstsq",
                    target_params=target,
                    layout=layout,
                    allocation=allocation,
                    criterion=criterion,
                )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data", nargs="+", default=["economics"])
    parser.add_argument("--calib-tokens", type=int, default=16_384)
    parser.add_argument("--eval-tokens", type=int, default=8_192)
    parser.add_argument(
        "--criterion",
        default=None,
        help="unit score within a layer (default: the library's, wanda; l1 is the paper's)",
    )
    parser.add_argument(
        "--ridge", type=float, default=None, help="the refit's --ridge (default: the library's)"
    )
    parser.add_argument("--parts", default="reconstruct,sequential,allocation")
    parser.add_argument("--cache", default=".bench-cache", help="statistics are kept here between runs")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    torch.manual_seed(0)

    loaded = load_model(args.model, device="cpu")
    base, tokenizer = loaded.model, loaded.tokenizer
    share, total = structural_fraction(base)
    results = {name: bench_corpus(name, base, tokenizer, args, parts, share) for name in args.data}
    print(f"\nSmolLM2 {total / 1e6:.1f}M parameters, MLP + attention {share:.1%} of them; "
          f"{args.calib_tokens:,} calibration tokens; test text of the base's first {args.eval_tokens:,} tokens")  # fmt: skip
    labels = list(dict.fromkeys(label for rows in results.values() for label in rows))
    print("| setting | " + " | ".join(results) + " |")
    print("|---|" + "---:|" * len(results))
    for label in labels:
        cells = []
        for rows in results.values():
            value = rows.get(label)
            cells.append("" if value is None else (f"{value:.1%}" if "cuts" in label else f"{value:.4f}"))
        print(f"| {label} | " + " | ".join(cells) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()

"""MCQ scoring speed: the fast path (`score_choices`, the default) vs the naive one (`cache=False`).

    .venv/bin/python benchmarks/bench_mcq.py [--model smollm2-135m] [--questions 20] [--threads 1]
    .venv/bin/python benchmarks/bench_mcq.py --mcq ../shared/datasets/mcq/skyrim_question_dataset.json
    .venv/bin/python benchmarks/bench_mcq.py --max-tokens 800 --kv   # also time the KV-cache path

Issue #17 item 11's target: the fast path is ≥ 3× faster than the naive one (every (prompt, choice)
sequence run whole, `batch_size` at a time: the scoring before) with identical scores and choices. The
fast path packs every question's prompt and choices as one token tree, many trees per row, one pass for
many questions (where the model takes a 4D attention mask; else each prompt's KV cache, `--kv` times
that path too). The questions: --questions of the set drawn with --seed (sorted, so a run is the same
on any machine), cut further to --max-tokens naive tokens if given. Both paths run in one run, alternating
over --rounds rounds, each keeping its best round, so a neighbour process slowing the machine for a while
does not land on one side only. Prints the times, the speed-up, the tokens each path runs through the
model (padding included), the largest |Δ log-likelihood| over all choices, whether every question's
chosen answer is the same, and both metrics.
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

import torch

from minigpts import mcq
from minigpts.mcq import load_mcq, mcq_metrics, score_choices
from minigpts.models import load_model

DEFAULT_MCQ = (
    Path(__file__).resolve().parents[2] / "shared" / "datasets" / "mcq" / "basic_economics_dataset.json"
)


def argmax(row: list[float]) -> int:
    return max(range(len(row)), key=row.__getitem__)


def chosen(items, rows) -> list[tuple[int, int]]:
    """Every question's (choice by log-likelihood, choice per byte)."""
    per_byte = [
        [s / max(1, len(c.encode("utf-8"))) for s, c in zip(row, item.choices, strict=True)]
        for item, row in zip(items, rows, strict=True)
    ]
    return [(argmax(row), argmax(norm)) for row, norm in zip(rows, per_byte, strict=True)]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--mcq", type=Path, default=DEFAULT_MCQ, help="a question set (default: Economics)")
    parser.add_argument("--questions", type=int, default=20, help="item budget: score N questions")
    parser.add_argument("--max-tokens", type=int, default=None, help="token budget (naive tokens)")
    parser.add_argument("--seed", type=int, default=0, help="draws the questions (-1: the first N)")
    parser.add_argument("--batch-size", type=int, default=8, help="as `eval` passes (2 x --batch-size)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--kv", action="store_true", help="also time the KV-cache path (the fallback)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (1 is steadier on a busy machine)"
    )
    args = parser.parse_args()
    torch.manual_seed(max(args.seed, 0))
    if args.threads:
        torch.set_num_threads(args.threads)

    loaded = load_model(args.model, device=args.device)
    model, tokenizer = loaded.model, loaded.tokenizer
    items = load_mcq(args.mcq)
    if args.seed >= 0 and args.questions < len(items):
        picked = sorted(random.Random(args.seed).sample(range(len(items)), args.questions))
        items = [items[i] for i in picked]
    items = items[: args.questions]
    if args.max_tokens is not None:
        spent, kept = 0, []
        for item in items:
            spent += sum(
                len(ids) - 1 for ids, _ in mcq._requests(tokenizer, [item], mcq._max_positions(model))
            )
            if kept and spent > args.max_tokens:
                break
            kept.append(item)
        items = kept

    paths = {"naive": (False, True), "fast": (True, True)}  # name: (cache, packing)
    if args.kv:
        paths["kv-cache"] = (True, False)
    tokens = dict.fromkeys(paths, 0)
    current = []
    model.get_input_embeddings().register_forward_hook(
        lambda module, inputs, output: current.append(inputs[0].numel())
    )

    def run(name):
        cache, mcq._PACK = paths[name]
        try:
            return score_choices(model, tokenizer, items, batch_size=args.batch_size, cache=cache)
        finally:
            mcq._PACK = True

    for name in paths:  # warm-up: allocator, lazy inits
        score_choices(model, tokenizer, items[:2], batch_size=args.batch_size, cache=paths[name][0])
    seconds = dict.fromkeys(paths, float("inf"))
    scores = {}
    for _ in range(args.rounds):
        for name in paths:
            current.clear()
            start = time.perf_counter()
            scores[name] = run(name)
            seconds[name] = min(seconds[name], time.perf_counter() - start)
            tokens[name] = sum(current)

    metrics = {name: mcq_metrics(items, rows) for name, rows in scores.items()}
    choices = sum(len(item.choices) for item in items)
    print(
        f"{args.model} on {args.mcq.name}: {len(items)} questions (seed {args.seed}), {choices} choices, "
        f"batch size {args.batch_size}, device {model.device}, torch threads {torch.get_num_threads()}, "
        f"best of {args.rounds} alternating rounds"
    )
    for name, spent in seconds.items():
        m = metrics[name]
        print(
            f"{name:9}: {spent:7.2f} s  {tokens[name]:6d} tokens  accuracy {m['accuracy']:.3f}  "
            f"accuracy_norm {m['accuracy_norm']:.3f}"
        )
    for name in paths:
        if name == "naive":
            continue
        delta = max(
            abs(a - b)
            for row_a, row_b in zip(scores[name], scores["naive"], strict=True)
            for a, b in zip(row_a, row_b, strict=True)
        )
        same = chosen(items, scores[name]) == chosen(items, scores["naive"])
        print(
            f"speed-up (naive / {name}): {seconds['naive'] / seconds[name]:.2f}x  (target ≥ 3x); "
            f"max |Δ log-likelihood| {delta:.2e} nats; same chosen answers: {same}; "
            f"metrics identical: {metrics[name] == metrics['naive']}"
        )


if __name__ == "__main__":
    main()

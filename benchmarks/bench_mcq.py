"""MCQ scoring speed: each question's prompt once + its choices from the KV cache, vs every sequence alone.

    .venv/bin/python benchmarks/bench_mcq.py [--model smollm2-135m] [--questions 20] [--threads 1]
    .venv/bin/python benchmarks/bench_mcq.py --mcq ../shared/datasets/mcq/skyrim_question_dataset.json

Issue #17 item 11's target: the cached path (`score_choices(..., cache=True)`, the default) is ≥ 3×
faster than the uncached one (`cache=False`, the scoring before) with identical scores. Both paths run
on the same first --questions questions in one run, alternating over --rounds rounds, each keeping its
best round, so a neighbour process slowing the machine for a while does not land on one side only.
Prints both times, the speed-up, the largest |Δ log-likelihood| over all choices, and both metrics.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from minigpts.mcq import load_mcq, mcq_metrics, score_choices
from minigpts.models import load_model

DEFAULT_MCQ = (
    Path(__file__).resolve().parents[2] / "shared" / "datasets" / "mcq" / "basic_economics_dataset.json"
)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--mcq", type=Path, default=DEFAULT_MCQ, help="a question set (default: Economics)")
    parser.add_argument("--questions", type=int, default=20, help="score the first N questions")
    parser.add_argument("--batch-size", type=int, default=8, help="as `eval` passes (2 x --batch-size)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (1 is steadier on a busy machine)"
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    loaded = load_model(args.model, device=args.device)
    model, tokenizer = loaded.model, loaded.tokenizer
    items = load_mcq(args.mcq)[: args.questions]
    score_choices(model, tokenizer, items[:2], batch_size=args.batch_size)  # warm-up: allocator, lazy inits

    seconds = {"uncached": float("inf"), "cached": float("inf")}
    scores = {}
    for _ in range(args.rounds):
        for name in seconds:
            start = time.perf_counter()
            scores[name] = score_choices(
                model, tokenizer, items, batch_size=args.batch_size, cache=name == "cached"
            )
            seconds[name] = min(seconds[name], time.perf_counter() - start)

    delta = max(
        abs(a - b)
        for row_a, row_b in zip(scores["cached"], scores["uncached"], strict=True)
        for a, b in zip(row_a, row_b, strict=True)
    )
    metrics = {name: mcq_metrics(items, rows) for name, rows in scores.items()}
    choices = sum(len(item.choices) for item in items)
    print(
        f"{args.model} on {args.mcq.name}: {len(items)} questions, {choices} choices, "
        f"batch size {args.batch_size}, device {model.device}, torch threads {torch.get_num_threads()}, "
        f"best of {args.rounds} alternating rounds"
    )
    for name, spent in seconds.items():
        m = metrics[name]
        print(
            f"{name:9}: {spent:7.2f} s  accuracy {m['accuracy']:.3f}  accuracy_norm {m['accuracy_norm']:.3f}"
        )
    same = metrics["cached"] == metrics["uncached"]
    print(
        f"speed-up (uncached / cached): {seconds['uncached'] / seconds['cached']:.2f}x  (target ≥ 3x); "
        f"max |Δ log-likelihood| {delta:.2e} nats; metrics identical: {same}"
    )


if __name__ == "__main__":
    main()

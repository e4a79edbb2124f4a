"""The computations of test_distributed.py, run alone (the reference) or under ``torchrun`` (2 gloo processes).

``python tests/distributed_worker.py OUT_FILE TMP_DIR`` under torchrun: every process runs ``compute``
on its share, rank 0 saves the (reduced) results to OUT_FILE with ``torch.save``.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from conftest import build_tiny_tokenizer as tiny_tokenizer  # noqa: E402
from conftest import make_tiny_llama  # noqa: E402

BATCH = 2  # analysis and evaluation batch size; recovery: 4 windows per step in total


def windows(n: int, seq_len: int, vocab: int, seed: int) -> torch.Tensor:
    return torch.randint(0, vocab, (n, seq_len), generator=torch.Generator().manual_seed(seed))


def stats_dict(stats) -> dict:
    out = {}
    for name, value in vars(stats).items():
        if isinstance(value, torch.Tensor):
            out[name] = value.double().clone()
        elif isinstance(value, Sequence) and value and isinstance(value[0], torch.Tensor):  # lists, lazy ones
            out[name] = [v.double().clone() for v in value]
        elif isinstance(value, int | float):
            out[name] = value
    return out


def compute(tmp: Path, world: int = 1) -> dict:
    """Analysis (float32 and float64 models), evaluation, MCQ and one recovery step of a tiny Llama."""
    from minigpts.analysis import analyze
    from minigpts.evaluation import evaluate_windows
    from minigpts.mcq import MCQItem, score_choices
    from minigpts.recovery import finetune

    tokenizer = tiny_tokenizer()
    vocab = len(tokenizer)
    results: dict = {}
    calib = windows(10, 16, vocab, seed=1)  # 5 batches: 3 on rank 0, 2 on rank 1
    for dtype in (torch.float32, torch.float64):
        model = make_tiny_llama(vocab, seed=0).to(dtype)
        stats = analyze(
            model,
            calib,
            batch_size=BATCH,
            progress=False,
            moments=True,
            fisher_tokens=16 * 5,
            taylor_tokens=16 * 5,
            depth_tokens=16 * 3,
        )
        results[f"stats_{str(dtype).removeprefix('torch.')}"] = stats_dict(stats)
    results["stats_offload"] = offloaded_stats(tmp, calib, vocab)
    results["fisher_one_window"] = one_window_fisher(tmp, calib, vocab)

    model = make_tiny_llama(vocab, seed=0)
    held_out = list(windows(7, 16, vocab, seed=2)) + [windows(1, 9, vocab, seed=3)[0]]  # a shorter last one
    byte_lengths = torch.randint(1, 5, (vocab,), generator=torch.Generator().manual_seed(4))
    results["eval"] = evaluate_windows(model, held_out, byte_lengths, batch_size=BATCH)

    items = [
        MCQItem(context="", question=f"Question {i}: what sets prices?", choices=choices, answer=i % 3)
        for i, choices in enumerate([["supply", "demand", "both"], ["cost", "price"], ["a", "b", "c"]] * 2)
    ]
    results["mcq"] = score_choices(model, tokenizer, items, batch_size=2)

    torch.manual_seed(0)
    model = make_tiny_llama(vocab, seed=0)
    trained, result = finetune(
        model,
        tokenizer,
        windows(12, 16, vocab, seed=5),
        windows(8, 16, vocab, seed=6),
        out_dir=tmp / "finetune",
        max_steps=1,
        batch_size=4 // world,  # the same global batch of 4 windows on 1 or 2 processes
        lr=1e-3,
        warmup_ratio=0.0,
        progress=False,
    )
    results["finetune"] = {
        "train_loss": result.train_loss,
        "val_history": result.val_history,
        "steps": result.steps,
        "train_tokens": result.train_tokens,
        "weights": {k: v.detach().double().clone() for k, v in trained.state_dict().items()},
    }
    return results


def offloaded_stats(tmp: Path, calib: torch.Tensor, vocab: int) -> dict:
    """Layer-by-layer analysis with second moments (each layer's reduced as soon as it is done)."""
    from minigpts import distributed
    from minigpts.analysis_offload import analyze_offloaded

    directory = tmp / "offload-model"
    if distributed.is_main():  # (save_pretrained writes its config on the main process only)
        make_tiny_llama(vocab, seed=0).to(torch.float64).save_pretrained(directory, safe_serialization=True)
    distributed.barrier()
    stats = analyze_offloaded(
        directory, calib, batch_size=BATCH, progress=False, moments=True, fisher_tokens=16 * 5,
        dtype=torch.float64,
    )  # fmt: skip
    return stats_dict(stats)


def one_window_fisher(tmp: Path, calib: torch.Tensor, vocab: int) -> dict:
    """The gradient pass over one window, in memory and layer by layer: on 2 processes one has none."""
    from minigpts.analysis import analyze
    from minigpts.analysis_offload import analyze_offloaded

    model = make_tiny_llama(vocab, seed=0).to(torch.float64)
    whole = analyze(model, calib, batch_size=BATCH, progress=False, fisher_tokens=16)
    layered = analyze_offloaded(
        tmp / "offload-model", calib, batch_size=BATCH, progress=False, fisher_tokens=16, dtype=torch.float64
    )
    return {
        "in_memory": [t.clone() for t in whole.mlp_fisher],
        "offload": [t.clone() for t in layered.mlp_fisher],
        "tokens": (whole.fisher_tokens, layered.fisher_tokens),
    }


def main() -> None:
    from minigpts import distributed

    out, tmp = Path(sys.argv[1]), Path(sys.argv[2])
    assert distributed.init(), "expected WORLD_SIZE > 1 (run under torchrun)"
    results = compute(tmp, world=distributed.world_size())
    results["world_size"] = distributed.world_size()
    if distributed.is_main():
        torch.save(results, out)
    distributed.barrier()


if __name__ == "__main__":
    main()

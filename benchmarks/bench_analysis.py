"""Analysis throughput vs a plain forward of the model body vs a forward computing logits.

Issue #3's target: analysis >= 0.95 x the plain body forward, and faster than a logits forward, on
the same batches in one run. The three passes are interleaved over several rounds and each keeps its
best round, so a neighbour process slowing one round does not bias one side.

    .venv/bin/python benchmarks/bench_analysis.py                     # SmolLM2-shaped, random init
    .venv/bin/python benchmarks/bench_analysis.py --model smollm2-135m --device cuda
    .venv/bin/python benchmarks/bench_analysis.py --moments   # + second moments: blocked vs full-product gram
"""

from __future__ import annotations

import argparse
import time

import torch


def smollm2_shaped_model():
    """SmolLM2-135M's architecture with random weights: same cost, no download, builds in seconds."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        max_position_embeddings=8192,
        rope_theta=100000.0,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model", default="random-smollm2", help="random-smollm2 or a --model spec of minigpts"
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None, help="default: float32 on CPU, bfloat16 on CUDA")
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (1 is steadier on a busy machine)"
    )
    parser.add_argument(
        "--moments",
        action="store_true",
        help="also time analysis with second moments, with symmetric_gram and with one full xᵀx product",
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from minigpts.analysis import analyze
    from minigpts.arch import get_adapter

    device = torch.device(args.device)
    dtype = (
        getattr(torch, args.dtype)
        if args.dtype
        else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    )
    if args.model == "random-smollm2":
        model = smollm2_shaped_model()
    else:
        from minigpts.models import load_model

        model = load_model(args.model, device=args.device, dtype=str(dtype).removeprefix("torch.")).model
    model = model.to(device, dtype).eval()
    body = get_adapter(model).body(model)
    vocab = model.get_input_embeddings().num_embeddings
    generator = torch.Generator().manual_seed(0)
    windows = torch.randint(0, vocab, (args.windows, args.seq_len), generator=generator)
    batches = windows.split(args.batch_size)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    @torch.inference_mode()
    def plain_body() -> None:
        for batch in batches:
            body(input_ids=batch.to(device), use_cache=False)

    @torch.inference_mode()
    def with_logits() -> None:
        for batch in batches:
            model(input_ids=batch.to(device), use_cache=False).logits.float().sum().item()

    def analysis() -> None:
        analyze(model, windows, batch_size=args.batch_size, progress=False)

    passes = {"body forward": plain_body, "analyze": analysis, "forward + logits": with_logits}
    if args.moments:
        from minigpts import analysis as analysis_module

        blocked = analysis_module.symmetric_gram

        def with_moments(gram) -> None:
            analysis_module.symmetric_gram = gram
            try:
                analyze(model, windows, batch_size=args.batch_size, progress=False, moments=True)
            finally:
                analysis_module.symmetric_gram = blocked

        passes["analyze + moments"] = lambda: with_moments(blocked)
        passes["… full xᵀx gram"] = lambda: with_moments(lambda x: x.T @ x)
    for run in passes.values():  # warm-up: allocator, kernels, lazy inits
        run()
        sync()
    wall = dict.fromkeys(passes, float("inf"))
    cpu = dict.fromkeys(passes, float("inf"))  # this process's CPU time: steadier when neighbours compete
    for _ in range(args.rounds):
        for name, run in passes.items():
            sync()
            start, start_cpu = time.perf_counter(), time.process_time()
            run()
            sync()
            wall[name] = min(wall[name], time.perf_counter() - start)
            cpu[name] = min(cpu[name], time.process_time() - start_cpu)

    tokens = windows.numel()
    print(
        f"model {args.model}, {device.type}, {str(dtype).removeprefix('torch.')}, "
        f"{args.windows} x {args.seq_len} tokens, batch {args.batch_size}, best of {args.rounds} rounds, "
        f"{torch.get_num_threads()} CPU threads"
    )
    for name in passes:
        print(
            f"  {name:<18} {wall[name]:8.3f} s wall {tokens / wall[name]:10.1f} tok/s   {cpu[name]:8.3f} s CPU"
        )
    if args.moments:
        moments = wall["analyze + moments"] - wall["analyze"]
        full = wall["… full xᵀx gram"] - wall["analyze"]
        print(
            f"second moments: {moments:.3f} s with symmetric_gram vs {full:.3f} s with one full product "
            f"({moments / full:.2f}x); whole analysis {wall['analyze + moments'] / wall['… full xᵀx gram']:.3f}x"
        )
    for label, times in (("wall", wall), ("CPU", cpu)):
        if device.type == "cuda" and label == "CPU":
            continue  # host CPU time says nothing about GPU work
        print(
            f"analyze throughput / body forward     ({label:>4}) = {times['body forward'] / times['analyze']:.3f}"
            "  (target >= 0.95)"
        )
        print(
            f"analyze throughput / forward + logits ({label:>4}) = {times['forward + logits'] / times['analyze']:.3f}"
            "  (target > 1)"
        )


if __name__ == "__main__":
    main()

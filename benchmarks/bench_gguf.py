"""GGUF exports run in llama.cpp itself: same token ids, same bits per byte, and they decode.

    make llama-cpp                      # once: compiles llama.cpp into .venv (llama-cpp-python)
    python benchmarks/bench_gguf.py [--model smollm2-135m] [--max-eval-tokens 4096] [--outtypes f32 f16 q8_0]

For each layout — the base model (llama.cpp architecture `llama`), a uniform cut (half the MLP
channels, a third of the query heads, the vocabulary trimmed to --vocab-size tokens) and a per-layer
cut of the same mean size (widths and heads differ between layers: `deci`, with per-layer arrays) —
and each --outtypes, the model is exported with `minigpts export`'s code and checked in llama.cpp
through llama-cpp-python, trusting neither our writer nor our reader:

- token ids: llama.cpp's tokenizer on every document of the evaluated text (and on --random-texts
  strings of random unicode) gives exactly our ids;
- bits per byte from llama.cpp's logits on our evaluation windows (the bundled economics test split,
  the text the base's first --max-eval-tokens tokens cover, windows of --seq-len) is within 0.5 % of
  ours (transformers, fp32) for f32 / f16 and within 2 % for q8_0;
- it decodes: --decode-tokens greedy tokens, compared with transformers' greedy tokens.

By default the cuts keep the first channels / heads (no calibration), so their bits per byte are high;
what is checked is that llama.cpp computes the same numbers as we do. With --calibrated they are the
models a user gets: `minigpts analyze` + `minigpts prune` (default criterion and refit) on the bundled
sample's calibration split, the same ratios and vocabulary, --layout uniform / per-layer. Exit status 1
when a check fails.
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from bench_generate import cut_plan, trim_vocabulary

from minigpts.data import DOCUMENT_SEPARATOR, load_corpus, text_within_token_budget, tokenize_stream
from minigpts.evaluation import evaluate_windows, stream_windows, token_byte_lengths
from minigpts.export_gguf import export_gguf
from minigpts.models import load_model
from minigpts.surgery import apply_plan

SAMPLE = Path(__file__).resolve().parents[1] / "src" / "minigpts" / "sample_data" / "economics.*.jsonl"
TOLERANCE = {"f32": 0.005, "f16": 0.005, "bf16": 0.01, "q8_0": 0.02}
PROMPT = "The law of demand states that, other things being equal,"


def random_texts(count: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    texts = []
    for _ in range(count):
        chars = []
        for _ in range(rng.randint(20, 120)):
            r = rng.random()
            if r < 0.45:
                chars.append(chr(rng.randint(32, 126)))
            elif r < 0.6:
                chars.append(rng.choice([" ", "  ", "\n", "\n\n", "\t", "\r\n", "   "]))
            elif r < 0.8:
                chars.append(chr(rng.randint(0xA0, 0x2FFF)))
            elif r < 0.93:
                chars.append(chr(rng.randint(0x3000, 0xD7FF)))
            else:
                chars.append(chr(rng.randint(0x1F300, 0x1FAFF)))
        texts.append("".join(chars))
    return texts


def greedy_ids(model, tokenizer, tokens: int) -> tuple[list[int], list[int]]:
    prompt = tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    with torch.inference_mode():
        out = model.generate(
            torch.tensor([prompt]), max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False
        )
    return prompt, out[0, len(prompt) :].tolist()


def calibrated_cuts(args, directory: Path) -> dict[str, tuple]:
    """name -> (model, tokenizer) pruned as a user would, by the command line, on the bundled sample."""
    from minigpts.export import load

    def minigpts(*argv: str) -> None:
        subprocess.run([sys.executable, "-m", "minigpts", *argv, "--model", args.model], check=True)

    stats = directory / "stats.safetensors"
    minigpts("analyze", "--data", "sample", "--out", str(stats), "--force")
    cuts = {}
    for name, layout in (("uniform cut", "uniform"), ("per-layer cut", "per-layer")):
        if name in args.layouts:
            out = directory / layout
            ratios = ["--mlp-ratio", str(args.mlp_ratio), "--head-ratio", str(args.head_ratio)]
            vocab = ["--vocab-size", str(args.vocab_size)] if args.vocab_size else []
            minigpts("prune", "--data", "sample", "--stats", str(stats), "--layout", layout, *ratios, *vocab,
                     "--out", str(out), "--force")  # fmt: skip
            cuts[name] = load(out)
    return cuts


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--max-eval-tokens", type=int, default=4096)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--outtypes", nargs="+", default=["f32", "f16", "q8_0"])
    parser.add_argument("--layouts", nargs="+", default=["base", "uniform cut", "per-layer cut"])
    parser.add_argument("--mlp-ratio", type=float, default=0.5)
    parser.add_argument("--head-ratio", type=float, default=0.34)
    parser.add_argument("--vocab-size", type=int, default=12288)
    parser.add_argument("--random-texts", type=int, default=200)
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument(
        "--calibrated",
        action="store_true",
        help="cut with `minigpts analyze` + `prune` on the bundled sample instead of keeping the first channels",
    )
    parser.add_argument("--keep", default=None, help="keep the GGUF files in this directory")
    parser.add_argument("--json", default=None, help="write the results to this file")
    args = parser.parse_args()
    try:
        from minigpts.llama_cpp_check import llama_bits_per_byte, llama_greedy, open_model
    except ImportError:
        print("llama-cpp-python is not installed: run `make llama-cpp` first", file=sys.stderr)
        return 2

    loaded = load_model(args.model, device="cpu", dtype="float32")
    base, tokenizer = loaded.model, loaded.tokenizer
    texts = load_corpus(str(SAMPLE)).split("test")
    # The same text for every model: what the base's first --max-eval-tokens tokens cover.
    texts = text_within_token_budget(tokenizer, texts, args.max_eval_tokens, DOCUMENT_SEPARATOR)
    documents = [t + (DOCUMENT_SEPARATOR if i < len(texts) - 1 else "") for i, t in enumerate(texts)]
    unicode = random_texts(args.random_texts)

    models = {}
    if "base" in args.layouts:
        models["base"] = (base, tokenizer)
    if args.calibrated and {"uniform cut", "per-layer cut"} & set(args.layouts):
        with tempfile.TemporaryDirectory(prefix="minigpts-bench-gguf-cuts-") as tmp:
            models.update(calibrated_cuts(args, Path(tmp)))
    for name, vary in (("uniform cut", False), ("per-layer cut", True)):
        if name in args.layouts and not args.calibrated:
            cut = apply_plan(copy.deepcopy(base), cut_plan(base, args.mlp_ratio, args.head_ratio, vary=vary))
            models[name] = (
                trim_vocabulary(cut, tokenizer, args.vocab_size) if args.vocab_size else (cut, tokenizer)
            )

    keep_dir = Path(args.keep) if args.keep else None
    if keep_dir:
        keep_dir.mkdir(parents=True, exist_ok=True)
    results = []
    failed = False
    with tempfile.TemporaryDirectory(prefix="minigpts-bench-gguf-") as tmp:
        directory = keep_dir or Path(tmp)
        for name, (model, tok) in models.items():
            ids = tokenize_stream(tok, texts, DOCUMENT_SEPARATOR)
            windows = stream_windows(ids, args.seq_len)
            byte_lengths = token_byte_lengths(tok)
            start = time.perf_counter()
            ours = evaluate_windows(model, windows, byte_lengths)
            ours_bpb = ours["nll_sum"] / 0.6931471805599453 / ours["bytes"]
            ours_seconds = time.perf_counter() - start
            prompt, ours_greedy = greedy_ids(model, tok, args.decode_tokens)
            for outtype in args.outtypes:
                path = directory / f"{name.replace(' ', '-')}-{outtype}.gguf"
                export = export_gguf(model, tok, path, outtype=outtype, force=True)
                runner = open_model(path, n_ctx=args.seq_len)
                ids_equal = sum(
                    list(runner.tokenize(d.encode("utf-8"), add_bos=False, special=True))
                    == tok(d, add_special_tokens=False)["input_ids"]
                    for d in documents
                )
                unicode_equal = sum(
                    list(runner.tokenize(t.encode("utf-8"), add_bos=False, special=True))
                    == tok(t, add_special_tokens=False)["input_ids"]
                    for t in unicode
                )
                start = time.perf_counter()
                theirs = llama_bits_per_byte(path, windows, byte_lengths)
                llama_seconds = time.perf_counter() - start
                decoded, _ = llama_greedy(runner, prompt, args.decode_tokens)
                agree = next(
                    (i for i, (a, b) in enumerate(zip(decoded, ours_greedy)) if a != b), len(decoded)
                )
                relative = theirs["bits_per_byte"] / ours_bpb - 1
                ok = (
                    ids_equal == len(documents)
                    and unicode_equal == len(unicode)
                    and abs(relative) <= TOLERANCE[outtype]
                    and len(decoded) == args.decode_tokens
                )
                failed |= not ok
                row = dict(
                    layout=name,
                    outtype=outtype,
                    arch=export.arch,
                    per_layer=export.per_layer,
                    size_mib=export.size_bytes / 2**20,
                    vocab=len(tok),
                    documents_same_ids=f"{ids_equal}/{len(documents)}",
                    random_unicode_same_ids=f"{unicode_equal}/{len(unicode)}",
                    eval_tokens=theirs["tokens"],
                    bpb_ours=ours_bpb,
                    bpb_llama_cpp=theirs["bits_per_byte"],
                    relative=relative,
                    tolerance=TOLERANCE[outtype],
                    greedy_tokens_agreeing=agree,
                    seconds_ours=ours_seconds,
                    seconds_llama_cpp=llama_seconds,
                    ok=ok,
                )
                results.append(row)
                print(
                    f"{name:14} {outtype:5} {export.arch:5} {row['size_mib']:7.1f} MiB  ids {row['documents_same_ids']} docs, "
                    f"{row['random_unicode_same_ids']} random  bpb ours {ours_bpb:.4f} llama.cpp "
                    f"{theirs['bits_per_byte']:.4f} ({100 * relative:+.3f} %, ≤ {100 * TOLERANCE[outtype]:.1f} %)  "
                    f"greedy {agree}/{args.decode_tokens} agree  {'ok' if ok else 'FAILED'}",
                    flush=True,
                )
                runner.close()
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    print("all checks passed" if not failed else "some checks FAILED")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

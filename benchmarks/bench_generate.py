"""Decode speed of pruned SmolLM2 against its base and against what the bytes allow, measured in one run.

    python benchmarks/bench_generate.py [--model smollm2-135m] [--tokens 128] [--repeats 5] [--no-llama-cpp]
                                        [--no-compile] [--no-aot] [--flash-attn both|on|off]

A decode step of a small model on CPU streams every weight once (the KV cache of a short context is
small beside them), so the attainable speed-up of a cut is about

    bound = bytes of weights read per token (base) / bytes read per token (pruned),

counting each tensor once, the token embedding as one gathered row unless it is also the (tied) LM head.
For each cumulative cut — the MLP (--mlp-ratio), + attention heads (--head-ratio, GQA-legal), + the
vocabulary (--vocab-size tokens kept, chosen on the bundled sample corpus by frequency with merge
parents, as `prune --vocab-size` does), + depth (--depth-ratio of the layers dropped), and a per-layer
MLP + heads cut of the same mean size (MLP widths from ±25 % around the ratio, in multiples of 32; llama.cpp
runs it as `deci`; --no-per-layer skips it) — it reports the measured speed-up over the base, the
bound and their quotient (target ≥ 0.9: a verdict line per arm), for transformers (greedy `generate`,
fp32, --tokens new tokens; then the decode steps after the prompt with a static KV cache, the step
`torch.compile`d (unless --no-compile) and exported with `torch.export` and compiled ahead of time by
AOTInductor into one C++ call (unless --no-aot): the deployment forms that take PyTorch's per-operation,
then per-step Python overhead out of each step) and, when `llama-cpp-python` is installed (`make
llama-cpp`), for the same models exported as --outtype GGUF (q8_0) in llama.cpp (greedy, the decode
steps after the prompt; with flash attention off, as `llama_cpp.Llama` defaults, and on, as llama.cpp's
own tools resolve their default `-fa auto` on a CPU). Times are the best of --repeats rounds that
alternate the models (--llama-cpp-repeats for llama.cpp's short runs); the compiled loops' tokens are
checked equal to `generate`'s.
The defaults make the "+ vocabulary" cut a half-size SmolLM2 (≤ 50 % of the parameters, vocabulary
included); its llama.cpp target is ≥ 1.7× the base at the same quantisation.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import tempfile
import time
from pathlib import Path

import torch
from transformers import StaticCache
from transformers.cache_utils import StaticLayer

from minigpts.arch import get_adapter
from minigpts.models import load_model
from minigpts.options import Q8_0_BLOCK
from minigpts.plan import LayerPlan, PruningPlan
from minigpts.surgery import apply_plan
from minigpts.vocab import count_tokens, select_vocab, slice_model_vocab, trim_tokenizer

TARGET_QUOTIENT = 0.9  # issue #16: measured speed-up ≥ 0.9 × the byte bound
PROMPT = "The law of demand states that, other things being equal,"
SAMPLE = Path(__file__).resolve().parents[1] / "src" / "minigpts" / "sample_data" / "economics.train.jsonl"


def cut_plan(
    model,
    mlp_ratio: float,
    head_ratio: float = 0.0,
    depth_ratio: float = 0.0,
    vary: bool = False,
    round_to: int = 8,
) -> PruningPlan:
    """Keep the first channels / heads (which ones does not matter for speed); MLP widths are
    multiples of ``round_to`` (32: whole q8_0 blocks, as `run --gguf-outtype q8_0` plans).

    vary=True spreads the MLP ratio over mlp_ratio ± 0.25 from the first layer to the last and
    alternates the query heads kept per KV group: a per-layer layout of the same mean size.
    """
    adapter = get_adapter(model)
    layers = adapter.layers(model)
    plans = []
    for index, layer in enumerate(layers):
        width = adapter.mlp_out(layer).in_features
        ratio = mlp_ratio
        if vary and len(layers) > 1:
            ratio = min(0.95, max(0.0, mlp_ratio - 0.25 + 0.5 * index / (len(layers) - 1)))
        keep = max(round_to, int(round(width * (1 - ratio) / round_to)) * round_to)
        n_heads, n_kv, _ = adapter.head_layout(layer)
        group = n_heads // n_kv
        per_group = max(1, int(round(group * (1 - head_ratio))))
        if vary and head_ratio > 0:
            per_group = max(1, min(group, per_group + (index % 3) - 1))
        heads = [k * group + h for k in range(n_kv) for h in range(per_group)]
        plans.append(LayerPlan(list(range(keep)), heads, list(range(n_kv))))
    layers_keep = None
    if depth_ratio > 0:
        drop = int(round(len(layers) * depth_ratio))
        # keep the first and last layers; drop evenly spaced ones in between
        middle = list(range(1, len(layers) - 1))
        step = len(middle) / max(drop, 1)
        dropped = {middle[int(i * step + step / 2)] for i in range(drop)}
        layers_keep = [i for i in range(len(layers)) if i not in dropped]
    layout = "per-layer" if vary else "uniform"
    return PruningPlan(
        family=adapter.family, layers=plans, layers_keep=layers_keep, layout=layout, criterion="first"
    )


def uniform_mlp_plan(model, ratio: float) -> PruningPlan:
    """Keep the first (1 - ratio) of every layer's MLP channels."""
    return cut_plan(model, ratio)


def sample_texts() -> list[str]:
    return [json.loads(line)["text"] for line in SAMPLE.open()]


def trim_vocabulary(model, tokenizer, size: int):
    """(model, tokenizer) with `size` tokens: the most frequent in the sample corpus, lossless."""
    counts = count_tokens(tokenizer, sample_texts())
    selection = select_vocab(tokenizer, counts, vocab_size=size, model_config=model.config)
    return slice_model_vocab(model, selection.keep_ids), trim_tokenizer(tokenizer, selection.keep_ids)


def build_cuts(base, tokenizer, args, vary: bool = False) -> dict[str, tuple]:
    """name -> (model, tokenizer), cumulative: base, MLP, + heads, + vocabulary, + depth; then, with
    args.per_layer, the MLP + heads cut laid out per layer."""
    cuts = {"base": (base, tokenizer)}
    mlp = apply_plan(copy.deepcopy(base), cut_plan(base, args.mlp_ratio, vary=vary))
    cuts["MLP"] = (mlp, tokenizer)
    heads = apply_plan(copy.deepcopy(base), cut_plan(base, args.mlp_ratio, args.head_ratio, vary=vary))
    cuts["MLP + heads"] = (heads, tokenizer)
    if args.vocab_size:
        cuts["+ vocabulary"] = trim_vocabulary(copy.deepcopy(heads), tokenizer, args.vocab_size)
    if args.depth_ratio:
        deep = apply_plan(
            copy.deepcopy(base), cut_plan(base, args.mlp_ratio, args.head_ratio, args.depth_ratio, vary=vary)
        )
        if args.vocab_size:
            deep, deep_tokenizer = trim_vocabulary(deep, tokenizer, args.vocab_size)
        else:
            deep_tokenizer = tokenizer
        cuts["+ depth"] = (deep, deep_tokenizer)
    if getattr(args, "per_layer", False):  # llama.cpp runs it as `deci`, with per-layer widths
        plan = cut_plan(base, args.mlp_ratio, args.head_ratio, vary=True, round_to=Q8_0_BLOCK)
        cuts["per-layer MLP + heads"] = (apply_plan(copy.deepcopy(base), plan), tokenizer)
    return cuts


def unique_parameters(model) -> list[torch.nn.Parameter]:
    return list({id(p): p for p in model.parameters()}.values())


def torch_bytes_per_token(model) -> int:
    """Weight bytes one decode step reads: every parameter once; an untied embedding only one row."""
    total = sum(p.numel() * p.element_size() for p in unique_parameters(model))
    embedding = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    if head is None or head.weight is not embedding:
        total -= (embedding.shape[0] - 1) * embedding.shape[1] * embedding.element_size()
    return total


def generate_seconds(model, ids, tokens: int) -> float:
    synchronize = torch.cuda.synchronize if ids.device.type == "cuda" else (lambda: None)
    with torch.inference_mode():
        synchronize()
        start = time.perf_counter()
        out = model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
        synchronize()
        seconds = time.perf_counter() - start
    assert out.shape[1] == ids.shape[1] + tokens
    return seconds


def compiled_decoder(model, ids, tokens: int, compile_forward: bool = True):
    """A callable timing `tokens` greedy decode steps after the prompt (the prompt itself untimed),
    with a static KV cache and the forward `torch.compile`d once, as for deployment; it returns
    (seconds, token ids) — the same ids as greedy `generate`."""
    forward = (
        torch.compile(model.forward, fullgraph=True, dynamic=False) if compile_forward else model.forward
    )
    synchronize = torch.cuda.synchronize if ids.device.type == "cuda" else (lambda: None)
    length = ids.shape[1]
    positions = torch.arange(length + tokens, device=ids.device)[None]

    def decode() -> tuple[float, list[int]]:
        with torch.inference_mode():
            cache = StaticCache(config=model.config, max_cache_len=length + tokens)
            out = model(ids, cache=cache, use_cache=True, position_ids=positions[:, :length])
            token = out.logits[:, -1:].argmax(-1)
            out_ids = []
            synchronize()
            start = time.perf_counter()
            for step in range(tokens):
                out_ids.append(token)
                position = positions[:, length + step : length + step + 1]
                out = forward(input_ids=token, cache=cache, use_cache=True, position_ids=position)
                token = out.logits[:, -1:].argmax(-1)
            synchronize()
            seconds = time.perf_counter() - start
        return seconds, [int(t) for t in out_ids]

    return decode


class _PositionedLayer(StaticLayer):
    """A static KV-cache layer that writes at the step's positions (an input of the exported step)
    instead of advancing a counter tensor kept outside the module, which `torch.export` cannot trace."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, position: torch.Tensor):
        super().__init__(max_cache_len=keys.shape[2])
        self.keys, self.values, self.position = keys, values, position
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        self.keys.index_copy_(2, self.position, key_states)
        self.values.index_copy_(2, self.position, value_states)
        return self.keys, self.values

    def get_seq_length(self):
        return self.position[0]


class _DecodeStep(torch.nn.Module):
    """One decode step, (token ids, positions) -> logits, with the KV cache as buffers: a module
    `torch.export` can trace, so that AOTInductor compiles the whole step into one C++ call."""

    def __init__(self, model, max_len: int):
        super().__init__()
        self.model = model
        self.cache = StaticCache(config=model.config, max_cache_len=max_len)
        with torch.inference_mode():  # allocates every layer's cache at its own head count
            model(torch.zeros(1, 1, dtype=torch.long, device=model.device), cache=self.cache, use_cache=True)
        for index, layer in enumerate(self.cache.layers):
            self.register_buffer(f"keys_{index}", layer.keys.clone().zero_(), persistent=False)
            self.register_buffer(f"values_{index}", layer.values.clone().zero_(), persistent=False)

    def forward(self, input_ids: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        # the buffers as the tracer sees them, fetched at every call
        layers = []
        for index in range(len(self.cache.layers)):
            keys, values = getattr(self, f"keys_{index}"), getattr(self, f"values_{index}")
            layers.append(_PositionedLayer(keys, values, position))
        self.cache.layers = layers
        out = self.model(input_ids=input_ids, cache=self.cache, use_cache=True, position_ids=position[None])
        return out.logits


def aot_decoder(model, ids, tokens: int, package: Path):
    """Like `compiled_decoder`, but the step is exported (`torch.export`) and compiled ahead of time
    by AOTInductor into `package`: no Python, no guards per step — PyTorch's smallest per-step cost."""
    step = _DecodeStep(model, ids.shape[1] + tokens).eval()
    example = (ids[:, :1], torch.zeros(1, dtype=torch.long, device=ids.device))
    with torch.no_grad():
        program = torch.export.export(step, example, strict=False)
    runner = torch._inductor.aoti_load_package(
        torch._inductor.aoti_compile_and_package(program, package_path=str(package))
    )
    synchronize = torch.cuda.synchronize if ids.device.type == "cuda" else (lambda: None)
    length = ids.shape[1]
    positions = torch.arange(length + tokens, device=ids.device)

    def decode() -> tuple[float, list[int]]:
        with torch.inference_mode():
            for index in range(length):  # the prompt, a token at a time (untimed)
                logits = runner(ids[:, index : index + 1], positions[index : index + 1])
            token = logits[:, -1:].argmax(-1)
            out_ids = []
            synchronize()
            start = time.perf_counter()
            for step_index in range(tokens):
                out_ids.append(token)
                logits = runner(token, positions[length + step_index : length + step_index + 1])
                token = logits[:, -1:].argmax(-1)
            synchronize()
            seconds = time.perf_counter() - start
        return seconds, [int(t) for t in out_ids]

    return decode


def best_interleaved(runners: dict, repeats: int) -> dict[str, float]:
    """Best time of each runner (a callable returning seconds) over `repeats` alternating rounds.

    Alternating (instead of all base runs, then all pruned runs) keeps a neighbour process that
    slows the machine for a while from landing on one side only.
    """
    for run in runners.values():  # warm-up: allocator, kernels, lazy inits
        run()
    best = dict.fromkeys(runners, float("inf"))
    for _ in range(repeats):
        for name, run in runners.items():
            best[name] = min(best[name], run())
    return best


def report(title: str, cuts: dict, params: dict, nbytes: dict, seconds: dict, tokens: int) -> list[dict]:
    print(f"\n{title}")
    print(
        f"{'cut':21} {'params':>9} {'bytes/token':>12} {'tok/s':>7} {'speed-up':>9} {'bound':>7} {'quotient':>9}"
    )
    rows = []
    for name in cuts:
        speed = seconds["base"] / seconds[name]
        bound = nbytes["base"] / nbytes[name]
        rows.append(
            dict(
                cut=name,
                params=params[name],
                bytes=nbytes[name],
                tok_s=tokens / seconds[name],
                speedup=speed,
                bound=bound,
            )
        )
        print(
            f"{name:21} {params[name] / 1e6:8.2f}M {nbytes[name] / 2**20:9.1f} MiB {tokens / seconds[name]:7.1f} "
            f"{speed:8.2f}x {bound:6.2f}x {speed / bound:9.2f}"
        )
    quotients = [row["speedup"] / row["bound"] for row in rows if row["cut"] != "base"]
    if quotients:
        verdict = "met" if min(quotients) >= TARGET_QUOTIENT else "not met"
        print(
            f"quotients {min(quotients):.3f}–{max(quotients):.3f}: "
            f"≥ {TARGET_QUOTIENT} for every cut {verdict}"
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--mlp-ratio", type=float, default=0.5)
    parser.add_argument("--head-ratio", type=float, default=0.34, help="query heads removed (GQA-legal)")
    parser.add_argument(
        "--vocab-size", type=int, default=12288, help="tokens kept by the vocabulary cut (0: none)"
    )
    parser.add_argument(
        "--depth-ratio", type=float, default=0.2, help="layers dropped by the depth cut (0: none)"
    )
    parser.add_argument(
        "--no-per-layer",
        dest="per_layer",
        action="store_false",
        help="skip the per-layer row (the MLP + heads cut with widths that differ between layers)",
    )
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--llama-cpp-repeats",
        type=int,
        default=15,
        help="rounds of the llama.cpp arm, whose runs are short (< 1 s): more rounds ride out a busy neighbour",
    )
    parser.add_argument("--outtype", default="q8_0", help="GGUF type of the llama.cpp arm")
    parser.add_argument(
        "--no-compile", action="store_true", help="skip the compiled static-cache decode arm of transformers"
    )
    parser.add_argument(
        "--no-aot",
        action="store_true",
        help="skip the arm exported with torch.export and compiled ahead of time by AOTInductor",
    )
    parser.add_argument(
        "--flash-attn",
        default="both",
        choices=["both", "on", "off"],
        help="llama.cpp arm: flash attention off (llama_cpp.Llama's default), on (llama.cpp's tools on a CPU), or both",
    )
    parser.add_argument("--no-llama-cpp", action="store_true", help="time transformers only")
    parser.add_argument("--no-transformers", action="store_true", help="time llama.cpp only")
    parser.add_argument("--json", default=None, help="write the rows to this file")
    parser.add_argument(
        "--device", default="cpu", help="where the transformers arm decodes (cuts are made on the CPU)"
    )
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    args = parser.parse_args()

    loaded = load_model(args.model, device="cpu", dtype="float32")
    base, tokenizer = loaded.model, loaded.tokenizer
    cuts = build_cuts(base, tokenizer, args)
    params = {name: sum(p.numel() for p in unique_parameters(m)) for name, (m, _) in cuts.items()}
    print(
        f"torch threads {torch.get_num_threads()}, greedy {args.tokens} new tokens, best of {args.repeats}; "
        + ", ".join(f"{name} {params[name] / params['base']:.1%}" for name in cuts)
        + " of the base parameters"
    )
    results = {}
    if not args.no_transformers:
        results.update(transformers_arms(cuts, params, args))
    if not args.no_llama_cpp:
        try:
            import llama_cpp  # noqa: F401
        except ImportError:
            print("\nllama.cpp arm skipped: llama-cpp-python is not installed (make llama-cpp)")
        else:
            results.update(llama_cpp_arm(cuts, params, args))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")


def transformers_arms(cuts: dict, params: dict, args) -> dict[str, list[dict]]:
    """Eager greedy `generate`, then the static-cache decode loop `torch.compile`d (unless --no-compile)
    and exported + compiled ahead of time by AOTInductor (unless --no-aot)."""
    models, prompts = {}, {}
    for name, (model, tok) in cuts.items():
        if (args.device, args.dtype) != ("cpu", "float32"):  # a copy: llama.cpp exports the fp32 one
            model = copy.deepcopy(model).to(device=args.device, dtype=getattr(torch, args.dtype))
        models[name] = model
        prompts[name] = tok(PROMPT, return_tensors="pt")["input_ids"].to(args.device)
    nbytes = {name: torch_bytes_per_token(m) for name, (m, _) in cuts.items()}
    arm = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}[args.dtype]
    arm += "" if args.device == "cpu" else f" {args.device}"
    runners = {
        name: lambda m=models[name], ids=prompts[name]: generate_seconds(m, ids, args.tokens) for name in cuts
    }
    seconds = best_interleaved(runners, args.repeats)
    results = {
        f"transformers {arm}": report(
            f"transformers, {arm} (greedy generate)", cuts, params, nbytes, seconds, args.tokens
        )
    }
    references = {}
    if not (args.no_compile and args.no_aot):
        with torch.inference_mode():
            for name, model in models.items():
                ids = prompts[name]
                out = model.generate(
                    ids, max_new_tokens=args.tokens, min_new_tokens=args.tokens, do_sample=False
                )
                references[name] = out[0, ids.shape[1] :].tolist()
    with tempfile.TemporaryDirectory(prefix="minigpts-bench-aot-") as tmp:
        packages = (Path(tmp) / f"{index}.pt2" for index in itertools.count())
        loops = {
            "compiled": ("torch.compile", "torch.compile + static cache", compiled_decoder),
            "AOTInductor": (
                "AOTInductor",
                "torch.export + AOTInductor, static cache",
                lambda model, ids, tokens: aot_decoder(model, ids, tokens, next(packages)),
            ),
        }
        skipped = {"compiled": args.no_compile, "AOTInductor": args.no_aot}
        for label, (compiler, title, make_decoder) in loops.items():
            if skipped[label]:
                continue
            seconds = time_decode_loops(
                models, prompts, references, args.tokens, args.repeats, compiler, make_decoder
            )
            if seconds is not None:
                results[f"transformers {arm} {label}"] = report(
                    f"transformers, {arm}, {title} (greedy, decode steps after the prompt)",
                    cuts,
                    params,
                    nbytes,
                    seconds,
                    args.tokens,
                )
    return results


def time_decode_loops(
    models: dict, prompts: dict, references: dict, tokens: int, repeats: int, compiler: str, make_decoder
) -> dict | None:
    """Best seconds of each model's decode loop (made by `make_decoder(model, ids, tokens)`), whose
    greedy tokens are compared with `references` (`generate`'s); None when the compiler fails here."""
    decoders = {}
    for name, model in models.items():
        ids = prompts[name]
        start = time.perf_counter()
        try:
            decoders[name] = make_decoder(model, ids, tokens)
            ids_out = decoders[name]()[1]
        except Exception as err:  # a compiler or backend this machine lacks: report, keep the other arms
            print(f"\n{compiler} arm skipped: it failed on {name!r}: {type(err).__name__}: {err}")
            return None
        same = next((i for i, (a, b) in enumerate(zip(ids_out, references[name])) if a != b), None)
        agreement = (
            "same tokens as generate"
            if same is None
            else f"tokens differ from generate's from step {same} (reordered float sums at a near-tie; "
            "the steps timed are as many)"
        )
        print(f"{compiler} {name}: {time.perf_counter() - start:.0f} s (compile + first decode), {agreement}")
    return best_interleaved({name: lambda d=decode: d()[0] for name, decode in decoders.items()}, repeats)


def llama_cpp_arm(cuts: dict, params: dict, args) -> dict[str, list[dict]]:
    from minigpts.export_gguf import export_gguf, weight_bytes_per_token
    from minigpts.llama_cpp_check import llama_greedy, open_model

    modes = {"both": [False, True], "off": [False], "on": [True]}[args.flash_attn]
    results = {}
    with tempfile.TemporaryDirectory(prefix="minigpts-bench-gguf-") as tmp:
        runners, nbytes, models = {}, {}, []
        for name, (model, tok) in cuts.items():
            path = Path(tmp) / f"{len(nbytes)}.gguf"
            export_gguf(model, tok, path, outtype=args.outtype)
            nbytes[name] = weight_bytes_per_token(path)["total"]
            prompt = tok(PROMPT, add_special_tokens=False)["input_ids"]
            for flash in modes:
                models.append(open_model(path, n_ctx=len(prompt) + args.tokens + 8, flash_attn=flash))
                runners[name, flash] = lambda m=models[-1], p=prompt: llama_greedy(m, p, args.tokens)[1]
        seconds = best_interleaved(runners, args.llama_cpp_repeats)
        for model in models:
            model.close()
    for flash in modes:
        label = f"flash attention {'on' if flash else 'off'}"
        rows = report(
            f"llama.cpp, {args.outtype} GGUF, {label} (greedy, decode steps after the prompt)",
            cuts,
            params,
            nbytes,
            {name: seconds[name, flash] for name in cuts},
            args.tokens,
        )
        half = [r for r in rows if r["cut"] == "+ vocabulary"]
        if half:
            share = params["+ vocabulary"] / params["base"]
            print(
                f"half-size model ({share:.1%} of the parameters): {half[0]['speedup']:.2f}x the base "
                f"in llama.cpp at {args.outtype}, {label} (target ≥ 1.7x)"
            )
        results[f"llama.cpp {args.outtype} {label}"] = rows
    return results


if __name__ == "__main__":
    main()

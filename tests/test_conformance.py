"""Conformance: every invariant of surgery, export and vocabulary trimming, on every tiny model variant.

Parametrised over conftest.TINY_CONFIGS, which covers every family in minigpts.arch.SUPPORTED_FAMILIES.
A new family (or variant) joins the suite by adding one entry there. Where a family cannot prune a
group, its adapter says why, and the test asserts that plans for that group are refused with that
reason: nothing is skipped silently.

1. Removing units that contribute nothing leaves the logits unchanged (MLP channels, attention
   heads, decoder layers, hidden channels under RMSNorm, vocabulary rows never used as input).
2. A pruned model saved by minigpts.export reloads with plain transformers to identical logits:
   uniform widths without remote code (unless the family needs it), per-layer widths with it.
3. Greedy generation with the KV cache equals generation without it, after pruning.
4. A trimmed tokenizer round-trips text: decode(encode(s)) == s.
5. LoRA recovery finds every projection (nn.Linear, GPT-2's Conv1D, fused ones) and merges back.
"""

from __future__ import annotations

import copy
import json
import random
import re

import pytest
import torch
from conftest import SAMPLE_TEXT, TINY_CONFIGS, make_tiny_model
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer

from minigpts.arch import SUPPORTED_FAMILIES, get_adapter
from minigpts.errors import UserError
from minigpts.export import save_model
from minigpts.plan import LayerPlan, PruningPlan, make_plan
from minigpts.surgery import PlanError, apply_plan
from minigpts.vocab import (
    SPECIAL_ID_FIELDS,
    count_tokens,
    remap_ids,
    select_vocab,
    slice_model_vocab,
    trim_tokenizer,
)

NAMES = list(TINY_CONFIGS)
ROUND_TRIP = [
    "",
    "Supply and demand.",
    "Économie, 経済学 📈",
    "naïve café — zwölf Jämmerlich 🍣🦘\n\ttabs  ",
    "\u200b\x00ÿ",
]


def test_every_supported_model_type_has_a_tiny_config():
    covered = {model_type for model_type, _ in TINY_CONFIGS.values()}
    assert covered == {t for types in SUPPORTED_FAMILIES.values() for t in types}


# --- helpers ------------------------------------------------------------------------------------------


@pytest.fixture
def model(request, tiny_tokenizer) -> nn.Module:
    return make_tiny_model(request.param, len(tiny_tokenizer))


def by_name(test):
    """Run ``test`` once per TINY_CONFIGS entry, with the built model as the ``model`` fixture."""
    return pytest.mark.parametrize("model", NAMES, indirect=True)(test)


def inputs(vocab: int | list[int], seed: int = 1) -> torch.Tensor:
    """[2, 10] token ids drawn from range(vocab) or from the given ids."""
    ids = list(range(vocab)) if isinstance(vocab, int) else vocab
    picks = torch.randint(0, len(ids), (2, 10), generator=torch.Generator().manual_seed(seed))
    return torch.tensor(ids)[picks]


def logits(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids).logits


def keep_all(model: nn.Module) -> PruningPlan:
    """A plan that keeps every unit; tests remove what they made dead."""
    adapter = get_adapter(model)
    layers = []
    for layer in adapter.layers(model):
        n_heads, n_kv, _ = adapter.head_layout(layer)
        width = adapter.mlp_width(layer)
        layers.append(LayerPlan(list(range(width)), list(range(n_heads)), list(range(n_kv))))
    return PruningPlan(adapter.family, layers)


def removed_heads(n_heads: int, n_kv: int, index: int) -> tuple[list[int], list[int]]:
    """A GQA-legal (heads_keep, kv_heads_keep) that differs by layer, every count dividing 24 and 48.

    With GQA, layer 0 loses a whole KV group and layer 1 one query head in every group; without,
    layer 0 loses its first half and layer 1 keeps two heads. Later layers keep all.
    """
    group = n_heads // n_kv
    if index == 0:
        heads = (
            [h for h in range(n_heads) if h // group != 0]
            if group > 1
            else list(range(n_heads // 2, n_heads))
        )
    elif index == 1:
        heads = [h for h in range(n_heads) if h % group != 0] if group > 1 else [1, n_heads - 1]
    else:
        heads = list(range(n_heads))
    return heads, sorted({h // group for h in heads})


def same_logits(pruned: nn.Module, reference: nn.Module, input_ids: torch.Tensor, atol: float = 1e-5) -> None:
    """Equal logits (atol 1e-5) under SDPA, and under eager attention, which reads the head counts
    surgery sets on the attention modules where SDPA infers GQA from the tensor shapes."""
    for implementation in ("sdpa", "eager"):
        if implementation == "sdpa" and not pruned._supports_sdpa:
            continue  # Gemma 2: SDPA cannot soft-cap attention logits, transformers refuses it
        for model in (pruned, reference):
            model.set_attn_implementation(implementation)
        torch.testing.assert_close(logits(pruned, input_ids), logits(reference, input_ids), atol=atol, rtol=0)


def assert_refused(model: nn.Module, plan: PruningPlan, problem: str, **plan_flags) -> None:
    """Surgery refuses ``plan`` and the planner refuses ``plan_flags`` with the adapter's reason."""
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(PlanError, match=re.escape(problem)):
        apply_plan(model, plan)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(UserError, match=re.escape(problem)):
        make_plan(model, None, criterion="weight", **plan_flags)


def hidden_keep(model: nn.Module) -> list[int]:
    """Half the residual channels (24 of 48: a multiple of every head count LlamaConfig may see)."""
    size = get_adapter(model).hidden_size(model)
    return sorted(random.Random(0).sample(range(size), size // 2))


# --- 1. removing units that contribute nothing changes nothing ---------------------------------------


@by_name
def test_dead_mlp_channels(model):
    adapter = get_adapter(model)
    plan = keep_all(model)
    rng = random.Random(0)
    with torch.no_grad():
        for i, (layer, layer_plan) in enumerate(zip(adapter.layers(model), plan.layers, strict=True)):
            width = adapter.mlp_width(layer)
            dead = set(rng.sample(range(width), width // 2 - i))  # a different width in every layer
            adapter.weight(adapter.mlp_out(layer))[:, sorted(dead)] = 0  # [out, in] (Conv1D: a view)
            layer_plan.mlp_keep = [j for j in range(width) if j not in dead]
    pruned = apply_plan(copy.deepcopy(model), plan)
    assert [adapter.mlp_width(layer) for layer in adapter.layers(pruned)] == [
        len(layer.mlp_keep) for layer in plan.layers
    ]
    same_logits(pruned, model, inputs(model.config.vocab_size))


@by_name
def test_dead_attention_heads(model):
    adapter = get_adapter(model)
    plan = keep_all(model)
    for i, (layer, layer_plan) in enumerate(zip(adapter.layers(model), plan.layers, strict=True)):
        n_heads, n_kv, _ = adapter.head_layout(layer)
        layer_plan.heads_keep, layer_plan.kv_heads_keep = removed_heads(n_heads, n_kv, i)
    if problem := adapter.head_pruning_problem(model.config):
        assert_refused(model, plan, problem, head_ratio=0.5)
        return
    with torch.no_grad():
        for layer, layer_plan in zip(adapter.layers(model), plan.layers, strict=True):
            n_heads, _, head_dim = adapter.head_layout(layer)
            for head in set(range(n_heads)) - set(layer_plan.heads_keep):
                adapter.weight(adapter.attn_out(layer))[:, head * head_dim : (head + 1) * head_dim] = 0
    pruned = apply_plan(copy.deepcopy(model), plan)
    assert [adapter.head_layout(layer)[:2] for layer in adapter.layers(pruned)] == [
        (len(layer.heads_keep), len(layer.kv_heads_keep)) for layer in plan.layers
    ]
    same_logits(pruned, model, inputs(model.config.vocab_size))


@by_name
def test_identity_decoder_layer(model):
    adapter = get_adapter(model)
    with torch.no_grad():  # a block whose output projections write nothing is the identity
        for writer in (adapter.attn_out(adapter.layers(model)[1]), adapter.mlp_out(adapter.layers(model)[1])):
            writer.weight.zero_()
            if writer.bias is not None:
                writer.bias.zero_()
    plan = keep_all(model)
    plan.layers_keep = [0, 2]
    pruned = apply_plan(copy.deepcopy(model), plan)
    assert pruned.config.num_hidden_layers == len(adapter.layers(pruned)) == 2
    same_logits(pruned, model, inputs(model.config.vocab_size))


@by_name
def test_dead_hidden_channels(model):
    adapter = get_adapter(model)
    plan = keep_all(model)
    plan.hidden_keep = hidden_keep(model)
    if problem := adapter.hidden_pruning_problem(model.config):
        assert_refused(model, plan, problem, hidden_ratio=0.5)
        return
    if adapter.norm_kind != "rms":
        # LayerNorm's mean and variance depend on the width: hidden pruning is allowed but approximate
        pruned = apply_plan(copy.deepcopy(model), plan)
        assert pruned.config.hidden_size == len(plan.hidden_keep)
        assert torch.isfinite(logits(pruned, inputs(model.config.vocab_size))).all()
        return
    exact = adapter.hidden_pruning_exact(model.config)  # Gemma 3: eps kept, an error of order eps
    removed = sorted(set(range(adapter.hidden_size(model))) - set(plan.hidden_keep))
    with torch.no_grad():  # nothing ever writes the removed channels of the residual stream
        adapter.embedding(model).weight[:, removed] = 0
        for layer in adapter.layers(model):
            for writer in (adapter.attn_out(layer), adapter.mlp_out(layer)):
                adapter.weight(writer)[removed] = 0
                if writer.bias is not None:
                    writer.bias[removed] = 0
    pruned = apply_plan(copy.deepcopy(model), plan)
    assert pruned.config.hidden_size == adapter.hidden_size(pruned) == len(plan.hidden_keep)
    same_logits(pruned, model, inputs(model.config.vocab_size), atol=1e-5 if exact else 1e-3)


def special_ids(model: nn.Module) -> set[int]:
    """Token ids the model and generation configs name: vocabulary slicing must keep them."""
    ids = set()
    for config in (model.config, model.generation_config):
        for field in SPECIAL_ID_FIELDS:
            value = getattr(config, field, None)
            ids |= {v for v in (value if isinstance(value, list) else [value]) if v is not None}
    return ids


@by_name
def test_unused_vocabulary_rows(model):
    vocab = model.config.vocab_size
    rng = random.Random(0)
    keep = sorted(set(rng.sample(range(vocab), vocab // 3)) | special_ids(model))
    rng.shuffle(keep)  # new ids follow the order of keep
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    old_ids = inputs(keep)
    expected = logits(model, old_ids)[..., keep]
    sliced = slice_model_vocab(copy.deepcopy(model), keep)
    assert sliced.config.vocab_size == len(keep) == sliced.get_input_embeddings().weight.shape[0]
    assert (sliced.get_output_embeddings().weight is sliced.get_input_embeddings().weight) == tied
    new_ids = torch.tensor([remap_ids(row, keep) for row in old_ids.tolist()])
    torch.testing.assert_close(logits(sliced, new_ids), expected, atol=1e-5, rtol=0)


# --- 2. save -> reload, 3. KV cache -------------------------------------------------------------------


def pruned_copy(
    model: nn.Module, *, per_layer: bool, drop_layer: bool = False
) -> tuple[nn.Module, PruningPlan]:
    """``model`` pruned in every group the family allows: the same widths in every layer, or not."""
    adapter = get_adapter(model)
    plan = keep_all(model)
    for i, (layer, layer_plan) in enumerate(zip(adapter.layers(model), plan.layers, strict=True)):
        width = adapter.mlp_width(layer)
        layer_plan.mlp_keep = list(range(0, width, 2)) if not per_layer else list(range(8 * (i + 1)))
        if adapter.head_pruning_problem(model.config) is None:
            n_heads, n_kv, _ = adapter.head_layout(layer)
            layer_plan.heads_keep, layer_plan.kv_heads_keep = removed_heads(
                n_heads, n_kv, i if per_layer else 0
            )
    if adapter.hidden_pruning_problem(model.config) is None:
        plan.hidden_keep = hidden_keep(model)
    if drop_layer:
        plan.layers_keep = [0, 2]
    plan.layout = "per-layer" if per_layer else "uniform"
    return apply_plan(copy.deepcopy(model), plan), plan


def greedy(model: nn.Module, prompt: torch.Tensor, use_cache: bool) -> torch.Tensor:
    return model.generate(
        prompt, max_new_tokens=8, min_new_tokens=8, do_sample=False, use_cache=use_cache, pad_token_id=0
    )


def config_json(path) -> dict:
    return json.loads((path / "config.json").read_text())


@by_name
def test_uniform_plan_reloads_with_plain_transformers(model, tiny_tokenizer, tmp_path):
    pruned, plan = pruned_copy(model, per_layer=False)
    assert not pruned.config.is_heterogeneous
    out = save_model(pruned, tiny_tokenizer, tmp_path / f"{type(model).__name__}-uniform", plan=plan)
    remote = get_adapter(pruned).needs_remote_code(pruned.config)  # OPT: heads narrower than hidden_size
    assert ("auto_map" in config_json(out)) == remote and "per_layer_config" not in config_json(out)
    reloaded = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=remote).eval()
    assert {k: v.shape for k, v in reloaded.state_dict().items()} == {
        k: v.shape for k, v in pruned.state_dict().items()
    }
    input_ids = inputs(model.config.vocab_size)
    assert torch.equal(logits(reloaded, input_ids), logits(pruned, input_ids))


@by_name
def test_per_layer_plan_reloads_with_remote_code_and_caches_correctly(model, tiny_tokenizer, tmp_path):
    pruned, plan = pruned_copy(model, per_layer=True)
    assert pruned.config.is_heterogeneous
    out = save_model(pruned, tiny_tokenizer, tmp_path / f"{type(model).__name__}-per-layer", plan=plan)
    assert config_json(out)["per_layer_config"] and "auto_map" in config_json(out)
    # plain transformers with trust_remote_code, not minigpts.export.load: this checks the exported files
    reloaded = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    input_ids = inputs(model.config.vocab_size)
    assert torch.equal(logits(reloaded, input_ids), logits(pruned, input_ids))
    prompt = input_ids[:1, :5]
    cached = greedy(pruned, prompt, use_cache=True)
    assert torch.equal(cached, greedy(pruned, prompt, use_cache=False))
    assert torch.equal(greedy(reloaded, prompt, use_cache=True), cached)


@by_name
def test_depth_pruned_model_caches_correctly(model):
    pruned, _ = pruned_copy(model, per_layer=False, drop_layer=True)
    adapter = get_adapter(pruned)
    assert [adapter.attention(layer).layer_idx for layer in adapter.layers(pruned)] == [0, 1]
    prompt = inputs(model.config.vocab_size)[:1, :5]
    assert torch.equal(greedy(pruned, prompt, use_cache=True), greedy(pruned, prompt, use_cache=False))


# --- 5. LoRA recovery adapts every projection of every layer, and merges back into the same model ----


@by_name
def test_lora_targets_every_projection_and_merges_back(model):
    from minigpts.recovery import add_lora, lora_target_modules, merge_lora

    adapter = get_adapter(model)
    names = {module: name for name, module in model.named_modules()}
    projections = []
    for layer in adapter.layers(model):
        projections += adapter.attn_in(layer) + [adapter.attn_out(layer)] + adapter.mlp_in(layer)
        projections += [adapter.mlp_out(layer)]
    pattern = re.compile(lora_target_modules(model))
    assert all(pattern.fullmatch(names[m]) for m in projections)
    input_ids = inputs(model.config.vocab_size)
    expected = logits(model, input_ids)
    wrapped = add_lora(copy.deepcopy(model), r=2, alpha=4)
    adapted = {
        name.removeprefix("base_model.model.") for name, m in wrapped.named_modules() if hasattr(m, "lora_A")
    }
    assert {names[m] for m in projections} <= adapted
    merged = merge_lora(wrapped).eval()  # LoRA's B starts at zero: nothing changed yet
    assert [type(m) for m in merged.modules()] == [type(m) for m in model.modules()]
    torch.testing.assert_close(logits(merged, input_ids), expected, atol=1e-6, rtol=0)


# --- 4. vocabulary cut end to end: trimmed tokenizer + sliced model ----------------------------------


@pytest.fixture(scope="module")
def trimmed(tiny_tokenizer):
    """The tiny tokenizer trimmed to the tokens of one sentence (plus what stays lossless)."""
    counts = count_tokens(tiny_tokenizer, [SAMPLE_TEXT.split(". ")[0]])
    selection = select_vocab(tiny_tokenizer, counts, embedding_threshold=0)
    assert selection.vocab_after < len(tiny_tokenizer)
    return trim_tokenizer(tiny_tokenizer, selection.keep_ids)


@settings(max_examples=25, deadline=None)
@given(text=st.text(max_size=30))
def test_trimmed_tokenizer_round_trips_any_text(trimmed, text):
    assert trimmed.decode(trimmed.encode(text, add_special_tokens=False)) == text


@by_name
def test_vocabulary_cut_saves_and_reloads(model, tiny_tokenizer, tmp_path):
    text = SAMPLE_TEXT[:400]
    counts = count_tokens(tiny_tokenizer, [text])
    selection = select_vocab(
        tiny_tokenizer,
        counts,
        embedding_threshold=0,
        model_config=model.config,
        generation_config=model.generation_config,
    )
    keep = selection.keep_ids
    sliced = slice_model_vocab(copy.deepcopy(model), keep)
    out = save_model(sliced, trim_tokenizer(tiny_tokenizer, keep), tmp_path / f"{type(model).__name__}-vocab")
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    old_ids = tiny_tokenizer(text, return_tensors="pt").input_ids
    new_ids = tokenizer(text, return_tensors="pt").input_ids
    assert new_ids.tolist()[0] == remap_ids(old_ids.tolist()[0], keep)  # same segmentation, new numbering
    torch.testing.assert_close(
        logits(reloaded, new_ids), logits(model, old_ids)[..., keep], atol=1e-5, rtol=0
    )
    for s in ROUND_TRIP:
        assert tokenizer.decode(tokenizer.encode(s, add_special_tokens=False)) == s

"""Apply a PruningPlan by physically slicing weights: the model really gets smaller and faster.

Nothing is masked or zeroed. Every removed unit disappears from the tensors, the attributes that
forward() reads are updated, and the config is rewritten so a fresh model built from it has exactly
these shapes (uniform widths: plain config fields; differing widths: transformers' per_layer_config).

Exactness: removing a unit whose contribution is zero leaves the logits unchanged for MLP channels,
attention heads and decoder layers in every family, and for hidden (residual) channels in RMSNorm
families (the norm weights and epsilon are rescaled, see `_shrink_rms_norm`). LayerNorm families
(phi) lose exactness on hidden pruning: the norm's mean and variance depend on the width.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence

import torch
from torch import nn
from transformers.integrations.heterogeneity import AmbiguousGlobalPerLayerAttributeError

from minigpts.arch import get_adapter
from minigpts.arch.base import ArchAdapter, get_module
from minigpts.errors import UserError
from minigpts.plan import LayerPlan, PruningPlan


class PlanError(UserError, ValueError):
    """A plan that cannot be applied to this model (a ValueError for callers, a UserError for the CLI)."""


def apply_plan(model: nn.Module, plan: PruningPlan) -> nn.Module:
    """Prune `model` in place as `plan` says and return it. `plan.vocab_keep` is left to vocab surgery.

    Indices in the plan are positions in `model` as it is now. `plan.layers` holds one LayerPlan per
    current decoder layer (entries of dropped layers are ignored) or one per kept layer, in order.
    The whole plan is validated before anything changes, so a bad plan leaves the model intact.
    """
    adapter = get_adapter(model)
    layers = adapter.layers(model)
    layers_keep, layer_plans, hidden_keep, head_keep = _validate(model, adapter, plan)
    hidden_pruned = len(hidden_keep) < adapter.hidden_size(model)

    with torch.no_grad():
        if len(layers_keep) < len(layers):
            _drop_layers(model, adapter, layers_keep)
        for new_index, (old_index, layer_plan) in enumerate(zip(layers_keep, layer_plans)):
            layer = adapter.layers(model)[new_index]
            _prune_mlp(adapter, layer, layer_plan.mlp_keep)
            if head_keep[old_index] is not None:
                _prune_heads(adapter, layer, *head_keep[old_index])
        if hidden_pruned:
            _prune_hidden(model, adapter, hidden_keep)
    sync_config(model)
    return model


# --- validation ---------------------------------------------------------------------------------


def _validate(model: nn.Module, adapter: ArchAdapter, plan: PruningPlan):
    """(kept layers, their LayerPlans, kept hidden channels, per kept layer (heads, kv heads) or None)."""
    if plan.family != adapter.family:
        raise PlanError(f"the plan is for family {plan.family!r} but the model is {adapter.family!r}")
    layers = adapter.layers(model)
    layers_keep = _check_indices(plan.layers_keep, len(layers), "layers_keep", "decoder layer")
    layer_plans = _layer_plans(plan, len(layers), layers_keep)
    hidden = adapter.hidden_size(model)
    hidden_keep = _check_indices(plan.hidden_keep, hidden, "hidden_keep", "hidden channel")
    if len(hidden_keep) < hidden and (problem := adapter.hidden_pruning_problem(model.config)):
        raise PlanError(problem)
    head_keep = {}
    for index, layer_plan in zip(layers_keep, layer_plans):
        layer = layers[index]
        width = adapter.mlp_out(layer).in_features
        _check_indices(layer_plan.mlp_keep, width, f"layer {index} mlp_keep", "MLP channel")
        head_keep[index] = _head_keep(adapter, layer, layer_plan, index)
        if head_keep[index] is not None and (problem := adapter.head_pruning_problem(model.config)):
            raise PlanError(problem)
        n_heads = len(layer_plan.heads_keep) if head_keep[index] else adapter.head_layout(layer)[0]
        if problem := adapter.width_problem(model.config, len(hidden_keep), n_heads):
            raise PlanError(f"layer {index}: {problem}")
    return layers_keep, layer_plans, hidden_keep, head_keep


def _check_indices(indices: Sequence[int] | None, size: int, name: str, unit: str) -> list[int]:
    """Kept indices as a list; None means all. Must be non-empty, strictly increasing, in range."""
    if indices is None:
        return list(range(size))
    indices = [int(i) for i in indices]
    if not indices:
        raise PlanError(f"{name} keeps no {unit}: at least one must stay")
    if any(b <= a for a, b in zip(indices, indices[1:])):
        raise PlanError(f"{name} must be strictly increasing (sorted, no duplicates)")
    if indices[0] < 0 or indices[-1] >= size:
        raise PlanError(f"{name} has an index outside 0..{size - 1} (the model has {size} {unit}s)")
    return indices


def _layer_plans(plan: PruningPlan, n_layers: int, layers_keep: list[int]) -> list[LayerPlan]:
    if len(plan.layers) == n_layers:
        return [plan.layers[i] for i in layers_keep]
    if len(plan.layers) == len(layers_keep):
        return list(plan.layers)
    raise PlanError(
        f"the plan has {len(plan.layers)} layer entries but the model has {n_layers} layers "
        f"({len(layers_keep)} kept): give one entry per layer"
    )


def _head_keep(
    adapter: ArchAdapter, layer: nn.Module, layer_plan: LayerPlan, index: int
) -> tuple[list[int], list[int]] | None:
    """(query heads, KV heads) to keep, or None when all stay.

    GQA stays legal only if every kept KV head keeps the same number of its own query heads; query
    head h belongs to KV head h // (n_heads / n_kv_heads).
    """
    n_heads, n_kv, _ = adapter.head_layout(layer)
    where = f"layer {index}"
    heads = _check_indices(layer_plan.heads_keep, n_heads, f"{where} heads_keep", "attention head")
    kv_heads = _check_indices(layer_plan.kv_heads_keep, n_kv, f"{where} kv_heads_keep", "key/value head")
    if len(heads) == n_heads and len(kv_heads) == n_kv:
        return None
    group = n_heads // n_kv
    per_kv = Counter(h // group for h in heads)
    if sorted(per_kv) != kv_heads:
        raise PlanError(
            f"{where}: kept query heads belong to KV heads {sorted(per_kv)} but kv_heads_keep is {kv_heads}; "
            "a KV head stays exactly when some of its query heads stay"
        )
    if len(set(per_kv.values())) != 1:
        raise PlanError(
            f"{where}: every kept KV head must keep the same number of query heads (GQA), got "
            f"{dict(sorted(per_kv.items()))}"
        )
    return heads, kv_heads


# --- slicing primitives -------------------------------------------------------------------------


def _index(indices: list[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(indices, dtype=torch.long, device=device)


def _replace(module: nn.Module, name: str, value: torch.Tensor) -> None:
    old = getattr(module, name)
    setattr(module, name, nn.Parameter(value.contiguous(), requires_grad=old.requires_grad))


def _slice_linear(linear: nn.Linear, rows: list[int] | None = None, cols: list[int] | None = None) -> None:
    """Keep output features `rows` (and their bias) and input features `cols`."""
    weight = linear.weight
    if rows is not None:
        rows_t = _index(rows, weight.device)
        weight = weight.index_select(0, rows_t)
        if linear.bias is not None:
            _replace(linear, "bias", linear.bias.index_select(0, rows_t))
        linear.out_features = len(rows)
    if cols is not None:
        weight = weight.index_select(1, _index(cols, weight.device))
        linear.in_features = len(cols)
    _replace(linear, "weight", weight)


def _head_channels(heads: list[int], head_dim: int) -> list[int]:
    return [h * head_dim + d for h in heads for d in range(head_dim)]


def _set_int_attr(module: nn.Module, name: str, old: int, new: int) -> None:
    """Update a cached width attribute (e.g. LlamaMLP.intermediate_size) if the module keeps one."""
    if getattr(module, name, None) == old and isinstance(old, int):
        setattr(module, name, new)


# --- the groups ---------------------------------------------------------------------------------


def _drop_layers(model: nn.Module, adapter: ArchAdapter, layers_keep: list[int]) -> None:
    """Keep the listed decoder layers and renumber `layer_idx`, which indexes the KV cache."""
    old = adapter.layer_list(model)
    kept = nn.ModuleList([old[i] for i in layers_keep])
    for new_index, layer in enumerate(kept):
        adapter.attention(layer).layer_idx = new_index
        if hasattr(layer, "layer_idx"):
            layer.layer_idx = new_index
    parent_path, _, name = f"{adapter.body_path}.{adapter.layers_path}".rpartition(".")
    setattr(get_module(model, parent_path), name, kept)
    config = model.config
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = [config.layer_types[i] for i in layers_keep]
    config.num_hidden_layers = len(layers_keep)


def _prune_mlp(adapter: ArchAdapter, layer: nn.Module, keep: list[int]) -> None:
    down = adapter.mlp_out(layer)
    width = down.in_features
    if len(keep) == width:
        return
    for projection in adapter.mlp_in(layer):
        _slice_linear(projection, rows=keep)
    _slice_linear(down, cols=keep)
    for module in layer.modules():
        _set_int_attr(module, "intermediate_size", width, len(keep))


def _prune_heads(adapter: ArchAdapter, layer: nn.Module, heads: list[int], kv_heads: list[int]) -> None:
    _, _, head_dim = adapter.head_layout(layer)
    q, k, v = adapter.attn_in(layer)
    q_rows = _head_channels(heads, head_dim)
    kv_rows = _head_channels(kv_heads, head_dim)
    _slice_linear(q, rows=q_rows)
    _slice_linear(k, rows=kv_rows)
    _slice_linear(v, rows=kv_rows)
    _slice_linear(adapter.attn_out(layer), cols=q_rows)
    adapter.set_head_counts(layer, len(heads), len(kv_heads))


def _shrink_norm(norm: nn.Module, keep: list[int], rms_scale: float | None) -> None:
    """Slice a norm over the residual stream; RMSNorm is rescaled so zero channels change nothing.

    With the removed channels identically zero, mean(x^2) over D equals (D'/D) * mean(x'^2) over the
    D' kept ones, so  w * x / sqrt(mean_D(x^2) + eps) = (w * sqrt(D/D')) * x' / sqrt(mean_D'(x'^2) + eps * D/D').
    """
    keep_t = _index(keep, norm.weight.device)
    weight = norm.weight.index_select(0, keep_t)
    if rms_scale is not None:
        weight = weight * math.sqrt(rms_scale)
        for eps_name in ("variance_epsilon", "eps"):
            if isinstance(getattr(norm, eps_name, None), float):
                setattr(norm, eps_name, getattr(norm, eps_name) * rms_scale)
    _replace(norm, "weight", weight)
    if getattr(norm, "bias", None) is not None:
        _replace(norm, "bias", norm.bias.index_select(0, keep_t))
    if hasattr(norm, "normalized_shape"):
        norm.normalized_shape = (len(keep),)


def _prune_hidden(model: nn.Module, adapter: ArchAdapter, keep: list[int]) -> None:
    """Remove residual channels everywhere they are read or written."""
    hidden = adapter.hidden_size(model)
    rms_scale = hidden / len(keep) if adapter.norm_kind == "rms" else None
    embedding = adapter.embedding(model)
    lm_head = model.get_output_embeddings()
    tied = lm_head is not None and lm_head.weight is embedding.weight
    _replace(embedding, "weight", embedding.weight.index_select(1, _index(keep, embedding.weight.device)))
    embedding.embedding_dim = len(keep)
    if tied:
        lm_head.weight = embedding.weight
        lm_head.in_features = len(keep)
    elif lm_head is not None:
        _slice_linear(lm_head, cols=keep)
    for layer in adapter.layers(model):
        for norm in adapter.layer_norms(layer):
            _shrink_norm(norm, keep, rms_scale)
        for reader in adapter.attn_in(layer) + adapter.mlp_in(layer):
            _slice_linear(reader, cols=keep)
        for writer in (adapter.attn_out(layer), adapter.mlp_out(layer)):
            _slice_linear(writer, rows=keep)
    final_norm = adapter.final_norm(model)
    if final_norm is not None:
        _shrink_norm(final_norm, keep, rms_scale)
    for module in adapter.body(model).modules():
        _set_int_attr(module, "hidden_size", hidden, len(keep))
    config = model.config
    if rms_scale is not None and adapter.norm_eps_field is not None:
        setattr(config, adapter.norm_eps_field, getattr(config, adapter.norm_eps_field) * rms_scale)


# --- config -------------------------------------------------------------------------------------


def layer_widths(model: nn.Module) -> list[dict[str, int]]:
    """Per decoder layer, the config fields that describe its widths, read from the weights."""
    adapter = get_adapter(model)
    widths = []
    for layer in adapter.layers(model):
        n_heads, n_kv, _ = adapter.head_layout(layer)
        entry = {adapter.mlp_width_field: adapter.mlp_out(layer).in_features, adapter.heads_field: n_heads}
        if adapter.kv_heads_field is not None:
            entry[adapter.kv_heads_field] = n_kv
        widths.append(entry)
    return widths


def sync_config(model: nn.Module) -> None:
    """Rewrite the config from the module shapes: plain fields if all layers agree, else per_layer_config."""
    adapter = get_adapter(model)
    config = model.config
    config.per_layer_config = None
    config.__dict__.pop("allow_global_per_layer_attribute_access", None)
    layers = adapter.layers(model)
    config.num_hidden_layers = len(layers)
    config.hidden_size = adapter.hidden_size(model)
    config.head_dim = adapter.head_layout(layers[0])[2]
    widths = layer_widths(model)
    for field in widths[0]:
        values = [entry[field] for entry in widths]
        setattr(config, field, Counter(values).most_common(1)[0][0])
    if any(entry != widths[0] for entry in widths):
        config.per_layer_config = dict(enumerate(widths))
        try:
            config.validate()
        except AmbiguousGlobalPerLayerAttributeError:
            # Some config validators (LlamaConfig's) read per-layer fields globally, on save and on
            # load; let them see the most common value, which surgery checked like every layer's.
            config.allow_global_per_layer_attribute_access = True

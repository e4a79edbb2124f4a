"""Apply a PruningPlan by physically slicing weights: the model really gets smaller and faster.

Nothing is masked or zeroed. Every removed unit disappears from the tensors, the attributes that
forward() reads are updated, and the config is rewritten so a fresh model built from it has exactly
these shapes (uniform widths: plain config fields; differing widths: transformers' per_layer_config).

Exactness: removing a unit whose contribution is zero leaves the logits unchanged for MLP channels,
attention heads and decoder layers in every family, and for hidden (residual) channels in RMSNorm
families (the norm weights and epsilon are rescaled, see `ArchAdapter.shrink_norm`). LayerNorm families
(phi) lose exactness on hidden pruning: the norm's mean and variance depend on the width. How each
module is sliced (nn.Linear, GPT-2's Conv1D, fused q/k/v or gate/up projections) is the adapter's.
"""

from __future__ import annotations

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
    hidden_keep, kept = start_plan(model, plan)
    with torch.no_grad():
        for _, layer, layer_plan, heads in kept:
            prune_layer(adapter, layer, layer_plan, heads)
        if len(hidden_keep) < adapter.hidden_size(model):
            _prune_hidden(model, adapter, hidden_keep)
    sync_config(model)
    return model


def start_plan(model: nn.Module, plan: PruningPlan):
    """Validate the whole plan and drop the layers it drops: what is left is per layer (``prune_layer``).

    Returns (kept hidden channels, [(original index, layer, its LayerPlan, (heads, KV heads) to keep
    or None)] per kept layer, in order). Shapes only: the layers may still be on the meta device,
    so a model streamed layer by layer (``minigpts.surgery_offload``) is cut by the same code.
    """
    adapter = get_adapter(model)
    layers_keep, layer_plans, hidden_keep, head_keep = _validate(model, adapter, plan)
    if len(layers_keep) < len(adapter.layers(model)):
        _drop_layers(model, adapter, layers_keep)
    layers = adapter.layers(model)
    kept = [
        (old, layers[new], layer_plan, head_keep[old])
        for new, (old, layer_plan) in enumerate(zip(layers_keep, layer_plans, strict=True))
    ]
    return hidden_keep, kept


def prune_layer(
    adapter: ArchAdapter,
    layer: nn.Module,
    layer_plan: LayerPlan,
    heads: tuple[list[int], list[int]] | None,
) -> None:
    """One decoder layer's MLP channels and heads (``start_plan``'s entry for it); layers are independent."""
    with torch.no_grad():
        _prune_mlp(adapter, layer, layer_plan.mlp_keep)
        if heads is not None:
            _prune_heads(adapter, layer, *heads)


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
        width = adapter.mlp_width(layer)
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


# --- the groups: slicing itself is the adapter's (nn.Linear by default; Conv1D, fused q/k/v ...) ---


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
    if len(keep) < adapter.mlp_width(layer):
        adapter.prune_mlp(layer, keep)


def _prune_heads(adapter: ArchAdapter, layer: nn.Module, heads: list[int], kv_heads: list[int]) -> None:
    adapter.prune_heads(layer, heads, kv_heads)


def _prune_hidden(model: nn.Module, adapter: ArchAdapter, keep: list[int]) -> None:
    """Remove residual channels everywhere they are read or written (norms rescaled where exact)."""
    adapter.prune_hidden(model, keep)


# --- config -------------------------------------------------------------------------------------


def layer_widths(model: nn.Module) -> list[dict[str, int]]:
    """Per decoder layer, the config fields that describe its widths, read from the weights."""
    adapter = get_adapter(model)
    widths = []
    for layer in adapter.layers(model):
        n_heads, n_kv, _ = adapter.head_layout(layer)
        entry = {adapter.mlp_width_field: adapter.mlp_width(layer), adapter.heads_field: n_heads}
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
    adapter.sync_modules(model)

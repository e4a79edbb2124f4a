"""Pruning plans: which units of a model survive, as a serialisable dataclass, and the policy deciding it.

A plan names kept units by their index in the *original* model, so it can be checked against the
statistics it came from, re-applied to a fresh copy of the base model, and saved next to the result.
`make_plan` turns activation statistics and the user's amounts (the paper's thresholds, ratios, or a
target size) into a plan whose widths are legal for the family (GQA, rounding, transformers' config
rules) and whose summary counts the parameters surgery will leave, exactly.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from minigpts.allocation import ALLOCATIONS
from minigpts.analysis import ActivationStats
from minigpts.arch import get_adapter
from minigpts.criteria import UnitScores, get_criterion, unit_scores  # noqa: F401 - UnitScores: re-exported
from minigpts.criteria import residual_width as _hidden_size
from minigpts.errors import UserError
from minigpts.options import PlanOptions, flag_of


def _flag(name: str) -> str:
    return flag_of(PlanOptions, name)


@dataclass
class LayerPlan:
    """Kept units of one decoder layer (indices in the original layer, sorted ascending)."""

    mlp_keep: list[int]
    heads_keep: list[int]  # query heads
    kv_heads_keep: list[int]  # key/value heads; equals heads_keep for multi-head attention


@dataclass
class PruningPlan:
    """Everything surgery needs, plus the provenance a user needs to trust it."""

    family: str
    layers: list[LayerPlan]
    hidden_keep: list[int] | None = None  # kept residual channels; None = all
    vocab_keep: list[int] | None = None  # old token ids in new-id order; None = vocabulary untouched
    layers_keep: list[int] | None = None  # kept decoder layers (depth pruning); None = all
    layout: str = "uniform"  # "uniform" | "per-layer"
    criterion: str = "l1"
    settings: dict[str, Any] = field(default_factory=dict)  # the flags that produced the plan
    summary: dict[str, Any] = field(default_factory=dict)  # params before/after etc.

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PruningPlan:
        data = dict(data)
        data["layers"] = [LayerPlan(**layer) for layer in data["layers"]]
        return cls(**data)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1))

    @classmethod
    def load(cls, path: str | Path) -> PruningPlan:
        return cls.from_dict(json.loads(Path(path).read_text()))


# ==================================================================================================
# Planning policy: statistics + flags -> PruningPlan

LAYOUTS = ("uniform", "per-layer")
GROUPS = ("mlp", "heads", "hidden")
_NOT_WIDTH_ARGS = ("model", "stats", "drop_layers", "layer_ratio", "layer_criterion")  # of make_plan
_AMOUNTS = {  # group type -> the make_plan arguments that size it: (ratio, threshold)
    "mlp": ("mlp_ratio", "activation_threshold"),
    "heads": ("head_ratio", "linear_threshold"),
    "hidden": ("hidden_ratio", "linear_threshold"),
}


# --- what can be kept -----------------------------------------------------------------------------


def identity_plan(model: nn.Module) -> PruningPlan:
    """A plan that keeps every unit (a vocabulary-only cut starts from it)."""
    adapter = get_adapter(model)
    layers = []
    for layer in adapter.layers(model):
        n_heads, n_kv, _ = adapter.head_layout(layer)
        keep = list(range(adapter.mlp_width(layer))), list(range(n_heads)), list(range(n_kv))
        layers.append(LayerPlan(mlp_keep=keep[0], heads_keep=keep[1], kv_heads_keep=keep[2]))
    return PruningPlan(family=adapter.family, layers=layers, criterion="none", settings={})


def random_plan_like(model: nn.Module, plan: PruningPlan, seed: int = 0) -> PruningPlan:
    """A plan keeping exactly as many units of each kind per layer as ``plan``, chosen at random.

    The control that any claim about a criterion must beat: same widths, same vocabulary, random units.
    """
    generator = torch.Generator().manual_seed(seed)

    def pick(n: int, k: int) -> list[int]:
        return torch.randperm(n, generator=generator)[:k].tolist()

    adapter = get_adapter(model)
    layers = []
    for layer, layer_plan in zip(adapter.layers(model), plan.layers, strict=True):
        n_heads, n_kv, _ = adapter.head_layout(layer)
        group = n_heads // n_kv
        mlp = sorted(pick(adapter.mlp_width(layer), len(layer_plan.mlp_keep)))
        kv = sorted(pick(n_kv, len(layer_plan.kv_heads_keep)))
        per_group = len(layer_plan.heads_keep) // max(1, len(layer_plan.kv_heads_keep))
        heads = sorted(g * group + m for g in kv for m in pick(group, per_group))
        layers.append(LayerPlan(mlp_keep=mlp, heads_keep=heads, kv_heads_keep=kv))
    hidden = None
    if plan.hidden_keep is not None:
        hidden = sorted(pick(adapter.hidden_size(model), len(plan.hidden_keep)))
    settings = {**plan.settings, "control": "random units, same widths", "control_seed": seed}
    return dataclasses.replace(
        plan,
        layers=layers,
        hidden_keep=hidden,
        criterion="random",
        settings=settings,
        summary=dict(plan.summary),
    )


def best_units_like(model: nn.Module, plan: PruningPlan, scores: UnitScores):
    """(layers, hidden_keep) with ``plan``'s widths in every layer but the units ``scores`` rank best."""
    adapter = get_adapter(model)
    layers = []
    for i, (layer, kept) in enumerate(zip(adapter.layers(model), plan.layers, strict=True)):
        kv_kept = len(kept.kv_heads_keep)
        per_kv = len(kept.heads_keep) // max(1, kv_kept)
        heads, kv, _ = _select_heads(scores.heads[i], adapter.head_layout(layer)[1], kv_kept, per_kv)
        layers.append(LayerPlan(_top(scores.mlp[i], len(kept.mlp_keep)), heads_keep=heads, kv_heads_keep=kv))
    hidden = _top(scores.hidden, len(plan.hidden_keep)) if plan.hidden_keep is not None else None
    return layers, hidden


def _legal_widths(size: int, minimum: int, step: int) -> list[int]:
    """Widths a group may keep: multiples of ``step`` that are >= ``minimum``, and the full width."""
    minimum = min(max(minimum, 1), size)
    return sorted({k for k in range(step, size + 1, step) if k >= minimum} | {size})


def _head_configs(n_heads: int, n_kv: int) -> dict[int, list[tuple[int, int]]]:
    """Legal GQA layouts by query heads kept: (KV heads kept, query heads per kept KV head).

    Every kept KV head keeps the same number of its own query heads, so ``n_q % n_kv == 0`` holds and
    transformers' ``repeat_kv`` still pairs each query head with its own KV head. This covers removing
    whole KV groups, removing query heads evenly within every group, and both at once.
    """
    group = n_heads // n_kv
    configs: dict[int, list[tuple[int, int]]] = {}
    for kv in range(1, n_kv + 1):
        for per_kv in range(1, group + 1):
            configs.setdefault(kv * per_kv, []).append((kv, per_kv))
    return configs


def _closest(legal: list[int], target: float) -> int:
    """The legal count nearest to ``target``; a tie keeps the larger one (prune less, not more)."""
    return min(legal, key=lambda k: (abs(k - target), -k))


def _top(scores: torch.Tensor, k: int) -> list[int]:
    """Indices of the ``k`` highest scores, ascending (ties: the lower index wins)."""
    order = torch.sort(scores, descending=True, stable=True).indices
    return sorted(order[:k].tolist())


def _select_heads(
    scores: torch.Tensor, n_kv: int, kv_kept: int, per_kv: int
) -> tuple[list[int], list[int], float]:
    """Best heads for one layout: each KV group offers its top ``per_kv`` query heads, the best groups stay."""
    group = scores.numel() // n_kv
    by_group = scores.view(n_kv, group)
    best_in_group = torch.sort(by_group, dim=1, descending=True, stable=True)
    group_values = best_in_group.values[:, :per_kv].sum(1)
    kv_keep = _top(group_values, kv_kept)
    heads = sorted(kv * group + int(j) for kv in kv_keep for j in best_in_group.indices[kv, :per_kv])
    return heads, kv_keep, float(group_values[kv_keep].sum())


# --- one group type: requested amount -> kept counts per layer ----------------------------------


@dataclass
class _Request:
    """How much of one group type to remove: a fraction of its units, or every unit scoring <= threshold."""

    flag: str  # the option that asked for it, for messages
    ratio: float | None = None
    threshold: float | None = None


def _target_counts(
    scores: list[torch.Tensor], request: _Request, layout: str, protected: list[int], what: str
) -> list[float]:
    """Per layer, how many units the request would keep before rounding to legal widths.

    Uniform: one fraction for every layer (for a threshold, the mean over layers of the fraction it
    removes). Per-layer: one global ranking across layers, in which each layer's ``protected`` best
    units never compete.
    """
    sizes = [s.numel() for s in scores]
    if request.threshold is not None:
        best = max(float(s.max()) for s in scores)
        if best <= request.threshold:
            raise UserError(
                f"{request.flag} {request.threshold:g} removes every {what} (the highest score is {best:.4g}); "
                "use a smaller threshold"
            )
    if layout == "uniform":
        if request.ratio is not None:
            fraction = request.ratio
        else:
            fraction = sum(float((s <= request.threshold).sum()) / s.numel() for s in scores) / len(scores)
        return [n * (1 - fraction) for n in sizes]
    candidates, owners = [], []
    for i, s in enumerate(scores):
        order = torch.sort(s, descending=True, stable=True).indices
        candidates.append(s[order[protected[i] :]])
        owners.append(torch.full((s.numel() - protected[i],), i))
    values, owner = torch.cat(candidates), torch.cat(owners)
    if request.ratio is not None:
        n_remove = min(round(request.ratio * sum(sizes)), values.numel())
        removed = owner[torch.sort(values, stable=True).indices[:n_remove]]
    else:
        removed = owner[values <= request.threshold]
    counts = torch.bincount(removed, minlength=len(scores)).tolist()
    return [n - c for n, c in zip(sizes, counts, strict=True)]


def _plan_mlp(scores: list[torch.Tensor], request: _Request | None, layout: str, min_mlp: int, round_to: int):
    if request is None:
        return [list(range(s.numel())) for s in scores]
    protected = [min(min_mlp, s.numel()) for s in scores]
    targets = _target_counts(scores, request, layout, protected, "MLP channel")
    keeps = [
        _closest(_legal_widths(s.numel(), min_mlp, round_to), t) for s, t in zip(scores, targets, strict=True)
    ]
    return [_top(s, k) for s, k in zip(scores, keeps, strict=True)]


def _plan_heads(
    scores: list[torch.Tensor],
    layouts: list[tuple[int, int, int]],
    request: _Request | None,
    layout: str,
    allowed: Callable[[int], bool],
):
    """(heads_keep, kv_heads_keep) per layer, every layer a legal GQA layout whose head count is ``allowed``."""
    if request is None:
        return [(list(range(n)), list(range(kv))) for n, kv, _ in layouts]
    targets = _target_counts(scores, request, layout, [1] * len(scores), "attention head")
    configs = [
        {count: c for count, c in _head_configs(n, kv).items() if count == n or allowed(count)}
        for n, kv, _ in layouts
    ]
    counts = [_closest(sorted(c), t) for c, t in zip(configs, targets, strict=True)]
    if layout == "uniform" and len(set(layouts)) == 1:
        # one (KV heads, query heads per KV head) for all layers: the one the scores prefer overall
        n_kv = layouts[0][1]
        shared = max(
            configs[0][counts[0]],
            key=lambda c: (sum(_select_heads(s, n_kv, *c)[2] for s in scores), c[0]),
        )
        return [_select_heads(s, n_kv, *shared)[:2] for s in scores]
    plans = []
    for s, (_, n_kv, _), c, count in zip(scores, layouts, configs, counts, strict=True):
        best = max(c[count], key=lambda cfg: (_select_heads(s, n_kv, *cfg)[2], cfg[0]))
        plans.append(_select_heads(s, n_kv, *best)[:2])
    return plans


def _plan_hidden(
    scores: torch.Tensor, request: _Request | None, round_to: int, allowed: Callable[[int], bool]
) -> list[int] | None:
    """Kept residual channels (None: all); the width is a multiple of ``round_to`` that is ``allowed``."""
    if request is None:
        return None
    size = scores.numel()
    target = _target_counts([scores], request, "uniform", [0], "hidden channel")[0]
    keep = _closest([w for w in _legal_widths(size, 1, round_to) if w == size or allowed(w)], target)
    return None if keep == size else _top(scores, keep)


# --- parameter counting ---------------------------------------------------------------------------


class _ParamCounter:
    """Exact parameter counts of the model that surgery would produce, from shapes alone.

    Each parameter's dims are tagged: MLP channels, query-head channels, KV-head channels, hidden
    channels (any dim of the residual width outside the attention/MLP projections: embeddings, norms,
    LM head), or fixed. Tied weights count once, as in ``evaluation.count_parameters``, whose
    definition of embedding parameters (token and position tables, LM head) this follows.
    """

    def __init__(self, model: nn.Module, adapter):
        layers = adapter.layers(model)
        hidden = _hidden_size(adapter, layers)
        tags: dict[int, tuple[int, tuple[str, ...]]] = {}
        for i, layer in enumerate(layers):
            for linear, dims in adapter.projection_dims(layer):  # (out, in); Conv1D stores them swapped
                tags[id(linear.weight)] = (i, dims)
                if linear.bias is not None:
                    tags[id(linear.bias)] = (i, dims[:1])
        embedding_modules = [model.get_input_embeddings(), model.get_output_embeddings()]
        embedding_modules += [m for m in model.modules() if isinstance(m, nn.Embedding)]
        embedding_ids = {
            id(p) for m in embedding_modules if m is not None for p in m.parameters(recurse=False)
        }
        self.head_dims = [adapter.head_layout(layer)[2] for layer in layers]
        self.entries = []  # (layer, dims, element size, is embedding)
        for p in model.parameters():  # unique: tied weights appear once
            layer, dims = tags.get(id(p), (None, None))
            if dims is None:
                dims = tuple("hidden" if d == hidden else d for d in p.shape)
            self.entries.append((layer, dims, p.element_size(), id(p) in embedding_ids))

    def count(self, widths: list[tuple[int, int, int]], hidden: int) -> dict[str, int]:
        """Params, non-embedding params and bytes for per-layer (mlp, query heads, KV heads) widths."""
        total = non_embedding = size = 0
        for layer, dims, element_size, is_embedding in self.entries:
            numel = 1
            for d in dims:
                if d == "hidden":
                    numel *= hidden
                elif d == "mlp":
                    numel *= widths[layer][0]
                elif d == "2mlp":  # fused gate/up
                    numel *= 2 * widths[layer][0]
                elif d == "q":
                    numel *= widths[layer][1] * self.head_dims[layer]
                elif d == "kv":
                    numel *= widths[layer][2] * self.head_dims[layer]
                elif d in ("qkv", "qkv/head"):  # fused q/k/v, [q | k | v] or [q k v] per head
                    numel *= (widths[layer][1] + 2 * widths[layer][2]) * self.head_dims[layer]
                else:
                    numel *= d
            total += numel
            size += numel * element_size
            if not is_embedding:
                non_embedding += numel
        return {"params": total, "params_non_embedding": non_embedding, "size_bytes": size}


# --- the planner ----------------------------------------------------------------------------------


def _check_fraction(flag: str, value: float | None, *, low_open: bool, high_open: bool) -> None:
    if value is None:
        return
    low_ok = value > 0 if low_open else value >= 0
    high_ok = value < 1 if high_open else value <= 1
    if not (isinstance(value, int | float) and math.isfinite(value) and low_ok and high_ok):
        interval = f"{'(' if low_open else '['}0, 1{')' if high_open else ']'}"
        meaning = "fraction of parameters to keep" if flag == _flag("target_params") else "fraction removed"
        raise UserError(f"{flag} {value}: the {meaning} must be in {interval}")


DEFAULT_CRITERION = "wanda"  # with the refit: the best, or within 1 %, after recovery (README)
PAPER_CRITERION = "l1"  # the paper's mean |a|: its thresholds are in these units


def resolve_criterion(
    criterion: str | None, activation_threshold: float | None = None, linear_threshold: float | None = None
) -> str:
    """The criterion that scores units: ``criterion`` when given; otherwise ``wanda`` (its weight-aware
    score suits the refit: README, *Quality at size*), or the paper's ``l1`` when a paper threshold is
    given, since the paper's threshold values are mean |a| values."""
    if criterion is not None:
        return criterion
    paper = activation_threshold is not None or linear_threshold is not None
    return PAPER_CRITERION if paper else DEFAULT_CRITERION


RANKS_WITHIN_LAYER = ("refit",)  # scores that order one layer's units but mean nothing across layers


def ranks_across_layers(layout: str, allocation: str, stats: ActivationStats | None = None) -> bool:
    """Whether the plan compares scores of different layers: the paper's per-layer allocation does (one
    global ranking), also when the error allocation falls back to it (``stats`` without second moments
    and gradients); the error allocation sizes layers by output error and orders units within each."""
    if layout != "per-layer":
        return False
    return allocation == "paper" or (stats is not None and not (stats.has_moments and stats.has_fisher))


def make_plan(
    model: nn.Module,
    stats: ActivationStats | None,
    *,
    criterion: str | None = None,
    mlp_ratio: float | None = None,
    head_ratio: float | None = None,
    hidden_ratio: float | None = None,
    target_params: float | None = None,
    linear_threshold: float | None = None,
    activation_threshold: float | None = None,
    layout: str = "uniform",
    min_mlp: int = 8,
    round_to: int = 8,
    seed: int = 0,
    target_groups: tuple[str, ...] = ("mlp", "heads"),
    allocation: str = "error",
    drop_layers: int | None = None,
    layer_ratio: float | None = None,
    layer_criterion: str = "bi",
) -> PruningPlan:
    """Decide which units survive. Nothing is modified; ``apply_plan`` (surgery) does the cutting.

    Amounts, per group type (MLP channels, attention heads, hidden channels):

    - the paper's thresholds, in units of ``criterion`` (the paper's values, e.g. 1e-3, assume
      ``l1``, which ``criterion=None`` then picks: ``resolve_criterion``): ``activation_threshold``
      removes MLP channels scoring <= E, ``linear_threshold`` removes attention heads (score = mean
      over the head's dims) and hidden channels scoring <= E;
    - ratios ``mlp_ratio`` / ``head_ratio`` / ``hidden_ratio``: the fraction removed, in [0, 1);
    - ``target_params``: the fraction of all parameters to keep, in (0, 1]. One removal ratio,
      common to the groups in ``target_groups`` that no ratio or threshold already fixes, is found
      by bisection; the plan whose size is nearest the target wins (``summary["target"]``).

    Layouts (``uniform``: every layer the same widths; ``per-layer``: each group type ranked across
    all layers) and allocations (``error``, the default, or ``paper``): see ``_plan_widths``.

    Depth (``minigpts.depth``): ``drop_layers`` (a count) or ``layer_ratio`` (a fraction of the
    layers) removes the decoder layers that score lowest by ``layer_criterion`` (``bi``: Block
    Influence; ``loss``: the loss increase without the layer, needs ``analyze --depth-tokens``); the
    widths are then planned on the layers that stay (see ``_plan_with_depth``).
    """
    criterion = resolve_criterion(criterion, activation_threshold, linear_threshold)
    if drop_layers or layer_ratio:
        widths = {k: v for k, v in locals().items() if k not in _NOT_WIDTH_ARGS}  # every width argument
        return _plan_with_depth(model, stats, widths, drop_layers, layer_ratio, layer_criterion)
    given = locals()
    names = ("criterion", "mlp_ratio", "head_ratio", "hidden_ratio", "target_params", "target_groups")
    names += ("linear_threshold", "activation_threshold", "layout", "min_mlp", "round_to", "seed")
    names += ("allocation",)
    settings = {name: list(target_groups) if name == "target_groups" else given[name] for name in names}
    _check_settings(settings)
    _check_ranking(criterion, layout, allocation, stats)
    return _plan_widths(model, stats, settings)


def _check_ranking(criterion: str, layout: str, allocation: str, stats: ActivationStats | None) -> None:
    """Scores that are ranks within a layer cannot be ranked across layers: every layer would get one width."""
    if criterion in RANKS_WITHIN_LAYER and ranks_across_layers(layout, allocation, stats):
        raise UserError(
            f"{_flag('criterion')} {criterion} ranks units within a layer only, so the paper's per-layer "
            "allocation (one ranking across layers) would give every layer the same width: use "
            f"{_flag('allocation')} error (the default; it needs analyze --moments --fisher-tokens N) "
            f"or another {_flag('criterion')}"
        )


def _check_settings(settings: dict[str, Any]) -> None:
    """``make_plan``'s amounts and options must be legal, and no two may size the same group."""
    for name, allowed in (("layout", LAYOUTS), ("allocation", ALLOCATIONS)):
        if settings[name] not in allowed:
            raise UserError(f"{_flag(name)} {settings[name]}: use one of {', '.join(allowed)}")
    get_criterion(settings["criterion"])  # a UserError naming the registered criteria
    for name in ("mlp_ratio", "head_ratio", "hidden_ratio"):
        _check_fraction(_flag(name), settings[name], low_open=False, high_open=True)
    _check_fraction(_flag("target_params"), settings["target_params"], low_open=True, high_open=False)
    for name in ("linear_threshold", "activation_threshold"):
        if settings[name] is not None and not math.isfinite(settings[name]):
            raise UserError(f"{_flag(name)} {settings[name]}: must be a finite number")
    for name in ("min_mlp", "round_to"):
        if not (isinstance(settings[name], int) and settings[name] >= 1):
            raise UserError(f"{_flag(name)} {settings[name]}: must be a whole number >= 1")
    if settings["mlp_ratio"] is not None and settings["activation_threshold"] is not None:
        raise UserError("--mlp-ratio and --activation-threshold both size the MLP: give one of them")
    for name in ("head_ratio", "hidden_ratio"):
        if settings[name] is not None and settings["linear_threshold"] is not None:
            raise UserError(
                f"{_flag(name)} and --linear-threshold both size the same group: give one of them"
            )
    target_groups = settings["target_groups"]
    unknown = set(target_groups) - set(GROUPS)
    if unknown or not target_groups:
        raise UserError(f"target groups {sorted(unknown) or '(none)'}: choose among {', '.join(GROUPS)}")


def _plan_widths(model: nn.Module, stats: ActivationStats | None, settings: dict) -> PruningPlan:
    """``make_plan`` without depth pruning, on checked ``settings``.

    Layouts: ``uniform`` gives every layer the same widths (plain transformers configs load it);
    ``per-layer`` ranks each group type across all layers, every layer keeping at least ``min_mlp``
    MLP channels and one query head with its KV head. Counts are then rounded to the nearest legal
    width (ties keep more): MLP and hidden widths to multiples of ``round_to`` (or the full width),
    heads to a GQA-legal layout — every kept KV head keeps the same number of its own query heads,
    which covers removing whole KV groups, thinning every group evenly, or both. With thresholds in
    the uniform layout, every layer removes the mean over layers of the fraction the threshold
    removes in each. Within a layer the units kept are always the highest-scoring ones, so with
    ``round_to=1`` and no GQA a threshold removes exactly the units scoring <= E.

    Allocation (``minigpts.allocation``): with ``allocation="error"`` (the default; it needs
    statistics with second moments, else the paper's rule is used and a note says so) the per-layer
    layout sizes each layer's MLP and attention by the output error the refit leaves, cheapest
    first, and ``target_params`` spends its budget where the error per parameter is lowest — across
    layers (per-layer) or between the MLP and the heads (uniform). ``allocation="paper"``: per-layer
    is one global ranking of the raw scores, and ``target_params`` one common ratio for every group.
    Within a layer the kept units are always the best by ``criterion``.
    """
    adapter = get_adapter(model)
    layers = adapter.layers(model)
    if stats is not None:
        stats.check_model(model)
    scores = unit_scores(model, stats, settings["criterion"], settings["seed"])
    layouts = [tuple(adapter.head_layout(layer)) for layer in layers]
    notes: list[str] = []
    requests, solved = _group_requests(model, adapter, settings, notes)
    sizer = _Sizer(model, adapter, scores, layouts, settings)

    # the error allocation matters for per-layer widths and for how a target splits between groups
    target_params, layout = settings["target_params"], settings["layout"]
    error_matters = layout == "per-layer" or (target_params is not None and len(solved) > 1)
    if settings["allocation"] == "error" and error_matters:
        sizer.errors = _error_model(sizer, stats, notes)

    before = sizer.counter.count(
        [(s.numel(), n, kv) for s, (n, kv, _) in zip(scores.mlp, layouts, strict=True)], sizer.hidden_size
    )
    result, target_info = _size_to_target(sizer, requests, solved, settings, before["params"], notes)
    return _assemble_plan(sizer, stats, settings, before, result, target_info, notes)


def _group_requests(model: nn.Module, adapter, settings: dict[str, Any], notes: list[str]):
    """(request per group type, groups ``target_params`` sizes): what is asked, less what the family forbids."""
    requests: dict[str, _Request | None] = {
        group: _request(_flag(ratio), settings[ratio], _flag(threshold), settings[threshold])
        for group, (ratio, threshold) in _AMOUNTS.items()
    }
    problems = {
        "heads": adapter.head_pruning_problem(model.config),
        "hidden": adapter.hidden_pruning_problem(model.config),
    }
    target_groups = settings["target_groups"]
    solved = (
        [g for g in target_groups if requests[g] is None] if settings["target_params"] is not None else []
    )
    explicit_flags = {
        "heads": _flag("head_ratio") if settings["head_ratio"] is not None else None,
        "hidden": _flag("hidden_ratio")
        if settings["hidden_ratio"] is not None
        else ("--target-params with hidden" if "hidden" in solved else None),
    }
    for group, problem in problems.items():
        if problem is None:
            continue
        if explicit_flags[group]:
            raise UserError(f"{explicit_flags[group]}: {problem}")
        if requests[group] is not None or group in solved:
            notes.append(f"{group} not pruned: {problem}")
        requests[group] = None
        solved = [g for g in solved if g != group]
    return requests, solved


class _Sizer:
    """What ``make_plan``'s steps share: the model's shapes and scores, and ``build`` from amounts to units."""

    def __init__(self, model: nn.Module, adapter, scores: UnitScores, layouts: list, settings: dict):
        self.model, self.adapter, self.scores, self.layouts = model, adapter, scores, layouts
        self.layout, self.min_mlp, self.round_to = (settings[k] for k in ("layout", "min_mlp", "round_to"))
        self.counter = _ParamCounter(model, adapter)
        self.hidden_size = _hidden_size(adapter, adapter.layers(model))
        self.errors: _ErrorModel | None = None  # the error allocation, when used

    def width_ok(self, hidden: int, n_heads: int) -> bool:
        return self.adapter.width_problem(self.model.config, hidden, n_heads) is None

    def build(self, reqs: dict[str, _Request | None], fixed_counts: dict | None = None):
        """(mlp_keep, heads, hidden_keep, counts) for the requests, or for fixed per-layer counts."""
        fixed_counts = fixed_counts or {}
        scores, errors, layout = self.scores, self.errors, self.layout
        if "mlp" in fixed_counts:
            mlp_keep = [_top(s, k) for s, k in zip(scores.mlp, fixed_counts["mlp"], strict=True)]
        elif errors is not None and layout == "per-layer" and reqs["mlp"] is not None:
            mlp_keep = errors.mlp_keep(reqs["mlp"])
        else:
            mlp_keep = _plan_mlp(scores.mlp, reqs["mlp"], layout, self.min_mlp, self.round_to)
        # transformers may tie widths together (LlamaConfig: hidden_size % num_attention_heads == 0):
        # heads are chosen against the full residual width, then the hidden width against those heads
        if "heads" in fixed_counts:
            heads = errors.heads_for(fixed_counts["heads"])
        elif errors is not None and layout == "per-layer" and reqs["heads"] is not None:
            heads = errors.heads_keep(reqs["heads"])
        else:
            heads = _plan_heads(
                scores.heads,
                self.layouts,
                reqs["heads"],
                layout,
                lambda n: self.width_ok(self.hidden_size, n),
            )
        head_counts = {len(h) for h, _ in heads}
        hidden_keep = _plan_hidden(
            scores.hidden,
            reqs["hidden"],
            self.round_to,
            lambda w: all(self.width_ok(w, n) for n in head_counts),
        )
        widths = [(len(m), len(h), len(kv)) for m, (h, kv) in zip(mlp_keep, heads, strict=True)]
        kept_hidden = self.hidden_size if hidden_keep is None else len(hidden_keep)
        return mlp_keep, heads, hidden_keep, self.counter.count(widths, kept_hidden)


def _error_model(sizer: _Sizer, stats: ActivationStats | None, notes: list[str]) -> _ErrorModel | None:
    """The error allocation's model, or None (and a note) when the statistics cannot support it."""
    if stats is not None and stats.has_moments and stats.has_fisher:
        s = sizer
        errors = _ErrorModel(s.model, s.adapter, stats, s.scores, s.layouts, s.counter, s.min_mlp, s.round_to)
        errors.allowed = lambda n: s.width_ok(s.hidden_size, n)
        return errors
    notes.append(
        "allocation: the statistics have no second moments and gradients (analyze --moments "
        "--fisher-tokens N), so the paper's allocation was used"
    )
    return None


def _size_to_target(sizer: _Sizer, requests: dict, solved: list[str], settings, params_before: int, notes):
    """(``build``'s result, ``summary["target"]``): the requests as given, or sized to ``target_params``."""
    target_params, errors = settings["target_params"], sizer.errors
    if target_params is None:
        return sizer.build(requests), None
    if not solved:
        raise UserError(
            "--target-params: every group it could size already has a ratio or threshold, or cannot be "
            f"pruned in this model ({', '.join(settings['target_groups'])}); drop one of those flags"
        )
    target = target_params * params_before
    if errors is not None and "hidden" not in solved:
        result = errors.solve_target(sizer.build, requests, solved, target, sizer.layout)
        target_info = {"target_params": target_params, "groups": solved, "allocation": "error"}
    else:
        if errors is not None:
            notes.append("allocation: hidden channels have no error model; one common ratio sized the target")
        result, ratio = _solve_target(sizer.build, requests, solved, target, params_before)
        target_info = {"target_params": target_params, "groups": solved, "common_ratio": round(ratio, 6)}
    target_info["achieved"] = round(result[3]["params"] / params_before, 6)
    return result, target_info


def _assemble_plan(sizer: _Sizer, stats, settings, before: dict, result, target_info, notes) -> PruningPlan:
    """The plan of ``build``'s result, with the summary a user needs to trust it."""
    mlp_keep, heads, hidden_keep, after = result
    plan_layers = [
        LayerPlan(mlp_keep=m, heads_keep=h, kv_heads_keep=kv)
        for m, (h, kv) in zip(mlp_keep, heads, strict=True)
    ]
    dtype = str(next(sizer.model.parameters()).dtype).removeprefix("torch.")
    summary: dict[str, Any] = {
        "params_before": before["params"],
        "params_after": after["params"],
        "params_non_embedding_before": before["params_non_embedding"],
        "params_non_embedding_after": after["params_non_embedding"],
        "relative_size": round(after["params"] / before["params"], 6),
        "size_bytes_before": before["size_bytes"],
        "size_bytes_after": after["size_bytes"],
        "dtype": dtype,
        "hidden_before": sizer.hidden_size,
        "hidden_after": sizer.hidden_size if hidden_keep is None else len(hidden_keep),
        "layers": [
            {
                "mlp": len(layer.mlp_keep),
                "mlp_before": s.numel(),
                "heads": len(layer.heads_keep),
                "heads_before": n,
                "kv_heads": len(layer.kv_heads_keep),
                "kv_heads_before": kv,
            }
            for layer, s, (n, kv, _) in zip(plan_layers, sizer.scores.mlp, sizer.layouts, strict=True)
        ],
    }
    if target_info is not None:
        summary["target"] = target_info
    if notes:
        summary["notes"] = notes
    if stats is not None:
        summary["stats"] = {"n_tokens": stats.n_tokens, **stats.metadata}
    return PruningPlan(
        family=sizer.adapter.family,
        layers=plan_layers,
        hidden_keep=hidden_keep,
        layout=sizer.layout,
        criterion=settings["criterion"],
        settings=settings,
        summary=summary,
    )


def _plan_with_depth(
    model: nn.Module,
    stats: ActivationStats | None,
    widths: dict[str, Any],
    drop_layers: int | None,
    layer_ratio: float | None,
    layer_criterion: str,
) -> PruningPlan:
    """Depth first, then widths: drop the lowest-scoring layers, then plan the widths of the rest.

    ``make_plan`` sizes the widths on the model as surgery will leave it (``depth.only_layers``) with
    the statistics of the kept layers only, so ratios, per-layer rankings and the error allocation see
    only the layers that stay. ``target_params`` stays a fraction of the whole model: the dropped
    layers count towards it and the widths make up the rest. ``plan.layers`` keeps one entry per
    original layer (the dropped ones keep everything; surgery ignores them); ``summary["layers"]``
    lists the kept layers, each with its original index in ``"layer"``.
    """
    from minigpts import depth
    from minigpts.arch import get_adapter

    adapter = get_adapter(model)
    layers = adapter.layers(model)
    n_drop = depth.drop_count(len(layers), drop_layers, layer_ratio)
    depth_settings = {
        "drop_layers": drop_layers,
        "layer_ratio": layer_ratio,
        "layer_criterion": layer_criterion,
    }
    if n_drop == 0:  # e.g. a ratio that rounds to no layer
        plan = make_plan(model, stats, **widths)
        plan.settings.update(depth_settings)
        return plan
    if stats is not None:
        stats.check_model(model)
    scores = depth.layer_scores(stats, layer_criterion)
    keep = depth.layers_to_keep(scores, n_drop)
    full = [(adapter.mlp_width(layer), *adapter.head_layout(layer)[:2]) for layer in layers]
    hidden = _hidden_size(adapter, layers)
    before = _ParamCounter(model, adapter).count(full, hidden)
    requested = widths["target_params"]
    notes = []
    plan = _plan_kept_layers(model, adapter, stats, widths, keep, full, hidden, before, n_drop, notes)
    entries = iter(plan.layers)
    plan.layers = [
        next(entries)
        if i in keep
        else LayerPlan(list(range(mlp)), list(range(n_heads)), list(range(adapter.head_layout(layer)[1])))
        for i, (layer, (mlp, n_heads, _)) in enumerate(zip(layers, full, strict=True))
    ]
    plan.layers_keep = keep
    plan.settings.update(depth_settings, target_params=requested)
    _depth_summary(plan.summary, before, keep, len(layers), scores, layer_criterion, requested)
    if notes:
        plan.summary.setdefault("notes", []).extend(notes)
    return plan


def _plan_kept_layers(
    model, adapter, stats, widths, keep, full, hidden, before, n_drop, notes
) -> PruningPlan:
    """``make_plan`` on the kept layers only, ``target_params`` rescaled from the whole model (``before``)."""
    from minigpts import depth

    requested = widths["target_params"]
    with depth.only_layers(model, keep):
        inner = dict(widths)
        if requested is not None:
            shallow = _ParamCounter(model, adapter).count([full[i] for i in keep], hidden)["params"]
            inner["target_params"] = min(1.0, requested * before["params"] / shallow)
            if inner["target_params"] >= 1.0:
                notes.append(
                    f"the {n_drop} dropped layers alone reach --target-params {requested:g} "
                    f"({shallow / before['params']:.1%} of the parameters left): no width was pruned"
                )
        try:
            return make_plan(model, depth.stats_for_layers(stats, keep), **inner)
        except UserError as error:
            if requested is None:
                raise
            raise UserError(  # the inner planner's fractions are of the model without the dropped layers
                f"--target-params {requested:g} with {n_drop} of {len(full)} layers dropped "
                f"({shallow / before['params']:.1%} of the parameters left); in terms of that smaller "
                f"model: {error}"
            ) from None


def _depth_summary(summary, before, keep, n_layers, scores, layer_criterion, requested) -> None:
    """Turn the kept layers' summary into the whole model's: original indices, sizes, the depth cut."""
    for entry, index in zip(summary["layers"], keep, strict=True):
        entry["layer"] = index
    summary.update(
        params_before=before["params"],
        params_non_embedding_before=before["params_non_embedding"],
        size_bytes_before=before["size_bytes"],
        relative_size=round(summary["params_after"] / before["params"], 6),
        depth={
            "criterion": layer_criterion,
            "layers_before": n_layers,
            "layers_after": len(keep),
            "dropped": sorted(set(range(n_layers)) - set(keep)),
            "scores": [round(float(x), 6) for x in scores],
        },
    )
    if "target" in summary:
        summary["target"]["target_params"] = requested
        summary["target"]["achieved"] = round(summary["params_after"] / before["params"], 6)
        summary["target"]["groups"] = ["layers", *summary["target"]["groups"]]


class _ErrorModel:
    """The output-error curves of every layer's MLP and attention, and the allocations made from them."""

    def __init__(self, model, adapter, stats, scores, layouts, counter, min_mlp, round_to):
        from minigpts.criteria import layer_weights

        layers = adapter.layers(model)
        hidden = _hidden_size(adapter, layers)
        self.scores, self.layouts, self.counter, self.hidden = scores, layouts, counter, hidden
        self.allowed: Callable[[int], bool] = lambda n: True
        self.full = [(s.numel(), n, kv) for s, (n, kv, _) in zip(scores.mlp, layouts, strict=True)]
        full_params = counter.count(self.full, hidden)["params"]

        def params_with(i: int, widths: tuple[int, int, int]) -> int:
            changed = list(self.full)
            changed[i] = widths
            return counter.count(changed, hidden)["params"] - full_params

        self.mlp, self.heads = [], []
        for i, layer in enumerate(layers):
            with layer_weights(model, layer):  # prune --offload: one layer's weights at a time
                self._add_layer(i, layer, adapter, stats, params_with, min_mlp, round_to)

    def _add_layer(self, i, layer, adapter, stats, params_with, min_mlp, round_to) -> None:
        """Layer i's MLP and attention error curves."""
        from minigpts import allocation

        scores, layouts = self.scores, self.layouts
        size, n_heads, n_kv = self.full[i]
        per_channel = -params_with(i, (size - 1, n_heads, n_kv))
        widths = _legal_widths(size, min_mlp, round_to)
        self.mlp.append(
            allocation.mlp_component(
                adapter.mlp_out(layer),
                scores.mlp[i],
                stats.mlp_gram[i],
                stats.mlp_mean[i],
                widths,
                per_channel,
                stats.mlp_fisher[i],
            )
        )
        configs = _head_configs(n_heads, n_kv)
        self.heads.append(
            allocation.head_component(
                adapter.attn_out(layer),
                scores.heads[i],
                n_kv,
                layouts[i][2],
                configs,
                stats.attn_gram[i],
                stats.attn_mean[i],
                lambda count, kv, i=i: params_with(i, (self.full[i][0], count, kv)),
                stats.attn_fisher[i],
            )
        )

    def _budget(self, request: _Request, scores: list[torch.Tensor]) -> float:
        if request.ratio is not None:
            return request.ratio * sum(s.numel() for s in scores)
        return float(sum(int((s <= request.threshold).sum()) for s in scores))

    def _allowed_heads(self) -> list:
        """Head components restricted to the counts transformers accepts (and always the full count)."""
        from minigpts.allocation import Component

        restricted = []
        for component, (n_heads, _, _) in zip(self.heads, self.layouts, strict=True):
            options = [o for o in component.options if o[0] == n_heads or self.allowed(o[0])]
            restricted.append(Component(options, component.choice, component.errors))
        return restricted

    def mlp_keep(self, request: _Request) -> list[list[int]]:
        from minigpts.allocation import allocate

        if request.threshold is not None:
            _target_counts(self.scores.mlp, request, "uniform", [0] * len(self.mlp), "MLP channel")
        chosen = allocate(self.mlp, self._budget(request, self.scores.mlp), lambda o: o[0])
        return [_top(s, c.options[j][0]) for s, c, j in zip(self.scores.mlp, self.mlp, chosen, strict=True)]

    def heads_keep(self, request: _Request):
        from minigpts.allocation import allocate

        if request.threshold is not None:
            _target_counts(self.scores.heads, request, "uniform", [1] * len(self.heads), "attention head")
        heads = self._allowed_heads()
        chosen = allocate(heads, self._budget(request, self.scores.heads), lambda o: o[0])
        return self.heads_for([c.choice[c.options[j][0]] for c, j in zip(heads, chosen, strict=True)])

    def heads_for(self, configs: list[tuple[int, int]]):
        """(heads_keep, kv_heads_keep) per layer for a (KV heads kept, heads per KV head) per layer."""
        return [
            _select_heads(s, n_kv, *config)[:2]
            for s, (_, n_kv, _), config in zip(self.scores.heads, self.layouts, configs, strict=True)
        ]

    def solve_target(self, build, requests: dict, groups: list[str], target: float, layout: str):
        """The plan near ``target`` parameters with the least summed error over ``groups``."""
        fixed = build(requests)
        if fixed[3]["params"] <= target:
            return fixed
        if layout == "per-layer":
            return self._solve_per_layer(build, requests, groups, fixed[3]["params"] - target)
        return self._solve_uniform(build, requests, groups, target)

    def _solve_per_layer(self, build, requests, groups, budget):
        from minigpts.allocation import allocate

        components = (self.mlp if "mlp" in groups else []) + (
            self._allowed_heads() if "heads" in groups else []
        )
        chosen = allocate(components, budget, lambda o: o[1])
        picks = [c.options[j][0] for c, j in zip(components, chosen, strict=True)]
        counts = {}
        if "mlp" in groups:
            counts["mlp"], picks = picks[: len(self.mlp)], picks[len(self.mlp) :]
        if "heads" in groups:
            counts["heads"] = [c.choice[k] for c, k in zip(self.heads, picks, strict=True)]
        return build(requests, counts)

    def _solve_uniform(self, build, requests, groups, target):
        """One width for every layer: each GQA layout paired with the MLP width that meets the target."""
        n_heads, n_kv, _ = self.layouts[0]
        if len(set(self.layouts)) != 1 or len({s for s, _, _ in self.full}) != 1:
            raise UserError(
                "--target-params with the uniform layout needs layers of equal widths; use --layout per-layer"
            )
        head_configs = [None]
        if "heads" in groups:
            head_configs = [
                config
                for count, configs in _head_configs(n_heads, n_kv).items()
                if count == n_heads or self.allowed(count)
                for config in configs
            ]
        widths = [o[0] for o in self.mlp[0].options] if "mlp" in groups else [None]
        plans = []  # (distance to the target, summed error, plan)
        for config in head_configs:
            candidates = []
            for width in widths:
                counts = {}
                if width is not None:
                    counts["mlp"] = [width] * len(self.mlp)
                if config is not None:
                    counts["heads"] = [config] * len(self.heads)
                result = build(requests, counts)
                candidates.append((abs(result[3]["params"] - target), -result[3]["params"], width, result))
            _, _, width, result = min(candidates, key=lambda c: c[:2])
            error = 0.0
            if width is not None:
                error += sum(dict((o[0], o[2]) for o in c.options)[width] for c in self.mlp)
            if config is not None:
                error += sum(c.errors[config] for c in self.heads)
            plans.append((abs(result[3]["params"] - target), error, result))
        close = [p for p in plans if p[0] <= self._tolerance()]
        return min(close, key=lambda p: p[1])[2] if close else min(plans, key=lambda p: p[0])[2]

    def _tolerance(self) -> int:
        """Half a rounding step of every layer's MLP: how far from the target a uniform plan may land."""
        widths = sorted(o[0] for o in self.mlp[0].options)
        step = min((b - a for a, b in zip(widths, widths[1:], strict=False)), default=1)
        return int(step * self.mlp[0].options[-1][1] / max(widths[-1], 1) * len(self.mlp) / 2)


def _request(
    ratio_flag: str, ratio: float | None, threshold_flag: str, threshold: float | None
) -> _Request | None:
    if ratio is not None:
        return _Request(ratio_flag, ratio=ratio)
    if threshold is not None:
        return _Request(threshold_flag, threshold=threshold)
    return None


def _solve_target(build, requests: dict, groups: list[str], target: float, params_before: int):
    """Bisection on one removal ratio shared by ``groups``: the plan whose size is nearest ``target``.

    Sizes only fall as the ratio grows, in steps (rounding), so the bracket ends on two neighbouring
    plans, one above and one at or below the target; the nearer one wins.
    """

    def at(ratio: float):
        sized = dict(requests)
        for group in groups:
            sized[group] = _Request(_flag("target_params"), ratio=ratio)
        return build(sized)

    low, high = 0.0, 1.0 - 1e-9
    above = at(low)
    if above[3]["params"] <= target:
        return above, low
    below = at(high)
    if below[3]["params"] > target:
        smallest = below[3]["params"] / params_before
        raise UserError(
            f"--target-params {target / params_before:g}: unreachable; removing all that the rules allow from "
            f"{' and '.join(groups)} still keeps {smallest:.1%} of the parameters "
            "(add hidden channels to the target groups, prune the vocabulary, or aim higher)"
        )
    while high - low > 1e-7:  # finer than one unit of any real model (1 / 352k MLP channels of Llama-2-7B)
        middle = (low + high) / 2
        result = at(middle)
        if result[3]["params"] > target:
            low, above = middle, result
        else:
            high, below = middle, result
    if abs(above[3]["params"] - target) < abs(below[3]["params"] - target):
        return above, low
    return below, high


# --- dry-run view ---------------------------------------------------------------------------------


def _millions(n: int) -> str:
    return f"{n / 1e6:,.2f}M"


def describe_plan(plan: PruningPlan, *, warnings: bool = True):
    """A rich Table for ``--dry-run``: widths per layer (identical neighbours merged) and the totals.

    Notes starting with "warning:" (a threshold that removes nothing or almost everything) are shown in
    yellow in the caption, or left out with ``warnings=False`` for a caller that prints them full-width.
    """
    from rich.table import Table

    summary = plan.summary
    table = Table(
        title=f"pruning plan: {plan.family}, {plan.layout} layout, criterion {plan.criterion}",
        caption_justify="left",
    )
    for column in ("layers", "MLP channels", "query heads", "KV heads"):
        table.add_column(column, justify="right")
    for indices, cells in _layer_rows(summary):
        label = str(indices[0]) if len(indices) == 1 else f"{indices[0]}-{indices[-1]}"
        table.add_row(label, *cells)
    lines = _summary_lines(summary)
    lines += [
        note if note.startswith("warning:") else f"note: {note}"
        for note in summary.get("notes", [])
        if warnings or not note.startswith("warning:")
    ]
    from rich.text import Text

    caption = Text()  # plain text (notes may hold brackets), threshold warnings in yellow
    for i, line in enumerate(lines):
        caption.append(("\n" if i else "") + line, style="yellow" if line.startswith("warning:") else "")
    table.caption = caption
    return table


def _layer_rows(summary: dict[str, Any]) -> list[tuple[list[int], tuple[str, str, str]]]:
    """(layer indices, cells) per table row: neighbouring layers of identical widths share a row."""
    rows: list[tuple[list[int], tuple[str, str, str]]] = []
    for i, layer in enumerate(summary.get("layers", [])):
        index = layer.get("layer", i)  # the original index (depth pruning lists the kept layers only)
        cells = (
            f"{layer['mlp']} / {layer['mlp_before']}",
            f"{layer['heads']} / {layer['heads_before']}",
            f"{layer['kv_heads']} / {layer['kv_heads_before']}",
        )
        if rows and rows[-1][1] == cells and rows[-1][0][-1] == index - 1:
            rows[-1][0].append(index)
        else:
            rows.append(([index], cells))
    return rows


def _summary_lines(summary: dict[str, Any]) -> list[str]:
    """The caption's lines about depth, hidden width, size and target (the notes follow them)."""
    lines = []
    if "depth" in summary:
        depth = summary["depth"]
        lines.append(
            f"decoder layers: {depth['layers_after']} / {depth['layers_before']} (dropped "
            f"{', '.join(map(str, depth['dropped']))}: lowest {depth['criterion']} scores)"
        )
    if "hidden_before" in summary:
        lines.append(f"hidden channels: {summary['hidden_after']} / {summary['hidden_before']}")
    if "params_before" in summary:
        lines.append(
            f"parameters: {_millions(summary['params_before'])} -> {_millions(summary['params_after'])} "
            f"({summary['params_after'] / summary['params_before']:.1%} of the base); non-embedding "
            f"{_millions(summary['params_non_embedding_before'])} -> {_millions(summary['params_non_embedding_after'])}"
        )
        from minigpts.report import format_bytes

        lines.append(
            f"expected size ({summary['dtype']}): {format_bytes(summary['size_bytes_before'])} -> "
            f"{format_bytes(summary['size_bytes_after'])}"
        )
    if "target" in summary:
        target = summary["target"]
        how = (
            f"common removal ratio {target['common_ratio']:.4f}"
            if "common_ratio" in target
            else "least output error per parameter"
        )
        if "requested" in target and "achieved_with_vocab" in target:
            lines.append(
                f"target {target['requested']:.1%} of all parameters (vocabulary included) -> "
                f"{target['achieved_with_vocab']:.1%} achieved"
            )
        lines.append(
            f"target {target['target_params']:.1%} of the structural parameters: {how} over "
            f"{', '.join(target['groups'])} -> {target['achieved']:.1%}"
        )
    return lines

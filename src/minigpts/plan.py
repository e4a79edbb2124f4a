"""Pruning plans: which units of a model survive, as a serialisable dataclass, and the policy deciding it.

A plan names kept units by their index in the *original* model, so it can be checked against the
statistics it came from, re-applied to a fresh copy of the base model, and saved next to the result.
`make_plan` turns activation statistics and the user's amounts (the paper's thresholds, ratios, or a
target size) into a plan whose widths are legal for the family (GQA, rounding, transformers' config
rules) and whose summary counts the parameters surgery will leave, exactly.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from minigpts.analysis import ActivationStats
from minigpts.errors import UserError


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

CRITERIA = ("l1", "wanda", "weight", "random")
LAYOUTS = ("uniform", "per-layer")
GROUPS = ("mlp", "heads", "hidden")


@dataclass
class UnitScores:
    """How much each prunable unit matters under one criterion (higher = keep)."""

    mlp: list[torch.Tensor]  # [intermediate] per layer
    heads: list[torch.Tensor]  # [n_heads] per layer (query heads)
    hidden: torch.Tensor  # [hidden], one set for the whole model


def _column_norms(linear: nn.Linear) -> torch.Tensor:
    """‖W[:, j]‖₂ for every input column j: how strongly input j is read."""
    return torch.linalg.vector_norm(linear.weight.detach().float(), dim=0).to("cpu", torch.float64)


def unit_scores(
    model: nn.Module, stats: ActivationStats | None, criterion: str = "l1", seed: int = 0
) -> UnitScores:
    """Per-unit scores; every unit is scored where its activation is consumed.

    - ``l1`` (the paper): ``mean |a|`` over the calibration tokens. MLP channel: the activation's
      output; head: mean over the head's dims of its output; hidden channel: mean over every
      residual-reading projection of every layer.
    - ``wanda``: ``sqrt(mean a²) · ‖W[:, j]‖₂`` (Wanda's ``‖X_j‖₂ · |W|`` up to the constant √N), with
      W the consuming weight: the down/fc2 projection for MLP channels; for a head, the mean over
      its dims of that product on the output projection; for a hidden channel, the sum of the
      product over the residual readers (q and gate/fc1 projections) of every layer.
    - ``weight``: the same column norms without activations (data-free magnitude pruning).
    - ``random``: uniform random numbers from ``seed`` (the control every claim needs).
    """
    from minigpts.arch import get_adapter

    if criterion not in CRITERIA:
        raise UserError(f"--criterion {criterion}: use one of {', '.join(CRITERIA)}")
    adapter = get_adapter(model)
    layers = adapter.layers(model)
    if criterion == "random":
        generator = torch.Generator().manual_seed(seed)

        def uniform(n: int) -> torch.Tensor:
            return torch.rand(n, generator=generator, dtype=torch.float64)

        mlp = [uniform(adapter.mlp_out(layer).in_features) for layer in layers]
        heads = [uniform(adapter.head_layout(layer)[0]) for layer in layers]
        return UnitScores(mlp, heads, uniform(_hidden_size(adapter, layers)))
    if criterion == "l1":
        if stats is None:
            raise UserError("--criterion l1 needs activation statistics (--stats, from `minigpts analyze`)")
        return UnitScores(list(stats.mlp_l1), list(stats.head_l1), stats.hidden_l1)
    if criterion == "wanda" and stats is None:
        raise UserError("--criterion wanda needs activation statistics (--stats, from `minigpts analyze`)")

    def scaled(norms: torch.Tensor, mean_square: torch.Tensor | None) -> torch.Tensor:
        return norms if mean_square is None else norms * mean_square.sqrt()

    wanda = criterion == "wanda"
    mlp, heads = [], []
    hidden = torch.zeros(_hidden_size(adapter, layers), dtype=torch.float64)
    for i, layer in enumerate(layers):
        mlp.append(scaled(_column_norms(adapter.mlp_out(layer)), stats.mlp_l2sq[i] if wanda else None))
        n_heads, _, head_dim = adapter.head_layout(layer)
        per_dim = scaled(_column_norms(adapter.attn_out(layer)), stats.attn_dim_l2sq[i] if wanda else None)
        heads.append(per_dim.view(n_heads, head_dim).mean(1))
        for r, reader in enumerate(adapter.residual_readers(layer)):
            hidden += scaled(_column_norms(reader), stats.reader_l2sq[i][r] if wanda else None)
    return UnitScores(mlp, heads, hidden)


def _hidden_size(adapter, layers: list[nn.Module]) -> int:
    """Width of the residual stream as the layers read it (OPT's embedding may be narrower)."""
    return adapter.residual_readers(layers[0])[0].in_features


# --- what can be kept -----------------------------------------------------------------------------


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
            q, k, v = adapter.attn_in(layer)
            for linear, dims in (
                *((m, ("mlp", "hidden")) for m in adapter.mlp_in(layer)),
                (adapter.mlp_out(layer), ("hidden", "mlp")),
                (q, ("q", "hidden")),
                (k, ("kv", "hidden")),
                (v, ("kv", "hidden")),
                (adapter.attn_out(layer), ("hidden", "q")),
            ):
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
                elif d == "q":
                    numel *= widths[layer][1] * self.head_dims[layer]
                elif d == "kv":
                    numel *= widths[layer][2] * self.head_dims[layer]
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
        meaning = "fraction of parameters to keep" if flag == "--target-params" else "fraction removed"
        raise UserError(f"{flag} {value}: the {meaning} must be in {interval}")


def make_plan(
    model: nn.Module,
    stats: ActivationStats | None,
    *,
    criterion: str = "l1",
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
) -> PruningPlan:
    """Decide which units survive. Nothing is modified; ``apply_plan`` (surgery) does the cutting.

    Amounts, per group type (MLP channels, attention heads, hidden channels):

    - the paper's thresholds, in units of ``criterion`` (the paper's values, e.g. 1e-3, assume
      ``l1``): ``activation_threshold`` removes MLP channels scoring <= E, ``linear_threshold``
      removes attention heads (score = mean over the head's dims) and hidden channels scoring <= E;
    - ratios ``mlp_ratio`` / ``head_ratio`` / ``hidden_ratio``: the fraction removed, in [0, 1);
    - ``target_params``: the fraction of all parameters to keep, in (0, 1]. One removal ratio,
      common to the groups in ``target_groups`` that no ratio or threshold already fixes, is found
      by bisection; the plan whose size is nearest the target wins (``summary["target"]``).

    Layouts: ``uniform`` gives every layer the same widths (plain transformers configs load it);
    ``per-layer`` ranks each group type across all layers, every layer keeping at least ``min_mlp``
    MLP channels and one query head with its KV head. Counts are then rounded to the nearest legal
    width (ties keep more): MLP and hidden widths to multiples of ``round_to`` (or the full width),
    heads to a GQA-legal layout — every kept KV head keeps the same number of its own query heads,
    which covers removing whole KV groups, thinning every group evenly, or both. With thresholds in
    the uniform layout, every layer removes the mean over layers of the fraction the threshold
    removes in each. Within a layer the units kept are always the highest-scoring ones, so with
    ``round_to=1`` and no GQA a threshold removes exactly the units scoring <= E.
    """
    from minigpts.arch import get_adapter

    settings = {
        "criterion": criterion,
        "mlp_ratio": mlp_ratio,
        "head_ratio": head_ratio,
        "hidden_ratio": hidden_ratio,
        "target_params": target_params,
        "target_groups": list(target_groups),
        "linear_threshold": linear_threshold,
        "activation_threshold": activation_threshold,
        "layout": layout,
        "min_mlp": min_mlp,
        "round_to": round_to,
        "seed": seed,
    }
    if layout not in LAYOUTS:
        raise UserError(f"--layout {layout}: use one of {', '.join(LAYOUTS)}")
    if criterion not in CRITERIA:
        raise UserError(f"--criterion {criterion}: use one of {', '.join(CRITERIA)}")
    for flag, value in (
        ("--mlp-ratio", mlp_ratio),
        ("--head-ratio", head_ratio),
        ("--hidden-ratio", hidden_ratio),
    ):
        _check_fraction(flag, value, low_open=False, high_open=True)
    _check_fraction("--target-params", target_params, low_open=True, high_open=False)
    for flag, value in (
        ("--linear-threshold", linear_threshold),
        ("--activation-threshold", activation_threshold),
    ):
        if value is not None and not math.isfinite(value):
            raise UserError(f"{flag} {value}: must be a finite number")
    if not (isinstance(min_mlp, int) and min_mlp >= 1):
        raise UserError(f"--min-mlp {min_mlp}: must be a whole number >= 1")
    if not (isinstance(round_to, int) and round_to >= 1):
        raise UserError(f"--round-to {round_to}: must be a whole number >= 1")
    if mlp_ratio is not None and activation_threshold is not None:
        raise UserError("--mlp-ratio and --activation-threshold both size the MLP: give one of them")
    for flag, value in (("--head-ratio", head_ratio), ("--hidden-ratio", hidden_ratio)):
        if value is not None and linear_threshold is not None:
            raise UserError(f"{flag} and --linear-threshold both size the same group: give one of them")
    unknown = set(target_groups) - set(GROUPS)
    if unknown or not target_groups:
        raise UserError(f"target groups {sorted(unknown) or '(none)'}: choose among {', '.join(GROUPS)}")

    adapter = get_adapter(model)
    layers = adapter.layers(model)
    if stats is not None:
        stats.check_model(model)
    scores = unit_scores(model, stats, criterion, seed)
    layouts = [tuple(adapter.head_layout(layer)) for layer in layers]
    notes: list[str] = []

    # which group types are asked for, and whether the family allows them
    requests: dict[str, _Request | None] = {
        "mlp": _request("--mlp-ratio", mlp_ratio, "--activation-threshold", activation_threshold),
        "heads": _request("--head-ratio", head_ratio, "--linear-threshold", linear_threshold),
        "hidden": _request("--hidden-ratio", hidden_ratio, "--linear-threshold", linear_threshold),
    }
    problems = {
        "heads": adapter.head_pruning_problem(model.config),
        "hidden": adapter.hidden_pruning_problem(model.config),
    }
    solved = [g for g in target_groups if requests[g] is None] if target_params is not None else []
    explicit_flags = {
        "heads": "--head-ratio" if head_ratio is not None else None,
        "hidden": "--hidden-ratio"
        if hidden_ratio is not None
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

    counter = _ParamCounter(model, adapter)
    hidden_size = _hidden_size(adapter, layers)

    def width_ok(hidden: int, n_heads: int) -> bool:
        return adapter.width_problem(model.config, hidden, n_heads) is None

    def build(reqs: dict[str, _Request | None]):
        mlp_keep = _plan_mlp(scores.mlp, reqs["mlp"], layout, min_mlp, round_to)
        # transformers may tie widths together (LlamaConfig: hidden_size % num_attention_heads == 0):
        # heads are chosen against the full residual width, then the hidden width against those heads
        heads = _plan_heads(scores.heads, layouts, reqs["heads"], layout, lambda n: width_ok(hidden_size, n))
        head_counts = {len(h) for h, _ in heads}
        hidden_keep = _plan_hidden(
            scores.hidden, reqs["hidden"], round_to, lambda w: all(width_ok(w, n) for n in head_counts)
        )
        widths = [(len(m), len(h), len(kv)) for m, (h, kv) in zip(mlp_keep, heads, strict=True)]
        kept_hidden = hidden_size if hidden_keep is None else len(hidden_keep)
        return mlp_keep, heads, hidden_keep, counter.count(widths, kept_hidden)

    before = counter.count(
        [(s.numel(), n, kv) for s, (n, kv, _) in zip(scores.mlp, layouts, strict=True)], hidden_size
    )
    target_info = None
    if target_params is None:
        result = build(requests)
    else:
        if not solved:
            raise UserError(
                "--target-params: every group it could size already has a ratio or threshold, or cannot be "
                f"pruned in this model ({', '.join(target_groups)}); drop one of those flags"
            )
        result, ratio = _solve_target(
            build, requests, solved, target_params * before["params"], before["params"]
        )
        target_info = {
            "target_params": target_params,
            "groups": solved,
            "common_ratio": round(ratio, 6),
            "achieved": round(result[3]["params"] / before["params"], 6),
        }

    mlp_keep, heads, hidden_keep, after = result
    plan_layers = [
        LayerPlan(mlp_keep=m, heads_keep=h, kv_heads_keep=kv)
        for m, (h, kv) in zip(mlp_keep, heads, strict=True)
    ]
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    summary: dict[str, Any] = {
        "params_before": before["params"],
        "params_after": after["params"],
        "params_non_embedding_before": before["params_non_embedding"],
        "params_non_embedding_after": after["params_non_embedding"],
        "relative_size": round(after["params"] / before["params"], 6),
        "size_bytes_before": before["size_bytes"],
        "size_bytes_after": after["size_bytes"],
        "dtype": dtype,
        "hidden_before": hidden_size,
        "hidden_after": hidden_size if hidden_keep is None else len(hidden_keep),
        "layers": [
            {
                "mlp": len(layer.mlp_keep),
                "mlp_before": s.numel(),
                "heads": len(layer.heads_keep),
                "heads_before": n,
                "kv_heads": len(layer.kv_heads_keep),
                "kv_heads_before": kv,
            }
            for layer, s, (n, kv, _) in zip(plan_layers, scores.mlp, layouts, strict=True)
        ],
    }
    if target_info is not None:
        summary["target"] = target_info
    if notes:
        summary["notes"] = notes
    if stats is not None:
        summary["stats"] = {"n_tokens": stats.n_tokens, **stats.metadata}
    return PruningPlan(
        family=adapter.family,
        layers=plan_layers,
        hidden_keep=hidden_keep,
        layout=layout,
        criterion=criterion,
        settings=settings,
        summary=summary,
    )


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
            sized[group] = _Request("--target-params", ratio=ratio)
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


def describe_plan(plan: PruningPlan):
    """A rich Table for ``--dry-run``: widths per layer (identical neighbours merged) and the totals."""
    from rich.table import Table

    summary = plan.summary
    table = Table(
        title=f"pruning plan: {plan.family}, {plan.layout} layout, criterion {plan.criterion}",
        caption_justify="left",
    )
    for column in ("layers", "MLP channels", "query heads", "KV heads"):
        table.add_column(column, justify="right")
    rows: list[tuple[list[int], tuple[str, str, str]]] = []
    for i, layer in enumerate(summary.get("layers", [])):
        cells = (
            f"{layer['mlp']} / {layer['mlp_before']}",
            f"{layer['heads']} / {layer['heads_before']}",
            f"{layer['kv_heads']} / {layer['kv_heads_before']}",
        )
        if rows and rows[-1][1] == cells:
            rows[-1][0].append(i)
        else:
            rows.append(([i], cells))
    for indices, cells in rows:
        label = str(indices[0]) if len(indices) == 1 else f"{indices[0]}-{indices[-1]}"
        table.add_row(label, *cells)
    lines = []
    if "hidden_before" in summary:
        lines.append(f"hidden channels: {summary['hidden_after']} / {summary['hidden_before']}")
    if "params_before" in summary:
        lines.append(
            f"parameters: {_millions(summary['params_before'])} -> {_millions(summary['params_after'])} "
            f"({summary['params_after'] / summary['params_before']:.1%} of the base); non-embedding "
            f"{_millions(summary['params_non_embedding_before'])} -> {_millions(summary['params_non_embedding_after'])}"
        )
        lines.append(
            f"expected size ({summary['dtype']}): {summary['size_bytes_before'] / 1e6:,.1f} MB -> "
            f"{summary['size_bytes_after'] / 1e6:,.1f} MB"
        )
    if "target" in summary:
        target = summary["target"]
        lines.append(
            f"target {target['target_params']:.1%} of the parameters: common removal ratio "
            f"{target['common_ratio']:.4f} over {', '.join(target['groups'])} -> {target['achieved']:.1%}"
        )
    lines += [f"note: {note}" for note in summary.get("notes", [])]
    table.caption = "\n".join(lines)
    return table

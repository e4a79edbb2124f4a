"""Unit scores: how much each prunable unit matters, one small class per criterion, in one registry.

A criterion scores every MLP channel, attention head (query head) and hidden (residual) channel of a
model; higher means keep. `make_plan` ranks units by these scores, so a criterion decides *which*
units go, never how many. Adding one is a class here, or in any module imported before the CLI
parses its arguments (``--criterion`` offers every registered name)::

    from minigpts.criteria import Criterion, UnitScores, register_criterion

    @register_criterion
    class LastUnits(Criterion):
        \"\"\"Prefers the units with the highest indices (a toy).\"\"\"

        name = "last"
        help = "prefer the last units (a toy)"

        def scores(self, model, stats, seed):
            ...  # one float64 score per unit, shaped like the model's groups
            return UnitScores(mlp=[...], heads=[...], hidden=...)

A criterion that reads weights reads each decoder layer's inside ``with layer_weights(model, layer):``,
so that ``prune --offload`` can plan with it holding one layer at a time. One that scores a layer from
that layer's weights and statistics alone also implements ``layer_scores`` (every built-in one does):
``--sequential`` re-chooses each layer's units with it, reading no other layer.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from minigpts.errors import UserError

if TYPE_CHECKING:  # torch is imported where scores are computed: the CLI lists the names without it
    import torch
    from torch import nn

    from minigpts.analysis import ActivationStats


@dataclass
class UnitScores:
    """How much each prunable unit matters under one criterion (higher = keep)."""

    mlp: list[torch.Tensor]  # [intermediate] per layer
    heads: list[torch.Tensor]  # [n_heads] per layer (query heads)
    hidden: torch.Tensor  # [hidden], one set for the whole model


class Criterion:
    """One way to score units. Subclasses set the class attributes and implement `scores`.

    Every unit is scored where its activation is consumed: an MLP channel at its input column of the
    down/fc2 projection, a head at its columns of the output projection, a hidden channel at its
    input column of every projection that reads the residual stream (q and gate/fc1 of every layer).
    """

    name: str = ""  # the --criterion value
    help: str = ""  # one line for --help
    needs_stats: bool = False  # True: `scores` reads ActivationStats (--stats, from `minigpts analyze`)

    def scores(self, model: nn.Module, stats: ActivationStats | None, seed: int) -> UnitScores:
        raise NotImplementedError

    def layer_scores(
        self, model: nn.Module, stats: ActivationStats, index: int, seed: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(MLP-channel, head) scores of decoder layer ``index`` alone: `--sequential` re-chooses each
        layer's units with it, ``stats`` holding that layer's re-measured statistics. The default scores
        the whole model and keeps layer ``index``'s; a criterion that scores a layer from its own weights
        and statistics overrides it to read that layer only (``prune --offload`` holds no other)."""
        scores = self(model, stats, seed)
        return scores.mlp[index], scores.heads[index]

    def __call__(self, model: nn.Module, stats: ActivationStats | None, seed: int = 0) -> UnitScores:
        if self.needs_stats and stats is None:
            raise UserError(
                f"--criterion {self.name} needs activation statistics (--stats, from `minigpts analyze`)"
            )
        return self.scores(model, stats, seed)


# --- the registry ---------------------------------------------------------------------------------

_REGISTRY: dict[str, Criterion] = {}


def register_criterion(criterion: Any) -> Any:
    """Register a Criterion subclass (instantiated without arguments) or instance under its `name`.

    Returns its argument, so it works as a class decorator. A name already taken by another class is
    an error (call `unregister_criterion` first to replace it).
    """
    instance = criterion() if isinstance(criterion, type) else criterion
    if not isinstance(instance, Criterion):
        raise TypeError(f"{criterion!r} is not a minigpts.criteria.Criterion")
    if not instance.name:
        raise ValueError(f"{type(instance).__name__} has no name: set its `name` attribute")
    existing = _REGISTRY.get(instance.name)
    if existing is not None and type(existing) is not type(instance):
        raise ValueError(f"criterion {instance.name!r} is already registered ({type(existing).__name__})")
    _REGISTRY[instance.name] = instance
    return criterion


def unregister_criterion(name: str) -> None:
    """Remove a registered criterion (missing names are ignored)."""
    _REGISTRY.pop(name, None)


def criterion_names() -> tuple[str, ...]:
    """Registered names, in registration order (the built-in ones first)."""
    return tuple(_REGISTRY)


def get_criterion(name: str) -> Criterion:
    """The criterion registered as ``name``; UserError listing the registered ones otherwise."""
    if name not in _REGISTRY:
        raise UserError(f"--criterion {name}: use one of {', '.join(_REGISTRY)}")
    return _REGISTRY[name]


def unit_scores(
    model: nn.Module, stats: ActivationStats | None, criterion: str = "l1", seed: int = 0
) -> UnitScores:
    """Per-unit scores of ``model`` under the registered criterion ``criterion``."""
    return get_criterion(criterion)(model, stats, seed)


# --- helpers --------------------------------------------------------------------------------------


# the attribute of a meta-device skeleton holding its per-layer weight reader (``surgery_offload``)
LAYER_WEIGHTS_READER = "_minigpts_layer_weights"


def layer_weights(model: nn.Module, layer: nn.Module) -> contextlib.AbstractContextManager:
    """A context in which ``layer``'s weights can be read: a no-op for a model in memory; the skeleton
    ``prune --offload`` plans on reads the layer from the checkpoint on entry and frees it on exit."""
    reader = getattr(model, LAYER_WEIGHTS_READER, None)
    return contextlib.nullcontext() if reader is None else reader(layer)


def residual_width(adapter, layers: list[nn.Module]) -> int:
    """Width of the residual stream as the layers read it (OPT's embedding may be narrower)."""
    return adapter.residual_width(layers[0])


def _column_norms(linear: nn.Linear) -> torch.Tensor:
    """‖W[:, j]‖₂ for every input column j: how strongly input j is read."""
    import torch

    from minigpts.arch.base import projection_weight  # [out, in], also for GPT-2's Conv1D

    weight = projection_weight(linear).detach().float()
    return torch.linalg.vector_norm(weight, dim=0).to("cpu", torch.float64)


def _consumer_norms(model: nn.Module, stats: ActivationStats | None) -> UnitScores:
    """Column norms of each unit's consuming weight, times ``sqrt(mean a²)`` of the unit when stats are given.

    MLP channel: its down/fc2 column; head: the mean over its dims of its output-projection columns;
    hidden channel: the sum over the residual readers of every layer.
    """
    import torch

    from minigpts.arch import get_adapter

    adapter = get_adapter(model)
    layers = adapter.layers(model)
    mlp, heads = [], []
    hidden = torch.zeros(residual_width(adapter, layers), dtype=torch.float64)
    for i, layer in enumerate(layers):
        with layer_weights(model, layer):
            layer_mlp, layer_heads, readers = _consumer_norms_of_layer(adapter, layer, stats, i)
        mlp.append(layer_mlp)
        heads.append(layer_heads)
        for reader_scores in readers:
            hidden += reader_scores
    return UnitScores(mlp, heads, hidden)


def _consumer_norms_of_layer(adapter, layer: nn.Module, stats: ActivationStats | None, i: int):
    """`_consumer_norms` of decoder layer ``i`` (its weights readable): MLP scores, head scores, and the
    hidden-channel scores of each of its residual readers."""

    def scaled(norms: torch.Tensor, mean_square: torch.Tensor | None) -> torch.Tensor:
        return norms if mean_square is None else norms * mean_square.sqrt()

    active = stats is not None
    mlp = scaled(_column_norms(adapter.mlp_out(layer)), stats.mlp_l2sq[i] if active else None)
    n_heads, _, head_dim = adapter.head_layout(layer)
    per_dim = scaled(_column_norms(adapter.attn_out(layer)), stats.attn_dim_l2sq[i] if active else None)
    readers = [
        scaled(_column_norms(reader), stats.reader_l2sq[i][r] if active else None)
        for r, reader in enumerate(adapter.residual_readers(layer))
    ]
    return mlp, per_dim.view(n_heads, head_dim).mean(1), readers


def _consumer_norms_at(model: nn.Module, stats: ActivationStats | None, index: int):
    """The MLP and head scores of `_consumer_norms` for decoder layer ``index`` alone."""
    adapter, layer = _layer_of(model, index)
    with layer_weights(model, layer):
        return _consumer_norms_of_layer(adapter, layer, stats, index)[:2]


def _layer_of(model: nn.Module, index: int):
    """(adapter, decoder layer ``index``) of ``model``."""
    from minigpts.arch import get_adapter

    adapter = get_adapter(model)
    return adapter, adapter.layers(model)[index]


# --- the built-in criteria ------------------------------------------------------------------------


@register_criterion
class L1Criterion(Criterion):
    """The Mini-GPTs paper's score (Valicenti et al. 2023, arXiv 2312.12682): ``mean |a|`` over the
    calibration tokens. MLP channel: the activation's output; head: the mean over the head's dims of
    its output; hidden channel: the mean over every residual-reading projection of every layer."""

    name = "l1"
    help = "the paper's mean |a| of each unit's activation"
    needs_stats = True

    def scores(self, model, stats, seed):
        return UnitScores(list(stats.mlp_l1), list(stats.head_l1), stats.hidden_l1)

    def layer_scores(self, model, stats, index, seed):
        return stats.mlp_l1[index], stats.head_l1[index]


@register_criterion
class WandaCriterion(Criterion):
    """Wanda (Sun et al. 2023, arXiv 2306.11695), per unit: ``‖X_j‖₂ · ‖W[:, j]‖₂`` with W the consuming
    weight, computed as ``sqrt(mean a²) · ‖W[:, j]‖₂`` (the same up to the constant √N); a head takes
    the mean over its dims, a hidden channel the sum over the residual readers of every layer."""

    name = "wanda"
    help = "Wanda-style ‖a‖₂·‖W[:, j]‖₂ on the weight that consumes the unit"
    needs_stats = True

    def scores(self, model, stats, seed):
        return _consumer_norms(model, stats)

    def layer_scores(self, model, stats, index, seed):
        return _consumer_norms_at(model, stats, index)


@register_criterion
class WeightCriterion(Criterion):
    """Magnitude pruning: ``‖W[:, j]‖₂`` of the consuming weight alone, as Wanda without activations."""

    name = "weight"
    help = "‖W[:, j]‖₂ of the consuming weight only (data-free magnitude)"

    def scores(self, model, stats, seed):
        return _consumer_norms(model, None)

    def layer_scores(self, model, stats, index, seed):
        return _consumer_norms_at(model, None, index)


@register_criterion
class RandomCriterion(Criterion):
    """The control every claim about a criterion needs: uniform random scores from ``seed``, drawn
    in a fixed order (MLP channels layer by layer, then heads layer by layer, then hidden channels)."""

    name = "random"
    help = "uniform random scores from --plan-seed (a control)"

    def scores(self, model, stats, seed):
        import torch

        from minigpts.arch import get_adapter

        adapter = get_adapter(model)
        layers = adapter.layers(model)
        generator = torch.Generator().manual_seed(seed)

        def uniform(n: int) -> torch.Tensor:
            return torch.rand(n, generator=generator, dtype=torch.float64)

        mlp = [uniform(adapter.mlp_width(layer)) for layer in layers]
        heads = [uniform(adapter.head_layout(layer)[0]) for layer in layers]
        return UnitScores(mlp, heads, uniform(residual_width(adapter, layers)))


@register_criterion
class RefitCriterion(Criterion):
    """Refit-aware selection: the order of a greedy Optimal Brain Surgeon elimination (Hassibi & Stork
    1993; structured, as in ZipLM, Kurtic et al. 2023, and SlimGPT, Ling et al. 2024) that refits the
    output projection after every removal, from the calibration second moments and, when measured,
    with each output row weighted by its Fisher (what an error there costs the loss). It picks the
    units the closed-form refit can best do without, which score-by-score criteria cannot see
    (two correlated channels are each important alone, one of them is redundant). MLP channels and
    heads; hidden channels fall back to Wanda's score. See ``minigpts.reconstruct.elimination_order``."""

    name = "refit"
    help = "greedy elimination that refits after each removal (OBS; needs analyze --moments)"
    needs_stats = True

    def scores(self, model, stats, seed):
        from minigpts.arch import get_adapter

        self._check(stats)
        fallback = _consumer_norms(model, stats)
        layers = get_adapter(model).layers(model)
        mlp, heads = zip(*(self.layer_scores(model, stats, i, seed) for i in range(len(layers))), strict=True)
        return UnitScores(list(mlp), list(heads), fallback.hidden)

    def layer_scores(self, model, stats, index, seed):
        from minigpts.reconstruct import elimination_order

        self._check(stats)
        adapter, layer = _layer_of(model, index)
        mlp_fisher = stats.mlp_fisher[index] if stats.has_fisher else None
        attn_fisher = stats.attn_fisher[index] if stats.has_fisher else None
        down, out = adapter.mlp_out(layer), adapter.attn_out(layer)
        head_dim = adapter.head_layout(layer)[2]
        with layer_weights(model, layer):
            mlp = elimination_order(
                adapter.weight(down), stats.mlp_gram[index], stats.mlp_mean[index] if down.bias is not None else None,
                block=32, row_weights=mlp_fisher,
            )  # fmt: skip
            heads = elimination_order(
                adapter.weight(out), stats.attn_gram[index], stats.attn_mean[index] if out.bias is not None else None,
                group=head_dim, row_weights=attn_fisher,
            )  # fmt: skip
        return mlp, heads

    @staticmethod
    def _check(stats) -> None:
        if not stats.has_moments:
            raise UserError(
                "--criterion refit needs second moments: re-run `minigpts analyze` with --moments (the default)"
            )


# --- the peers' criteria (issue #14) --------------------------------------------------------------


def _needs(stats: ActivationStats, criterion: str, fields: tuple[str, ...], how: str) -> None:
    """UserError naming what to re-run when ``stats`` lack a field the criterion reads."""
    if any(getattr(stats, name) is None for name in fields):
        raise UserError(f"--criterion {criterion} needs statistics {how}")


def _standardised(values: torch.Tensor) -> torch.Tensor:
    """(s − mean) / std over one layer's units, FLAP's ``standarlization`` (unbiased std; 0 if constant)."""
    std = values.std() if values.numel() > 1 else values.new_zeros(())
    centred = values - values.mean()
    return centred / std if float(std) > 0 else centred


@register_criterion
class FlapCriterion(Criterion):
    """FLAP (An et al., "Fluctuation-based adaptive structured pruning", AAAI 2024, arXiv 2312.11983):
    the fluctuation of each input channel of the consuming projection, ``Var_t(x_j) · ‖W[:, j]‖²``
    (their WIFV metric), standardised per layer, ``(s − mean) / std``, so that one global ranking
    across layers (``--layout per-layer --allocation paper``) is FLAP's adaptive structure across
    layers. MLP channel: the down/fc2 column; head: as FLAP, the square of that per dim, standardised
    over the layer's dims, then the mean over the head's dims; hidden channel (FLAP does not prune it):
    the unstandardised sum of the fluctuation over the residual readers of every layer. Within a layer
    the order is the raw metric's, so the uniform layout keeps the same units as the raw metric would.

    FLAP's bias compensation (the removed channels' mean contribution ``W[:, R] μ_R`` added to the
    output projection's bias) is the bias term of ``--reconstruct lstsq`` (the default), which does it
    and more: where the projection has a bias (OPT's and Phi's output projections) the refit centres
    the data and sets ``b += W μ − W' μ_K``, which is FLAP's term when the kept columns are not refit
    (``W' = W[:, K]``). Where it has none (Llama, Mistral, Qwen2/3, SmolLM: o_proj and down_proj carry
    no bias) there is no place for a constant: the refit is uncentred (``E[a aᵀ]``), so the kept
    columns absorb as much of the removed channels' mean as least squares allows and the rest is lost
    (FLAP's own code adds bias parameters to those projections, i.e. a non-standard checkpoint); with
    ``--reconstruct none`` nothing compensates. Needs the first moments that every analysis of this
    version records."""

    name = "flap"
    help = "FLAP's fluctuation Var(x_j)·‖W[:, j]‖², standardised per layer (global ranking across layers)"
    needs_stats = True

    def scores(self, model, stats, seed):
        import torch

        from minigpts.arch import get_adapter

        self._check(stats)
        adapter = get_adapter(model)
        layers = adapter.layers(model)
        mlp, heads = [], []
        hidden = torch.zeros(residual_width(adapter, layers), dtype=torch.float64)
        for i, layer in enumerate(layers):
            layer_mlp, layer_heads, readers = self._of_layer(model, adapter, layer, stats, i)
            mlp.append(layer_mlp)
            heads.append(layer_heads)
            for reader_fluctuation in readers:
                hidden += reader_fluctuation
        return UnitScores(mlp, heads, hidden)

    def layer_scores(self, model, stats, index, seed):
        self._check(stats)
        return self._of_layer(model, *_layer_of(model, index), stats, index)[:2]

    def _check(self, stats) -> None:
        _needs(
            stats,
            self.name,
            ("mlp_mean", "attn_mean", "reader_mean"),
            "with first moments: re-run `minigpts analyze`",
        )

    @staticmethod
    def _of_layer(model, adapter, layer, stats, i: int):
        """Layer ``i``'s standardised MLP and head scores, and the fluctuation at each residual reader."""

        def fluctuation(mean_square: torch.Tensor, mean: torch.Tensor, linear) -> torch.Tensor:
            variance = (mean_square - mean.double().pow(2)).clamp_min(0)
            return variance * _column_norms(linear).pow(2)

        n_heads, _, head_dim = adapter.head_layout(layer)
        with layer_weights(model, layer):
            mlp = fluctuation(stats.mlp_l2sq[i], stats.mlp_mean[i], adapter.mlp_out(layer))
            per_dim = fluctuation(stats.attn_dim_l2sq[i], stats.attn_mean[i], adapter.attn_out(layer))
            readers = [
                fluctuation(stats.reader_l2sq[i][r], stats.reader_mean[i][r], reader)
                for r, reader in enumerate(adapter.residual_readers(layer))
            ]
        return _standardised(mlp), _standardised(per_dim.pow(2)).view(n_heads, head_dim).mean(1), readers


@register_criterion
class TaylorCriterion(Criterion):
    """LLM-Pruner (Ma et al., "LLM-Pruner: On the Structural Pruning of Large Language Models",
    NeurIPS 2023, arXiv 2305.11627): first-order Taylor importance ``Σ |w · ∂L/∂w|`` over each unit's
    coupled weights (their element-wise ``param_first`` estimate with ``sum`` aggregation), the
    gradients of the mean next-token loss over the first calibration windows. MLP channel: its rows of
    the MLP input projections and its column of the output one; head: its q rows, its output-projection
    columns and its share of its KV head's k/v rows; hidden channel: its columns of every
    residual-reading projection, rows of the residual writers and entries of the norms of every layer,
    plus the embedding, final norm and untied LM head. The gradient pass is
    ``minigpts.analysis.taylor_importance`` (``analyze --taylor-tokens N``; ``run``/``sweep`` with
    ``--criterion taylor`` run it over 4,096 tokens unless told)."""

    name = "taylor"
    help = (
        "LLM-Pruner's first-order Taylor Σ|w·∂L/∂w| over the unit's coupled weights (analyze --taylor-tokens)"
    )
    needs_stats = True

    def scores(self, model, stats, seed):
        _needs(
            stats,
            self.name,
            ("mlp_taylor", "head_taylor", "hidden_taylor", "embed_taylor"),
            "with a gradient pass: re-run `minigpts analyze` with --taylor-tokens N (e.g. 4096)",
        )
        hidden = stats.embed_taylor.double().clone()
        for per_layer in stats.hidden_taylor:
            hidden += per_layer
        return UnitScores(list(stats.mlp_taylor), list(stats.head_taylor), hidden)

    def layer_scores(self, model, stats, index, seed):  # gradients are not re-measured layer by layer
        return stats.mlp_taylor[index], stats.head_taylor[index]


@register_criterion
class MinitronCriterion(Criterion):
    """Minitron (Muralidharan et al., "Compact Language Models via Pruning and Knowledge
    Distillation", 2024, arXiv 2407.14679): activation-based importance aggregated over the batch and
    the sequence as they found best: for each calibration window the L2 norm over its tokens, then the
    mean over windows. MLP channel: the MLP activation that its output projection reads (for a
    gated MLP, ``act(gate) · up``); head: the head's output (the L2 over its tokens and dims); hidden
    channel: the normed residual stream (their LayerNorm output) at every residual-reading projection,
    averaged over the readers of every layer."""

    name = "minitron"
    help = "Minitron's activation importance: mean over windows of the L2 norm over tokens"
    needs_stats = True

    def scores(self, model, stats, seed):
        import torch

        _needs(
            stats,
            self.name,
            ("mlp_window_l2", "head_window_l2", "reader_window_l2"),
            "with per-window norms: re-run `minigpts analyze` (this version records them)",
        )
        hidden = torch.cat(list(stats.reader_window_l2)).mean(0)
        return UnitScores(list(stats.mlp_window_l2), list(stats.head_window_l2), hidden)

    def layer_scores(self, model, stats, index, seed):  # per-window norms are not re-measured either
        return stats.mlp_window_l2[index], stats.head_window_l2[index]

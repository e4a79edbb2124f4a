"""Closed-form reconstruction after pruning, and the output error that makes layers comparable.

Removing MLP channels (or attention heads) of a layer changes what its output projection W (h × d)
writes into the residual stream. With the second moments of the projection's input over the
calibration tokens, C = E[a aᵀ], the weights on the kept inputs K that minimise E‖W a − W' a_K‖²
plus a ridge that pulls each kept column back toward its own weights, Σ_j λ_j ‖W'_j − W_j‖², are

    W' = (W C[:, K] + W_K Λ) (C[K, K] + Λ)⁻¹      Λ = diag(λ_j), λ_j = ρ C_jj

    ρ = ``ridge`` × k / (d − k) × d / n       (n calibration tokens, d inputs, k kept)

λ → ∞ is plain slicing (W' = W_K), λ = 0 the plain least squares. Shrinking toward the sliced weights
rather than toward zero, in units of each input's own second moment, keeps the refit from trading
the kept inputs' own contribution for a noisy fit of the removed ones. ρ grows with the share kept
because a small removal leaves a small signal to fit with the same noise, and shrinks as the
calibration grows, like the noise of the fit (d / n). Measured on SmolLM2's 1,536-wide MLP, the best
ρ was ≈ 0.1 at a 25 % cut and 0.02-0.05 at 50 % from 16,384 tokens, larger from 4,096 and smaller
from 65,536: one constant, 0.32, comes within 0.04 % bits/byte of the best measured in all six
(ρ = 0.03 × k / (d − k) at 16,384 tokens).

The output error that remains, tr(W (C − C[:, K] C[K, K]⁻¹ C[K, :]) Wᵀ), is the cost of keeping K:
measured in the residual stream, so it compares MLP channels with heads and layer i with layer j
(raw activation magnitudes do not). Where the projection has a bias, the refit works on the
covariance and the bias absorbs the removed inputs' mean: b' = b + W μ − W' μ_K (FLAP's bias
compensation, made exact for the kept inputs). Llama-family projections have no bias; carrying one
(``mlp_bias``) bought < 0.3 % bits/byte over the refit alone (issue #13's measurement), less than it
costs in compatibility, so it is not done.

Not reconstructed: hidden (residual) channels — every layer reads and writes them, there is no
single projection to refit — and the vocabulary, whose rows are independent.

The sequential refit (``--sequential``) fits, layer by layer, on the inputs the pruned layers before
give. SparseGPT and Wanda aim each refit at what the projection itself writes from those inputs; the
unpruned model's residual stream is the better aim where it can be learned: with t the unpruned stream
after the projection less the pruned stream without it, W C[:, K] above becomes E[t a_Kᵀ], and the
refit also absorbs what the layers before it lost. But a heavily cut layer asked to absorb all of that
fits noise, so the two refits are mixed, own + α (residual − own), with the α ∈ [0, 1] that minimises
the residual target's error on held-out calibration windows (``_blend``: two folds, closed form). On
SmolLM2 α is ≈ 0.1-0.4 in most layers. Measured (wanda, 16,384 tokens, before training), economics,
uniform 50 % of the MLP: own target 1.0687, residual 1.0455, mixed 1.0259; per-layer sizes at 80 % of the
parameters: 0.9454 / 0.9471 / 0.9371 (one-shot 1.0774 and 0.9500). Fitting only what the unpruned
projection wrote, without the residual difference, was worse than all (1.3057 at 50 %).

``error_curve`` gives the error of every legal width at once (``minigpts.allocation`` uses it): with the inputs ordered by the
criterion (best first) and L the Cholesky factor of the reordered C + λI, keeping the first k inputs
leaves Σ_{j ≥ k} ‖(W L)[:, j]‖² — one factorisation per layer instead of one solve per width.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Sequence

import torch
from torch import nn

from minigpts.arch.base import projection_in_features, projection_weight
from minigpts.errors import UserError
from minigpts.options import PlanOptions

# the refit's shrinkage toward the sliced weights (× kept/removed × inputs/tokens), declared once with --ridge
DEFAULT_RIDGE = PlanOptions.ridge
# the error model's ridge toward zero, relative to the mean second moment (error_curve, output_error,
# elimination_order: the allocation and --criterion refit); measured best of 1e-2 / 1e-3 / 1e-4 there
ERROR_RIDGE = 1e-3
SEQUENTIAL_BATCH_SIZE = 4  # windows per forward of the sequential refit, in memory and --offload
RECONSTRUCT_METHODS = ("none", "lstsq")


def _ridge(diagonal: torch.Tensor, ridge: float) -> float:
    scale = float(diagonal.mean()) if diagonal.numel() else 0.0
    return ridge * scale if scale > 0 else 1e-12


def _centred(gram: torch.Tensor, mean: torch.Tensor | None) -> torch.Tensor:
    """The covariance when a bias can absorb the mean, else the raw second moments."""
    return gram if mean is None else gram - torch.outer(mean, mean)


def refit(
    weight: torch.Tensor,
    keep: Sequence[int],
    gram: torch.Tensor,
    mean: torch.Tensor | None = None,
    *,
    tokens: int,
    ridge: float = DEFAULT_RIDGE,
    cross: torch.Tensor | None = None,
    target_mean: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(W' [h, k], bias change [h] or None): the kept inputs' weights, refit toward what all inputs wrote.

    The ridge shrinks toward the sliced weights (module docstring): λ_j = ρ C_jj, ρ = ``ridge`` × k /
    (d − k) × d / ``tokens`` (the calibration tokens ``gram`` averages). ``mean`` is given when the
    projection has a bias: the fit is then on the covariance and the returned change, W μ − W' μ_K, is
    to be added to the bias.
    """
    keep_t = torch.as_tensor(list(keep), dtype=torch.long)
    w = weight.detach().to("cpu", torch.float64)
    c = _centred(gram.to(torch.float64), None if mean is None else mean.to(torch.float64))
    c_k = c[:, keep_t]
    a = c_k[keep_t].clone()
    removed = c.shape[0] - len(keep_t)
    rho = ridge * len(keep_t) / removed * c.shape[0] / max(tokens, 1) if removed else 0.0
    diagonal = a.diagonal().clamp_min(0)
    shrink = rho * diagonal + _ridge(diagonal, 1e-12)  # the floor keeps never-active inputs solvable
    a.diagonal().add_(shrink)
    if cross is None:  # the target is what all inputs wrote: E[t aᵀ] = W C
        target = w @ c_k
        t_mean = None if mean is None else w @ mean.to(torch.float64)
    else:
        t_mean = None if target_mean is None else target_mean.to(torch.float64)
        target = cross.to(torch.float64)[:, keep_t]
        if mean is not None:
            target = target - torch.outer(t_mean, mean.to(torch.float64)[keep_t])
    b = target + w[:, keep_t] * shrink  # [h, k]
    new = torch.linalg.solve(a, b.T).T  # A is symmetric: W' = B A⁻¹
    bias = None
    if mean is not None:
        mu = mean.to(torch.float64)
        bias = t_mean - new @ mu[keep_t]
    return new, bias


def output_error(
    weight: torch.Tensor,
    keep: Sequence[int],
    gram: torch.Tensor,
    mean: torch.Tensor | None = None,
    *,
    ridge: float = ERROR_RIDGE,
) -> float:
    """E‖W a − W' a_K‖² (mean over tokens, summed over outputs) after the least-squares fit on ``keep``
    with a ``ridge`` toward zero (× the mean second moment; the error model's, as ``error_curve``)."""
    w = weight.detach().to("cpu", torch.float64)
    c = _centred(gram.to(torch.float64), None if mean is None else mean.to(torch.float64))
    if len(keep) == c.shape[0]:
        return 0.0
    keep_t = torch.as_tensor(list(keep), dtype=torch.long)
    a = c[keep_t][:, keep_t].clone()
    a.diagonal().add_(_ridge(a.diagonal(), ridge))
    new = torch.linalg.solve(a, (w @ c[:, keep_t]).T).T
    # E‖(W − W' S) a‖² with S selecting K: tr(D C Dᵀ), D = W − W' S
    d = w.clone()
    d[:, keep_t] -= new
    return max(float(torch.einsum("ij,jk,ik->", d, c, d)), 0.0)


def error_curve(
    weight: torch.Tensor,
    order: torch.Tensor,
    gram: torch.Tensor,
    mean: torch.Tensor | None = None,
    *,
    ridge: float = ERROR_RIDGE,
) -> torch.Tensor:
    """[d + 1] output error of keeping the first k inputs of ``order`` (k = 0..d), refit included.

    Exact for ``ridge=0`` (and a positive-definite C); with a ridge, the error of the ridge problem.
    """
    w = weight.detach().to("cpu", torch.float64)
    c = _centred(gram.to(torch.float64), None if mean is None else mean.to(torch.float64))
    c = c[order][:, order].clone()
    c.diagonal().add_(_ridge(c.diagonal(), ridge) if ridge > 0 else 0.0)
    factor, info = torch.linalg.cholesky_ex(c)
    if int(info) != 0:  # singular (dead inputs): a tiny jitter keeps the factorisation defined
        c.diagonal().add_(1e-10 * max(float(c.diagonal().mean()), 1e-30))
        factor = torch.linalg.cholesky(c)
    energy = (w[:, order] @ factor).pow(2).sum(0)  # what input j adds once the earlier ones are kept
    tail = torch.flip(torch.cumsum(torch.flip(energy, [0]), 0), [0])
    return torch.cat([tail, torch.zeros(1, dtype=torch.float64)])


# --- applying a plan ------------------------------------------------------------------------------


def _head_channels(heads: Sequence[int], head_dim: int) -> list[int]:
    return [h * head_dim + d for h in heads for d in range(head_dim)]


def _write_refit(linear: nn.Module, keep: list[int], gram, mean, tokens: int, ridge: float) -> None:
    """Overwrite the kept input columns (and the bias) with their refit; surgery then slices."""
    weight = projection_weight(linear)  # [out, in], a view for Conv1D
    use_mean = mean if linear.bias is not None else None
    new, bias = refit(weight, keep, gram, use_mean, tokens=tokens, ridge=ridge)
    _write_columns(linear, keep, new, bias)


def _write_columns(linear: nn.Module, keep: list[int], new: torch.Tensor, bias: torch.Tensor | None) -> None:
    weight = projection_weight(linear)
    keep_t = torch.as_tensor(keep, dtype=torch.long, device=weight.device)
    with torch.no_grad():
        weight[:, keep_t] = new.to(weight.device, weight.dtype)
        if bias is not None:
            linear.bias += bias.to(linear.bias.device, linear.bias.dtype)


def reconstruct(model: nn.Module, plan, stats, *, ridge: float = DEFAULT_RIDGE) -> dict[str, int]:
    """Refit the output projections of every pruned MLP and attention block, before surgery slices them.

    ``plan`` indexes the model as it is now (the model the statistics were measured on). Returns how
    many projections were refit per kind.
    """
    from minigpts.arch import get_adapter

    check_moments(stats)
    stats.check_model(model)
    adapter = get_adapter(model)
    layers = adapter.layers(model)
    kept_layers = set(range(len(layers)) if plan.layers_keep is None else plan.layers_keep)
    done = {"mlp": 0, "attention": 0}
    for i, (layer, layer_plan) in enumerate(zip(layers, plan.layers, strict=True)):
        if i in kept_layers:
            for kind in refit_layer(adapter, layer, layer_plan, layer_moments(stats, i), ridge=ridge):
                done[kind] += 1
    return done


def check_moments(stats) -> None:
    """The refit reads second moments: a UserError naming what to re-run when ``stats`` lack them."""
    if not stats.has_moments:
        raise UserError(
            "--reconstruct lstsq needs second moments: re-run `minigpts analyze` with --moments "
            "(the default) or pass --reconstruct none"
        )


MIN_TOKENS_PER_INPUT = 8  # below this, measured on SmolLM2, the refit keeps only half its gain


def thin_calibration_warning(stats) -> str | None:
    """A "warning:" note when the refit would read too few calibration tokens per input it refits.

    Measured on SmolLM2 (MLP width 1,536, economics, uniform `l1` cut, the default ridge, which grows
    as the tokens per input fall): the refit removes 22 % / 33 % of slicing's bits/byte increase at
    25 % / 50 % from 4,096 calibration tokens (2.7 per input), 33 % / 46 % from 16,384 (10.7 per
    input), 38 % / 47 % from 65,536 (43 per input).
    """
    width = max(len(x) for x in stats.mlp_l1)
    if stats.n_tokens >= MIN_TOKENS_PER_INPUT * width:
        return None
    return (
        f"warning: the refit (--reconstruct lstsq) reads {stats.n_tokens:,} calibration tokens for MLP inputs "
        f"{width:,} wide, fewer than {MIN_TOKENS_PER_INPUT} per input, where it recovers much less: analyse "
        f"with --calib-tokens {MIN_TOKENS_PER_INPUT * width:,} or more"
    )


def layer_moments(stats, index: int):
    """``kind`` ("mlp" or "attention") -> (gram, mean, tokens) of layer ``index``, read only when asked for."""

    def moments(kind: str):
        if kind == "mlp":
            return stats.mlp_gram[index], stats.mlp_mean[index], stats.n_tokens
        return stats.attn_gram[index], stats.attn_mean[index], stats.n_tokens

    return moments


def refit_layer(adapter, layer: nn.Module, layer_plan, moments, *, ridge: float = DEFAULT_RIDGE) -> list[str]:
    """Refit one layer's pruned output projections (``moments`` as ``layer_moments``); the kinds refit.

    One layer at a time, so a model streamed layer by layer (``minigpts.surgery_offload``) is refit
    by the same code as the whole model, with only that layer's second moments in memory.
    """
    done = []
    down = adapter.mlp_out(layer)
    if len(layer_plan.mlp_keep) < projection_in_features(down):
        _write_refit(down, list(layer_plan.mlp_keep), *moments("mlp"), ridge)
        done.append("mlp")
    n_heads, _, head_dim = adapter.head_layout(layer)
    if len(layer_plan.heads_keep) < n_heads:
        channels = _head_channels(layer_plan.heads_keep, head_dim)
        _write_refit(adapter.attn_out(layer), channels, *moments("attention"), ridge)
        done.append("attention")
    return done


# --- sequential calibration -----------------------------------------------------------------------


class _StopForward(Exception):
    """Raised by a hook once it has what it needs from a forward pass."""


def _layer_inputs(model: nn.Module, adapter, batches: list[torch.Tensor]) -> tuple[list, list[list[tuple]]]:
    """(hidden states entering layer 0, per batch; every layer's other arguments (args, kwargs), per batch).

    Layers of one attention type receive the same arguments (masks, rotary tables), so one forward
    that stops at the first layer suffices unless the layers mix types (e.g. sliding windows).
    """
    layers = adapter.layers(model)
    types = getattr(model.config, "layer_types", None) or ["all"] * len(layers)
    stop_at = 0 if len(set(types)) == 1 else len(layers) - 1
    hidden, calls = [], []
    for batch in batches:
        seen: dict[int, tuple] = {}

        def capture(index, seen=seen):
            def hook(module, args, kw):
                if index == 0:
                    hidden.append(args[0] if args else kw["hidden_states"])
                seen[index] = (tuple(args[1:]), {k: v for k, v in kw.items() if k != "hidden_states"})
                if index == stop_at:
                    raise _StopForward

            return hook

        handles = [
            layer.register_forward_pre_hook(capture(i), with_kwargs=True) for i, layer in enumerate(layers)
        ]
        try:
            adapter.body(model)(input_ids=batch, use_cache=False)
        except _StopForward:
            pass
        finally:
            for handle in handles:
                handle.remove()
        calls.append([seen[i] if stop_at else seen[0] for i in range(len(layers))])
    return hidden, calls


def _run_layer(layer: nn.Module, hidden: torch.Tensor, call: tuple) -> torch.Tensor:
    args, kwargs = call
    out = layer(hidden, *args, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def _collect(layer, module: nn.Linear, hidden: list, calls: list, targets=None, after=None, passes=None):
    """(first- and second-order statistics of ``module``'s input over every batch through ``layer``, with
    the number of tokens they average; the target's moments, or None).

    The target's moments are given ``targets`` (per batch, what the module should write) or ``after``
    (per batch, the dense layer's output; the target is then that less what this layer's pass adds
    besides the module, t = after − out + module(a)): E[t aᵀ] and E[t] over all tokens, and the
    moments of each of two folds (alternate calibration windows) for ``_blend``. Without ``after``
    each pass stops at ``module``: what follows it is not needed (for the attention's output
    projection, the whole MLP). With ``after``, ``passes`` (a list) receives per batch (the layer's
    output, the module's input a): ``_propagate`` then needs no further pass."""
    from minigpts.analysis import _ChannelSums, _Moments, _Scratch

    width = projection_in_features(module)
    device = module.weight.device
    sums = _ChannelSums((width,), device, _Scratch())
    folds = [_Moments(width, device), _Moments(width, device)]  # the gram and sum of alternate windows
    crosses: list[list] = [[None, None, 0], [None, None, 0]]  # per fold: Σ t aᵀ, Σ t, tokens
    seen: dict = {}

    def record(module, args):
        sums.add(args[0])
        windows = args[0].reshape(*seen["shape"], width)
        for fold in (0, 1):
            if len(windows[fold::2]):
                folds[fold].add(windows[fold::2])
        seen["input"] = windows
        if after is None:
            raise _StopForward

    def written(module, args, output):
        seen["output"] = output if module.bias is None else output - module.bias

    def add_cross(t: torch.Tensor) -> None:
        a = seen["input"]
        t = t.reshape(*a.shape[:2], -1)
        work = torch.float64 if a.dtype == torch.float64 else torch.float32
        for fold, entry in enumerate(crosses):
            a_fold, t_fold = (
                a[fold::2].reshape(-1, width).to(work),
                t[fold::2].reshape(-1, t.shape[-1]).to(work),
            )
            if not len(a_fold):
                continue
            product, total = (t_fold.T @ a_fold).to(torch.float64), t_fold.sum(0, dtype=torch.float64)
            entry[0] = product if entry[0] is None else entry[0] + product
            entry[1] = total if entry[1] is None else entry[1] + total
            entry[2] += len(a_fold)

    handles = [module.register_forward_pre_hook(record)]
    if after is not None:
        handles.append(module.register_forward_hook(written))
    n = 0
    try:
        for b, (h, call) in enumerate(zip(hidden, calls, strict=True)):
            seen["shape"] = h.shape[:2]
            out = None
            with contextlib.suppress(_StopForward):
                out = _run_layer(layer, h, call)
            if targets is not None:
                add_cross(targets[b])
            elif after is not None:  # OPT's layers flatten the tokens around fc2: compare flat
                if passes is not None:
                    passes.append((out, seen["input"]))
                width_out = out.shape[-1]
                add_cross(
                    after[b].reshape(-1, width_out)
                    - out.reshape(-1, width_out)
                    + seen["output"].reshape(-1, width_out)
                )
            n += h.shape[0] * h.shape[1]
    finally:
        for handle in handles:
            handle.remove()
    used = [fold for fold in folds if fold.gram is not None]
    gram, total = sum(fold.gram for fold in used), sum(fold.sum for fold in used)
    stats = (sums.abs_sum.cpu() / n, sums.square_sum.cpu() / n, gram.cpu() / n, total.cpu() / n, n)
    if crosses[0][0] is None:
        return stats, None
    target = TargetMoments(
        cross=sum(c[0] for c in crosses if c[2]).cpu() / n,
        mean=sum(c[1] for c in crosses if c[2]).cpu() / n,
        folds=[
            (fold.gram.cpu() / c[2], fold.sum.cpu() / c[2], c[0].cpu() / c[2], c[1].cpu() / c[2], c[2])
            for fold, c in zip(folds, crosses, strict=True)
            if c[2]
        ],
    )
    return stats, target


@dataclasses.dataclass
class TargetMoments:
    """What a sequential refit fits toward, t: E[t aᵀ] [out, in], E[t] [out], and per fold (alternate
    calibration windows) (E[a aᵀ], E[a], E[t aᵀ], E[t], tokens)."""

    cross: torch.Tensor
    mean: torch.Tensor
    folds: list[tuple]


def _blend(weight, keep: list[int], gram, mean, tokens: int, ridge: float, target: TargetMoments):
    """(W' [h, k], bias change or None, α): the refit toward ``target`` and the refit toward the
    projection's own output, mixed as own + α (target − own) with α ∈ [0, 1] minimising the error of
    the target on the fold each pair of fits did not see (two folds, in closed form: the refit is linear
    in its target, so the held-out error is a quadratic in α). Where the target cannot be learned from
    these inputs (a heavy cut asked to absorb what earlier layers lost), α falls toward 0."""
    own = refit(weight, keep, gram, mean, tokens=tokens, ridge=ridge)
    aimed = refit(
        weight, keep, gram, mean, tokens=tokens, ridge=ridge, cross=target.cross, target_mean=target.mean
    )
    alpha = 1.0
    if len(target.folds) == 2:
        numerator = denominator = 0.0
        for fit, held in ((0, 1), (1, 0)):
            g, mu, cross, t_mean, n = target.folds[fit]
            mu = None if mean is None else mu
            own_f = refit(weight, keep, g, mu, tokens=n, ridge=ridge)
            aimed_f = refit(weight, keep, g, mu, tokens=n, ridge=ridge, cross=cross, target_mean=t_mean)
            top, bottom = _held_out_terms(own_f, aimed_f, keep, target.folds[held], mean is not None)
            numerator, denominator = numerator + top, denominator + bottom
        if denominator > 0:
            alpha = min(max(numerator / denominator, 0.0), 1.0)
    new = own[0] + alpha * (aimed[0] - own[0])
    bias = None if own[1] is None else own[1] + alpha * (aimed[1] - own[1])
    return new, bias, alpha


def _held_out_terms(own, aimed, keep: list[int], fold: tuple, with_bias: bool) -> tuple[float, float]:
    """n × (E[eᵀ D ã], E‖D ã‖²) on ``fold``, e = t − Ŵ_own ã, D = Ŵ_aimed − Ŵ_own, ã = (a_K, 1 with a bias)."""
    gram, mu, cross, t_mean, n = fold
    keep_t = torch.as_tensor(keep, dtype=torch.long)
    c = gram.to(torch.float64)[keep_t][:, keep_t]
    x = cross.to(torch.float64)[:, keep_t]
    w_own, w_aimed = own[0], aimed[0]
    if with_bias:  # the bias change as one more input, constant 1
        m = mu.to(torch.float64)[keep_t]
        c = torch.cat([torch.cat([c, m[:, None]], 1), torch.cat([m, m.new_ones(1)])[None]], 0)
        x = torch.cat([x, t_mean.to(torch.float64)[:, None]], 1)
        w_own, w_aimed = torch.cat([w_own, own[1][:, None]], 1), torch.cat([w_aimed, aimed[1][:, None]], 1)
    d = w_aimed - w_own
    dc = d @ c
    return n * float((d * x).sum() - (w_own * dc).sum()), n * float((d * dc).sum())


# what the sequential refit fits a pruned projection to: "residual", the unpruned model's residual
# stream after it, so that it also absorbs what the layers before it lost (where the family adds the
# projection's output to the residual as it is, ``ArchAdapter.writes_residual``); "self", what the
# projection writes from the pruned model's own inputs (SparseGPT's and Wanda's target)
SEQUENTIAL_TARGETS = ("residual", "self")


def _dense_pass(adapter, layer, dense: list, calls: list) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The unpruned layer on the unpruned model's hidden states: per batch (what the attention's output
    projection wrote, without its bias; the layer's output)."""
    written: dict[str, torch.Tensor] = {}

    def keep(module, args, output):
        written["attention"] = output if module.bias is None else output - module.bias

    handle = adapter.attn_out(layer).register_forward_hook(keep)
    outputs = []
    try:
        for h, call in zip(dense, calls, strict=True):
            out = _run_layer(layer, h, call)
            outputs.append((written["attention"].reshape(out.shape), out))
    finally:
        handle.remove()
    return outputs


def sequential_reconstruct(
    model: nn.Module,
    plan,
    stats,
    windows: torch.LongTensor,
    *,
    ridge: float = DEFAULT_RIDGE,
    batch_size: int = SEQUENTIAL_BATCH_SIZE,
    progress: bool = True,
    target: str = "residual",
) -> dict[str, int]:
    """Layer by layer, re-measure, re-select and refit on the outputs of the layers already pruned.

    As SparseGPT and Wanda calibrate: layer i's statistics are gathered on what the pruned and refit
    layers < i produce, so errors do not compound (``sequential_layer``, also the per-layer step of
    ``prune --offload --sequential``). ``target`` (``SEQUENTIAL_TARGETS``): by default each refit fits
    the unpruned model's residual stream, which the unpruned layers are run alongside to give. Removed
    units' output columns are zeroed, so the layer computes what the sliced layer will; surgery
    (``apply_plan``) then slices. Memory: two sets of hidden states of the calibration windows, one
    layer's second moments at a time, and with the residual target one layer's outputs and MLP inputs
    (``_propagate``).
    """
    from tqdm.auto import tqdm

    from minigpts.arch import get_adapter

    stats.check_model(model)
    adapter = get_adapter(model)
    layers = adapter.layers(model)
    device = next(model.parameters()).device
    kept_layers = set(range(len(layers)) if plan.layers_keep is None else plan.layers_keep)
    batches = [windows[i : i + batch_size].to(device) for i in range(0, len(windows), batch_size)]
    done = {"mlp": 0, "attention": 0}
    was_training = model.training
    model.eval()
    bar = tqdm(total=len(layers), unit="layer", desc="sequential refit", disable=not progress)
    try:
        with torch.inference_mode():
            hidden, calls = _layer_inputs(model, adapter, batches)
        dense = list(hidden) if residual_target(model, target) else None
        for i in range(len(layers)):
            if i in kept_layers:
                kinds, hidden, dense = sequential_layer(
                    model, plan, stats, i, hidden, [c[i] for c in calls], ridge=ridge, dense=dense
                )
                for kind in kinds:
                    done[kind] += 1
            elif dense is not None:  # a dropped layer: the unpruned model still runs it
                with torch.inference_mode():
                    dense = [_run_layer(layers[i], d, c[i]) for d, c in zip(dense, calls, strict=True)]
            bar.update(1)
    finally:
        model.train(was_training)
        bar.close()
    return done


def sequential_layer(
    model: nn.Module,
    plan,
    stats,
    index: int,
    hidden: list,
    calls: list,
    *,
    ridge: float = DEFAULT_RIDGE,
    dense: list | None = None,
) -> tuple[list[str], list[torch.Tensor], list[torch.Tensor] | None]:
    """Decoder layer ``index``'s sequential step: (the kinds refit, the hidden states leaving it, and
    those of the unpruned model).

    Its statistics are measured on ``hidden`` (per batch, what the layers before it produce once
    pruned and refit; ``calls``: per batch, the layer's other arguments (args, kwargs)); the kept
    units are re-chosen by the plan's criterion with the plan's widths (random and hand-made plans
    keep theirs) and written back into ``plan``; the output projections are refit and the removed
    units' columns zeroed. ``dense``: per batch, the unpruned model's hidden states entering the layer,
    which the refit then targets (``SEQUENTIAL_TARGETS``). Only this layer's weights are read:
    ``prune --offload`` holds no other.
    """
    from minigpts.arch import get_adapter

    adapter = get_adapter(model)
    layer, layer_plan = adapter.layers(model)[index], plan.layers[index]
    written = None
    if dense is not None:
        with torch.inference_mode():
            written = _dense_pass(adapter, layer, dense, calls)
    step = (model, plan, stats, {}, index)  # {}: this layer's re-measured statistics, by field
    done = []
    if len(layer_plan.heads_keep) < adapter.head_layout(layer)[0]:
        targets = None  # with ``dense``: what the unpruned attention wrote, plus what earlier layers lost
        if written is not None:
            targets = [w[0] + d - h for w, d, h in zip(written, dense, hidden, strict=True)]
        _sequential_attention(step, layer, hidden, calls, ridge, targets)
        done.append("attention")
    leaving = None
    if len(layer_plan.mlp_keep) < projection_in_features(adapter.mlp_out(layer)):
        after = None if written is None else [w[1] for w in written]
        leaving = _sequential_mlp(step, layer, hidden, calls, ridge, after)
        done.append("mlp")
    if leaving is None:
        with torch.inference_mode():
            leaving = [_run_layer(layer, h, call) for h, call in zip(hidden, calls, strict=True)]
    return done, leaving, None if written is None else [w[1] for w in written]


def _sequential_attention(step, layer, hidden: list, calls: list, ridge: float, targets=None) -> None:
    """The attention of ``step``'s layer: statistics on ``hidden``, heads re-chosen, refit."""
    from minigpts.arch import get_adapter
    from minigpts.plan import _select_heads

    model, plan, _, seen, i = step
    adapter = get_adapter(model)
    layer_plan = plan.layers[i]
    _, n_kv, head_dim = adapter.head_layout(layer)
    with torch.inference_mode():
        (l1, l2sq, gram, mean, tokens), target = _collect(
            layer, adapter.attn_out(layer), hidden, calls, targets
        )
    seen |= {"attn_dim_l1": l1, "attn_dim_l2sq": l2sq, "attn_gram": gram, "attn_mean": mean}
    if plan.criterion not in ("random", "none"):  # re-select; random and hand-made plans keep theirs
        kv = len(layer_plan.kv_heads_keep)
        per_kv = len(layer_plan.heads_keep) // kv
        scores = _layer_scores(step)[1]
        layer_plan.heads_keep, layer_plan.kv_heads_keep, _ = _select_heads(scores, n_kv, kv, per_kv)
    channels = _head_channels(layer_plan.heads_keep, head_dim)
    _refit_and_zero(adapter.attn_out(layer), channels, gram, mean, tokens, ridge, target)


def _sequential_mlp(step, layer, hidden: list, calls: list, ridge: float, after=None) -> list | None:
    """The MLP of ``step``'s layer: statistics on ``hidden``, channels re-chosen, refit. With ``after``
    (the residual target), the hidden states leaving the refit layer, per batch (else None)."""
    from minigpts.arch import get_adapter
    from minigpts.plan import _top

    model, plan, _, seen, i = step
    down = get_adapter(model).mlp_out(layer)
    layer_plan = plan.layers[i]
    passes = None if after is None else []
    with torch.inference_mode():
        (l1, l2sq, gram, mean, tokens), target = _collect(
            layer, down, hidden, calls, after=after, passes=passes
        )
    seen |= {"mlp_l1": l1, "mlp_l2sq": l2sq, "mlp_gram": gram, "mlp_mean": mean}
    if plan.criterion not in ("random", "none"):
        scores = _layer_scores(step)[0]
        layer_plan.mlp_keep = _top(scores, len(layer_plan.mlp_keep))
    before = _projection_state(down)
    _refit_and_zero(down, list(layer_plan.mlp_keep), gram, mean, tokens, ridge, target)
    return None if passes is None else _propagate(down, before, passes)


def _projection_state(linear: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A copy of the projection's (weight [out, in], bias or None), in float32 at least."""
    weight = projection_weight(linear).detach()
    work = torch.float64 if weight.dtype == torch.float64 else torch.float32
    bias = None if linear.bias is None else linear.bias.detach().to(work, copy=True)
    return weight.to(work, copy=True), bias


def _propagate(linear: nn.Module, before: tuple, passes: list) -> list[torch.Tensor]:
    """The layer's outputs once ``linear`` is refit, from its outputs before (``passes``: per batch, the
    output and ``linear``'s input a, from ``_collect``): out + a ΔWᵀ + Δb, exact where the projection adds
    to the residual as it is (the residual target's condition). It spares running the layer once more:
    a fifth of the sequential refit's time (132 → 104 s for SmolLM2 at 16,384 tokens on 2 cores)."""
    weight, bias = _projection_state(linear)
    delta_w = weight - before[0]
    delta_b = None if bias is None else bias - before[1]
    outputs = []
    with torch.inference_mode():
        for out, a in passes:
            change = a.reshape(-1, a.shape[-1]).to(delta_w.dtype) @ delta_w.T
            if delta_b is not None:
                change += delta_b
            outputs.append((out.to(change.dtype) + change.reshape(out.shape)).to(out.dtype))
    passes.clear()
    return outputs


def residual_target(model: nn.Module, target: str) -> bool:
    """Whether the sequential refit of ``model`` fits the unpruned residual stream (``SEQUENTIAL_TARGETS``)."""
    from minigpts.arch import get_adapter

    if target not in SEQUENTIAL_TARGETS:
        raise ValueError(f"sequential refit target {target!r}: use one of {', '.join(SEQUENTIAL_TARGETS)}")
    return target == "residual" and get_adapter(model).writes_residual(model)


def _layer_scores(step):
    """The plan's criterion on ``step``'s layer, its re-measured statistics in place of the analysed ones."""
    from minigpts.criteria import get_criterion

    model, plan, stats, seen, index = step
    criterion = get_criterion(plan.criterion)
    return criterion.layer_scores(model, with_layer(stats, index, seen), index, plan.settings.get("seed", 0))


def with_layer(stats, index: int, replaced: dict):
    """A shallow copy of ``stats`` whose per-layer field ``name`` holds ``replaced[name]`` at ``index``;
    second moments kept in their file (``load(lazy_moments=True)``) stay there."""
    import dataclasses

    from minigpts.analysis import _LazyLayers

    fields = {}
    for name, tensor in replaced.items():
        value = getattr(stats, name)
        if isinstance(value, _LazyLayers):
            fields[name] = value.with_entry(index, tensor)
        else:  # a list; None where an older analysis did not record the field
            entries = value if value is not None else [None] * len(stats.mlp_l1)
            fields[name] = [tensor if i == index else entry for i, entry in enumerate(entries)]
    return dataclasses.replace(stats, **fields)


def _refit_and_zero(
    linear: nn.Linear,
    keep: list[int],
    gram,
    mean,
    tokens: int,
    ridge: float,
    target: TargetMoments | None = None,
) -> float | None:
    """Refit the kept input columns (toward ``target`` where given, by ``_blend``: its α is returned) and
    zero the others: the layer now computes its pruned self."""
    alpha = None
    if target is None:
        _write_refit(linear, keep, gram, mean, tokens, ridge)
    else:
        weight = projection_weight(linear)
        use_mean = mean if linear.bias is not None else None
        new, bias, alpha = _blend(
            weight.detach().to("cpu", torch.float64), keep, gram, use_mean, tokens, ridge, target
        )
        _write_columns(linear, keep, new, bias)
    weight = projection_weight(linear)
    removed = sorted(set(range(weight.shape[1])) - set(keep))
    with torch.no_grad():
        weight[:, torch.as_tensor(removed, dtype=torch.long, device=weight.device)] = 0
    return alpha


# --- refit-aware selection ------------------------------------------------------------------------


def elimination_order(
    weight: torch.Tensor,
    gram: torch.Tensor,
    mean: torch.Tensor | None = None,
    *,
    group: int = 1,
    block: int = 1,
    row_weights: torch.Tensor | None = None,
    ridge: float = ERROR_RIDGE,
) -> torch.Tensor:
    """[d / group] rank of every input group in a greedy elimination that refits after each removal.

    Optimal Brain Surgeon for structured units (as ZipLM and SlimGPT prune): with H = C + λI and the
    current refit W', removing the columns S costs Σ_r f_r · W'[r, S] (H⁻¹[S, S])⁻¹ W'[r, S]ᵀ (f = the
    rows' weights, e.g. the Fisher of the output channels), and the remaining columns absorb it:
    W' ← W' − W'[:, S] (H⁻¹[S, S])⁻¹ H⁻¹[S, :], H⁻¹ ← H⁻¹ − H⁻¹[:, S] (H⁻¹[S, S])⁻¹ H⁻¹[S, :]. Each
    step removes the ``block`` cheapest groups (of ``group`` contiguous columns, e.g. a head); the
    returned rank is higher for groups eliminated later (keep those), so the best k groups by rank
    are the set the greedy keeps at width k.
    """
    w = weight.detach().to("cpu", torch.float64).clone()
    h = _centred(gram.to(torch.float64), None if mean is None else mean.to(torch.float64)).clone()
    h.diagonal().add_(_ridge(h.diagonal(), ridge))
    inverse = torch.cholesky_inverse(torch.linalg.cholesky(h))
    f = torch.ones(w.shape[0], dtype=torch.float64) if row_weights is None else row_weights.to(torch.float64)
    root = f.clamp_min(0).sqrt()[:, None]
    n_groups = w.shape[1] // group
    alive = torch.arange(n_groups)  # original group ids still kept, in the order of the columns below
    rank = torch.zeros(n_groups, dtype=torch.float64)
    removed = 0
    while removed < n_groups - 1:
        # w and inverse hold the alive groups' columns only (compacted after every step: ~3x less work)
        if group == 1:
            cost = (root * w).pow(2).sum(0) / inverse.diagonal().clamp_min(1e-300)
        else:
            cost = torch.empty(len(alive), dtype=torch.float64)
            for g in range(len(alive)):
                cols = slice(g * group, (g + 1) * group)
                scaled = (root * w[:, cols]).T
                cost[g] = float((scaled * torch.linalg.solve(inverse[cols, cols], scaled)).sum())
        take = torch.argsort(cost, stable=True)[: min(block, n_groups - 1 - removed)]
        cols = (take[:, None] * group + torch.arange(group)).flatten()
        rows = torch.linalg.solve(inverse[cols][:, cols], inverse[cols, :])  # (H⁻¹[S, S])⁻¹ H⁻¹[S, :]
        w -= w[:, cols] @ rows
        inverse -= inverse[:, cols] @ rows
        rank[alive[take]] = torch.arange(removed, removed + len(take), dtype=torch.float64)
        removed += len(take)
        keep_groups = torch.ones(len(alive), dtype=torch.bool)
        keep_groups[take] = False
        keep_cols = keep_groups.repeat_interleave(group)
        alive, w, inverse = alive[keep_groups], w[:, keep_cols], inverse[keep_cols][:, keep_cols]
    rank[alive] = n_groups - 1
    return rank

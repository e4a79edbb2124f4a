"""Closed-form reconstruction and the error allocation: exact against direct computations."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from conftest import TINY_CONFIGS, make_tiny_llama, make_tiny_model

from minigpts.allocation import Component, allocate
from minigpts.analysis import ActivationStats, analyze
from minigpts.arch import get_adapter
from minigpts.arch.base import projection_weight
from minigpts.errors import UserError
from minigpts.plan import make_plan
from minigpts.reconstruct import (
    TargetMoments,
    _blend,
    _layer_inputs,
    _run_layer,
    elimination_order,
    error_curve,
    output_error,
    reconstruct,
    refit,
    sequential_layer,
    sequential_reconstruct,
)
from minigpts.surgery import apply_plan

VOCAB = 300


def correlated(n: int, d: int, seed: int = 0) -> torch.Tensor:
    """Activations with correlated channels and a non-zero mean (what refits exploit)."""
    g = torch.Generator().manual_seed(seed)
    mixing = torch.randn(d, d, generator=g, dtype=torch.float64)
    return torch.randn(n, d, generator=g, dtype=torch.float64) @ mixing + 0.5


def moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return x.T @ x / x.shape[0], x.mean(0)


def test_refit_is_the_least_squares_solution():
    x = correlated(400, 12)
    w = torch.randn(5, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    keep = [0, 2, 3, 7, 8, 11]
    gram, _ = moments(x)
    new, bias = refit(w, keep, gram, tokens=len(x), ridge=0.0)
    assert bias is None
    expected = torch.linalg.lstsq(x[:, keep], x @ w.T).solution.T
    torch.testing.assert_close(new, expected, rtol=1e-8, atol=1e-10)
    # the error it predicts is the error on the data
    empirical = float(((x @ w.T - x[:, keep] @ new.T) ** 2).sum(1).mean())
    assert output_error(w, keep, gram, ridge=0.0) == pytest.approx(empirical, rel=1e-8)
    # and it beats plain slicing
    sliced = float(((x @ w.T - x[:, keep] @ w[:, keep].T) ** 2).sum(1).mean())
    assert empirical < sliced


def test_refit_with_a_bias_is_least_squares_with_an_intercept():
    x = correlated(400, 10, seed=3)
    w = torch.randn(4, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    keep = [1, 4, 5, 9]
    gram, mean = moments(x)
    new, bias = refit(w, keep, gram, mean, tokens=len(x), ridge=0.0)
    design = torch.cat([x[:, keep], torch.ones(len(x), 1, dtype=torch.float64)], 1)
    solution = torch.linalg.lstsq(design, x @ w.T).solution.T
    torch.testing.assert_close(new, solution[:, :-1], rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(bias, solution[:, -1], rtol=1e-8, atol=1e-10)
    empirical = float(((x @ w.T - x[:, keep] @ new.T - bias) ** 2).sum(1).mean())
    assert output_error(w, keep, gram, mean, ridge=0.0) == pytest.approx(empirical, rel=1e-8)


@pytest.mark.parametrize("use_mean", [False, True])
def test_refit_to_another_target_is_least_squares_on_it(use_mean):
    """Given E[t aᵀ] and E[t] of a target t (the unpruned residual stream, for the sequential refit),
    the refit is the least-squares fit of t on the kept inputs; given those of the projection's own
    output W a, it is the default refit, ridge included."""
    x = correlated(400, 10, seed=4)
    g = torch.Generator().manual_seed(5)
    w = torch.randn(4, 10, dtype=torch.float64, generator=g)
    t = (
        x @ torch.randn(10, 4, dtype=torch.float64, generator=g)
        + torch.randn(400, 4, dtype=torch.float64, generator=g)
        + 1.0
    )
    keep = [0, 3, 4, 8]
    gram, mean = moments(x)
    mean = mean if use_mean else None
    new, bias = refit(
        w, keep, gram, mean, tokens=len(x), ridge=0.0, cross=t.T @ x / len(x), target_mean=t.mean(0)
    )
    design = (
        x[:, keep] if mean is None else torch.cat([x[:, keep], torch.ones(len(x), 1, dtype=torch.float64)], 1)
    )
    solution = torch.linalg.lstsq(design, t).solution.T
    torch.testing.assert_close(new, solution[:, : len(keep)], rtol=1e-8, atol=1e-10)
    if mean is None:
        assert bias is None
    else:
        torch.testing.assert_close(bias, solution[:, -1], rtol=1e-8, atol=1e-10)
    own = refit(w, keep, gram, mean, tokens=len(x), ridge=0.32, cross=w @ gram, target_mean=w @ moments(x)[1])
    default = refit(w, keep, gram, mean, tokens=len(x), ridge=0.32)
    for got, expected in zip(own, default, strict=True):
        if expected is None:
            assert got is None
        else:
            torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("use_mean", [False, True])
def test_the_target_blend_minimises_the_held_out_error(use_mean):
    """The sequential refit mixes the refit toward the residual target and toward the projection's own
    output by the α that minimises the target's error on the fold each fit did not see: brute force
    over α agrees, and the returned weights are the full-data mix at that α."""
    g = torch.Generator().manual_seed(8)
    x = correlated(60, 12, seed=9)
    w = torch.randn(5, 12, dtype=torch.float64, generator=g)
    drift = torch.randn(60, 5, dtype=torch.float64, generator=g) * 4 + 0.3 * x[:, :3] @ torch.randn(
        3, 5, dtype=torch.float64, generator=g
    )
    t = x @ w.T + drift  # what the layer should write: its own output plus what earlier layers lost
    keep, ridge = [0, 1, 4, 6, 7, 10], 0.32
    halves = [slice(0, 30), slice(30, 60)]

    def fold(rows):
        gram, mean = moments(x[rows])
        return gram, mean, t[rows].T @ x[rows] / len(x[rows]), t[rows].mean(0), len(x[rows])

    gram, mean = moments(x)
    mean = mean if use_mean else None
    target = TargetMoments(cross=t.T @ x / len(x), mean=t.mean(0), folds=[fold(rows) for rows in halves])
    new, bias, alpha = _blend(w, keep, gram, mean, len(x), ridge, target)

    def held_out_error(a: float) -> float:
        total = 0.0
        for fit, held in ((0, 1), (1, 0)):
            f_gram, f_mean, f_cross, f_t, n = target.folds[fit]
            f_mean = f_mean if use_mean else None
            own = refit(w, keep, f_gram, f_mean, tokens=n, ridge=ridge)
            aimed = refit(w, keep, f_gram, f_mean, tokens=n, ridge=ridge, cross=f_cross, target_mean=f_t)
            mix = own[0] + a * (aimed[0] - own[0])
            prediction = x[halves[held]][:, keep] @ mix.T
            if use_mean:
                prediction = prediction + own[1] + a * (aimed[1] - own[1])
            total += float((t[halves[held]] - prediction).pow(2).sum())
        return total

    grid = [i / 200 for i in range(201)]
    best = min(grid, key=held_out_error)
    assert abs(alpha - best) <= 0.005 + 1e-9, (alpha, best)
    assert held_out_error(alpha) <= held_out_error(best) + 1e-9
    assert 0.0 < alpha < 1.0  # here the drift is mostly noise, a little learnable: neither pure target wins
    own = refit(w, keep, gram, mean, tokens=len(x), ridge=ridge)
    aimed = refit(
        w, keep, gram, mean, tokens=len(x), ridge=ridge, cross=target.cross, target_mean=target.mean
    )
    torch.testing.assert_close(new, own[0] + alpha * (aimed[0] - own[0]), rtol=1e-10, atol=1e-12)
    if use_mean:
        torch.testing.assert_close(bias, own[1] + alpha * (aimed[1] - own[1]), rtol=1e-10, atol=1e-12)
    else:
        assert bias is None


@pytest.mark.parametrize("use_mean", [False, True])
def test_error_curve_equals_the_error_of_every_prefix(use_mean):
    x = correlated(300, 9, seed=4)
    w = torch.randn(3, 9, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    gram, mean = moments(x)
    mean = mean if use_mean else None
    order = torch.tensor([4, 0, 8, 2, 6, 1, 3, 7, 5])
    curve = error_curve(w, order, gram, mean, ridge=0.0)
    assert curve.shape == (10,)
    for k in range(10):
        expected = output_error(w, order[:k].tolist(), gram, mean, ridge=0.0) if k else None
        if k == 0:  # nothing kept: everything the projection wrote is lost
            c = gram if mean is None else gram - torch.outer(mean, mean)
            expected = float(torch.trace(w @ c @ w.T))
        assert float(curve[k]) == pytest.approx(expected, rel=1e-7, abs=1e-9)
    assert torch.all(curve[:-1] >= curve[1:] - 1e-9)  # keeping more never costs more


def _fit_error(w: torch.Tensor, new: torch.Tensor, keep: list[int], x: torch.Tensor) -> float:
    return float((x @ w.T - x[:, keep] @ new.T).pow(2).sum(1).mean())


def test_the_ridge_shrinks_toward_the_sliced_weights():
    """0 is the least squares, a huge ridge plain slicing, and every ridge lies between them in fit error."""
    x = correlated(300, 10, seed=3)
    w = torch.randn(4, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    keep = [0, 1, 4, 5, 6, 9]
    gram, _ = moments(x)
    sliced = w[:, keep]
    huge, _ = refit(w, keep, gram, tokens=len(x), ridge=1e9)
    assert torch.allclose(huge, sliced, rtol=1e-6, atol=1e-6)
    errors = [
        _fit_error(w, refit(w, keep, gram, tokens=len(x), ridge=r)[0], keep, x) for r in (0.0, 0.03, 0.3, 3.0)
    ]
    assert errors == sorted(errors)  # more shrinkage, less fit to the removed inputs' signal
    assert errors[-1] < _fit_error(w, sliced, keep, x)
    assert errors[0] < 0.5 * _fit_error(w, sliced, keep, x)


def test_the_ridge_shrinks_less_as_the_calibration_grows():
    """ρ ∝ inputs / tokens: the same ridge from 4× the tokens is the ridge / 4 from as many, and the
    fit moves toward the least squares as the noise of the moments falls."""
    x = correlated(400, 10, seed=7)
    w = torch.randn(4, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    keep = [0, 2, 3, 6, 8, 9]
    gram, _ = moments(x)
    torch.testing.assert_close(
        refit(w, keep, gram, tokens=4 * len(x), ridge=0.8)[0],
        refit(w, keep, gram, tokens=len(x), ridge=0.2)[0],
    )
    errors = [_fit_error(w, refit(w, keep, gram, tokens=n, ridge=0.3)[0], keep, x) for n in (10, 100, 1000)]
    assert errors == sorted(errors, reverse=True)
    assert errors[-1] < errors[0]


def test_the_ridge_is_scale_free_per_input():
    """Rescaling one input (and its column, inversely) rescales that column of the refit and nothing else."""
    x = correlated(300, 8, seed=5)
    w = torch.randn(3, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    keep = [1, 2, 3, 5, 7]
    scale = torch.ones(8, dtype=torch.float64)
    scale[2], scale[5] = 40.0, 0.01
    new, _ = refit(w, keep, moments(x)[0], tokens=len(x), ridge=0.5)
    scaled, _ = refit(w / scale, keep, moments(x * scale)[0], tokens=len(x), ridge=0.5)
    assert torch.allclose(
        scaled, new / scale[keep], rtol=1e-5, atol=1e-10
    )  # a ridge on the mean would not be


def test_ridge_keeps_dead_inputs_solvable():
    x = correlated(200, 6)
    x[:, 2] = 0.0  # a channel the domain never uses: C is singular
    w = torch.randn(3, 6, dtype=torch.float64)
    gram, _ = moments(x)
    new, _ = refit(w, [0, 1, 2, 3], gram, tokens=len(x))
    assert torch.isfinite(new).all()
    curve = error_curve(w, torch.arange(6), gram)
    assert torch.isfinite(curve).all()


# --- on a model -------------------------------------------------------------------------------------


def windows(n=6, seq_len=16, seed=1):
    return torch.randint(0, VOCAB, (n, seq_len), generator=torch.Generator().manual_seed(seed))


def tiny(seed=0):
    return make_tiny_llama(VOCAB, seed=seed, intermediate_size=64, num_hidden_layers=3).double()


def test_moments_equal_an_independent_computation():
    model = tiny()
    ids = windows()
    captured = {"mlp": [], "attn": []}
    adapter = get_adapter(model)
    layer = adapter.layers(model)[1]
    hooks = [
        adapter.mlp_out(layer).register_forward_pre_hook(lambda m, a: captured["mlp"].append(a[0])),
        adapter.attn_out(layer).register_forward_pre_hook(lambda m, a: captured["attn"].append(a[0])),
    ]
    with torch.no_grad():
        model.model(input_ids=ids)
    for h in hooks:
        h.remove()
    stats = analyze(model, ids, batch_size=4, progress=False, moments=True, fisher_tokens=64)
    for name, gram, mean in (
        ("mlp", stats.mlp_gram[1], stats.mlp_mean[1]),
        ("attn", stats.attn_gram[1], stats.attn_mean[1]),
    ):
        x = torch.cat(captured[name]).reshape(-1, gram.shape[0])
        torch.testing.assert_close(gram, x.T @ x / len(x), rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(mean, x.mean(0), rtol=1e-6, atol=1e-9)


def test_fisher_equals_autograd_on_each_window():
    model = tiny()
    ids = windows(3)
    stats = analyze(model, ids, progress=False, moments=True, fisher_tokens=48)
    adapter = get_adapter(model)
    expected = {"mlp": [0.0] * 3, "attn": [0.0] * 3}
    for window in ids:
        outputs = {}
        hooks = []
        for i, layer in enumerate(adapter.layers(model)):
            for kind, module in (("mlp", adapter.mlp_out(layer)), ("attn", adapter.attn_out(layer))):
                hooks.append(
                    module.register_forward_hook(
                        lambda m, a, out, k=(kind, i), o=outputs: o.__setitem__(k, out)
                    )
                )
        loss = model(input_ids=window[None], labels=window[None]).loss * (window.numel() - 1)
        for h in hooks:
            h.remove()
        keys = list(outputs)
        grads = torch.autograd.grad(loss, [outputs[k] for k in keys])
        for (kind, i), g in zip(keys, grads, strict=True):
            expected[kind][i] = expected[kind][i] + g.pow(2).reshape(-1, g.shape[-1]).sum(0)
    assert stats.fisher_tokens == 48
    for i in range(3):
        torch.testing.assert_close(stats.mlp_fisher[i], expected["mlp"][i] / 48, rtol=1e-9, atol=1e-15)
        torch.testing.assert_close(stats.attn_fisher[i], expected["attn"][i] / 48, rtol=1e-9, atol=1e-15)
    assert all(p.requires_grad for p in model.parameters())  # the pass gives back what it switched off


def test_moments_survive_save_and_load(tmp_path):
    stats = analyze(tiny(), windows(), progress=False, moments=True, fisher_tokens=64)
    stats.save(tmp_path / "s.safetensors")
    loaded = ActivationStats.load(tmp_path / "s.safetensors")
    assert loaded.has_moments
    for a, b in zip(stats.mlp_gram + stats.attn_gram, loaded.mlp_gram + loaded.attn_gram, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-12)  # float32 on disk
    assert loaded.has_fisher and loaded.fisher_tokens == stats.fisher_tokens == 64  # 4 windows of 16
    for a, b in zip(
        stats.mlp_fisher + stats.attn_fisher, loaded.mlp_fisher + loaded.attn_fisher, strict=True
    ):
        torch.testing.assert_close(b, a)
    plain = analyze(tiny(), windows(), progress=False)
    plain.save(tmp_path / "p.safetensors")
    assert not ActivationStats.load(tmp_path / "p.safetensors").has_moments


def test_refit_of_dead_units_changes_nothing():
    """Units that never fire carry no information: the refit must equal plain slicing, logits unchanged."""
    model = tiny()
    adapter = get_adapter(model)
    dead = list(range(0, 64, 2))
    for layer in adapter.layers(model):
        with torch.no_grad():
            adapter.mlp_in(layer)[1].weight[dead] = 0  # up_proj rows: the gated product is exactly 0
    ids = windows()
    stats = analyze(model, ids, progress=False, moments=True, fisher_tokens=64)
    plan = make_plan(model, stats, mlp_ratio=0.5, round_to=1)
    assert all(layer.mlp_keep == list(range(1, 64, 2)) for layer in plan.layers)
    with torch.no_grad():
        expected = model(ids).logits
    reconstruct(model, plan, stats, ridge=0.0)
    apply_plan(model, plan)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, expected, rtol=1e-9, atol=1e-9)


def test_reconstruction_brings_the_pruned_model_closer_on_its_calibration_data():
    model = tiny()
    ids = windows(8)
    stats = analyze(model, ids, progress=False, moments=True, fisher_tokens=64)
    with torch.no_grad():
        reference = model(ids).logits
    plan = make_plan(model, stats, mlp_ratio=0.5, head_ratio=0.5, round_to=1)
    errors = {}
    for method in ("none", "lstsq"):
        pruned = copy.deepcopy(model)
        if method == "lstsq":
            done = reconstruct(pruned, plan, stats, ridge=1e-6)
            assert done == {"mlp": 3, "attention": 3}
        apply_plan(pruned, plan)
        with torch.no_grad():
            errors[method] = float((pruned(ids).logits - reference).pow(2).mean())
    assert errors["lstsq"] < 0.7 * errors["none"], errors


def test_reconstruct_needs_moments():
    model = tiny()
    stats = analyze(model, windows(), progress=False)
    plan = make_plan(model, stats, mlp_ratio=0.5)
    with pytest.raises(UserError, match="--moments"):
        reconstruct(model, plan, stats)


# --- allocation -------------------------------------------------------------------------------------


def random_component(seed: int, n: int = 6) -> Component:
    g = torch.Generator().manual_seed(seed)
    steps = torch.rand(n, generator=g, dtype=torch.float64).sort().values  # convex: growing marginal error
    errors = torch.cat([torch.zeros(1, dtype=torch.float64), steps.cumsum(0)]).flip(0)
    return Component([(k, k * 10, float(errors[k])) for k in range(n + 1)])


@pytest.mark.parametrize("budget", [10, 40, 70, 130])
def test_allocation_is_optimal_on_convex_curves(budget):
    components = [random_component(seed) for seed in range(3)]
    chosen = allocate(components, budget, lambda o: o[1])
    saved = sum(60 - c.options[j][1] for c, j in zip(components, chosen, strict=True))
    assert saved == budget
    error = sum(c.options[j][2] for c, j in zip(components, chosen, strict=True))
    best = min(
        sum(c.options[j][2] for c, j in zip(components, js, strict=True))
        for js in itertools.product(range(7), repeat=3)
        if sum(60 - c.options[j][1] for c, j in zip(components, js, strict=True)) == budget
    )
    assert error == pytest.approx(best)


def test_error_allocation_cuts_the_layer_whose_output_does_not_matter():
    model = tiny()
    adapter = get_adapter(model)
    with torch.no_grad():
        adapter.mlp_out(adapter.layers(model)[1]).weight.mul_(1e-4)  # layer 1's MLP barely writes
    stats = analyze(model, windows(), progress=False, moments=True, fisher_tokens=64)
    plan = make_plan(model, stats, criterion="l1", mlp_ratio=0.25, layout="per-layer", min_mlp=8)
    kept = [len(layer.mlp_keep) for layer in plan.layers]
    assert kept[1] == 16  # 48 of the 192 channels removed, all of them where they cost nothing
    assert kept[0] == kept[2] == 64
    # the paper's raw global ranking of mean |a| does not see that layer 1's output is tiny
    paper = make_plan(model, stats, criterion="l1", mlp_ratio=0.25, layout="per-layer", allocation="paper")
    assert [len(layer.mlp_keep) for layer in paper.layers] != kept


def test_error_allocation_without_moments_falls_back_with_a_note():
    model = tiny()
    stats = analyze(model, windows(), progress=False)
    plan = make_plan(model, stats, mlp_ratio=0.25, layout="per-layer")
    paper = make_plan(model, stats, mlp_ratio=0.25, layout="per-layer", allocation="paper")
    assert [x.mlp_keep for x in plan.layers] == [x.mlp_keep for x in paper.layers]
    assert any("second moments" in note for note in plan.summary["notes"])
    moments_only = analyze(model, windows(), progress=False, moments=True)  # no gradient pass
    plan = make_plan(model, moments_only, mlp_ratio=0.25, layout="per-layer")
    assert [x.mlp_keep for x in plan.layers] == [x.mlp_keep for x in paper.layers]


@pytest.mark.parametrize("layout", ["uniform", "per-layer"])
def test_error_target_meets_the_size_and_beats_a_common_ratio(layout):
    model = tiny(seed=3)
    ids = windows(8)
    stats = analyze(model, ids, progress=False, moments=True, fisher_tokens=64)
    plans = {
        allocation: make_plan(
            model, stats, target_params=0.85, layout=layout, allocation=allocation, round_to=4
        )
        for allocation in ("error", "paper")
    }
    before = plans["error"].summary["params_before"]
    for plan in plans.values():
        assert abs(plan.summary["params_after"] / before - 0.85) < 0.035  # a tiny model's steps are coarse
    assert plans["error"].summary["target"]["allocation"] == "error"

    def summed_error(plan):
        adapter = get_adapter(model)
        total = 0.0
        for i, (layer, lp) in enumerate(zip(adapter.layers(model), plan.layers, strict=True)):
            total += output_error(adapter.mlp_out(layer).weight, lp.mlp_keep, stats.mlp_gram[i])
            head_dim = adapter.head_layout(layer)[2]
            channels = [h * head_dim + d for h in lp.heads_keep for d in range(head_dim)]
            total += output_error(adapter.attn_out(layer).weight, channels, stats.attn_gram[i])
        return total

    if layout == "per-layer":  # per-layer error allocation minimises a scaled sum; compare unscaled loosely
        assert summed_error(plans["error"]) <= 1.5 * summed_error(plans["paper"])
    else:
        assert summed_error(plans["error"]) <= summed_error(plans["paper"]) * (1 + 1e-9)


# --- sequential ---------------------------------------------------------------------------------------


def test_sequential_equals_one_shot_when_only_the_last_layer_is_pruned():
    model = tiny()
    ids = windows(8)
    stats = analyze(model, ids, progress=False, moments=True)
    plan = make_plan(model, stats, mlp_ratio=0.5, round_to=1)
    for layer in plan.layers[:-1]:  # layers 0 and 1 keep everything: layer 2's MLP sees the one-shot inputs
        layer.mlp_keep = list(range(64))
    one_shot, sequential = copy.deepcopy(model), copy.deepcopy(model)
    sequential_plan = copy.deepcopy(plan)
    reconstruct(one_shot, plan, stats)
    apply_plan(one_shot, plan)
    done = sequential_reconstruct(sequential, sequential_plan, stats, ids, batch_size=3, progress=False)
    assert done == {"mlp": 1, "attention": 0}
    apply_plan(sequential, sequential_plan)
    assert sequential_plan.layers[-1].mlp_keep == plan.layers[-1].mlp_keep
    with torch.no_grad():
        torch.testing.assert_close(sequential(ids).logits, one_shot(ids).logits, rtol=1e-7, atol=1e-9)


def test_sequential_calibration_follows_the_pruned_layers():
    model = tiny(seed=2)
    ids = windows(64)  # 1,024 tokens: enough that the residual target generalises across windows
    stats = analyze(model, ids, progress=False, moments=True)
    with torch.no_grad():
        reference = model(ids).logits
    errors, plans = {}, {}
    for mode in ("one-shot", "sequential", "sequential, own outputs"):
        pruned, plan = (
            copy.deepcopy(model),
            make_plan(model, stats, criterion="l1", mlp_ratio=0.6, head_ratio=0.5, round_to=1),
        )
        # in-sample, so no ridge: 128 tokens for 64 inputs would make the default one (× inputs/tokens)
        # pull both fits most of the way back to slicing
        if mode == "one-shot":
            reconstruct(pruned, plan, stats, ridge=0.0)
        else:
            target = "self" if mode.endswith("own outputs") else "residual"
            sequential_reconstruct(pruned, plan, stats, ids, progress=False, ridge=0.0, target=target)
        # removed units are already silenced: slicing them changes nothing
        with torch.no_grad():
            before_slicing = pruned(ids).logits
        apply_plan(pruned, plan)
        with torch.no_grad():
            logits = pruned(ids).logits
        if mode != "one-shot":
            torch.testing.assert_close(logits, before_slicing, rtol=1e-7, atol=1e-9)
        errors[mode] = float((logits - reference).pow(2).mean())
        plans[mode] = plan
    assert plans["sequential"].layers[0].heads_keep == plans["one-shot"].layers[0].heads_keep  # same inputs
    assert plans["sequential"].layers[2].mlp_keep != plans["one-shot"].layers[2].mlp_keep  # re-chosen
    # fitting (partly) toward the unpruned residual stream absorbs what earlier layers lost: here a
    # fifth less error than fitting each projection's own outputs (SparseGPT's target), which alone
    # barely beats one-shot
    assert errors["sequential"] < 0.85 * errors["sequential, own outputs"], errors
    assert errors["sequential"] < errors["one-shot"], errors


# --- refit-aware selection ------------------------------------------------------------------------------


def test_elimination_removes_first_what_the_refit_misses_least():
    x = correlated(500, 8, seed=6)
    w = torch.randn(4, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    gram, _ = moments(x)
    rank = elimination_order(w, gram, ridge=1e-9)
    first = int(torch.argmin(rank))
    costs = [output_error(w, [k for k in range(8) if k != j], gram, ridge=1e-9) for j in range(8)]
    assert first == min(range(8), key=costs.__getitem__)
    assert sorted(rank.tolist()) == list(range(8))


def test_elimination_keeps_one_of_two_duplicate_channels():
    """Score-by-score criteria keep both copies of a strong channel; the refit needs only one."""
    g = torch.Generator().manual_seed(8)
    x = torch.randn(600, 6, generator=g, dtype=torch.float64)
    x[:, 1] = x[:, 0]  # channel 1 duplicates channel 0, both strong
    x[:, :2] *= 5
    x[:, 1] += 1e-3 * torch.randn(600, generator=g, dtype=torch.float64)
    w = torch.randn(3, 6, generator=g, dtype=torch.float64)
    gram, _ = moments(x)
    rank = elimination_order(w, gram, ridge=1e-9)
    kept = sorted(torch.topk(rank, 2).indices.tolist())
    assert len({0, 1} & set(kept)) == 1
    by_magnitude = sorted(torch.topk(x.abs().mean(0), 2).indices.tolist())
    assert by_magnitude == [0, 1]
    assert output_error(w, kept, gram, ridge=1e-9) < output_error(w, by_magnitude, gram, ridge=1e-9)


def test_elimination_of_heads_moves_whole_groups():
    x = correlated(400, 12, seed=9)
    w = torch.randn(5, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(10))
    gram, _ = moments(x)
    rank = elimination_order(w, gram, group=3, ridge=1e-9)
    assert rank.shape == (4,) and sorted(rank.tolist()) == [0, 1, 2, 3]
    first = int(torch.argmin(rank))
    costs = [output_error(w, [c for c in range(12) if c // 3 != h], gram, ridge=1e-9) for h in range(4)]
    assert first == min(range(4), key=costs.__getitem__)


def test_refit_criterion_plans_a_model():
    model = tiny()
    stats = analyze(model, windows(), progress=False, moments=True, fisher_tokens=64)
    plan = make_plan(model, stats, criterion="refit", mlp_ratio=0.5, head_ratio=0.5)
    assert all(len(layer.mlp_keep) == 32 for layer in plan.layers)
    no_moments = analyze(model, windows(), progress=False)
    with pytest.raises(UserError, match="--moments"):
        make_plan(model, no_moments, criterion="refit", mlp_ratio=0.5)


def test_refit_is_never_ranked_across_layers():
    """refit's scores are ranks within a layer: one ranking across layers (the paper's per-layer
    allocation, chosen or fallen back to without gradients) would size every layer alike, so it is a
    clear error there; the error allocation sizes the layers apart and refit orders units within each."""
    model = tiny()
    with_fisher = analyze(model, windows(), progress=False, moments=True, fisher_tokens=64)
    no_fisher = analyze(model, windows(), progress=False, moments=True)
    paper = {"layout": "per-layer", "allocation": "paper", "mlp_ratio": 0.5}
    for stats, kwargs in ((with_fisher, paper), (no_fisher, {**paper, "allocation": "error"})):
        with pytest.raises(UserError, match="--criterion refit ranks units within a layer only"):
            make_plan(model, stats, criterion="refit", **kwargs)
        assert make_plan(model, stats, criterion="wanda", **kwargs).criterion == "wanda"
    error_allocation = make_plan(model, with_fisher, layout="per-layer", mlp_ratio=0.5, criterion="refit")
    assert error_allocation.criterion == "refit"
    assert len({len(layer.mlp_keep) for layer in error_allocation.layers}) > 1  # layers sized apart


# --- every family -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(TINY_CONFIGS))
def test_refit_and_sequential_work_for_every_family(name):
    """The refit reads and writes projections through the adapters (fused, Conv1D, biases): for each
    family it must beat plain slicing on its calibration data, and the sequential refit must silence
    the removed units exactly (slicing them afterwards changes nothing) and, where the family adds its
    output projections to the residual stream as they are, beat fitting their own outputs by fitting
    the unpruned residual stream (elsewhere it fits their own outputs: the same model)."""
    torch.manual_seed(0)
    model = make_tiny_model(name, VOCAB).double()
    adapter = get_adapter(model)
    ids = windows(6, 16)
    stats = analyze(model, ids, progress=False, moments=True, fisher_tokens=32)
    heads = 0.5 if adapter.head_pruning_problem(model.config) is None else None
    with torch.no_grad():
        reference = model(ids).logits
    errors = {}
    for mode in ("none", "lstsq", "sequential", "self"):
        plan = make_plan(model, stats, mlp_ratio=0.5, head_ratio=heads, round_to=1, layout="per-layer")
        pruned = copy.deepcopy(model)
        if mode == "lstsq":
            reconstruct(pruned, plan, stats, ridge=1e-6)
        elif mode in ("sequential", "self"):
            target = "self" if mode == "self" else "residual"
            sequential_reconstruct(pruned, plan, stats, ids, ridge=1e-6, progress=False, target=target)
            with torch.no_grad():
                silenced = pruned(ids).logits
        apply_plan(pruned, plan)
        with torch.no_grad():
            logits = pruned(ids).logits
        if mode in ("sequential", "self"):
            torch.testing.assert_close(logits, silenced, rtol=1e-7, atol=1e-9)
        errors[mode] = float((logits - reference).pow(2).mean())
    assert errors["lstsq"] < errors["none"], errors
    if adapter.writes_residual(model):
        assert errors["sequential"] < errors["self"], errors
    else:
        assert errors["sequential"] == errors["self"], errors


@pytest.mark.parametrize("name", [*TINY_CONFIGS, "opt-post-layer-norm"])
def test_the_hidden_states_leaving_a_sequential_step_are_the_refit_layers_output(name):
    """With the residual target the step does not run the refit layer again: it adds the refit's
    change to what the layer wrote while measured (out + a ΔWᵀ + Δb). That must equal the refit
    layer's output, and for every batch (sizes differ)."""
    if name == "opt-post-layer-norm":
        model = make_tiny_model("opt", VOCAB, do_layer_norm_before=False).double()
    else:
        model = make_tiny_model(name, VOCAB).double()
    adapter = get_adapter(model)
    ids = windows(5, 16)
    stats = analyze(model, ids, progress=False, moments=True)
    heads = 0.5 if adapter.head_pruning_problem(model.config) is None else None
    plan = make_plan(model, stats, mlp_ratio=0.5, head_ratio=heads, round_to=1)
    batches = [ids[:2], ids[2:4], ids[4:]]
    with torch.no_grad():
        hidden, calls = _layer_inputs(model, adapter, batches)
    dense = list(hidden) if adapter.writes_residual(model) else None
    layer_calls = [c[0] for c in calls]
    kinds, leaving, _ = sequential_layer(model, plan, stats, 0, hidden, layer_calls, ridge=1e-6, dense=dense)
    assert "mlp" in kinds
    with torch.no_grad():
        for h, call, out in zip(hidden, layer_calls, leaving, strict=True):
            torch.testing.assert_close(
                out, _run_layer(adapter.layers(model)[0], h, call), rtol=1e-9, atol=1e-9
            )


def test_the_default_refit_uses_the_ridge_declared_with_its_flag():
    """`apply_full_plan` without a ridge refits as `--ridge`'s default says (one declaration, no stale copy)."""
    from minigpts.options import PlanOptions
    from minigpts.pipeline import apply_full_plan

    model = tiny()
    ids = windows(8)
    stats = analyze(model, ids, progress=False, moments=True)
    plan = make_plan(model, stats, mlp_ratio=0.5, round_to=1)

    def down_weights(**ridge):
        pruned, _ = apply_full_plan(
            copy.deepcopy(model), None, copy.deepcopy(plan), stats=stats, reconstruct="lstsq", **ridge
        )
        return [get_adapter(pruned).mlp_out(layer).weight for layer in get_adapter(pruned).layers(pruned)]

    default = down_weights()
    for got, want in zip(default, down_weights(ridge=PlanOptions.ridge), strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert any(
        not torch.equal(a, b)
        for a, b in zip(default, down_weights(ridge=10 * PlanOptions.ridge), strict=True)
    )


def test_a_refit_from_too_few_calibration_tokens_is_flagged_in_the_plan():
    """Fewer than 8 tokens per MLP input: `prune`/`run` print a warning naming --calib-tokens; enough: none."""
    from minigpts.options import PlanOptions
    from minigpts.pipeline import _structure_plan

    model = tiny()  # MLP width 64: 512 tokens are enough
    thin = analyze(model, windows(31), progress=False, moments=True)  # 496 tokens of 16
    enough = analyze(model, windows(32), progress=False, moments=True)  # 512

    def warnings(stats, **options):
        plan = _structure_plan(model, stats, PlanOptions(mlp_ratio=0.5, **options), None)
        return [n for n in plan.summary.get("notes", []) if "calibration tokens" in n]

    (warning,) = warnings(thin)
    assert warning.startswith("warning:") and "--calib-tokens 512" in warning
    assert warnings(enough) == []
    assert warnings(thin, reconstruct="none") == []  # slicing reads no second moments


@pytest.mark.parametrize("name", [*TINY_CONFIGS, "opt-post-layer-norm"])
def test_writes_residual_says_whether_the_output_projections_add_to_the_residual(name):
    """The sequential refit targets the unpruned residual stream only where an output projection's
    output reaches the layer's output as it is: adding δ to it must add exactly δ there (the MLP's
    output projection zeroed, so that the MLP does not read what the attention wrote)."""
    if name == "opt-post-layer-norm":
        model = make_tiny_model("opt", VOCAB, do_layer_norm_before=False).double()
    else:
        model = make_tiny_model(name, VOCAB).double()
    adapter = get_adapter(model)
    layer = adapter.layers(model)[0]
    with torch.no_grad():
        hidden, calls = _layer_inputs(model, adapter, [windows(2, 10)])
        down = adapter.mlp_out(layer)
        projection_weight(down).zero_()
        if down.bias is not None:
            down.bias.zero_()
    delta = torch.randn(hidden[0].shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    for projection in (adapter.mlp_out(layer), adapter.attn_out(layer)):
        with torch.no_grad():
            before = _run_layer(layer, hidden[0], calls[0][0])
            handle = projection.register_forward_hook(
                lambda module, args, output: output + delta.reshape(output.shape)
            )
            try:
                after = _run_layer(layer, hidden[0], calls[0][0])
            finally:
                handle.remove()
        exact = torch.allclose(after - before, delta, rtol=1e-9, atol=1e-9)
        assert exact == adapter.writes_residual(model), (name, projection)

"""The peers' criteria (FLAP, LLM-Pruner's Taylor, Minitron): each equals a direct, slow computation."""

from __future__ import annotations

import copy
import re

import pytest
import torch
from conftest import make_tiny_model

from minigpts.analysis import ActivationStats, analyze
from minigpts.arch import get_adapter
from minigpts.arch.base import projection_weight
from minigpts.cli import analysis_options, build_parser
from minigpts.criteria import unit_scores
from minigpts.errors import UserError
from minigpts.plan import make_plan

VOCAB = 300
# GQA and two readers; per-head norms; one reader, LayerNorm and biases; narrower embedding; fused q/k/v
# and gate/up; Conv1D ([in, out] weights) with fused q/k/v; q/k/v interleaved per head
FAMILIES = ["llama", "qwen3", "phi", "opt-proj", "phi3", "gpt2", "gpt_neox"]
WINDOWS = torch.randint(0, VOCAB, (3, 10), generator=torch.Generator().manual_seed(5))


def measured(name: str, **passes):
    model = make_tiny_model(name, VOCAB)
    return model, analyze(model, WINDOWS, batch_size=2, progress=False, **passes)


def captured_inputs(model) -> dict:
    """Every calibration window's full input of each consuming projection: [windows, tokens, width] each."""
    adapter = get_adapter(model)
    store: dict = {}
    handles = []
    for i, layer in enumerate(adapter.layers(model)):
        modules = {"mlp": adapter.mlp_out(layer), "attn": adapter.attn_out(layer)}
        modules |= {("reader", r): m for r, m in enumerate(adapter.residual_readers(layer))}
        for key, module in modules.items():

            def hook(module, args, key=(i, key)):
                store.setdefault(key, []).append(
                    args[0].detach().double().reshape(-1, *WINDOWS.shape[1:], args[0].shape[-1])
                )

            handles.append(module.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            for window in WINDOWS:  # one window at a time: nothing shared with analyze's batching
                adapter.body(model)(input_ids=window[None], use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return {key: torch.cat(parts) for key, parts in store.items()}


def squared_column_norm(module, j: int) -> float:
    return sum(float(w) ** 2 for w in projection_weight(module)[:, j].detach().double())


def variance(values: torch.Tensor) -> torch.Tensor:
    """Population variance over every token of every window, per channel (two passes)."""
    flat = values.reshape(-1, values.shape[-1])
    return ((flat - flat.mean(0)) ** 2).mean(0)


def standardised(values: list[float]) -> torch.Tensor:
    n = len(values)
    mean = sum(values) / n
    std = (sum((v - mean) ** 2 for v in values) / (n - 1)) ** 0.5
    return torch.tensor([(v - mean) / std for v in values], dtype=torch.float64)


def window_l2(values: torch.Tensor) -> torch.Tensor:
    """The L2 norm of one window's slice: over its tokens (and the head's dims, for a head)."""
    return values.pow(2).sum().sqrt()


def reference_flap(model, inputs):
    adapter = get_adapter(model)
    mlp, heads = [], []
    hidden = None
    for i, layer in enumerate(adapter.layers(model)):
        down, out = adapter.mlp_out(layer), adapter.attn_out(layer)
        var = variance(inputs[(i, "mlp")])
        mlp.append(standardised([float(var[j]) * squared_column_norm(down, j) for j in range(var.numel())]))
        var = variance(inputs[(i, "attn")])
        per_dim = standardised(
            [(float(var[c]) * squared_column_norm(out, c)) ** 2 for c in range(var.numel())]
        )
        n_heads, _, head_dim = adapter.head_layout(layer)
        heads.append(torch.stack([per_dim[h * head_dim : (h + 1) * head_dim].mean() for h in range(n_heads)]))
        for r, reader in enumerate(adapter.residual_readers(layer)):
            var = variance(inputs[(i, ("reader", r))])
            part = torch.tensor([float(var[c]) * squared_column_norm(reader, c) for c in range(var.numel())])
            hidden = part if hidden is None else hidden + part
    return mlp, heads, hidden.double()


def reference_minitron(model, inputs):
    adapter = get_adapter(model)
    mlp, heads, readers = [], [], []
    for i, layer in enumerate(adapter.layers(model)):
        a = inputs[(i, "mlp")]  # [windows, tokens, d]
        mlp.append(
            torch.stack([torch.stack([window_l2(w[:, j]) for w in a]).mean() for j in range(a.shape[-1])])
        )
        o = inputs[(i, "attn")]
        n_heads, _, head_dim = adapter.head_layout(layer)
        heads.append(
            torch.stack(
                [
                    torch.stack([window_l2(w[:, h * head_dim : (h + 1) * head_dim]) for w in o]).mean()
                    for h in range(n_heads)
                ]
            )
        )
        for r in range(len(adapter.residual_readers(layer))):
            x = inputs[(i, ("reader", r))]
            readers.append(
                torch.stack([torch.stack([window_l2(w[:, c]) for w in x]).mean() for c in range(x.shape[-1])])
            )
    return mlp, heads, torch.stack(readers).mean(0)


def reference_taylor(model):
    """|w·g| summed unit by unit, g from one backward pass over all windows at once."""
    model = copy.deepcopy(model)
    for p in model.parameters():
        p.requires_grad_(True)
    model(input_ids=WINDOWS, labels=WINDOWS, use_cache=False).loss.backward()
    adapter = get_adapter(model)
    layers = adapter.layers(model)
    hidden_size = projection_weight(adapter.residual_readers(layers[0])[0]).shape[1]

    def sal(p) -> torch.Tensor:
        return (p.detach().double() * p.grad.double()).abs()

    def out_in(module) -> torch.Tensor:  # |w·g| as [out, in]: Conv1D stores [in, out]
        values = sal(module.weight)
        return values if projection_weight(module) is module.weight else values.T

    def rows(module, index: list[int]) -> float:
        value = float(out_in(module)[index].sum())
        return value + (float(sal(module.bias)[index].sum()) if module.bias is not None else 0.0)

    def cols(module, index: list[int]) -> float:
        return float(out_in(module)[:, index].sum())

    mlp, heads = [], []
    hidden = torch.zeros(hidden_size, dtype=torch.float64)
    for layer in layers:
        n_heads, n_kv, hd = adapter.head_layout(layer)
        group = n_heads // n_kv
        d = projection_weight(adapter.mlp_out(layer)).shape[1]
        fused_qkv = len(adapter.attn_in(layer)) == 1
        mlp_in = adapter.mlp_in(layer)
        fused_mlp = projection_weight(mlp_in[0]).shape[0] == 2 * d and len(mlp_in) == 1

        def mlp_rows(j: int, d: int = d, fused: bool = fused_mlp) -> list[int]:
            return [j, d + j] if fused else [j]  # fused gate/up: [gate | up]

        mlp.append(
            torch.tensor(
                [
                    sum(rows(m, mlp_rows(j)) for m in mlp_in) + cols(adapter.mlp_out(layer), [j])
                    for j in range(d)
                ],
                dtype=torch.float64,
            )
        )
        out = adapter.attn_out(layer)
        scores = []
        for h in range(n_heads):
            q_rows = list(range(h * hd, (h + 1) * hd))
            kv = h // group
            kv_rows = list(range(kv * hd, (kv + 1) * hd))
            if adapter.family == "gpt_neox":  # one [q k v] block of 3 × head_dim rows per head
                (qkv,) = adapter.attn_in(layer)
                block = list(range(3 * h * hd, 3 * h * hd + 3 * hd))
                q_part, kv_part = rows(qkv, block[:hd]), rows(qkv, block[hd:])
            elif fused_qkv:
                (qkv,) = adapter.attn_in(layer)
                q_size, kv_size = n_heads * hd, n_kv * hd
                kv_part = rows(qkv, [q_size + r for r in kv_rows]) + rows(
                    qkv, [q_size + kv_size + r for r in kv_rows]
                )
                q_part = rows(qkv, q_rows)
            else:
                q, k, v = adapter.attn_in(layer)
                kv_part, q_part = rows(k, kv_rows) + rows(v, kv_rows), rows(q, q_rows)
            scores.append(q_part + cols(out, q_rows) + kv_part / group)
        heads.append(torch.tensor(scores, dtype=torch.float64))
        readers = list(dict.fromkeys([*adapter.attn_in(layer), *mlp_in]))
        for c in range(hidden_size):
            hidden[c] += sum(cols(m, [c]) for m in readers)
            hidden[c] += rows(out, [c]) + rows(adapter.mlp_out(layer), [c])
            for norm in adapter.layer_norms(layer):
                hidden[c] += sum(
                    float(sal(p)[c]) for p in (norm.weight, getattr(norm, "bias", None)) if p is not None
                )
    embedding, head, final = (
        adapter.embedding(model),
        model.get_output_embeddings(),
        adapter.final_norm(model),
    )
    if embedding.weight.shape[1] == hidden_size:
        hidden += sal(embedding.weight).sum(0)
    if head.weight is not embedding.weight and head.weight.shape[1] == hidden_size:
        hidden += sal(head.weight).sum(0)
    if final is not None:
        for p in (final.weight, getattr(final, "bias", None)):
            if p is not None:
                hidden += sal(p)
    return mlp, heads, hidden


def assert_scores(scores, reference, **tolerance):
    mlp, heads, hidden = reference
    for got, want in zip(scores.mlp, mlp, strict=True):
        torch.testing.assert_close(got, want.double(), **tolerance)
    for got, want in zip(scores.heads, heads, strict=True):
        torch.testing.assert_close(got, want.double(), **tolerance)
    torch.testing.assert_close(scores.hidden, hidden.double(), **tolerance)
    assert all(s.dtype == torch.float64 for s in [*scores.mlp, *scores.heads, scores.hidden])


@pytest.mark.parametrize("name", FAMILIES)
def test_flap_is_the_standardised_fluctuation(name):
    model, stats = measured(name)
    # E[a²] − E[a]² from streamed float32 block sums against a two-pass float64 variance: Phi's large
    # biases give means far above the spread, so a few standardised scores (~1) differ by up to ~2e-4
    # (how much depends on the summation order, i.e. on the thread count)
    assert_scores(
        unit_scores(model, stats, "flap"), reference_flap(model, captured_inputs(model)), rtol=1e-3, atol=1e-3
    )


@pytest.mark.parametrize("name", FAMILIES)
def test_minitron_is_the_mean_over_windows_of_the_l2_over_tokens(name):
    model, stats = measured(name)
    reference = reference_minitron(model, captured_inputs(model))
    assert_scores(unit_scores(model, stats, "minitron"), reference, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("name", FAMILIES)
def test_taylor_is_the_summed_first_order_importance(name):
    model, stats = measured(name, taylor_tokens=WINDOWS.numel())
    assert stats.taylor_tokens == WINDOWS.numel()
    before = [(p.requires_grad, p.grad) for p in model.parameters()]
    assert_scores(unit_scores(model, stats, "taylor"), reference_taylor(model), rtol=1e-4, atol=1e-9)
    assert [(p.requires_grad, p.grad) for p in model.parameters()] == before  # the pass left no trace


def test_flap_standardises_within_each_layer_only():
    model, stats = measured("llama")
    scores = unit_scores(model, stats, "flap")
    for values in scores.mlp:  # (s − mean) / std per layer
        assert abs(float(values.mean())) < 1e-9 and abs(float(values.std()) - 1) < 1e-9
    # within a layer the order is the raw fluctuation's: the uniform layout keeps the same channels
    raw = (stats.mlp_l2sq[0] - stats.mlp_mean[0] ** 2) * get_adapter(model).mlp_out(
        get_adapter(model).layers(model)[0]
    ).weight.detach().double().pow(2).sum(0)
    assert torch.equal(torch.argsort(raw, stable=True), torch.argsort(scores.mlp[0], stable=True))


def test_new_statistics_survive_save_and_load(tmp_path):
    model, stats = measured("llama", taylor_tokens=10, depth_tokens=10)
    stats.save(tmp_path / "s.safetensors")
    loaded = ActivationStats.load(tmp_path / "s.safetensors")
    assert (loaded.taylor_tokens, loaded.depth_tokens) == (10, 10)
    for criterion in ("flap", "taylor", "minitron"):
        for got, want in zip(
            unit_scores(model, loaded, criterion).mlp, unit_scores(model, stats, criterion).mlp, strict=True
        ):
            torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(loaded.layer_loss, stats.layer_loss, rtol=0, atol=0)


def test_missing_statistics_say_what_to_rerun():
    model, stats = measured("llama")  # no gradient pass
    with pytest.raises(UserError, match=re.escape("re-run `minigpts analyze` with --taylor-tokens N")):
        unit_scores(model, stats, "taylor")
    old = copy.copy(stats)
    old.mlp_window_l2 = old.reader_mean = None  # a file from an older minigpts
    for criterion in ("minitron", "flap"):
        with pytest.raises(UserError, match=f"--criterion {criterion} needs statistics"):
            unit_scores(model, old, criterion)


@pytest.mark.parametrize("criterion", ["flap", "taylor", "minitron"])
def test_peer_criteria_plan_every_layout(criterion):
    model, stats = measured("llama", taylor_tokens=10)
    for layout in ("uniform", "per-layer"):
        plan = make_plan(
            model,
            stats,
            criterion=criterion,
            mlp_ratio=0.5,
            head_ratio=0.5,
            layout=layout,
            allocation="paper",
        )
        assert plan.criterion == criterion and sum(len(layer.mlp_keep) for layer in plan.layers) < 3 * 40


def test_run_measures_what_its_criterion_needs():
    parser = build_parser()
    common = ["--data", "d", "--out", "o", "--mlp-ratio", "0.5"]
    assert (
        analysis_options(parser.parse_args(["run", *common, "--criterion", "taylor"])).taylor_tokens == 4096
    )
    assert analysis_options(parser.parse_args(["run", *common])).taylor_tokens == 0
    asked = parser.parse_args(["run", *common, "--criterion", "taylor", "--taylor-tokens", "512"])
    assert analysis_options(asked).taylor_tokens == 512
    depth = ["--drop-layers", "2", "--layer-criterion", "loss"]
    assert analysis_options(parser.parse_args(["run", *common, *depth])).depth_tokens == 2048
    assert analysis_options(parser.parse_args(["analyze", "--data", "d", "--out", "s"])).depth_tokens == 0

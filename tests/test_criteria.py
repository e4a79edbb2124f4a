"""Unit-score criteria: each equals a direct, slow reimplementation; the registry is open to new ones."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
from conftest import make_tiny_model

from minigpts.analysis import analyze
from minigpts.arch import get_adapter
from minigpts.cli import build_parser, main
from minigpts.criteria import (
    Criterion,
    UnitScores,
    criterion_names,
    get_criterion,
    register_criterion,
    unregister_criterion,
)
from minigpts.errors import UserError
from minigpts.plan import make_plan, unit_scores  # unit_scores: still importable from plan

VOCAB = 300
# GQA and two readers; per-head norms; one reader and LayerNorm; embedding narrower than the residual
FAMILIES = ["llama", "qwen3", "phi", "opt-proj"]


def model_and_stats(name: str):
    model = make_tiny_model(name, VOCAB)
    windows = torch.randint(0, VOCAB, (4, 12), generator=torch.Generator().manual_seed(3))
    return model, analyze(model, windows, progress=False)


def column_norm(weight: torch.Tensor, j: int) -> float:
    return math.sqrt(sum(float(w) ** 2 for w in weight[:, j].detach().double()))


def reference_scores(model, stats, criterion: str, seed: int = 0):
    """(mlp, heads, hidden) computed unit by unit from the definitions, in float64."""
    adapter = get_adapter(model)
    layers = adapter.layers(model)
    hidden_size = adapter.residual_readers(layers[0])[0].in_features
    if criterion == "random":  # the draw order is part of the definition: plans must stay reproducible
        generator = torch.Generator().manual_seed(seed)
        mlp = [
            torch.rand(adapter.mlp_out(lay).in_features, generator=generator, dtype=torch.float64)
            for lay in layers
        ]
        heads = [
            torch.rand(adapter.head_layout(lay)[0], generator=generator, dtype=torch.float64)
            for lay in layers
        ]
        return mlp, heads, torch.rand(hidden_size, generator=generator, dtype=torch.float64)

    def activation(values: torch.Tensor, j: int) -> float:
        # l1: mean |a|; wanda: ‖X_j‖₂ / √N = sqrt(mean a²); weight: no activation
        return {"l1": None, "wanda": float(values[j]) ** 0.5, "weight": 1.0}[criterion]

    mlp, heads = [], []
    hidden = torch.zeros(hidden_size, dtype=torch.float64)
    readers = 0
    for i, layer in enumerate(layers):
        down, out = adapter.mlp_out(layer), adapter.attn_out(layer)
        n_heads, _, head_dim = adapter.head_layout(layer)
        if criterion == "l1":
            mlp.append(
                torch.tensor(
                    [float(stats.mlp_l1[i][j]) for j in range(down.in_features)], dtype=torch.float64
                )
            )
            per_dim = [float(stats.attn_dim_l1[i][c]) for c in range(out.in_features)]
        else:
            mlp.append(
                torch.tensor(
                    [
                        column_norm(down.weight, j) * activation(stats.mlp_l2sq[i], j)
                        for j in range(down.in_features)
                    ],
                    dtype=torch.float64,
                )
            )
            per_dim = [
                column_norm(out.weight, c) * activation(stats.attn_dim_l2sq[i], c)
                for c in range(out.in_features)
            ]
        heads.append(
            torch.tensor(
                [sum(per_dim[h * head_dim : (h + 1) * head_dim]) / head_dim for h in range(n_heads)],
                dtype=torch.float64,
            )
        )
        for r, reader in enumerate(adapter.residual_readers(layer)):
            readers += 1
            for c in range(hidden_size):
                if criterion == "l1":
                    hidden[c] += float(stats.reader_l1[i][r][c])
                else:
                    hidden[c] += column_norm(reader.weight, c) * activation(stats.reader_l2sq[i][r], c)
    if criterion == "l1":
        hidden /= readers  # the mean over every reader of every layer
    return mlp, heads, hidden


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("criterion", ["l1", "wanda", "weight", "random"])
def test_scores_match_their_definition(name, criterion):
    model, stats = model_and_stats(name)
    scores = unit_scores(model, stats, criterion, seed=7)
    mlp, heads, hidden = reference_scores(model, stats, criterion, seed=7)
    # l1 and random copy their values (means may sum in another order); weight norms of float32
    # weights differ from the float64 reference by rounding
    copied = {"rtol": 0, "atol": 0} if criterion in ("l1", "random") else {"rtol": 1e-6, "atol": 1e-12}
    averaged = {"rtol": 1e-12, "atol": 0} if criterion == "l1" else copied
    for got, want in zip(scores.mlp, mlp, strict=True):
        torch.testing.assert_close(got, want, **copied)
    for got, want in zip(scores.heads, heads, strict=True):
        torch.testing.assert_close(got, want, **averaged)
    torch.testing.assert_close(scores.hidden, hidden, **averaged)
    assert all(s.dtype == torch.float64 for s in [*scores.mlp, *scores.heads, scores.hidden])


@pytest.mark.parametrize("name", FAMILIES)
def test_layer_scores_are_the_layer_of_the_whole_models_scores(name):
    """`--sequential` re-chooses a layer's units with `layer_scores`, which reads that layer only: for every
    registered criterion it must equal layer i of `scores` (bit for bit: the same arithmetic)."""
    model = make_tiny_model(name, VOCAB).double()
    windows = torch.randint(0, VOCAB, (4, 12), generator=torch.Generator().manual_seed(3))
    stats = analyze(model, windows, progress=False, moments=True, fisher_tokens=24, taylor_tokens=24)
    for criterion in criterion_names():
        whole = unit_scores(model, stats, criterion, seed=5)
        for i in range(len(whole.mlp)):
            mlp, heads = get_criterion(criterion).layer_scores(model, stats, i, 5)
            assert torch.equal(mlp, whole.mlp[i]) and torch.equal(heads, whole.heads[i]), (criterion, i)


def test_a_criterion_without_layer_scores_sees_the_whole_model_when_sequential():
    """A criterion registered from outside that only implements `scores` may read every layer: during
    `--sequential` re-selection it is given the whole model (the layers before already pruned and refit)
    and every layer's statistics (this layer's re-measured), and its scores of that layer are used."""
    from minigpts.reconstruct import sequential_reconstruct

    seen = []

    class NextLayerDecides(Criterion):
        name = "next-layer-decides"
        help = "MLP channels ranked by the next layer's down-projection column norms (a test toy)"
        needs_stats = True

        def scores(self, model, stats, seed):
            adapter = get_adapter(model)
            layers = adapter.layers(model)
            seen.append((len(layers), len(stats.mlp_l1)))
            downs = [adapter.mlp_out(layer).weight.detach().double().norm(dim=0) for layer in layers]
            mlp = [downs[(i + 1) % len(layers)] for i in range(len(layers))]
            heads = [torch.arange(adapter.head_layout(layer)[0], dtype=torch.float64) for layer in layers]
            return UnitScores(mlp, heads, torch.zeros(adapter.hidden_size(model), dtype=torch.float64))

    register_criterion(NextLayerDecides)
    try:
        model = make_tiny_model("llama", VOCAB).double()
        windows = torch.randint(0, VOCAB, (4, 12), generator=torch.Generator().manual_seed(3))
        stats = analyze(model, windows, progress=False, moments=True)
        plan = make_plan(model, stats, criterion="next-layer-decides", mlp_ratio=0.5, round_to=1)
        seen.clear()
        sequential_reconstruct(model, plan, stats, windows, progress=False)
        n_layers = len(plan.layers)
        assert seen == [(n_layers, n_layers)] * n_layers  # once per layer, every layer visible each time
        downs = [
            get_adapter(model).mlp_out(layer).weight.detach() for layer in get_adapter(model).layers(model)
        ]
        # the last layer was re-chosen from layer 0's down projection as it stood then: refit already
        kept = set(plan.layers[-1].mlp_keep)
        order = torch.argsort(downs[0].double().norm(dim=0), descending=True, stable=True).tolist()
        assert kept == set(order[: len(kept)])
    finally:
        unregister_criterion("next-layer-decides")


# --- the registry -------------------------------------------------------------------------------------


def test_builtin_criteria_are_registered_with_help():
    assert criterion_names()[:4] == ("l1", "wanda", "weight", "random")
    for name in criterion_names():
        criterion = get_criterion(name)
        assert criterion.name == name and criterion.help and criterion.__doc__
    assert [n for n in criterion_names() if get_criterion(n).needs_stats][:2] == ["l1", "wanda"]


@pytest.mark.parametrize("criterion", ["l1", "wanda"])
def test_criteria_reading_statistics_say_where_to_get_them(criterion):
    model = make_tiny_model("llama", VOCAB)
    message = f"--criterion {criterion} needs activation statistics (--stats, from `minigpts analyze`)"
    with pytest.raises(UserError, match=re.escape(message)):
        unit_scores(model, None, criterion)
    for data_free in ("weight", "random"):
        assert len(unit_scores(model, None, data_free).mlp) == 3


def test_unknown_criterion_lists_the_registered_ones():
    with pytest.raises(UserError, match="--criterion magic: use one of l1, wanda, weight, random"):
        get_criterion("magic")


class LastUnits(Criterion):
    """A toy: prefers the units with the highest indices."""

    name = "last"
    help = "prefer the last units (a test toy)"

    def scores(self, model, stats, seed):
        adapter = get_adapter(model)
        layers = adapter.layers(model)

        def ramp(n: int) -> torch.Tensor:
            return torch.arange(n, dtype=torch.float64)

        return UnitScores(
            [ramp(adapter.mlp_out(layer).in_features) for layer in layers],
            [ramp(adapter.head_layout(layer)[0]) for layer in layers],
            ramp(adapter.hidden_size(model)),
        )


@pytest.fixture
def last_criterion():
    assert register_criterion(LastUnits) is LastUnits  # usable as a class decorator
    yield "last"
    unregister_criterion("last")
    assert "last" not in criterion_names()


def test_registering_checks_what_it_gets(last_criterion):
    register_criterion(LastUnits())  # the same class again: no conflict

    class Other(LastUnits):
        pass

    with pytest.raises(ValueError, match="'last' is already registered"):
        register_criterion(Other)
    with pytest.raises(ValueError, match="no name"):
        register_criterion(type("Nameless", (Criterion,), {}))
    with pytest.raises(TypeError, match="not a minigpts.criteria.Criterion"):
        register_criterion(object())


def test_a_registered_criterion_reaches_the_planner_and_the_parser(last_criterion):
    model = make_tiny_model("llama", VOCAB)
    plan = make_plan(model, None, criterion="last", mlp_ratio=0.5, head_ratio=0.5)
    assert plan.criterion == "last"
    assert all(layer.mlp_keep == list(range(16, 40)) for layer in plan.layers)  # 40 -> 24 (x8), the last
    assert all(layer.kv_heads_keep == [1] for layer in plan.layers)  # the last KV group: heads 3..5
    args = build_parser().parse_args(["prune", "--model", "m", "--criterion", "last"])
    assert args.criterion == "last"
    unregister_criterion("last")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["prune", "--model", "m", "--criterion", "last"])


def test_cli_prunes_with_a_criterion_registered_by_the_caller(
    tmp_path, tiny_tokenizer, tiny_llama, last_criterion, capsys
):
    model_dir, stats, out = tmp_path / "tiny", tmp_path / "stats.safetensors", tmp_path / "pruned"
    tiny_llama.save_pretrained(model_dir)
    tiny_tokenizer.save_pretrained(model_dir)
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"Prices rise, lesson {i}."}) + "\n" for i in range(30)))
    common = ["--model", model_dir, "--device", "cpu"]
    analyze_args = ["analyze", *common, "--data", corpus, "--seq-len", "16", "--calib-tokens", "64"]
    assert main([str(a) for a in [*analyze_args, "--out", stats]]) == 0, capsys.readouterr().err
    prune_args = ["prune", *common, "--stats", stats, "--criterion", "last", "--mlp-ratio", "0.5"]
    assert main([str(a) for a in [*prune_args, "--out", out]]) == 0, capsys.readouterr().err
    plan = json.loads((out / "minigpts.json").read_text())["plan"]
    assert plan["criterion"] == "last"
    width = tiny_llama.config.intermediate_size
    assert [layer["mlp_keep"] for layer in plan["layers"]] == [list(range(width // 2, width))] * 2
    assert json.loads((out / "config.json").read_text())["intermediate_size"] == width // 2

"""Planning policy: counts, legality, thresholds, criteria, target size, exact parameter accounting."""

from __future__ import annotations

import copy
from collections import Counter

import pytest
import torch
from conftest import make_tiny_model
from rich.console import Console
from transformers import LlamaForCausalLM, PhiForCausalLM

from minigpts.analysis import ActivationStats, analyze
from minigpts.arch import get_adapter
from minigpts.errors import UserError
from minigpts.evaluation import count_parameters
from minigpts.options import PlanOptions
from minigpts.plan import PruningPlan, describe_plan, make_plan, unit_scores

VOCAB = 300


def llama(n_heads=6, n_kv=2, hidden=48, intermediate=96, layers=3, tie=True) -> LlamaForCausalLM:
    return make_tiny_model(
        "llama-tied",
        VOCAB,
        perturb=0,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=n_heads,
        num_key_value_heads=n_kv,
        max_position_embeddings=64,
        tie_word_embeddings=tie,
    )


def phi() -> PhiForCausalLM:
    return make_tiny_model(
        "phi", VOCAB, perturb=0, hidden_size=32, num_hidden_layers=2, max_position_embeddings=64
    )


def synthetic_stats(model, seed: int = 0) -> ActivationStats:
    """Distinct random scores (no ties), shaped like the model; head score = its dims' common value."""
    adapter = get_adapter(model)
    generator = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.rand(*shape, generator=generator, dtype=torch.float64) + 0.01

    layers = adapter.layers(model)
    layouts = [tuple(adapter.head_layout(layer)) for layer in layers]
    mlp = [rand(adapter.mlp_out(layer).in_features) for layer in layers]
    attn = [rand(n).repeat_interleave(d) for n, _, d in layouts]
    readers = [
        rand(len(adapter.residual_readers(layer)), adapter.residual_readers(layer)[0].in_features)
        for layer in layers
    ]
    return ActivationStats(
        mlp_l1=mlp,
        mlp_l2sq=[m**2 * 1.5 for m in mlp],
        attn_dim_l1=attn,
        attn_dim_l2sq=[a**2 * 1.5 for a in attn],
        reader_l1=readers,
        reader_l2sq=[r**2 * 1.5 for r in readers],
        head_layout=layouts,
        token_counts=torch.zeros(VOCAB, dtype=torch.long),
        n_tokens=100,
        metadata={"model": "synthetic"},
    )


def top(scores: torch.Tensor, k: int) -> list[int]:
    return sorted(torch.topk(scores, k).indices.tolist())


def assert_legal_gqa(plan: PruningPlan, layouts) -> None:
    for layer, (n_heads, n_kv, _) in zip(plan.layers, layouts, strict=True):
        group = n_heads // n_kv
        per_kv = Counter(h // group for h in layer.heads_keep)
        assert sorted(per_kv) == layer.kv_heads_keep
        assert len(set(per_kv.values())) == 1  # every kept KV head keeps as many query heads
        assert len(layer.heads_keep) % len(layer.kv_heads_keep) == 0


def widths(plan: PruningPlan) -> list[tuple[int, int, int]]:
    return [(len(x.mlp_keep), len(x.heads_keep), len(x.kv_heads_keep)) for x in plan.layers]


# --- ratios -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("ratio", "kept"), [(0.0, 96), (0.25, 72), (0.5, 48), (0.7, 32), (0.99, 8)])
def test_mlp_ratio_uniform_rounds_to_multiples_of_8_and_keeps_top_scores(ratio, kept):
    model = llama()
    stats = synthetic_stats(model)
    plan = make_plan(model, stats, criterion="l1", mlp_ratio=ratio)
    for layer, scores in zip(plan.layers, stats.mlp_l1, strict=True):
        assert layer.mlp_keep == top(scores, kept)
        assert layer.heads_keep == list(range(6)) and layer.kv_heads_keep == [0, 1]
    assert plan.hidden_keep is None
    assert plan.summary["layers"][0]["mlp"] == kept


def test_round_to_one_gives_the_exact_count():
    model = llama()
    plan = make_plan(model, synthetic_stats(model), mlp_ratio=0.3, round_to=1)
    assert {len(x.mlp_keep) for x in plan.layers} == {67}  # 96 * 0.7 = 67.2


@pytest.mark.parametrize(
    ("ratio", "heads", "kv_heads"),
    [(0.0, 6, 2), (1 / 3, 4, 2), (0.5, 3, 1), (0.6, 2, None), (0.9, 1, 1)],
)
def test_head_ratio_uniform_picks_the_nearest_legal_gqa_layout(ratio, heads, kv_heads):
    model = llama()  # 6 query heads in 2 KV groups of 3: legal counts 1, 2, 3, 4, 6
    stats = synthetic_stats(model)
    plan = make_plan(model, stats, head_ratio=ratio)
    assert {w[1] for w in widths(plan)} == {heads}
    if kv_heads is not None:
        assert {w[2] for w in widths(plan)} == {kv_heads}
    assert len(set(widths(plan))) == 1
    assert_legal_gqa(plan, stats.head_layout)


def test_head_selection_follows_the_scores():
    model = llama()
    stats = synthetic_stats(model)
    for layer in range(3):  # group 1 (heads 3..5) dominates; within group 0, head 1 is best
        head = torch.tensor([0.2, 0.5, 0.1, 0.9, 0.8, 0.7], dtype=torch.float64)
        stats.attn_dim_l1[layer] = head.repeat_interleave(8)
    whole_group = make_plan(model, stats, criterion="l1", head_ratio=0.5)  # 3 heads: one whole group
    assert all(x.heads_keep == [3, 4, 5] and x.kv_heads_keep == [1] for x in whole_group.layers)
    thinned = make_plan(model, stats, criterion="l1", head_ratio=1 / 3)  # 4 heads: two per group
    assert all(x.heads_keep == [0, 1, 3, 4] and x.kv_heads_keep == [0, 1] for x in thinned.layers)


@pytest.mark.parametrize("layout", ["uniform", "per-layer"])
def test_every_ratio_gives_legal_widths(layout):
    model = llama()
    stats = synthetic_stats(model, seed=3)
    for step in range(0, 20):
        ratio = step / 20
        plan = make_plan(model, stats, mlp_ratio=ratio, head_ratio=ratio, layout=layout)
        assert_legal_gqa(plan, stats.head_layout)
        for mlp, heads, _ in widths(plan):
            assert mlp % 8 == 0 and mlp >= 8 and heads >= 1
        if layout == "uniform":
            assert len(set(widths(plan))) == 1


def test_per_layer_ranks_globally_and_keeps_minimums():
    model = llama()
    stats = synthetic_stats(model)
    stats.mlp_l1[0] = stats.mlp_l1[0] * 1e-6  # layer 0's MLP is idle in this domain
    stats.attn_dim_l1[0] = stats.attn_dim_l1[0] * 1e-6
    plan = make_plan(model, stats, criterion="l1", mlp_ratio=0.5, head_ratio=0.5, layout="per-layer")
    first, *rest = plan.layers
    assert first.mlp_keep == top(stats.mlp_l1[0], 8)  # min_mlp survives
    assert len(first.heads_keep) == 1 and len(first.kv_heads_keep) == 1
    assert all(len(x.mlp_keep) > 8 for x in rest)
    kept = sum(len(x.mlp_keep) for x in plan.layers)
    assert abs(kept - 0.5 * 3 * 96) <= 3 * 8 / 2  # one global count, each layer rounded to 8
    assert_legal_gqa(plan, stats.head_layout)
    bigger_minimum = make_plan(model, stats, criterion="l1", mlp_ratio=0.5, layout="per-layer", min_mlp=24)
    assert len(bigger_minimum.layers[0].mlp_keep) == 24


def test_hidden_ratio_is_global_and_respects_transformers_width_rules():
    model = llama()
    stats = synthetic_stats(model)
    plan = make_plan(model, stats, criterion="l1", hidden_ratio=0.25)
    # 48 * 0.75 = 36 -> multiples of 8 that LlamaConfig accepts with 6 heads (hidden % heads == 0): 48 only,
    # so 24 (|36-24| = 12 = |36-48|, tie keeps more) -> 48: nothing removed
    assert plan.hidden_keep is None
    plan = make_plan(model, stats, criterion="l1", hidden_ratio=0.5)
    assert plan.hidden_keep == top(stats.hidden_l1, 24)
    assert plan.summary["hidden_after"] == 24


# --- thresholds ---------------------------------------------------------------------------------------


def test_thresholds_remove_exactly_the_units_at_or_below_them():
    model = phi()  # multi-head attention, no width rules: every count is legal with round_to=1
    stats = synthetic_stats(model)
    e_mlp = float(stats.mlp_l1[0].median())
    e_lin = float(stats.head_l1[1].median())
    plan = make_plan(
        model, stats, activation_threshold=e_mlp, linear_threshold=e_lin, layout="per-layer", round_to=1
    )
    for i, layer in enumerate(plan.layers):
        assert layer.mlp_keep == torch.nonzero(stats.mlp_l1[i] > e_mlp).flatten().tolist()
        assert layer.heads_keep == torch.nonzero(stats.head_l1[i] > e_lin).flatten().tolist()
        assert layer.kv_heads_keep == layer.heads_keep
    assert plan.hidden_keep == torch.nonzero(stats.hidden_l1 > e_lin).flatten().tolist()


def test_uniform_threshold_uses_the_mean_count_over_layers():
    model = llama(n_heads=4, n_kv=4, hidden=32, layers=2)
    stats = synthetic_stats(model)
    stats.mlp_l1[0] = torch.linspace(0.01, 1, 96, dtype=torch.float64)
    stats.mlp_l1[1] = torch.linspace(0.31, 1.3, 96, dtype=torch.float64)
    threshold = 0.5  # layer 0 removes 48, layer 1 removes 19: mean 33.5 -> keep 62.5 -> 64
    removed = [int((s <= threshold).sum()) for s in stats.mlp_l1]
    assert removed == [48, 19]
    plan = make_plan(model, stats, activation_threshold=threshold)
    assert [len(x.mlp_keep) for x in plan.layers] == [64, 64]
    assert plan.layers[1].mlp_keep == top(stats.mlp_l1[1], 64)


def test_thresholds_that_keep_nothing_are_errors():
    model = llama()
    stats = synthetic_stats(model)
    with pytest.raises(UserError, match="--activation-threshold 1e\\+06 removes every MLP channel"):
        make_plan(model, stats, activation_threshold=1e6)
    with pytest.raises(UserError, match="--linear-threshold 1e\\+06 removes every attention head"):
        make_plan(model, stats, linear_threshold=1e6, layout="per-layer")


# --- criteria -------------------------------------------------------------------------------------------


def test_wanda_and_weight_scores_use_the_consuming_weights():
    model = llama()
    stats = synthetic_stats(model)
    adapter = get_adapter(model)
    layer = adapter.layers(model)[1]
    down = adapter.mlp_out(layer).weight.detach().double()
    o_proj = adapter.attn_out(layer).weight.detach().double()
    wanda = unit_scores(model, stats, "wanda")
    weight = unit_scores(model, stats, "weight")
    torch.testing.assert_close(wanda.mlp[1], stats.mlp_l2sq[1].sqrt() * down.norm(dim=0), rtol=1e-6, atol=0)
    torch.testing.assert_close(weight.mlp[1], down.norm(dim=0), rtol=1e-6, atol=0)
    per_dim = stats.attn_dim_l2sq[1].sqrt() * o_proj.norm(dim=0)
    torch.testing.assert_close(wanda.heads[1], per_dim.view(6, 8).mean(1), rtol=1e-6, atol=0)
    readers = [
        (i, r, m)
        for i, lay in enumerate(adapter.layers(model))
        for r, m in enumerate(adapter.residual_readers(lay))
    ]
    hidden = sum(
        stats.reader_l2sq[i][r].sqrt() * m.weight.detach().double().norm(dim=0) for i, r, m in readers
    )
    torch.testing.assert_close(wanda.hidden, hidden, rtol=1e-6, atol=0)
    plan = make_plan(model, stats, criterion="wanda", mlp_ratio=0.5)
    assert plan.layers[1].mlp_keep == top(wanda.mlp[1], 48)
    assert plan.criterion == "wanda" and plan.settings["criterion"] == "wanda"


def test_default_criterion_is_wanda_and_l1_under_the_papers_thresholds():
    """No criterion: Wanda's score for ratios and targets; the paper's l1 when a paper threshold sizes
    a group (its values are mean |a| values); an explicit criterion always wins."""
    model = llama()
    stats = synthetic_stats(model)
    wanda, l1 = unit_scores(model, stats, "wanda"), unit_scores(model, stats, "l1")
    assert top(wanda.mlp[1], 48) != top(l1.mlp[1], 48)  # the two criteria disagree here
    by_default = make_plan(model, stats, mlp_ratio=0.5)
    assert by_default.criterion == "wanda" and by_default.layers[1].mlp_keep == top(wanda.mlp[1], 48)
    threshold = float(stats.mlp_l1[1].median())
    paper = make_plan(model, stats, activation_threshold=threshold, layout="per-layer", round_to=1)
    assert paper.criterion == "l1"
    assert paper.layers[1].mlp_keep == torch.nonzero(stats.mlp_l1[1] > threshold).flatten().tolist()
    assert make_plan(model, stats, linear_threshold=1e-9, layout="per-layer").criterion == "l1"
    explicit = make_plan(model, stats, criterion="wanda", activation_threshold=0.0)
    assert explicit.criterion == "wanda"
    options = PlanOptions(mlp_ratio=0.5)
    assert options.criterion is None and options.resolved_criterion() == "wanda"
    assert PlanOptions(activation_threshold=0.1).resolved_criterion() == "l1"


def test_random_is_seeded_and_matches_the_size_of_l1():
    model = llama()
    stats = synthetic_stats(model)
    a = make_plan(model, stats, criterion="random", mlp_ratio=0.5, head_ratio=0.5, seed=1)
    b = make_plan(model, stats, criterion="random", mlp_ratio=0.5, head_ratio=0.5, seed=1)
    c = make_plan(model, stats, criterion="random", mlp_ratio=0.5, head_ratio=0.5, seed=2)
    l1 = make_plan(model, stats, mlp_ratio=0.5, head_ratio=0.5)
    assert a.layers == b.layers
    assert a.layers != c.layers
    assert a.summary["params_after"] == l1.summary["params_after"]
    assert (
        make_plan(model, None, criterion="random", mlp_ratio=0.5, seed=1).layers[0].mlp_keep
        == a.layers[0].mlp_keep
    )
    # data-free criteria need no statistics
    assert (
        make_plan(model, None, criterion="random", mlp_ratio=0.5, head_ratio=0.5, seed=1).layers == a.layers
    )
    weight = make_plan(model, None, criterion="weight", mlp_ratio=0.5, head_ratio=0.5)
    assert weight.summary["params_after"] == l1.summary["params_after"]


# --- target size -------------------------------------------------------------------------------------------


def test_target_params_lands_within_one_rounding_step():
    model = llama()
    stats = synthetic_stats(model)
    before = count_parameters(model)[0]
    step = 3 * 8 * 3 * 48  # uniform: 8 more MLP channels in each of 3 layers, 3 matrices of width 48
    for fraction in (0.95, 0.8, 0.7):
        plan = make_plan(model, stats, target_params=fraction, target_groups=("mlp",))
        assert abs(plan.summary["params_after"] - fraction * before) <= step / 2
        assert plan.summary["target"]["groups"] == ["mlp"]
        assert plan.summary["target"]["achieved"] == pytest.approx(
            plan.summary["params_after"] / before, abs=1e-6
        )
    per_layer = make_plan(model, stats, target_params=0.75, layout="per-layer")
    one_step = max(8 * 3 * 48, 2 * 8 * 48 * 2)  # one layer's MLP step, or 2 query heads (q and o) + a KV head
    assert abs(per_layer.summary["params_after"] - 0.75 * before) <= one_step
    assert per_layer.summary["target"]["groups"] == ["mlp", "heads"]
    assert_legal_gqa(per_layer, stats.head_layout)


def test_target_params_edge_cases():
    model = llama()
    stats = synthetic_stats(model)
    whole = make_plan(model, stats, target_params=1.0)
    assert whole.summary["params_after"] == whole.summary["params_before"]
    with pytest.raises(UserError, match="unreachable"):
        make_plan(model, stats, target_params=0.05)
    fixed = make_plan(model, stats, target_params=0.8, mlp_ratio=0.25)  # MLP fixed, heads solved
    assert {len(x.mlp_keep) for x in fixed.layers} == {72}
    assert fixed.summary["target"]["groups"] == ["heads"]
    with pytest.raises(UserError, match="--target-params"):
        make_plan(model, stats, target_params=0.8, mlp_ratio=0.25, head_ratio=0.5)


# --- exact accounting -----------------------------------------------------------------------------------------


def qwen2_untied_with_biases():
    return make_tiny_model(
        "qwen2",
        VOCAB,
        perturb=0,
        intermediate_size=64,
        num_hidden_layers=2,
        num_key_value_heads=3,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )


def opt_with_projections():
    return make_tiny_model(
        "opt-proj",
        VOCAB,
        perturb=0,
        hidden_size=32,
        ffn_dim=48,
        num_hidden_layers=2,
        word_embed_proj_dim=16,
        max_position_embeddings=64,
    )


@pytest.mark.parametrize(
    ("build", "settings"),
    [
        (llama, {"mlp_ratio": 0.4, "head_ratio": 0.5, "hidden_ratio": 0.5}),
        (llama, {"target_params": 0.6, "layout": "per-layer", "criterion": "wanda"}),
        (
            qwen2_untied_with_biases,
            {"mlp_ratio": 0.5, "head_ratio": 0.5, "hidden_ratio": 0.3, "layout": "per-layer"},
        ),
        (phi, {"mlp_ratio": 0.3, "hidden_ratio": 0.25, "head_ratio": 0.5}),
        (opt_with_projections, {"mlp_ratio": 0.5, "head_ratio": 0.5}),
    ],
    ids=["llama-tied", "llama-target", "qwen2-untied-bias", "phi", "opt-project-in-out"],
)
def test_summary_counts_equal_the_pruned_model(build, settings):
    from minigpts.surgery import apply_plan

    model = build()
    windows = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(0))
    stats = analyze(model, windows, progress=False)
    plan = make_plan(model, stats, **settings)
    total, non_embedding = count_parameters(model)
    assert plan.summary["params_before"] == total
    assert plan.summary["params_non_embedding_before"] == non_embedding
    pruned = apply_plan(copy.deepcopy(model), plan)
    total, non_embedding = count_parameters(pruned)
    assert plan.summary["params_after"] == total == sum(p.numel() for p in pruned.parameters())
    assert plan.summary["params_after"] < plan.summary["params_before"]
    assert plan.summary["params_non_embedding_after"] == non_embedding
    assert plan.summary["size_bytes_after"] == sum(p.numel() * p.element_size() for p in pruned.parameters())
    with torch.inference_mode():
        assert pruned(input_ids=windows).logits.shape == (2, 8, VOCAB)


# --- errors, output -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"mlp_ratio": 1.0}, "--mlp-ratio 1.0: the fraction removed must be in \\[0, 1\\)"),
        ({"head_ratio": -0.1}, "--head-ratio"),
        ({"hidden_ratio": float("nan")}, "--hidden-ratio"),
        (
            {"target_params": 0.0},
            "--target-params 0.0: the fraction of parameters to keep must be in \\(0, 1\\]",
        ),
        ({"target_params": 1.5}, "--target-params"),
        ({"mlp_ratio": 0.5, "activation_threshold": 0.1}, "give one of them"),
        ({"head_ratio": 0.5, "linear_threshold": 0.1}, "give one of them"),
        ({"layout": "ragged", "mlp_ratio": 0.5}, "--layout ragged"),
        ({"criterion": "magic", "mlp_ratio": 0.5}, "--criterion magic"),
        ({"min_mlp": 0, "mlp_ratio": 0.5}, "--min-mlp"),
        ({"round_to": 0, "mlp_ratio": 0.5}, "--round-to"),
        ({"target_params": 0.5, "target_groups": ("experts",)}, "target groups"),
    ],
)
def test_bad_settings_are_user_errors(settings, message):
    model = llama()
    with pytest.raises(UserError, match=message):
        make_plan(model, synthetic_stats(model), **settings)


def test_stats_must_fit_the_model_and_exist_for_data_criteria():
    model = llama()
    with pytest.raises(UserError, match="measured on synthetic"):
        make_plan(model, synthetic_stats(llama(intermediate=64)), mlp_ratio=0.5)
    with pytest.raises(UserError, match="--criterion wanda needs activation statistics"):
        make_plan(model, None, mlp_ratio=0.5)  # the default criterion
    with pytest.raises(UserError, match="--criterion l1 needs activation statistics"):
        make_plan(model, None, criterion="l1", mlp_ratio=0.5)


def test_family_limits_are_errors_when_asked_and_notes_otherwise():
    model = opt_with_projections()  # OPT cannot lose hidden channels
    stats = synthetic_stats(model)
    with pytest.raises(UserError, match="--hidden-ratio: opt cannot lose hidden channels"):
        make_plan(model, stats, hidden_ratio=0.5)
    plan = make_plan(model, stats, linear_threshold=float(stats.head_l1[0].min()))
    assert plan.hidden_keep is None
    assert any("hidden not pruned" in note for note in plan.summary["notes"])


def test_plan_roundtrip_and_dry_run_table(tmp_path):
    model = llama()
    plan = make_plan(model, synthetic_stats(model), mlp_ratio=0.5, head_ratio=0.5, layout="per-layer")
    path = tmp_path / "plan.json"
    plan.save(path)
    assert PruningPlan.load(path).to_dict() == plan.to_dict()
    assert plan.settings["mlp_ratio"] == 0.5 and plan.settings["layout"] == "per-layer"
    console = Console(record=True, width=120)
    console.print(describe_plan(plan))
    text = console.export_text()
    assert f"{len(plan.layers[0].mlp_keep)} / 96" in text
    assert "parameters:" in text and "expected size (float32)" in text
    uniform = make_plan(model, synthetic_stats(model), mlp_ratio=0.5)
    console = Console(record=True, width=120)
    console.print(describe_plan(uniform))
    assert "0-2" in console.export_text()  # identical layers share a row


@pytest.mark.slow
def test_smollm2_target_plan_is_legal_and_counted_exactly():
    from minigpts.models import load_model
    from minigpts.surgery import apply_plan

    model = load_model("smollm2-135m", device="cpu").model
    windows = torch.randint(0, 49152, (1, 64), generator=torch.Generator().manual_seed(0))
    stats = analyze(model, windows, progress=False)
    assert stats.head_layout == [(9, 3, 64)] * 30
    assert all(torch.isfinite(s).all() and (s > 0).all() for s in stats.mlp_l1)
    plan = make_plan(model, stats, target_params=0.7)
    assert abs(plan.summary["relative_size"] - 0.7) < 0.01
    assert len(set(widths(plan))) == 1 and widths(plan)[0][0] % 8 == 0
    assert_legal_gqa(plan, stats.head_layout)
    pruned = apply_plan(model, plan)
    assert plan.summary["params_after"] == sum(p.numel() for p in pruned.parameters())

"""Saving and loading pruned models: uniform loads with plain from_pretrained, per-layer with remote code."""

from __future__ import annotations

import json

import pytest
import torch
from test_surgery import INPUT, build, logits, random_plan
from transformers import AutoModelForCausalLM

from minigpts.errors import UserError
from minigpts.export import MODELING_FILE, load, save_model
from minigpts.plan import PruningPlan
from minigpts.surgery import apply_plan


def prune(name: str, *, vary: bool, hidden: bool = False, all_heads: bool = False):
    model = build(name)
    plan = random_plan(model, 0, hidden=hidden, depth=True, vary=vary)
    if all_heads:
        n_heads = model.config.num_attention_heads
        for layer_plan in plan.layers:
            layer_plan.heads_keep = layer_plan.kv_heads_keep = list(range(n_heads))
    if vary:
        plan.layers[plan.layers_keep[0]].mlp_keep = [0, 1]  # widths certainly differ between layers
    plan.layout = "per-layer" if vary else "uniform"
    return apply_plan(model, plan), plan


def same_generation(a, b) -> bool:
    prompt = INPUT[:1, :4]
    return torch.equal(
        a.generate(prompt, max_new_tokens=6, do_sample=False),
        b.generate(prompt, max_new_tokens=6, do_sample=False),
    )


@pytest.mark.parametrize(
    "name, hidden", [("llama-tied", True), ("llama", True), ("phi", True), ("opt", False)]
)
def test_uniform_layout_loads_with_plain_from_pretrained(tmp_path, name, hidden):
    # OPT's own attention cannot be narrower than hidden_size: plain loading needs every head kept
    model, plan = prune(name, vary=False, hidden=hidden, all_heads=name == "opt")
    out = save_model(model, None, tmp_path / "m", plan=plan)
    config = json.loads((out / "config.json").read_text())
    assert "auto_map" not in config and "per_layer_config" not in config
    assert not (out / MODELING_FILE).exists()
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()  # no trust_remote_code
    assert torch.equal(logits(reloaded, INPUT), logits(model, INPUT))
    assert same_generation(reloaded, model)
    if name == "llama-tied":
        assert reloaded.lm_head.weight is reloaded.model.embed_tokens.weight


@pytest.mark.parametrize("name", ["llama", "mistral", "qwen2", "phi", "opt-proj"])
def test_per_layer_layout_loads_with_remote_code_and_minigpts_load(tmp_path, name):
    model, plan = prune(name, vary=True, hidden=name in ("llama", "qwen2"))
    assert model.config.is_heterogeneous
    out = save_model(model, None, tmp_path / name, plan=plan)
    config = json.loads((out / "config.json").read_text())
    assert config["per_layer_config"] and config["auto_map"]["AutoModelForCausalLM"].startswith(
        "modeling_minigpts."
    )
    source = (out / MODELING_FILE).read_text()
    assert "minigpts" not in [
        line.split()[1] for line in source.splitlines() if line.startswith(("import", "from"))
    ]
    remote = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    loaded, tokenizer = load(out)
    assert tokenizer is None
    for reloaded in (remote, loaded):
        assert torch.equal(logits(reloaded, INPUT), logits(model, INPUT))
        assert {k: v.shape for k, v in reloaded.state_dict().items()} == {
            k: v.shape for k, v in model.state_dict().items()
        }
    assert same_generation(loaded, model)
    eager = AutoModelForCausalLM.from_pretrained(
        out, trust_remote_code=True, attn_implementation="eager"
    ).eval()
    assert torch.allclose(logits(eager, INPUT), logits(model, INPUT), atol=1e-5)


def test_opt_with_pruned_heads_is_saved_with_remote_code_even_when_uniform(tmp_path):
    model = build("opt")
    plan = random_plan(model, 0, hidden=False, depth=False, vary=False)
    for layer_plan in plan.layers:
        layer_plan.heads_keep = layer_plan.kv_heads_keep = [1, 2]
    apply_plan(model, plan)
    assert not model.config.is_heterogeneous
    out = save_model(model, None, tmp_path / "opt", plan=plan)
    assert (out / MODELING_FILE).exists()
    loaded, _ = load(out)
    assert torch.equal(logits(loaded, INPUT), logits(model, INPUT))
    assert same_generation(loaded, model)


def test_tokenizer_metadata_and_model_card(tmp_path, tiny_tokenizer):
    model, plan = prune("llama-tied", vary=True)
    metrics = {"base": {"bits_per_byte": 1.234567, "perplexity": 9.5}, "pruned": {"bits_per_byte": 1.3}}
    out = save_model(
        model,
        tiny_tokenizer,
        tmp_path / "m",
        plan=plan,
        metadata={"metrics": metrics, "params_before": 123456},
    )
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "README.md"} <= {
        p.name for p in out.iterdir()
    }
    info = json.loads((out / "minigpts.json").read_text())
    assert PruningPlan.from_dict(info["plan"]) == plan
    assert info["layout"] == "per-layer" and info["trust_remote_code"]
    assert info["parameters"] == sum(p.numel() for p in model.parameters())
    assert info["metadata"]["metrics"] == metrics
    card = (out / "README.md").read_text()
    assert "| bits_per_byte | 1.235 | 1.3 |" in card
    assert "| perplexity | 9.5 |  |" in card
    assert "123,456" in card and "trust_remote_code=True" in card
    _, tokenizer = load(out)
    text = "Supply and demand"
    assert tokenizer(text)["input_ids"] == tiny_tokenizer(text)["input_ids"]


def test_refuses_non_empty_dir_without_force_and_replaces_with_force(tmp_path):
    model, plan = prune("phi", vary=False)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    with pytest.raises(UserError, match="--force"):
        save_model(model, None, out, plan=plan)
    assert (out / "keep.txt").read_text() == "user data"
    save_model(model, None, out, plan=plan, force=True)
    assert not (out / "keep.txt").exists() and (out / "config.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging or old copies left behind
    empty = tmp_path / "empty"
    empty.mkdir()
    save_model(model, None, empty)  # an empty directory is fine without --force


def test_load_rejects_a_directory_without_a_model(tmp_path):
    with pytest.raises(UserError, match="config.json"):
        load(tmp_path)


@pytest.mark.slow
def test_smollm2_pruned_uniformly_matches_zeroing_and_reloads_plainly(tmp_path, smollm2):
    import copy
    import random

    from test_surgery import zero_removed

    from minigpts.plan import LayerPlan

    model, tokenizer = smollm2.model, smollm2.tokenizer
    config = model.config
    rng = random.Random(0)
    heads = [h for h in range(config.num_attention_heads) if h % 3 < 2]  # 2 of 3 query heads per KV head
    layer = LayerPlan(sorted(rng.sample(range(config.intermediate_size), 768)), heads, [0, 1, 2])
    hidden_keep = sorted(rng.sample(range(config.hidden_size), 504))  # a multiple of the 6 kept heads
    plan = PruningPlan("llama", [layer] * config.num_hidden_layers, hidden_keep=hidden_keep)
    input_ids = tokenizer("Supply and demand determine the price of goods.", return_tensors="pt").input_ids
    pruned = apply_plan(copy.deepcopy(model), plan)
    expected = logits(zero_removed(model, plan), input_ids)
    # 30 layers of float32 sums in a different order: rounding, not the 1e-5 of the tiny models
    assert (logits(pruned, input_ids) - expected).abs().max() < 1e-3
    out = save_model(pruned, tokenizer, tmp_path / "smol", plan=plan)
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert torch.equal(logits(reloaded, input_ids), logits(pruned, input_ids))
    assert (out / "model.safetensors").stat().st_size < 0.6 * 4 * sum(p.numel() for p in model.parameters())

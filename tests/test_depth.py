"""Depth pruning: layer scores equal direct computations, identity layers go first and change nothing,
depth combines with widths and --target-params, and the result reloads with plain transformers."""

from __future__ import annotations

import copy
import json
import re

import pytest
import torch
from conftest import make_tiny_model
from transformers import AutoModelForCausalLM

from minigpts.analysis import analyze
from minigpts.arch import get_adapter
from minigpts.cli import main
from minigpts.depth import drop_count
from minigpts.errors import UserError
from minigpts.export import save_model
from minigpts.plan import describe_plan, make_plan
from minigpts.surgery import apply_plan

VOCAB = 300
WINDOWS = torch.randint(0, VOCAB, (3, 10), generator=torch.Generator().manual_seed(11))


def stats_of(model, **passes):
    return analyze(model, WINDOWS, batch_size=2, progress=False, **passes)


def mean_loss(model) -> float:
    with torch.no_grad():
        return float(model(input_ids=WINDOWS, labels=WINDOWS, use_cache=False).loss)


def logits(model, ids=WINDOWS) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def make_identity(model, index: int) -> None:
    """A block whose output projections write nothing passes the residual stream through unchanged."""
    adapter = get_adapter(model)
    layer = adapter.layers(model)[index]
    with torch.no_grad():
        for writer in (adapter.attn_out(layer), adapter.mlp_out(layer)):
            writer.weight.zero_()
            if writer.bias is not None:
                writer.bias.zero_()


@pytest.mark.parametrize("name", ["llama", "phi", "opt-proj", "gemma2", "gpt2"])
def test_block_influence_is_one_minus_the_mean_cosine(name):
    model = make_tiny_model(name, VOCAB)
    adapter = get_adapter(model)
    pairs: dict[int, list] = {}
    handles = []
    for i, layer in enumerate(adapter.layers(model)):

        def hook(module, args, kwargs, output, i=i):
            h_in = args[0] if args else kwargs["hidden_states"]
            h_out = output[0] if isinstance(output, tuple) else output
            pairs.setdefault(i, []).append((h_in.detach().double(), h_out.detach().double()))

        handles.append(layer.register_forward_hook(hook, with_kwargs=True))
    with torch.no_grad():
        for window in WINDOWS:
            adapter.body(model)(input_ids=window[None], use_cache=False)
    for handle in handles:
        handle.remove()
    expected = []
    for i in sorted(pairs):
        cosines = [
            float(a @ b) / (float(a.norm()) * float(b.norm()))
            for h_in, h_out in pairs[i]
            for a, b in zip(h_in.reshape(-1, h_in.shape[-1]), h_out.reshape(-1, h_out.shape[-1]), strict=True)
        ]
        expected.append(1 - sum(cosines) / len(cosines))
    torch.testing.assert_close(
        stats_of(model).layer_bi, torch.tensor(expected, dtype=torch.float64), rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize("name", ["llama", "phi", "qwen2", "gpt2"])
def test_removal_loss_is_the_loss_of_the_model_without_the_layer(name):
    model = make_tiny_model(name, VOCAB)
    stats = stats_of(model, depth_tokens=WINDOWS.numel())
    assert stats.depth_tokens == WINDOWS.numel()
    base = mean_loss(model)
    n_layers = len(get_adapter(model).layers(model))
    for i in range(n_layers):  # surgery really removes the layer: independent of the hook that skips it
        plan = make_plan(model, None, criterion="weight")
        plan.layers_keep = [j for j in range(n_layers) if j != i]
        without = mean_loss(apply_plan(copy.deepcopy(model), plan))
        assert float(stats.layer_loss[i]) == pytest.approx(without - base, abs=2e-6)


@pytest.mark.parametrize("name", ["llama", "phi", "opt"])
def test_an_identity_layer_goes_first_and_changes_nothing(name):
    model = make_tiny_model(name, VOCAB)
    make_identity(model, 1)
    stats = stats_of(model, depth_tokens=10)
    assert float(stats.layer_loss[1]) == 0.0  # skipping it changes nothing at all
    assert abs(float(stats.layer_bi[1])) < 1e-6 and int(torch.argmin(stats.layer_bi)) == 1
    plan = make_plan(model, stats, drop_layers=1, layer_criterion="bi")
    assert plan.layers_keep == [0, 2] and plan.summary["depth"]["dropped"] == [1]
    pruned = apply_plan(copy.deepcopy(model), plan)
    assert pruned.config.num_hidden_layers == 2
    torch.testing.assert_close(logits(pruned), logits(model), atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["llama", "phi"])
def test_the_loss_criterion_drops_the_cheapest_layer(name):
    model = make_tiny_model(name, VOCAB)
    stats = stats_of(model, depth_tokens=WINDOWS.numel())
    plan = make_plan(model, stats, drop_layers=1, layer_criterion="loss")
    cheapest = int(torch.argmin(stats.layer_loss))  # random tiny models: removing a layer may even help
    assert plan.summary["depth"]["dropped"] == [cheapest]
    pruned = apply_plan(copy.deepcopy(model), plan)
    assert mean_loss(pruned) == pytest.approx(mean_loss(model) + float(stats.layer_loss[cheapest]), abs=2e-6)


@pytest.mark.parametrize("name", ["llama", "qwen3", "phi", "opt-proj"])
def test_depth_with_widths_counts_parameters_exactly(name):
    model = make_tiny_model(name, VOCAB)
    stats = stats_of(model, moments=True, fisher_tokens=10)
    for settings in (
        dict(mlp_ratio=0.5),
        dict(mlp_ratio=0.3, layout="per-layer", allocation="paper"),
        dict(mlp_ratio=0.3, layout="per-layer"),  # the error allocation over the kept layers
        dict(target_params=0.5),
        dict(target_params=0.55, layout="per-layer", allocation="paper"),
    ):
        plan = make_plan(model, stats, drop_layers=1, **settings)
        pruned = apply_plan(copy.deepcopy(model), plan)
        params = sum(p.numel() for p in pruned.parameters())
        assert plan.summary["params_after"] == params, settings
        full = sum(p.numel() for p in model.parameters())
        assert plan.summary["params_before"] == full
        assert plan.summary["relative_size"] == pytest.approx(params / full, abs=1e-6)
        assert len(plan.layers) == 3 and len(plan.layers_keep) == 2
        assert [entry["layer"] for entry in plan.summary["layers"]] == plan.layers_keep
        if "target_params" in settings:
            target = plan.summary["target"]
            assert target["target_params"] == settings["target_params"] and target["groups"][0] == "layers"
            assert target["achieved"] == pytest.approx(settings["target_params"], abs=0.06)
    assert len(get_adapter(model).layers(model)) == 3  # planning left the model whole


def test_dropped_layers_alone_may_reach_the_target():
    model = make_tiny_model("llama", VOCAB)
    plan = make_plan(model, stats_of(model), drop_layers=2, target_params=0.9)
    assert all(len(layer.mlp_keep) == 40 for layer in plan.layers)
    assert any("dropped layers alone reach --target-params 0.9" in note for note in plan.summary["notes"])
    assert plan.settings["target_params"] == 0.9 and plan.settings["drop_layers"] == 2


def test_layer_ratio_and_the_dry_run_view():
    model = make_tiny_model("llama", VOCAB, num_hidden_layers=4)
    stats = stats_of(model)
    plan = make_plan(model, stats, layer_ratio=0.5, mlp_ratio=0.5)
    assert len(plan.layers_keep) == 2 and plan.settings["layer_ratio"] == 0.5
    from rich.console import Console

    console = Console(width=200, record=True)
    console.print(describe_plan(plan))
    text = console.export_text()
    assert "decoder layers: 2 / 4 (dropped" in text
    for index in plan.layers_keep:
        assert re.search(rf"│\s+{index} │", text)
    assert make_plan(model, stats, layer_ratio=0.1).layers_keep is None  # rounds to no layer


def test_depth_requests_are_checked():
    with pytest.raises(UserError, match="give one of them"):
        drop_count(4, 1, 0.5)
    with pytest.raises(UserError, match=re.escape("--drop-layers 4: must be a whole number from 0 to 3")):
        drop_count(4, 4, None)
    with pytest.raises(UserError, match=re.escape("--layer-ratio 1.0")):
        drop_count(4, None, 1.0)
    model = make_tiny_model("llama", VOCAB)
    stats = stats_of(model)
    with pytest.raises(UserError, match=re.escape("--depth-tokens N")):
        make_plan(model, stats, drop_layers=1, layer_criterion="loss")
    stats.layer_bi = None  # a file from an older minigpts
    with pytest.raises(UserError, match="re-run `minigpts analyze`"):
        make_plan(model, stats, drop_layers=1)
    with pytest.raises(UserError, match="--layer-criterion magic: use one of bi, loss"):
        make_plan(model, stats_of(model), drop_layers=1, layer_criterion="magic")


@pytest.mark.parametrize("name", ["llama", "qwen2"])
def test_a_depth_and_width_plan_reloads_and_caches_correctly(name, tiny_tokenizer, tmp_path):
    model = make_tiny_model(name, len(tiny_tokenizer))
    ids = torch.randint(0, len(tiny_tokenizer), (3, 10), generator=torch.Generator().manual_seed(2))
    stats = analyze(model, ids, progress=False)
    plan = make_plan(model, stats, drop_layers=1, mlp_ratio=0.5, head_ratio=0.34)
    pruned = apply_plan(copy.deepcopy(model), plan)
    attentions = [get_adapter(pruned).attention(layer) for layer in get_adapter(pruned).layers(pruned)]
    assert [a.layer_idx for a in attentions] == [0, 1]
    out = save_model(pruned, tiny_tokenizer, tmp_path / "m", plan=plan)
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == 2 and "auto_map" not in config
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()  # plain transformers, no remote code
    torch.testing.assert_close(logits(reloaded, ids), logits(pruned, ids), atol=1e-5, rtol=0)
    prompt = ids[:1, :5]
    kwargs = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0)
    cached = reloaded.generate(prompt, use_cache=True, **kwargs)
    assert torch.equal(cached, reloaded.generate(prompt, use_cache=False, **kwargs))


def test_cli_drops_layers_by_loss(tmp_path, tiny_tokenizer, capsys):
    model = make_tiny_model("llama", len(tiny_tokenizer))
    model_dir, stats, out = tmp_path / "tiny", tmp_path / "stats.safetensors", tmp_path / "pruned"
    model.save_pretrained(model_dir)
    tiny_tokenizer.save_pretrained(model_dir)
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"Prices rise, lesson {i}."}) + "\n" for i in range(30)))
    common = ["--model", model_dir, "--device", "cpu"]
    analyze_args = ["analyze", *common, "--data", corpus, "--seq-len", "16", "--calib-tokens", "64"]
    assert main([str(a) for a in [*analyze_args, "--out", stats]]) == 0, capsys.readouterr().err
    prune = [
        "prune",
        *common,
        "--stats",
        stats,
        "--drop-layers",
        "1",
        "--layer-criterion",
        "loss",
        "--out",
        out,
    ]
    assert main([str(a) for a in prune]) == 2  # a UserError
    assert "--depth-tokens N" in capsys.readouterr().err
    assert main([str(a) for a in [*analyze_args, "--depth-tokens", "32", "--force", "--out", stats]]) == 0
    assert main([str(a) for a in [*prune, "--mlp-ratio", "0.5"]]) == 0, capsys.readouterr().err
    plan = json.loads((out / "minigpts.json").read_text())["plan"]
    assert len(plan["layers_keep"]) == 2 and plan["settings"]["layer_criterion"] == "loss"
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == 2 and config["intermediate_size"] == 24  # 40 * 0.5, to 8s

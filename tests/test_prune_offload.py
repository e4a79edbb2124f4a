"""`prune --offload` (surgery_offload) writes exactly the model the in-memory `prune` writes, one layer at a time."""

from __future__ import annotations

import contextlib
import json

import pytest
import torch
from conftest import make_tiny_model

from minigpts import analysis_offload
from minigpts.cli import main

FAMILIES = (
    "llama", "qwen2", "gemma3_text", "opt-proj", "gpt2", "gpt_neox", "phi", "phi3",
    "stablelm-parallel-qk-norm",
)  # fmt: skip
CPU = ("--device", "cpu", "--dtype", "float32")
UNIFORM = ("--mlp-ratio", "0.5", "--head-ratio", "0.34")
PER_LAYER = ("--layout", "per-layer", "--allocation", "paper", "--mlp-ratio", "0.5", "--head-ratio", "0.5")
VOCAB = ("--vocab-min-count", "1")


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "corpus.jsonl"
    docs = [f"Supply and demand, lesson {i}: prices move with scarcity and cost." for i in range(40)]
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return path


_DIRS: dict[str, tuple] = {}


def model_and_stats(name: str, tmp_path_factory, tokenizer, corpus_file, **overrides) -> tuple:
    """A tiny model directory of family ``name`` (config ``overrides``) and its statistics (second
    moments included), made once."""
    key = name + "".join(f"-{field}={value}" for field, value in sorted(overrides.items()))
    if key not in _DIRS:
        base = tmp_path_factory.mktemp(name)
        make_tiny_model(name, len(tokenizer), **overrides).save_pretrained(base / "model")
        tokenizer.save_pretrained(base / "model")
        stats = base / "stats.safetensors"
        args = ["analyze", "--model", base / "model", "--data", corpus_file, "--out", stats]
        assert (
            main(
                [
                    str(a)
                    for a in [*args, "--seq-len", "16", "--calib-tokens", "128", "--fisher-tokens", "0", *CPU]
                ]
            )
            == 0
        )
        _DIRS[key] = base / "model", stats
    return _DIRS[key]


def read_tensors(directory) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(directory.glob("*.safetensors"))
    return {key: value for file in files for key, value in load_file(file).items()}


def assert_same_output(expected, actual) -> None:
    """The same tensors (bit for bit), config.json and minigpts.json."""
    want, got = read_tensors(expected), read_tensors(actual)
    assert sorted(want) == sorted(got)
    for key, tensor in want.items():
        assert tensor.dtype == got[key].dtype and torch.equal(tensor, got[key]), key
    for name in ("config.json", "minigpts.json", "README.md", "tokenizer.json"):
        assert (expected / name).read_text() == (actual / name).read_text(), name
    assert (expected / "modeling_minigpts.py").exists() == (actual / "modeling_minigpts.py").exists()


def prune_both(capsys, tmp_path, model_dir, stats, *plan):
    """The in-memory and the offloaded `prune` of the same plan: (in-memory dir, offloaded dir)."""
    outs = tmp_path / "memory", tmp_path / "offload"
    for out, extra in zip(outs, ((), ("--offload",)), strict=True):
        code, _, err = run_cli(
            capsys, "prune", "--model", model_dir, "--stats", stats, *plan, "--out", out, *CPU, *extra
        )
        assert code == 0, err
    return outs


@pytest.mark.parametrize("name", FAMILIES)
def test_uniform_plan_with_vocabulary_cut_equals_in_memory_for_every_family(
    capsys, tmp_path, tmp_path_factory, tiny_tokenizer, corpus_file, name
):
    model_dir, stats = model_and_stats(name, tmp_path_factory, tiny_tokenizer, corpus_file)
    data = ("--data", corpus_file)
    memory, offload = prune_both(capsys, tmp_path, model_dir, stats, *UNIFORM, *VOCAB, *data)
    assert_same_output(memory, offload)
    info = json.loads((offload / "minigpts.json").read_text())
    assert info["plan"]["settings"]["reconstruct"] == "lstsq" and info["plan"]["vocab_keep"]


@pytest.mark.parametrize("reconstruct", ["lstsq", "none"])
def test_per_layer_plan_equals_in_memory_and_reloads(
    capsys, tmp_path, tmp_path_factory, tiny_tokenizer, corpus_file, reconstruct
):
    from transformers import AutoModelForCausalLM

    model_dir, stats = model_and_stats("llama", tmp_path_factory, tiny_tokenizer, corpus_file)
    plan = (*PER_LAYER, "--reconstruct", reconstruct)
    memory, offload = prune_both(capsys, tmp_path, model_dir, stats, *plan)
    assert_same_output(memory, offload)
    assert json.loads((offload / "minigpts.json").read_text())["layout"] == "per-layer"
    ids = torch.randint(0, len(tiny_tokenizer), (2, 12), generator=torch.Generator().manual_seed(0))
    logits = [
        AutoModelForCausalLM.from_pretrained(d, trust_remote_code=True).eval()(ids).logits
        for d in (memory, offload)
    ]
    assert torch.equal(*logits)


WEIGHT_PLANS = {
    "wanda-error": (
        "--criterion",
        "wanda",
        "--layout",
        "per-layer",
        "--mlp-ratio",
        "0.5",
        "--head-ratio",
        "0.5",
    ),
    "flap-target": ("--criterion", "flap", "--target-params", "0.8"),
    "refit": ("--criterion", "refit", "--mlp-ratio", "0.5"),
    "weight": ("--criterion", "weight", "--mlp-ratio", "0.25", "--head-ratio", "0.34"),
}


@pytest.mark.parametrize("plan", list(WEIGHT_PLANS))
def test_plans_that_read_weights_equal_in_memory_one_layer_at_a_time(
    capsys, tmp_path, tmp_path_factory, tiny_tokenizer, corpus_file, monkeypatch, plan
):
    """Criteria reading weights and the error allocation plan on the skeleton, reading one decoder
    layer at a time from the checkpoint (never two at once), and give the in-memory plan's model."""
    from minigpts import surgery_offload

    model_dir, stats = model_and_stats("llama", tmp_path_factory, tiny_tokenizer, corpus_file)
    read, held, most = surgery_offload._layer_read, [], [0]

    @contextlib.contextmanager
    def counted(onloader, layer):
        with read(onloader, layer):
            held.append(layer)
            most[0] = max(most[0], len(held))
            yield layer
            held.remove(layer)
        assert all(p.is_meta for p in layer.parameters())  # freed again

    monkeypatch.setattr(surgery_offload, "_layer_read", counted)
    memory, offload = prune_both(capsys, tmp_path, model_dir, stats, *WEIGHT_PLANS[plan])
    assert_same_output(memory, offload)
    assert most[0] == 1


def test_sharded_output_reloads_identically(capsys, tmp_path, tmp_path_factory, tiny_tokenizer, corpus_file):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from minigpts.options import PlanOptions
    from minigpts.surgery_offload import load_stats, plan_offloaded, prune_offloaded

    model_dir, stats_file = model_and_stats("llama", tmp_path_factory, tiny_tokenizer, corpus_file)
    memory = tmp_path / "memory"
    code, _, err = run_cli(
        capsys, "prune", "--model", model_dir, "--stats", stats_file, *UNIFORM, "--out", memory, *CPU
    )
    assert code == 0, err
    stats, tokenizer = load_stats(stats_file), AutoTokenizer.from_pretrained(model_dir)
    plan = plan_offloaded(model_dir, tokenizer, stats, PlanOptions(mlp_ratio=0.5, head_ratio=0.34))
    expected = json.loads((memory / "minigpts.json").read_text())
    expected_plan, metadata = expected["plan"], expected["metadata"]
    assert [layer.mlp_keep for layer in plan.layers] == [
        layer["mlp_keep"] for layer in expected_plan["layers"]
    ]
    out = prune_offloaded(
        model_dir,
        plan,
        stats,
        tmp_path / "sharded",
        tokenizer=tokenizer,
        metadata=metadata,
        max_shard_bytes=6000,
        progress=False,
    )
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 3 and not (out / "model.safetensors").exists()
    assert set(index["weight_map"]) == set(read_tensors(memory))
    assert_same_output(memory, out)
    ids = torch.randint(0, len(tiny_tokenizer), (2, 12), generator=torch.Generator().manual_seed(1))
    logits = [AutoModelForCausalLM.from_pretrained(d).eval()(ids).logits for d in (memory, out)]
    assert torch.equal(*logits)


def test_second_moments_stay_in_the_file_until_a_layer_asks(tmp_path_factory, tiny_tokenizer, corpus_file):
    from minigpts.analysis import ActivationStats
    from minigpts.surgery_offload import load_stats

    _, stats_file = model_and_stats("llama", tmp_path_factory, tiny_tokenizer, corpus_file)
    lazy, whole = load_stats(stats_file), ActivationStats.load(stats_file)
    assert not isinstance(lazy.mlp_gram, list) and lazy.has_moments
    for i in range(whole.n_layers):
        assert torch.equal(lazy.mlp_gram[i], whole.mlp_gram[i]) and torch.equal(
            lazy.attn_gram[i], whole.attn_gram[i]
        )
        assert torch.equal(lazy.mlp_mean[i], whole.mlp_mean[i]) and torch.equal(
            lazy.mlp_l1[i], whole.mlp_l1[i]
        )


@pytest.mark.parametrize(
    "plan, flag",
    [
        (("--hidden-ratio", "0.25"), "--hidden-ratio"),
        (("--drop-layers", "1"), "--drop-layers"),
        (("--mlp-ratio", "0.5", "--allow-pickle"), "--allow-pickle"),
    ],
)
def test_refused_combinations_are_one_line_and_exit_2(
    capsys, tmp_path, tmp_path_factory, tiny_tokenizer, corpus_file, plan, flag
):
    model_dir, stats = model_and_stats("llama", tmp_path_factory, tiny_tokenizer, corpus_file)
    args = (
        "prune",
        "--model",
        model_dir,
        "--stats",
        stats,
        *plan,
        "--offload",
        "--out",
        tmp_path / "out",
        *CPU,
    )
    code, _, err = run_cli(capsys, *args)
    assert code == 2 and err.count("\n") == 1 and flag in err and "--offload" in err, err
    assert not (tmp_path / "out").exists()


SEQUENTIAL = ("--sequential", "--data")
SEQUENTIAL_PLANS = {
    "uniform": UNIFORM,
    "per-layer": PER_LAYER,
    "refit": ("--criterion", "refit", "--mlp-ratio", "0.5"),
}
LOUD = {"initializer_range": 0.3}  # layers that change the residual stream: --sequential re-chooses units


@pytest.mark.parametrize("plan", list(SEQUENTIAL_PLANS))
def test_sequential_equals_in_memory_one_layer_at_a_time(
    capsys, tmp_path, tmp_path_factory, tiny_tokenizer, corpus_file, monkeypatch, plan
):
    """`prune --sequential` streamed: each layer re-measured on the pruned layers' outputs, its units
    re-chosen and refit while it alone is real; the in-memory model and plan, bit for bit."""
    from transformers import AutoTokenizer

    from minigpts import reconstruct
    from minigpts.cli import build_parser, from_args, load_data, sequential_windows
    from minigpts.options import PlanOptions
    from minigpts.surgery_offload import load_stats, plan_offloaded, prune_offloaded

    model_dir, stats_file = model_and_stats("llama", tmp_path_factory, tiny_tokenizer, corpus_file, **LOUD)
    memory = tmp_path / "memory"
    argv = ("prune", "--model", model_dir, "--stats", stats_file, *SEQUENTIAL_PLANS[plan], *SEQUENTIAL)
    code, _, err = run_cli(capsys, *argv, corpus_file, "--out", memory, *CPU)
    assert code == 0, err
    args = build_parser().parse_args([str(a) for a in (*argv, corpus_file)])
    stats, tokenizer = load_stats(stats_file), AutoTokenizer.from_pretrained(model_dir)
    plan = plan_offloaded(model_dir, tokenizer, stats, from_args(PlanOptions, args))
    one_shot = [(layer.mlp_keep, layer.heads_keep) for layer in plan.layers]
    calibration = sequential_windows(tokenizer, load_data(args), stats)
    step, real = reconstruct.sequential_layer, []

    def one_layer_real(model, *rest, **kwargs):
        real.append(sum(not next(layer.parameters()).is_meta for layer in model.model.layers))
        return step(model, *rest, **kwargs)

    monkeypatch.setattr(reconstruct, "sequential_layer", one_layer_real)
    metadata = json.loads((memory / "minigpts.json").read_text())["metadata"]
    out = prune_offloaded(
        model_dir, plan, stats, tmp_path / "offload", tokenizer=tokenizer, calibration=calibration,
        metadata=metadata, progress=False,
    )  # fmt: skip
    assert_same_output(memory, out)
    assert real == [1] * len(plan.layers)
    written = json.loads((out / "minigpts.json").read_text())["plan"]
    assert written["settings"]["sequential"] is True and written["summary"]["reconstructed"]
    assert [(layer["mlp_keep"], layer["heads_keep"]) for layer in written["layers"]] != one_shot  # re-chosen


def test_sequential_through_the_cli_equals_in_memory(
    capsys, tmp_path, tmp_path_factory, tiny_tokenizer, corpus_file
):
    model_dir, stats = model_and_stats("llama", tmp_path_factory, tiny_tokenizer, corpus_file, **LOUD)
    plan = (*UNIFORM, *VOCAB, *SEQUENTIAL, corpus_file)
    memory, offload = prune_both(capsys, tmp_path, model_dir, stats, *plan)
    assert_same_output(memory, offload)
    assert json.loads((offload / "minigpts.json").read_text())["plan"]["settings"]["sequential"] is True


def test_sequential_without_data_is_one_line_and_exit_2(
    capsys, tmp_path, tmp_path_factory, tiny_tokenizer, corpus_file
):
    model_dir, stats = model_and_stats("llama", tmp_path_factory, tiny_tokenizer, corpus_file)
    capsys.readouterr()  # (the fixture's own output)
    args = ("prune", "--model", model_dir, "--stats", stats, *UNIFORM, "--sequential", "--offload")
    code, _, err = run_cli(capsys, *args, "--out", tmp_path / "out", *CPU)
    assert code == 2 and err.count("\n") == 1 and "--sequential" in err and "--data" in err, err
    assert not (tmp_path / "out").exists()


def test_existing_output_needs_force(capsys, tmp_path, tmp_path_factory, tiny_tokenizer, corpus_file):
    model_dir, stats = model_and_stats("llama", tmp_path_factory, tiny_tokenizer, corpus_file)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    args = ("prune", "--model", model_dir, "--stats", stats, *UNIFORM, "--offload", "--out", out, *CPU)
    code, _, err = run_cli(capsys, *args)
    assert code == 2 and "--force" in err and (out / "keep.txt").read_text() == "mine"
    code, _, err = run_cli(capsys, *args, "--force")
    assert code == 0, err
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()


def test_every_offload_family_is_checked():
    from conftest import TINY_CONFIGS
    from transformers import AutoConfig

    from minigpts.arch import get_adapter

    checked = {get_adapter(AutoConfig.for_model(TINY_CONFIGS[name][0])).family for name in FAMILIES}
    assert set(analysis_offload.SEQUENTIAL_FAMILIES) <= checked


def test_a_criterion_reading_weights_outside_layer_weights_is_a_clear_error(
    capsys, tmp_path, tmp_path_factory, tiny_tokenizer, corpus_file
):
    """A registered criterion that reads weights without ``criteria.layer_weights`` finds only the
    skeleton's meta tensors under --offload: a one-line error naming the way out, exit 2."""
    from minigpts.arch import get_adapter
    from minigpts.criteria import Criterion, UnitScores, register_criterion, unregister_criterion

    @register_criterion
    class OutsideReader(Criterion):
        name = "outside-reader"
        help = "reads the down projection's weights outside layer_weights (a toy)"

        def scores(self, model, stats, seed):
            adapter = get_adapter(model)
            layers = adapter.layers(model)
            mlp = [adapter.mlp_out(layer).weight.abs().sum(0).to("cpu", torch.float64) for layer in layers]
            heads = [torch.ones(adapter.head_layout(layer)[0], dtype=torch.float64) for layer in layers]
            return UnitScores(mlp, heads, torch.ones(adapter.residual_width(layers[0]), dtype=torch.float64))

    try:
        model_dir, stats = model_and_stats("llama", tmp_path_factory, tiny_tokenizer, corpus_file)
        capsys.readouterr()  # (the fixture's own output)
        args = ("prune", "--model", model_dir, "--stats", stats, "--criterion", "outside-reader")
        code, _, err = run_cli(
            capsys, *args, "--mlp-ratio", "0.5", "--offload", "--out", tmp_path / "o", *CPU
        )
        assert code == 2 and err.count("\n") == 1 and "layer_weights" in err and "--offload" in err, err
        code, _, err = run_cli(capsys, *args, "--mlp-ratio", "0.5", "--out", tmp_path / "m", *CPU)
        assert code == 0, err  # in memory the same criterion works
    finally:
        unregister_criterion("outside-reader")

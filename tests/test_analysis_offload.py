"""Layer-by-layer analysis (analyze_offloaded) gives exactly the in-memory analysis' statistics."""

from __future__ import annotations

import dataclasses
import gc
import json
from collections.abc import Sequence

import pytest
import torch
from conftest import TINY_CONFIGS, make_tiny_model

from minigpts import analysis_offload
from minigpts.analysis import analyze
from minigpts.analysis_offload import analyze_offloaded
from minigpts.errors import UserError

VOCAB = 300


def windows_for(n: int = 5, seq_len: int = 10, seed: int = 1) -> torch.LongTensor:
    return torch.randint(0, VOCAB, (n, seq_len), generator=torch.Generator().manual_seed(seed))


def saved(tmp_path, name: str = "llama", dtype=torch.float64, **save_options):
    model = make_tiny_model(name, VOCAB).to(dtype)
    directory = tmp_path / name
    model.save_pretrained(directory, safe_serialization=True, **save_options)
    return model, directory


GRAM_RTOL = 1e-6  # layer by layer, the second moments' means are kept (in files) as float32


def assert_same_stats(expected, actual, rtol: float = 1e-10) -> None:
    """Every statistic of ``expected`` equals ``actual``'s (each tensor to ``rtol`` of its largest entry;
    the second moments to float32 precision at best)."""
    for field in dataclasses.fields(expected):
        x, y = getattr(expected, field.name), getattr(actual, field.name)
        if field.name == "metadata":
            continue
        tolerance = max(rtol, GRAM_RTOL) if field.name.endswith("_gram") else rtol
        if isinstance(x, list) and x and isinstance(x[0], torch.Tensor):
            assert isinstance(y, Sequence) and len(x) == len(y), field.name
            pairs = list(zip(x, y, strict=True))
        elif isinstance(x, torch.Tensor):
            pairs = [(x, y)]
        else:
            assert x == y, field.name
            continue
        for u, v in pairs:
            assert u.shape == v.shape and u.dtype == v.dtype, field.name
            scale = u.double().abs().max().clamp_min(1e-300)
            assert ((u.double() - v.double()).abs().max() / scale).item() <= tolerance, field.name
    for key in ("family", "seq_len", "windows", "dtype", "model"):
        assert expected.metadata[key] == actual.metadata[key], key
    assert actual.metadata["offload"] is True


def in_memory(directory, windows, dtype=torch.float64, **options):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype).eval()
    return analyze(model, windows, progress=False, **options)


# one tiny model per family of SEQUENTIAL_FAMILIES, each with what its forward prepares for its layers:
# GQA + rotary (llama), per-layer-type masks (qwen2), per-layer rotary tables and sliding windows
# (gemma3_text), learned positions + project_in/out (opt-proj), positional layer arguments and Conv1D
# (gpt2), a renamed checkpoint key (gpt_neox: embed_out -> lm_head), parallel blocks (phi, stablelm)
PER_FAMILY = (
    "llama", "qwen2", "gemma3_text", "opt-proj", "gpt2", "gpt_neox", "phi", "phi3",
    "stablelm-parallel-qk-norm",
)  # fmt: skip


def test_every_supported_family_is_checked():
    from transformers import AutoConfig

    from minigpts.arch import get_adapter

    checked = {get_adapter(AutoConfig.for_model(TINY_CONFIGS[name][0])).family for name in PER_FAMILY}
    assert set(analysis_offload.SEQUENTIAL_FAMILIES) <= checked


@pytest.mark.parametrize("name", PER_FAMILY)
def test_offloaded_equals_in_memory_for_every_family(tmp_path, name):
    """Activation statistics, second moments, window norms, Block Influence, token counts, and the
    Fisher gradient pass: the same as the whole model's (float64; uneven last batch)."""
    _, directory = saved(tmp_path, name)
    windows = windows_for()
    options = dict(batch_size=2, moments=True, fisher_tokens=25)
    expected = in_memory(directory, windows, **options)
    actual = analyze_offloaded(directory, windows, dtype=torch.float64, progress=False, **options)
    assert expected.has_moments and expected.has_fisher and actual.has_fisher
    assert_same_stats(expected, actual)


def test_sharded_checkpoint_read_in_blocks_and_converted(tmp_path, monkeypatch):
    """Shards (model.safetensors.index.json), float32 weights widened to float64 while they are read,
    in blocks far smaller than one tensor (reopening the file between blocks)."""
    _, directory = saved(tmp_path, "llama", dtype=torch.float32, max_shard_size="20KB")
    assert (directory / "model.safetensors.index.json").is_file()
    assert (
        len(set(json.loads((directory / "model.safetensors.index.json").read_text())["weight_map"].values()))
        > 3
    )
    monkeypatch.setattr(analysis_offload, "READ_BYTES", 1000)
    windows = windows_for(n=3, seq_len=8)
    options = dict(batch_size=4, moments=True)
    expected = in_memory(directory, windows, **options)
    actual = analyze_offloaded(directory, windows, dtype=torch.float64, progress=False, **options)
    assert_same_stats(expected, actual)


def test_float32_checkpoint_as_stored(tmp_path):
    """The common case: no conversion, each tensor a view of the mapped file; the saved file round-trips."""
    _, directory = saved(tmp_path, "llama-tied", dtype=torch.float32)
    windows = windows_for(n=4, seq_len=6)
    expected = in_memory(directory, windows, dtype=torch.float32, batch_size=3)
    actual = analyze_offloaded(directory, windows, progress=False, batch_size=3)  # default dtype: float32
    assert_same_stats(expected, actual, rtol=0)
    actual.save(tmp_path / "stats.safetensors")
    from minigpts.analysis import ActivationStats

    assert_same_stats(expected, ActivationStats.load(tmp_path / "stats.safetensors"), rtol=0)


def test_unsupported_family_is_refused(tmp_path, monkeypatch):
    _, directory = saved(tmp_path, "gpt2")
    monkeypatch.setattr(analysis_offload, "SEQUENTIAL_FAMILIES", ("llama",))
    with pytest.raises(UserError, match=r"--offload: .*does not support the gpt2 family.*without --offload"):
        analyze_offloaded(directory, windows_for(), progress=False)


def test_model_type_without_adapter_is_refused(tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("bloom", vocab_size=VOCAB, hidden_size=32, n_layer=2, n_head=4)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "bloom")
    with pytest.raises(UserError, match=r"--offload: model type 'bloom' is not supported"):
        analyze_offloaded(tmp_path / "bloom", windows_for(), progress=False)


def test_whole_model_passes_are_refused_with_the_option_to_turn_off(tmp_path):
    _, directory = saved(tmp_path)
    with pytest.raises(UserError, match=r"--taylor-tokens 0"):
        analyze_offloaded(directory, windows_for(), progress=False, taylor_tokens=10)
    with pytest.raises(UserError, match=r"--depth-tokens 0"):
        analyze_offloaded(directory, windows_for(), progress=False, depth_tokens=10)


def test_directory_without_safetensors_is_refused(tmp_path):
    model, _ = saved(tmp_path)
    directory = tmp_path / "pickle"
    model.config.save_pretrained(directory)
    with pytest.raises(UserError, match=r"no model.safetensors"):
        analyze_offloaded(directory, windows_for(), progress=False)
    with pytest.raises(UserError, match=r"--offload"):
        analyze_offloaded(tmp_path / "missing", windows_for(), progress=False)


def test_only_the_calibration_rows_of_the_embedding_are_read(tmp_path, monkeypatch):
    """The embedding is looked up by the model's own forward, but only the rows of the calibration
    tokens are read from the file (the others stay unwritten: never resident)."""
    _, directory = saved(tmp_path)
    read_rows = []
    original = analysis_offload._Blocks.rows

    def spy(self, key, indices, dtype):
        read_rows.append((key, sorted(torch.unique(indices).tolist())))
        return original(self, key, indices, dtype)

    monkeypatch.setattr(analysis_offload._Blocks, "rows", spy)
    windows = windows_for(n=2, seq_len=5)
    expected = in_memory(directory, windows, batch_size=1)
    actual = analyze_offloaded(directory, windows, dtype=torch.float64, progress=False, batch_size=1)
    assert_same_stats(expected, actual)
    assert read_rows == [("model.embed_tokens.weight", sorted(set(windows.flatten().tolist())))]


def test_cli_analyze_offload_writes_the_in_memory_statistics(tmp_path, tiny_tokenizer, tiny_llama, capsys):
    """`minigpts analyze --offload` writes the same statistics file as `minigpts analyze`."""
    from minigpts.analysis import ActivationStats
    from minigpts.cli import main

    model_dir = tmp_path / "tiny"
    tiny_llama.save_pretrained(model_dir)
    tiny_tokenizer.save_pretrained(model_dir)
    corpus = tmp_path / "corpus.jsonl"
    docs = [f"Supply and demand, lesson {i}: prices move with scarcity." for i in range(30)]
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    common = ["--model", str(model_dir), "--data", str(corpus), "--seq-len", "16", "--calib-tokens", "128"]
    common += ["--fisher-tokens", "32"]
    assert main(["analyze", *common, "--out", str(tmp_path / "memory.safetensors")]) == 0
    assert main(["analyze", *common, "--offload", "--out", str(tmp_path / "offload.safetensors")]) == 0
    expected = ActivationStats.load(tmp_path / "memory.safetensors")
    actual = ActivationStats.load(tmp_path / "offload.safetensors")
    assert_same_stats(expected, actual, rtol=1e-6)  # float32 model: the same hooks, same batches
    assert main(["analyze", *common, "--offload", "--allow-pickle", "--out", str(tmp_path / "x")]) == 2
    assert "--offload reads safetensors only" in capsys.readouterr().err


def _spied_opens(monkeypatch) -> list[str]:
    """The files ``safetensors.safe_open`` opens from now on (as the lazy per-layer lists call it)."""
    import safetensors

    opened, original = [], safetensors.safe_open

    def spy(path, *args, **kwargs):
        opened.append(str(path))
        return original(path, *args, **kwargs)

    monkeypatch.setattr(safetensors, "safe_open", spy)
    return opened


def test_offloaded_moments_are_spilled_per_layer_and_read_lazily(tmp_path, monkeypatch):
    """moments=True layer by layer: each layer's float64 sums exist only while that layer runs (freed
    as soon as its means are in its own file under work_dir); the result's grams are lazy lists that
    read one file per indexed layer and equal the in-memory ones to float32 precision."""
    from minigpts import analysis

    _, directory = saved(tmp_path, "llama")
    windows = windows_for()
    held = []  # at each spill: how many layers hold float64 gram sums
    original = analysis._LayerSums.spill

    def spill(self, i, n_tokens, parent=None):
        held.append(sum(m.gram is not None for m in self.mlp_moments + self.attn_moments))
        return original(self, i, n_tokens, parent)

    monkeypatch.setattr(analysis._LayerSums, "spill", spill)
    work = tmp_path / "work"
    work.mkdir()
    options = dict(batch_size=2, moments=True)
    expected = in_memory(directory, windows, **options)
    actual = analyze_offloaded(
        directory, windows, dtype=torch.float64, progress=False, work_dir=work, **options
    )
    n_layers = expected.n_layers
    assert held == [2] * n_layers  # the MLP's and the attention's of the one layer just run
    assert isinstance(expected.mlp_gram, list)  # in memory: unchanged
    for name in ("mlp_gram", "attn_gram"):
        lazy = getattr(actual, name)
        assert isinstance(lazy, analysis._LazyLayers) and len(lazy) == n_layers
    scratch = actual.mlp_gram.keep.path
    assert scratch.parent == work and actual.attn_gram.keep is actual.mlp_gram.keep
    assert sorted(p.name for p in scratch.iterdir()) == [f"layer-{i}.safetensors" for i in range(n_layers)]
    assert_same_stats(expected, actual)
    opened = _spied_opens(monkeypatch)
    gram = actual.attn_gram[1]
    assert opened == [str(scratch / "layer-1.safetensors")]
    assert gram.dtype == torch.float64 and gram.shape == expected.attn_gram[1].shape
    assert actual.mlp_gram[-1].shape == expected.mlp_gram[-1].shape
    with pytest.raises(IndexError):
        actual.mlp_gram[n_layers]


def _saved_file(path):
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return {key: handle.get_tensor(key) for key in handle.keys()}, handle.metadata()  # noqa: SIM118


VOLATILE = ("seconds", "tokens_per_second", "created", "offload")  # differ from run to run / by path


def assert_same_files(expected_path, actual_path) -> None:
    """The same keys, dtypes and shapes; tensors equal (float32 second moments to float32 precision);
    the same header, apart from the run's timing and the offload flag in the provenance."""
    (x, x_meta), (y, y_meta) = _saved_file(expected_path), _saved_file(actual_path)
    assert sorted(x) == sorted(y)
    for key in x:
        assert x[key].dtype == y[key].dtype and x[key].shape == y[key].shape, key
        tolerance = GRAM_RTOL if "_gram." in key else 1e-10
        scale = x[key].double().abs().max().clamp_min(1e-300)
        assert ((x[key].double() - y[key].double()).abs().max() / scale).item() <= tolerance, key
    provenance = [json.loads(meta.pop("metadata")) for meta in (x_meta, y_meta)]
    assert x_meta == y_meta
    for meta in provenance:
        for key in VOLATILE:
            meta.pop(key, None)
    assert provenance[0] == provenance[1]


def test_offloaded_moments_save_and_load_as_the_in_memory_ones(tmp_path):
    """The statistics file of a layer-by-layer analysis with moments (its grams copied from their
    per-layer files one at a time) equals the in-memory analysis' file; it loads, lazily too, and a
    lazily loaded one saves the same file again."""
    from minigpts.analysis import ActivationStats

    _, directory = saved(tmp_path, "qwen2")
    windows = windows_for(n=4, seq_len=8)
    options = dict(batch_size=3, moments=True, fisher_tokens=10)
    expected = in_memory(directory, windows, **options)
    actual = analyze_offloaded(directory, windows, dtype=torch.float64, progress=False, **options)
    expected.save(tmp_path / "memory.safetensors")
    actual.save(tmp_path / "offload.safetensors")
    assert_same_files(tmp_path / "memory.safetensors", tmp_path / "offload.safetensors")
    for lazy in (False, True):
        loaded = ActivationStats.load(tmp_path / "offload.safetensors", lazy_moments=lazy)
        assert_same_stats(ActivationStats.load(tmp_path / "memory.safetensors"), loaded)
    loaded.save(tmp_path / "again.safetensors")  # the lazily loaded one: grams streamed from the file
    assert_same_files(tmp_path / "offload.safetensors", tmp_path / "again.safetensors")


def test_spill_directory_lives_as_long_as_the_statistics(tmp_path):
    """The per-layer files stay while the statistics (or a list of their grams) live, saving included;
    the directory is removed once they are garbage-collected."""
    _, directory = saved(tmp_path, "llama")
    stats = analyze_offloaded(
        directory, windows_for(n=2, seq_len=6), dtype=torch.float64, progress=False, moments=True
    )
    scratch = stats.mlp_gram.keep.path
    stats.save(tmp_path / "stats.safetensors")
    assert scratch.is_dir()
    grams = stats.attn_gram
    del stats
    gc.collect()
    assert scratch.is_dir() and grams[0].shape[0] == grams[0].shape[1]
    del grams
    gc.collect()
    assert not scratch.exists()


def test_a_process_without_windows_still_spills_every_layer(tmp_path, monkeypatch):
    """Data parallel, a process may get no windows: it still reports every layer done (each layer's
    reduce is collective), with zero sums."""
    from minigpts import distributed

    _, directory = saved(tmp_path, "llama")
    monkeypatch.setattr(distributed, "shard", lambda items, align=1: items[:0])
    stats = analyze_offloaded(directory, windows_for(), dtype=torch.float64, progress=False, moments=True)
    assert len(stats.mlp_gram) == stats.n_layers
    assert all(not gram.any() for gram in stats.mlp_gram[:] + stats.attn_gram[:])

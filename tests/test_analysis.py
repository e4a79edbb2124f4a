"""Activation statistics: exact against an independent computation, streamed, saved and reloaded."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import make_tiny_model
from transformers import LlamaForCausalLM

from minigpts.analysis import ActivationStats, analyze
from minigpts.arch import get_adapter
from minigpts.errors import UserError

VOCAB = 300


def tiny_llama(dtype=torch.float64) -> LlamaForCausalLM:
    shape = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4)
    model = make_tiny_model(
        "llama-tied", VOCAB, perturb=0, **shape, max_position_embeddings=64, tie_word_embeddings=False
    )
    return model.to(dtype)


def windows_for(n: int = 5, seq_len: int = 12, seed: int = 1) -> torch.LongTensor:
    return torch.randint(0, VOCAB, (n, seq_len), generator=torch.Generator().manual_seed(seed))


def reference_llama_activations(model: LlamaForCausalLM, ids: torch.LongTensor) -> list[dict]:
    """Each layer's MLP activation, head outputs and normed residual inputs, by hand from the weights.

    Only the norms and the rotary tables come from the model's modules; projections, attention and
    the gated MLP are recomputed here, and the result is checked against the model's own output.
    """
    body = model.model
    config = model.config
    n_heads, n_kv = config.num_attention_heads, config.num_key_value_heads
    head_dim = config.hidden_size // n_heads
    batch, seq_len = ids.shape
    h = body.embed_tokens.weight[ids]
    positions = torch.arange(seq_len).unsqueeze(0)
    cos, sin = body.rotary_emb(h, positions)
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)

    def rotate(x):
        half = x.shape[-1] // 2
        return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin

    causal = torch.ones(seq_len, seq_len, dtype=torch.bool).tril()
    layers = []
    for layer in body.layers:
        attn, mlp = layer.self_attn, layer.mlp
        x = layer.input_layernorm(h)
        q = (x @ attn.q_proj.weight.T).view(batch, seq_len, n_heads, head_dim).transpose(1, 2)
        k = (x @ attn.k_proj.weight.T).view(batch, seq_len, n_kv, head_dim).transpose(1, 2)
        v = (x @ attn.v_proj.weight.T).view(batch, seq_len, n_kv, head_dim).transpose(1, 2)
        q, k = rotate(q), rotate(k)
        k = k.repeat_interleave(n_heads // n_kv, dim=1)
        v = v.repeat_interleave(n_heads // n_kv, dim=1)
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(head_dim)
        heads = scores.masked_fill(~causal, float("-inf")).softmax(-1) @ v
        heads = heads.transpose(1, 2).reshape(batch, seq_len, n_heads * head_dim)
        h = h + heads @ attn.o_proj.weight.T
        x2 = layer.post_attention_layernorm(h)
        act = torch.nn.functional.silu(x2 @ mlp.gate_proj.weight.T) * (x2 @ mlp.up_proj.weight.T)
        h = h + act @ mlp.down_proj.weight.T
        layers.append({"mlp": act, "heads": heads, "readers": [x, x2]})
    expected = body(input_ids=ids, use_cache=False).last_hidden_state
    torch.testing.assert_close(body.norm(h), expected, rtol=1e-10, atol=1e-10)
    return layers


def mean_abs(tensors: list[torch.Tensor]) -> torch.Tensor:
    flat = torch.cat([t.reshape(-1, t.shape[-1]) for t in tensors])
    return flat.abs().mean(0)


def mean_square(tensors: list[torch.Tensor]) -> torch.Tensor:
    flat = torch.cat([t.reshape(-1, t.shape[-1]) for t in tensors])
    return (flat * flat).mean(0)


def assert_rel(actual: torch.Tensor, expected: torch.Tensor, rel: float = 1e-9) -> None:
    assert actual.dtype == torch.float64
    assert actual.shape == expected.shape
    assert torch.all((actual - expected).abs() <= rel * expected.abs() + 1e-300), (actual, expected)


def test_statistics_equal_an_independent_computation():
    model = tiny_llama()
    windows = windows_for()
    stats = analyze(model, windows, batch_size=2, progress=False)  # 2 + 2 + 1: uneven last batch

    reference = [reference_llama_activations(model, batch) for batch in windows.split(3)]
    n_heads, n_kv, head_dim = 4, 2, 8
    assert stats.head_layout == [(n_heads, n_kv, head_dim)] * 2
    assert stats.n_tokens == windows.numel()
    for i in range(2):
        mlp = [part[i]["mlp"] for part in reference]
        heads = [part[i]["heads"] for part in reference]
        assert_rel(stats.mlp_l1[i], mean_abs(mlp))
        assert_rel(stats.mlp_l2sq[i], mean_square(mlp))
        assert_rel(stats.attn_dim_l1[i], mean_abs(heads))
        assert_rel(stats.attn_dim_l2sq[i], mean_square(heads))
        assert_rel(stats.head_l1[i], mean_abs(heads).view(n_heads, head_dim).mean(1))
        assert_rel(stats.head_l2sq[i], mean_square(heads).view(n_heads, head_dim).mean(1))
        for r in range(2):
            readers = [part[i]["readers"][r] for part in reference]
            assert_rel(stats.reader_l1[i][r], mean_abs(readers))
            assert_rel(stats.reader_l2sq[i][r], mean_square(readers))
    # every reader of every layer sees every token once: the aggregate is the plain mean over readers
    per_reader = [mean_abs([part[i]["readers"][r] for part in reference]) for i in range(2) for r in range(2)]
    expected_hidden = torch.stack(per_reader).mean(0)
    assert_rel(stats.hidden_l1, expected_hidden)


def test_token_counts_and_provenance():
    model = tiny_llama(torch.float32)
    windows = windows_for(3, 10, seed=5)
    stats = analyze(model, windows, progress=False, metadata={"data": "corpus.txt", "seed": 7})
    assert stats.token_counts.dtype == torch.int64
    assert torch.equal(stats.token_counts, torch.bincount(windows.flatten(), minlength=VOCAB))
    assert stats.n_tokens == 30 == int(stats.token_counts.sum())
    meta = stats.metadata
    assert meta["data"] == "corpus.txt" and meta["seed"] == 7
    assert meta["seq_len"] == 10 and meta["windows"] == 3 and meta["family"] == "llama"
    assert meta["dtype"] == "float32" and "minigpts_version" in meta and "created" in meta
    # float32 activations: sums reduced per batch in float32, accumulated in float64
    assert all(t.dtype == torch.float64 for t in stats.mlp_l1 + stats.reader_l2sq)


def test_zeroed_mlp_channels_show_zero_and_l2_bounds_l1():
    model = tiny_llama()
    dead = [3, 17, 40]
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.gate_proj.weight[dead] = 0
            layer.mlp.up_proj.weight[dead] = 0
    stats = analyze(model, windows_for(), progress=False)
    for i in range(2):
        alive = torch.ones(48, dtype=torch.bool)
        alive[dead] = False
        assert torch.all(stats.mlp_l1[i][dead] == 0)
        assert torch.all(stats.mlp_l2sq[i][dead] == 0)
        assert torch.all(stats.mlp_l1[i][alive] > 0)
        # Jensen: mean a² >= (mean |a|)²
        assert torch.all(stats.mlp_l2sq[i] >= stats.mlp_l1[i] ** 2 * (1 - 1e-12))


def test_save_load_roundtrip_is_exact(tmp_path):
    stats = analyze(tiny_llama(torch.float32), windows_for(), progress=False, metadata={"data": "d"})
    path = tmp_path / "sub" / "stats.safetensors"
    stats.save(path)
    loaded = ActivationStats.load(path)
    for name in ("mlp_l1", "mlp_l2sq", "attn_dim_l1", "attn_dim_l2sq", "reader_l1", "reader_l2sq"):
        for a, b in zip(getattr(stats, name), getattr(loaded, name), strict=True):
            assert torch.equal(a, b)
    assert torch.equal(stats.token_counts, loaded.token_counts)
    assert loaded.head_layout == stats.head_layout
    assert loaded.n_tokens == stats.n_tokens
    assert loaded.metadata == stats.metadata
    assert [p.name for p in path.parent.iterdir()] == ["stats.safetensors"]  # no partial file left


def test_load_rejects_missing_and_foreign_files(tmp_path):
    from safetensors.torch import save_file

    with pytest.raises(UserError, match="no such file"):
        ActivationStats.load(tmp_path / "missing.safetensors")
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(UserError, match="not a minigpts statistics file"):
        ActivationStats.load(text)
    weights = tmp_path / "model.safetensors"
    save_file({"w": torch.zeros(2)}, weights)
    with pytest.raises(UserError, match="not a minigpts statistics file"):
        ActivationStats.load(weights)


def test_hooks_removed_and_mode_restored_even_on_error():
    model = tiny_llama(torch.float32)
    adapter = get_adapter(model)
    hooked = [m for layer in adapter.layers(model) for m in [adapter.mlp_out(layer), adapter.attn_out(layer)]]
    hooked += [m for layer in adapter.layers(model) for m in adapter.residual_readers(layer)]
    model.train()
    analyze(model, windows_for(), progress=False)
    assert model.training
    assert all(len(m._forward_pre_hooks) == 0 for m in hooked)

    def fail(module, args):
        raise RuntimeError("boom")

    failing = adapter.layers(model)[1].register_forward_pre_hook(fail)
    with pytest.raises(RuntimeError, match="boom"):
        analyze(model, windows_for(), progress=False)
    failing.remove()
    assert model.training
    assert all(len(m._forward_pre_hooks) == 0 for m in hooked)


def test_bad_windows_are_user_errors():
    model = tiny_llama(torch.float32)
    with pytest.raises(UserError, match="vocabulary has 300"):
        analyze(model, torch.tensor([[1, 2, 300]]), progress=False)
    with pytest.raises(UserError, match="non-empty"):
        analyze(model, torch.zeros((0, 8), dtype=torch.long), progress=False)
    with pytest.raises(UserError, match="integers"):
        analyze(model, torch.zeros((1, 8)), progress=False)
    with pytest.raises(UserError, match="--batch-size"):
        analyze(model, windows_for(), batch_size=0, progress=False)


@pytest.mark.parametrize(
    "model",
    [
        pytest.param(
            lambda: make_tiny_model(
                "phi", VOCAB, perturb=0, hidden_size=32, num_hidden_layers=2, max_position_embeddings=64
            ),
            id="phi",
        ),
        pytest.param(
            lambda: make_tiny_model(
                "opt-proj",
                VOCAB,
                perturb=0,
                hidden_size=32,
                num_hidden_layers=2,
                word_embed_proj_dim=16,
                max_position_embeddings=64,
            ),
            id="opt-project-in-out",
        ),
    ],
)
def test_other_families_match_a_plain_hook(model):
    """Phi and OPT: the adapter's modules are the ones hooked, and MLP stats equal a naive capture."""
    torch.manual_seed(0)
    model = model().double().eval()
    adapter = get_adapter(model)
    captured: dict[int, list[torch.Tensor]] = {}
    handles = [
        adapter.mlp_out(layer).register_forward_pre_hook(
            lambda m, args, i=i: captured.setdefault(i, []).append(args[0].clone())
        )
        for i, layer in enumerate(adapter.layers(model))
    ]
    windows = windows_for()
    with torch.inference_mode():
        for batch in windows.split(2):
            adapter.body(model)(input_ids=batch, use_cache=False)
    for handle in handles:
        handle.remove()
    stats = analyze(model, windows, batch_size=2, progress=False)
    n_heads, _, head_dim = stats.head_layout[0]
    assert n_heads * head_dim == 32
    for i in range(2):
        assert_rel(stats.mlp_l1[i], mean_abs(captured[i]))
        assert stats.attn_dim_l1[i].shape == (32,)
        assert stats.reader_l1[i].shape == (len(adapter.residual_readers(adapter.layers(model)[i])), 32)
    assert stats.hidden_l1.shape == (32,)


@pytest.mark.parametrize("batch_size", [2, 3])
def test_expected_counts_in_the_analysis_pass_equal_the_separate_pass(tmp_path, batch_size):
    """--vocab-keep-expected's counts come from the analysis pass itself: equal to the separate pass
    over the same first windows, and the activation statistics unchanged by the LM head running."""
    from minigpts.vocab import expected_token_counts

    model, windows = tiny_llama(), windows_for(n=5)
    plain = analyze(model, windows, batch_size=batch_size, progress=False)
    folded = analyze(model, windows, batch_size=batch_size, progress=False, expected_tokens=30)
    separate = expected_token_counts(model, windows[:3], batch_size=2, progress=False)
    assert plain.expected_counts is None and folded.expected_tokens == 36  # 3 windows of 12
    assert torch.allclose(
        folded.expected_counts, torch.from_numpy(separate), rtol=1e-6, atol=1e-9
    )  # float32 softmax
    for name in ("mlp_l1", "mlp_l2sq", "attn_dim_l1", "reader_l2sq"):
        for a, b in zip(getattr(plain, name), getattr(folded, name), strict=True):
            assert_rel(b, a, 1e-12)
    path = tmp_path / "stats.safetensors"
    folded.save(path)
    loaded = ActivationStats.load(path)
    assert torch.equal(loaded.expected_counts, folded.expected_counts) and loaded.expected_tokens == 36


@pytest.mark.parametrize("width", [5, 383, 577, 1536, 2049])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_symmetric_gram_equals_the_full_product(width, dtype):
    from minigpts.analysis import symmetric_gram

    x = torch.randn(300, width, generator=torch.Generator().manual_seed(width), dtype=dtype)
    gram = symmetric_gram(x)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(gram, x.T @ x, rtol=tol, atol=tol * width)

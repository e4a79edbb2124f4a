"""GGUF export: checked with readers that are not ours.

Uniform models are loaded back with transformers' own GGUF loader (`from_pretrained(dir, gguf_file=…)`)
and must give the same logits and the same token ids; every layout, per-layer included, runs in
llama.cpp itself when `llama-cpp-python` is installed (`make llama-cpp`), otherwise those tests skip.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from conftest import SAMPLE_TEXT, make_tiny_llama, make_tiny_model
from test_export import prune
from test_surgery import VOCAB
from test_vocab import byte_level_bpe, domain_sample, read_sample, sentencepiece_bpe

from minigpts.arch import get_adapter
from minigpts.cli import main
from minigpts.export import save_model
from minigpts.export_gguf import GgufUnsupported, export_gguf, gguf_layout, load_gguf_with_transformers
from minigpts.plan import LayerPlan, PruningPlan
from minigpts.surgery import apply_plan
from minigpts.vocab import count_tokens, select_vocab, slice_model_vocab, trim_tokenizer


def random_unicode(seed: int, length: int = 60) -> str:
    """ASCII, whitespace runs, Latin/Greek/symbols, CJK/Hangul and astral code points (emoji), mixed."""
    rng = random.Random(seed)
    out = []
    for _ in range(length):
        r = rng.random()
        if r < 0.45:
            out.append(chr(rng.randint(32, 126)))
        elif r < 0.6:
            out.append(rng.choice([" ", "  ", "\n", "\n\n", "\t", "\r\n"]))
        elif r < 0.8:
            out.append(chr(rng.randint(0xA0, 0x2FFF)))
        elif r < 0.93:
            out.append(chr(rng.randint(0x3000, 0xD7FF)))
        else:
            out.append(chr(rng.randint(0x1F300, 0x1FAFF)))
    return "".join(out)


TEXTS = [SAMPLE_TEXT[:400], *read_sample("test")[:2], *(random_unicode(seed) for seed in range(40))]


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def same_ids(a, b, texts=TEXTS, add_special_tokens=False) -> list[str]:
    """The texts that the two tokenizers encode differently."""
    return [
        text
        for text in texts
        if a(text, add_special_tokens=add_special_tokens)["input_ids"]
        != b(text, add_special_tokens=add_special_tokens)["input_ids"]
    ]


def check_with_transformers(model, tokenizer, path, tolerance: float, texts=TEXTS) -> None:
    reloaded, reloaded_tokenizer = load_gguf_with_transformers(path)
    assert not same_ids(tokenizer, reloaded_tokenizer, texts)
    assert not same_ids(tokenizer, reloaded_tokenizer, TEXTS[:3], add_special_tokens=True)
    ids = tokenizer(TEXTS[0], return_tensors="pt")["input_ids"][:, :96]
    delta = (logits(model, ids) - logits(reloaded, ids)).abs().max().item()
    assert delta <= tolerance, delta


def test_uniform_llama_reloads_in_transformers_with_same_logits_and_ids(tmp_path, tiny_tokenizer):
    model = make_tiny_llama(len(tiny_tokenizer))
    result = export_gguf(model, tiny_tokenizer, tmp_path / "m.gguf")
    assert (
        result.arch == "llama" and not result.per_layer and result.tensor_types == {"F32": result.n_tensors}
    )
    check_with_transformers(model, tiny_tokenizer, result.path, 1e-4)


@pytest.mark.parametrize("outtype, tolerance", [("f16", 2e-3), ("bf16", 2e-2), ("q8_0", 3e-2)])
def test_smaller_types_use_the_gguf_package_blocks(tmp_path, tiny_tokenizer, outtype, tolerance):
    model = make_tiny_llama(len(tiny_tokenizer))
    f32 = export_gguf(model, tiny_tokenizer, tmp_path / "f32.gguf")
    result = export_gguf(model, tiny_tokenizer, tmp_path / f"{outtype}.gguf", outtype=outtype)
    assert result.tensor_types["F32"] == 5  # 1-D norms stay f32
    assert result.tensor_types[outtype.upper()] == result.n_tensors - 5
    assert result.size_bytes < f32.size_bytes * (0.6 if outtype != "q8_0" else 0.4)
    check_with_transformers(model, tiny_tokenizer, result.path, tolerance)


@pytest.mark.parametrize("name", ["llama", "mistral", "qwen2"])
def test_other_llama_family_members_reload_in_transformers(tmp_path, tiny_tokenizer, name):
    model = make_tiny_model(name, len(tiny_tokenizer))
    # transformers' GGUF loader treats a llama file whose general.name says "mistral" as Mistral and then
    # fails to find that architecture in gguf-py; the weights are Llama's either way
    result = export_gguf(model, tiny_tokenizer, tmp_path / "m.gguf", name=f"tiny {name[:4]}")
    assert result.arch == ("qwen2" if name == "qwen2" else "llama")
    check_with_transformers(model, tiny_tokenizer, result.path, 1e-4)


def gemma_style_bpe():
    """SentencePiece-style BPE as Gemma's tokenizer.json has it: spaces replaced by "▁", none prepended."""
    from tokenizers import decoders, normalizers

    tokenizer = sentencepiece_bpe(True)
    backend = tokenizer.backend_tokenizer
    backend.normalizer = normalizers.Replace(" ", "▁")
    backend.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    )
    return tokenizer


TOKENIZERS = {
    "byte-level": byte_level_bpe,
    "sentencepiece": lambda: sentencepiece_bpe(False),
    "sentencepiece-legacy": lambda: sentencepiece_bpe(True),
    "sentencepiece-gemma": gemma_style_bpe,
}


# Gemma-style (add_space_prefix false) is checked in llama.cpp only: transformers' GGUF loader rebuilds
# every SentencePiece-style vocabulary with a "▁" prepended
@pytest.mark.parametrize("kind", ["byte-level", "sentencepiece", "sentencepiece-legacy"])
def test_trimmed_vocabulary_keeps_our_ids_in_the_gguf(tmp_path, kind):
    tokenizer = TOKENIZERS[kind]()
    selection = select_vocab(tokenizer, count_tokens(tokenizer, domain_sample()), embedding_threshold=0)
    trimmed = trim_tokenizer(tokenizer, selection.keep_ids)
    model = slice_model_vocab(make_tiny_llama(len(tokenizer)), selection.keep_ids)
    result = export_gguf(model, trimmed, tmp_path / "trimmed.gguf")
    assert result.tokenizer_pre == ("gpt-2" if kind == "byte-level" else None)
    texts = TEXTS
    if kind == "sentencepiece-legacy":
        # transformers rebuilds a GGUF SentencePiece vocabulary with Metaspace, which adds no "▁" before
        # text that starts with a space, where the legacy Prepend normalizer (and llama.cpp) do
        texts = [text for text in TEXTS if not text[:1].isspace()]
    check_with_transformers(model, trimmed, result.path, 1e-4, texts)


def test_tokenizer_metadata_matches_llama_cpp_conventions(tmp_path):
    from gguf import GGUFReader, TokenType

    tokenizer = byte_level_bpe()  # BOS added by its post-processor, a chat template, an added token
    model = make_tiny_llama(len(tokenizer))
    path = export_gguf(model, tokenizer, tmp_path / "m.gguf").path
    fields = GGUFReader(str(path)).fields
    value = lambda key: fields[key].contents()  # noqa: E731
    assert value("tokenizer.ggml.model") == "gpt2" and value("tokenizer.ggml.pre") == "gpt-2"
    tokens, types = value("tokenizer.ggml.tokens"), value("tokenizer.ggml.token_type")
    assert tokens == tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    assert types[tokenizer.convert_tokens_to_ids("<|im_end|>")] == TokenType.CONTROL
    assert types[tokenizer.convert_tokens_to_ids("<tool_call>")] == TokenType.USER_DEFINED
    assert value("tokenizer.ggml.bos_token_id") == tokenizer.bos_token_id
    assert value("tokenizer.ggml.eos_token_id") == tokenizer.eos_token_id
    assert value("tokenizer.ggml.add_bos_token") is True and value("tokenizer.ggml.add_eos_token") is False
    assert value("tokenizer.chat_template") == tokenizer.chat_template
    merges = value("tokenizer.ggml.merges")
    assert merges[:3] == [" ".join(m) for m in tokenizer_merges(tokenizer)[:3]]


def tokenizer_merges(tokenizer) -> list[list[str]]:
    import json

    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    return [m if isinstance(m, list) else m.split(" ") for m in merges]


def test_per_layer_widths_are_arrays_of_llama_cpp_variable_width_llama(tmp_path, tiny_tokenizer):
    from gguf import GGUFReader

    model, _ = prune("llama", vary=True, hidden=True)
    layout = gguf_layout(model)
    assert layout.arch == "deci" and layout.per_layer
    path = export_gguf(model, _tokenizer_for(VOCAB), tmp_path / "m.gguf").path
    fields = GGUFReader(str(path)).fields
    widths = [layer.mlp.down_proj.in_features for layer in model.model.layers]
    heads = [layer.self_attn.q_proj.out_features // layer.self_attn.head_dim for layer in model.model.layers]
    assert fields["deci.feed_forward_length"].contents() == widths
    assert fields["deci.attention.head_count"].contents() == heads
    assert fields["deci.attention.key_length"].contents() == model.config.head_dim
    assert len(set(widths)) > 1


def test_q8_0_names_the_tensors_left_f16_and_how_to_avoid_them(tmp_path):
    """A per-layer MLP width not in blocks of 32 cannot be q8_0: written as f16, and the export says so."""
    import gguf
    from gguf import GGUFReader

    from minigpts.options import Q8_0_BLOCK

    assert gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0] == Q8_0_BLOCK  # what run --round-to uses

    base = make_tiny_llama(VOCAB)
    tokenizer = _tokenizer_for(VOCAB)
    whole = export_gguf(base, tokenizer, tmp_path / "whole.gguf", outtype="q8_0")
    assert "F16" not in whole.tensor_types and not any(note.startswith("q8_0:") for note in whole.notes)
    adapter = get_adapter(base)
    widths = [40 if index % 2 == 0 else 32 for index in range(len(adapter.layers(base)))]
    layers = [LayerPlan(list(range(width)), list(range(4)), list(range(2))) for width in widths]
    plan = PruningPlan(family=adapter.family, layers=layers, layout="per-layer", criterion="first")
    cut = apply_plan(base, plan)
    assert export_gguf(cut, tokenizer, tmp_path / "bf16.gguf", outtype="bf16").tensor_types.get("F16") is None
    result = export_gguf(cut, tokenizer, tmp_path / "cut.gguf", outtype="q8_0")
    odd = [f"blk.{index}.ffn_down.weight" for index, width in enumerate(widths) if width % 32]
    f16 = [t.name for t in GGUFReader(str(result.path)).tensors if t.tensor_type.name == "F16"]
    assert sorted(f16) == sorted(odd) and result.tensor_types["F16"] == len(odd)
    (note,) = [note for note in result.notes if note.startswith("q8_0:")]
    assert f"{len(odd)} tensor(s)" in note and "rows of 40" in note and "--round-to 32" in note


def _tokenizer_for(vocab_size: int):
    """A byte-level tokenizer with exactly vocab_size ids (the models of test_surgery have VOCAB rows)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([SAMPLE_TEXT], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")


def test_qk_rows_are_reordered_for_llama_cpp_rope(tmp_path, tiny_tokenizer):
    """llama.cpp rotates neighbouring pairs, transformers the two halves of each head."""
    from gguf import GGUFReader

    model = make_tiny_llama(len(tiny_tokenizer))
    path = export_gguf(model, tiny_tokenizer, tmp_path / "m.gguf").path
    tensors = {t.name: np.array(t.data) for t in GGUFReader(str(path)).tensors}
    q = model.model.layers[0].self_attn.q_proj.weight.detach().numpy()
    head_dim = model.config.hidden_size // model.config.num_attention_heads
    written = tensors["blk.0.attn_q.weight"]
    assert np.array_equal(written[1], q[head_dim // 2])  # row 1 pairs with row 0: the second half's first
    assert np.array_equal(written[0], q[0])


@pytest.mark.parametrize(
    "name, vary, words",
    [
        ("opt", False, "llama.cpp has no OPT architecture"),
        ("qwen3", True, "qwen3"),
        ("phi", True, "widths that differ between layers"),
    ],
)
def test_what_llama_cpp_cannot_express_is_one_clear_error(tmp_path, name, vary, words):
    model, _ = prune(name, vary=vary, hidden=False)
    with pytest.raises(GgufUnsupported, match=words):
        export_gguf(model, _tokenizer_for(VOCAB), tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()


def test_phi_with_its_heads_exports_as_phi2(tmp_path):
    model = make_tiny_model("phi", VOCAB)
    assert export_gguf(model, _tokenizer_for(VOCAB), tmp_path / "m.gguf").arch == "phi2"


# --- the other families: Gemma 1/2/3, Phi-3, GPT-NeoX, StableLM, GPT-2 ---------------------------

OTHER_ARCHS = {
    "gemma": "gemma",
    "gemma2": "gemma2",
    "gemma3_text": "gemma3",
    "phi3": "phi3",
    "gpt_neox": "gptneox",
    "gpt_neox-sequential": "gptneox",
    "stablelm": "stablelm",
    "stablelm-parallel-qk-norm": "stablelm",
    "gpt2": "gpt2",
}


def uniform_cut(name: str, *, heads: bool = False, hidden: bool = False, vary: bool = False):
    """TINY_CONFIGS[name] with half its MLP channels, its middle layer and (optionally) one KV group of
    heads / every other hidden channel removed; `vary` gives the first layer a narrower MLP."""
    model = make_tiny_model(name, VOCAB)
    adapter = get_adapter(model)
    layers = adapter.layers(model)
    n_heads, n_kv, _ = adapter.head_layout(layers[0])
    group = n_heads // n_kv
    kv = [0] if heads else list(range(n_kv))
    keep = [k * group + h for k in kv for h in range(group)] if group > 1 else ([0, 2] if heads else kv)
    width = adapter.mlp_width(layers[0])
    plans = [
        LayerPlan(
            mlp_keep=[0, 1] if vary and index == 0 else list(range(0, width, 2)),
            heads_keep=keep,
            kv_heads_keep=kv if group > 1 else keep,
        )
        for index in range(len(layers))
    ]
    plan = PruningPlan(
        adapter.family,
        plans,
        hidden_keep=list(range(0, adapter.hidden_size(model), 2)) if hidden else None,
        layers_keep=[0, 2],
        layout="per-layer" if vary else "uniform",
    )
    return apply_plan(model, plan)


# transformers' GGUF loader reads fewer keys than llama.cpp: what it does not read takes the config
# class's default, so these tiny models set those fields to the defaults (the export writes them all)
RELOAD_OVERRIDES = {
    # query_pre_attn_scalar and soft-capping are not read (256, 50, 30); llama.cpp scales queries by
    # 1/sqrt(head_dim), so head_dim is 256 too
    "gemma2": dict(
        head_dim=256, query_pre_attn_scalar=256, attn_logit_softcapping=50.0, final_logit_softcapping=30.0
    ),
    # + layer_types are not read: the default pattern (every 6th layer full) makes all 3 layers sliding
    "gemma3_text": dict(
        head_dim=256, query_pre_attn_scalar=256, final_logit_softcapping=None, layer_types=None
    ),
    "phi3": dict(partial_rotary_factor=1.0),  # rope.dimension_count is not read
    "stablelm": {},
    "gpt2": dict(
        n_inner=None, max_position_embeddings=1024
    ),  # feed_forward_length and n_positions are not read
}


@pytest.mark.parametrize("name", list(RELOAD_OVERRIDES))
def test_other_families_reload_in_transformers_with_same_logits_and_ids(tmp_path, tiny_tokenizer, name):
    model = make_tiny_model(name, len(tiny_tokenizer), **RELOAD_OVERRIDES[name])
    result = export_gguf(model, tiny_tokenizer, tmp_path / "m.gguf")
    assert result.arch == OTHER_ARCHS[name] and result.tensor_types == {"F32": result.n_tensors}
    check_with_transformers(model, tiny_tokenizer, result.path, 1e-4)


def _written(path) -> tuple[dict, dict]:
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    return {t.name: np.array(t.data) for t in reader.tensors}, {
        k: f.contents() for k, f in reader.fields.items()
    }


def _np(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().float().numpy()


def test_gemma_norms_are_written_plus_one_with_gemma2_keys(tmp_path):
    model = make_tiny_model("gemma2", VOCAB)
    tensors, fields = _written(export_gguf(model, _tokenizer_for(VOCAB), tmp_path / "m.gguf").path)
    layer = model.model.layers[0]
    for gguf_name, norm in [
        ("blk.0.attn_norm.weight", layer.input_layernorm),
        ("blk.0.post_attention_norm.weight", layer.post_attention_layernorm),
        ("blk.0.ffn_norm.weight", layer.pre_feedforward_layernorm),
        ("blk.0.post_ffw_norm.weight", layer.post_feedforward_layernorm),
        ("output_norm.weight", model.model.norm),
    ]:
        assert np.allclose(tensors[gguf_name], _np(norm.weight) + 1, atol=1e-7), gguf_name
    # the embedding as stored: llama.cpp multiplies by sqrt(hidden) itself; tied head: no output.weight
    assert np.array_equal(tensors["token_embd.weight"], _np(model.model.embed_tokens.weight))
    assert "output.weight" not in tensors
    assert fields["gemma2.attention.sliding_window"] == 4
    assert fields["gemma2.attention.sliding_window_pattern"] == [True, False, True]
    assert fields["gemma2.attn_logit_softcapping"] == 20.0 and fields["gemma2.final_logit_softcapping"] == 5.0
    assert fields["gemma2.attention.key_length"] == 8


def test_fused_projections_are_written_in_llama_cpp_order(tmp_path):
    tokenizer = _tokenizer_for(VOCAB)
    # Phi-3: qkv_proj [q | k | v] and gate_up_proj [gate | up] as they are
    phi3 = make_tiny_model("phi3", VOCAB)
    tensors, fields = _written(export_gguf(phi3, tokenizer, tmp_path / "phi3.gguf").path)
    attention, mlp = phi3.model.layers[0].self_attn, phi3.model.layers[0].mlp
    assert np.array_equal(tensors["blk.0.attn_qkv.weight"], _np(attention.qkv_proj.weight))
    assert np.array_equal(tensors["blk.0.ffn_up.weight"], _np(mlp.gate_up_proj.weight))
    assert fields["phi3.rope.dimension_count"] == 4  # partial_rotary_factor 0.5 of head_dim 8
    assert "phi3" not in fields["general.name"]  # see export_gguf._general_name
    # GPT-NeoX: one [q k v] block per head regrouped into [q | k | v]
    neox = make_tiny_model("gpt_neox", VOCAB)
    tensors, fields = _written(export_gguf(neox, tokenizer, tmp_path / "neox.gguf").path)
    qkv = neox.gpt_neox.layers[0].attention.query_key_value
    hidden, d = neox.config.hidden_size, neox.config.hidden_size // neox.config.num_attention_heads
    written, bias = tensors["blk.0.attn_qkv.weight"], tensors["blk.0.attn_qkv.bias"]
    for head in (0, 5):
        for part in range(3):  # q, k, v of this head
            rows = slice(part * hidden + head * d, part * hidden + (head + 1) * d)
            original = slice((3 * head + part) * d, (3 * head + part + 1) * d)
            assert np.array_equal(written[rows], _np(qkv.weight[original]))
            assert np.array_equal(bias[rows], _np(qkv.bias[original]))
    assert fields["gptneox.use_parallel_residual"] is True
    # GPT-2: Conv1D weights [in, out] transposed, learned positions
    gpt2 = make_tiny_model("gpt2", VOCAB)
    tensors, _ = _written(export_gguf(gpt2, tokenizer, tmp_path / "gpt2.gguf").path)
    block = gpt2.transformer.h[0]
    assert np.array_equal(tensors["blk.0.attn_qkv.weight"], _np(block.attn.c_attn.weight.T))
    assert np.array_equal(tensors["blk.0.ffn_down.weight"], _np(block.mlp.c_proj.weight.T))
    assert np.array_equal(tensors["position_embd.weight"], _np(gpt2.transformer.wpe.weight))
    # StableLM 2 12B style: per-head q/k LayerNorms stacked, no ffn_norm (parallel residual)
    stablelm = make_tiny_model("stablelm-parallel-qk-norm", VOCAB)
    tensors, fields = _written(export_gguf(stablelm, tokenizer, tmp_path / "stablelm.gguf").path)
    norms = stablelm.model.layers[0].self_attn.q_layernorm.norms
    assert np.array_equal(tensors["blk.0.attn_q_norm.weight"], np.stack([_np(n.weight) for n in norms]))
    assert "blk.0.ffn_norm.weight" not in tensors and fields["stablelm.use_parallel_residual"] is True


LLAMA_CPP_CASES = [
    *((name, {}) for name in OTHER_ARCHS),
    # pruned, uniform: Gemma keeps its head size as a key, so heads and hidden channels may go; the
    # others need q width == hidden in llama.cpp, so MLP channels and a layer go
    ("gemma", dict(heads=True, hidden=True)),
    ("gemma2", dict(heads=True, hidden=True)),
    ("gemma3_text", dict(heads=True, hidden=True)),
    ("phi3", {"hidden": False}),
    ("gpt_neox", {"hidden": False}),
    ("stablelm-parallel-qk-norm", {"hidden": False}),
    ("gpt2", {"hidden": False}),
]


@pytest.mark.parametrize(
    "name, cut",
    LLAMA_CPP_CASES,
    ids=[f"{n}{'-cut' if c else ''}{'-heads-hidden' if c.get('heads') else ''}" for n, c in LLAMA_CPP_CASES],
)
def test_other_families_run_in_llama_cpp_with_our_logits(tmp_path, name, cut):
    pytest.importorskip("llama_cpp")
    model = uniform_cut(name, **cut) if cut else make_tiny_model(name, VOCAB)
    tokenizer = _tokenizer_for(VOCAB)
    result = export_gguf(model, tokenizer, tmp_path / "m.gguf")
    assert result.arch == OTHER_ARCHS[name]
    ids = tokenizer(SAMPLE_TEXT[:200], add_special_tokens=False)["input_ids"][:40]  # > Gemma's window of 4
    ours = logits(model, torch.tensor([ids]))[0].numpy()
    theirs = llama_cpp_logits(result.path, ids)
    # tiny random models have logits of 0.04-0.5: the bound is relative to the largest
    assert np.abs(ours - theirs).max() <= 1e-3 * np.abs(ours).max()


@pytest.mark.parametrize(
    "build, words",
    [
        pytest.param(
            lambda: uniform_cut("gemma2", vary=True),
            "gemma2 sizes every layer from the first",
            id="gemma2-per-layer",
        ),
        pytest.param(
            lambda: uniform_cut("phi3", heads=True), "query width to equal the hidden size", id="phi3-heads"
        ),
        pytest.param(
            lambda: uniform_cut("gpt2", heads=True), "query width to equal the hidden size", id="gpt2-heads"
        ),
        pytest.param(
            lambda: uniform_cut("stablelm", heads=True),
            "query width to equal the hidden size",
            id="stablelm-heads",
        ),
        pytest.param(
            lambda: make_tiny_model("gemma", VOCAB, tie_word_embeddings=False),
            "untied LM head",
            id="gemma-untied",
        ),
        pytest.param(
            lambda: make_tiny_model("gemma2", VOCAB, query_pre_attn_scalar=16),
            "query_pre_attn_scalar=16",
            id="gemma2-query-scale",
        ),
        pytest.param(
            lambda: make_tiny_model("gemma2", VOCAB, attn_logit_softcapping=None),
            "soft-capping switched off",
            id="gemma2-no-softcap",
        ),
        pytest.param(
            lambda: make_tiny_model("gemma3_text", VOCAB, attn_logit_softcapping=30.0),
            "gemma3 has none",
            id="gemma3-attn-softcap",
        ),
        pytest.param(
            lambda: make_tiny_model("gpt2", VOCAB, scale_attn_by_inverse_layer_idx=True),
            "attention scale",
            id="gpt2-layer-scaled-attention",
        ),
        pytest.param(
            lambda: make_tiny_model("stablelm", VOCAB, hidden_act="gelu"),
            "activation 'gelu'",
            id="stablelm-gelu",
        ),
    ],
)
def test_what_the_other_llama_cpp_architectures_cannot_express_is_one_clear_error(tmp_path, build, words):
    with pytest.raises(GgufUnsupported, match=words) as error:
        export_gguf(build(), _tokenizer_for(VOCAB), tmp_path / "m.gguf")
    assert "\n" not in str(error.value) and "llama.cpp cannot express" in str(error.value)
    assert not (tmp_path / "m.gguf").exists()


def test_cli_export_writes_the_file_and_refuses_to_overwrite(tmp_path, tiny_tokenizer, capsys):
    model = make_tiny_llama(len(tiny_tokenizer))
    directory = save_model(model, tiny_tokenizer, tmp_path / "dir")
    target = tmp_path / "out.gguf"
    assert main(["export", "--model", str(directory), "--gguf", str(target), "--outtype", "q8_0"]) == 0
    assert "llama.cpp architecture 'llama'" in capsys.readouterr().out
    assert main(["export", "--model", str(directory), "--gguf", str(target)]) == 2
    assert "--force" in capsys.readouterr().err
    assert main(["export", "--model", str(directory), "--gguf", str(target), "--force"]) == 0
    check_with_transformers(model, tiny_tokenizer, target, 1e-4)


# --- llama.cpp itself (skipped unless llama-cpp-python is installed: `make llama-cpp`) -------------


def llama_cpp_logits(path, ids: list[int]) -> np.ndarray:
    from minigpts.llama_cpp_check import llama_logits

    return llama_logits(path, ids)


@pytest.mark.parametrize(
    "name, vary, hidden",
    [
        ("llama", False, False),
        ("llama", True, True),
        ("qwen2", True, False),
        ("qwen2", False, True),
        ("phi", False, False),
    ],
)
def test_llama_cpp_runs_every_layout_with_our_logits(tmp_path, name, vary, hidden):
    pytest.importorskip("llama_cpp")
    if name == "phi":
        model = make_tiny_model("phi", VOCAB)
    else:
        model, _ = prune(name, vary=vary, hidden=hidden)
    tokenizer = _tokenizer_for(VOCAB)
    path = export_gguf(model, tokenizer, tmp_path / "m.gguf").path
    ids = tokenizer(SAMPLE_TEXT[:200], add_special_tokens=False)["input_ids"][:40]
    ours = logits(model, torch.tensor([ids]))[0].numpy()
    theirs = llama_cpp_logits(path, ids)
    assert np.abs(ours - theirs).max() < 1e-3


def test_llama_cpp_with_flash_attention_keeps_our_logits(tmp_path):
    """The decode benchmark times llama.cpp with flash attention on (its tools' CPU default) too."""
    pytest.importorskip("llama_cpp")
    from minigpts.llama_cpp_check import llama_logits, open_model

    model, _ = prune("llama", vary=True, hidden=True)
    tokenizer = _tokenizer_for(VOCAB)
    path = export_gguf(model, tokenizer, tmp_path / "m.gguf").path
    ids = tokenizer(SAMPLE_TEXT[:200], add_special_tokens=False)["input_ids"][:40]
    ours = logits(model, torch.tensor([ids]))[0].numpy()
    theirs = llama_logits(open_model(path, n_ctx=64, logits_all=True, flash_attn=True), ids)
    assert np.abs(ours - theirs).max() < 1e-3


@pytest.mark.parametrize(
    "kind", ["byte-level", "sentencepiece-legacy", "sentencepiece", "sentencepiece-gemma"]
)
def test_llama_cpp_tokenizes_as_we_do(tmp_path, kind):
    pytest.importorskip("llama_cpp")
    from minigpts.llama_cpp_check import llama_tokenize

    tokenizer = TOKENIZERS[kind]()
    selection = select_vocab(tokenizer, count_tokens(tokenizer, domain_sample()), embedding_threshold=0)
    trimmed = trim_tokenizer(tokenizer, selection.keep_ids)
    model = slice_model_vocab(make_tiny_llama(len(tokenizer)), selection.keep_ids)
    result = export_gguf(model, trimmed, tmp_path / "m.gguf")
    path = result.path
    texts = TEXTS + ["<|im_start|>user\nhi<|im_end|>\n<tool_call>x", "<s>x", "x</s> y", " x"]
    if kind == "sentencepiece":
        # Metaspace(prepend_scheme="first"): llama.cpp has only "always" (the note says so)
        assert any("prepend_scheme='first'" in note for note in result.notes)
        texts = [t for t in texts if not t[:1].isspace() and "<s>" not in t and "</s>" not in t]
    for text in texts:
        assert llama_tokenize(path, text) == trimmed(text, add_special_tokens=False)["input_ids"], text


def _run_to_gguf(tmp_path, tiny_tokenizer, outtype: str):
    """`minigpts run` on a tiny model, per-layer, 25 % of the MLP, ending with a GGUF of ``outtype``:
    (exit code, GGUFReader of the file)."""
    from gguf import GGUFReader

    model_dir = tmp_path / "tiny"
    make_tiny_llama(len(tiny_tokenizer)).save_pretrained(model_dir)
    tiny_tokenizer.save_pretrained(model_dir)
    target = tmp_path / "run.gguf"
    args = ["run", "--model", str(model_dir), "--device", "cpu", "--data", "sample", "--seq-len", "32"]
    args += [
        "--max-eval-tokens",
        "128",
        "--calib-tokens",
        "256",
        "--mlp-ratio",
        "0.25",
        "--layout",
        "per-layer",
    ]
    code = main([*args, "--out", str(tmp_path / "out"), "--gguf", str(target), "--gguf-outtype", outtype])
    return code, GGUFReader(str(target)) if code == 0 else None


def test_run_writes_the_final_model_as_gguf_too(tmp_path, tiny_tokenizer, capsys):
    code, reader = _run_to_gguf(tmp_path, tiny_tokenizer, "f16")
    assert code == 0, capsys.readouterr().err
    assert reader.fields["general.architecture"].contents() in {"deci", "llama"}
    assert reader.fields["general.file_type"].contents() == 1  # MOSTLY_F16


def test_run_with_a_q8_0_gguf_rounds_widths_to_whole_blocks(tmp_path, tiny_tokenizer, capsys):
    code, reader = _run_to_gguf(tmp_path, tiny_tokenizer, "q8_0")
    out = capsys.readouterr().out
    assert code == 0
    assert "MLP widths in multiples of 32 (--round-to 32) for the q8_0 GGUF" in out
    types = {t.name: t.tensor_type.name for t in reader.tensors if len(t.shape) > 1}
    assert set(types.values()) == {"Q8_0"}, types

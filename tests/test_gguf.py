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

from minigpts.cli import main
from minigpts.export import save_model
from minigpts.export_gguf import GgufUnsupported, export_gguf, gguf_layout, load_gguf_with_transformers
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


@pytest.mark.parametrize("kind", ["byte-level", "sentencepiece", "sentencepiece-legacy"])
def test_trimmed_vocabulary_keeps_our_ids_in_the_gguf(tmp_path, kind):
    tokenizer = {
        "byte-level": byte_level_bpe,
        "sentencepiece": lambda: sentencepiece_bpe(False),
        "sentencepiece-legacy": lambda: sentencepiece_bpe(True),
    }[kind]()
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


@pytest.mark.parametrize("kind", ["byte-level", "sentencepiece-legacy", "sentencepiece"])
def test_llama_cpp_tokenizes_as_we_do(tmp_path, kind):
    pytest.importorskip("llama_cpp")
    from minigpts.llama_cpp_check import llama_tokenize

    tokenizer = {
        "byte-level": byte_level_bpe,
        "sentencepiece-legacy": lambda: sentencepiece_bpe(True),
        "sentencepiece": lambda: sentencepiece_bpe(False),
    }[kind]()
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


def test_run_writes_the_final_model_as_gguf_too(tmp_path, tiny_tokenizer, capsys):
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
    code = main([*args, "--out", str(tmp_path / "out"), "--gguf", str(target), "--gguf-outtype", "f16"])
    assert code == 0, capsys.readouterr().err
    reader = GGUFReader(str(target))
    assert reader.fields["general.architecture"].contents() in {"deci", "llama"}
    assert reader.fields["general.file_type"].contents() == 1  # MOSTLY_F16

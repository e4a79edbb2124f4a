"""Vocabulary trimming keeps the tokenizer lossless and the model's kept logits unchanged.

Fast tests use tokenizers trained here on the bundled sample corpus: a byte-level BPE (GPT-2 /
SmolLM style) and a SentencePiece-style BPE with byte fallback (Llama-2 / Mistral style, in its
Metaspace and its legacy-normalizer form). Slow tests repeat the properties on SmolLM2's real
49,152-token tokenizer trimmed to a medical-corpus sample, and generate with the trimmed model.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import make_tiny_model
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    GPT2Tokenizer,
    LlamaConfig,
    LlamaTokenizer,
    PreTrainedTokenizerFast,
)

import minigpts
from minigpts.errors import UserError
from minigpts.vocab import (
    BYTE_FALLBACK,
    BYTE_LEVEL,
    count_tokens,
    remap_ids,
    select_vocab,
    slice_model_vocab,
    trim_tokenizer,
    vocab_summary,
)

SAMPLE_DIR = Path(minigpts.__file__).parent / "sample_data"
MEDICAL = Path("/work/shared/datasets/medical.train.jsonl")
PROPERTY = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Pieces that stress a tokenizer: controls, CRLF, tabs, combining marks, emoji with modifiers and
# ZWJ, CJK, the largest code point, BOM, C1 controls and mojibake that look like broken bytes.
AWKWARD = [
    "\x00",
    "\r\n",
    "\t",
    "   ",
    "a\u0301",
    "👍🏽",
    "👨\u200d👩\u200d👧",
    "漢字かな",
    "\U0010ffff",
    "\U00040000",
    "\x04\x1d",
    "\ufeff",
    "\x80\x81\x9f",
    "Ã©Ã¨",
    "\ufffd",
    "ﬁ",
    "<0x41>",
    "Ġ",
]
awkward_text = st.lists(
    st.one_of(
        st.text(st.characters(codec="utf-8"), max_size=12),
        st.sampled_from(AWKWARD),
        st.builds(
            lambda piece, n: piece * n, st.sampled_from(AWKWARD + ["a", " ", "ab"]), st.integers(2, 60)
        ),
    ),
    max_size=8,
).map("".join)


def read_sample(split: str) -> list[str]:
    return [json.loads(line)["text"] for line in (SAMPLE_DIR / f"economics.{split}.jsonl").open()]


def domain_sample() -> list[str]:
    """A few KB of held-out text: small enough that many learned tokens go unseen."""
    return [text[:2500] for text in read_sample("valid")]


def words_text(words: list[str]):
    """Runs of corpus words: text whose pieces the domain has mostly seen."""
    return st.lists(st.sampled_from(words), min_size=1, max_size=12).map(lambda ws: " " + " ".join(ws))


def tokenizer_json(tokenizer) -> dict:
    return json.loads(tokenizer.backend_tokenizer.to_str())


def pieces(tokenizer, text: str) -> list[str]:
    return tokenizer.convert_ids_to_tokens(tokenizer.encode(text, add_special_tokens=False))


# ---------------------------------------------------------------------------------------------
# Tokenizers built in the test


def byte_level_bpe() -> PreTrainedTokenizerFast:
    """GPT-2 / SmolLM-style byte-level BPE; a BOS added after training so remapping moves its id."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=900,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(read_sample("train")[:6], trainer)
    tok.add_special_tokens(["<|begin|>"])
    tok.add_tokens(["<tool_call>"])
    tok.post_processor = processors.TemplateProcessing(
        single="<|begin|> $A",
        pair="<|begin|> $A $B",
        special_tokens=[("<|begin|>", tok.token_to_id("<|begin|>"))],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|begin|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        chat_template=CHAT_TEMPLATE,
    )


def sentencepiece_bpe(legacy: bool) -> PreTrainedTokenizerFast:
    """Llama-2-style BPE with byte fallback: <unk> <s> </s>, <0x00>..<0xFF>, then learned pieces.

    `legacy` uses the Prepend/Replace normalizers of older Llama tokenizer.json files instead of
    the Metaspace pre-tokenizer.
    """
    metaspace = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    learner = Tokenizer(models.BPE(unk_token="<unk>"))
    learner.pre_tokenizer = metaspace
    trainer = trainers.BpeTrainer(
        vocab_size=700, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False
    )
    learner.train_from_iterator(read_sample("train")[:6], trainer)
    learned = json.loads(learner.to_str())["model"]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2} | {f"<0x{b:02X}>": 3 + b for b in range(256)}
    for piece, _ in sorted(learned["vocab"].items(), key=lambda item: item[1]):
        vocab.setdefault(piece, len(vocab))
    merges = [tuple(m) for m in learned["merges"]]
    tok = Tokenizer(
        models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True)
    )
    if legacy:
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    else:
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    tok.add_special_tokens(["<unk>", "<s>", "</s>"])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


class TrimmedCase(SimpleNamespace):
    """Everything one trimming produced; a short repr keeps hypothesis reports readable."""

    def __repr__(self) -> str:
        return f"TrimmedCase({self.selection.tokenizer_kind}, {self.selection.vocab_before} → {self.selection.vocab_after})"


def trimmed_case(tokenizer, domain_texts: list[str], tmp_path_factory) -> TrimmedCase:
    """Trim `tokenizer` to the tokens seen in `domain_texts`; also save and reload the result."""
    counts = count_tokens(tokenizer, domain_texts)
    selection = select_vocab(tokenizer, counts, embedding_threshold=0)
    trimmed = trim_tokenizer(tokenizer, selection.keep_ids)
    directory = tmp_path_factory.mktemp("trimmed-tokenizer")
    trimmed.save_pretrained(directory)
    reloaded = AutoTokenizer.from_pretrained(directory)
    words = sorted({w for text in domain_texts for w in text.split()})
    new_ids = np.full(len(tokenizer), -1)
    new_ids[selection.keep_ids] = np.arange(len(selection.keep_ids))
    return TrimmedCase(
        original=tokenizer,
        counts=counts,
        selection=selection,
        trimmed=trimmed,
        reloaded=reloaded,
        words=words,
        kept=new_ids >= 0,
        new_ids=new_ids,
        original_is_exact=original_is_exact(tokenizer),
        texts=domain_texts,
    )


@pytest.fixture(scope="module")
def byte_case(tmp_path_factory):
    return trimmed_case(byte_level_bpe(), domain_sample(), tmp_path_factory)


@pytest.fixture(scope="module", params=[False, True], ids=["metaspace", "legacy-normalizers"])
def sp_case(request, tmp_path_factory):
    return trimmed_case(sentencepiece_bpe(request.param), domain_sample(), tmp_path_factory)


# ---------------------------------------------------------------------------------------------
# Shared property checks


def original_is_exact(tokenizer):
    """A predicate: does the original tokenizer itself round-trip a text exactly?

    Byte-level: every UTF-8 byte of the text has its alphabet token (SmolLM2 lacks 21 of the 256,
    e.g. the controls U+0004 and U+0006 and the lead bytes of planes 4-11, and drops those bytes).
    Byte fallback: no literal space marker ▁, and with Metaspace prepend "first" + Strip decoder
    no leading space (it merges with the prepended one); with the legacy normalizers, no special token's
    text either (the text is split there and each piece after it gets its own prepended ▁: "<s>0"
    decodes as "<s> 0", the original's own behaviour).
    """
    data = tokenizer_json(tokenizer)
    if not data["model"]["byte_fallback"]:
        encodable = {b for b, c in bytes_to_alphabet().items() if c in data["model"]["vocab"]}
        return lambda text: set(text.encode()) <= encodable
    legacy = data["pre_tokenizer"] is None
    specials = [token["content"] for token in data["added_tokens"]] if legacy else []
    return lambda text: (
        "▁" not in text
        and (legacy or not text.startswith(" "))
        and not any(special in text for special in specials)
    )


def bytes_to_alphabet() -> dict[int, str]:
    """GPT-2's byte → printable character table, written out independently of the code under test."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    others = [b for b in range(256) if b not in printable]
    table = {b: chr(b) for b in printable}
    table.update({b: chr(256 + n) for n, b in enumerate(others)})
    return table


def check_roundtrip(case, text: str) -> None:
    """Trimmed decode∘encode gives what the original's gives, which is `text` wherever the original is exact."""
    original = case.original
    expected = original.decode(original.encode(text, add_special_tokens=False))
    if case.original_is_exact(text):
        assert expected == text
    ids = case.trimmed.encode(text, add_special_tokens=False)
    assert all(0 <= i < len(case.trimmed) for i in ids)
    assert case.trimmed.decode(ids) == expected


def check_same_pieces(case, text: str) -> bool:
    """Text the original encodes with kept tokens only is encoded to the same pieces after trimming."""
    ids = case.original.encode(text, add_special_tokens=False)
    if not case.kept[ids].all():
        return False
    assert pieces(case.trimmed, text) == case.original.convert_ids_to_tokens(ids)
    assert case.trimmed.encode(text, add_special_tokens=False) == case.new_ids[ids].tolist()
    return True


def check_reload(case, text: str) -> None:
    for add_special in (False, True):
        assert case.reloaded.encode(text, add_special_tokens=add_special) == case.trimmed.encode(
            text, add_special_tokens=add_special
        )


def check_structure(case) -> None:
    """Closure and specials: every trimmed merge is complete, every kept merge result still reachable."""
    data = tokenizer_json(case.trimmed)
    vocab = data["model"]["vocab"]
    merges = {tuple(m) for m in data["model"]["merges"]}
    assert all(a in vocab and b in vocab and a + b in vocab for a, b in merges)
    for a, b in (tuple(m) for m in tokenizer_json(case.original)["model"]["merges"]):
        if a + b in vocab:  # a kept merge result keeps every merge that builds it
            assert (a, b) in merges
    assert sorted(vocab.values()) == list(range(len(vocab)))
    for token, token_id in case.original.get_added_vocab().items():
        assert case.trimmed.convert_tokens_to_ids(token) == remap_ids(token_id, case.selection.keep_ids)
    assert case.trimmed.special_tokens_map == case.original.special_tokens_map
    assert case.trimmed.chat_template == case.original.chat_template
    assert case.reloaded.chat_template == case.original.chat_template
    assert case.reloaded.special_tokens_map == case.original.special_tokens_map
    assert case.reloaded.all_special_ids == case.trimmed.all_special_ids


def check_corpus_identical(case) -> None:
    """The domain corpus and every kept token's own text tokenize as before (deterministic, complete)."""
    for text in case.texts:
        assert check_same_pieces(case, text)
    checked = 0
    for token_id in case.selection.keep_ids:
        checked += check_same_pieces(case, case.original.decode([token_id]))
    assert checked > 0.5 * len(case.selection.keep_ids)


# ---------------------------------------------------------------------------------------------
# Byte-level BPE (fast)


@PROPERTY
@given(text=awkward_text)
def test_byte_level_roundtrip(byte_case, text):
    check_roundtrip(byte_case, text)
    check_reload(byte_case, text)


@PROPERTY
@given(data=st.data())
def test_byte_level_kept_text_tokenizes_identically(byte_case, data):
    text = data.draw(st.one_of(words_text(byte_case.words), awkward_text))
    check_same_pieces(byte_case, text)
    check_reload(byte_case, text)


def test_byte_level_structure_and_corpus(byte_case):
    assert byte_case.selection.tokenizer_kind == BYTE_LEVEL
    assert byte_case.selection.vocab_after < 0.9 * byte_case.selection.vocab_before
    check_structure(byte_case)
    check_corpus_identical(byte_case)
    text = "Supply and demand."
    with_bos = byte_case.trimmed.encode(text)
    assert with_bos[0] == byte_case.trimmed.bos_token_id == len(byte_case.trimmed) - 2
    assert byte_case.trimmed.decode(with_bos, skip_special_tokens=True) == text
    chat = [{"role": "user", "content": "Why do prices rise?"}]
    assert byte_case.trimmed.apply_chat_template(
        chat, tokenize=False
    ) == byte_case.original.apply_chat_template(chat, tokenize=False)


# ---------------------------------------------------------------------------------------------
# SentencePiece-style BPE with byte fallback (fast)


@PROPERTY
@given(text=awkward_text)
@example(text="<s>0")  # legacy normalizers: the original itself decodes it as "<s> 0"
def test_byte_fallback_roundtrip(sp_case, text):
    check_roundtrip(sp_case, text)
    check_reload(sp_case, text)


@PROPERTY
@given(data=st.data())
def test_byte_fallback_kept_text_tokenizes_identically(sp_case, data):
    text = data.draw(st.one_of(words_text(sp_case.words), awkward_text))
    check_same_pieces(sp_case, text)
    check_reload(sp_case, text)


def test_byte_fallback_structure_and_corpus(sp_case):
    assert sp_case.selection.tokenizer_kind == BYTE_FALLBACK
    kept_tokens = set(sp_case.trimmed.get_vocab())
    assert {f"<0x{b:02X}>" for b in range(256)} | {"▁", "<unk>", "<s>", "</s>"} <= kept_tokens
    assert sp_case.selection.vocab_after < 0.95 * sp_case.selection.vocab_before
    check_structure(sp_case)
    check_corpus_identical(sp_case)
    assert sp_case.trimmed.encode("GDP")[0] == sp_case.trimmed.bos_token_id == 1


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_model_specific_tokenizer_classes(kind, tmp_path_factory):
    """Classes that rebuild their own pipeline (LlamaTokenizer, GPT2Tokenizer) trim like the generic one."""
    source = sentencepiece_bpe(legacy=False) if kind == "llama" else byte_level_bpe()
    model = tokenizer_json(source)["model"]
    merges = [tuple(m) for m in model["merges"]]
    if kind == "llama":
        tokenizer = LlamaTokenizer(vocab=model["vocab"], merges=merges, add_bos_token=True)
    else:
        tokenizer = GPT2Tokenizer(vocab=model["vocab"], merges=merges)
    case = trimmed_case(tokenizer, domain_sample(), tmp_path_factory)
    assert type(case.reloaded).__name__ == "TokenizersBackend"
    check_corpus_identical(case)
    for text in ["Supply and demand.", "wörld 👍\n\ttabs", "\x00 漢字"]:
        check_roundtrip(case, text)
        check_reload(case, text)
    assert case.trimmed.encode("GDP")[0] == (1 if kind == "llama" else case.trimmed.encode("G")[0])


# ---------------------------------------------------------------------------------------------
# Selection


def reference_keep(tokenizer, counts, model_config=None) -> set[int]:
    """threshold 0 written out independently: seen ∪ forced, closed by fixed-point iteration."""
    data = tokenizer_json(tokenizer)
    vocab = data["model"]["vocab"]
    keep = set(np.flatnonzero(counts).tolist())
    keep |= {t["id"] for t in data["added_tokens"]}
    if data["model"]["byte_fallback"]:
        keep |= {vocab[p] for p in [f"<0x{b:02X}>" for b in range(256)] + ["▁", "<unk>"]}
    else:
        keep |= {vocab[c] for c in bytes_to_alphabet().values() if c in vocab}
    if tokenizer.chat_template:
        for roles in (("system", "user", "assistant"), ("user", "assistant")):
            probe = [{"role": role, "content": ""} for role in roles]
            rendered = tokenizer.apply_chat_template(probe, tokenize=False, add_generation_prompt=True)
            keep |= set(tokenizer.encode(rendered, add_special_tokens=False))
    if model_config is not None:
        keep |= {model_config.bos_token_id, model_config.eos_token_id}
    merges = [tuple(m) for m in data["model"]["merges"]]
    changed = True
    while changed:
        before = len(keep)
        for a, b in merges:
            if vocab[a + b] in keep:
                keep |= {vocab[a], vocab[b]}
        changed = len(keep) != before
    return keep


def reasons_add_up(s) -> bool:
    """Every kept token is counted under exactly one reason."""
    reasons = s.kept_special + s.kept_byte + s.kept_seen + s.kept_widened + s.kept_closure
    return reasons == s.vocab_after == len(s.keep_ids)


def test_threshold_zero_keeps_seen_forced_and_closure(byte_case, sp_case):
    for case in (byte_case, sp_case):
        assert set(case.selection.keep_ids) == reference_keep(case.original, case.counts)
        s = case.selection
        assert reasons_add_up(s) and s.kept_widened == 0
        assert s.keep_ids == sorted(s.keep_ids)
        assert s.kept_closure > 0
        assert json.loads(json.dumps(s.to_dict())) == s.to_dict()


def test_config_ids_are_forced(byte_case):
    tokenizer = byte_case.original
    dropped = sorted(set(range(len(tokenizer))) - set(byte_case.selection.keep_ids))
    config = LlamaConfig(bos_token_id=dropped[-1], eos_token_id=tokenizer.eos_token_id)
    generation = GenerationConfig(eos_token_id=[tokenizer.eos_token_id, dropped[0]])
    selection = select_vocab(
        tokenizer, byte_case.counts, embedding_threshold=0, model_config=config, generation_config=generation
    )
    assert {dropped[0], dropped[-1]} <= set(selection.keep_ids)
    assert set(selection.keep_ids) >= reference_keep(tokenizer, byte_case.counts, config)
    with pytest.raises(UserError, match="bos_token_id"):
        select_vocab(tokenizer, byte_case.counts, min_count=1, model_config=LlamaConfig(bos_token_id=10**6))


def test_keep_general_adds_the_first_merges_and_stays_closed(byte_case):
    tokenizer = byte_case.original
    spec = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    merges = [m.split(" ", 1) if isinstance(m, str) else m for m in spec["merges"]]
    n = len(merges) // 2
    general = {spec["vocab"][a + b] for a, b in merges[:n]}
    selection = select_vocab(tokenizer, byte_case.counts, embedding_threshold=0, keep_general=n)
    kept = set(selection.keep_ids)
    assert general <= kept
    assert kept == set(byte_case.selection.keep_ids) | general
    assert selection.kept_seen == byte_case.selection.kept_seen
    assert reasons_add_up(selection)
    trimmed = trim_tokenizer(tokenizer, selection.keep_ids)
    text = "general tokens 東京 🚀"
    assert trimmed.decode(trimmed(text, add_special_tokens=False)["input_ids"]) == text
    with pytest.raises(UserError, match="--vocab-keep-general"):
        select_vocab(tokenizer, byte_case.counts, embedding_threshold=0, keep_general=-1)
    with pytest.raises(UserError, match="does not combine"):
        select_vocab(tokenizer, byte_case.counts, vocab_size=len(kept), keep_general=3)


def test_keep_expected_adds_the_most_expected_tokens_and_stays_closed(byte_case):
    tokenizer = byte_case.original
    rng = np.random.default_rng(0)
    expected = rng.random(len(tokenizer) + 5)  # padded like a model's logits: the tail is ignored
    k = 40
    top = set(np.argsort(-expected[: len(tokenizer)], kind="stable")[:k].tolist())
    selection = select_vocab(
        tokenizer, byte_case.counts, embedding_threshold=0, expected=expected, keep_expected=k
    )
    kept = set(selection.keep_ids)
    assert top <= kept
    plain = select_vocab(tokenizer, byte_case.counts, embedding_threshold=0)
    # the reasons stay honest: the criterion's tokens are still "seen", the rest counted as widened
    assert selection.kept_seen == plain.kept_seen
    # widened: the top-k not chosen by the criterion (some may have been merge parents before)
    assert 0 < len(top - set(plain.keep_ids)) <= selection.kept_widened <= k
    assert reasons_add_up(selection)
    parents = {tokenizer.convert_tokens_to_ids(a + b): (a, b) for a, b in merge_pairs(tokenizer)}
    for token_id in kept:  # every kept merge result keeps both parents: the BPE stays valid
        if token_id in parents:
            assert set(tokenizer.convert_tokens_to_ids(list(parents[token_id]))) <= kept
    trimmed = trim_tokenizer(tokenizer, selection.keep_ids)
    text = "expected tokens 東京 🚀"
    assert trimmed.decode(trimmed(text, add_special_tokens=False)["input_ids"]) == text
    with pytest.raises(UserError, match="needs the model's expected"):
        select_vocab(tokenizer, byte_case.counts, embedding_threshold=0, keep_expected=3)
    with pytest.raises(UserError, match="does not combine"):
        select_vocab(tokenizer, byte_case.counts, vocab_size=len(kept), expected=expected, keep_expected=3)
    with pytest.raises(UserError, match="--vocab-keep-expected"):
        select_vocab(tokenizer, byte_case.counts, embedding_threshold=0, expected=expected, keep_expected=-2)


def merge_pairs(tokenizer) -> list[tuple[str, str]]:
    spec = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    return [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in spec["merges"]]


def test_expected_token_counts_are_summed_next_token_probabilities(byte_case):
    from minigpts.vocab import expected_token_counts

    tokenizer = byte_case.original
    model = tiny_model("llama", len(tokenizer), tokenizer, tied=True)
    windows = torch.randint(0, len(tokenizer), (3, 12), generator=torch.Generator().manual_seed(1))
    expected = expected_token_counts(model, windows, batch_size=2, progress=False)
    with torch.no_grad():
        reference = torch.softmax(model(windows).logits.double(), -1).sum((0, 1))
    assert expected.shape == (len(tokenizer),)
    assert expected.sum() == pytest.approx(windows.numel(), rel=1e-6)
    assert np.allclose(expected, reference.numpy(), rtol=1e-4, atol=1e-6)


@settings(max_examples=30, deadline=None)
@given(threshold=st.floats(0, 0.01), factor=st.floats(1, 10))
def test_thresholds_are_monotone(byte_case, threshold, factor):
    low = select_vocab(byte_case.original, byte_case.counts, embedding_threshold=threshold)
    high = select_vocab(byte_case.original, byte_case.counts, embedding_threshold=threshold * factor)
    assert set(high.keep_ids) <= set(low.keep_ids)


def test_min_count_one_equals_threshold_zero(byte_case):
    by_count = select_vocab(byte_case.original, byte_case.counts, min_count=1)
    assert by_count.keep_ids == byte_case.selection.keep_ids
    fewer = select_vocab(byte_case.original, byte_case.counts, min_count=5)
    assert set(fewer.keep_ids) < set(by_count.keep_ids)


@settings(max_examples=25, deadline=None)
@given(fraction=st.floats(0, 1))
def test_vocab_size_gives_exactly_k_closed(byte_case, fraction):
    tokenizer, counts = byte_case.original, byte_case.counts
    floor = len(reference_keep(tokenizer, np.zeros_like(counts)))
    k = floor + round(fraction * (len(tokenizer) - floor))
    selection = select_vocab(tokenizer, counts, vocab_size=k)
    assert selection.vocab_after == len(selection.keep_ids) == k
    assert set(selection.keep_ids) == reference_keep(
        tokenizer, np.isin(np.arange(len(counts)), selection.keep_ids)
    )
    with pytest.raises(UserError, match="--vocab-size"):
        select_vocab(tokenizer, counts, vocab_size=floor - 1)


def test_vocab_size_prefers_frequent_tokens(byte_case):
    counts = byte_case.counts
    selection = select_vocab(byte_case.original, counts, vocab_size=byte_case.selection.vocab_after - 50)
    kept = set(selection.keep_ids)
    dropped_seen = [c for i, c in enumerate(counts) if c > 0 and i not in kept]
    assert dropped_seen and max(dropped_seen) <= np.median(counts[counts > 0])


def test_count_tokens_and_precomputed_counts(byte_case):
    tokenizer = byte_case.original
    texts = byte_case.texts
    naive = np.zeros(len(tokenizer), dtype=np.int64)
    for text in texts:
        np.add.at(naive, tokenizer.encode(text, add_special_tokens=False), 1)
    assert count_tokens(tokenizer, texts, batch_size=1).tolist() == naive.tolist()
    # A bincount of calibration windows, short (no minlength) or padded to the embedding size.
    ids = np.concatenate([tokenizer.encode(t, add_special_tokens=False) for t in texts])
    for counts in (np.bincount(ids), np.bincount(ids, minlength=len(tokenizer) + 64)):
        assert select_vocab(tokenizer, counts, embedding_threshold=0).keep_ids == byte_case.selection.keep_ids


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({}, "exactly one"),
        ({"embedding_threshold": 0, "min_count": 1}, "exactly one"),
        ({"embedding_threshold": -1e-3}, "--embedding-threshold"),
        ({"embedding_threshold": float("nan")}, "--embedding-threshold"),
        ({"min_count": 0}, "--vocab-min-count"),
        ({"vocab_size": 10.5}, "--vocab-size"),
        ({"vocab_size": True}, "--vocab-size"),
    ],
)
def test_bad_selection_arguments(byte_case, kwargs, match):
    with pytest.raises(UserError, match=match):
        select_vocab(byte_case.original, byte_case.counts, **kwargs)


def test_bad_counts(byte_case):
    tokenizer = byte_case.original
    with pytest.raises(UserError, match="another tokenizer"):
        select_vocab(tokenizer, np.ones(len(tokenizer) + 3, dtype=np.int64), min_count=1)
    with pytest.raises(UserError, match="empty"):
        select_vocab(tokenizer, np.zeros(len(tokenizer)), embedding_threshold=0)
    with pytest.raises(UserError, match="negative"):
        select_vocab(tokenizer, -np.ones(len(tokenizer)), min_count=1)


def test_bad_keep_ids(byte_case):
    tokenizer, keep = byte_case.original, byte_case.selection.keep_ids
    byte_id = tokenizer.convert_tokens_to_ids("Ā")
    with pytest.raises(UserError, match="byte/special"):
        trim_tokenizer(tokenizer, [i for i in keep if i != byte_id])
    with pytest.raises(UserError, match="ascending"):
        trim_tokenizer(tokenizer, keep[::-1])
    with pytest.raises(UserError, match="distinct"):
        trim_tokenizer(tokenizer, keep + [len(tokenizer)])
    with pytest.raises(UserError, match="not among the kept"):
        remap_ids([keep[0], max(set(range(len(tokenizer))) - set(keep))], keep)


def unsupported_tokenizers():
    texts = read_sample("train")[:1]

    def trained(model, trainer, pre_tokenizer):
        tok = Tokenizer(model)
        tok.pre_tokenizer = pre_tokenizer
        tok.train_from_iterator(texts, trainer)
        return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")

    whitespace = pre_tokenizers.Whitespace()
    return {
        "WordPiece": trained(
            models.WordPiece(unk_token="[UNK]"),
            trainers.WordPieceTrainer(vocab_size=300, special_tokens=["[UNK]"], show_progress=False),
            whitespace,
        ),
        "Unigram": trained(
            models.Unigram(),
            trainers.UnigramTrainer(
                vocab_size=300, special_tokens=["[UNK]"], unk_token="[UNK]", show_progress=False
            ),
            pre_tokenizers.Metaspace(),
        ),
        "neither": trained(
            models.BPE(unk_token="[UNK]"),
            trainers.BpeTrainer(vocab_size=300, special_tokens=["[UNK]"], show_progress=False),
            whitespace,
        ),
    }


def test_unsupported_tokenizer_types():
    for name, tokenizer in unsupported_tokenizers().items():
        counts = count_tokens(tokenizer, ["supply and demand"])
        with pytest.raises(UserError, match=name):
            select_vocab(tokenizer, counts, embedding_threshold=0)
        with pytest.raises(UserError, match=name):
            trim_tokenizer(tokenizer, list(range(len(tokenizer))))


# ---------------------------------------------------------------------------------------------
# Model surgery (fast)


def tiny_model(family: str, vocab_size: int, tokenizer, tied: bool):
    ids = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    shape = {
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "max_position_embeddings": 2048,
    }
    name, widths = {
        "llama": ("llama-tied", {"intermediate_size": 64, "num_key_value_heads": 2}),
        "phi": ("phi", {"intermediate_size": 64}),
        "opt": ("opt", {"ffn_dim": 64, "word_embed_proj_dim": 32}),
    }[family]
    model = make_tiny_model(name, vocab_size, perturb=0, **shape, **widths, tie_word_embeddings=tied, **ids)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=[tokenizer.eos_token_id, tokenizer.bos_token_id]
    )
    head = model.get_output_embeddings()
    if head.bias is not None:  # random init leaves it zero: make it count
        torch.nn.init.normal_(head.bias)
    return model.eval()


MODEL_CASES = [("llama", True), ("llama", False), ("phi", False), ("opt", True)]


@pytest.mark.parametrize(
    "family, tied", MODEL_CASES, ids=[f"{f}-{'tied' if t else 'untied'}" for f, t in MODEL_CASES]
)
def test_slice_model_vocab(byte_case, tmp_path, family, tied):
    tokenizer, selection = byte_case.original, byte_case.selection
    keep = selection.keep_ids
    padded_rows = len(tokenizer) + 7  # like models that pad their embedding beyond the tokenizer
    model = tiny_model(family, padded_rows, tokenizer, tied)
    original = copy.deepcopy(model)
    summary = vocab_summary(model, selection)
    slice_model_vocab(model, keep)

    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    assert embedding.weight.shape[0] == head.weight.shape[0] == len(keep) == model.config.vocab_size
    assert (head.weight is embedding.weight) == tied
    assert (head.bias is not None) == (family == "phi")
    assert summary.parameters_after == sum(p.numel() for p in model.parameters())
    assert summary.embedding_rows_before == padded_rows and summary.tied == tied
    new = remap_ids
    assert model.config.bos_token_id == new(tokenizer.bos_token_id, keep) == byte_case.trimmed.bos_token_id
    assert model.config.eos_token_id == byte_case.trimmed.eos_token_id
    assert model.config.pad_token_id == byte_case.trimmed.pad_token_id
    assert model.generation_config.eos_token_id == [
        byte_case.trimmed.eos_token_id,
        byte_case.trimmed.bos_token_id,
    ]

    # Text that tokenizes identically gives the same logits over the kept rows.
    text = byte_case.texts[0][:400]
    old_ids = torch.tensor([tokenizer.encode(text)])
    new_ids = torch.tensor([byte_case.trimmed.encode(text)])
    assert new_ids.tolist() == [remap_ids(old_ids[0].tolist(), keep)]
    with torch.no_grad():
        expected = original(old_ids).logits[..., keep]
        actual = model(new_ids).logits
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=0)

    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert (reloaded.get_output_embeddings().weight is reloaded.get_input_embeddings().weight) == tied
    assert reloaded.config.vocab_size == len(keep)
    assert reloaded.generation_config.eos_token_id == model.generation_config.eos_token_id
    for name, tensor in model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], tensor), name
    with torch.no_grad():
        assert torch.equal(reloaded(new_ids).logits, actual)


@pytest.fixture(scope="module")
def sliced_phi(byte_case):
    model = tiny_model("phi", len(byte_case.original), byte_case.original, tied=False)
    return model, slice_model_vocab(copy.deepcopy(model), byte_case.selection.keep_ids)


@settings(max_examples=15, deadline=None)
@given(data=st.data())
def test_sliced_logits_match_on_random_kept_ids(byte_case, sliced_phi, data):
    keep = byte_case.selection.keep_ids
    original, model = sliced_phi
    old = data.draw(st.lists(st.sampled_from(keep), min_size=1, max_size=24))
    with torch.no_grad():
        expected = original(torch.tensor([old])).logits[..., keep]
        actual = model(torch.tensor([remap_ids(old, keep)])).logits
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=0)


def test_slice_refuses_to_drop_a_special_id(byte_case):
    tokenizer = byte_case.original
    model = tiny_model("llama", len(tokenizer), tokenizer, tied=True)
    keep = [i for i in byte_case.selection.keep_ids if i != tokenizer.eos_token_id]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(UserError, match="eos_token_id"):
        slice_model_vocab(model, keep)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert model.config.vocab_size == len(tokenizer)


# ---------------------------------------------------------------------------------------------
# SmolLM2 (slow): the real 49,152-token byte-level tokenizer and model


@pytest.fixture(scope="module")
def smol_case(smollm2, tmp_path_factory):
    """SmolLM2's tokenizer trimmed to 200 MedQuAD records (the bundled medical sample without ../shared)."""
    source = MEDICAL if MEDICAL.exists() else SAMPLE_DIR / "medical.test.jsonl"
    records = [json.loads(line) for _, line in zip(range(200), source.open())]
    texts = [r.get("text") or f"{r['question']}\n{r['answer']}" for r in records]
    return trimmed_case(smollm2.tokenizer, texts, tmp_path_factory)


@pytest.mark.slow
@PROPERTY
@given(data=st.data())
def test_smollm2_trimmed_tokenizer_properties(smol_case, data):
    text = data.draw(awkward_text)
    check_roundtrip(smol_case, text)
    check_reload(smol_case, text)
    check_same_pieces(smol_case, data.draw(words_text(smol_case.words)))


@pytest.mark.slow
def test_smollm2_trimmed_structure(smol_case):
    selection = smol_case.selection
    assert selection.vocab_before == 49152
    assert selection.vocab_after <= 0.6 * selection.vocab_before
    assert set(selection.keep_ids) == reference_keep(smol_case.original, smol_case.counts)
    check_structure(smol_case)
    check_corpus_identical(smol_case)


@pytest.mark.slow
def test_smollm2_trimmed_model_generates(smollm2, smol_case):
    from transformers import pipeline

    model = copy.deepcopy(smollm2.model)
    keep = smol_case.selection.keep_ids
    summary = vocab_summary(model, smol_case.selection)
    old_ids = smol_case.original.encode(smol_case.texts[0])[:64]  # the corpus tokenizes identically
    with torch.no_grad():
        expected = smollm2.model(torch.tensor([old_ids])).logits[..., keep]
    slice_model_vocab(model, keep)
    assert model.lm_head.weight is model.get_input_embeddings().weight
    assert summary.parameters_after == sum(p.numel() for p in model.parameters())
    assert summary.parameters_saved >= 0.4 * 49152 * model.config.hidden_size
    with torch.no_grad():
        actual = model(torch.tensor([remap_ids(old_ids, keep)])).logits
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=0)

    generator = pipeline("text-generation", model=model, tokenizer=smol_case.trimmed)
    chat = [{"role": "user", "content": "What are the symptoms of diabetes?"}]
    output = generator(chat, max_new_tokens=10, do_sample=False)[0]["generated_text"][-1]["content"]
    assert output.strip()

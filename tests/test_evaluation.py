"""Evaluation agrees with an independent computation; perplexity and bits-per-byte are consistent."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from minigpts.data import text_within_token_budget, tokenize_stream
from minigpts.evaluation import count_parameters, evaluate, token_byte_lengths

TEXTS = [
    "The market clears where supply meets demand.",
    "Prices rise when demand grows faster than supply, and fall otherwise.",
    "Opportunity cost is what you give up to get something else.",
] * 6


def independent_nll_and_bytes(model, tokenizer, texts, seq_len):
    """Straightforward re-computation: one window at a time, float64 log-softmax, bytes by decoding."""
    ids = []
    for i, text in enumerate(texts):  # the protocol: each document tokenized with its separator
        ids += tokenizer(text + ("\n\n" if i < len(texts) - 1 else ""), add_special_tokens=False)["input_ids"]
    nll, tokens, n_bytes = 0.0, 0, 0
    for start in range(0, len(ids), seq_len):
        window = ids[start : start + seq_len]
        if len(window) < 2:
            continue
        with torch.no_grad():
            logits = model(torch.tensor([window])).logits[0].double()
        logp = torch.log_softmax(logits, dim=-1)
        for t in range(1, len(window)):
            nll -= logp[t - 1, window[t]].item()
        tokens += len(window) - 1
        n_bytes += len(tokenizer.decode(window[1:]).encode("utf-8"))  # ASCII text: decoding is exact
    return nll, tokens, n_bytes


@pytest.mark.parametrize("seq_len", [16, 33])
def test_evaluate_matches_independent_computation(tiny_tokenizer, tiny_llama, seq_len):
    result = evaluate(tiny_llama, tiny_tokenizer, TEXTS, model_name="tiny", seq_len=seq_len, progress=False)
    nll, tokens, n_bytes = independent_nll_and_bytes(tiny_llama, tiny_tokenizer, TEXTS, seq_len)
    assert result.eval_tokens == tokens
    assert result.eval_bytes == n_bytes
    assert result.nll_sum == pytest.approx(nll, rel=1e-5)
    assert result.perplexity == pytest.approx(math.exp(nll / tokens), rel=1e-5)
    assert result.bits_per_byte == pytest.approx(nll / math.log(2) / n_bytes, rel=1e-5)


def test_perplexity_and_bits_per_byte_are_consistent(tiny_tokenizer, tiny_llama):
    r = evaluate(
        tiny_llama, tiny_tokenizer, TEXTS, model_name="tiny", seq_len=20, batch_size=3, progress=False
    )
    lhs = math.log(r.perplexity) * r.eval_tokens
    rhs = r.bits_per_byte * r.eval_bytes * math.log(2)
    assert lhs == pytest.approx(rhs, rel=1e-9)
    keys = {"params", "params_non_embedding", "size_bytes", "perplexity", "bits_per_byte", "eval_tokens"}
    assert keys | {"eval_bytes", "seq_len", "split", "model"} <= set(r.to_dict())


def test_batching_does_not_change_the_result(tiny_tokenizer, tiny_llama):
    a = evaluate(tiny_llama, tiny_tokenizer, TEXTS, model_name="t", seq_len=16, batch_size=1, progress=False)
    b = evaluate(tiny_llama, tiny_tokenizer, TEXTS, model_name="t", seq_len=16, batch_size=5, progress=False)
    assert a.nll_sum == pytest.approx(b.nll_sum, rel=1e-5)
    assert (a.eval_tokens, a.eval_bytes) == (b.eval_tokens, b.eval_bytes)


def test_max_tokens_limits_the_scored_text(tiny_tokenizer, tiny_llama):
    r = evaluate(tiny_llama, tiny_tokenizer, TEXTS, model_name="t", seq_len=16, max_tokens=40, progress=False)
    assert r.eval_tokens == 40 - 3  # windows of 16, 16, 8: first token of each is not scored


def test_byte_lengths_cover_unicode_text_exactly(tiny_tokenizer):
    texts = ["Économie 経済学 📈 naïve", "tabs\tand\r\nnewlines", "emoji 👩‍👩‍👧 and ½"]
    ids = tokenize_stream(tiny_tokenizer, texts)
    lengths = token_byte_lengths(tiny_tokenizer)
    assert int(lengths[ids].sum()) == len("\n\n".join(texts).encode("utf-8"))


def test_parameter_counts_tied_and_untied(tiny_tokenizer):
    from conftest import make_tiny_llama

    tied = make_tiny_llama(len(tiny_tokenizer))
    untied = make_tiny_llama(len(tiny_tokenizer), tie_word_embeddings=False)
    total_t, non_emb_t = count_parameters(tied)
    total_u, non_emb_u = count_parameters(untied)
    assert non_emb_t == non_emb_u
    assert total_u - total_t == len(tiny_tokenizer) * 32
    assert total_t - non_emb_t == len(tiny_tokenizer) * 32


@pytest.mark.slow
def test_smollm2_byte_lengths_match_utf8(smollm2):
    texts = ["Inflation erodes purchasing power — ça coûte cher! 日本銀行 🏦", "GDP = C + I + G + (X − M)"]
    ids = tokenize_stream(smollm2.tokenizer, texts)
    lengths = token_byte_lengths(smollm2.tokenizer)
    assert int(lengths[ids].sum()) == len("\n\n".join(texts).encode("utf-8"))


def test_chunked_head_equals_full_logits_and_restores_the_head(tiny_tokenizer, tiny_llama, monkeypatch):
    import minigpts.evaluation as evaluation

    head = tiny_llama.get_output_embeddings()
    monkeypatch.setattr(evaluation, "LOGIT_CHUNK_ELEMENTS", 7 * head.out_features)  # 7 positions per chunk
    result = evaluate(tiny_llama, tiny_tokenizer, TEXTS, model_name="t", seq_len=33, progress=False)
    nll, tokens, _ = independent_nll_and_bytes(tiny_llama, tiny_tokenizer, TEXTS, 33)
    assert result.eval_tokens == tokens
    assert result.nll_sum == pytest.approx(nll, rel=1e-5)
    assert tiny_llama.get_output_embeddings() is head
    assert tiny_llama.lm_head.weight is tiny_llama.model.embed_tokens.weight  # still tied


def test_models_that_transform_their_logits_are_scored_on_the_real_logits(tiny_tokenizer):
    from transformers import Gemma2Config, Gemma2ForCausalLM

    from minigpts.evaluation import deferred_head

    torch.manual_seed(0)
    config = Gemma2Config(
        vocab_size=len(tiny_tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        final_logit_softcapping=0.5,  # logits = 0.5 * tanh(head / 0.5): far from the raw head output
    )
    model = Gemma2ForCausalLM(config).eval()
    probe = torch.arange(1, 9).unsqueeze(0)
    with torch.no_grad(), deferred_head(model, probe) as head:
        assert head is None  # soft-capping detected: the full logits are used
    result = evaluate(model, tiny_tokenizer, TEXTS, model_name="g", seq_len=16, progress=False)
    nll, _, _ = independent_nll_and_bytes(model, tiny_tokenizer, TEXTS, 16)
    assert result.nll_sum == pytest.approx(nll, rel=1e-5)
    assert isinstance(model.get_output_embeddings(), torch.nn.Linear)


# --------------------------------------------------------------------------------------------------
# Token budgets fixed as text: models with different vocabularies score the same bytes

documents = st.lists(
    st.text(st.characters(blacklist_categories=("Cs",)), max_size=40), min_size=1, max_size=5
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(docs=documents, budget=st.integers(min_value=0, max_value=120))
def test_token_budget_becomes_a_prefix_of_the_text(tiny_tokenizer, docs, budget):
    full = "\n\n".join(docs)
    kept = text_within_token_budget(tiny_tokenizer, docs, budget)
    assert full.startswith("\n\n".join(kept))
    ids = tokenize_stream(tiny_tokenizer, kept)
    whole = tokenize_stream(tiny_tokenizer, docs)
    if budget >= len(whole):
        assert kept == docs
    # a cut inside a character that several byte tokens spell keeps the whole character
    assert min(budget, len(whole)) <= len(ids) <= min(budget, len(whole)) + 3


def test_token_budget_is_exact_on_plain_text(tiny_tokenizer):
    whole = tokenize_stream(tiny_tokenizer, TEXTS)
    for budget in range(0, len(whole) + 3):
        ids = tokenize_stream(tiny_tokenizer, text_within_token_budget(tiny_tokenizer, TEXTS, budget))
        assert torch.equal(ids, whole[:budget])


class NoOffsets:
    """A tokenizer like transformers' slow (Python) ones: no offset mapping."""

    def __init__(self, inner):
        self.inner = inner

    def __call__(self, text, **kwargs):
        if kwargs.pop("return_offsets_mapping", False):
            raise NotImplementedError("return_offset_mapping is not available when using Python tokenizers")
        return self.inner(text, **kwargs)

    def decode(self, ids):
        return self.inner.decode(ids)


def test_token_budget_without_offsets_decodes_the_prefix(tiny_tokenizer):
    for budget in (1, 7, 40, 100):
        assert text_within_token_budget(NoOffsets(tiny_tokenizer), TEXTS, budget) == text_within_token_budget(
            tiny_tokenizer, TEXTS, budget
        )


def test_a_budget_tokenizer_fixes_the_text_for_a_coarser_tokenizer(tiny_tokenizer, tiny_llama):
    """A model whose tokenizer needs more tokens per byte is scored on the budget tokenizer's text."""
    from minigpts.vocab import count_tokens, select_vocab, slice_model_vocab, trim_tokenizer

    selection = select_vocab(tiny_tokenizer, count_tokens(tiny_tokenizer, TEXTS[:1]), embedding_threshold=0)
    trimmed = trim_tokenizer(tiny_tokenizer, selection.keep_ids)
    model = slice_model_vocab(copy.deepcopy(tiny_llama), selection.keep_ids)
    budget = 60
    common = dict(model_name="t", seq_len=256, max_tokens=budget, progress=False)
    base = evaluate(tiny_llama, tiny_tokenizer, TEXTS, **common)
    own = evaluate(model, trimmed, TEXTS, **common)
    fixed = evaluate(model, trimmed, TEXTS, budget_tokenizer=tiny_tokenizer, **common)
    text = text_within_token_budget(tiny_tokenizer, TEXTS, budget)
    explicit = evaluate(model, trimmed, text, model_name="t", seq_len=256, progress=False)
    assert own.eval_tokens == base.eval_tokens == budget - 1  # its own budget: less text
    assert own.eval_bytes < base.eval_bytes
    assert fixed.eval_tokens > base.eval_tokens
    assert (fixed.eval_tokens, fixed.eval_bytes) == (explicit.eval_tokens, explicit.eval_bytes)
    assert fixed.nll_sum == pytest.approx(explicit.nll_sum, rel=1e-6)
    first_piece = len(trimmed.decode(tokenize_stream(trimmed, text)[:1]).encode())
    assert fixed.eval_bytes + first_piece == len("\n\n".join(text).encode())
    assert "reference tokenizer" in fixed.protocol


def test_the_protocol_says_how_much_of_the_split_a_budget_covers(tiny_tokenizer, tiny_llama):
    """A budget on a corpus grouped by topic measures the first documents only: the protocol says so."""
    from minigpts.evaluation import coverage

    lengths = [len(tiny_tokenizer(t + "\n\n", add_special_tokens=False)["input_ids"]) for t in TEXTS]
    common = dict(model_name="t", seq_len=64, progress=False)
    inside = evaluate(tiny_llama, tiny_tokenizer, TEXTS, max_tokens=lengths[0] + 3, **common)
    assert inside.protocol.endswith(f"(2 of {len(TEXTS)} documents in file order, the last one cut)")
    whole = evaluate(tiny_llama, tiny_tokenizer, TEXTS, max_tokens=10**6, **common)
    assert whole.protocol.endswith(f"(all {len(TEXTS)} documents)")
    assert "documents" not in evaluate(tiny_llama, tiny_tokenizer, TEXTS, **common).protocol  # no budget
    # a budget that ends exactly at a document's end keeps it whole
    exact = text_within_token_budget(tiny_tokenizer, TEXTS, sum(lengths[:2]))
    assert coverage(exact, TEXTS) == f"2 of {len(TEXTS)} documents in file order"

"""Shared fixtures: a tiny byte-level BPE tokenizer and tiny random models (fast), and the real SmolLM2 (slow)."""

from __future__ import annotations

import pytest
import torch

SAMPLE_TEXT = (
    "Supply and demand determine the price of goods in a market economy. When demand rises and supply "
    "stays the same, prices go up. Opportunity cost is the value of the next best alternative. "
    "Économie, 経済学, and émojis 📈 appear too.\n\n"
) * 20


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([SAMPLE_TEXT], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def make_tiny_llama(vocab_size: int, seed: int = 0, **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    settings = dict(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
    )
    config = LlamaConfig(**(settings | overrides))
    return LlamaForCausalLM(config).eval()


@pytest.fixture
def tiny_llama(tiny_tokenizer):
    return make_tiny_llama(len(tiny_tokenizer))


@pytest.fixture(scope="session")
def smollm2():
    """The embedded real model (converted once into $MINIGPTS_CACHE, then ~2 s per load)."""
    from minigpts.models import load_model

    return load_model("smollm2-135m", device="cpu")

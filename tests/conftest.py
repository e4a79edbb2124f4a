"""Shared fixtures: a tiny byte-level BPE tokenizer and tiny random models (fast), and the real SmolLM2 (slow)."""

from __future__ import annotations

import os

import pytest
import torch

# `--mixed-precision auto` trains in fp32 on every CPU here, so recorded numbers do not depend on the CPU model
os.environ["MINIGPTS_CPU_BF16"] = "0"

SAMPLE_TEXT = (
    "Supply and demand determine the price of goods in a market economy. When demand rises and supply "
    "stays the same, prices go up. Opportunity cost is the value of the next best alternative. "
    "Économie, 経済学, and émojis 📈 appear too.\n\n"
) * 20


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return build_tiny_tokenizer()


def build_tiny_tokenizer():
    """A 400-token byte-level BPE trained on SAMPLE_TEXT (deterministic)."""
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


_COMMON = dict(hidden_size=48, num_hidden_layers=3, max_position_embeddings=128)
_GQA = dict(_COMMON, intermediate_size=40, num_attention_heads=6, num_key_value_heads=2)

# name -> (model_type, config fields): one tiny random model per variant that exercises something the
# others do not. Every family of minigpts.arch.SUPPORTED_FAMILIES appears (test_conformance checks it).
TINY_CONFIGS: dict[str, tuple[str, dict]] = {
    "llama": ("llama", dict(_GQA, rms_norm_eps=0.1)),  # GQA, untied; big eps: a wrong RMSNorm rescale shows
    "llama-tied": ("llama", dict(_GQA, tie_word_embeddings=True)),
    "llama-mha": ("llama", dict(_GQA, num_key_value_heads=6, tie_word_embeddings=True)),  # no GQA
    "mistral": ("mistral", _GQA),
    "qwen2": ("qwen2", _GQA),  # q/k/v biases, layer_types
    "qwen3": ("qwen3", dict(_GQA, head_dim=8)),  # q_norm / k_norm over head_dim
    # phi-1.5 style (PhiConfig's defaults): parallel attention + MLP, LayerNorm, partial rotary (0.5),
    # gelu_new, biases everywhere, lm_head bias, untied
    "phi": ("phi", dict(_COMMON, intermediate_size=40, num_attention_heads=4)),
    "phi-qk-norm": ("phi", dict(_COMMON, intermediate_size=40, num_attention_heads=4, qk_layernorm=True)),
    "opt": ("opt", dict(_COMMON, ffn_dim=40, num_attention_heads=4, dropout=0.0)),  # ReLU, learned positions
    # word_embed_proj_dim != hidden_size: project_in / project_out around the decoder
    "opt-proj": (
        "opt",
        dict(_COMMON, ffn_dim=40, num_attention_heads=4, dropout=0.0, word_embed_proj_dim=32),
    ),
    # fused qkv_proj [q | k | v] and gate_up_proj [gate | up], GQA, partial rotary; big eps as for llama
    # (1 + w) RMSNorm, embeddings scaled by sqrt(hidden), tied head; big eps: a wrong rescale shows
    "gemma": ("gemma", dict(_GQA, head_dim=8, rms_norm_eps=0.1)),
    # + post-attention / pre- and post-feed-forward norms, sliding-window layers (window 4 < the
    # 10-token inputs), attention and final logit soft-capping
    "gemma2": (
        "gemma2",
        dict(
            _GQA,
            head_dim=8,
            rms_norm_eps=0.1,
            query_pre_attn_scalar=8,
            sliding_window=4,
            attn_logit_softcapping=20.0,
            final_logit_softcapping=5.0,
        ),
    ),
    # + q/k norms over head_dim, which share rms_norm_eps with the residual norms
    "gemma3_text": (
        "gemma3_text",
        dict(
            _GQA,
            head_dim=8,
            rms_norm_eps=0.1,
            query_pre_attn_scalar=8,
            sliding_window=4,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
            final_logit_softcapping=5.0,
        ),
    ),
    # Pythia style: fused query_key_value laid out per head, parallel residual, rotary_pct 0.25,
    # LayerNorm, untied embed_out; then the sequential residual
    "gpt_neox": ("gpt_neox", dict(_COMMON, intermediate_size=40, num_attention_heads=6)),
    "gpt_neox-sequential": (
        "gpt_neox",
        dict(_COMMON, intermediate_size=40, num_attention_heads=6, use_parallel_residual=False),
    ),
    # StableLM-3B style: GQA, LayerNorm, partial rotary 0.25, sequential residual; then StableLM 2
    # 12B style: parallel residual, q/k/v biases, one q/k LayerNorm per head
    "stablelm": ("stablelm", _GQA),
    "stablelm-parallel-qk-norm": (
        "stablelm",
        dict(_GQA, use_parallel_residual=True, use_qkv_bias=True, qk_layernorm=True),
    ),
    # Conv1D projections (weight [in, out]), fused c_attn [q | k | v], learned positions, tied head
    "gpt2": ("gpt2", dict(_COMMON, n_inner=40, num_attention_heads=6, bos_token_id=0, eos_token_id=0)),
    "phi3": (
        "phi3",
        dict(
            _GQA, rms_norm_eps=0.1, partial_rotary_factor=0.5, bos_token_id=1, eos_token_id=2, pad_token_id=0
        ),
    ),
}


def make_tiny_model(name: str, vocab_size: int, seed: int = 0, *, perturb: float = 0.1, **overrides):
    """The tiny random model TINY_CONFIGS[name] (config fields replaced by ``overrides``), in eval mode.

    ``perturb`` adds seeded noise of that scale to every bias and norm weight (transformers initialises
    them to 0 and 1), so a slicing mistake in them shows up; 0 keeps transformers' own initialisation.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    model_type, fields = TINY_CONFIGS[name]
    config = AutoConfig.for_model(model_type, **(fields | {"vocab_size": vocab_size} | overrides))
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    if perturb:
        with torch.no_grad():
            for parameter_name, parameter in model.named_parameters():
                if parameter_name.endswith("bias") or "norm" in parameter_name:
                    parameter.add_(torch.randn_like(parameter) * perturb)
    return model.eval()


@pytest.fixture
def tiny_llama(tiny_tokenizer):
    return make_tiny_llama(len(tiny_tokenizer))


@pytest.fixture(scope="session")
def smollm2():
    """The embedded real model (converted once into $MINIGPTS_CACHE, then ~2 s per load)."""
    from minigpts.models import load_model

    return load_model("smollm2-135m", device="cpu")


DEFAULT_THREADS = torch.get_num_threads()


@pytest.fixture(scope="session", autouse=True)
def _one_thread_for_tiny_models():
    """Tiny models on 2 shared cores: a second torch thread only adds synchronisation stalls (measured:
    the conformance suite 90 s → 9 s, uncached generation up to 100× slower on a busy machine)."""
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(DEFAULT_THREADS)


@pytest.fixture(autouse=True)
def _every_thread_for_slow_tests(request):
    """Tests marked slow run the real SmolLM2, where the threads pay off."""
    if not request.node.get_closest_marker("slow"):
        yield
        return
    torch.set_num_threads(DEFAULT_THREADS)
    yield
    torch.set_num_threads(1)

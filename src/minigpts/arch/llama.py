"""Llama family: Llama-2/3, Sheared-LLaMA, SmolLM2, Mistral, Qwen2 (qkv bias), Qwen3 (q/k norms).

Pre-norm blocks with RMSNorm, gated SiLU MLP (gate/up -> down), rotary attention with GQA.
"""

from __future__ import annotations

from typing import Any

from minigpts.arch.base import ArchAdapter


class LlamaAdapter(ArchAdapter):
    family = "llama"
    class_prefixes = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3"}
    body_path = "model"
    final_norm_path = "norm"
    mlp_in_paths = ("mlp.gate_proj", "mlp.up_proj")
    mlp_out_path = "mlp.down_proj"
    reader_paths = ("self_attn.q_proj", "mlp.gate_proj")
    layer_norm_paths = ("input_layernorm", "post_attention_layernorm")
    norm_kind = "rms"

    def hidden_pruning_problem(self, config: Any) -> str | None:
        if config.model_type == "qwen3":
            # q_norm/k_norm read the same rms_norm_eps that exact hidden pruning must rescale
            return "qwen3 shares rms_norm_eps between hidden and per-head norms, so hidden pruning cannot stay exact"
        return None

    def width_problem(self, config: Any, hidden_size: int, n_heads: int) -> str | None:
        if config.model_type == "llama" and hidden_size % n_heads:
            # LlamaConfig.validate_architecture, run on save and on load, even with an explicit head_dim
            return (
                f"transformers' LlamaConfig needs hidden_size ({hidden_size}) to be a multiple of "
                f"num_attention_heads ({n_heads}): keep a head count that divides the hidden size"
            )
        return None

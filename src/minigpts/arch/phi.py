"""Phi family (phi-1, phi-1.5, phi-2): one LayerNorm feeds attention and MLP in parallel.

Partial rotary embedding, biases everywhere (lm_head too), GELU MLP fc1 -> fc2, output proj `dense`.
Hidden pruning is supported but not exact: LayerNorm's mean and variance change with the width.
"""

from __future__ import annotations

from typing import Any

from minigpts.arch.base import ArchAdapter


class PhiAdapter(ArchAdapter):
    family = "phi"
    class_prefixes = {"phi": "Phi"}
    body_path = "model"
    final_norm_path = "final_layernorm"
    o_path = "self_attn.dense"
    mlp_in_paths = ("mlp.fc1",)
    mlp_out_path = "mlp.fc2"
    reader_paths = ("self_attn.q_proj",)  # fc1 reads the same normed input
    layer_norm_paths = ("input_layernorm",)
    norm_kind = "layer"
    norm_eps_field = None

    def _qk_layernorm_problem(self, config: Any, what: str) -> str | None:
        if config.qk_layernorm:
            # transformers sizes q/k_layernorm as hidden_size // num_attention_heads, not head_dim
            return f"phi with qk_layernorm=True cannot lose {what}: its q/k norms are sized from hidden_size // heads"
        return None

    def hidden_pruning_problem(self, config: Any) -> str | None:
        return self._qk_layernorm_problem(config, "hidden channels")

    def head_pruning_problem(self, config: Any) -> str | None:
        return self._qk_layernorm_problem(config, "attention heads")

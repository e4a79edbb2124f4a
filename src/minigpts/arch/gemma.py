"""Gemma family: Gemma, Gemma 2, Gemma 3 (text). Llama-like blocks with Gemma's own conventions.

- RMSNorm scales by (1 + weight): exact hidden pruning rescales the effective weight 1 + w (base
  `shrink_norm` with `norm_weight_offset = 1`).
- Embeddings are multiplied by sqrt(hidden_size) (a non-persistent `embed_scale` buffer recomputed
  from the config on load): hidden pruning sets the new scale and multiplies the embedding table by
  sqrt(D / D') so the residual stream is unchanged; a tied LM head then reads a table scaled by that
  factor, which the final norm's weight absorbs.
- Gemma 2/3: post-attention and pre-/post-feed-forward norms (all over the residual width, all
  rescaled alike), sliding-window layers (`layer_types`, kept in step by depth pruning), logit
  soft-capping (after the LM head: untouched). Gemma 3: q/k norms over head_dim share rms_norm_eps
  with the residual norms; hidden pruning scales q/k projections so they stay exact too.
"""

from __future__ import annotations

import math
from typing import Any

from torch import nn

from minigpts.arch.base import ArchAdapter, get_module

_LAYER_NORMS = (
    "input_layernorm",
    "post_attention_layernorm",
    "pre_feedforward_layernorm",
    "post_feedforward_layernorm",
)


class GemmaAdapter(ArchAdapter):
    family = "gemma"
    class_prefixes = {"gemma": "Gemma", "gemma2": "Gemma2", "gemma3_text": "Gemma3"}
    body_path = "model"
    final_norm_path = "norm"
    mlp_in_paths = ("mlp.gate_proj", "mlp.up_proj")
    mlp_out_path = "mlp.down_proj"
    reader_paths = ("self_attn.q_proj", "mlp.gate_proj")
    layer_norm_paths = _LAYER_NORMS  # those the layer has: Gemma 1 only the first two
    norm_kind = "rms"
    norm_weight_offset = 1.0

    def modeling_names(self, config: Any) -> tuple[str, str, str]:
        prefix = self.class_prefixes[config.model_type]
        module = "gemma3" if config.model_type == "gemma3_text" else config.model_type
        return module, f"{prefix}ForCausalLM", f"{prefix}DecoderLayer"

    def writes_residual(self, model: nn.Module) -> bool:
        return model.config.model_type == "gemma"  # Gemma 2/3 normalise each block's output first

    def layer_norms(self, layer: nn.Module) -> list[nn.Module]:
        return [get_module(layer, path) for path in self.layer_norm_paths if hasattr(layer, path)]

    def width_problem(self, config: Any, hidden_size: int, n_heads: int) -> str | None:
        if config.model_type in ("gemma2", "gemma3_text") and hidden_size % n_heads:
            # Gemma2Config / Gemma3TextConfig.validate_architecture, run on save and on load
            return (
                f"transformers' {type(config).__name__} needs hidden_size ({hidden_size}) to be a multiple of "
                f"num_attention_heads ({n_heads}): keep a head count that divides the hidden size"
            )
        return None

    def prune_hidden(self, model: nn.Module, keep: list[int]) -> None:
        hidden = self.hidden_size(model)
        super().prune_hidden(model, keep)  # rescales every residual norm and config.rms_norm_eps by D / D'
        scale = hidden / len(keep)
        for layer in self.layers(model):
            attention = self.attention(layer)
            if hasattr(attention, "q_norm"):
                # Gemma 3's q/k norms read the same rms_norm_eps: queries and keys scaled by sqrt(D/D')
                # before them see mean(x^2) and eps both scaled by D/D', so their outputs do not change
                for projection, norm in (
                    (attention.q_proj, attention.q_norm),
                    (attention.k_proj, attention.k_norm),
                ):
                    projection.weight.mul_(math.sqrt(scale))
                    if projection.bias is not None:
                        projection.bias.mul_(math.sqrt(scale))
                    norm.eps *= scale
        factor = math.sqrt(hidden / len(keep))  # old embed scale / new embed scale
        embedding = self.embedding(model)
        embedding.weight.mul_(factor)
        embedding.scalar_embed_scale = len(keep) ** 0.5
        embedding.embed_scale.fill_(len(keep) ** 0.5)
        lm_head = model.get_output_embeddings()
        if lm_head is not None and lm_head.weight is embedding.weight:
            # logits = norm(x) @ (factor * E)ᵀ: the final norm's effective weight (1 + w) takes 1 / factor
            norm = self.final_norm(model)
            norm.weight.copy_((norm.weight + 1) / factor - 1)

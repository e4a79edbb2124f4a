"""Phi-3 family (Phi-3 / Phi-3.5 mini and medium, Phi-4-mini): Llama-like, with fused projections.

`qkv_proj` holds [q (all query heads) | k (all KV heads) | v] in one weight and `gate_up_proj` holds
[gate | up]: slicing a head or an MLP channel takes its rows from each part. RMSNorm, so hidden pruning
is exact. Phi3Attention splits its fused output at `config.num_attention_heads * head_dim`, read at run
time from the config: after head pruning each attention gets a view of the config with its own count.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from minigpts.arch.base import ArchAdapter, LayerConfigView, fused_qkv_rows


class Phi3Adapter(ArchAdapter):
    family = "phi3"
    class_prefixes = {"phi3": "Phi3"}
    body_path = "model"
    final_norm_path = "norm"
    q_path = k_path = v_path = "self_attn.qkv_proj"
    mlp_in_paths = ("mlp.gate_up_proj",)
    mlp_out_path = "mlp.down_proj"
    reader_paths = ("self_attn.qkv_proj", "mlp.gate_up_proj")
    layer_norm_paths = ("input_layernorm", "post_attention_layernorm")
    norm_kind = "rms"

    # Per-layer exports: the same run-time view, for the attention transformers builds from the file.
    remote_layer_builder = """
from transformers.models.phi3.modeling_phi3 import Phi3Attention


class _LayerHeadsConfig:
    \"\"\"The model's config, except num_attention_heads: this layer's.\"\"\"

    def __init__(self, config, num_attention_heads):
        object.__setattr__(self, "_view_base", config)
        object.__setattr__(self, "_view_overrides", {{"num_attention_heads": num_attention_heads}})

    def __getattr__(self, name):
        if name.startswith("__") or name in ("_view_base", "_view_overrides"):
            raise AttributeError(name)
        overrides = object.__getattribute__(self, "_view_overrides")
        return overrides[name] if name in overrides else getattr(self._view_base, name)

    def __setattr__(self, name, value):
        setattr(self._view_base, name, value)


class _Phi3Attention(Phi3Attention):
    \"\"\"Phi3Attention splits its fused q/k/v output at config.num_attention_heads * head_dim, read at run
    time: it sees the model's config (attention implementation...) with its own layer's head count.\"\"\"

    @property
    def config(self):
        heads = self.__dict__.get("num_query_heads")
        config = self.__dict__["_model_config"]
        return config if heads is None else _LayerHeadsConfig(config, heads)

    @config.setter
    def config(self, config):
        self.__dict__["_model_config"] = config


def build_layer(layer_config, index):
    layer = {decoder_layer}(layer_config, index)
    attention = _Phi3Attention(layer_config, index)
    attention.num_query_heads = layer_config.num_attention_heads
    layer.self_attn = attention
    return layer
"""

    def head_layout(self, layer: nn.Module) -> tuple[int, int, int]:
        head_dim = self.attention(layer).head_dim
        n_heads = self.attn_width(layer) // head_dim
        (qkv,) = self.attn_in(layer)
        return n_heads, (self.out_features(qkv) - n_heads * head_dim) // (2 * head_dim), head_dim

    def set_head_counts(self, layer: nn.Module, n_heads: int, n_kv_heads: int) -> None:
        attention = self.attention(layer)
        attention.num_key_value_heads = n_kv_heads
        attention.num_key_value_groups = n_heads // n_kv_heads
        attention.config = LayerConfigView(attention.config, num_attention_heads=n_heads)

    def sync_modules(self, model: nn.Module) -> None:
        # per-layer head counts: every attention, pruned or not, must read its own, never the global one
        if model.config.is_heterogeneous:
            for layer in self.layers(model):
                n_heads, n_kv, _ = self.head_layout(layer)
                self.set_head_counts(layer, n_heads, n_kv)

    def projection_dims(self, layer: nn.Module) -> list[tuple[nn.Module, tuple[str, str]]]:
        (qkv,) = self.attn_in(layer)
        (gate_up,) = self.mlp_in(layer)
        return [
            (gate_up, ("2mlp", "hidden")),
            (self.mlp_out(layer), ("hidden", "mlp")),
            (qkv, ("qkv", "hidden")),
            (self.attn_out(layer), ("hidden", "q")),
        ]

    def prune_mlp(self, layer: nn.Module, keep: list[int]) -> None:
        width = self.mlp_width(layer)
        (gate_up,) = self.mlp_in(layer)  # [gate | up], each `width` rows
        self.slice_projection(gate_up, rows=keep + [width + j for j in keep])
        self.slice_projection(self.mlp_out(layer), cols=keep)

    def prune_heads(self, layer: nn.Module, heads: list[int], kv_heads: list[int]) -> None:
        n_heads, n_kv, head_dim = self.head_layout(layer)
        (qkv,) = self.attn_in(layer)
        self.slice_projection(qkv, rows=fused_qkv_rows(heads, kv_heads, n_heads, n_kv, head_dim))
        self.slice_projection(
            self.attn_out(layer), cols=[h * head_dim + d for h in heads for d in range(head_dim)]
        )
        self.set_head_counts(layer, len(heads), len(kv_heads))

    def width_problem(self, config: Any, hidden_size: int, n_heads: int) -> str | None:
        rope = getattr(config, "rope_parameters", None) or {}
        factors = rope.get("short_factor") or rope.get("long_factor")
        if factors:
            # Phi3Config.validate_rope sizes the longrope factors from hidden_size // num_attention_heads
            rotary = int(hidden_size // n_heads * rope.get("partial_rotary_factor", 1.0))
            if rotary // 2 != len(factors):
                return (
                    f"transformers' Phi3Config checks the longrope factors ({len(factors)}) against "
                    f"hidden_size // num_attention_heads ({hidden_size} // {n_heads}): keep widths where that "
                    "stays the head dimension"
                )
        return None

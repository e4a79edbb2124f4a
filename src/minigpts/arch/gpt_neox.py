"""GPT-NeoX family (Pythia, GPT-NeoX-20B, many small research models): MHA with one fused projection.

`query_key_value` is laid out per head, [h0: q k v | h1: q k v | ...] (the attention views its output
as [..., heads, 3 * head_size]), so a head's rows are one contiguous block. LayerNorm with bias, GELU
MLP dense_h_to_4h -> dense_4h_to_h, partial rotary (`rotary_pct`), untied `embed_out`, and by default
the parallel residual x + attn(ln1(x)) + mlp(ln2(x)) (`use_parallel_residual`; both readers hooked).

transformers' GPTNeoXAttention hard-wires head_size = hidden_size // num_attention_heads and builds
query_key_value as hidden x 3*hidden, as OPT does: hidden channels cannot be removed, and a model with
pruned heads is rebuilt by the remote code export writes (even with a uniform layout).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from minigpts.arch.base import ArchAdapter, head_channels


class GPTNeoXAdapter(ArchAdapter):
    family = "gpt_neox"
    class_prefixes = {"gpt_neox": "GPTNeoX"}
    body_path = "gpt_neox"
    embed_path = "embed_in"
    final_norm_path = "final_layer_norm"
    attn_path = "attention"
    q_path = k_path = v_path = "attention.query_key_value"
    o_path = "attention.dense"
    mlp_in_paths = ("mlp.dense_h_to_4h",)
    mlp_out_path = "mlp.dense_4h_to_h"
    reader_paths = ("attention.query_key_value", "mlp.dense_h_to_4h")  # two norms, read in parallel
    layer_norm_paths = ("input_layernorm", "post_attention_layernorm")
    norm_kind = "layer"
    kv_heads_field = None
    norm_eps_field = None
    head_dim_from_hidden = True

    remote_layer_builder = """
from transformers.conversion_mapping import get_checkpoint_conversion_mapping, register_checkpoint_conversion_mapping

# GPTNeoXForCausalLM's checkpoints name the LM head embed_out; transformers renames it for its own
# class only, not for remote code: the class defined below reads (and writes) them the same way
register_checkpoint_conversion_mapping(
    "MinigptsGPTNeoXForCausalLM", get_checkpoint_conversion_mapping("GPTNeoXForCausalLM") or [], overwrite=True
)


def build_layer(layer_config, index):
    \"\"\"GPTNeoXAttention ties head_size to hidden_size // heads: rebuild its projections with the saved head_dim.\"\"\"
    import copy

    from torch import nn

    heads, head_dim, hidden = layer_config.num_attention_heads, layer_config.head_dim, layer_config.hidden_size
    any_heads = copy.copy(layer_config)
    any_heads.num_attention_heads = 1  # any count transformers accepts; the projections are replaced
    layer = {decoder_layer}(any_heads, index)
    attention, inner, bias = layer.attention, heads * head_dim, layer_config.attention_bias
    attention.query_key_value = nn.Linear(hidden, 3 * inner, bias=bias)
    attention.dense = nn.Linear(inner, hidden, bias=bias)
    attention.head_size, attention.scaling = head_dim, head_dim**-0.5
    attention.rotary_ndims = int(head_dim * layer_config.rope_parameters.get("partial_rotary_factor", 1.0))
    return layer
"""

    def modeling_names(self, config: Any) -> tuple[str, str, str]:
        return "gpt_neox", "GPTNeoXForCausalLM", "GPTNeoXLayer"

    def head_layout(self, layer: nn.Module) -> tuple[int, int, int]:
        head_dim = self.attention(layer).head_size
        n_heads = self.attn_width(layer) // head_dim
        return n_heads, n_heads, head_dim

    def set_head_counts(self, layer: nn.Module, n_heads: int, n_kv_heads: int) -> None:
        pass  # the attention infers its head count from the shape of query_key_value's output

    def projection_dims(self, layer: nn.Module) -> list[tuple[nn.Module, tuple[str, str]]]:
        (qkv,) = self.attn_in(layer)
        return [
            *((m, ("mlp", "hidden")) for m in self.mlp_in(layer)),
            (self.mlp_out(layer), ("hidden", "mlp")),
            (qkv, ("qkv/head", "hidden")),  # one [q k v] block per head
            (self.attn_out(layer), ("hidden", "q")),
        ]

    def prune_heads(self, layer: nn.Module, heads: list[int], kv_heads: list[int]) -> None:
        _, _, head_dim = self.head_layout(layer)
        (qkv,) = self.attn_in(layer)
        self.slice_projection(qkv, rows=head_channels(heads, 3 * head_dim))  # one [q k v] block per head
        self.slice_projection(self.attn_out(layer), cols=head_channels(heads, head_dim))

    def hidden_pruning_problem(self, config: Any) -> str | None:
        return "gpt_neox cannot lose hidden channels: transformers' GPTNeoXAttention derives head_size from hidden_size"

    def width_problem(self, config: Any, hidden_size: int, n_heads: int) -> str | None:
        if hidden_size % n_heads:
            # GPTNeoXConfig.validate_architecture, run on save and on load
            return (
                f"transformers' GPTNeoXConfig needs hidden_size ({hidden_size}) to be a multiple of "
                f"num_attention_heads ({n_heads}): keep a head count that divides the hidden size"
            )
        return None

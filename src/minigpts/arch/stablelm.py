"""StableLM family (StableLM-3B-4E1T, StableLM 2 1.6B / 12B, StableCode): Llama-like projections, LayerNorm.

Separate q/k/v with GQA, gated SiLU MLP, LayerNorm with bias, partial rotary (`partial_rotary_factor`),
optional q/k bias (`use_qkv_bias`), optional per-head q/k LayerNorms (`qk_layernorm`: one LayerNorm
per head, sliced with its head) and optional parallel residual (`use_parallel_residual`: attention and
MLP both read input_layernorm's output, and post_attention_layernorm does not exist).

Chosen over Falcon for this slot: Falcon's modeling code carries three fused-QKV layouts
(multi-query, grouped `new_decoder_architecture`, MHA) plus ALiBi and parallel-attention switches,
each of which would need its own slicing and tests; StableLM's is one plain code path on transformers'
standard cache, SDPA and GQA machinery. Like OPT, transformers' StableLmAttention derives head_dim
from hidden_size // heads and builds o_proj as hidden x hidden: hidden channels cannot be removed, and
a model with pruned heads is rebuilt by the remote code export writes (even with a uniform layout).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from minigpts.arch.base import ArchAdapter


class StableLmAdapter(ArchAdapter):
    family = "stablelm"
    class_prefixes = {"stablelm": "StableLm"}
    body_path = "model"
    final_norm_path = "norm"
    mlp_in_paths = ("mlp.gate_proj", "mlp.up_proj")
    mlp_out_path = "mlp.down_proj"
    reader_paths = ("self_attn.q_proj", "mlp.gate_proj")  # parallel residual: q_proj alone
    layer_norm_paths = ("input_layernorm", "post_attention_layernorm")  # parallel: the first alone
    norm_kind = "layer"
    norm_eps_field = None
    head_dim_from_hidden = True

    remote_layer_builder = """
def build_layer(layer_config, index):
    \"\"\"StableLmAttention ties head_dim to hidden_size // heads: rebuild its projections with the saved head_dim.\"\"\"
    import copy

    from torch import nn
    from transformers.models.stablelm.modeling_stablelm import StableLmLayerNormPerHead

    config = layer_config
    heads, kv_heads, head_dim, hidden = (
        config.num_attention_heads, config.num_key_value_heads, config.head_dim, config.hidden_size
    )
    any_heads = copy.copy(config)
    any_heads.num_attention_heads = any_heads.num_key_value_heads = 1  # accepted; projections replaced
    layer = {decoder_layer}(any_heads, index)
    attention, bias = layer.self_attn, config.use_qkv_bias
    attention.q_proj = nn.Linear(hidden, heads * head_dim, bias=bias)
    attention.k_proj = nn.Linear(hidden, kv_heads * head_dim, bias=bias)
    attention.v_proj = nn.Linear(hidden, kv_heads * head_dim, bias=bias)
    attention.o_proj = nn.Linear(heads * head_dim, hidden, bias=False)
    if config.qk_layernorm:
        attention.q_layernorm = StableLmLayerNormPerHead(head_dim, heads, eps=config.layer_norm_eps)
        attention.k_layernorm = StableLmLayerNormPerHead(head_dim, kv_heads, eps=config.layer_norm_eps)
    attention.num_heads, attention.num_key_value_heads = heads, kv_heads
    attention.num_key_value_groups, attention.head_dim = heads // kv_heads, head_dim
    attention.rotary_ndims = int(head_dim * config.rope_parameters["partial_rotary_factor"])
    attention.scaling = head_dim**-0.5
    return layer
"""

    def residual_readers(self, layer: nn.Module) -> list[nn.Linear]:
        readers = super().residual_readers(layer)
        return readers[:1] if layer.use_parallel_residual else readers

    def layer_norms(self, layer: nn.Module) -> list[nn.Module]:
        norms = [layer.input_layernorm, layer.post_attention_layernorm]
        return [norm for norm in norms if norm is not None]

    def head_layout(self, layer: nn.Module) -> tuple[int, int, int]:
        attention = self.attention(layer)
        return attention.num_heads, attention.num_key_value_heads, attention.head_dim

    def set_head_counts(self, layer: nn.Module, n_heads: int, n_kv_heads: int) -> None:
        attention = self.attention(layer)
        attention.num_heads, attention.num_key_value_heads = n_heads, n_kv_heads
        attention.num_key_value_groups = n_heads // n_kv_heads

    def prune_heads(self, layer: nn.Module, heads: list[int], kv_heads: list[int]) -> None:
        attention = self.attention(layer)
        if attention.qk_layernorm:  # one LayerNorm per head: keep those of the kept heads
            for norms, keep in ((attention.q_layernorm, heads), (attention.k_layernorm, kv_heads)):
                norms.norms = nn.ModuleList([norms.norms[h] for h in keep])
                norms.num_heads = len(keep)
        super().prune_heads(layer, heads, kv_heads)

    def hidden_pruning_problem(self, config: Any) -> str | None:
        return "stablelm cannot lose hidden channels: transformers' StableLmAttention derives head_dim from hidden_size"

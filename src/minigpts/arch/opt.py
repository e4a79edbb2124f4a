"""OPT family: ReLU MLP fc1 -> fc2 in the layer itself, biases, learned positions, MHA only.

`project_in/project_out` map between `word_embed_proj_dim` and `hidden_size` when they differ.
transformers' OPTAttention hard-wires head_dim = hidden_size // num_heads and q/k/v/out as
hidden x hidden, so (1) hidden channels cannot be removed, and (2) a model with pruned heads is only
rebuilt by the remote code export writes (even with a uniform layout).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from minigpts.arch.base import ArchAdapter


class OPTAdapter(ArchAdapter):
    family = "opt"
    class_prefixes = {"opt": "OPT"}
    body_path = "model.decoder"
    final_norm_path = "final_layer_norm"
    o_path = "self_attn.out_proj"
    mlp_in_paths = ("fc1",)
    mlp_out_path = "fc2"
    reader_paths = ("self_attn.q_proj", "fc1")
    layer_norm_paths = ("self_attn_layer_norm", "final_layer_norm")
    norm_kind = "layer"
    mlp_width_field = "ffn_dim"
    kv_heads_field = None
    norm_eps_field = None
    head_dim_from_hidden = True

    remote_layer_builder = """
def build_layer(layer_config, index):
    \"\"\"OPTAttention ties head_dim to hidden_size // heads: rebuild q/k/v/out with the saved head_dim.\"\"\"
    import copy

    from torch import nn

    heads, head_dim, hidden = layer_config.num_attention_heads, layer_config.head_dim, layer_config.hidden_size
    any_heads = copy.copy(layer_config)
    any_heads.num_attention_heads = 1  # OPTAttention refuses head counts that do not divide hidden_size
    layer = {decoder_layer}(any_heads, index)
    attention, inner, bias = layer.self_attn, heads * head_dim, layer_config.enable_bias
    attention.q_proj = nn.Linear(hidden, inner, bias=bias)
    attention.k_proj = nn.Linear(hidden, inner, bias=bias)
    attention.v_proj = nn.Linear(hidden, inner, bias=bias)
    attention.out_proj = nn.Linear(inner, hidden, bias=bias)
    attention.num_heads, attention.head_dim, attention.scaling = heads, head_dim, head_dim**-0.5
    return layer
"""

    def final_norm(self, model: nn.Module) -> nn.Module | None:
        return self.body(model).final_layer_norm  # None when do_layer_norm_before is False

    def writes_residual(self, model: nn.Module) -> bool:
        return model.config.do_layer_norm_before  # post-LN OPT (350m) normalises after the residual add

    def hidden_size(self, model: nn.Module) -> int:
        return self.attention(self.layers(model)[0]).embed_dim

    def head_layout(self, layer: nn.Module) -> tuple[int, int, int]:
        attention = self.attention(layer)
        return attention.num_heads, attention.num_heads, attention.head_dim

    def set_head_counts(self, layer: nn.Module, n_heads: int, n_kv_heads: int) -> None:
        self.attention(layer).num_heads = n_heads

    def hidden_pruning_problem(self, config: Any) -> str | None:
        return "opt cannot lose hidden channels: transformers' OPTAttention derives head_dim from hidden_size"

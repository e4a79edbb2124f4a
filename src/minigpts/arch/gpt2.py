"""GPT-2 family (gpt2, distilgpt2, DialoGPT, many small models): Conv1D projections, fused c_attn.

transformers' Conv1D is a linear layer with its weight stored transposed, [in, out]: the adapters'
module operations (`weight`, `in_features`, `out_features`, `slice_projection`, see arch.base) read
and slice it in that layout, so analysis, surgery and the planner see every projection as [out, in]. `c_attn` holds
[q | k | v] (MHA: as many KV heads as query heads). Learned position embeddings `wpe`, LayerNorm with
bias, GELU MLP c_fc -> c_proj, LM head tied to `wte`.

Like OPT, transformers' GPT2Attention derives head_dim from n_embd // n_head and splits c_attn at
n_embd: hidden channels cannot be removed, and a model with pruned heads is rebuilt by the remote code
export writes (even with a uniform layout). With `scale_attn_by_inverse_layer_idx` (off in GPT-2
itself) a layer's attention scale depends on its index, which depth pruning changes.
"""

from __future__ import annotations

from typing import Any

from torch import nn
from transformers.pytorch_utils import Conv1D

from minigpts.arch.base import ArchAdapter, fused_qkv_rows, head_channels


class GPT2Adapter(ArchAdapter):
    family = "gpt2"
    class_prefixes = {"gpt2": "GPT2"}
    body_path = "transformer"
    layers_path = "h"
    embed_path = "wte"
    final_norm_path = "ln_f"
    attn_path = "attn"
    q_path = k_path = v_path = "attn.c_attn"
    o_path = "attn.c_proj"
    mlp_in_paths = ("mlp.c_fc",)
    mlp_out_path = "mlp.c_proj"
    reader_paths = ("attn.c_attn", "mlp.c_fc")
    layer_norm_paths = ("ln_1", "ln_2")
    norm_kind = "layer"
    projection_types = (nn.Linear, Conv1D)
    mlp_width_field = "n_inner"
    kv_heads_field = None
    norm_eps_field = None
    head_dim_from_hidden = True

    remote_layer_builder = """
def build_layer(layer_config, index):
    \"\"\"GPT2Attention ties head_dim to n_embd // n_head: rebuild c_attn / c_proj with the saved head_dim.\"\"\"
    import copy

    from transformers.pytorch_utils import Conv1D

    heads, head_dim, hidden = layer_config.n_head, layer_config.head_dim, layer_config.n_embd
    any_heads = copy.copy(layer_config)
    any_heads.n_head = 1  # any count transformers accepts; the projections are replaced
    layer = {decoder_layer}(any_heads, layer_idx=index)
    attention, inner = layer.attn, heads * head_dim
    attention.c_attn = Conv1D(3 * inner, hidden)
    attention.c_proj = Conv1D(hidden, inner)
    attention.num_heads, attention.head_dim, attention.split_size = heads, head_dim, inner
    attention.scaling = head_dim**-0.5 if attention.scale_attn_weights else 1.0
    if attention.scale_attn_by_inverse_layer_idx:
        attention.scaling /= float(index + 1)
    return layer
"""

    def modeling_names(self, config: Any) -> tuple[str, str, str]:
        return "gpt2", "GPT2LMHeadModel", "GPT2Block"

    # --- attention ---------------------------------------------------------------------------
    def head_layout(self, layer: nn.Module) -> tuple[int, int, int]:
        attention = self.attention(layer)
        return attention.num_heads, attention.num_heads, attention.head_dim

    def set_head_counts(self, layer: nn.Module, n_heads: int, n_kv_heads: int) -> None:
        attention = self.attention(layer)
        attention.num_heads = n_heads
        attention.split_size = n_heads * attention.head_dim  # c_attn's output is split at this width

    def projection_dims(self, layer: nn.Module) -> list[tuple[nn.Module, tuple[str, str]]]:
        (c_attn,) = self.attn_in(layer)
        return [
            *((m, ("mlp", "hidden")) for m in self.mlp_in(layer)),
            (self.mlp_out(layer), ("hidden", "mlp")),
            (c_attn, ("qkv", "hidden")),
            (self.attn_out(layer), ("hidden", "q")),
        ]

    def prune_heads(self, layer: nn.Module, heads: list[int], kv_heads: list[int]) -> None:
        n_heads, _, head_dim = self.head_layout(layer)
        (c_attn,) = self.attn_in(layer)
        self.slice_projection(c_attn, rows=fused_qkv_rows(heads, heads, n_heads, n_heads, head_dim))
        self.slice_projection(self.attn_out(layer), cols=head_channels(heads, head_dim))
        self.set_head_counts(layer, len(heads), len(heads))

    def hidden_pruning_problem(self, config: Any) -> str | None:
        return "gpt2 cannot lose hidden channels: transformers' GPT2Attention derives head_dim from n_embd // n_head"

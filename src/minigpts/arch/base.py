"""What every architecture adapter knows: where each prunable group lives in a model.

Analysis, planning, surgery and export never name a module themselves; they ask an adapter. A family
is then a small declarative subclass (module paths and config field names), and the logic that walks
those paths lives here once.
"""

from __future__ import annotations

from typing import Any

from torch import nn


def get_module(root: nn.Module, path: str) -> Any:
    """Follow a dotted attribute path ("self_attn.q_proj") from root."""
    for part in path.split("."):
        root = getattr(root, part)
    return root


class ArchAdapter:
    """Module paths of one model family. Subclasses set the class attributes; methods rarely change.

    Paths: `body_path` is relative to the *ForCausalLM model; `layers_path`, `embed_path`,
    `final_norm_path` are relative to the body; every other path is relative to a decoder layer.
    """

    family: str
    body_path: str  # the transformer without LM head: body(input_ids=...) runs every layer
    layers_path: str = "layers"
    embed_path: str = "embed_tokens"
    final_norm_path: str | None = None
    attn_path: str = "self_attn"
    q_path: str = "self_attn.q_proj"
    k_path: str = "self_attn.k_proj"
    v_path: str = "self_attn.v_proj"
    o_path: str = "self_attn.o_proj"
    mlp_in_paths: tuple[str, ...] = ()  # their output rows are MLP channels
    mlp_out_path: str = ""  # its input columns are MLP channels (the activation's output)
    reader_paths: tuple[str, ...] = ()  # one projection per distinct normed residual input
    layer_norm_paths: tuple[str, ...] = ()  # norms over the residual stream inside a layer
    norm_kind: str = "rms"  # "rms": hidden pruning can be exact; "layer": it cannot
    # config field names
    mlp_width_field: str = "intermediate_size"
    heads_field: str = "num_attention_heads"
    kv_heads_field: str | None = "num_key_value_heads"  # None: the family has no GQA field
    norm_eps_field: str | None = "rms_norm_eps"  # rescaled by hidden pruning of RMSNorm models

    # --- navigation -------------------------------------------------------------------------
    def body(self, model: nn.Module) -> nn.Module:
        return get_module(model, self.body_path)

    def layers(self, model: nn.Module) -> list[nn.Module]:
        return list(get_module(self.body(model), self.layers_path))

    def layer_list(self, model: nn.Module) -> nn.ModuleList:
        """The ModuleList itself, for surgery that drops layers."""
        return get_module(self.body(model), self.layers_path)

    def embedding(self, model: nn.Module) -> nn.Embedding:
        return get_module(self.body(model), self.embed_path)

    def final_norm(self, model: nn.Module) -> nn.Module | None:
        if self.final_norm_path is None:
            return None
        return get_module(self.body(model), self.final_norm_path)

    def attention(self, layer: nn.Module) -> nn.Module:
        return get_module(layer, self.attn_path)

    def mlp_in(self, layer: nn.Module) -> list[nn.Linear]:
        return [get_module(layer, path) for path in self.mlp_in_paths]

    def mlp_out(self, layer: nn.Module) -> nn.Linear:
        return get_module(layer, self.mlp_out_path)

    def attn_in(self, layer: nn.Module) -> list[nn.Linear]:
        return [get_module(layer, path) for path in (self.q_path, self.k_path, self.v_path)]

    def attn_out(self, layer: nn.Module) -> nn.Linear:
        return get_module(layer, self.o_path)

    def residual_readers(self, layer: nn.Module) -> list[nn.Linear]:
        return [get_module(layer, path) for path in self.reader_paths]

    def layer_norms(self, layer: nn.Module) -> list[nn.Module]:
        return [get_module(layer, path) for path in self.layer_norm_paths]

    def hidden_size(self, model: nn.Module) -> int:
        return self.embedding(model).embedding_dim

    # --- attention layout -------------------------------------------------------------------
    def head_layout(self, layer: nn.Module) -> tuple[int, int, int]:
        """(n_heads, n_kv_heads, head_dim) as the layer is now, read from the weights' shapes."""
        head_dim = self.attention(layer).head_dim
        q, k, _ = self.attn_in(layer)
        return q.out_features // head_dim, k.out_features // head_dim, head_dim

    def set_head_counts(self, layer: nn.Module, n_heads: int, n_kv_heads: int) -> None:
        """Update the attributes the attention's forward reads after heads were sliced away."""
        self.attention(layer).num_key_value_groups = n_heads // n_kv_heads

    # --- what the family cannot do ----------------------------------------------------------
    def hidden_pruning_problem(self, config: Any) -> str | None:
        """Why residual channels cannot be removed from this model, or None when they can."""
        return None

    def head_pruning_problem(self, config: Any) -> str | None:
        """Why attention heads cannot be removed from this model, or None when they can."""
        return None

    def width_problem(self, config: Any, hidden_size: int, n_heads: int) -> str | None:
        """Why transformers would refuse a config with these widths (checked before any surgery)."""
        return None

    def needs_remote_code(self, config: Any) -> bool:
        """True when transformers' own modeling code cannot rebuild this (uniform) config."""
        return False

    # --- transformers classes, for the remote code of per-layer exports ----------------------
    class_prefixes: dict[str, str] = {}  # model_type -> prefix of its transformers classes

    def modeling_names(self, config: Any) -> tuple[str, str, str]:
        """(transformers.models submodule, *ForCausalLM class, *DecoderLayer class) of this model."""
        prefix = self.class_prefixes[config.model_type]
        return config.model_type, f"{prefix}ForCausalLM", f"{prefix}DecoderLayer"

    # Source of `build_layer(layer_config, index)` in the exported modeling file; `{decoder_layer}` is
    # the family's DecoderLayer class. Most layer classes read every width from the config they get.
    remote_layer_builder: str = """
def build_layer(layer_config, index):
    return {decoder_layer}(layer_config, index)
"""

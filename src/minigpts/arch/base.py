"""What every architecture adapter knows: where each prunable group lives in a model.

Analysis, planning, surgery and export never name a module themselves; they ask an adapter. A family
is then a small declarative subclass (module paths and config field names), and the logic that walks
those paths lives here once. So do the module operations (a projection's [out, in] weight and widths,
slicing its rows and columns, MLP / head / hidden pruning, norm shrinking): nn.Linear and GPT-2's
Conv1D by default, overridden by the few families whose projections are fused (Phi-3, GPT-NeoX, GPT-2)
or whose norms and embeddings differ (Gemma).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D


def get_module(root: nn.Module, path: str) -> Any:
    """Follow a dotted attribute path ("self_attn.q_proj") from root."""
    for part in path.split("."):
        root = getattr(root, part)
    return root


# --- slicing primitives (nn.Linear layout: weight [out, in]) -----------------------------------------


def index_tensor(indices: list[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(indices, dtype=torch.long, device=device)


def replace_parameter(module: nn.Module, name: str, value: torch.Tensor) -> None:
    old = getattr(module, name)
    setattr(module, name, nn.Parameter(value.contiguous(), requires_grad=old.requires_grad))


def slice_linear(linear: nn.Linear, rows: list[int] | None = None, cols: list[int] | None = None) -> None:
    """Keep output features `rows` (and their bias) and input features `cols` of an nn.Linear."""
    weight = linear.weight
    if rows is not None:
        rows_t = index_tensor(rows, weight.device)
        weight = weight.index_select(0, rows_t)
        if linear.bias is not None:
            replace_parameter(linear, "bias", linear.bias.index_select(0, rows_t))
        linear.out_features = len(rows)
    if cols is not None:
        weight = weight.index_select(1, index_tensor(cols, weight.device))
        linear.in_features = len(cols)
    replace_parameter(linear, "weight", weight)


def slice_conv1d(conv: Conv1D, rows: list[int] | None = None, cols: list[int] | None = None) -> None:
    """The same for transformers' Conv1D (GPT-2), whose weight is stored [in, out]."""
    weight = conv.weight
    if rows is not None:  # output features: the weight's columns
        rows_t = index_tensor(rows, weight.device)
        weight = weight.index_select(1, rows_t)
        replace_parameter(conv, "bias", conv.bias.index_select(0, rows_t))
        conv.nf = len(rows)
    if cols is not None:  # input features: the weight's rows
        weight = weight.index_select(0, index_tensor(cols, weight.device))
        conv.nx = len(cols)
    replace_parameter(conv, "weight", weight)


# The projection classes minigpts can read and slice. Code that needs a projection's weight as
# [out, in] or its widths, without an adapter at hand (criteria, refit), uses these three functions.


def projection_weight(module: nn.Module) -> torch.Tensor:
    """The weight as [out, in] (nn.Linear's layout); for Conv1D a transposed view: writes reach the parameter."""
    return module.weight.T if isinstance(module, Conv1D) else module.weight


def projection_in_features(module: nn.Module) -> int:
    return module.weight.shape[0] if isinstance(module, Conv1D) else module.in_features


def projection_out_features(module: nn.Module) -> int:
    return module.weight.shape[1] if isinstance(module, Conv1D) else module.out_features


def slice_projection(module: nn.Module, rows: list[int] | None = None, cols: list[int] | None = None) -> None:
    """Keep output features `rows` (and their bias) and input features `cols` of nn.Linear or Conv1D."""
    (slice_conv1d if isinstance(module, Conv1D) else slice_linear)(module, rows, cols)


def head_channels(heads: list[int], head_dim: int) -> list[int]:
    """The output channels of the listed heads in a [heads * head_dim] projection."""
    return [h * head_dim + d for h in heads for d in range(head_dim)]


def fused_qkv_rows(
    heads: list[int], kv_heads: list[int], n_heads: int, n_kv: int, head_dim: int
) -> list[int]:
    """Rows to keep of a fused projection laid out [q (n_heads) | k (n_kv) | v (n_kv)] (Phi-3, GPT-2)."""
    q_size, kv_size = n_heads * head_dim, n_kv * head_dim
    kv_rows = head_channels(kv_heads, head_dim)
    return (
        head_channels(heads, head_dim)
        + [q_size + r for r in kv_rows]
        + [q_size + kv_size + r for r in kv_rows]
    )


def set_int_attr(module: nn.Module, name: str, old: int, new: int) -> None:
    """Update a cached width attribute (e.g. LlamaMLP.intermediate_size) if the module keeps one."""
    if getattr(module, name, None) == old and isinstance(old, int):
        setattr(module, name, new)


class LayerConfigView:
    """The model's config as one layer's module should see it: every field the model's, except a few.

    For attention modules whose forward reads a per-layer width from their config (Phi-3 splits its
    fused q/k/v output at `config.num_attention_heads * head_dim`): run-time settings such as the
    attention implementation still follow the model's config.
    """

    def __init__(self, config: Any, **overrides: Any):
        base = getattr(config, "_view_base", config)  # never a view of a view
        object.__setattr__(self, "_view_base", base)
        object.__setattr__(self, "_view_overrides", overrides)

    def __getattr__(self, name: str) -> Any:  # only for names not found on the view itself
        if name.startswith("__") or name in ("_view_base", "_view_overrides"):
            raise AttributeError(name)  # copy/pickle probe dunders: never the base config's
        overrides = object.__getattribute__(self, "_view_overrides")
        if name in overrides:
            return overrides[name]
        return getattr(object.__getattribute__(self, "_view_base"), name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._view_base, name, value)


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
    norm_weight_offset: float = 0.0  # Gemma's RMSNorm scales by (1 + weight): offset 1
    projection_types: tuple[type, ...] = (nn.Linear,)  # classes of the layers' projections (LoRA targets)
    mlp_width_field: str = "intermediate_size"
    heads_field: str = "num_attention_heads"
    kv_heads_field: str | None = "num_key_value_heads"  # None: the family has no GQA field
    norm_eps_field: str | None = "rms_norm_eps"  # rescaled by hidden pruning of RMSNorm models
    # transformers derives head_dim from hidden_size // heads (OPT, GPT-2, GPT-NeoX, StableLM), so a
    # config whose heads * head_dim differs from the hidden size needs the exported remote code
    head_dim_from_hidden: bool = False

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
        """The projections whose output rows are MLP channels (one fused gate/up projection counts once)."""
        return [get_module(layer, path) for path in self.mlp_in_paths]

    def mlp_out(self, layer: nn.Module) -> nn.Linear:
        return get_module(layer, self.mlp_out_path)

    def attn_in(self, layer: nn.Module) -> list[nn.Linear]:
        """The distinct projections that make queries, keys and values: [q, k, v], or one fused qkv."""
        paths = dict.fromkeys((self.q_path, self.k_path, self.v_path))  # one entry when they are fused
        return [get_module(layer, path) for path in paths]

    def attn_out(self, layer: nn.Module) -> nn.Linear:
        return get_module(layer, self.o_path)

    def residual_readers(self, layer: nn.Module) -> list[nn.Linear]:
        return [get_module(layer, path) for path in self.reader_paths]

    def layer_norms(self, layer: nn.Module) -> list[nn.Module]:
        return [get_module(layer, path) for path in self.layer_norm_paths]

    def writes_residual(self, model: nn.Module) -> bool:
        """Whether the output projections' outputs are added to the residual stream as they are (no norm
        after them): the sequential refit can then target the unpruned model's residual stream."""
        return True

    def hidden_size(self, model: nn.Module) -> int:
        return self.embedding(model).embedding_dim

    # --- module operations: nn.Linear (and Conv1D) by default --------------------------------
    # Analysis, criteria, refit and surgery touch projections only through these, so a family whose
    # projections are fused (q/k/v, gate/up) or of another class overrides a few methods here
    # instead of editing them.

    def weight(self, module: nn.Module) -> torch.Tensor:
        """The projection's weight as [out, in] (nn.Linear's layout); a view: writes reach the parameter."""
        return projection_weight(module)

    def in_features(self, module: nn.Module) -> int:
        return projection_in_features(module)

    def out_features(self, module: nn.Module) -> int:
        return projection_out_features(module)

    def slice_projection(
        self, module: nn.Module, rows: list[int] | None = None, cols: list[int] | None = None
    ):
        """Keep output features `rows` (and their bias) and input features `cols` of one projection."""
        slice_projection(module, rows, cols)

    def mlp_width(self, layer: nn.Module) -> int:
        """MLP channels of the layer: the input width of its output projection."""
        return self.in_features(self.mlp_out(layer))

    def attn_width(self, layer: nn.Module) -> int:
        """n_heads * head_dim: the input width of the attention's output projection."""
        return self.in_features(self.attn_out(layer))

    def residual_width(self, layer: nn.Module) -> int:
        """Width of the residual stream as the layer's projections read it."""
        return self.in_features(self.residual_readers(layer)[0])

    def projection_dims(self, layer: nn.Module) -> list[tuple[nn.Module, tuple[str, str]]]:
        """(projection, (what its output dim is, what its input dim is)) for every projection of a layer.

        Dims: "mlp" (MLP channels), "2mlp" (fused [gate | up]), "q" (query-head channels), "kv" (one
        set of key/value-head channels), "qkv" (fused [q | k | v]), "qkv/head" (fused, one [q k v]
        block per head: GPT-NeoX), "hidden" (the residual stream). The planner counts parameters
        from these without building the pruned model; Taylor scores assign gradients with them.
        """
        q, k, v = self.attn_in(layer)
        return [
            *((m, ("mlp", "hidden")) for m in self.mlp_in(layer)),
            (self.mlp_out(layer), ("hidden", "mlp")),
            (q, ("q", "hidden")),
            (k, ("kv", "hidden")),
            (v, ("kv", "hidden")),
            (self.attn_out(layer), ("hidden", "q")),
        ]

    def prune_mlp(self, layer: nn.Module, keep: list[int]) -> None:
        """Keep MLP channels `keep`: rows of every input projection, columns of the output projection."""
        width = self.mlp_width(layer)
        for projection in self.mlp_in(layer):
            self.slice_projection(projection, rows=keep)
        self.slice_projection(self.mlp_out(layer), cols=keep)
        for module in layer.modules():
            set_int_attr(module, "intermediate_size", width, len(keep))

    def prune_heads(self, layer: nn.Module, heads: list[int], kv_heads: list[int]) -> None:
        """Keep query heads `heads` and key/value heads `kv_heads` (already checked GQA-legal)."""
        _, _, head_dim = self.head_layout(layer)
        q, k, v = self.attn_in(layer)
        q_rows, kv_rows = head_channels(heads, head_dim), head_channels(kv_heads, head_dim)
        self.slice_projection(q, rows=q_rows)
        self.slice_projection(k, rows=kv_rows)
        self.slice_projection(v, rows=kv_rows)
        self.slice_projection(self.attn_out(layer), cols=q_rows)
        self.set_head_counts(layer, len(heads), len(kv_heads))

    def hidden_pruning_exact(self, config: Any) -> bool:
        """True when removing residual channels that carry nothing leaves the logits unchanged.

        RMSNorm: exact (weights and eps rescaled, see `shrink_norm`). LayerNorm: approximate, its
        mean and variance depend on the width.
        """
        return self.norm_kind == "rms"

    def shrink_norm(
        self, norm: nn.Module, keep: list[int], rms_scale: float | None, eps_scale: float | None = None
    ) -> None:
        """Slice a norm over the residual stream; RMSNorm is rescaled so zero channels change nothing.

        With the removed channels identically zero, mean(x^2) over D equals (D'/D) * mean(x'^2) over
        the D' kept ones, so  w * x / sqrt(mean_D(x^2) + eps) = (w * sqrt(D/D')) * x' / sqrt(mean_D'(x'^2) + eps * D/D').
        The scale applies to the norm's effective weight, offset + weight (Gemma: 1 + weight).
        `rms_scale` None: no rescaling (LayerNorm); `eps_scale` None: eps stays (documented-approximate).
        """
        keep_t = index_tensor(keep, norm.weight.device)
        weight = norm.weight.index_select(0, keep_t)
        if rms_scale is not None:
            offset = self.norm_weight_offset
            weight = (weight + offset) * math.sqrt(rms_scale) - offset
        if eps_scale is not None:
            for eps_name in ("variance_epsilon", "eps"):
                if isinstance(getattr(norm, eps_name, None), float):
                    setattr(norm, eps_name, getattr(norm, eps_name) * eps_scale)
        replace_parameter(norm, "weight", weight)
        if getattr(norm, "bias", None) is not None:
            replace_parameter(norm, "bias", norm.bias.index_select(0, keep_t))
        if hasattr(norm, "normalized_shape"):
            norm.normalized_shape = (len(keep),)

    def prune_hidden(self, model: nn.Module, keep: list[int]) -> None:
        """Remove residual channels everywhere they are read or written."""
        hidden = self.hidden_size(model)
        rms_scale = hidden / len(keep) if self.norm_kind == "rms" else None
        eps_scale = rms_scale if self.hidden_pruning_exact(model.config) else None
        embedding = self.embedding(model)
        lm_head = model.get_output_embeddings()
        tied = lm_head is not None and lm_head.weight is embedding.weight
        replace_parameter(
            embedding, "weight", embedding.weight.index_select(1, index_tensor(keep, embedding.weight.device))
        )
        embedding.embedding_dim = len(keep)
        if tied:
            lm_head.weight = embedding.weight
            lm_head.in_features = len(keep)
        elif lm_head is not None:
            slice_linear(lm_head, cols=keep)
        for layer in self.layers(model):
            for norm in self.layer_norms(layer):
                self.shrink_norm(norm, keep, rms_scale, eps_scale)
            for reader in self.attn_in(layer) + self.mlp_in(layer):
                self.slice_projection(reader, cols=keep)
            for writer in (self.attn_out(layer), self.mlp_out(layer)):
                self.slice_projection(writer, rows=keep)
        final_norm = self.final_norm(model)
        if final_norm is not None:
            self.shrink_norm(final_norm, keep, rms_scale, eps_scale)
        for module in self.body(model).modules():
            set_int_attr(module, "hidden_size", hidden, len(keep))
        config = model.config
        if eps_scale is not None and self.norm_eps_field is not None:
            setattr(config, self.norm_eps_field, getattr(config, self.norm_eps_field) * eps_scale)

    # --- attention layout -------------------------------------------------------------------
    def head_layout(self, layer: nn.Module) -> tuple[int, int, int]:
        """(n_heads, n_kv_heads, head_dim) as the layer is now, read from the weights' shapes."""
        head_dim = self.attention(layer).head_dim
        q, k, _ = self.attn_in(layer)
        return self.out_features(q) // head_dim, self.out_features(k) // head_dim, head_dim

    def set_head_counts(self, layer: nn.Module, n_heads: int, n_kv_heads: int) -> None:
        """Update the attributes the attention's forward reads after heads were sliced away."""
        self.attention(layer).num_key_value_groups = n_heads // n_kv_heads

    def sync_modules(self, model: nn.Module) -> None:
        """After surgery and the config rewrite: update what modules read at run time, if anything."""

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
        if not self.head_dim_from_hidden:
            return False
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return config.num_attention_heads * head_dim != config.hidden_size

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

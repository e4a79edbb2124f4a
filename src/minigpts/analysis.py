"""Contextual analysis: how much the domain uses every prunable unit (the paper's normalized L1 norm).

One pass of the model body (never the LM head: logits are not needed) over calibration windows, with
forward pre-hooks on the projections that *consume* each group's activations:

- MLP channel j of a layer: input column j of the down/fc2 projection (the activation's output),
- attention head h: the input columns of the output projection that belong to h (the head's output),
- hidden channel j: input column j of every projection reading the (normed) residual stream.

Per unit we keep the sums of ``|a|`` and ``a²`` over every token, in float64, streamed batch by
batch (each batch is first reduced to per-channel float32 sums, in cache-sized blocks on CPU), so memory stays at one float64 vector per hooked projection. ``mean |a|`` is the
paper's score; ``sqrt(mean a²)`` is Wanda's ``‖X_j‖₂ / √N``. The token counts of the
calibration windows are kept too, so vocabulary trimming can reuse this pass.

Saved as one safetensors file: the tensors, plus a JSON header (``format``, ``n_tokens``,
``head_layout``, ``metadata``) in the safetensors metadata, so the file is self-describing and
``prune`` can re-plan without re-running the model.

With ``moments=True`` the pass also keeps, per layer, the second-moment matrices ``E[a aᵀ]`` and
the means ``E[a]`` of the inputs of the MLP's output projection and of the attention's output
projection (float64 sums of float32 products): they feed the closed-form refit of the output
projections after pruning (``minigpts.reconstruct``); (width)² per layer, ~650 MB for SmolLM2, so
they are optional and stored as float32 in the file. ``fisher_tokens > 0`` adds a gradient pass over
the first calibration windows: the mean squared gradient of the language-model loss with respect to
each block's output, per residual channel (a diagonal Fisher of the residual stream). It turns a
block's output error into an estimate of the loss it costs, which is what makes errors of different
layers comparable (``minigpts.allocation``).
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import tempfile
import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from torch import nn

from minigpts import __version__
from minigpts.errors import UserError

STATS_FORMAT = "minigpts-activation-stats"
STATS_FORMAT_VERSION = 1


class _LazyLayers(Sequence):
    """A per-layer list whose entries stay in safetensors files, each read (as float64) when indexed.

    ``entries``: the (file, key) of each layer's tensor; ``keep``: what must live as long as the list
    (layer-by-layer analysis: the scratch directory of its per-layer files, removed with it);
    ``replaced``: layer -> tensor held in memory instead (see `with_entry`).
    """

    def __init__(self, entries: list[tuple[Path, str]], keep: Any = None, replaced: dict | None = None):
        self.entries, self.keep, self.replaced = list(entries), keep, dict(replaced or {})

    def with_entry(self, index: int, tensor: torch.Tensor) -> _LazyLayers:
        """A copy whose entry ``index`` is ``tensor`` (the files untouched)."""
        return _LazyLayers(self.entries, self.keep, {**self.replaced, index: tensor})

    @classmethod
    def of_file(cls, path: Path, name: str, n_layers: int) -> _LazyLayers:
        """``name.0`` ... ``name.{n_layers - 1}`` of one statistics file."""
        return cls([(path, f"{name}.{i}") for i in range(n_layers)])

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        return self.stored(index).double()

    def stored(self, index: int) -> torch.Tensor:
        """Entry ``index`` in the file's dtype (float32 for the second moments)."""
        from safetensors import safe_open

        if index in self.replaced:
            return self.replaced[index]

        path, key = self.entries[index]
        with safe_open(str(path), framework="pt") as handle:
            return handle.get_tensor(key)

    def shape(self, index: int) -> tuple[int, ...]:
        """Entry ``index``'s shape, from the file's header (nothing else is read)."""
        from safetensors import safe_open

        path, key = self.entries[index]
        with safe_open(str(path), framework="pt") as handle:
            return tuple(handle.get_slice(key).get_shape())


class _ScratchDirectory:
    """A temporary directory, removed when this object is garbage-collected (or at exit)."""

    def __init__(self, prefix: str, parent: str | Path | None = None):
        self.path = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
        self._remove = weakref.finalize(self, shutil.rmtree, self.path, ignore_errors=True)


@dataclass
class ActivationStats:
    """Per-unit activation statistics of one model over one calibration set.

    All ``*_l1`` are ``mean |a|`` and all ``*_l2sq`` are ``mean a²`` over the ``n_tokens``
    calibration tokens, float64. Lists are indexed by decoder layer.
    """

    mlp_l1: list[torch.Tensor]  # [intermediate] per layer: the MLP activation's output channels
    mlp_l2sq: list[torch.Tensor]
    attn_dim_l1: list[torch.Tensor]  # [n_heads * head_dim] per layer: output-projection input columns
    attn_dim_l2sq: list[torch.Tensor]
    reader_l1: list[torch.Tensor]  # [n_readers, hidden] per layer: inputs of residual-stream readers
    reader_l2sq: list[torch.Tensor]
    head_layout: list[tuple[int, int, int]]  # (n_heads, n_kv_heads, head_dim) per layer
    token_counts: torch.Tensor  # int64 [vocab]: occurrences of each id in the calibration windows
    n_tokens: int
    metadata: dict[str, Any] = field(default_factory=dict)
    # second moments (analyze(moments=True)); None when not measured
    mlp_gram: list[torch.Tensor] | None = (
        None  # [d, d] per layer: E[a aᵀ] of the MLP output projection's input
    )
    mlp_mean: list[torch.Tensor] | None = None  # [d] per layer: E[a]
    attn_gram: list[torch.Tensor] | None = None  # [n_heads*head_dim]² per layer: the same for the attention
    attn_mean: list[torch.Tensor] | None = None
    mlp_fisher: list[torch.Tensor] | None = None  # [hidden] per layer: E[(∂loss/∂ MLP output)²]
    attn_fisher: list[torch.Tensor] | None = None  # [hidden] per layer: the same for the attention output
    fisher_tokens: int = 0
    # the peers' criteria and depth scores (minigpts.criteria, minigpts.depth); None when not measured.
    # mlp_mean / attn_mean above are also filled without moments, from the first-order sums
    reader_mean: list[torch.Tensor] | None = None  # [n_readers, hidden] per layer: E[x] (FLAP's variance)
    mlp_window_l2: list[torch.Tensor] | None = None  # [d] per layer: mean over windows of ‖a_j‖₂ over tokens
    head_window_l2: list[torch.Tensor] | None = None  # [n_heads] per layer: the same over the head's dims
    reader_window_l2: list[torch.Tensor] | None = None  # [n_readers, hidden] per layer (Minitron)
    mlp_taylor: list[torch.Tensor] | None = None  # [d] per layer: Σ |w·∂L/∂w| over the channel's weights
    head_taylor: list[torch.Tensor] | None = None  # [n_heads] per layer (LLM-Pruner, taylor_tokens > 0)
    hidden_taylor: list[torch.Tensor] | None = None  # [hidden] per layer: the layer's coupled weights
    embed_taylor: torch.Tensor | None = None  # [hidden]: embedding, final norm, untied LM head
    taylor_tokens: int = 0
    layer_bi: torch.Tensor | None = None  # [n_layers]: ShortGPT's Block Influence, 1 - mean cos(in, out)
    layer_loss: torch.Tensor | None = None  # [n_layers]: loss increase (nats/token) without the layer
    depth_tokens: int = 0
    # [vocab]: the model's next-token probabilities summed over the first expected_tokens calibration
    # tokens (--vocab-keep-expected; minigpts.vocab.expected_token_counts), measured in the same pass
    expected_counts: torch.Tensor | None = None
    expected_tokens: int = 0

    @property
    def has_moments(self) -> bool:
        return self.mlp_gram is not None and self.attn_gram is not None

    @property
    def has_fisher(self) -> bool:
        return self.mlp_fisher is not None and self.attn_fisher is not None

    @property
    def n_layers(self) -> int:
        return len(self.mlp_l1)

    @property
    def head_l1(self) -> list[torch.Tensor]:
        """[n_heads] per layer: the paper's head score, mean over the head's dims of ``mean |a|``."""
        return self._per_head(self.attn_dim_l1)

    @property
    def head_l2sq(self) -> list[torch.Tensor]:
        """[n_heads] per layer: mean over the head's dims of ``mean a²``."""
        return self._per_head(self.attn_dim_l2sq)

    @property
    def hidden_l1(self) -> torch.Tensor:
        """[hidden]: ``mean |a|`` of each residual channel, averaged over every reader of every layer."""
        return torch.cat(self.reader_l1).mean(0)

    @property
    def hidden_l2sq(self) -> torch.Tensor:
        return torch.cat(self.reader_l2sq).mean(0)

    def _per_head(self, per_dim: list[torch.Tensor]) -> list[torch.Tensor]:
        return [
            values.view(n_heads, head_dim).mean(1)
            for values, (n_heads, _, head_dim) in zip(per_dim, self.head_layout, strict=True)
        ]

    def check_model(self, model: nn.Module) -> None:
        """UserError unless these statistics were measured on a model of exactly this shape."""
        from minigpts.arch import get_adapter

        adapter = get_adapter(model)
        layers = adapter.layers(model)
        origin = self.metadata.get("model", "another model")
        problem = None
        if len(layers) != self.n_layers:
            problem = f"{self.n_layers} layers, the model has {len(layers)}"
        else:
            for i, layer in enumerate(layers):
                readers = adapter.residual_readers(layer)
                if adapter.mlp_width(layer) != self.mlp_l1[i].numel():
                    problem = f"layer {i}: MLP width {self.mlp_l1[i].numel()}, the model has {adapter.mlp_width(layer)}"
                elif tuple(adapter.head_layout(layer)) != tuple(self.head_layout[i]):
                    problem = f"layer {i}: heads {tuple(self.head_layout[i])}, the model has {tuple(adapter.head_layout(layer))}"
                elif tuple(self.reader_l1[i].shape) != (len(readers), adapter.in_features(readers[0])):
                    problem = f"layer {i}: residual readers {tuple(self.reader_l1[i].shape)}, the model has {(len(readers), adapter.in_features(readers[0]))}"
                if problem:
                    break
        if problem:
            raise UserError(
                f"--stats: these statistics were measured on {origin} ({problem}); re-run `minigpts analyze` on this model"
            )

    # --- file format ------------------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        """Write one safetensors file (atomically: temporary file, then rename).

        Written a tensor at a time (``minigpts.tensorfile``): each layer's second moments are converted
        to float32, or read from their file when they are lazy, only when their turn comes.
        """
        from minigpts.tensorfile import write_safetensors

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors: dict[str, Any] = {"token_counts": self.token_counts.contiguous()}
        for name in _PER_LAYER + (_MOMENTS if self.has_moments else ()):
            # second-moment matrices are large: float32 on disk (7 significant digits are plenty for a refit)
            values = getattr(self, name)
            for i in range(len(values)):
                tensors[f"{name}.{i}"] = (
                    _deferred_gram(values, i)
                    if name.endswith("_gram")
                    else values[i].detach().to("cpu", torch.float64).contiguous()
                )
        if self.has_fisher:
            for name in ("mlp_fisher", "attn_fisher"):
                for i, tensor in enumerate(getattr(self, name)):
                    tensors[f"{name}.{i}"] = tensor.detach().to("cpu", torch.float64).contiguous()
        for name in _OPTIONAL_PER_LAYER:  # each saved when measured; files without them still load
            values = getattr(self, name)
            if values is not None and f"{name}.0" not in tensors:
                for i, tensor in enumerate(values):
                    tensors[f"{name}.{i}"] = tensor.detach().to("cpu", torch.float64).contiguous()
        for name in _OPTIONAL_WHOLE:
            if getattr(self, name) is not None:
                tensors[name] = getattr(self, name).detach().to("cpu", torch.float64).contiguous()
        header = {
            "format": STATS_FORMAT,
            "format_version": str(STATS_FORMAT_VERSION),
            "n_tokens": str(self.n_tokens),
            "fisher_tokens": str(self.fisher_tokens if self.has_fisher else 0),
            "taylor_tokens": str(self.taylor_tokens if self.mlp_taylor is not None else 0),
            "depth_tokens": str(self.depth_tokens if self.layer_loss is not None else 0),
            "expected_tokens": str(self.expected_tokens if self.expected_counts is not None else 0),
            "head_layout": json.dumps([list(layout) for layout in self.head_layout]),
            "metadata": json.dumps(self.metadata, default=str),
        }
        partial = path.with_name(f".{path.name}.partial")
        write_safetensors(partial, tensors, metadata=header)
        os.replace(partial, path)

    @classmethod
    def load(cls, path: str | Path, *, lazy_moments: bool = False) -> ActivationStats:
        """The statistics in ``path``; ``lazy_moments``: the (width)² second moments stay in the file and
        each layer's is read when indexed (``prune --offload``: all of them may outweigh a layer)."""
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise UserError(
                f"--stats {path}: no such file; create it with `minigpts analyze --model M --data D --out {path}`"
            )
        not_stats = f"--stats {path}: not a minigpts statistics file (make one with `minigpts analyze`)"
        try:
            with safe_open(str(path), framework="pt") as handle:
                header = handle.metadata() or {}
                if header.get("format") != STATS_FORMAT:
                    raise UserError(not_stats)
                keys = list(handle.keys())  # noqa: SIM118
                tensors = {
                    key: handle.get_tensor(key) for key in keys if not (lazy_moments and "_gram." in key)
                }
        except UserError:
            raise
        except Exception as error:  # safetensors raises several types for a file that is not its own
            raise UserError(f"{not_stats}: {error}") from None
        if int(header.get("format_version", "0")) > STATS_FORMAT_VERSION:
            raise UserError(f"--stats {path}: written by a newer minigpts; upgrade minigpts to read it")
        head_layout = [tuple(layout) for layout in json.loads(header["head_layout"])]
        names = _PER_LAYER + (_MOMENTS if "mlp_gram.0" in keys else ())
        names += ("mlp_fisher", "attn_fisher") if "mlp_fisher.0" in tensors else ()
        names += tuple(n for n in _OPTIONAL_PER_LAYER if f"{n}.0" in tensors and n not in names)
        lists = {
            name: _LazyLayers.of_file(path, name, len(head_layout))
            if lazy_moments and name.endswith("_gram")
            else [tensors[f"{name}.{i}"].double() for i in range(len(head_layout))]
            for name in names
        }
        whole = {name: tensors[name].double() for name in _OPTIONAL_WHOLE if name in tensors}
        return cls(
            **lists,
            **whole,
            taylor_tokens=int(header.get("taylor_tokens", "0")),
            depth_tokens=int(header.get("depth_tokens", "0")),
            expected_tokens=int(header.get("expected_tokens", "0")),
            fisher_tokens=int(header.get("fisher_tokens", "0")),
            head_layout=head_layout,
            token_counts=tensors["token_counts"],
            n_tokens=int(header["n_tokens"]),
            metadata=json.loads(header["metadata"]),
        )


def _deferred_gram(values: Sequence[torch.Tensor], index: int):
    """Layer ``index``'s second moments as ``save`` writes them: float32, converted (or read from the
    lazy list's file) only when written."""
    from minigpts.tensorfile import DeferredTensor

    if isinstance(values, _LazyLayers):
        return DeferredTensor(torch.float32, values.shape(index), lambda: values.stored(index))
    tensor = values[index]
    return DeferredTensor(torch.float32, tuple(tensor.shape), lambda: tensor)


_PER_LAYER = ("mlp_l1", "mlp_l2sq", "attn_dim_l1", "attn_dim_l2sq", "reader_l1", "reader_l2sq")
_MOMENTS = ("mlp_gram", "mlp_mean", "attn_gram", "attn_mean")
_OPTIONAL_PER_LAYER = (
    "mlp_mean", "attn_mean", "reader_mean", "mlp_window_l2", "head_window_l2", "reader_window_l2",
    "mlp_taylor", "head_taylor", "hidden_taylor",
)  # fmt: skip
_OPTIONAL_WHOLE = ("embed_taylor", "layer_bi", "layer_loss", "expected_counts")


class _ExpectedPass:
    """``analyze(expected_tokens=…)``: the first windows run through the LM head as well (the head
    deferred as evaluation does), their next-token probabilities summed in float64."""

    def __init__(self, model, windows: torch.Tensor, tokens: int, batch_size: int, enabled: bool):
        from minigpts import distributed

        n_windows, seq_len = windows.shape
        self.model, self.head, self.context = model, None, None
        self.windows = max(1, min(n_windows, -(-tokens // seq_len))) if tokens > 0 and enabled else 0
        self.seq_len = seq_len
        self.first = distributed.bounds(n_windows, batch_size)[0]  # this process's first window
        self.probe = windows[:1, :8]
        width = model.get_output_embeddings().weight.shape[0]
        self.total = torch.zeros(width, dtype=torch.float64) if self.windows else None

    def open(self) -> None:
        from minigpts.evaluation import deferred_head

        if self.windows:
            device = next(self.model.parameters()).device
            self.context = deferred_head(self.model, self.probe.to(device))
            self.head = self.context.__enter__()

    def run(self, batch: torch.Tensor, start: int) -> torch.Tensor:
        """Sum the probabilities of ``batch``'s windows among the first ones; return the others."""
        from minigpts.vocab import expected_sums

        count = min(len(batch), max(0, self.windows - self.first - start))
        if count:
            self.total += expected_sums(self.model, self.head, batch[:count])
        return batch[count:]

    def close(self) -> None:
        if self.context is not None:
            self.context.__exit__(None, None, None)
            self.context = None

    def results(self) -> dict[str, Any]:
        """ActivationStats fields: the summed probabilities and their token count (none when not run)."""
        if self.total is None:
            return {}
        return {"expected_counts": self.total, "expected_tokens": self.windows * self.seq_len}


class _Moments:
    """Running float64 sums of a (per channel) and a aᵀ of the tensors it is given (matmul in float32).

    Allocated at the first use (layer by layer, only the layers run so far hold theirs); once
    ``spilled`` (``_LayerSums.spill``) the gram's mean is in a file and its float64 sum is freed.
    """

    def __init__(self, width: int, device: torch.device):
        self.width, self.device = width, device
        self.sum: torch.Tensor | None = None
        self.gram: torch.Tensor | None = None
        self.spilled = False

    def allocate(self) -> list[torch.Tensor]:
        """[the sum, the gram's sum] (zeros at the first call)."""
        if self.sum is None:
            with torch.inference_mode(False):  # normal tensors: reduced and divided after the pass
                self.sum = torch.zeros(self.width, dtype=torch.float64, device=self.device)
                self.gram = torch.zeros(self.width, self.width, dtype=torch.float64, device=self.device)
        return [self.sum, self.gram]

    def add(self, x: torch.Tensor) -> None:
        total, gram = self.allocate()
        x = x.reshape(-1, x.shape[-1])
        work = x if x.dtype in (torch.float32, torch.float64) else x.float()
        total += work.sum(0, dtype=torch.float64).to(total.device)
        gram += symmetric_gram(work).to(gram.device, torch.float64)


GRAM_BLOCK = 384  # columns per block of symmetric_gram: small enough to skip most of the lower half


def symmetric_gram(x: torch.Tensor) -> torch.Tensor:
    """xᵀx from the blocks on and above its diagonal, mirrored: ~60 % of one matmul's work for a
    1536-wide MLP (the analysis's second moments were a third of its time), the same values."""
    width = x.shape[1]
    blocks = max(1, round(width / GRAM_BLOCK))
    if blocks == 1:
        return x.T @ x
    gram = torch.empty(width, width, dtype=x.dtype, device=x.device)
    edges = [width * i // blocks for i in range(blocks + 1)]
    for start, stop in zip(edges, edges[1:]):
        row = x[:, start:stop].T @ x[:, start:]
        gram[start:stop, start:] = row
        gram[stop:, start:stop] = row[:, stop - start :].T
    return gram


class _Scratch:
    """One scratch buffer shared by every hook of a pass, grown on demand.

    Reducing an activation in cache-sized row blocks through this buffer (|x| in place, sum, square
    in place, sum) reads it once instead of allocating two full-size temporaries: on a 2-core CPU
    that is 3× faster than ``x.abs().sum(0)`` + ``(x * x).sum(0)`` for SmolLM2's MLP activations.
    """

    def __init__(self):
        self.buffer: torch.Tensor | None = None

    def get(self, rows: int, width: int, like: torch.Tensor) -> torch.Tensor:
        """A [rows, width] view: float64 for float64 activations, float32 for every other dtype."""
        dtype = torch.float64 if like.dtype == torch.float64 else torch.float32
        needed = rows * width
        buffer = self.buffer
        if buffer is None or buffer.numel() < needed or buffer.device != like.device or buffer.dtype != dtype:
            self.buffer = buffer = torch.empty(needed, dtype=dtype, device=like.device)
        return buffer[:needed].view(rows, width)


CPU_BLOCK_ROWS = 1024  # 6 MB blocks for a 1536-wide MLP: fits the caches of small CPUs


class _ChannelSums:
    """Running float64 sums of |a| and a² per channel (last dim) of the tensors it is given.

    Each batch is reduced in float32 (float64 activations in float64; 16-bit ones are widened
    first: their sums over thousands of tokens would lose the small channels), block by block on
    CPU, then added in float64.
    """

    def __init__(
        self,
        shape: tuple[int, ...],
        device: torch.device,
        scratch: _Scratch,
        *,
        window: int | None = None,
        group: int = 1,
    ):
        self.abs_sum = torch.zeros(shape, dtype=torch.float64, device=device)
        self.square_sum = torch.zeros(shape, dtype=torch.float64, device=device)
        self.signed_sum = torch.zeros(shape, dtype=torch.float64, device=device)
        self.scratch = scratch
        # window: tokens per calibration window; then also Σ over windows of the L2 norm over the
        # window's tokens (and over each ``group`` of consecutive channels: a head's dims), Minitron's
        self.window, self.group = window, group
        self.window_l2 = None
        if window is not None:
            self.window_l2 = torch.zeros(
                (*shape[:-1], shape[-1] // group), dtype=torch.float64, device=device
            )

    def add(self, x: torch.Tensor, row: int | tuple = ()) -> None:
        parts = [x] if self.window is None else x.reshape(-1, self.window, x.shape[-1])
        for part in parts:  # one window at a time when windows are tracked (a batch may be flattened)
            abs_sum, square_sum, signed_sum = _reduce(part, self.scratch)
            self.abs_sum[row] += abs_sum.to(self.abs_sum.device)
            self.square_sum[row] += square_sum.to(self.square_sum.device)
            self.signed_sum[row] += signed_sum.to(self.signed_sum.device)
            if self.window_l2 is not None:
                grouped = square_sum.to(self.window_l2.device, torch.float64).view(-1, self.group).sum(1)
                self.window_l2[row] += grouped.sqrt()


def _reduce(x: torch.Tensor, scratch: _Scratch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-channel sums of |x|, x² and x over every row of ``x`` [..., channels] (float32, or float64)."""
    x = x.reshape(-1, x.shape[-1])
    rows, width = x.shape
    block = CPU_BLOCK_ROWS if x.device.type == "cpu" else rows
    buffer = scratch.get(min(block, rows), width, x)
    abs_sum = torch.zeros(width, dtype=buffer.dtype, device=x.device)
    square_sum = torch.zeros(width, dtype=buffer.dtype, device=x.device)
    signed_sum = torch.zeros(width, dtype=buffer.dtype, device=x.device)
    for start in range(0, rows, block):
        chunk = x[start : start + block]
        work = buffer[: chunk.shape[0]]
        work.copy_(chunk)
        signed_sum += work.sum(0)
        work.abs_()
        abs_sum += work.sum(0)
        work.mul_(work)
        square_sum += work.sum(0)
    return abs_sum, square_sum, signed_sum


def _check_windows(windows: torch.Tensor, vocab_size: int) -> torch.LongTensor:
    if not isinstance(windows, torch.Tensor) or windows.dim() != 2 or windows.numel() == 0:
        raise UserError("calibration data: expected a non-empty [windows, seq_len] tensor of token ids")
    if windows.dtype.is_floating_point or windows.dtype == torch.bool:
        raise UserError(f"calibration data: token ids must be integers, got {windows.dtype}")
    windows = windows.long()
    low, high = int(windows.min()), int(windows.max())
    if low < 0 or high >= vocab_size:
        raise UserError(
            f"calibration data: token ids span {low}..{high} but the model's vocabulary has {vocab_size}; "
            "was the corpus tokenized with another model's tokenizer?"
        )
    return windows


def analyze(
    model: nn.Module,
    windows: torch.LongTensor,
    *,
    batch_size: int = 4,
    progress: bool = True,
    metadata: dict[str, Any] | None = None,
    moments: bool = False,
    fisher_tokens: int = 0,
    taylor_tokens: int = 0,
    depth_tokens: int = 0,
    expected_tokens: int = 0,
    run_body: Any = None,
    work_dir: str | Path | None = None,
) -> ActivationStats:
    """Run the model body over ``windows`` [N, L] and return the per-unit statistics.

    ``moments=True`` also records the second moments the refit needs; ``fisher_tokens`` > 0 runs the
    gradient pass the error allocation needs over that many tokens of the first windows;
    ``taylor_tokens`` > 0 the gradient pass of ``--criterion taylor`` (``taylor_importance``) and
    ``depth_tokens`` > 0 the passes of ``--layer-criterion loss`` (``minigpts.depth.removal_loss``),
    each over the first windows. Block Influence (``--layer-criterion bi``) is always measured.
    ``expected_tokens`` > 0 runs the LM head too over that many tokens of the first windows and sums
    the next-token probabilities (``--vocab-keep-expected``'s counts; no extra forward pass).

    The model is put in eval mode for the pass (dropout would distort the statistics) and restored
    afterwards; hooks are removed even when the pass fails. ``metadata`` (data, seed, ...) is merged
    into the recorded provenance.

    ``run_body(local_windows, batch_size, bar, layer_done)``, when given, replaces the pass itself (by
    default ``body(input_ids=batch)`` batch by batch) with this same code's hooks: ``analysis_offload``
    runs the layers one at a time, calling ``layer_done(i)`` once layer i has seen every batch (its
    second moments then go to a file under ``work_dir``: ``_LayerSums.spill``).
    """
    from minigpts import distributed
    from minigpts.arch import get_adapter

    if batch_size < 1:
        raise UserError(f"--batch-size {batch_size}: must be at least 1")
    adapter = get_adapter(model)
    vocab_size = model.get_input_embeddings().num_embeddings
    windows = _check_windows(windows, vocab_size)
    n_windows, seq_len = windows.shape
    sums = _LayerSums(adapter, adapter.layers(model), next(model.parameters()).device, seq_len, moments)
    local = distributed.shard(windows, batch_size)  # all of them on one process
    expected = _ExpectedPass(model, windows, expected_tokens, batch_size, enabled=run_body is None)
    started = time.perf_counter()
    run_body = sums.spilling(run_body, windows.numel(), work_dir)
    _hooked_pass(model, adapter, sums, expected, local, batch_size, progress, run_body)
    distributed.reduce(sums.tensors() + [expected.total])  # the other processes' sums (data parallel)
    seconds = time.perf_counter() - started
    extra = sums.results(windows.numel(), n_windows) | expected.results()
    extra |= _gradient_passes(model, windows, fisher_tokens, taylor_tokens, depth_tokens, progress)
    return ActivationStats(
        **extra,
        head_layout=[tuple(adapter.head_layout(layer)) for layer in sums.layers],
        token_counts=torch.bincount(windows.flatten().cpu(), minlength=vocab_size),
        n_tokens=windows.numel(),
        metadata=_provenance(model, adapter, windows, seconds) | (metadata or {}),
    )


def _hooked_pass(
    model, adapter, sums: _LayerSums, expected: _ExpectedPass, local, batch_size, progress, run_body
):
    """``analyze``'s forward pass with the hooks on, in eval mode; hooks and mode restored even on error."""
    from tqdm.auto import tqdm

    bar = tqdm(total=local.numel(), unit="tok", unit_scale=True, desc="analyze", disable=not progress)
    handles, was_training = [], model.training
    device = next(model.parameters()).device
    try:
        expected.open()  # before the hooks: its probe forwards must not count
        handles = sums.register()
        model.eval()
        body = adapter.body(model)
        with torch.inference_mode():
            if run_body is not None:
                run_body(local, batch_size, bar)
                return
            for start in range(0, len(local), batch_size):
                batch = local[start : start + batch_size].to(device, non_blocking=True)
                rest = expected.run(batch, start)  # the first windows through the LM head too
                if len(rest):
                    body(input_ids=rest, use_cache=False)
                bar.update(batch.numel())
    finally:
        expected.close()
        for handle in handles:
            handle.remove()
        model.train(was_training)
        bar.close()


class _LayerSums:
    """The running sums of one analysis pass (per layer: MLP and attention output-projection inputs,
    residual readers, Block Influence, second moments) and the forward hooks that feed them."""

    def __init__(self, adapter, layers: list[nn.Module], device: torch.device, seq_len: int, moments: bool):
        from minigpts.depth import BlockInfluence

        on = device if device.type in ("cpu", "cuda") else torch.device("cpu")  # float64 support
        scratch = _Scratch()
        self.adapter, self.layers = adapter, layers
        self.mlp = [_ChannelSums((adapter.mlp_width(lay),), on, scratch, window=seq_len) for lay in layers]
        self.attn = [
            _ChannelSums((adapter.attn_width(lay),), on, scratch, window=seq_len, group=adapter.head_layout(lay)[2])
            for lay in layers
        ]  # fmt: skip
        self.readers = [adapter.residual_readers(layer) for layer in layers]
        self.reader_sums = [
            _ChannelSums((len(modules), adapter.in_features(modules[0])), on, scratch, window=seq_len)
            for modules in self.readers
        ]
        self.influence = BlockInfluence(len(layers), on)
        self.mlp_moments = [_Moments(adapter.mlp_width(lay), on) for lay in layers] if moments else None
        self.attn_moments = [_Moments(adapter.attn_width(lay), on) for lay in layers] if moments else None
        self.spill_dir: _ScratchDirectory | None = None  # where spill() writes each layer's second moments

    def register(self) -> list:
        """The forward hooks, in the order the sums are fed (remove them when done)."""

        def hook(sums, row: int | tuple = ()):
            return lambda module, args: sums.add(args[0], row)

        def moment_hook(target: _Moments):
            return lambda module, args: target.add(args[0])

        handles, adapter = [], self.adapter
        for i, layer in enumerate(self.layers):
            handles.append(adapter.mlp_out(layer).register_forward_pre_hook(hook(self.mlp[i])))
            handles.append(adapter.attn_out(layer).register_forward_pre_hook(hook(self.attn[i])))
            for r, module in enumerate(self.readers[i]):
                handles.append(module.register_forward_pre_hook(hook(self.reader_sums[i], r)))
            if self.mlp_moments is not None:
                mlp_moments, attn_moments = self.mlp_moments[i], self.attn_moments[i]
                handles.append(adapter.mlp_out(layer).register_forward_pre_hook(moment_hook(mlp_moments)))
                handles.append(adapter.attn_out(layer).register_forward_pre_hook(moment_hook(attn_moments)))
            handles.append(layer.register_forward_hook(self.influence.hook(i), with_kwargs=True))
        return handles

    def tensors(self) -> list[torch.Tensor]:
        """Every running sum (what data-parallel analysis all-reduces)."""
        channel = [t for s in self.mlp + self.attn + self.reader_sums for t in (s.abs_sum, s.square_sum)]
        channel += [t for s in self.mlp + self.attn + self.reader_sums for t in (s.signed_sum, s.window_l2)]
        moments = (self.mlp_moments or []) + (self.attn_moments or [])
        return (
            channel
            + [self.influence.sums, self.influence.tokens]
            + [t for m in moments if not m.spilled for t in m.allocate()]  # spilled: reduced already
        )

    def spilling(self, run_body, n_tokens: int, parent: str | Path | None):
        """``run_body`` (None stays None) given its ``layer_done``: ``spill``."""
        if run_body is None:
            return None
        return functools.partial(
            run_body, layer_done=functools.partial(self.spill, n_tokens=n_tokens, parent=parent)
        )

    def spill(self, i: int, n_tokens: int, parent: str | Path | None = None) -> None:
        """Layer ``i`` has seen every batch (layer-by-layer analysis): its second moments are reduced
        across processes (every process spills the same layers in the same order), their means
        written to a file in a temporary directory (made under ``parent`` at the first call), and
        the float64 gram sums freed. The mean vectors stay (reduced) in memory."""
        from minigpts import distributed

        if self.mlp_moments is None or self.mlp_moments[i].spilled:
            return
        if self.spill_dir is None:
            self.spill_dir = _ScratchDirectory("minigpts-moments-", parent)
        distributed.reduce(self.mlp_moments[i].allocate() + self.attn_moments[i].allocate())
        self._write_grams(i, n_tokens)

    def _spill_file(self, i: int) -> Path:
        return self.spill_dir.path / f"layer-{i}.safetensors"

    def _write_grams(self, i: int, n_tokens: int) -> None:
        """Layer ``i``'s (reduced) gram sums: their means to its file, as float32 (as ``save`` stores
        them), then freed."""
        from safetensors.torch import save_file

        grams = {}
        for name, moments in (("mlp_gram", self.mlp_moments[i]), ("attn_gram", self.attn_moments[i])):
            gram = moments.allocate()[1]
            moments.gram, moments.spilled = None, True
            grams[name] = gram.div_(n_tokens).to("cpu", torch.float32)  # results()' means, rounded
            del gram
        save_file(grams, self._spill_file(i))

    def results(self, n_tokens: int, n_windows: int) -> dict[str, Any]:
        """ActivationStats fields: means over the tokens (windows for the window norms)."""

        def means(values: list[torch.Tensor]) -> list[torch.Tensor]:
            return [(v / n_tokens).cpu() for v in values]

        mlp, attn, readers = self.mlp, self.attn, self.reader_sums
        fields = {
            "mlp_l1": means([s.abs_sum for s in mlp]),
            "mlp_l2sq": means([s.square_sum for s in mlp]),
            "attn_dim_l1": means([s.abs_sum for s in attn]),
            "attn_dim_l2sq": means([s.square_sum for s in attn]),
            "reader_l1": means([s.abs_sum for s in readers]),
            "reader_l2sq": means([s.square_sum for s in readers]),
            # E[a]: with moments, the moments' own float64 sums; without, the first-order ones
            "mlp_mean": means([s.signed_sum for s in mlp]),
            "attn_mean": means([s.signed_sum for s in attn]),
            "reader_mean": means([s.signed_sum for s in readers]),
            "mlp_window_l2": [(s.window_l2 / n_windows).cpu() for s in mlp],
            "head_window_l2": [(s.window_l2 / n_windows).cpu() for s in attn],
            "reader_window_l2": [(s.window_l2 / n_windows).cpu() for s in readers],
            "layer_bi": self.influence.scores(),
        }
        if self.mlp_moments is not None:
            fields |= {
                "mlp_mean": means([m.allocate()[0] for m in self.mlp_moments]),
                "attn_mean": means([m.allocate()[0] for m in self.attn_moments]),
            }
            fields |= self._grams(n_tokens, means)
        return fields

    def _grams(self, n_tokens: int, means) -> dict[str, Any]:
        """mlp_gram and attn_gram: in memory, or (after ``spill``) read per layer from their files, the
        directory removed once no list holds it; a layer not spilled yet (already reduced) is written now."""
        if self.spill_dir is None:
            return {
                "mlp_gram": means([m.allocate()[1] for m in self.mlp_moments]),
                "attn_gram": means([m.allocate()[1] for m in self.attn_moments]),
            }
        for i, moments in enumerate(self.mlp_moments):
            if not moments.spilled:
                self._write_grams(i, n_tokens)
        return {
            name: _LazyLayers([(self._spill_file(i), name) for i in range(len(self.layers))], self.spill_dir)
            for name in ("mlp_gram", "attn_gram")
        }


def _provenance(model: nn.Module, adapter, windows: torch.Tensor, seconds: float) -> dict[str, Any]:
    parameter = next(model.parameters())
    n_windows, seq_len = windows.shape
    return {
        "model": getattr(model.config, "_name_or_path", "") or type(model).__name__,
        "family": adapter.family,
        "seq_len": seq_len,
        "windows": n_windows,
        "dtype": str(parameter.dtype).removeprefix("torch."),
        "device": str(parameter.device),
        "seconds": round(seconds, 3),
        "tokens_per_second": round(windows.numel() / seconds, 1) if seconds > 0 else None,
        "minigpts_version": __version__,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def _gradient_passes(model, windows, fisher_tokens: int, taylor_tokens: int, depth_tokens: int, progress):
    """The statistics that need more passes over the first windows: Fisher, Taylor, layer removal."""
    n_windows, seq_len = windows.shape

    def first(tokens: int) -> int:
        return max(1, min(n_windows, -(-tokens // seq_len)))

    extra: dict[str, Any] = {}
    if fisher_tokens > 0:
        count = first(fisher_tokens)
        mlp_fisher, attn_fisher = gradient_moments(model, windows[:count], progress=progress)
        extra |= {"mlp_fisher": mlp_fisher, "attn_fisher": attn_fisher, "fisher_tokens": count * seq_len}
    if taylor_tokens > 0:
        count = first(taylor_tokens)
        names = ("mlp_taylor", "head_taylor", "hidden_taylor", "embed_taylor")
        extra |= dict(zip(names, taylor_importance(model, windows[:count], progress=progress), strict=True))
        extra["taylor_tokens"] = count * seq_len
    if depth_tokens > 0:
        from minigpts.depth import removal_loss

        count = first(depth_tokens)
        extra |= {
            "layer_loss": removal_loss(model, windows[:count], progress=progress),
            "depth_tokens": count * seq_len,
        }
    return extra


def gradient_moments(
    model: nn.Module, windows: torch.LongTensor, *, progress: bool = True
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per layer, E[g²] per residual channel of the loss gradient at the MLP's and the attention's output.

    The loss is the summed next-token loss of each window, so g at position t carries what that
    position's output does to every later prediction. Only activations take gradients (the
    parameters' requires_grad is switched off for the pass and restored), one window at a time.
    """
    from tqdm.auto import tqdm

    from minigpts.arch import get_adapter

    adapter = get_adapter(model)
    layers = adapter.layers(model)
    device = next(model.parameters()).device
    hidden = adapter.out_features(adapter.mlp_out(layers[0]))
    sums = {
        kind: [torch.zeros(hidden, dtype=torch.float64, device=device) for _ in layers]
        for kind in ("mlp", "attn")
    }

    def capture(store: torch.Tensor):
        def forward_hook(module, args, output):
            def accumulate(grad):
                store.add_(grad.detach().to(torch.float64).pow(2).reshape(-1, grad.shape[-1]).sum(0))

            output.register_hook(accumulate)

        return forward_hook

    handles = [adapter.embedding(model).register_forward_hook(lambda m, a, out: out.requires_grad_())]
    for i, layer in enumerate(layers):
        handles.append(adapter.mlp_out(layer).register_forward_hook(capture(sums["mlp"][i])))
        handles.append(adapter.attn_out(layer).register_forward_hook(capture(sums["attn"][i])))
    flags = [(p, p.requires_grad) for p in model.parameters()]
    was_training = model.training
    from minigpts import distributed

    bar = tqdm(total=windows.numel(), unit="tok", unit_scale=True, desc="gradients", disable=not progress)
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        model.eval()
        for window in distributed.shard(windows):  # all of them on one process
            batch = window.unsqueeze(0).to(device)
            loss = model(input_ids=batch, labels=batch, use_cache=False).loss
            (loss * (batch.numel() - 1)).backward()
            bar.update(batch.numel())
        distributed.reduce(sums["mlp"] + sums["attn"])
    finally:
        for handle in handles:
            handle.remove()
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)
        bar.close()
    n = windows.numel()
    return [(s / n).cpu() for s in sums["mlp"]], [(s / n).cpu() for s in sums["attn"]]


def taylor_importance(
    model: nn.Module, windows: torch.LongTensor, *, progress: bool = True
) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
    """LLM-Pruner's first-order Taylor importance (Ma et al., NeurIPS 2023, arXiv 2305.11627) of every unit.

    ``g = ∂L/∂w`` of the mean next-token loss over ``windows``, then per weight ``|w · g|`` (their
    element-wise first-order importance, ``--taylor param_first``), summed over each unit's coupled
    weights (their ``sum`` group reduction):

    - MLP channel j: row j (and bias entry j) of every MLP input projection, column j of the output one;
    - query head h: its rows (and bias entries) of q, its columns of the output projection, and its
      share of its KV head's rows of k and v (shared by the group's query heads: 1/group each; all of
      them without GQA, as LLM-Pruner couples them);
    - hidden channel j, per layer: column j of every projection reading the residual stream (q, k, v,
      the MLP inputs), row j (and bias entry j) of the two output projections, entry j of the layer's
      norms; ``embed``: column j of the token embedding and of an untied LM head, entry j of the final
      norm (those of the residual width only: OPT's narrower embedding behind project_in is not).

    Which dim of which projection belongs to which unit is the adapter's ``projection_dims`` (fused
    q/k/v and gate/up projections included).

    Memory: one window per backward pass, and one gradient per coupled weight (as one training step);
    only those weights take gradients, and every parameter's ``requires_grad`` and ``.grad`` are
    restored afterwards. Returns (mlp [d] per layer, heads [n_heads] per layer, hidden [hidden] per
    layer, embed [hidden]), float64 on the CPU.
    """
    from minigpts.arch import get_adapter

    adapter = get_adapter(model)
    layers = adapter.layers(model)
    hidden = adapter.residual_width(layers[0])
    coupled, outer = _taylor_parameters(model, adapter, layers, hidden)
    flags = [(p, p.requires_grad, p.grad) for p in model.parameters()]
    was_training = model.training
    try:
        for p, _, _ in flags:
            p.requires_grad_(False)
            p.grad = None
        for p in coupled:
            p.requires_grad_(True)
        model.eval()
        _taylor_gradients(model, windows, coupled, progress)
        per_layer = [_layer_taylor(adapter, layer, hidden) for layer in layers]
        embed = torch.zeros(hidden, dtype=torch.float64)
        for p in outer:
            values = _salience(p)
            embed += (values if values.dim() == 1 else values.sum(0)).cpu()
    finally:
        for p, flag, grad in flags:
            p.requires_grad_(flag)
            p.grad = grad
        model.train(was_training)
    mlp, heads, hidden_sums = (list(column) for column in zip(*per_layer, strict=True))
    return mlp, heads, hidden_sums, embed


def _norm_parameters(norm) -> list[nn.Parameter]:
    return [p for p in (getattr(norm, "weight", None), getattr(norm, "bias", None)) if p is not None]


def _taylor_parameters(model, adapter, layers, hidden: int) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(every coupled weight, the outer ones: embedding, untied LM head, final norm of the residual width)."""
    coupled: list[nn.Parameter] = []
    for layer in layers:
        for module, _ in adapter.projection_dims(layer):
            coupled += [p for p in (module.weight, module.bias) if p is not None]
        for norm in adapter.layer_norms(layer):
            coupled += _norm_parameters(norm)
    embedding, lm_head, final_norm = (
        adapter.embedding(model),
        model.get_output_embeddings(),
        adapter.final_norm(model),
    )
    outer = [embedding.weight]
    if lm_head is not None and lm_head.weight is not embedding.weight:
        outer.append(lm_head.weight)
    if final_norm is not None:
        outer += _norm_parameters(final_norm)
    outer = [p for p in outer if p.shape[-1] == hidden]
    return list({id(p): p for p in coupled + outer}.values()), outer


def _taylor_gradients(model, windows: torch.LongTensor, coupled: list[nn.Parameter], progress: bool) -> None:
    """Accumulate into ``.grad`` the gradient of the mean next-token loss over all windows, one window
    per backward pass (data parallel: each process its share, then summed)."""
    from tqdm.auto import tqdm

    from minigpts import distributed

    device = next(model.parameters()).device
    targets = windows.shape[0] * (windows.shape[1] - 1)
    bar = tqdm(total=windows.numel(), unit="tok", unit_scale=True, desc="taylor", disable=not progress)
    try:
        for window in distributed.shard(windows):  # all of them on one process
            batch = window.unsqueeze(0).to(device)
            loss = model(input_ids=batch, labels=batch, use_cache=False).loss
            (loss * (batch.numel() - 1) / targets).backward()  # gradients of the mean over all windows
            bar.update(batch.numel())
    finally:
        bar.close()
    if distributed.active():  # sum the gradients over the processes before |w·g| (not linear)
        for p in coupled:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        distributed.reduce([p.grad for p in coupled])


def _salience(p: torch.Tensor | None) -> torch.Tensor | None:
    """|w·g| in float64, or None without a gradient."""
    if p is None or p.grad is None:
        return None
    return (p.detach().float() * p.grad.float()).abs().to(torch.float64)


def _out_in_salience(adapter, module: nn.Module) -> torch.Tensor:
    """|w·g| of the module's weight as [out, in], the layout adapter.weight gives (Conv1D: swapped)."""
    values, weight, view = _salience(module.weight), module.weight, adapter.weight(module)
    if view.shape == weight.shape and view.stride() == weight.stride():
        return values
    offset = view.storage_offset() - weight.storage_offset()  # the same view of the saliences
    return values.contiguous().as_strided(view.shape, view.stride(), offset)


def _layer_taylor(adapter, layer, hidden: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One layer's (MLP channel, query head, hidden channel) Taylor sums, float64 on the CPU."""
    n_heads, n_kv, head_dim = adapter.head_layout(layer)
    width = {
        "mlp": adapter.mlp_width(layer),
        "q": n_heads * head_dim,
        "kv": n_kv * head_dim,
        "head_dim": head_dim,
    }
    device = next(layer.parameters()).device
    sums = {
        name: torch.zeros(size, dtype=torch.float64, device=device)
        for name, size in (("mlp", width["mlp"]), ("q", width["q"]), ("kv", width["kv"]), ("hidden", hidden))
    }
    for module, (out_dim, in_dim) in adapter.projection_dims(layer):
        values = _out_in_salience(adapter, module)
        rows = values.sum(1)
        if (bias := _salience(module.bias)) is not None:  # a bias entry belongs to its output row
            rows = rows + bias
        _add_coupled(sums, width, out_dim, rows)
        _add_coupled(sums, width, in_dim, values.sum(0))
    for norm in adapter.layer_norms(layer):
        for p in _norm_parameters(norm):
            if (values := _salience(p)) is not None:
                sums["hidden"] += values
    group = n_heads // n_kv
    per_kv = sums["kv"].view(n_kv, head_dim).sum(1)
    per_query = sums["q"].view(n_heads, head_dim).sum(1)
    heads = per_query + per_kv.repeat_interleave(group) / group
    return sums["mlp"].cpu(), heads.cpu(), sums["hidden"].cpu()


def _add_coupled(sums: dict, width: dict, dim: str, values: torch.Tensor) -> None:
    """Add per-row or per-column saliences to the units of ``dim`` (a ``projection_dims`` tag)."""
    if dim == "2mlp":  # fused [gate | up]
        sums["mlp"] += values.view(2, -1).sum(0)
    elif dim == "qkv":  # fused [q | k | v]
        q, k, v = values.split([width["q"], width["kv"], width["kv"]])
        sums["q"] += q
        sums["kv"] += k + v
    elif dim == "qkv/head":  # fused, one [q k v] block per head (GPT-NeoX; no GQA)
        q, k, v = values.view(-1, 3, width["head_dim"]).unbind(1)
        sums["q"] += q.reshape(-1)
        sums["kv"] += (k + v).reshape(-1)
    elif dim in sums:
        sums[dim] += values
    else:
        raise ValueError(
            f"taylor_importance: unknown projection dim {dim!r} (see ArchAdapter.projection_dims)"
        )

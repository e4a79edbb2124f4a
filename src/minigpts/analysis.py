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
"""

from __future__ import annotations

import json
import os
import time
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
                if adapter.mlp_out(layer).in_features != self.mlp_l1[i].numel():
                    problem = f"layer {i}: MLP width {self.mlp_l1[i].numel()}, the model has {adapter.mlp_out(layer).in_features}"
                elif tuple(adapter.head_layout(layer)) != tuple(self.head_layout[i]):
                    problem = f"layer {i}: heads {tuple(self.head_layout[i])}, the model has {tuple(adapter.head_layout(layer))}"
                elif tuple(self.reader_l1[i].shape) != (len(readers), readers[0].in_features):
                    problem = f"layer {i}: residual readers {tuple(self.reader_l1[i].shape)}, the model has {(len(readers), readers[0].in_features)}"
                if problem:
                    break
        if problem:
            raise UserError(
                f"--stats: these statistics were measured on {origin} ({problem}); re-run `minigpts analyze` on this model"
            )

    # --- file format ------------------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        """Write one safetensors file (atomically: temporary file, then rename)."""
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {"token_counts": self.token_counts.contiguous()}
        for name in ("mlp_l1", "mlp_l2sq", "attn_dim_l1", "attn_dim_l2sq", "reader_l1", "reader_l2sq"):
            for i, tensor in enumerate(getattr(self, name)):
                tensors[f"{name}.{i}"] = tensor.detach().to("cpu", torch.float64).contiguous()
        header = {
            "format": STATS_FORMAT,
            "format_version": str(STATS_FORMAT_VERSION),
            "n_tokens": str(self.n_tokens),
            "head_layout": json.dumps([list(layout) for layout in self.head_layout]),
            "metadata": json.dumps(self.metadata, default=str),
        }
        partial = path.with_name(f".{path.name}.partial")
        save_file(tensors, partial, metadata=header)
        os.replace(partial, path)

    @classmethod
    def load(cls, path: str | Path) -> ActivationStats:
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
                tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
        except UserError:
            raise
        except Exception as error:  # safetensors raises several types for a file that is not its own
            raise UserError(f"{not_stats}: {error}") from None
        if int(header.get("format_version", "0")) > STATS_FORMAT_VERSION:
            raise UserError(f"--stats {path}: written by a newer minigpts; upgrade minigpts to read it")
        head_layout = [tuple(layout) for layout in json.loads(header["head_layout"])]
        lists = {
            name: [tensors[f"{name}.{i}"] for i in range(len(head_layout))]
            for name in ("mlp_l1", "mlp_l2sq", "attn_dim_l1", "attn_dim_l2sq", "reader_l1", "reader_l2sq")
        }
        return cls(
            **lists,
            head_layout=head_layout,
            token_counts=tensors["token_counts"],
            n_tokens=int(header["n_tokens"]),
            metadata=json.loads(header["metadata"]),
        )


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

    def __init__(self, shape: tuple[int, ...], device: torch.device, scratch: _Scratch):
        self.abs_sum = torch.zeros(shape, dtype=torch.float64, device=device)
        self.square_sum = torch.zeros(shape, dtype=torch.float64, device=device)
        self.scratch = scratch

    def add(self, x: torch.Tensor, row: int | tuple = ()) -> None:
        abs_sum, square_sum = _reduce(x, self.scratch)
        self.abs_sum[row] += abs_sum.to(self.abs_sum.device)
        self.square_sum[row] += square_sum.to(self.square_sum.device)


def _reduce(x: torch.Tensor, scratch: _Scratch) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel sums of |x| and x² over every row of ``x`` [..., channels] (float32, or float64)."""
    x = x.reshape(-1, x.shape[-1])
    rows, width = x.shape
    block = CPU_BLOCK_ROWS if x.device.type == "cpu" else rows
    buffer = scratch.get(min(block, rows), width, x)
    abs_sum = torch.zeros(width, dtype=buffer.dtype, device=x.device)
    square_sum = torch.zeros(width, dtype=buffer.dtype, device=x.device)
    for start in range(0, rows, block):
        chunk = x[start : start + block]
        work = buffer[: chunk.shape[0]]
        work.copy_(chunk)
        work.abs_()
        abs_sum += work.sum(0)
        work.mul_(work)
        square_sum += work.sum(0)
    return abs_sum, square_sum


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
) -> ActivationStats:
    """Run the model body over ``windows`` [N, L] and return the per-unit statistics.

    The model is put in eval mode for the pass (dropout would distort the statistics) and restored
    afterwards; hooks are removed even when the pass fails. ``metadata`` (data, seed, ...) is merged
    into the recorded provenance.
    """
    from tqdm.auto import tqdm

    from minigpts.arch import get_adapter

    if batch_size < 1:
        raise UserError(f"--batch-size {batch_size}: must be at least 1")
    adapter = get_adapter(model)
    vocab_size = model.get_input_embeddings().num_embeddings
    windows = _check_windows(windows, vocab_size)
    parameter = next(model.parameters())
    device = parameter.device
    sums_device = device if device.type in ("cpu", "cuda") else torch.device("cpu")  # float64 support
    layers = adapter.layers(model)

    scratch = _Scratch()
    mlp = [_ChannelSums((adapter.mlp_out(layer).in_features,), sums_device, scratch) for layer in layers]
    attn = [_ChannelSums((adapter.attn_out(layer).in_features,), sums_device, scratch) for layer in layers]
    readers = [adapter.residual_readers(layer) for layer in layers]
    reader_sums = [
        _ChannelSums((len(modules), modules[0].in_features), sums_device, scratch) for modules in readers
    ]

    def hook(sums: _ChannelSums, row: int | tuple = ()):
        return lambda module, args: sums.add(args[0], row)

    handles = []
    was_training = model.training
    n_windows, seq_len = windows.shape
    bar = tqdm(total=windows.numel(), unit="tok", unit_scale=True, desc="analyze", disable=not progress)
    started = time.perf_counter()
    try:
        for i, layer in enumerate(layers):
            handles.append(adapter.mlp_out(layer).register_forward_pre_hook(hook(mlp[i])))
            handles.append(adapter.attn_out(layer).register_forward_pre_hook(hook(attn[i])))
            for r, module in enumerate(readers[i]):
                handles.append(module.register_forward_pre_hook(hook(reader_sums[i], r)))
        model.eval()
        body = adapter.body(model)
        with torch.inference_mode():
            for start in range(0, n_windows, batch_size):
                batch = windows[start : start + batch_size].to(device, non_blocking=True)
                body(input_ids=batch, use_cache=False)
                bar.update(batch.numel())
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
        bar.close()
    seconds = time.perf_counter() - started

    n_tokens = windows.numel()
    provenance = {
        "model": getattr(model.config, "_name_or_path", "") or type(model).__name__,
        "family": adapter.family,
        "seq_len": seq_len,
        "windows": n_windows,
        "dtype": str(parameter.dtype).removeprefix("torch."),
        "device": str(device),
        "seconds": round(seconds, 3),
        "tokens_per_second": round(n_tokens / seconds, 1) if seconds > 0 else None,
        "minigpts_version": __version__,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    provenance.update(metadata or {})

    def means(values: list[torch.Tensor]) -> list[torch.Tensor]:
        return [(v / n_tokens).cpu() for v in values]

    return ActivationStats(
        mlp_l1=means([s.abs_sum for s in mlp]),
        mlp_l2sq=means([s.square_sum for s in mlp]),
        attn_dim_l1=means([s.abs_sum for s in attn]),
        attn_dim_l2sq=means([s.square_sum for s in attn]),
        reader_l1=means([s.abs_sum for s in reader_sums]),
        reader_l2sq=means([s.square_sum for s in reader_sums]),
        head_layout=[tuple(adapter.head_layout(layer)) for layer in layers],
        token_counts=torch.bincount(windows.flatten().cpu(), minlength=vocab_size),
        n_tokens=n_tokens,
        metadata=provenance,
    )

"""Depth pruning: which whole decoder layers the domain can do without.

Two scores per decoder layer, both "higher = keep", both measured on the calibration windows by
``minigpts analyze`` and stored in its statistics file:

- ``bi``: Block Influence, ShortGPT (Men et al. 2024, arXiv 2403.03853): ``1 − cos(h_in, h_out)``
  between a block's input and output hidden states, averaged over every calibration token. A block
  that barely turns the residual stream does little. Measured in every analysis pass (one forward
  hook per layer, no extra pass).
- ``loss``: how much the mean next-token loss (nats per token) rises when that block alone is
  removed, as Minitron ranks layers (Muralidharan et al. 2024, arXiv 2407.14679; Gromov et al. 2024,
  arXiv 2403.17887, likewise judge a removal by its effect on the model's predictions). It costs
  ``layers + 1`` forward passes over the tokens it uses, so it is measured only when asked
  (``analyze --depth-tokens N``).

The ``N`` lowest-scoring layers are dropped at once, each scored with all the others present, as
ShortGPT and Minitron do. ``make_plan`` then sizes the widths of the layers that stay
(``only_layers``: the planner sees the model without the dropped layers), and surgery removes the
layers and renumbers ``layer_idx`` so the KV cache still lines up.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from minigpts.errors import UserError

if TYPE_CHECKING:  # torch is imported where it is used: the CLI lists LAYER_CRITERIA without it
    import torch
    from torch import nn

    from minigpts.analysis import ActivationStats

LAYER_CRITERIA = {
    "bi": "ShortGPT's Block Influence, 1 - cos(block input, block output) over the calibration tokens",
    "loss": "the calibration loss increase when the block alone is removed (needs analyze --depth-tokens)",
}


class BlockInfluence:
    """Running sums of ``1 − cos(h_in, h_out)`` per decoder layer, fed by forward hooks (``hook(i)``)."""

    def __init__(self, n_layers: int, device: torch.device):
        import torch

        self.sums = torch.zeros(n_layers, dtype=torch.float64, device=device)
        self.tokens = torch.zeros(n_layers, dtype=torch.float64, device=device)

    def hook(self, index: int):
        import torch

        def record(module, args, kwargs, output):
            h_in = args[0] if args else kwargs["hidden_states"]
            h_out = output[0] if isinstance(output, tuple) else output
            width = h_in.shape[-1]
            cos = torch.nn.functional.cosine_similarity(
                h_in.reshape(-1, width).float(), h_out.reshape(-1, width).float(), dim=-1
            )
            self.sums[index] += (1 - cos).sum(dtype=torch.float64).to(self.sums.device)
            self.tokens[index] += cos.numel()

        return record

    def scores(self) -> torch.Tensor:
        """[n_layers] float64 on the CPU: the mean over the tokens seen."""
        return (self.sums / self.tokens.clamp_min(1)).cpu()


def _skip(module, args, kwargs, output):
    """Forward hook that makes a decoder layer the identity: its output is its input."""
    h_in = args[0] if args else kwargs["hidden_states"]
    return (h_in, *output[1:]) if isinstance(output, tuple) else h_in


def removal_loss(model: nn.Module, windows: torch.LongTensor, *, progress: bool = True) -> torch.Tensor:
    """[n_layers] float64: mean next-token loss over ``windows`` without each layer, minus the full model's.

    One window per forward pass (the logits of one window are the largest tensor); a removed layer is
    made the identity by a forward hook, so nothing in the model changes.
    """
    import torch
    from tqdm.auto import tqdm

    from minigpts.arch import get_adapter

    adapter = get_adapter(model)
    layers = adapter.layers(model)
    device = next(model.parameters()).device
    bar = tqdm(
        total=windows.numel() * (len(layers) + 1),
        unit="tok",
        unit_scale=True,
        desc="layer removal loss",
        disable=not progress,
    )

    from minigpts import distributed
    from minigpts.evaluation import eval_mode

    def mean_loss() -> float:
        total, count = 0.0, 0
        for window in distributed.shard(windows):  # all of them on one process
            batch = window.unsqueeze(0).to(device)
            loss = model(input_ids=batch, labels=batch, use_cache=False).loss
            total += float(loss.double()) * (batch.numel() - 1)
            count += batch.numel() - 1
            bar.update(batch.numel())
        total, count = distributed.reduce_numbers(total, count)  # themselves on one process
        return total / max(count, 1)

    losses = torch.zeros(len(layers), dtype=torch.float64)
    with bar, eval_mode(model), torch.inference_mode():
        base = mean_loss()
        for i, layer in enumerate(layers):
            handle = layer.register_forward_hook(_skip, with_kwargs=True)
            try:
                losses[i] = mean_loss() - base
            finally:
                handle.remove()
    return losses


def layer_scores(stats: ActivationStats | None, criterion: str) -> torch.Tensor:
    """[n_layers] float64 scores of ``--layer-criterion`` (higher = keep), from the statistics."""
    if criterion not in LAYER_CRITERIA:
        raise UserError(f"--layer-criterion {criterion}: use one of {', '.join(LAYER_CRITERIA)}")
    if stats is None:
        raise UserError("depth pruning needs activation statistics (--stats, from `minigpts analyze`)")
    if criterion == "bi":
        if stats.layer_bi is None:
            raise UserError(
                "--layer-criterion bi: these statistics have no Block Influence (written by an older "
                "minigpts); re-run `minigpts analyze`"
            )
        return stats.layer_bi.double()
    if stats.layer_loss is None:
        raise UserError(
            "--layer-criterion loss needs the loss without each layer: re-run `minigpts analyze` with "
            "--depth-tokens N (e.g. 2048; it costs N × (layers + 1) tokens of forward passes)"
        )
    return stats.layer_loss.double()


def drop_count(n_layers: int, drop_layers: int | None, layer_ratio: float | None) -> int:
    """How many layers ``--drop-layers N`` or ``--layer-ratio R`` removes (validated; 0 when neither)."""
    if drop_layers is not None and layer_ratio is not None:
        raise UserError("--drop-layers and --layer-ratio both size the depth cut: give one of them")
    if layer_ratio is not None:
        if not (isinstance(layer_ratio, int | float) and 0 <= layer_ratio < 1):
            raise UserError(f"--layer-ratio {layer_ratio}: the fraction of layers removed must be in [0, 1)")
        drop_layers = round(layer_ratio * n_layers)
    if drop_layers is None:
        return 0
    if not (isinstance(drop_layers, int) and 0 <= drop_layers < n_layers):
        raise UserError(
            f"--drop-layers {drop_layers}: must be a whole number from 0 to {n_layers - 1} "
            f"(the model has {n_layers} layers; at least one stays)"
        )
    return drop_layers


def layers_to_keep(scores: torch.Tensor, n_drop: int) -> list[int]:
    """Indices of the layers that stay: all but the ``n_drop`` lowest scores (ties: the earlier goes)."""
    import torch

    order = torch.sort(scores, stable=True).indices
    return sorted(order[n_drop:].tolist())


def stats_for_layers(stats: ActivationStats, keep: list[int]) -> ActivationStats:
    """A copy of ``stats`` that describes only the decoder layers ``keep`` (in that order)."""
    n_layers = stats.n_layers
    values = {}
    for field in dataclasses.fields(stats):
        value = getattr(stats, field.name)
        if isinstance(value, list) and len(value) == n_layers:
            value = [value[i] for i in keep]
        elif field.name in ("layer_bi", "layer_loss") and value is not None:
            value = value[keep]
        values[field.name] = value
    return type(stats)(**values)


@contextmanager
def only_layers(model: nn.Module, keep: list[int]) -> Iterator[nn.Module]:
    """The model as if only the decoder layers ``keep`` existed, for as long as the block runs.

    The layer list is swapped for one holding the kept layers (the same modules, nothing copied) and
    put back afterwards, also on errors: planning code that walks ``adapter.layers(model)`` and
    ``model.parameters()`` then sees the model surgery will produce. Do not run the model inside.
    """
    from torch import nn

    from minigpts.arch import get_adapter
    from minigpts.arch.base import get_module

    adapter = get_adapter(model)
    original = adapter.layer_list(model)
    parent_path, _, name = f"{adapter.body_path}.{adapter.layers_path}".rpartition(".")
    parent = get_module(model, parent_path) if parent_path else model
    setattr(parent, name, nn.ModuleList([original[i] for i in keep]))
    try:
        yield model
    finally:
        setattr(parent, name, original)

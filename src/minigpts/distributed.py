"""Data parallelism over ``torch.distributed`` processes (``torchrun`` / ``accelerate launch``).

Each process holds the whole model and the same calibration or evaluation windows; the passes split
the windows between processes (``shard``: contiguous blocks, cut on batch boundaries so every batch is
the batch a single process would run) and reduce their float64 sums with ``all_reduce`` (``reduce``)
before anything divides by a token count. When no process group is running — a plain ``minigpts``
command — every helper is the identity and the single-process code path is unchanged.

``init()`` starts the process group when the launcher's environment asks for one (``WORLD_SIZE`` > 1)
and none runs yet: NCCL on CUDA, gloo otherwise. Only rank 0 writes files (``is_main``); the others
wait at ``barrier()`` where a write must be seen by all.
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch


def available() -> bool:
    return torch.distributed.is_available()


def active() -> bool:
    """True when a process group with more than one process is running."""
    return available() and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1


def rank() -> int:
    return torch.distributed.get_rank() if active() else 0


def world_size() -> int:
    return torch.distributed.get_world_size() if active() else 1


def is_main() -> bool:
    """Whether this process writes files and prints tables (rank 0, or the only process)."""
    if active():
        return rank() == 0
    return int(os.environ.get("RANK", "0")) == 0


def launched() -> bool:
    """Whether a launcher started several processes (``WORLD_SIZE`` > 1 in the environment)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init(backend: str | None = None, timeout_minutes: float = 30) -> bool:
    """Start the default process group when launched with ``WORLD_SIZE`` > 1 and none is running.

    Returns whether a multi-process group is active afterwards. Backend: ``nccl`` when CUDA is
    available, else ``gloo`` (``backend`` overrides). The CUDA device is ``LOCAL_RANK``.
    """
    if not available() or not launched():
        return active()
    if not torch.distributed.is_initialized():
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if backend is None:
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local_rank)
        torch.distributed.init_process_group(backend=backend, timeout=timedelta(minutes=timeout_minutes))
    return active()


def barrier() -> None:
    if active():
        torch.distributed.barrier()


def bounds(n: int, align: int = 1) -> tuple[int, int]:
    """[start, stop) of this process's contiguous share of ``n`` items, cut at multiples of ``align``.

    Blocks of ``align`` items are dealt out as evenly as possible (the first ranks take one more);
    a process may get none. The whole range on a single process.
    """
    if not active():
        return 0, n
    align = max(1, int(align))
    blocks = -(-n // align)
    size, r = world_size(), rank()
    per, extra = divmod(blocks, size)
    first = r * per + min(r, extra)
    last = first + per + (1 if r < extra else 0)
    return min(n, first * align), min(n, last * align)


def shard(items, align: int = 1):
    """This process's contiguous share of ``items`` (a tensor's first dim, or a list)."""
    start, stop = bounds(len(items), align)
    return items[start:stop]


def reduce(tensors) -> None:
    """All-reduce (sum) each tensor in place across processes; float64 sums stay float64.

    Tensors of another dtype are summed in float64 and written back. Works on CPU tensors with gloo
    and on CUDA tensors with NCCL (the device of each tensor is kept). No-op on a single process.
    """
    if not active():
        return
    for tensor in tensors:
        if tensor is None:
            continue
        work = (
            tensor
            if tensor.dtype == torch.float64 and tensor.is_contiguous()
            else tensor.double().contiguous()
        )
        work = _to_backend_device(work)
        torch.distributed.all_reduce(work, op=torch.distributed.ReduceOp.SUM)
        tensor.copy_(work.to(tensor.device))


def reduce_numbers(*values: float) -> list[float]:
    """Sums of the given Python numbers over all processes (float64); themselves on one process."""
    if not active():
        return list(values)
    work = torch.tensor(values, dtype=torch.float64)
    reduce([work])
    return work.tolist()


def any_true(flag: bool) -> bool:
    """Whether ``flag`` is true on any process (so that every process takes the same branch)."""
    if not active():
        return flag
    return reduce_numbers(1.0 if flag else 0.0)[0] > 0


def _to_backend_device(tensor: torch.Tensor) -> torch.Tensor:
    backend = torch.distributed.get_backend()
    if backend == "nccl" and tensor.device.type != "cuda":
        return tensor.to(torch.device("cuda", torch.cuda.current_device()))
    if backend == "gloo" and tensor.device.type not in ("cpu",):
        return tensor.cpu()
    return tensor

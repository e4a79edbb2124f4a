"""Run a GGUF file in llama.cpp itself (through `llama-cpp-python`): token ids, logits, bits per byte, decoding.

The check that trusts neither our writer nor our reader: llama.cpp's own loader, tokenizer and kernels.
`llama-cpp-python` is optional (it compiles llama.cpp from source: `make llama-cpp`, ~10-60 min on
2 cores); every function imports it lazily and raises a UserError naming the install when it is missing.
"""

from __future__ import annotations

import math
import os
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from minigpts.errors import UserError

INSTALL_HINT = "pip install llama-cpp-python (compiles llama.cpp; or `make llama-cpp`)"


def _llama_class():
    try:
        from llama_cpp import Llama
    except ImportError as err:
        raise UserError(f"llama.cpp is not installed: {INSTALL_HINT}") from err
    return Llama


def default_threads() -> int:
    try:
        import torch

        return torch.get_num_threads()
    except ImportError:
        return os.cpu_count() or 1


@contextmanager
def _quiet_stderr():
    """llama.cpp logs through C stdio; verbose=False silences most but not all of it."""
    try:
        fd = os.dup(2)
    except OSError:
        yield
        return
    with open(os.devnull, "w") as devnull:
        os.dup2(devnull.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(fd, 2)
            os.close(fd)


def open_model(
    path: str | Path,
    *,
    n_ctx: int = 1024,
    logits_all: bool = False,
    n_threads: int | None = None,
    flash_attn: bool = False,
):
    """A `llama_cpp.Llama` on one GGUF file (CPU, quiet). A file llama.cpp refuses raises UserError.

    flash_attn=False is `llama_cpp.Llama`'s default; llama.cpp's own tools (`-fa auto`) turn it on for
    a CPU, which decodes faster (see `benchmarks/bench_generate.py`)."""
    Llama = _llama_class()
    threads = n_threads or default_threads()
    try:
        with _quiet_stderr():
            return Llama(
                model_path=str(path),
                n_ctx=n_ctx,
                n_batch=n_ctx,
                n_ubatch=n_ctx,
                logits_all=logits_all,
                n_threads=threads,
                n_threads_batch=threads,
                n_gpu_layers=0,
                flash_attn=flash_attn,
                verbose=False,
            )
    except (ValueError, RuntimeError) as err:
        raise UserError(f"llama.cpp cannot load {path}: {err}") from err


def _opened(path_or_model, **options):
    """A GGUF path opened with ``options`` (see `open_model`), or an already open model as it is."""
    return open_model(path_or_model, **options) if isinstance(path_or_model, (str, Path)) else path_or_model


def llama_tokenize(path_or_model, text: str) -> list[int]:
    """llama.cpp's token ids for `text`: no BOS, special tokens in the text parsed as ours are."""
    model = _opened(path_or_model, n_ctx=64)
    return list(model.tokenize(text.encode("utf-8"), add_bos=False, special=True))


def llama_logits(path_or_model, ids: list[int]) -> np.ndarray:
    """[len(ids), vocab] float32 logits of one window, from llama.cpp."""
    model = _opened(path_or_model, n_ctx=max(64, len(ids)), logits_all=True)
    model.reset()
    model.eval(list(ids))
    return np.array(model.scores[: len(ids)], dtype=np.float32)


def _log_softmax_nll(logits: np.ndarray, targets: np.ndarray) -> float:
    logits = logits.astype(np.float64)
    top = logits.max(axis=1, keepdims=True)
    lse = top[:, 0] + np.log(np.exp(logits - top).sum(axis=1))
    return float((lse - logits[np.arange(len(targets)), targets]).sum())


def llama_bits_per_byte(path: str | Path, windows: list, byte_lengths) -> dict:
    """Bits per byte of the same windows as `minigpts.evaluation.evaluate_windows`, from llama.cpp's logits.

    Each window runs from an empty cache; every token but the first is scored; the bytes are those the
    scored tokens stand for, as in our protocol.
    """
    seq = max(len(w) for w in windows)
    model = open_model(path, n_ctx=seq, logits_all=True)
    nll = 0.0
    tokens = 0
    n_bytes = 0
    for window in windows:
        ids = [int(i) for i in window]
        logits = llama_logits(model, ids)
        targets = np.asarray(ids[1:])
        nll += _log_softmax_nll(logits[:-1], targets)
        tokens += len(targets)
        n_bytes += int(sum(int(byte_lengths[i]) for i in targets))
    return {
        "nll_sum": nll,
        "tokens": tokens,
        "bytes": n_bytes,
        "bits_per_byte": nll / math.log(2) / max(n_bytes, 1),
    }


def llama_greedy(path_or_model, prompt: list[int], tokens: int) -> tuple[list[int], float]:
    """(the `tokens` greedily decoded ids, seconds spent decoding them after the prompt)."""
    model = _opened(path_or_model, n_ctx=len(prompt) + tokens + 8)
    import llama_cpp

    def last_logits() -> np.ndarray:
        # without logits_all, llama-cpp-python keeps no copy: read the last row from llama.cpp itself
        return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(model.ctx, -1), shape=(vocab,))

    vocab = model.n_vocab()
    model.reset()
    model.eval(list(prompt))
    out = []
    start = time.perf_counter()
    for _ in range(tokens):
        token = int(np.argmax(last_logits()))
        out.append(token)
        model.eval([token])
    return out, time.perf_counter() - start

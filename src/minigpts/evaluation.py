"""Held-out evaluation: perplexity, bits-per-byte, parameter counts, size, throughput.

Protocol (printed with every result): each document of the split, followed by a blank line
("\\n\\n") except the last, is tokenized on its own without special tokens; the ids are
concatenated and cut into non-overlapping windows of ``seq_len`` tokens (the last, shorter window
included); every token but the first of each window is scored. A token budget (``max_tokens``)
keeps the text that the first N tokens of one tokenizer cover, so every model compared under the
same budget tokenizer is scored on the same text.
Bits-per-byte divides the total NLL (in bits) by the UTF-8 bytes that the scored tokens stand for,
so models with different tokenizers can be compared on the same text.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F

from minigpts.data import DOCUMENT_SEPARATOR, text_within_token_budget, tokenize_stream
from minigpts.errors import UserError

PROTOCOL = (
    "each document + '\\n\\n' tokenized on its own (no special tokens), ids concatenated; "
    "non-overlapping windows of {seq_len} tokens (last window shorter); first token of each window not scored; bits-per-byte = NLL bits / UTF-8 "
    "bytes of the scored tokens"
)


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """Inverse of GPT-2's bytes_to_unicode: the printable stand-in character → the byte it encodes."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def _piece_bytes(piece: str, byte_level: bool) -> int:
    if byte_level:
        decoder = _byte_decoder()
        if all(ch in decoder for ch in piece):
            return len(piece)
        return len(piece.encode("utf-8"))
    if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
        return 1
    return len(piece.replace("\u2581", " ").encode("utf-8"))


def token_byte_lengths(tokenizer) -> torch.LongTensor:
    """UTF-8 bytes each token id stands for (byte-level BPE exact; SentencePiece ▁ and <0xNN> aware)."""
    size = len(tokenizer)
    lengths = torch.zeros(size, dtype=torch.long)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        for i in range(size):
            lengths[i] = len(tokenizer.decode([i]).encode("utf-8"))
        return lengths
    spec = json.loads(backend.to_str())
    decoder = spec.get("decoder") or {}
    decoders = decoder.get("decoders", [decoder]) if decoder else []
    byte_level = any(d.get("type") == "ByteLevel" for d in decoders if d)
    added = {tok["id"]: tok for tok in spec.get("added_tokens", [])}
    for piece, idx in backend.get_vocab(with_added_tokens=False).items():
        if idx < size:
            lengths[idx] = _piece_bytes(piece, byte_level)
    for idx, tok in added.items():
        if idx < size:
            lengths[idx] = len(tok["content"].encode("utf-8"))
    return lengths


@dataclass
class EvalResult:
    """One model on one split; the keys later stages and reports rely on."""

    model: str
    split: str
    seq_len: int
    perplexity: float
    bits_per_byte: float
    nll_sum: float
    eval_tokens: int
    eval_bytes: int
    params: int
    params_non_embedding: int
    size_bytes: int
    size_source: str
    tokens_per_second: float
    seconds: float
    protocol: str
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        data = asdict(self)
        extra = data.pop("extra")
        data.update(extra)
        return data


def count_parameters(model) -> tuple[int, int]:
    """(total, non-embedding) unique parameters; tied weights count once, position tables are embeddings."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    embedding_ids: set[int] = set()
    embedding = 0
    modules = [model.get_input_embeddings(), model.get_output_embeddings()]
    modules += [m for m in model.modules() if isinstance(m, torch.nn.Embedding)]
    for module in modules:
        if module is None:
            continue
        for p in module.parameters(recurse=False):
            if id(p) not in embedding_ids:
                embedding_ids.add(id(p))
                embedding += p.numel()
    return total, total - embedding


@contextlib.contextmanager
def eval_mode(model):
    """``model`` in eval mode for the block, then back in the mode it was in (even on an error)."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def decode_speed(model, *, new_tokens: int = 32, prompt_tokens: int = 16, repeats: int = 2) -> float:
    """Greedy decoding speed in tokens per second: batch 1, with the KV cache, the best of ``repeats``.

    One decode step reads every weight once, so this is what a smaller model buys a chat user; the
    prompt is ``prompt_tokens`` fixed ids and exactly ``new_tokens`` are generated (no early stop).
    """
    device = next(model.parameters()).device
    vocab = model.get_input_embeddings().num_embeddings
    prompt = (torch.arange(prompt_tokens, device=device) * 7919 % vocab).unsqueeze(0)
    settings = dict(do_sample=False, use_cache=True, pad_token_id=0, attention_mask=torch.ones_like(prompt))
    with eval_mode(model), torch.inference_mode():
        model.generate(prompt, max_new_tokens=2, min_new_tokens=2, **settings)  # warm-up
        best = math.inf
        for _ in range(repeats):
            started = time.perf_counter()
            model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **settings)
            best = min(best, time.perf_counter() - started)
    return new_tokens / best


def model_size(model, path: str | Path | None = None) -> tuple[int, str]:
    """Bytes of the weight files when the model comes from a directory, else bytes in memory."""
    if path is not None:
        p = Path(path)
        if p.is_dir():
            files = [f for f in p.iterdir() if f.suffix in {".safetensors", ".bin", ".gguf", ".pt"}]
            if files:
                return sum(f.stat().st_size for f in files), "disk"
        elif p.is_file():
            return p.stat().st_size, "disk"
    seen: set[int] = set()
    size = 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            size += t.numel() * t.element_size()
    return size, "memory"


LOGIT_CHUNK_ELEMENTS = 1 << 24  # 64 MB of float32 logits at a time (341 positions of a 49k vocabulary)


class _PassThrough(torch.nn.Module):
    """Stands in for the LM head so the model returns its final hidden states as "logits"."""

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden


@contextlib.contextmanager
def deferred_head(model, probe: torch.Tensor):
    """Yield the model's LM head while the model returns hidden states instead of logits, or None.

    Full-vocabulary logits of a [4, 1024] batch are 800 MB in float32 (more than SmolLM2's weights),
    and cross-entropy doubles that; applying the head to a few hundred positions at a time keeps
    evaluation memory at the size of the activations. Checked on ``probe`` (a few token ids): if
    the model post-processes its logits (soft-capping, scaling) the head is not deferred (None).
    """
    head = model.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear):
        yield None
        return
    expected = model(input_ids=probe, use_cache=False).logits.float()
    model.set_output_embeddings(_PassThrough())
    try:
        hidden = model(input_ids=probe, use_cache=False).logits
        same = hidden.shape[-1] == head.in_features and torch.allclose(
            head(hidden).float(), expected, rtol=1e-3, atol=1e-3
        )
        if not same:
            model.set_output_embeddings(head)
            yield None
            return
        yield head
    finally:
        model.set_output_embeddings(head)


def _nll_sum(model, head, ids: torch.Tensor) -> float:
    """Summed next-token NLL (nats) of a [B, L] batch, the head applied in chunks when deferred."""
    targets = ids[:, 1:].reshape(-1)
    if head is None:
        logits = model(input_ids=ids, use_cache=False).logits
        return F.cross_entropy(
            logits[:, :-1].float().reshape(-1, logits.shape[-1]), targets, reduction="sum"
        ).item()
    hidden = model(input_ids=ids, use_cache=False).logits[:, :-1]
    hidden = hidden.reshape(-1, hidden.shape[-1])
    chunk = max(1, LOGIT_CHUNK_ELEMENTS // head.out_features)
    total = 0.0
    for start in range(0, hidden.shape[0], chunk):
        logits = head(hidden[start : start + chunk]).float()
        total += F.cross_entropy(logits, targets[start : start + chunk], reduction="sum").item()
    return total


def evaluate_windows(model, windows, byte_lengths, batch_size: int = 4, progress=None) -> dict:
    """Sum of next-token NLL (nats) over every token but each window's first, with tokens and bytes.

    ``windows`` is a [N, L] tensor or a list of 1-D tensors (lengths may differ). Under
    ``torch.distributed`` each process scores a contiguous share (cut on batch boundaries) and the
    three sums are all-reduced, so every process returns the totals over all windows.
    """
    from minigpts import distributed

    if isinstance(windows, torch.Tensor):
        windows = list(windows)
    if not distributed.active():
        return _evaluate_windows(model, windows, byte_lengths, batch_size, progress)
    local = _evaluate_windows(
        model, distributed.shard(windows, batch_size), byte_lengths, batch_size, progress
    )
    nll_sum, tokens, n_bytes = distributed.reduce_numbers(local["nll_sum"], local["tokens"], local["bytes"])
    return {"nll_sum": nll_sum, "tokens": int(tokens), "bytes": int(n_bytes)}


@torch.inference_mode()
def _evaluate_windows(model, windows: list, byte_lengths, batch_size: int, progress) -> dict:
    """``evaluate_windows`` on this process alone."""
    device = next(model.parameters()).device
    nll_sum = 0.0
    tokens = 0
    n_bytes = 0
    probe = windows[0][:8].unsqueeze(0).to(device) if windows else None
    with (
        eval_mode(model),
        deferred_head(model, probe) if probe is not None else contextlib.nullcontext() as head,
    ):
        i = 0
        while i < len(windows):
            length = len(windows[i])
            batch = [windows[i]]
            i += 1
            while i < len(windows) and len(batch) < batch_size and len(windows[i]) == length:
                batch.append(windows[i])
                i += 1
            ids = torch.stack(batch).to(device)
            nll_sum += _nll_sum(model, head, ids)
            tokens += ids[:, 1:].numel()
            n_bytes += int(byte_lengths[ids[:, 1:].cpu()].sum())
            if progress is not None:
                progress(ids.numel())
    return {"nll_sum": nll_sum, "tokens": tokens, "bytes": n_bytes}


def stream_windows(ids: torch.Tensor, seq_len: int) -> list[torch.Tensor]:
    """Non-overlapping windows over the whole stream, keeping a last shorter window of ≥ 2 tokens."""
    windows = [ids[i : i + seq_len] for i in range(0, len(ids), seq_len)]
    return [w for w in windows if len(w) >= 2]


def _check_seq_len(model, seq_len: int) -> None:
    """``evaluate``'s window length must be a next-token task the model's positions cover."""
    if seq_len < 2:
        raise UserError(f"--seq-len {seq_len}: must be at least 2")
    max_positions = getattr(model.config, "max_position_embeddings", None)
    if max_positions and seq_len > max_positions:
        raise UserError(f"--seq-len {seq_len}: the model accepts at most {max_positions} positions")


def _timed_windows(model, windows, byte_lengths, batch_size: int, split: str, progress: bool):
    """(``evaluate_windows``'s sums, tokens scored, seconds), with a progress bar when asked."""
    total = sum(len(w) for w in windows)
    start = time.perf_counter()
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc=f"eval {split}", unit="tok", leave=False)
    try:
        out = evaluate_windows(model, windows, byte_lengths, batch_size, bar.update if bar else None)
    finally:
        if bar is not None:
            bar.close()
    return out, total, time.perf_counter() - start


def coverage(chosen: list[str], texts: list[str]) -> str:
    """How much of the split a token budget's text is, e.g. "4 of 18 documents in file order, the last
    one cut": on a corpus grouped by topic, a budget that covers a few documents measures those."""
    if len(chosen) == len(texts) and (not chosen or len(chosen[-1]) >= len(texts[-1])):
        return f"all {len(texts)} documents"
    cut = bool(chosen) and len(chosen[-1]) < len(texts[len(chosen) - 1])
    return f"{len(chosen)} of {len(texts)} documents in file order" + (", the last one cut" if cut else "")


def evaluate(
    model,
    tokenizer,
    texts: list[str],
    *,
    model_name: str,
    split: str = "test",
    seq_len: int = 1024,
    max_tokens: int | None = None,
    batch_size: int = 4,
    model_path: str | Path | None = None,
    progress: bool = True,
    budget_tokenizer=None,
) -> EvalResult:
    """Perplexity and bits-per-byte of ``model`` on ``texts`` under the protocol in this module's doc.

    ``max_tokens`` is counted in ``budget_tokenizer``'s tokens (default: the model's own) and then
    fixed as text, so models whose vocabularies differ are scored on the same bytes when they
    share a budget tokenizer (``run`` and ``sweep`` use the unpruned model's).
    """
    _check_seq_len(model, seq_len)
    chosen = text_within_token_budget(budget_tokenizer or tokenizer, texts, max_tokens, DOCUMENT_SEPARATOR)
    budget_note = ""
    if max_tokens is not None:
        whose = "the model's own" if budget_tokenizer is None else "the reference"
        budget_note = f"; text = what the first {max_tokens} tokens of {whose} tokenizer cover ({coverage(chosen, texts)})"
    texts = chosen
    ids = tokenize_stream(tokenizer, texts, DOCUMENT_SEPARATOR)
    windows = stream_windows(ids, seq_len)
    if not windows:
        raise UserError(
            f"split '{split}' has {len(ids)} token(s); evaluation needs at least 2 — use a bigger split"
        )
    byte_lengths = token_byte_lengths(tokenizer)
    out, total, seconds = _timed_windows(model, windows, byte_lengths, batch_size, split, progress)
    params, params_non_embedding = count_parameters(model)
    size_bytes, size_source = model_size(model, model_path)
    mean_nll = out["nll_sum"] / out["tokens"]
    return EvalResult(
        model=model_name,
        split=split,
        seq_len=seq_len,
        perplexity=math.exp(mean_nll),
        bits_per_byte=out["nll_sum"] / math.log(2) / max(out["bytes"], 1),
        nll_sum=out["nll_sum"],
        eval_tokens=out["tokens"],
        eval_bytes=out["bytes"],
        params=params,
        params_non_embedding=params_non_embedding,
        size_bytes=size_bytes,
        size_source=size_source,
        tokens_per_second=total / seconds if seconds > 0 else float("nan"),
        seconds=seconds,
        protocol=PROTOCOL.format(seq_len=seq_len) + budget_note,
    )

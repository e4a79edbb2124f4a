"""Vocabulary pruning that keeps the tokenizer lossless (DESIGN.md §2 "Vocabulary trimming").

The paper zeroes embedding rows of tokens the domain never uses while the tokenizer keeps emitting
them. Here the vocabulary itself shrinks: the tokenizer is rebuilt without the dropped tokens and
the embedding / LM-head rows are sliced to match, so the model is smaller and every string still
encodes. Losslessness comes from always keeping the byte alphabet (byte-level BPE) or the
`<0xNN>` byte-fallback pieces (SentencePiece-style BPE), and from keeping every parent of a kept
merge, so BPE can still build each kept token and falls back to bytes for everything else.

Text that the original tokenizer encodes with kept tokens only is encoded identically after
trimming: the trimmed merge list is a rank-preserving subset of the original that still contains
every merge such an encoding uses, so BPE takes the same steps.
"""

from __future__ import annotations

import itertools
import json
import math
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import jinja2
import numpy as np
import torch
from tokenizers import Tokenizer
from tokenizers.pre_tokenizers import ByteLevel
from torch import nn
from transformers import AutoTokenizer

from minigpts.errors import UserError
from minigpts.options import PlanOptions, flag_of

BYTE_LEVEL = "byte-level BPE"
BYTE_FALLBACK = "SentencePiece-style BPE with byte fallback"


def _flag(name: str) -> str:
    return flag_of(PlanOptions, name)


# Config fields that hold token ids (an int or a list of ints); they must survive trimming.
SPECIAL_ID_FIELDS = (
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "decoder_start_token_id",
    "sep_token_id",
    "forced_bos_token_id",
    "forced_eos_token_id",
)

# Conversations rendered through the chat template so its scaffolding tokenizes as before.
_TEMPLATE_PROBES = (
    [
        {"role": "system", "content": ""},
        {"role": "user", "content": ""},
        {"role": "assistant", "content": ""},
    ],
    [{"role": "user", "content": ""}, {"role": "assistant", "content": ""}],
)


@dataclass
class VocabSelection:
    """Which tokens survive (old ids, ascending = new-id order) and why each was kept.

    Every kept token is counted under one reason, the first that applies in the order
    special, byte, seen, widened, closure; so the five counts add up to `vocab_after`.
    """

    keep_ids: list[int]
    vocab_before: int
    vocab_after: int
    tokenizer_kind: str
    mode: str  # "embedding_threshold" | "min_count" | "vocab_size"
    value: float
    kept_special: int  # added/special tokens, chat-template scaffolding, config ids
    kept_byte: int  # byte alphabet / byte-fallback pieces and the pieces the pre-tokenizer needs
    kept_seen: int  # chosen by the frequency criterion
    kept_closure: int  # only needed as a parent of a kept merge
    kept_widened: int = 0  # not chosen by the criterion, kept by --vocab-keep-general / --vocab-keep-expected

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> VocabSelection:
        return cls(**data)


@dataclass
class VocabSummary:
    """Sizes before/after vocabulary slicing, for reports (computed before slicing)."""

    vocab_before: int
    vocab_after: int
    embedding_rows_before: int  # can exceed vocab_before: models pad their embedding
    embedding_rows_after: int
    tied: bool
    parameters_before: int
    parameters_saved: int

    @property
    def parameters_after(self) -> int:
        return self.parameters_before - self.parameters_saved

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "parameters_after": self.parameters_after}

    def format(self) -> str:
        removed = 1 - self.vocab_after / self.vocab_before
        return (
            f"vocabulary {self.vocab_before:,} → {self.vocab_after:,} tokens (−{removed:.1%}); "
            f"parameters {self.parameters_before / 1e6:.1f}M → {self.parameters_after / 1e6:.1f}M "
            f"(−{self.parameters_saved / 1e6:.1f}M in embedding{'' if self.tied else ' and LM head'})"
        )


# ---------------------------------------------------------------------------------------------
# Token statistics


def count_tokens(tokenizer, texts: Sequence[str], batch_size: int = 256) -> np.ndarray:
    """How often each token id occurs when `texts` are encoded (no special tokens added)."""
    backend = _backend(tokenizer)
    counts = np.zeros(len(tokenizer), dtype=np.int64)
    for start in range(0, len(texts), batch_size):
        encodings = backend.encode_batch_fast(
            list(texts[start : start + batch_size]), add_special_tokens=False
        )
        ids = np.fromiter(itertools.chain.from_iterable(e.ids for e in encodings), dtype=np.int64)
        counts += np.bincount(ids, minlength=len(counts))
    return counts


def _checked_counts(counts, size: int) -> np.ndarray:
    """Counts as int64 of length `size`; accepts bincounts shorter or padded to the embedding size."""
    counts = np.asarray(counts, dtype=np.int64).ravel()
    if (counts < 0).any():
        raise UserError("token counts contain negative values: recompute them with `minigpts analyze`")
    if len(counts) > size and counts[size:].any():
        raise UserError(
            f"token counts name ids ≥ {size}, beyond this tokenizer's vocabulary: "
            "they were computed with another tokenizer; re-run `minigpts analyze`"
        )
    return np.pad(counts[:size], (0, max(0, size - len(counts))))


# ---------------------------------------------------------------------------------------------
# Reading the tokenizer


def _backend(tokenizer) -> Tokenizer:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise UserError(
            f"vocabulary trimming needs a fast (tokenizers-backed) tokenizer; got {type(tokenizer).__name__}"
        )
    return backend


@dataclass
class _Bpe:
    """The parts of a BPE tokenizer.json that trimming reads."""

    data: dict[str, Any]  # the whole tokenizer.json
    kind: str
    vocab: dict[str, int]
    merges: list[tuple[str, str]]
    continuing_prefix: str

    def merge_result(self, left: str, right: str) -> str:
        prefix = self.continuing_prefix
        return left + (right[len(prefix) :] if prefix and right.startswith(prefix) else right)


def _read_bpe(tokenizer) -> _Bpe:
    data = json.loads(_backend(tokenizer).to_str())
    model = data["model"]
    model_type = model.get("type")
    if model_type != "BPE":
        raise UserError(
            f"vocabulary trimming supports byte-level BPE and BPE with byte fallback; this tokenizer is "
            f"{model_type}: run without vocabulary pruning"
        )
    if _has_component(data.get("pre_tokenizer"), "ByteLevel"):
        kind = BYTE_LEVEL
    elif model.get("byte_fallback"):
        kind = BYTE_FALLBACK
    else:
        raise UserError(
            "vocabulary trimming needs a byte-level BPE or a BPE with byte_fallback; this BPE has neither, "
            "so trimming would make characters unencodable: run without vocabulary pruning"
        )
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    return _Bpe(data, kind, model["vocab"], merges, model.get("continuing_subword_prefix") or "")


def _components(node) -> Iterable[dict[str, Any]]:
    """Every component of a (possibly nested Sequence) normalizer / pre-tokenizer / processor."""
    if not isinstance(node, dict):
        return
    yield node
    for key in ("normalizers", "pretokenizers", "processors", "decoders"):
        for child in node.get(key) or []:
            yield from _components(child)


def _has_component(node, type_name: str) -> bool:
    return any(c.get("type") == type_name for c in _components(node))


def _byte_alphabet_ids(bpe: _Bpe) -> set[int]:
    """Tokens without which some string would no longer encode losslessly."""
    if bpe.kind == BYTE_LEVEL:
        pieces = set(ByteLevel.alphabet())
    else:
        pieces = {f"<0x{b:02X}>" for b in range(256)}
        pieces.add(bpe.data["model"].get("unk_token"))
        # The space marker (▁) must stay a token: the decoder turns it back into a space only
        # when it arrives as a piece, not when it arrives as three fallback bytes.
        for c in itertools.chain(
            _components(bpe.data.get("normalizer")), _components(bpe.data.get("pre_tokenizer"))
        ):
            pieces.update(
                c.get(key) for key in ("replacement", "content", "prepend") if isinstance(c.get(key), str)
            )
    return {bpe.vocab[p] for p in pieces if p in bpe.vocab}


def _template_ids(tokenizer) -> set[int]:
    """Ids of the chat template's scaffolding, rendered around empty messages."""
    templates = tokenizer.chat_template
    if not templates:
        return set()
    if isinstance(templates, str):
        templates = {"default": templates}
    backend = _backend(tokenizer)
    ids: set[int] = set()
    for template, probe in itertools.product(templates.values(), _TEMPLATE_PROBES):
        try:
            text = tokenizer.apply_chat_template(
                probe, chat_template=template, tokenize=False, add_generation_prompt=True
            )
        except jinja2.TemplateError:  # e.g. a template that refuses a system message
            continue
        ids.update(backend.encode(text, add_special_tokens=False).ids)
    return ids


def _config_ids(*configs) -> dict[str, int]:
    """Token ids named by model / generation configs, as {"config.field": id}."""
    named: dict[str, int] = {}
    for config in configs:
        if config is None:
            continue
        for field in SPECIAL_ID_FIELDS:
            value = getattr(config, field, None)
            values = value if isinstance(value, (list, tuple)) else [value]
            for i, token_id in enumerate(v for v in values if v is not None):
                named[f"{type(config).__name__}.{field}[{i}]"] = int(token_id)
    return named


def _special_ids(tokenizer, bpe: _Bpe) -> set[int]:
    ids = {t["id"] for t in bpe.data["added_tokens"]}
    ids.update(tokenizer.all_special_ids)
    return ids


def _merge_parents(bpe: _Bpe) -> dict[int, list[tuple[int, int]]]:
    """result id → (left id, right id) of every merge producing it."""
    parents: dict[int, list[tuple[int, int]]] = {}
    vocab = bpe.vocab
    for left, right in bpe.merges:
        result = vocab[bpe.merge_result(left, right)]
        parents.setdefault(result, []).append((vocab[left], vocab[right]))
    return parents


def _ancestors_missing(token_id: int, kept: set[int], parents: dict[int, list[tuple[int, int]]]) -> set[int]:
    """`token_id` plus every merge ancestor of it that is not in `kept` yet."""
    missing: set[int] = set()
    stack = [token_id]
    while stack:
        current = stack.pop()
        if current in kept or current in missing:
            continue
        missing.add(current)
        for left, right in parents.get(current, ()):
            stack += [left, right]
    return missing


def _with_ancestors(ids: set[int], parents: dict[int, list[tuple[int, int]]]) -> set[int]:
    """`ids` closed under "a kept merge result needs both its parents"."""
    closed: set[int] = set()
    for token_id in ids:
        closed |= _ancestors_missing(token_id, closed, parents)
    return closed


# ---------------------------------------------------------------------------------------------
# The model's own expectation of the domain's tokens


@torch.inference_mode()
def expected_token_counts(
    model, windows: torch.Tensor, *, batch_size: int = 4, progress: bool = True
) -> np.ndarray:
    """Sum over every position of ``windows`` [N, L] of the model's next-token probabilities.

    A smoothed token count: a word the domain sample never shows still gets mass wherever the model
    finds it likely (``savings`` in economics text), so keeping the most expected tokens protects
    held-out domain words that seen-token trimming would split. float64, length = logits width;
    sums to the number of positions. The LM head runs a few hundred positions at a time.
    ``analyze(expected_tokens=…)`` measures the same sums during the analysis pass.
    """
    from tqdm.auto import tqdm

    from minigpts.evaluation import deferred_head, eval_mode

    device = next(model.parameters()).device
    total = None
    bar = tqdm(
        total=windows.numel(), unit="tok", unit_scale=True, desc="expected tokens", disable=not progress
    )
    with bar, eval_mode(model), deferred_head(model, windows[:1, :8].to(device)) as head:
        for batch in windows.split(batch_size):
            probabilities = expected_sums(model, head, batch.to(device))
            total = probabilities if total is None else total + probabilities
            bar.update(batch.numel())
    return total.numpy()


def expected_sums(model, head, batch: torch.Tensor) -> torch.Tensor:
    """float64 [vocab] on the CPU: next-token probabilities of ``batch`` [B, L] summed over its
    positions; ``head`` is ``deferred_head``'s (None: the model returns logits itself). Call it under
    ``torch.inference_mode()``."""
    from minigpts.evaluation import LOGIT_CHUNK_ELEMENTS

    out = model(input_ids=batch, use_cache=False).logits
    rows = out.reshape(-1, out.shape[-1])
    width = head.out_features if head is not None else rows.shape[-1]
    chunk = max(1, LOGIT_CHUNK_ELEMENTS // width)
    total = None
    for start in range(0, rows.shape[0], chunk):
        part = rows[start : start + chunk]
        logits = head(part) if head is not None else part
        probabilities = torch.softmax(logits.float(), dim=-1).sum(0).double().cpu()
        total = probabilities if total is None else total + probabilities
    return total


# ---------------------------------------------------------------------------------------------
# Selection


def select_vocab(
    tokenizer,
    counts,
    *,
    embedding_threshold: float | None = None,
    min_count: int | None = None,
    vocab_size: int | None = None,
    model_config=None,
    generation_config=None,
    keep_general: int = 0,
    expected=None,
    keep_expected: int = 0,
) -> VocabSelection:
    """Choose the tokens to keep from domain token counts; exactly one criterion must be given.

    ``keep_general N`` also keeps the results of the tokenizer's first N BPE merges — its most
    general tokens — so held-out words the domain sample never showed keep their usual spelling
    (measured on SmolLM2 with a 300 KB sample: +30% bits-per-byte without, +15% with N=12,288).
    ``keep_expected K`` with ``expected`` (see `expected_token_counts`) also keeps the K tokens the
    model itself expects most in the domain text — domain-aware where merge order is not (same
    sample, K=16,384: 21,024 tokens kept, +6.1%; by merge order 25,673 tokens still cost +6.5%).

    - `embedding_threshold E` (the paper's): tokens whose normalized frequency is ≤ E are pruned,
      so `0` prunes exactly the unseen ones.
    - `min_count N`: tokens seen fewer than N times are pruned.
    - `vocab_size K`: the final vocabulary has exactly K tokens: the always-kept set first, then
      the most frequent tokens (ties: lower id first) together with their merge ancestors, as
      long as they fit. K smaller than the always-kept set is an error.

    Always kept: added and special tokens, the chat template's scaffolding, ids named by the model
    and generation configs, the byte alphabet, and (closure) every parent of a kept merge.
    """
    mode, value = _single_criterion(embedding_threshold, min_count, vocab_size)
    size = len(tokenizer)
    counts = _checked_counts(counts, size)
    bpe = _read_bpe(tokenizer)
    parents = _merge_parents(bpe)

    special = _always_kept_special(tokenizer, bpe, model_config, generation_config, size)
    byte = _byte_alphabet_ids(bpe)
    forced = special | byte
    general = _general_ids(bpe, keep_general, mode) | _top_expected(expected, keep_expected, size, mode)
    seen = _seen_ids(counts, mode, value, forced, parents)
    widened = general - forced - seen
    chosen = seen | widened
    closure = _with_ancestors(forced | chosen, parents) - forced - chosen
    keep_ids = sorted(forced | chosen | closure)
    return VocabSelection(
        keep_ids=keep_ids,
        vocab_before=size,
        vocab_after=len(keep_ids),
        tokenizer_kind=bpe.kind,
        mode=mode,
        value=float(value),
        kept_special=len(special),
        kept_byte=len(byte - special),
        kept_seen=len(seen - forced),
        kept_closure=len(closure),
        kept_widened=len(widened),
    )


def _single_criterion(
    embedding_threshold: float | None, min_count: int | None, vocab_size: int | None
) -> tuple[str, float | int]:
    """The one pruning criterion given, as ``(mode, value)``; zero or several is a user error."""
    given = {
        "embedding_threshold": embedding_threshold,
        "min_count": min_count,
        "vocab_size": vocab_size,
    }
    chosen = [(k, v) for k, v in given.items() if v is not None]
    if len(chosen) != 1:
        raise UserError(
            "vocabulary pruning: give exactly one of --embedding-threshold, --vocab-min-count, --vocab-size"
        )
    return chosen[0]


def _always_kept_special(tokenizer, bpe, model_config, generation_config, size: int) -> set[int]:
    """Added and special tokens, the chat template's scaffolding and the ids the configs name."""
    return (
        _special_ids(tokenizer, bpe)
        | _template_ids(tokenizer)
        | _checked_config_ids(model_config, generation_config, size)
    )


def _checked_config_ids(model_config, generation_config, size: int) -> set[int]:
    """The ids the model and generation configs name (BOS, EOS, PAD...), each checked against ``size``."""
    ids = set()
    for name, token_id in _config_ids(model_config, generation_config).items():
        if not 0 <= token_id < size:
            raise UserError(
                f"{name} = {token_id} is outside the tokenizer's {size} tokens: the model config and "
                "tokenizer do not match"
            )
        ids.add(token_id)
    return ids


def _general_ids(bpe, keep_general, mode: str) -> set[int]:
    """Results of the tokenizer's first ``keep_general`` merges (``--vocab-keep-general``)."""
    if not isinstance(keep_general, (int, np.integer)) or isinstance(keep_general, bool) or keep_general < 0:
        raise UserError(f"--vocab-keep-general must be a whole number ≥ 0, got {keep_general!r}")
    if keep_general and mode == "vocab_size":
        raise UserError(
            "--vocab-keep-general does not combine with --vocab-size (which fixes the size exactly)"
        )
    return {bpe.vocab[bpe.merge_result(left, right)] for left, right in bpe.merges[:keep_general]}


def _seen_ids(counts: np.ndarray, mode: str, value, forced: set[int], parents) -> set[int]:
    """The ids the domain counts select under the one criterion given."""
    if mode == "vocab_size":
        return _fill_to_size(counts, forced, parents, _positive_int(value, _flag("vocab_size")))
    if mode == "embedding_threshold":
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
            raise UserError(f"--embedding-threshold must be a number ≥ 0, got {value!r}")
        total = int(counts.sum())
        if total == 0:
            raise UserError("no tokens were counted: the calibration corpus is empty")
        selected = counts / total > value
    else:
        selected = counts >= _positive_int(value, _flag("vocab_min_count"))
    return set(np.flatnonzero(selected).tolist())


def _top_expected(expected, keep_expected, size: int, mode: str) -> set[int]:
    """Ids of the ``keep_expected`` tokens with the largest expected counts (ties: lower id)."""
    if (
        not isinstance(keep_expected, (int, np.integer))
        or isinstance(keep_expected, bool)
        or keep_expected < 0
    ):
        raise UserError(f"--vocab-keep-expected must be a whole number ≥ 0, got {keep_expected!r}")
    if not keep_expected:
        return set()
    if mode == "vocab_size":
        raise UserError(
            "--vocab-keep-expected does not combine with --vocab-size (which fixes the size exactly)"
        )
    if expected is None:
        raise UserError("--vocab-keep-expected needs the model's expected token counts (give --data)")
    expected = np.asarray(expected, dtype=np.float64).ravel()[:size]
    order = np.lexsort((np.arange(len(expected)), -expected))
    return set(order[:keep_expected].tolist())


def _positive_int(value, flag: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise UserError(f"{flag} must be a whole number ≥ 1, got {value!r}")
    return int(value)


def _fill_to_size(counts: np.ndarray, forced: set[int], parents, target: int) -> set[int]:
    """Most frequent tokens (with their ancestors) that fit next to `forced` in `target` slots."""
    kept = _with_ancestors(forced, parents)
    if len(kept) > target:
        raise UserError(
            f"--vocab-size {target} is smaller than the {len(kept)} tokens that must always be kept "
            "(special tokens, byte alphabet and their merge parents): use at least that"
        )
    chosen: set[int] = set()
    for token_id in np.lexsort((np.arange(len(counts)), -counts)).tolist():
        if len(kept) == target:
            break
        missing = _ancestors_missing(token_id, kept, parents)
        if missing and len(kept) + len(missing) <= target:
            kept |= missing
            chosen.add(token_id)
    return chosen


# ---------------------------------------------------------------------------------------------
# Id mapping


def old_to_new(keep_ids: Sequence[int]) -> dict[int, int]:
    """Old id → new id, for the ids in `keep_ids` (their position is their new id)."""
    return {int(old): new for new, old in enumerate(keep_ids)}


def remap_ids(ids, keep_ids: Sequence[int]):
    """Old ids (an int or a sequence of ints) → new ids; a dropped id is an error."""
    mapping = old_to_new(keep_ids)
    if isinstance(ids, (int, np.integer)):
        return _remap_one(int(ids), mapping, "token id")
    return [_remap_one(int(i), mapping, "token id") for i in ids]


def _remap_one(token_id: int, mapping: dict[int, int], what: str) -> int:
    if token_id not in mapping:
        raise UserError(
            f"{what} {token_id} is not among the kept tokens: keep it in the vocabulary selection"
        )
    return mapping[token_id]


def _checked_keep_ids(keep_ids: Sequence[int], size: int, *, ascending: bool) -> list[int]:
    keep = [int(i) for i in keep_ids]
    if not keep:
        raise UserError("the vocabulary selection keeps no tokens")
    if len(set(keep)) != len(keep) or min(keep) < 0 or max(keep) >= size:
        raise UserError(f"kept token ids must be distinct ids in [0, {size}); the vocabulary plan is corrupt")
    if ascending and keep != sorted(keep):
        raise UserError("kept token ids must be in ascending order for the tokenizer")
    return keep


# ---------------------------------------------------------------------------------------------
# Tokenizer surgery


def trim_tokenizer(tokenizer, keep_ids: Sequence[int]):
    """A new tokenizer holding only `keep_ids` (ascending), renumbered densely in that order.

    The tokenizer.json is rebuilt (vocab, merges, added tokens, post-processor and padding ids)
    and loaded through `AutoTokenizer` from a saved copy of the original, so the result carries
    the original's chat template and special-token settings and saves/loads with plain
    transformers. Its class is the generic `TokenizersBackend`, which runs tokenizer.json as is
    (a model-specific class would rebuild its own pipeline around the vocabulary).
    """
    bpe = _read_bpe(tokenizer)
    keep = _checked_keep_ids(keep_ids, len(tokenizer), ascending=True)
    mapping = old_to_new(keep)
    required = _byte_alphabet_ids(bpe) | set(tokenizer.all_special_ids)
    missing = sorted(required - mapping.keys())
    if missing:
        raise UserError(
            f"the vocabulary selection drops {len(missing)} byte/special tokens (ids {missing[:5]}...): "
            "build it with select_vocab so the tokenizer stays lossless"
        )

    data = bpe.data
    vocab = {token: mapping[i] for token, i in bpe.vocab.items() if i in mapping}
    data["model"]["vocab"] = vocab
    data["model"]["merges"] = [
        [left, right]
        for left, right in bpe.merges
        if left in vocab and right in vocab and bpe.merge_result(left, right) in vocab
    ]
    added = [dict(t, id=mapping[t["id"]]) for t in data["added_tokens"] if t["id"] in mapping]
    data["added_tokens"] = sorted(added, key=lambda t: t["id"])
    for processor in _components(data.get("post_processor")):
        _remap_processor(processor, mapping)
    if data.get("padding"):
        data["padding"]["pad_id"] = _remap_one(data["padding"]["pad_id"], mapping, "padding token id")

    old_tokens = tokenizer.convert_ids_to_tokens(keep)
    with tempfile.TemporaryDirectory(prefix="minigpts-vocab-") as tmp:
        _write_tokenizer_dir(tokenizer, data, Path(tmp))
        trimmed = AutoTokenizer.from_pretrained(tmp)
        trimmed.name_or_path = tokenizer.name_or_path
    if len(trimmed) != len(keep) or trimmed.convert_ids_to_tokens(list(range(len(keep)))) != old_tokens:
        raise RuntimeError("trimmed tokenizer does not number the kept tokens densely in keep order")
    return trimmed


def _remap_processor(processor: dict[str, Any], mapping: dict[int, int]) -> None:
    """Fix the token ids a post-processor inserts (TemplateProcessing, Bert/Roberta)."""
    if processor.get("type") == "TemplateProcessing":
        for name, special in processor["special_tokens"].items():
            special["ids"] = [
                _remap_one(i, mapping, f"post-processor token {name!r} id") for i in special["ids"]
            ]
    for key in ("sep", "cls"):
        if isinstance(processor.get(key), list):
            token, token_id = processor[key]
            processor[key] = [token, _remap_one(token_id, mapping, f"post-processor token {token!r} id")]


def _write_tokenizer_dir(tokenizer, data: dict[str, Any], directory: Path) -> None:
    """Save the original's settings, swap in the trimmed tokenizer.json, drop stale vocab files."""
    tokenizer.save_pretrained(directory)
    stale = set(getattr(tokenizer, "vocab_files_names", {}).values()) - {"tokenizer.json"}
    for name in stale | {"vocab.json", "merges.txt", "tokenizer.model", "special_tokens_map.json"}:
        (directory / name).unlink(missing_ok=True)
    (directory / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    config_path = directory / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    for key in ("added_tokens_decoder", "auto_map", "vocab_file", "merges_file", "tokenizer_file"):
        config.pop(key, None)
    config["tokenizer_class"] = "TokenizersBackend"
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False), encoding="utf-8")


# ---------------------------------------------------------------------------------------------
# Model surgery


def vocab_summary(model, selection: VocabSelection) -> VocabSummary:
    """Sizes before/after slicing `model` to `selection` (call before slice_model_vocab)."""
    embedding = model.get_input_embeddings()
    head = model.get_output_embeddings()
    tied = head is not None and head.weight is embedding.weight
    rows_before = embedding.weight.shape[0]
    removed_rows = rows_before - selection.vocab_after
    saved = removed_rows * embedding.weight.shape[1]
    if head is not None and not tied:
        saved += removed_rows * (head.weight.shape[1] + (1 if head.bias is not None else 0))
    return VocabSummary(
        vocab_before=selection.vocab_before,
        vocab_after=selection.vocab_after,
        embedding_rows_before=rows_before,
        embedding_rows_after=selection.vocab_after,
        tied=tied,
        parameters_before=sum(p.numel() for p in model.parameters()),
        parameters_saved=saved,
    )


def selection_summary(model, selection: VocabSelection, counted_on: str | None = None) -> dict[str, Any]:
    """``plan.summary["vocab"]``: sizes, why each kept token is kept, parameters saved, what was counted."""
    keys = ("mode", "value", "kept_special", "kept_byte", "kept_seen", "kept_widened", "kept_closure")
    return {
        "before": selection.vocab_before,
        "after": selection.vocab_after,
        **{key: getattr(selection, key) for key in keys},
        "parameters_saved": vocab_summary(model, selection).parameters_saved,
        "counted_on": counted_on,
    }


def slice_model_vocab(model, keep_ids: Sequence[int]):
    """Keep only the embedding / LM-head rows of `keep_ids`, in that order (in place; returns model).

    Tied weights stay one tensor; `vocab_size` and the special-token ids of the model config and
    generation config are updated to the new numbering.
    """
    embedding = model.get_input_embeddings()
    head = model.get_output_embeddings()
    old_rows = embedding.weight.shape[0]
    keep = _checked_keep_ids(keep_ids, old_rows, ascending=False)
    mapping = old_to_new(keep)
    configs = [c for c in (model.config, getattr(model, "generation_config", None)) if c is not None]
    # Remap every id before touching the model, so a dropped special token leaves it unchanged.
    new_ids = [
        (config, field, _remapped_field(config, field, mapping))
        for config in configs
        for field in SPECIAL_ID_FIELDS
    ]

    tied = head is not None and head.weight is embedding.weight
    index = torch.as_tensor(keep, dtype=torch.long, device=embedding.weight.device)
    with torch.no_grad():
        embedding.weight = _sliced(embedding.weight, index)
        if head is not None:
            head.weight = embedding.weight if tied else _sliced(head.weight, index)
            if head.bias is not None:
                head.bias = _sliced(head.bias, index)
            head.out_features = len(keep)
    embedding.num_embeddings = len(keep)
    if getattr(embedding, "padding_idx", None) is not None:
        embedding.padding_idx = mapping.get(embedding.padding_idx)

    for config, field, value in new_ids:
        if value is not None:
            setattr(config, field, value)
    model.config.get_text_config().vocab_size = len(keep)
    for module in model.modules():
        if getattr(module, "vocab_size", None) == old_rows:
            module.vocab_size = len(keep)
    return model


def _sliced(parameter: nn.Parameter, index: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(parameter.index_select(0, index).contiguous(), requires_grad=parameter.requires_grad)


def _remapped_field(config, field: str, mapping: dict[int, int]):
    value = getattr(config, field, None)
    what = f"{type(config).__name__}.{field}"
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        return [_remap_one(int(v), mapping, what) for v in value]
    return _remap_one(int(value), mapping, what)

"""Domain corpora: read documents from many formats, split them by document, pack token windows.

Every later stage must see the same held-out text, so splitting is deterministic (seeded) and works
on whole documents: no document ever lands in two of train / validation / test.
"""

from __future__ import annotations

import csv
import glob
import io
import json
import random
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from minigpts.errors import UserError

TEXT_SUFFIXES = {".txt", ".md"}
TABLE_SUFFIXES = {".jsonl", ".json", ".csv", ".parquet"}
SUPPORTED_SUFFIXES = TEXT_SUFFIXES | TABLE_SUFFIXES
SPLITS = ("calibration", "train", "validation", "test")
DOCUMENT_SEPARATOR = "\n\n"

# Words in a file name (split on . _ - and spaces) that mark a pre-made split.
_SPLIT_WORDS = {
    "train": "train",
    "training": "train",
    "valid": "validation",
    "validation": "validation",
    "val": "validation",
    "dev": "validation",
    "test": "test",
    "calib": "calibration",
    "calibration": "calibration",
}


@dataclass
class Corpus:
    """Documents of one domain, split by document. ``presplit`` tells whether the source chose the split."""

    source: str
    splits: dict[str, list[str]]
    presplit: bool
    seed: int
    notes: list[str] = field(default_factory=list)

    def split(self, name: str) -> list[str]:
        """Documents of one split; a missing or empty split is a clear error."""
        name = normalize_split_name(name)
        docs = self.splits.get(name) or []
        if not docs:
            have = ", ".join(f"{k} ({len(v)} docs)" for k, v in self.splits.items() if v) or "none"
            hint = ""
            if self.presplit:
                hint = (
                    " (the splits come from the source's split names, e.g. law.test.jsonl: add the missing "
                    "split, or give text whose names carry no split to have it split 80/10/10 by document)"
                )
            raise UserError(
                f"--data {self.source}: split '{name}' is empty or missing; splits present: {have}{hint}"
            )
        return docs

    def describe(self) -> list[dict]:
        """One row per split: documents and characters, for printing and for reports."""
        return [
            {"split": name, "documents": len(docs), "characters": sum(len(d) for d in docs)}
            for name, docs in self.splits.items()
        ]


def normalize_split_name(name: str) -> str:
    key = name.strip().lower()
    if key not in _SPLIT_WORDS:
        raise UserError(f"--split {name!r}: unknown split; use one of {', '.join(SPLITS)}")
    return _SPLIT_WORDS[key]


def load_corpus(
    spec: str | Path | list[str | Path] | tuple[str | Path, ...],
    *,
    text_field: str = "text",
    encoding: str = "utf-8",
    seed: int = 0,
    validation_fraction: float = 0.1,
    test_fraction: float = 0.1,
) -> Corpus:
    """Read ``spec`` (file, directory, glob, saved HF dataset, or hub dataset name) into a split Corpus.

    Files whose names carry train/valid/test keep that split; otherwise documents are shuffled with
    ``seed`` and cut into train / validation / test. Calibration is a seeded shuffle of the train
    documents (a subset of train, never of validation or test).

    ``spec`` may also be a list of files, directories and globs (what a shell hands over for an
    unquoted ``law.*.jsonl``): their files are read as one corpus, exactly as a single glob matching
    the same files would be (sorted, each file once).
    """
    fields = [f.strip() for f in text_field.split(",") if f.strip()]
    if not fields:
        raise UserError("--text-field is empty; name a column such as 'text' or 'question,answer'")
    if not isinstance(spec, (str, Path)):
        specs = [str(s) for s in spec]
        if not specs:
            raise UserError("--data: give at least one file, directory or glob")
        if len(specs) > 1:
            named = _read_files(_expand_many(specs), fields, encoding)
            spec = describe_specs(specs)
            if sum(len(v) for v in named.values()) == 0:
                raise UserError(f"--data {spec}: the corpus is empty (no non-blank documents found)")
            return _assign_splits(spec, named, seed, validation_fraction, test_fraction)
        spec = specs[0]
    spec = str(spec)
    path = Path(spec).expanduser()
    if path.is_dir() and _is_saved_hf_dataset(path):
        named = _read_saved_dataset(path, fields)
    elif path.exists() or any(ch in spec for ch in "*?["):
        named = _read_files(_expand_files(spec), fields, encoding)
    elif re.fullmatch(r"[\w.-]+(/[\w.-]+)?", spec) and not spec.endswith(tuple(SUPPORTED_SUFFIXES)):
        named = _read_hub_dataset(spec, fields)
    else:
        raise UserError(f"--data {spec}: no such file or directory")

    total_docs = sum(len(v) for v in named.values())
    if total_docs == 0:
        raise UserError(f"--data {spec}: the corpus is empty (no non-blank documents found)")
    return _assign_splits(spec, named, seed, validation_fraction, test_fraction)


def _assign_splits(
    spec: str, named: dict[str | None, list[str]], seed: int, validation_fraction: float, test_fraction: float
) -> Corpus:
    unsplit = named.pop(None, [])
    if named and unsplit:
        raise UserError(
            f"--data {spec}: some files name a split (train/valid/test) and some do not; "
            "name every file's split or none"
        )
    rng = random.Random(seed)
    if named:
        splits = {name: list(named.get(name, [])) for name in ("train", "validation", "test")}
        notes = ["splits taken from the file names"]
        if named.get("calibration"):
            splits["calibration"] = list(named["calibration"])
        else:
            calibration = list(splits["train"])
            rng.shuffle(calibration)
            splits["calibration"] = calibration
            notes.append("calibration = train documents in a seeded random order")
        return Corpus(spec, {k: splits[k] for k in SPLITS}, presplit=True, seed=seed, notes=notes)

    docs = unsplit
    if len(docs) < 3:
        raise UserError(
            f"--data {spec}: {len(docs)} document(s) cannot be split into train/validation/test; "
            "give at least 3 documents (blank lines separate documents in .txt/.md files)"
        )
    order = list(range(len(docs)))
    rng.shuffle(order)
    n_test = max(1, int(len(docs) * test_fraction))
    n_valid = max(1, int(len(docs) * validation_fraction))
    test_idx = sorted(order[:n_test])
    valid_idx = sorted(order[n_test : n_test + n_valid])
    train_idx = sorted(order[n_test + n_valid :])
    calibration_idx = list(train_idx)
    rng.shuffle(calibration_idx)
    splits = {
        "calibration": [docs[i] for i in calibration_idx],
        "train": [docs[i] for i in train_idx],
        "validation": [docs[i] for i in valid_idx],
        "test": [docs[i] for i in test_idx],
    }
    notes = [
        f"documents split by seed {seed}: {1 - test_fraction - validation_fraction:.0%} train, "
        f"{validation_fraction:.0%} validation, {test_fraction:.0%} test; calibration = train in a seeded order"
    ]
    return Corpus(spec, splits, presplit=False, seed=seed, notes=notes)


def describe_specs(specs: list[str]) -> str:
    """How several --data paths are named in output and messages (short, but says how many)."""
    if len(specs) <= 3:
        return " ".join(specs)
    return f"{specs[0]} … {specs[-1]} ({len(specs)} paths)"


def _read_files(files: list[Path], fields: list[str], encoding: str) -> dict[str | None, list[str]]:
    named: dict[str | None, list[str]] = {}
    for file in files:
        named.setdefault(_split_of_file(file), []).extend(_read_file(file, fields, encoding))
    return named


def _expand_many(specs: list[str]) -> list[Path]:
    """The files of several paths/globs, sorted and each once: what one glob over them would give."""
    files: dict[Path, Path] = {}
    for spec in specs:
        path = Path(spec).expanduser()
        if path.is_dir() and _is_saved_hf_dataset(path):
            raise UserError(
                f"--data {spec}: a saved dataset must be the only --data; several paths must be files, "
                "directories or globs"
            )
        if not path.exists() and not any(ch in spec for ch in "*?["):
            raise UserError(f"--data {spec}: no such file or directory")
        for file in _expand_files(spec):
            files.setdefault(file.resolve(), file)
    return sorted(files.values())


def _split_of_file(path: Path) -> str | None:
    words = re.split(r"[._\-\s]+", path.name.lower())
    found = {_SPLIT_WORDS[w] for w in words if w in _SPLIT_WORDS}
    return found.pop() if len(found) == 1 else None


def _expand_files(spec: str) -> list[Path]:
    path = Path(spec).expanduser()
    if path.is_dir():
        candidates = sorted(p for p in path.rglob("*") if p.is_file())
        files = [p for p in candidates if p.suffix.lower() in SUPPORTED_SUFFIXES]
        if not files:
            raise UserError(
                f"--data {spec}: the directory holds no {', '.join(sorted(SUPPORTED_SUFFIXES))} files"
            )
        return files
    if path.is_file():
        if path.suffix.lower() not in SUPPORTED_SUFFIXES:
            raise UserError(
                f"--data {spec}: unsupported file type '{path.suffix}'; "
                f"use one of {', '.join(sorted(SUPPORTED_SUFFIXES))}"
            )
        return [path]
    files = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
    files = [p for p in files if p.suffix.lower() in SUPPORTED_SUFFIXES]
    if not files:
        raise UserError(f"--data {spec}: the pattern matches no supported files")
    return files


def _decode(raw: bytes, path: Path, encoding: str) -> str:
    try:
        text = raw.decode(encoding)
    except UnicodeDecodeError as err:
        raise UserError(
            f"{path}: bytes at offset {err.start} are not valid {encoding}; {_encoding_hint(raw, encoding)}"
        ) from err
    except LookupError as err:
        raise UserError(f"--encoding {encoding}: unknown encoding") from err
    return text.lstrip("\ufeff")


def _encoding_hint(raw: bytes, failed: str) -> str:
    """Name the encoding charset-normalizer detects (one that decodes the whole file), never a blind guess.

    A single-byte guess such as latin-1 decodes anything and would turn GBK or Big5 text into
    silent garbage, so only a detected encoding is suggested.
    """
    best = None
    non_ascii = len(raw) - len(raw.translate(None, bytes(range(128))))
    if non_ascii >= 8:  # a handful of stray bytes says nothing about the encoding
        try:
            from charset_normalizer import from_bytes

            best = from_bytes(raw).best()
        except Exception:  # detection is a courtesy: never let it hide the real error
            best = None
    if best is not None and best.encoding.replace("_", "-") not in {
        failed.lower().replace("_", "-"),
        "ascii",
    }:
        try:
            raw.decode(best.encoding)
        except (UnicodeDecodeError, LookupError):
            pass
        else:
            others = [c for c in best.could_be_from_charset if c != best.encoding][:2]
            also = f"; also possible: {', '.join(others)}" if others else ""
            return (
                f"it looks like {best.encoding} (detected by charset-normalizer{also}): "
                f"pass --encoding {best.encoding}"
            )
    return "its encoding could not be detected: pass --encoding with the file's encoding (e.g. gb18030, big5, cp1252)"


def _join_fields(record: dict, fields: list[str], where: str) -> str | None:
    missing = [f for f in fields if f not in record]
    if missing:
        available = ", ".join(sorted(map(str, record))) or "none"
        raise UserError(
            f"{where}: field {missing[0]!r} not found (--text-field); available fields: {available}"
        )
    parts = [record[f] for f in fields]
    parts = [p if isinstance(p, str) else ("" if p is None else str(p)) for p in parts]
    text = "\n".join(p for p in parts if p)
    return text if text.strip() else None


def _read_file(path: Path, fields: list[str], encoding: str) -> list[str]:
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return _read_parquet(path, fields)
    text = _decode(path.read_bytes(), path, encoding)
    if suffix in TEXT_SUFFIXES:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
        return [block.strip("\n") for block in re.split(r"\n\s*\n", text) if block.strip()]
    if suffix == ".jsonl":
        docs = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise UserError(f"{path}:{lineno}: not valid JSON ({err.msg})") from err
            if not isinstance(record, dict):
                raise UserError(f"{path}:{lineno}: expected a JSON object per line")
            doc = _join_fields(record, fields, f"{path}:{lineno}")
            if doc is not None:
                docs.append(doc)
        return docs
    if suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise UserError(f"{path}: not valid JSON ({err.msg} at line {err.lineno})") from err
        if isinstance(data, dict):
            lists = [v for v in data.values() if isinstance(v, list)]
            if len(lists) != 1:
                raise UserError(f"{path}: expected a JSON list of records, or an object holding one list")
            data = lists[0]
        if not isinstance(data, list):
            raise UserError(f"{path}: expected a JSON list of records")
        docs = []
        for i, record in enumerate(data):
            if isinstance(record, str):
                doc = record if record.strip() else None
            elif isinstance(record, dict):
                doc = _join_fields(record, fields, f"{path}[{i}]")
            else:
                raise UserError(f"{path}[{i}]: expected an object or a string")
            if doc is not None:
                docs.append(doc)
        return docs
    if suffix == ".csv":
        reader = csv.DictReader(io.StringIO(text, newline=""))
        docs = []
        for i, record in enumerate(reader, 2):
            doc = _join_fields(record, fields, f"{path}:{i}")
            if doc is not None:
                docs.append(doc)
        if reader.fieldnames is None:
            return []
        return docs
    raise UserError(f"{path}: unsupported file type '{suffix}'")


def _read_parquet(path: Path, fields: list[str]) -> list[str]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as err:  # pyarrow raises many types for corrupt files
        raise UserError(f"{path}: cannot read parquet ({err})") from err
    return _table_docs(
        table.column_names, lambda name: table.column(name).to_pylist(), fields, str(path), number_rows=True
    )


def _is_saved_hf_dataset(path: Path) -> bool:
    return (path / "dataset_dict.json").exists() or (path / "dataset_info.json").exists()


def _table_docs(
    column_names: list[str],
    column: Callable[[str], list],
    fields: list[str],
    where: str,
    *,
    number_rows: bool,
) -> list[str]:
    """The documents of a table (parquet, HF dataset) whose ``column(name)`` reads only the columns needed."""
    missing = [f for f in fields if f not in column_names]
    if missing:
        raise UserError(
            f"{where}: field {missing[0]!r} not found (--text-field); available fields: "
            f"{', '.join(column_names)}"
        )
    docs = []
    for i, values in enumerate(zip(*(column(f) for f in fields))):
        doc = _join_fields(dict(zip(fields, values)), fields, f"{where}[{i}]" if number_rows else where)
        if doc is not None:
            docs.append(doc)
    return docs


def _records_to_docs(dataset, fields: list[str], where: str) -> list[str]:
    return _table_docs(dataset.column_names, dataset.__getitem__, fields, where, number_rows=False)


def _dataset_to_named(data, fields: list[str], where: str) -> dict[str | None, list[str]]:
    from datasets import DatasetDict

    if isinstance(data, DatasetDict):
        named: dict[str | None, list[str]] = {}
        for name, part in data.items():
            split = _SPLIT_WORDS.get(name.lower())
            if split is None:
                raise UserError(f"{where}: unknown split name {name!r}; expected train/validation/test")
            named.setdefault(split, []).extend(_records_to_docs(part, fields, f"{where}[{name}]"))
        return named
    return {None: _records_to_docs(data, fields, where)}


def _read_saved_dataset(path: Path, fields: list[str]) -> dict[str | None, list[str]]:
    from datasets import load_from_disk

    return _dataset_to_named(load_from_disk(str(path)), fields, str(path))


def _read_hub_dataset(name: str, fields: list[str]) -> dict[str | None, list[str]]:
    from datasets import load_dataset

    try:
        data = load_dataset(name)
    except Exception as err:  # offline, unknown name, gated repository...
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(
            f"--data {name}: not a local path, and the hub dataset could not be loaded ({first_line})"
        ) from err
    return _dataset_to_named(data, fields, name)


# --------------------------------------------------------------------------------------------------
# Tokens


def tokenize_stream(
    tokenizer, texts: list[str], separator: str = DOCUMENT_SEPARATOR, max_tokens: int | None = None
) -> torch.LongTensor:
    """Token ids of the documents, each followed by ``separator`` (the last one not), no special tokens.

    Documents are encoded one by one, so ``max_tokens`` can stop early on big corpora.
    """
    ids: list[int] = []
    batch = 64
    for start in range(0, len(texts), batch):
        chunk = texts[start : start + batch]
        chunk = [doc + (separator if start + i < len(texts) - 1 else "") for i, doc in enumerate(chunk)]
        for encoded in tokenizer(chunk, add_special_tokens=False)["input_ids"]:
            ids.extend(encoded)
        if max_tokens is not None and len(ids) >= max_tokens:
            break
    if max_tokens is not None:
        ids = ids[:max_tokens]
    return torch.tensor(ids, dtype=torch.long)


def text_within_token_budget(
    tokenizer, texts: list[str], max_tokens: int | None, separator: str = DOCUMENT_SEPARATOR
) -> list[str]:
    """The documents that the first ``max_tokens`` tokens of ``tokenizer`` cover, the last one cut.

    A token budget has to become a fixed *text* before models with different vocabularies are
    compared: counted in each model's own tokens, a trimmed vocabulary (more tokens per byte)
    would be scored on less, and different, text. ``tokenize_stream`` of the result with the same
    tokenizer gives (up to a merge across the cut) the first ``max_tokens`` ids.
    """
    if max_tokens is None:
        return list(texts)
    kept: list[str] = []
    used = 0
    for i, doc in enumerate(texts):
        piece = doc if i == len(texts) - 1 else doc + separator
        try:
            encoded = tokenizer(piece, add_special_tokens=False, return_offsets_mapping=True)
        except NotImplementedError:  # slow (Python) tokenizers have no offsets
            encoded = tokenizer(piece, add_special_tokens=False)
        room = max_tokens - used
        if len(encoded["input_ids"]) < room:
            kept.append(doc)
            used += len(encoded["input_ids"])
            continue
        if len(encoded["input_ids"]) == room:  # ends exactly here (with its separator, if any)
            if not any(texts[i + 1 :]):  # only empty documents follow: the budget covers everything
                return list(texts)
            kept.append(piece)
            break
        end = _end_of_first_tokens(tokenizer, piece, encoded, room)
        if end > 0:
            kept.append(piece[:end])
        break
    return kept


def _end_of_first_tokens(tokenizer, text: str, encoded, count: int) -> int:
    """Characters of ``text`` that its first ``count`` tokens cover (offsets; decoding for slow tokenizers)."""
    if count <= 0:
        return 0
    offsets = encoded.get("offset_mapping")
    if offsets is not None:
        return max(end for _, end in offsets[:count])
    prefix = tokenizer.decode(encoded["input_ids"][:count])
    if not text.startswith(prefix):
        raise UserError(
            f"tokenizer {type(tokenizer).__name__} gives no offsets and does not decode to its input; "
            "evaluate the whole split (drop --max-eval-tokens / --max-val-tokens) or use a fast tokenizer"
        )
    return len(prefix)


def make_windows(ids: torch.Tensor, seq_len: int, max_tokens: int | None = None) -> torch.LongTensor:
    """Non-overlapping windows of ``seq_len`` tokens [N, seq_len]; the remainder is dropped."""
    if seq_len < 2:
        raise UserError(f"--seq-len {seq_len}: must be at least 2")
    usable = len(ids) if max_tokens is None else min(len(ids), max_tokens)
    n = usable // seq_len
    return ids[: n * seq_len].view(n, seq_len)

"""Corpus reading in every format, split rules, and token windows."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from minigpts.data import load_corpus, make_windows, tokenize_stream
from minigpts.errors import UserError

DOCS = [f"Document number {i}. It talks about topic {i % 5}.\nSecond line {i}." for i in range(40)]


def write_jsonl(path, docs, field="text"):
    path.write_text("".join(json.dumps({field: d, "id": i}) + "\n" for i, d in enumerate(docs)))


def all_docs(corpus, splits=("train", "validation", "test")):
    return [d for s in splits for d in corpus.splits[s]]


@pytest.mark.parametrize("fmt", ["txt", "md", "jsonl", "json", "csv", "parquet"])
def test_every_format_reads_every_document(tmp_path, fmt):
    path = tmp_path / f"corpus.{fmt}"
    if fmt in ("txt", "md"):
        path.write_text("\n\n".join(DOCS) + "\n")
    elif fmt == "jsonl":
        write_jsonl(path, DOCS)
    elif fmt == "json":
        path.write_text(json.dumps([{"text": d} for d in DOCS]))
    elif fmt == "csv":
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, ["id", "text"])
            writer.writeheader()
            writer.writerows({"id": i, "text": d} for i, d in enumerate(DOCS))
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"text": DOCS}), path)
    corpus = load_corpus(str(path))
    assert sorted(all_docs(corpus)) == sorted(DOCS)


def test_split_is_by_document_disjoint_and_seeded(tmp_path):
    path = tmp_path / "c.jsonl"
    write_jsonl(path, DOCS)
    a = load_corpus(str(path), seed=1)
    b = load_corpus(str(path), seed=1)
    c = load_corpus(str(path), seed=2)
    assert a.splits == b.splits
    assert a.splits != c.splits
    train, valid, test = (set(a.splits[s]) for s in ("train", "validation", "test"))
    assert not (train & valid) and not (train & test) and not (valid & test)
    assert len(train) + len(valid) + len(test) == len(DOCS)
    assert len(test) == 4 and len(valid) == 4
    calib = set(a.splits["calibration"])
    assert calib <= train and not (calib & (valid | test))


def test_presplit_files_are_kept_as_they_are(tmp_path):
    write_jsonl(tmp_path / "law.train.jsonl", DOCS[:30])
    write_jsonl(tmp_path / "law.valid.jsonl", DOCS[30:35])
    write_jsonl(tmp_path / "law.test.jsonl", DOCS[35:])
    corpus = load_corpus(str(tmp_path))
    assert corpus.presplit
    assert corpus.splits["train"] == DOCS[:30]
    assert corpus.splits["validation"] == DOCS[30:35]
    assert corpus.splits["test"] == DOCS[35:]
    assert set(corpus.splits["calibration"]) == set(DOCS[:30])
    glob_corpus = load_corpus(str(tmp_path / "law.*.jsonl"))
    assert glob_corpus.splits == corpus.splits


def test_saved_hf_datasetdict_keeps_its_splits(tmp_path):
    from datasets import Dataset, DatasetDict

    dd = DatasetDict(
        {
            "train": Dataset.from_dict({"question": DOCS[:20], "answer": DOCS[20:40]}),
            "test": Dataset.from_dict({"question": ["q1", "q2"], "answer": ["a1", "a2"]}),
        }
    )
    dd.save_to_disk(str(tmp_path / "ds"))
    corpus = load_corpus(str(tmp_path / "ds"), text_field="question,answer")
    assert corpus.splits["test"] == ["q1\na1", "q2\na2"]
    assert corpus.splits["train"][0] == DOCS[0] + "\n" + DOCS[20]
    assert corpus.splits["validation"] == []


def test_several_fields_are_joined(tmp_path):
    path = tmp_path / "qa.jsonl"
    path.write_text(json.dumps({"question": "Why?", "answer": "Because."}) + "\n")
    path.write_text(path.read_text() * 5)
    corpus = load_corpus(str(path), text_field="question,answer")
    assert all(d == "Why?\nBecause." for d in all_docs(corpus))


@pytest.mark.parametrize(
    "setup, message",
    [
        (lambda p: None, "no such file"),
        (lambda p: (p / "empty.jsonl").write_text(""), "empty"),
        (lambda p: write_jsonl(p / "c.jsonl", DOCS, field="body"), "field 'text' not found"),
        (lambda p: (p / "bad.txt").write_bytes(b"hello\n\nworld \xff\xfe here\n\nthird"), "offset 13"),
        (lambda p: (p / "two.txt").write_text("one\n\ntwo"), "cannot be split"),
        (lambda p: (p / "x.xml").write_text("<a/>"), "unsupported file type"),
    ],
)
def test_bad_corpora_are_clear_errors(tmp_path, setup, message):
    setup(tmp_path)
    files = list(tmp_path.iterdir())
    spec = str(files[0]) if files else str(tmp_path / "missing.jsonl")
    with pytest.raises(UserError, match=message):
        load_corpus(spec)


def test_field_error_lists_available_fields(tmp_path):
    write_jsonl(tmp_path / "c.jsonl", DOCS, field="body")
    with pytest.raises(UserError, match="available fields: body, id"):
        load_corpus(str(tmp_path / "c.jsonl"))


def test_encoding_override_reads_latin1(tmp_path):
    (tmp_path / "l.txt").write_bytes("café\n\nnaïve\n\nrésumé\n\nfin".encode("latin-1"))
    corpus = load_corpus(str(tmp_path / "l.txt"), encoding="latin-1")
    assert "café" in all_docs(corpus) + corpus.splits["train"]


def test_missing_split_says_what_there_is(tmp_path):
    write_jsonl(tmp_path / "w.test.jsonl", DOCS[:3])
    corpus = load_corpus(str(tmp_path / "w.test.jsonl"))
    with pytest.raises(UserError, match=r"split 'train' is empty.*test \(3 docs\).*split 80/10/10"):
        corpus.split("train")


def test_stream_and_windows(tiny_tokenizer):
    texts = ["alpha beta", "gamma delta", "epsilon"]
    ids = tokenize_stream(tiny_tokenizer, texts)
    assert tiny_tokenizer.decode(ids.tolist()) == "alpha beta\n\ngamma delta\n\nepsilon"
    windows = make_windows(torch.arange(10), 4)
    assert windows.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert make_windows(torch.arange(10), 4, max_tokens=5).shape == (1, 4)
    assert len(tokenize_stream(tiny_tokenizer, texts * 50, max_tokens=7)) == 7

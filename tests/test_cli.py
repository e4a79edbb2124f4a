"""The command line: bad input is one line on stderr with exit code 2; --json has the documented keys."""

from __future__ import annotations

import json

import pytest

from minigpts.cli import main


def run_cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def tiny_model_dir(tmp_path, tiny_tokenizer, tiny_llama):
    path = tmp_path / "tiny"
    tiny_llama.save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def corpus_file(tmp_path):
    path = tmp_path / "corpus.jsonl"
    docs = [f"Supply and demand, lesson {i}: prices move with scarcity." for i in range(30)]
    path.write_text("".join(json.dumps({"text": d, "topic": "econ"}) + "\n" for d in docs))
    return path


def test_eval_writes_json_with_documented_keys(capsys, tmp_path, tiny_model_dir, corpus_file):
    out_json = tmp_path / "r.json"
    args = [
        "eval",
        "--model",
        str(tiny_model_dir),
        "--data",
        str(corpus_file),
        "--device",
        "cpu",
        "--seq-len",
        "32",
    ]
    code, out, err = run_cli(capsys, *args, "--json", str(out_json))
    assert code == 0, err
    result = json.loads(out_json.read_text())
    for key in ["params", "params_non_embedding", "size_bytes", "perplexity", "bits_per_byte", "eval_tokens"]:
        assert key in result
    assert result["split"] == "test" and result["seq_len"] == 32 and result["model"] == str(tiny_model_dir)
    assert "bits/byte" in out and "protocol" in out
    code, _, err = run_cli(capsys, *args, "--json", str(out_json))
    assert code == 2 and "--force" in err


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"--data": "/does/not/exist.jsonl"}, "no such file"),
        ({"--text-field": "body"}, "available fields: text, topic"),
        ({"--split": "banana"}, "unknown split"),
        ({"--seq-len": "0"}, "--seq-len 0"),
        ({"--max-eval-tokens": "-5"}, "--max-eval-tokens -5"),
        ({"--model": "/no/such/model"}, "no such file or directory"),
    ],
)
def test_bad_input_is_one_line_and_exit_code_2(capsys, tiny_model_dir, corpus_file, overrides, message):
    options = {
        "--model": str(tiny_model_dir),
        "--data": str(corpus_file),
        "--device": "cpu",
        "--seq-len": "32",
    }
    options |= overrides
    code, _, err = run_cli(capsys, "eval", *[x for kv in options.items() for x in kv])
    assert code == 2
    assert message in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_undecodable_bytes_name_file_and_offset(capsys, tmp_path, tiny_model_dir):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"first doc\n\nsecond \xff doc\n\nthird doc\n\nfourth")
    code, _, err = run_cli(capsys, "eval", "--model", str(tiny_model_dir), "--data", str(bad))
    assert code == 2 and "bad.txt" in err and "offset 18" in err and "--encoding" in err


def test_split_too_small_says_how_much_there_is(capsys, tmp_path, tiny_model_dir):
    small = tmp_path / "s.test.jsonl"
    small.write_text(json.dumps({"text": "a"}) + "\n")
    code, _, err = run_cli(
        capsys, "eval", "--model", str(tiny_model_dir), "--data", str(small), "--seq-len", "32"
    )
    assert code == 2 and "has 1 token" in err


def test_debug_shows_the_traceback(tiny_model_dir):
    from minigpts.errors import UserError

    with pytest.raises(UserError):
        main(["--debug", "eval", "--model", str(tiny_model_dir), "--data", "/nope.jsonl"])

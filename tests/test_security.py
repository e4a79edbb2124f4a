"""What a model directory may run (#19): remote code only from minigpts' own unchanged modeling file or
with --trust-remote-code; safetensors only unless --allow-pickle; a broken directory is one line (#17)."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from conftest import make_tiny_llama
from test_surgery import random_plan

import minigpts
from minigpts.cli import main
from minigpts.errors import UserError
from minigpts.export import METADATA_FILE, MODELING_FILE, save_model
from minigpts.models import load_model, load_tokenizer, remote_code_decision
from minigpts.surgery import apply_plan

EVIL_SOURCE = """import pathlib

pathlib.Path({marker!r}).write_text("ran")

from transformers import LlamaForCausalLM


class EvilForCausalLM(LlamaForCausalLM):
    pass
"""


def run_cli(capsys, *argv):
    capsys.readouterr()  # drop what the fixtures printed (save_pretrained's progress bar)
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_refusal(code, err, *needles):
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith("minigpts: error:") and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err


@pytest.fixture
def corpus_file(tmp_path):
    path = tmp_path / "corpus.jsonl"
    docs = [f"Supply and demand, lesson {i}: prices move with scarcity." for i in range(30)]
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return path


@pytest.fixture
def plain_dir(tmp_path, tiny_tokenizer):
    path = tmp_path / "plain"
    make_tiny_llama(len(tiny_tokenizer)).save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def evil_dir(tmp_path, plain_dir):
    """A tiny model whose auto_map runs modeling_evil.py, which writes a marker file when imported;
    it carries a minigpts.json that records the file's (correct) hash, as an attacker could."""
    import shutil

    path = tmp_path / "evil"
    shutil.copytree(plain_dir, path)
    marker = tmp_path / "marker"
    source = EVIL_SOURCE.format(marker=str(marker))
    (path / "modeling_evil.py").write_text(source)
    config = json.loads((path / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    (path / "config.json").write_text(json.dumps(config))
    info = {
        "minigpts_version": minigpts.__version__,
        "code_sha256": {"modeling_evil.py": hashlib.sha256(source.encode()).hexdigest()},
    }
    (path / METADATA_FILE).write_text(json.dumps(info))
    return path, marker


@pytest.fixture
def per_layer_dir(tmp_path, tiny_tokenizer):
    """A genuine per-layer export (widths differ between layers) with its tokenizer."""
    model = make_tiny_llama(len(tiny_tokenizer))
    plan = random_plan(model, 0, hidden=False, depth=False, vary=True)
    plan.layers[0].mlp_keep = [0, 1]
    plan.layout = "per-layer"
    apply_plan(model, plan)
    assert model.config.is_heterogeneous
    return save_model(model, tiny_tokenizer, tmp_path / "per-layer", plan=plan), model


def entry_points(model, corpus, tmp_path):
    """Every command that loads --model, with the fewest options that reach the load."""
    common = ["--model", model, "--device", "cpu"]
    return {
        "eval": ["eval", *common, "--data", corpus, "--seq-len", "16"],
        "analyze": ["analyze", *common, "--data", corpus, "--out", tmp_path / "s.safetensors"],
        "prune": ["prune", *common, "--mlp-ratio", "0.5", "--out", tmp_path / "pruned"],
        "finetune": ["finetune", *common, "--data", corpus, "--max-steps", "1", "--out", tmp_path / "ft"],
        "run": ["run", *common, "--data", corpus, "--mlp-ratio", "0.5", "--out", tmp_path / "run"],
        "sweep": ["sweep", *common, "--data", corpus, "--target-params", "0.9", "--out", tmp_path / "sw"],
    }


@pytest.mark.parametrize("command", ["eval", "analyze", "prune", "finetune", "run", "sweep"])
def test_every_command_refuses_foreign_remote_code(capsys, tmp_path, evil_dir, corpus_file, command):
    path, marker = evil_dir
    argv = entry_points(path, corpus_file, tmp_path)[command]
    code, _, err = run_cli(capsys, *argv)
    assert_one_line_refusal(code, err, "modeling_evil.py", "--trust-remote-code", str(path))
    assert not marker.exists()


@pytest.mark.parametrize("content", ["", "{}", None])
def test_api_refuses_foreign_remote_code_whatever_minigpts_json_says(evil_dir, content):
    path, marker = evil_dir
    if content is None:
        (path / METADATA_FILE).unlink()
    else:
        (path / METADATA_FILE).write_text(content)
    for load in (minigpts.load, load_model, load_tokenizer):
        with pytest.raises(UserError, match="modeling_evil.py.*trust-remote-code"):
            load(str(path))
    assert not marker.exists()


def test_teacher_and_budget_tokenizer_follow_the_same_rule(
    capsys, tmp_path, evil_dir, plain_dir, corpus_file
):
    path, marker = evil_dir
    argv = ["finetune", "--model", plain_dir, "--data", corpus_file, "--device", "cpu"]
    argv += ["--method", "distill", "--teacher", path, "--max-steps", "1", "--out", tmp_path / "ft"]
    code, _, err = run_cli(capsys, *argv)
    assert_one_line_refusal(code, err, "--teacher", "modeling_evil.py", "--trust-remote-code")
    argv = ["eval", "--model", plain_dir, "--data", corpus_file, "--device", "cpu", "--seq-len", "16"]
    code, _, err = run_cli(capsys, *argv, "--max-eval-tokens", "32", "--budget-tokenizer", path)
    assert_one_line_refusal(code, err, "--budget-tokenizer", "modeling_evil.py")
    assert not marker.exists()


def test_foreign_remote_code_runs_with_the_explicit_flag(capsys, tmp_path, evil_dir, corpus_file):
    path, marker = evil_dir
    code, _, err = run_cli(capsys, *entry_points(path, corpus_file, tmp_path)["eval"], "--trust-remote-code")
    assert code == 0, err
    assert marker.exists()
    marker.unlink()
    model, _ = minigpts.load(path, trust_remote_code=True)
    assert type(model).__name__ == "EvilForCausalLM"


def test_hub_ids_pass_the_flag_through():
    assert remote_code_decision(None, False) is False
    assert remote_code_decision(None, True) is True


def test_genuine_per_layer_export_loads_without_a_flag(capsys, tmp_path, per_layer_dir, corpus_file):
    path, model = per_layer_dir
    info = json.loads((path / METADATA_FILE).read_text())
    code = (path / MODELING_FILE).read_bytes()
    assert info["code_sha256"] == {MODELING_FILE: hashlib.sha256(code).hexdigest()}
    card = (path / "README.md").read_text()
    assert MODELING_FILE in card and "sha256" in card and "trust_remote_code=True" in card
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    expected = model(ids).logits
    loaded, tokenizer = minigpts.load(path)
    assert tokenizer is not None and torch.allclose(loaded(ids).logits, expected, atol=1e-6)
    assert torch.allclose(load_model(str(path), device="cpu").model(ids).logits, expected, atol=1e-6)
    code, _, err = run_cli(capsys, *entry_points(path, corpus_file, tmp_path)["eval"])
    assert code == 0, err


def test_changed_modeling_file_is_refused(capsys, tmp_path, per_layer_dir, corpus_file):
    path, _ = per_layer_dir
    modeling = path / MODELING_FILE
    data = bytearray(modeling.read_bytes())
    index = data.index(b"Every decoder layer")
    data[index] = ord("e")  # one byte, still valid Python
    modeling.write_bytes(bytes(data))
    with pytest.raises(UserError, match="changed after export"):
        minigpts.load(path)
    with pytest.raises(UserError, match="changed after export"):
        load_model(str(path), device="cpu")
    code, _, err = run_cli(capsys, *entry_points(path, corpus_file, tmp_path)["eval"])
    assert_one_line_refusal(code, err, MODELING_FILE, "changed after export", "--trust-remote-code")
    # recording the new hash does not help: the file is not what minigpts writes for this config
    info = json.loads((path / METADATA_FILE).read_text())
    info["code_sha256"][MODELING_FILE] = hashlib.sha256(bytes(data)).hexdigest()
    (path / METADATA_FILE).write_text(json.dumps(info))
    with pytest.raises(UserError, match="differs from the file minigpts"):
        minigpts.load(path)
    minigpts.load(path, trust_remote_code=True)  # the user's explicit choice


def test_recorded_version_cannot_inject_code(per_layer_dir):
    path, _ = per_layer_dir
    info = json.loads((path / METADATA_FILE).read_text())
    info["minigpts_version"] = '0.1.0"""\nimport os\n"""'
    (path / METADATA_FILE).write_text(json.dumps(info))
    with pytest.raises(UserError, match="no valid minigpts version"):
        minigpts.load(path)


def test_tokenizer_auto_map_is_never_ours(per_layer_dir):
    path, _ = per_layer_dir
    config = json.loads((path / "tokenizer_config.json").read_text())
    config["auto_map"] = {"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]}
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="tokenization_evil.py"):
        minigpts.load(path)


def test_pickle_weights_need_allow_pickle(capsys, tmp_path, tiny_tokenizer, corpus_file):
    model = make_tiny_llama(len(tiny_tokenizer))
    path = tmp_path / "pickled"
    model.config.save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    torch.save(model.state_dict(), path / "pytorch_model.bin")
    for load in (minigpts.load, load_model):
        with pytest.raises(UserError, match="pytorch_model.bin.*--allow-pickle"):
            load(str(path))
    code, _, err = run_cli(capsys, *entry_points(path, corpus_file, tmp_path)["eval"])
    assert_one_line_refusal(code, err, "pytorch_model.bin", "--allow-pickle")
    ids = torch.tensor([[1, 2, 3]])
    loaded = load_model(str(path), device="cpu", allow_pickle=True).model
    assert torch.allclose(loaded(ids).logits, model(ids).logits, atol=1e-6)
    code, _, err = run_cli(capsys, *entry_points(path, corpus_file, tmp_path)["eval"], "--allow-pickle")
    assert code == 0, err


@pytest.mark.parametrize("damage", ["truncated", "missing"])
def test_corrupt_model_directory_is_one_line(capsys, tmp_path, plain_dir, corpus_file, damage):
    weights = plain_dir / "model.safetensors"
    if damage == "truncated":
        weights.write_bytes(weights.read_bytes()[:100])
        needle = "cannot load its weights"
    else:
        weights.unlink()
        needle = "no weights file"
    code, _, err = run_cli(capsys, *entry_points(plain_dir, corpus_file, tmp_path)["eval"])
    assert_one_line_refusal(code, err, str(plain_dir), needle)
    with pytest.raises(UserError, match=needle):
        minigpts.load(plain_dir)

"""Every family end to end through the command line, on a tiny random model saved to disk.

`minigpts run`: analysis -> plan -> prune -> refit -> one LoRA recovery step -> evaluation -> save,
then the saved directory is loaded back (minigpts.load: remote code only when it is minigpts' own
unchanged file) and generates. Where a family cannot prune a group, the command refuses a request
for it with the adapter's one-sentence reason. The invariants themselves are test_conformance's.
"""

from __future__ import annotations

import json

import pytest
from conftest import TINY_CONFIGS, make_tiny_model

import minigpts
from minigpts.arch import SUPPORTED_FAMILIES, get_adapter
from minigpts.cli import main

# one variant per model type, the per-layer layout (remote code) on every other one
RUNS = {
    "llama": "uniform",
    "qwen3": "per-layer",
    "phi": "per-layer",
    "opt": "uniform",
    "phi3": "per-layer",
    "gemma2": "uniform",
    "gemma3_text": "per-layer",
    "gpt_neox": "uniform",
    "stablelm-parallel-qk-norm": "per-layer",
    "gpt2": "per-layer",
}

SMALL = [
    "--device", "cpu", "--data", "sample", "--seq-len", "32", "--max-eval-tokens", "128",
    "--calib-tokens", "256", "--fisher-tokens", "64",
    "--finetune", "lora", "--max-steps", "1", "--finetune-seq-len", "32", "--max-val-tokens", "64",
]  # fmt: skip


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def saved_model(name: str, tokenizer, tmp_path):
    path = tmp_path / name
    make_tiny_model(name, len(tokenizer), max_position_embeddings=256).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_every_family_runs_end_to_end_here():
    assert {get_adapter(config_of(name)).family for name in RUNS} == set(SUPPORTED_FAMILIES)


@pytest.mark.parametrize("name", list(RUNS))
def test_run_prunes_recovers_saves_and_reloads(capsys, tmp_path, tiny_tokenizer, name):
    model_dir = saved_model(name, tiny_tokenizer, tmp_path)
    model = make_tiny_model(name, len(tiny_tokenizer))
    adapter = get_adapter(model)
    flags = ["--mlp-ratio", "0.25"]
    if adapter.head_pruning_problem(model.config) is None:
        flags += ["--head-ratio", "0.34"]
    if adapter.hidden_pruning_problem(model.config) is None:
        flags += ["--hidden-ratio", "0.25"]
    out = tmp_path / "run"
    code, _, err = run_cli(
        capsys, "run", "--model", model_dir, *SMALL, *flags, "--layout", RUNS[name], "--out", out
    )
    assert code == 0, err
    stages = json.loads((out / "report.json").read_text())["stages"]
    assert stages["finetuned"]["finetune"]["steps"] == 1
    assert stages["pruned"]["params"] < stages["base"]["params"]
    assert stages["finetuned"]["params"] == stages["pruned"]["params"]
    reloaded, tokenizer = minigpts.load(out)
    assert (
        sum(p.numel() for p in {id(p): p for p in reloaded.parameters()}.values())
        == stages["finetuned"]["params"]
    )
    assert reloaded.config.is_heterogeneous == (RUNS[name] == "per-layer")
    prompt = tokenizer("Supply and demand", return_tensors="pt").input_ids
    generated = reloaded.generate(prompt, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert generated.shape[1] == prompt.shape[1] + 4


def config_of(name: str):
    from transformers import AutoConfig

    model_type, fields = TINY_CONFIGS[name]
    return AutoConfig.for_model(model_type, **fields)


def problem_of(name: str, group: str) -> str | None:
    """The adapter's reason why `group` ("heads" or "hidden") cannot be pruned in `name`, or None."""
    config = config_of(name)
    adapter = get_adapter(config)
    return (
        adapter.head_pruning_problem(config) if group == "heads" else adapter.hidden_pruning_problem(config)
    )


REFUSED = [(name, group) for name in TINY_CONFIGS for group in ("heads", "hidden") if problem_of(name, group)]


@pytest.mark.parametrize("name, group", REFUSED)
def test_run_says_why_a_group_cannot_be_pruned(capsys, tmp_path, tiny_tokenizer, name, group):
    problem = problem_of(name, group)
    flag = "--head-ratio" if group == "heads" else "--hidden-ratio"
    code, _, err = run_cli(
        capsys, "run", "--model", saved_model(name, tiny_tokenizer, tmp_path), "--data", "sample",
        "--device", "cpu", "--seq-len", "32", "--calib-tokens", "64", "--no-moments", flag, "0.25", "--dry-run",
    )  # fmt: skip
    assert code == 2
    assert problem in err and len(problem.split(". ")) == 1  # one sentence

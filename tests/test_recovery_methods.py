"""Recovery methods live in one registry: a method registered from outside minigpts (here, one that
trains only the normalisation weights) runs through ``minigpts finetune --method`` like the built-ins."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from minigpts.cli import build_parser, main
from minigpts.errors import UserError
from minigpts.recovery import (
    RecoveryMethod,
    get_recovery_method,
    recovery_method_names,
    register_recovery_method,
    unregister_recovery_method,
)


class NormsOnly(RecoveryMethod):
    name = "toy"
    help = "trains only the normalisation weights"

    def wrap(self, model, ctx):
        self.wrapped = True
        for name, param in model.named_parameters():
            param.requires_grad_("norm" in name)
        return model

    def unwrap(self, model, ctx):
        for param in model.parameters():
            param.requires_grad_(True)
        return model


@pytest.fixture
def toy():
    method = NormsOnly()
    register_recovery_method(method)
    yield method
    unregister_recovery_method("toy")


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_the_built_ins_are_registered_and_unknown_names_are_user_errors():
    assert recovery_method_names()[:3] == ["full", "lora", "distill"]
    assert get_recovery_method("distill").needs_teacher and not get_recovery_method("full").needs_teacher
    assert get_recovery_method("lora").requires == ("peft",)
    with pytest.raises(UserError, match="--finetune banana: use one of full, lora, distill"):
        get_recovery_method("banana", "--finetune")
    with pytest.raises(ValueError, match="already registered"):
        register_recovery_method(type(get_recovery_method("full"))())
    with pytest.raises(ValueError, match="not 'none'"):

        class Nothing(RecoveryMethod):
            name = "none"

        register_recovery_method(Nothing)


def test_a_method_registered_outside_minigpts_runs_through_the_command_line(
    toy, tmp_path, tiny_tokenizer, tiny_llama, capsys
):
    model_dir = tmp_path / "tiny"
    tiny_llama.save_pretrained(model_dir)
    tiny_tokenizer.save_pretrained(model_dir)
    corpus = tmp_path / "corpus.jsonl"
    docs = [
        f"Supply and demand, lesson {i}: prices move with scarcity and opportunity cost." * 3
        for i in range(40)
    ]
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    parser = build_parser()
    method_action = next(a for sub in parser._subparsers._group_actions for a in sub.choices["finetune"]._actions
                         if a.dest == "method")  # fmt: skip
    assert "toy" in method_action.choices and "trains only the normalisation weights" in method_action.help

    out = tmp_path / "tuned"
    argv = [
        "finetune",
        "--model",
        str(model_dir),
        "--data",
        str(corpus),
        "--device",
        "cpu",
        "--method",
        "toy",
    ]
    argv += ["--max-steps", "3", "--finetune-seq-len", "32", "--lr", "1e-2", "--out", str(out)]
    code = main(argv)
    stdout, err = capsys.readouterr()
    assert code == 0, err
    assert "fine-tuned (toy, 3 steps" in stdout and toy.wrapped

    before = dict(AutoModelForCausalLM.from_pretrained(model_dir).named_parameters())
    after = dict(AutoModelForCausalLM.from_pretrained(out).named_parameters())
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed and all("norm" in name for name in changed)
    assert json.loads((out / "minigpts.json").read_text())["metadata"]["finetune"]["method"] == "toy"


def test_run_refuses_an_unknown_method_before_loading_anything(capsys):
    code = main(["run", "--data", "sample", "--finetune", "banana", "--out", "never-written"])
    _, err = capsys.readouterr()
    assert code == 2 and "--finetune banana: use none, full, lora, distill" in err

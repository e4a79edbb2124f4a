"""Recovery methods: one class per way of recovering a pruned model, registered in one place.

A method says what it needs (``needs_teacher``: the unpruned model; ``requires``: Python packages),
does its one-off work before training (``prepare``: distillation caches the teacher's predictions),
wraps the model for training (``wrap``: LoRA adds adapters), builds the ``Trainer`` (``make_trainer``:
distillation swaps the loss) and unwraps the trained model before it is returned and saved
(``unwrap``: LoRA merges the adapters into plain weights). ``finetune`` calls these hooks in that
order and knows no method by name; the command line takes its ``--method``/``--finetune`` choices
from ``recovery_method_names()``.

Adding a method::

    from minigpts.recovery import RecoveryMethod, register_recovery_method

    class NormsOnly(RecoveryMethod):
        name = "norms"
        help = "train only the normalisation weights"

        def wrap(self, model, ctx):
            for param_name, param in model.named_parameters():
                param.requires_grad_("norm" in param_name)
            return model

        def unwrap(self, model, ctx):
            for param in model.parameters():
                param.requires_grad_(True)
            return model

    register_recovery_method(NormsOnly())  # before minigpts.cli.main() builds its parser

This module imports neither torch nor transformers at import time, so the command line's ``--help``
stays fast; the heavy parts load when a method runs.
"""

from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from minigpts.errors import UserError
from minigpts.options import FinetuneOptions, flag_of

_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]*$")
_REGISTRY: dict[str, RecoveryMethod] = {}


@dataclass
class RecoveryContext:
    """What ``finetune`` knows about one run, handed to every hook of its method."""

    method: str
    out_dir: Path  # the run's scratch directory (checkpoints live in out_dir/checkpoints)
    device: Any  # torch.device training runs on
    seed: int
    batch_size: int
    train_windows: Any  # LongTensor [N, L]: every training window (student token ids)
    used_windows: Any  # LongTensor: sorted indices of the windows this run's step budget reaches
    student_vocab_size: int
    teacher: Any = None  # the unpruned model, or None
    teacher_vocab_keep: Any = None  # LongTensor: the teacher id of each student id, or None (same vocabulary)
    options: dict = field(default_factory=dict)  # method options (lora_r, distill_alpha, …, method_options)
    progress: bool = True
    state: dict = field(default_factory=dict)  # scratch space shared by the hooks of one run
    stats: dict = field(default_factory=dict)  # what the method reports (FinetuneResult.method_stats)


class RecoveryMethod:
    """One way to recover a pruned model. Subclass, set ``name`` and ``help``, override what differs.

    Hooks run in this order: ``check`` → ``prepare`` → ``wrap`` → ``make_trainer`` → (training)
    → ``unwrap``; ``finish`` always runs last, also after an error.
    """

    name: str = ""
    help: str = ""
    needs_teacher: bool = False  # the command line loads the unpruned model and passes it as ``teacher``
    requires: tuple[str, ...] = ()  # importable Python packages this method needs

    def check(self, ctx: RecoveryContext) -> None:
        """Refuse, with a UserError naming the flag, a run this method cannot do."""
        if self.needs_teacher and ctx.teacher is None:
            raise UserError(
                f"--method {self.name} needs a teacher (--teacher, or the unpruned model recorded in "
                "minigpts.json)"
            )
        for package in self.requires:
            if importlib.util.find_spec(package) is None:
                raise UserError(
                    f"--method {self.name} needs the Python package {package} (pip install {package})"
                )

    def prepare(self, ctx: RecoveryContext) -> None:
        """One-off work before training (counted in the run's clock)."""

    def wrap(self, model, ctx: RecoveryContext):
        """The module the Trainer trains (``model`` itself, or a wrapper around it)."""
        return model

    def make_trainer(self, ctx: RecoveryContext, **trainer_kwargs):
        """The Trainer; ``trainer_kwargs`` are ``transformers.Trainer``'s (model, args, datasets, …).

        Subclass ``minigpts.recovery.RecoveryTrainer``, not ``transformers.Trainer``: it feeds the
        windows in the run's fixed order and drops the ``window_index`` each batch carries.
        """
        from minigpts.recovery.trainer import RecoveryTrainer

        return RecoveryTrainer(**trainer_kwargs)

    def unwrap(self, model, ctx: RecoveryContext):
        """A plain transformers model from the trained module (what is returned and saved)."""
        return model

    def finish(self, ctx: RecoveryContext) -> None:
        """Undo what ``prepare`` changed outside the model (always called)."""


def vocab_size_of(model) -> int:
    """Tokens the model predicts: its LM head's rows (the config's vocab_size without a linear head)."""
    head = model.get_output_embeddings()
    return int(getattr(head, "out_features", None) or model.config.vocab_size)


def register_recovery_method(method, *, replace: bool = False):
    """Make ``method`` (an instance or a class with a no-argument constructor) available by its name.

    Returns its argument, so it also works as a class decorator. The command line reads the registry
    when its parser is built: register before calling ``minigpts.cli.main``.
    """
    instance = method() if isinstance(method, type) else method
    name = instance.name
    if not isinstance(name, str) or not _NAME.match(name) or name == "none":
        raise ValueError(
            f"recovery method name {name!r}: use lower-case letters, digits, '-' or '_' (not 'none')"
        )
    if name in _REGISTRY and not replace:
        raise ValueError(f"recovery method {name!r} is already registered; pass replace=True to replace it")
    _REGISTRY[name] = instance
    return method


def unregister_recovery_method(name: str) -> None:
    _REGISTRY.pop(name, None)


def recovery_method_names() -> list[str]:
    """Registered method names, in registration order (the built-ins first)."""
    return list(_REGISTRY)


def get_recovery_method(name, flag: str | None = None) -> RecoveryMethod:
    if isinstance(name, RecoveryMethod):
        return name
    if name not in _REGISTRY:
        flag = flag or flag_of(FinetuneOptions, "method")
        raise UserError(f"{flag} {name}: use one of {', '.join(_REGISTRY)}")
    return _REGISTRY[name]


def recovery_method_help(with_none: str | None = None) -> str:
    """One line per method for --help: ``none`` (when given its meaning) then every registered method."""
    parts = [f"none: {with_none}"] if with_none else []
    parts += [f"{name}: {method.help}" for name, method in _REGISTRY.items()]
    return "; ".join(parts)


# --------------------------------------------------------------------------------------------------
# The built-in methods


class FullFinetune(RecoveryMethod):
    name = "full"
    help = "every weight trained on the next-token loss"


def lora_target_modules(model) -> str:
    """A peft regex naming every ``nn.Linear`` inside the decoder layers, found without per-family names.

    The decoder layers are the longest ``nn.ModuleList`` whose blocks hold linear layers (Llama's
    ``model.layers``, OPT's ``model.decoder.layers``, Phi's ``model.layers``); the LM head stays frozen.
    """
    from torch import nn

    from minigpts.arch import get_adapter

    try:  # the family's projection classes: GPT-2's are transformers' Conv1D, which peft adapts too
        projections = get_adapter(model).projection_types
    except UserError:
        projections = (nn.Linear,)
    best_name, best_list = None, None
    for name, module in model.named_modules():
        longer = isinstance(module, nn.ModuleList) and (best_list is None or len(module) > len(best_list))
        if longer and any(isinstance(m, projections) for m in module.modules()):
            best_name, best_list = name, module
    if best_list is None:
        raise UserError("--method lora: found no decoder layers with linear projections in this model")
    names = sorted(
        {sub for layer in best_list for sub, m in layer.named_modules() if isinstance(m, projections)}
    )
    return rf"{re.escape(best_name)}\.\d+\.({'|'.join(re.escape(n) for n in names)})"


def add_lora(model, r: int = 16, alpha: int = 32):
    """Wrap ``model`` in peft LoRA adapters on every decoder-layer projection (base weights frozen)."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=0.0,
        target_modules=lora_target_modules(model),
        bias="none",
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def merge_lora(peft_model):
    """Fold the adapters into the base weights: a plain transformers model that saves and loads anywhere."""
    return peft_model.merge_and_unload()


class LoraFinetune(RecoveryMethod):
    name = "lora"
    help = "LoRA adapters (peft) on every decoder projection, merged back into plain weights"
    requires = ("peft",)

    def check(self, ctx: RecoveryContext) -> None:
        super().check(ctx)
        for option in ("lora_r", "lora_alpha"):
            if ctx.options[option] < 1:
                raise UserError(f"--{option.replace('_', '-')} {ctx.options[option]}: must be at least 1")

    def wrap(self, model, ctx: RecoveryContext):
        return add_lora(model, ctx.options["lora_r"], ctx.options["lora_alpha"])

    def unwrap(self, model, ctx: RecoveryContext):
        return merge_lora(model)


class Distill(RecoveryMethod):
    name = "distill"
    help = (
        "next-token loss mixed (--distill-alpha, --distill-temperature) with KL to the unpruned model's "
        "top-k predictions, computed once per training window and cached on disk (--teacher-cache)"
    )
    needs_teacher = True

    def check(self, ctx: RecoveryContext) -> None:
        super().check(ctx)
        from minigpts.recovery.distill import check_distill_options

        check_distill_options(ctx)

    def prepare(self, ctx: RecoveryContext) -> None:
        from minigpts.recovery.distill import prepare_teacher_targets

        prepare_teacher_targets(ctx)

    def make_trainer(self, ctx: RecoveryContext, **trainer_kwargs):
        from minigpts.recovery.distill import DistillTrainer

        return DistillTrainer(
            **trainer_kwargs,
            targets=ctx.state["teacher_targets"],
            student_of_teacher=ctx.state["student_of_teacher"],
            teacher_vocab_size=ctx.state["teacher_vocab_size"],
            alpha=ctx.options["distill_alpha"],
            temperature=ctx.options["distill_temperature"],
        )


for _method in (FullFinetune(), LoraFinetune(), Distill()):
    register_recovery_method(_method)

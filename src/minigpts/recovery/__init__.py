"""Recovery fine-tuning: ``finetune`` and the registry of recovery methods (full, lora, distill, …).

The registry (``methods``) loads without torch or transformers; the rest loads on first use.
``budget`` holds the budget rules, ``distill`` the teacher cache and the sparse distillation loss,
``trainer`` the ``finetune`` loop.
"""

from __future__ import annotations

import importlib

from minigpts.recovery.methods import (
    Distill,
    FullFinetune,
    LoraFinetune,
    RecoveryContext,
    RecoveryMethod,
    add_lora,
    get_recovery_method,
    lora_target_modules,
    merge_lora,
    recovery_method_help,
    recovery_method_names,
    register_recovery_method,
    unregister_recovery_method,
)

_LAZY = {
    "finetune": "trainer",
    "FinetuneResult": "trainer",
    "RecoveryTrainer": "trainer",
    "window_order": "trainer",
    "RUN_STATE_FILE": "trainer",
    "BudgetPlan": "budget",
    "BudgetTracker": "budget",
    "Clock": "budget",
    "VALIDATION_SHARE": "budget",
    "plan_budget": "budget",
    "DistillTrainer": "distill",
    "TeacherCache": "distill",
    "TeacherTargets": "distill",
    "distillation_loss": "distill",
    "sparse_distillation_loss": "distill",
    "teacher_fingerprint": "distill",
}

__all__ = [
    "Distill",
    "FullFinetune",
    "LoraFinetune",
    "RecoveryContext",
    "RecoveryMethod",
    "add_lora",
    "get_recovery_method",
    "lora_target_modules",
    "merge_lora",
    "recovery_method_help",
    "recovery_method_names",
    "register_recovery_method",
    "unregister_recovery_method",
    *_LAZY,
]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f"minigpts.recovery.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'minigpts.recovery' has no attribute {name!r}")

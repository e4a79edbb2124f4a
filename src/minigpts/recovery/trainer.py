"""Recovery fine-tuning of a pruned model on packed domain windows, built on transformers' ``Trainer``.

``Trainer`` brings multi-GPU, bf16 autocast, checkpointing and resuming; this module adds what it has
no knob for: budgets that give the same run on any machine (``budget``), the paper's stop rule
(validation perplexity at or below a target), early stopping on validation loss, one progress bar
with validation bits-per-byte, and the recovery methods of ``methods`` (full, LoRA merged back into
plain weights, distillation from cached teacher predictions, or any registered one).

Protocol: every row of ``train_windows``/``val_windows`` is one packed token window; labels are the
inputs (the model shifts them), so the first token of each window is never scored. The training
windows are fed in a fixed seeded order — one permutation per epoch, drawn from ``seed`` — so a run of
S steps sees the first S·batch·accumulation·devices windows of that stream, whatever its other
budgets. Validation loss is the mean next-token NLL in nats over the scored tokens; perplexity =
exp(loss); bits-per-byte = loss * scored tokens / ln 2 / UTF-8 bytes of the scored tokens.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace

import torch
from transformers import (
    PrinterCallback,
    SchedulerType,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    default_data_collator,
)
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint
from transformers.utils import logging as hf_logging

from minigpts import distributed
from minigpts.errors import UserError
from minigpts.options import MIXED_PRECISION, FinetuneOptions, flag_of
from minigpts.recovery.budget import BudgetPlan, BudgetTracker, Clock, ProgressBar, plan_budget
from minigpts.recovery.methods import RecoveryContext, get_recovery_method, vocab_size_of

_DEFAULTS = FinetuneOptions()  # the command line's defaults are the Python API's too
RUN_STATE_FILE = "minigpts_finetune.json"  # written into every checkpoint: what Trainer's state lacks


@dataclass
class FinetuneResult:
    """What a recovery run did and why it stopped; ``val_history`` rows are (step, loss, ppl, bpb)."""

    method: str
    epochs: float  # training windows seen / training windows available
    steps: int
    train_tokens: int
    seconds: float  # the stage's wall clock (teacher pass, training, validation, checkpoints), over resumes
    stopped_because: str  # max_steps | max_train_tokens | epochs | max_minutes | stop_at_ppl | early_stopping
    max_steps: int  # the planned steps: the step horizon of the schedule (the smallest of the step budgets)
    val_history: list[tuple[int, float, float, float | None]] = field(default_factory=list)
    best_val_loss: float | None = None
    final_val_loss: float | None = None  # the last evaluation (with early stopping the best one is returned)
    train_loss: float | None = None  # mean training loss over the last logging interval
    resumed_from_step: int | None = None
    eval_every: int | None = None  # steps between evaluations
    val_tokens: int | None = None  # scored tokens per evaluation
    validation_seconds: float | None = None  # this call's evaluations (+ checkpoint saves)
    notes: list[str] = field(default_factory=list)
    method_stats: dict = field(default_factory=dict)  # what the method reports (distill: teacher cache use)
    bf16_autocast: bool = False  # trained (and the teacher pass run) under bf16 autocast

    def to_dict(self) -> dict:
        return asdict(self)


class _WindowDataset(torch.utils.data.Dataset):
    """Packed windows as causal-LM examples: the model shifts the labels itself."""

    def __init__(self, windows: torch.Tensor):
        self.windows = windows

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, index: int) -> dict:
        row = self.windows[index]
        return {"input_ids": row, "labels": row}


class _StreamDataset(torch.utils.data.Dataset):
    """The run's training stream: ``windows[order[i]]``, with the window's index (for cached targets)."""

    def __init__(self, windows: torch.Tensor, order: torch.Tensor):
        self.windows = windows
        self.order = order

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, index: int) -> dict:
        window = int(self.order[index])
        row = self.windows[window]
        return {"input_ids": row, "labels": row, "window_index": torch.tensor(window)}


def window_order(n_windows: int, count: int, seed: int) -> torch.LongTensor:
    """The first ``count`` windows of the seeded stream: a fresh permutation of the windows per epoch.

    A prefix of a longer run's stream, so raising a budget (or resuming) keeps the windows already seen.
    """
    generator = torch.Generator().manual_seed(seed)
    parts, have = [], 0
    while have < count:
        parts.append(torch.randperm(n_windows, generator=generator))
        have += n_windows
    return torch.cat(parts)[:count] if parts else torch.zeros(0, dtype=torch.long)


class RecoveryTrainer(Trainer):
    """Trainer on the run's fixed window stream; every recovery method's trainer derives from it."""

    def _get_train_sampler(self, train_dataset=None):
        return torch.utils.data.SequentialSampler(
            train_dataset if train_dataset is not None else self.train_dataset
        )

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = {key: value for key, value in inputs.items() if key != "window_index"}
        return super().compute_loss(
            model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
        )


@dataclass
class _ValScale:
    """Turns mean validation loss into bits-per-byte (None without byte lengths)."""

    scored_tokens: int
    scored_bytes: int | None

    @classmethod
    def of(cls, windows: torch.Tensor, byte_lengths) -> _ValScale:
        """The scale of these validation windows: their first tokens are never scored."""
        return cls(
            scored_tokens=windows[:, 1:].numel(),
            scored_bytes=None if byte_lengths is None else int(byte_lengths[windows[:, 1:]].sum()),
        )

    def ppl_at_bpb(self, bpb: float) -> float:
        """The perplexity of ``bpb`` on these windows, so a bits-per-byte target is a perplexity one."""
        # bpb ≤ target  ⇔  mean NLL ≤ target·ln2·bytes/tokens on these windows
        return math.exp(bpb * math.log(2) * self.scored_bytes / self.scored_tokens)

    def bpb(self, loss: float) -> float | None:
        if not self.scored_bytes:
            return None
        return loss * self.scored_tokens / math.log(2) / self.scored_bytes

    def format(self, loss: float) -> str:
        bpb = self.bpb(loss)
        return f"val bpb {bpb:.4f}" if bpb is not None else f"val loss {loss:.4f}"


class _RunGuard(TrainerCallback):
    """Stops the run on the validation rules and records what a resume needs."""

    def __init__(self, clock, tracker, stop_at_ppl, patience, initial_eval):
        self.clock = clock
        self.tracker = tracker
        self.stop_at_ppl = stop_at_ppl
        self.patience = patience
        self.initial_eval = initial_eval  # (step 0, loss) of the model before any update, or None
        self.reason: str | None = None

    def _stop(self, control, reason: str) -> None:
        self.reason = self.reason or reason
        control.should_training_stop = True
        control.should_save = True  # a stopped run can always be resumed with a larger budget

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        loss = metrics["eval_loss"]
        if self.stop_at_ppl is not None and _ppl(loss) <= self.stop_at_ppl:
            self._stop(control, "stop_at_ppl")
        if self.patience is not None:
            losses = [entry["eval_loss"] for entry in state.log_history if "eval_loss" in entry]
            if self.initial_eval is not None:
                losses.insert(0, self.initial_eval[1])
            best = min(range(len(losses)), key=losses.__getitem__)
            if len(losses) - 1 - best >= self.patience:
                self._stop(control, "early_stopping")
        return control

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
            if folder.is_dir():
                run_state = {
                    "seconds": self.clock.elapsed(),
                    "initial_eval": self.initial_eval,
                    "eval_seconds": self.tracker.predicted_eval() or None,
                }
                (folder / RUN_STATE_FILE).write_text(json.dumps(run_state))
                from minigpts.pipeline import interrupt_point

                # test hook: MINIGPTS_TEST_INTERRUPT_AFTER=checkpoint-N sends SIGINT here
                interrupt_point(f"checkpoint-{state.global_step}")
        return control


def _unprepare_for_training(trainer) -> None:
    """Let ``train()`` wrap the model for data parallelism after an ``evaluate()`` prepared it.

    ``Trainer.evaluate`` before ``train`` prepares the model in accelerate's evaluation mode (no DDP
    wrapper) and marks it prepared, so ``train`` then skips the wrapping: every process would train
    alone on its share of the batch (measured: the processes' weights differ after one step). Undo
    the mark (and the autocast ``forward`` it installed) so ``train`` wraps it as without evaluation.
    """
    model = trainer.model
    if not getattr(model, "_is_accelerate_prepared", False):
        return
    _drop_autocast_forward(model)
    del model._is_accelerate_prepared
    trainer.accelerator._models = [m for m in trainer.accelerator._models if m is not model]
    trainer.model_wrapped = model


def _drop_autocast_forward(model) -> None:
    """Restore the ``forward`` that accelerate's autocast wrapper replaced, so later passes run in fp32."""
    if "_original_forward" in vars(model):
        model.forward = model._original_forward
        del model._original_forward


def use_bf16_autocast(mixed_precision: str, on_gpu: bool) -> bool:
    """Whether training runs under bf16 autocast (fp32 master weights either way).

    ``auto``: where bf16 is native — GPUs that support it, CPUs with AVX512-BF16 or AMX (matrix
    products ~2× faster there, 1.5× per SmolLM2-sized training step, the same bits/byte as fp32 in
    our measurements) — and fp32 elsewhere (a CPU that emulates bf16 is 4–8× slower in it);
    ``bf16``: everywhere; ``no``: fp32.
    """
    if mixed_precision not in MIXED_PRECISION:
        flag = flag_of(FinetuneOptions, "mixed_precision")
        raise UserError(f"{flag} {mixed_precision!r}: choose one of {', '.join(MIXED_PRECISION)}")
    if mixed_precision == "auto":
        return torch.cuda.is_bf16_supported() if on_gpu else cpu_has_native_bf16()
    return mixed_precision == "bf16"


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX: the CPUs where bf16 matrix products beat fp32 ones.

    ``MINIGPTS_CPU_BF16=0`` (or ``1``) overrides the detection: the test suite pins it to 0 so that
    its recorded numbers do not depend on the CPU model.
    """
    forced = os.environ.get("MINIGPTS_CPU_BF16")
    if forced in ("0", "1"):
        return forced == "1"
    cpu = torch.cpu
    return any(
        getattr(cpu, name, lambda: False)()
        for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    )


def slow_bf16_warning(mixed_precision: str, on_gpu: bool) -> str | None:
    """A one-line warning when bf16 autocast is asked for on a CPU that emulates it."""
    if mixed_precision != "bf16" or on_gpu or cpu_has_native_bf16():
        return None
    flag = flag_of(FinetuneOptions, "mixed_precision")
    return (
        f"warning: {flag} bf16 on a CPU without native bf16 (AVX512-BF16/AMX): bf16 matrix products are emulated "
        "there (measured on an AVX2 CPU: a SmolLM2 teacher pass at 82 tokens/s against 370 in fp32); "
        f"{flag} auto trains in fp32"
    )


def _ppl(loss: float) -> float:
    return math.exp(min(loss, 700.0))  # no OverflowError for a diverged run


@contextlib.contextmanager
def _without_transformers_bars():
    """Checkpoint saves draw their own tqdm bars; keep ours the only one."""
    were_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if were_on:
            hf_logging.enable_progress_bar()


def _check_windows(windows, flag: str) -> torch.Tensor:
    if not isinstance(windows, torch.Tensor) or windows.dim() != 2 or len(windows) == 0:
        raise UserError(
            f"{flag}: need at least one packed token window ([N, seq_len] ids); the split is too small"
        )
    return windows.long()


def _check_options(
    budgets, lr, warmup_ratio, scheduler, batch_size, grad_accum, max_minutes, eval_every
) -> None:
    for flag, value in budgets.items():
        if value <= 0:
            raise UserError(f"--{flag.replace('_', '-')} {value}: must be positive")
    if max_minutes is not None and max_minutes <= 0:
        raise UserError(f"--max-minutes {max_minutes}: must be positive")
    if eval_every is not None and eval_every < 1:
        raise UserError(f"--eval-every {eval_every}: must be at least 1")
    if lr <= 0:
        raise UserError(f"--lr {lr}: must be positive")
    if not 0 <= warmup_ratio < 1:
        raise UserError(f"--warmup-ratio {warmup_ratio}: must be in [0, 1)")
    if batch_size < 1:
        raise UserError(f"--train-batch-size {batch_size}: must be at least 1")
    if grad_accum < 1:
        raise UserError(f"--grad-accum {grad_accum}: must be at least 1")
    schedulers = [kind.value for kind in SchedulerType]
    # the command line offers options.LR_SCHEDULERS; finetune() takes any of transformers'
    if scheduler not in schedulers:
        raise UserError(f"--lr-scheduler {scheduler}: use one of {', '.join(schedulers)}")


def _resume_point(checkpoint_dir: Path, resume: bool) -> Path | None:
    last = get_last_checkpoint(str(checkpoint_dir)) if checkpoint_dir.is_dir() else None
    if resume and last is None:
        raise UserError(f"--resume: no checkpoint under {checkpoint_dir}; run without --resume to start")
    if not resume and last is not None:
        raise UserError(
            f"{checkpoint_dir} holds checkpoints of an earlier run: pass --resume to continue it, "
            "or delete that folder to start over"
        )
    return Path(last) if last else None


def _read_run_state(checkpoint: Path | None) -> dict:
    path = checkpoint / RUN_STATE_FILE if checkpoint else None
    state = {"seconds": 0.0, "initial_eval": None, "eval_seconds": None}
    if path is not None and path.is_file():
        state |= json.loads(path.read_text())
    return state


def finetune(
    model, tokenizer, train_windows, val_windows, *, out_dir, method="full", teacher=None,
    teacher_vocab_keep=None, max_epochs: float | None = None, max_steps: int | None = None,
    max_train_tokens: int | None = None, max_minutes: float | None = None, stop_at_ppl: float | None = None,
    stop_at_bpb: float | None = None, early_stopping_patience: int | None = None,
    eval_every: int | None = None, lr: float = _DEFAULTS.lr, warmup_ratio: float = _DEFAULTS.warmup_ratio,
    scheduler: str = _DEFAULTS.scheduler, batch_size: int = _DEFAULTS.batch_size, grad_accum: int = _DEFAULTS.grad_accum,
    seed: int = _DEFAULTS.seed, resume: bool = False, lora_r: int = _DEFAULTS.lora_r,
    lora_alpha: int = _DEFAULTS.lora_alpha, distill_alpha: float = _DEFAULTS.distill_alpha,
    distill_temperature: float = _DEFAULTS.distill_temperature, teacher_cache=None,
    teacher_top_k: int = _DEFAULTS.teacher_top_k, teacher_cache_dtype: str = "float16",
    method_options: dict | None = None, byte_lengths=None, progress: bool = True,
    mixed_precision: str = _DEFAULTS.mixed_precision,
):  # fmt: skip
    """Fine-tune ``model`` on packed windows with a registered recovery method; returns (model, result).

    Length (see ``minigpts.recovery.budget``): ``max_steps``, ``max_train_tokens`` (whole steps of
    batch_size·grad_accum·devices·seq_len tokens) and ``max_epochs`` (1 when no budget is given: a
    token or step budget is not cut short by a default epoch); the smallest is the planned
    number of steps and the horizon of the warm-up + ``scheduler`` decay. The clock never changes
    the schedule: ``max_minutes`` only caps the stage's wall clock (stopping before a step that would
    not fit). Validation runs before training, every ``eval_every`` steps (default: as often as keeps
    validation ≤ 10 % of the training tokens) and at the end; a checkpoint is saved at every
    evaluation. ``stop_at_ppl`` (or ``stop_at_bpb``, which needs ``byte_lengths``) is the paper's rule:
    stop once validation perplexity (bits-per-byte) is at or below it, checked before the first step
    too, so a model already there is not trained. ``early_stopping_patience``: evaluations without a
    new best validation loss; the best checkpoint is then loaded back.

    ``method`` is a registered name or ``RecoveryMethod``; its options are ``lora_r``/``lora_alpha``,
    ``distill_alpha``/``distill_temperature`` and ``teacher_cache`` (directory shared between runs;
    default ``out_dir/teacher-cache``) / ``teacher_top_k`` / ``teacher_cache_dtype``, plus anything
    in ``method_options``. ``teacher_vocab_keep`` gives the teacher id of each student id when the
    student's vocabulary was trimmed.

    Checkpoints go to ``out_dir/checkpoints`` (two kept); ``resume=True`` continues the last one.
    ``tokenizer`` is saved into every checkpoint, so each one is a loadable model directory (for LoRA:
    a peft adapter directory). The returned model is a plain transformers model (the method's
    ``unwrap``), in eval mode, on the device it came from, in its original dtype (float32 on a CPU).
    """
    call = SimpleNamespace(**locals())  # the arguments by name, for the steps below
    recovery, budgets, train_windows, val_windows = _checked_inputs(call)
    run, args, datasets = _plan_run(call, train_windows, val_windows, budgets)
    ctx = _recovery_context(call, recovery, args, datasets["train_dataset"])
    recovery.check(ctx)
    return _train(recovery, ctx, run, model, tokenizer, args, datasets)


def _checked_inputs(call: SimpleNamespace):
    """Refuse a bad call before anything is read or written: (method, step budgets, windows as int64).

    The budgets hold all three (None where not given), with one epoch when none is given.
    """
    recovery = get_recovery_method(call.method)
    max_epochs = call.max_epochs
    if max_epochs is None and call.max_steps is None and call.max_train_tokens is None:
        max_epochs = 1.0
    train_windows = _check_windows(call.train_windows, "--data (train split)")
    val_windows = _check_windows(call.val_windows, "--data (validation split)")
    budgets = {
        "max_steps": call.max_steps,
        "max_train_tokens": call.max_train_tokens,
        "max_epochs": max_epochs,
    }
    step_budgets = {name: value for name, value in budgets.items() if value is not None}
    _check_options(
        step_budgets, call.lr, call.warmup_ratio, call.scheduler, call.batch_size, call.grad_accum,
        call.max_minutes, call.eval_every,
    )  # fmt: skip
    if call.stop_at_bpb is not None and call.byte_lengths is None:
        raise UserError("finetune: stop_at_bpb needs byte_lengths (evaluation.token_byte_lengths(tokenizer))")
    return recovery, budgets, train_windows, val_windows


def _plan_run(call: SimpleNamespace, train_windows, val_windows, budgets: dict):
    """The run decided before its first step: (``_Run``, Trainer arguments, Trainer datasets).

    In this order: the resume point is checked and the stage's clock starts before the Trainer's
    arguments set up the devices, whose number the budget plan needs; the plan then sets the steps.
    """
    checkpoint_dir = Path(call.out_dir) / "checkpoints"
    resume_from = _resume_point(checkpoint_dir, call.resume)
    run_state = _read_run_state(resume_from)
    clock = Clock(run_state["seconds"])  # the stage's clock: teacher pass, training, validation
    bf16 = use_bf16_autocast(call.mixed_precision, torch.cuda.is_available())
    args = _training_arguments(
        checkpoint_dir, call.batch_size, call.grad_accum, call.lr, call.scheduler, call.warmup_ratio, call.seed,
        bf16, call.early_stopping_patience,
    )  # fmt: skip
    plan = plan_budget(
        n_train=len(train_windows), seq_len=train_windows.shape[1], n_val=len(val_windows),
        val_seq_len=val_windows.shape[1], batch_size=call.batch_size, grad_accum=call.grad_accum,
        world_size=args.world_size, eval_every=call.eval_every, **budgets,
    )  # fmt: skip
    val_windows = val_windows[: plan.val_windows]
    args.max_steps = plan.total_steps
    args.eval_steps = args.save_steps = plan.eval_every
    args.logging_steps = max(1, min(plan.eval_every, plan.total_steps // 100))
    order = window_order(len(train_windows), plan.total_steps * plan.windows_per_step, call.seed)
    resumed = _resumed_step(resume_from, plan.total_steps)
    scale = _ValScale.of(val_windows, call.byte_lengths)
    stop_at_ppl = call.stop_at_ppl if call.stop_at_bpb is None else scale.ppl_at_bpb(call.stop_at_bpb)
    run = _Run(
        plan, scale, clock, resume_from, resumed, run_state, stop_at_ppl, call.early_stopping_patience,
        None if call.max_minutes is None else call.max_minutes * 60, call.progress,
    )  # fmt: skip
    datasets = dict(
        train_dataset=_StreamDataset(train_windows, order), eval_dataset=_WindowDataset(val_windows)
    )
    return run, args, datasets


def _recovery_context(call: SimpleNamespace, recovery, args, stream: _StreamDataset):
    """What the method's hooks see of the run; ``method_options`` override the named options."""
    options = dict(
        lora_r=call.lora_r, lora_alpha=call.lora_alpha, distill_alpha=call.distill_alpha,
        distill_temperature=call.distill_temperature,
        teacher_cache=None if call.teacher_cache is None else Path(call.teacher_cache),
        teacher_top_k=call.teacher_top_k, teacher_cache_dtype=call.teacher_cache_dtype, bf16_autocast=args.bf16,
    ) | dict(call.method_options or {})  # fmt: skip
    keep = call.teacher_vocab_keep
    return RecoveryContext(
        method=recovery.name, out_dir=Path(call.out_dir), device=args.device, seed=call.seed,
        batch_size=call.batch_size, train_windows=stream.windows, used_windows=torch.unique(stream.order),
        student_vocab_size=vocab_size_of(call.model), teacher=call.teacher, options=options,
        progress=call.progress, teacher_vocab_keep=None if keep is None else torch.as_tensor(keep, dtype=torch.long),
    )  # fmt: skip


def _training_arguments(
    checkpoint_dir: Path, batch_size, grad_accum, lr, scheduler, warmup_ratio, seed, bf16, patience
) -> TrainingArguments:
    """The Trainer's arguments; the step settings are set once the budget plan is known."""
    on_gpu = torch.cuda.is_available()
    return TrainingArguments(
        output_dir=str(checkpoint_dir),
        per_device_train_batch_size=batch_size,
        per_device_eval_batch_size=batch_size,
        gradient_accumulation_steps=grad_accum,
        learning_rate=lr,
        lr_scheduler_type=scheduler,
        warmup_steps=warmup_ratio,  # a float in [0, 1) is a ratio of the total steps
        max_steps=1,  # the step settings are set by finetune, once the number of devices is known
        eval_strategy="steps",
        eval_steps=1,
        save_strategy="steps",
        save_steps=1,
        save_total_limit=2,
        logging_strategy="steps",
        logging_steps=1,
        prediction_loss_only=True,
        load_best_model_at_end=patience is not None,
        metric_for_best_model="loss",
        greater_is_better=False,
        seed=seed,
        data_seed=seed,
        bf16=bf16,
        dataloader_pin_memory=on_gpu,
        remove_unused_columns=False,  # the batches carry window_index; RecoveryTrainer drops it
        include_num_input_tokens_seen="all",
        disable_tqdm=True,
        report_to="none",
        # torchrun / accelerate launch without a GPU: the Trainer's DDP runs over gloo only with use_cpu
        # (and CPU bf16 autocast needs it too)
        **({"use_cpu": True} if not on_gpu and (bf16 or distributed.launched()) else {}),
    )


def _resumed_step(resume_from: Path | None, total_steps: int) -> tuple[int | None, float | None]:
    """(step, last validation loss) of the checkpoint a resumed run continues, or (None, None)."""
    if resume_from is None:
        return None, None
    saved_state = json.loads((resume_from / "trainer_state.json").read_text())
    step = saved_state["global_step"]
    history = reversed(saved_state["log_history"])
    last_val_loss = next((entry["eval_loss"] for entry in history if "eval_loss" in entry), None)
    if step >= total_steps:
        raise UserError(
            f"--resume: the checkpoint is at step {step}, already at the budget of {total_steps} "
            "steps; raise --max-steps/--max-epochs/--max-train-tokens to continue"
        )
    return step, last_val_loss


@dataclass
class _Run:
    """What ``_train`` needs of one recovery run besides the method and the Trainer's inputs."""

    plan: BudgetPlan
    scale: _ValScale
    clock: Clock
    resume_from: Path | None
    resumed: tuple[int | None, float | None]  # (step, last validation loss) of the checkpoint
    state: dict  # minigpts' own run state (clock, first evaluation) from the checkpoint
    stop_at_ppl: float | None
    patience: int | None
    max_seconds: float | None
    progress: bool


def _train(recovery, ctx, run: _Run, model, tokenizer, args, datasets: dict):
    """Train with the method's Trainer under the budget and stop rules: (plain model, FinetuneResult)."""
    first = next(model.parameters())
    device, dtype = first.device, first.dtype
    use_cache = getattr(model.config, "use_cache", None)
    try:
        recovery.prepare(ctx)
        model.float()  # fp32 master weights; bf16, where chosen, comes from autocast
        trainer = recovery.make_trainer(
            ctx, model=recovery.wrap(model, ctx), args=args, processing_class=tokenizer,
            data_collator=default_data_collator, **datasets,
        )  # fmt: skip
        if not isinstance(trainer, RecoveryTrainer):
            raise TypeError(f"recovery method {recovery.name!r}: make_trainer must return a RecoveryTrainer")
        trainer.remove_callback(PrinterCallback)  # our progress bar replaces the printed log dicts
        with _without_transformers_bars():
            initial_eval, tracker, guard, trained = _train_steps(recovery, trainer, run)
        result = _result(recovery, ctx, run, trainer.state, initial_eval, tracker, guard, trained)
        final = recovery.unwrap(trainer.model, ctx)
        _drop_autocast_forward(final)
    finally:
        recovery.finish(ctx)
    if use_cache is not None:
        final.config.use_cache = use_cache  # Trainer switches the cache off for training
    final.to(device=device, dtype=torch.float32 if device.type == "cpu" else dtype).eval()
    return final, result


def _train_steps(recovery, trainer, run: _Run):
    """The first evaluation, then ``trainer.train()`` unless a stop rule or the clock cap says not to:
    (initial evaluation, tracker, guard, trained?)."""
    clock = run.clock
    initial_eval_seconds = run.state.get("eval_seconds")
    last_val_loss = run.resumed[1]
    if run.resume_from is None:
        before = clock.elapsed()
        initial_eval = (0, trainer.evaluate()["eval_loss"])
        initial_eval_seconds = clock.elapsed() - before
        last_val_loss = initial_eval[1]
    else:
        initial_eval = run.state["initial_eval"]
    tracker = BudgetTracker(clock, run.max_seconds, run.plan, initial_eval_seconds)
    if run.resume_from is not None:
        tracker.validation_seconds = 0.0  # the measured evaluation was the earlier run's
    guard = _RunGuard(clock, tracker, run.stop_at_ppl, run.patience, initial_eval)
    trainer.add_callback(tracker)
    trainer.add_callback(guard)
    if run.progress:
        trainer.add_callback(
            ProgressBar(f"finetune ({recovery.name})", tracker, run.scale.format, last_val_loss)
        )
    if run.resume_from is None and run.stop_at_ppl is not None and _ppl(initial_eval[1]) <= run.stop_at_ppl:
        guard.reason = "stop_at_ppl"  # the paper's rule trains no step
        return initial_eval, tracker, guard, False
    if run.max_seconds is not None and distributed.any_true(
        clock.elapsed() + tracker.predicted_eval() >= run.max_seconds  # all processes agree
    ):
        tracker.reason = "max_minutes"  # the cap is spent before the first step
        return initial_eval, tracker, guard, False
    if distributed.active():
        _unprepare_for_training(trainer)
    trainer.train(resume_from_checkpoint=str(run.resume_from) if run.resume_from else None)
    return initial_eval, tracker, guard, True


def _result(recovery, ctx, run: _Run, state, initial_eval, tracker, guard, trained: bool) -> FinetuneResult:
    plan, scale = run.plan, run.scale
    log = state.log_history if trained else []  # train() starts a fresh log (or the checkpoint's)
    evals = [tuple(initial_eval)] if initial_eval else []
    evals += [(entry["step"], entry["eval_loss"]) for entry in log if "eval_loss" in entry]
    train_losses = [entry["loss"] for entry in log if "loss" in entry]
    steps = state.global_step if trained else (run.resumed[0] or 0)
    return FinetuneResult(
        method=recovery.name,
        epochs=steps * plan.windows_per_step / len(ctx.train_windows),
        steps=steps,
        train_tokens=int(state.num_input_tokens_seen) if trained else steps * plan.tokens_per_step,
        seconds=run.clock.elapsed(),
        stopped_because=guard.reason or tracker.reason or plan.horizon,
        max_steps=plan.total_steps,
        val_history=[(step, loss, _ppl(loss), scale.bpb(loss)) for step, loss in evals],
        best_val_loss=min((loss for _, loss in evals), default=None),
        final_val_loss=evals[-1][1] if evals else None,
        train_loss=train_losses[-1] if train_losses else None,
        resumed_from_step=run.resumed[0],
        eval_every=plan.eval_every,
        val_tokens=scale.scored_tokens,
        validation_seconds=tracker.validation_seconds,
        notes=plan.notes,
        method_stats=ctx.stats,
        bf16_autocast=bool(ctx.options.get("bf16_autocast", False)),
    )

"""Recovery fine-tuning of a pruned model on packed domain windows, built on transformers' ``Trainer``.

``Trainer`` brings multi-GPU, bf16 autocast, checkpointing and resuming; this module adds what it has
no knob for: the paper's stop rule (validation perplexity at or below a target), a wall-clock budget
that survives ``resume``, early stopping on validation loss, distillation from the unpruned model,
LoRA merged back into plain weights, and one progress bar with validation bits-per-byte.

Protocol: every row of ``train_windows``/``val_windows`` is one packed token window; labels are the
inputs (the model shifts them), so the first token of each window is never scored. Validation loss
is the mean next-token NLL in nats over the scored tokens; perplexity = exp(loss); bits-per-byte =
loss * scored tokens / ln 2 / UTF-8 bytes of the scored tokens.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm
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

from minigpts.errors import UserError

METHODS = ("full", "lora", "distill")
RUN_STATE_FILE = "minigpts_finetune.json"  # written into every checkpoint: what Trainer's state lacks


@dataclass
class FinetuneResult:
    """What a recovery run did and why it stopped; ``val_history`` rows are (step, loss, ppl, bpb)."""

    method: str
    epochs: float
    steps: int
    train_tokens: int
    seconds: float
    stopped_because: str  # max_steps | max_train_tokens | epochs | max_minutes | stop_at_ppl | early_stopping
    max_steps: int  # the step horizon of the schedule (the smallest of the step budgets)
    val_history: list[tuple[int, float, float, float | None]] = field(default_factory=list)
    best_val_loss: float | None = None
    final_val_loss: float | None = None  # the last evaluation (with early stopping the best one is returned)
    train_loss: float | None = None  # mean training loss over the last logging interval
    resumed_from_step: int | None = None

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


def lora_target_modules(model: nn.Module) -> str:
    """A peft regex naming every ``nn.Linear`` inside the decoder layers, found without per-family names.

    The decoder layers are the longest ``nn.ModuleList`` whose blocks hold linear layers (Llama's
    ``model.layers``, OPT's ``model.decoder.layers``, Phi's ``model.layers``); the LM head stays frozen.
    """
    best_name, best_list = None, None
    for name, module in model.named_modules():
        longer = isinstance(module, nn.ModuleList) and (best_list is None or len(module) > len(best_list))
        if longer and any(isinstance(m, nn.Linear) for m in module.modules()):
            best_name, best_list = name, module
    if best_list is None:
        raise UserError("--method lora: found no decoder layers with linear projections in this model")
    names = sorted(
        {sub for layer in best_list for sub, m in layer.named_modules() if isinstance(m, nn.Linear)}
    )
    return rf"{re.escape(best_name)}\.\d+\.({'|'.join(re.escape(n) for n in names)})"


def add_lora(model: nn.Module, r: int = 16, alpha: int = 32):
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


def merge_lora(peft_model) -> nn.Module:
    """Fold the adapters into the base weights: a plain transformers model that saves and loads anywhere."""
    return peft_model.merge_and_unload()


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    alpha: float = 0.5,
    temperature: float = 2.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(1-α)·CE + α·T²·KL(softmax(teacher/T) ‖ softmax(student/T)), both on next-token predictions.

    Positions are shifted as the model's own loss does; labels equal to -100 are not scored. The T²
    keeps the KL gradient on the CE scale (Hinton et al.). Returns (loss, ce, kl), ce and kl detached.
    """
    if student_logits.shape[-1] != teacher_logits.shape[-1]:
        raise UserError(
            f"--method distill: the teacher predicts {teacher_logits.shape[-1]} tokens and the student "
            f"{student_logits.shape[-1]}; give teacher_vocab_keep when the student's vocabulary was trimmed"
        )
    targets = labels[:, 1:]
    scored = targets != -100
    student = student_logits[:, :-1][scored].float()
    teacher = teacher_logits[:, :-1][scored].float()
    ce = F.cross_entropy(student, targets[scored])
    kl = F.kl_div(
        F.log_softmax(student / temperature, dim=-1),
        F.log_softmax(teacher / temperature, dim=-1),
        log_target=True,
        reduction="batchmean",
    )
    loss = (1 - alpha) * ce + alpha * temperature**2 * kl
    return loss, ce.detach(), kl.detach()


def schedule_factor(
    step: int, total_steps: int, elapsed: float, max_seconds: float | None, warmup_ratio: float, kind: str
) -> float:
    """Learning-rate multiplier at a point of the run, on whichever budget is further spent.

    Progress is max(step / total_steps, elapsed / max_seconds): a run bounded by ``--max-minutes``
    warms up and anneals within its minutes. On a step horizon alone, a 3-minute CPU run that stops
    after 50 of 840 planned steps spends 42 of them warming up and never decays.
    """
    progress = step / max(1, total_steps)
    if max_seconds:
        progress = max(progress, elapsed / max_seconds)
    progress = min(1.0, progress)
    if warmup_ratio > 0 and progress < warmup_ratio:
        return progress / warmup_ratio
    if kind.startswith("constant"):
        return 1.0
    rest = (progress - warmup_ratio) / max(1e-12, 1 - warmup_ratio)
    if kind == "linear":
        return max(0.0, 1 - rest)
    return 0.5 * (1 + math.cos(math.pi * rest))  # cosine


BUDGET_AWARE_SCHEDULES = ("cosine", "linear", "constant", "constant_with_warmup")


class _BudgetScheduleMixin:
    """Trainer mixin: the learning-rate schedule follows the step budget *and* the minute budget."""

    clock = None
    max_seconds: float | None = None
    warmup_ratio: float = 0.0

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        kind = str(getattr(self.args.lr_scheduler_type, "value", self.args.lr_scheduler_type))
        if self.lr_scheduler is not None or kind not in BUDGET_AWARE_SCHEDULES:
            return super().create_scheduler(num_training_steps, optimizer)
        clock, max_seconds, warmup = self.clock, self.max_seconds, self.warmup_ratio

        def factor(step: int) -> float:  # a plain function: LambdaLR does not pickle it into checkpoints
            elapsed = clock.elapsed() if clock is not None else 0.0
            return schedule_factor(step, num_training_steps, elapsed, max_seconds, warmup, kind)

        self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer or self.optimizer, factor)
        self._created_lr_scheduler = True
        return self.lr_scheduler


class _Trainer(_BudgetScheduleMixin, Trainer):
    pass


class _DistillTrainer(_BudgetScheduleMixin, Trainer):
    """Trainer whose training loss mixes CE with KL to a frozen teacher; validation stays plain CE."""

    loss_is_scaled_for_ga = False  # per-batch means: Trainer divides by the accumulation steps

    def __init__(self, *args, teacher, teacher_vocab_keep, alpha, temperature, **kwargs):
        super().__init__(*args, **kwargs)
        self.teacher = teacher
        self.teacher_vocab_keep = teacher_vocab_keep
        self.alpha = alpha
        self.temperature = temperature

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not model.training:  # validation: plain CE, so perplexity means the same for every method
            return super().compute_loss(model, inputs, return_outputs=return_outputs)
        input_ids = inputs["input_ids"]
        outputs = model(input_ids=input_ids, attention_mask=inputs.get("attention_mask"))
        keep = self.teacher_vocab_keep
        with torch.no_grad():
            teacher_ids = input_ids if keep is None else keep.to(input_ids.device)[input_ids]
            teacher_logits = self.teacher(
                input_ids=teacher_ids, attention_mask=inputs.get("attention_mask")
            ).logits
            if keep is not None:
                teacher_logits = teacher_logits[..., keep.to(teacher_logits.device)]
        loss, _, _ = distillation_loss(
            outputs.logits, teacher_logits, inputs["labels"], self.alpha, self.temperature
        )
        return (loss, outputs) if return_outputs else loss


class _Clock:
    """Training seconds across resumed runs, so ``max_minutes`` is a budget for the whole run."""

    def __init__(self, seconds_before: float):
        self.seconds_before = seconds_before
        self.started = time.monotonic()

    def elapsed(self) -> float:
        return self.seconds_before + time.monotonic() - self.started


@dataclass
class _ValScale:
    """Turns mean validation loss into bits-per-byte (None without byte lengths)."""

    scored_tokens: int
    scored_bytes: int | None

    def bpb(self, loss: float) -> float | None:
        if not self.scored_bytes:
            return None
        return loss * self.scored_tokens / math.log(2) / self.scored_bytes


class _RunGuard(TrainerCallback):
    """Stops the run on the budgets Trainer has no knob for, and records what a resume needs."""

    def __init__(self, clock, max_seconds, stop_at_ppl, patience, initial_eval):
        self.clock = clock
        self.max_seconds = max_seconds
        self.stop_at_ppl = stop_at_ppl
        self.patience = patience
        self.initial_eval = initial_eval  # (step 0, loss) of the model before any update, or None
        self.reason: str | None = None

    def _stop(self, control, reason: str) -> None:
        self.reason = self.reason or reason
        control.should_training_stop = True
        control.should_save = True  # a stopped run can always be resumed with a larger budget

    def on_step_end(self, args, state, control, **kwargs):
        if self.max_seconds is not None and self.clock.elapsed() >= self.max_seconds:
            control.should_evaluate = True
            self._stop(control, "max_minutes")
        return control

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
                run_state = {"seconds": self.clock.elapsed(), "initial_eval": self.initial_eval}
                (folder / RUN_STATE_FILE).write_text(json.dumps(run_state))
        return control


class _ProgressBar(TrainerCallback):
    """One tqdm bar: steps, last training loss, validation bits-per-byte (or loss) and time left."""

    def __init__(self, description, clock, max_seconds, scale, last_val_loss):
        self.description = description
        self.clock = clock
        self.max_seconds = max_seconds
        self.scale = scale
        self.bar = None
        self.loss = None
        self.val = None if last_val_loss is None else self._format_val(last_val_loss)

    def _format_val(self, loss: float) -> str:
        bpb = self.scale.bpb(loss)
        return f"val bpb {bpb:.4f}" if bpb is not None else f"val loss {loss:.4f}"

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.bar = tqdm(
                total=state.max_steps,
                initial=state.global_step,
                desc=self.description,
                unit="step",
                bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]",
                dynamic_ncols=True,
            )
            self.first_step = state.global_step
            self.started = time.monotonic()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.loss = logs["loss"]

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        self.val = self._format_val(metrics["eval_loss"])
        self._refresh(state)

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)
            self._refresh(state)

    def _refresh(self, state):
        if self.bar is None:
            return
        parts = []
        if self.loss is not None:
            parts.append(f"loss {self.loss:.4f}")
        if self.val is not None:
            parts.append(self.val)
        done = state.global_step - self.first_step
        if done > 0:
            left = (time.monotonic() - self.started) / done * (state.max_steps - state.global_step)
            if self.max_seconds is not None:
                left = min(left, max(0.0, self.max_seconds - self.clock.elapsed()))
            parts.append(f"left {tqdm.format_interval(left)}")
        self.bar.set_postfix_str(", ".join(parts), refresh=True)

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


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
    method, teacher, budgets, lr, warmup_ratio, scheduler, batch_size, grad_accum, max_minutes
) -> None:
    if method not in METHODS:
        raise UserError(f"--method {method}: use one of {', '.join(METHODS)}")
    if method == "distill" and teacher is None:
        raise UserError(
            "--method distill needs a teacher (--teacher, or the unpruned model in minigpts.json)"
        )
    if not budgets:
        raise UserError(
            "finetune: give --max-epochs, --max-steps or --max-train-tokens (the schedule needs a length)"
        )
    for flag, value in budgets.items():
        if value <= 0:
            raise UserError(f"--{flag.replace('_', '-')} {value}: must be positive")
    if max_minutes is not None and max_minutes <= 0:
        raise UserError(f"--max-minutes {max_minutes}: must be positive")
    if lr <= 0:
        raise UserError(f"--lr {lr}: must be positive")
    if not 0 <= warmup_ratio < 1:
        raise UserError(f"--warmup-ratio {warmup_ratio}: must be in [0, 1)")
    if batch_size < 1 or grad_accum < 1:
        raise UserError("--batch-size and --grad-accum must be at least 1")
    schedulers = [kind.value for kind in SchedulerType]
    if scheduler not in schedulers:
        raise UserError(f"--scheduler {scheduler}: use one of {', '.join(schedulers)}")


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
    if path is None or not path.is_file():
        return {"seconds": 0.0, "initial_eval": None}
    return json.loads(path.read_text())


def finetune(
    model,
    tokenizer,
    train_windows,
    val_windows,
    *,
    out_dir,
    method: str = "full",
    teacher=None,
    teacher_vocab_keep=None,
    max_epochs: float | None = 1.0,
    max_steps: int | None = None,
    max_train_tokens: int | None = None,
    max_minutes: float | None = None,
    stop_at_ppl: float | None = None,
    early_stopping_patience: int | None = None,
    eval_every: int | None = None,
    lr: float = 5e-5,
    warmup_ratio: float = 0.05,
    scheduler: str = "cosine",
    batch_size: int = 4,
    grad_accum: int = 1,
    seed: int = 0,
    resume: bool = False,
    lora_r: int = 16,
    lora_alpha: int = 32,
    distill_alpha: float = 0.5,
    distill_temperature: float = 2.0,
    byte_lengths=None,
    progress: bool = True,
):
    """Fine-tune ``model`` on packed windows until the first budget is spent; returns (model, result).

    Budgets (any combination, first hit wins): ``max_epochs``, ``max_steps``, ``max_train_tokens``
    (turned into steps of batch_size·grad_accum·devices·seq_len tokens; the smallest of these three
    is the schedule's step horizon), ``max_minutes`` (training wall clock, summed over resumed
    runs; warm-up and decay follow it too, see `schedule_factor`), ``stop_at_ppl`` (the paper's
    rule: stop once validation perplexity ≤ it; checked before the first step too, so a model
    already there is not trained), ``early_stopping_patience``
    (evaluations without a new best validation loss; the best checkpoint is then loaded back).
    Validation runs before training, every ``eval_every`` steps (default: ~10 per run, at least one
    per epoch) and at the end; a checkpoint is saved at every evaluation.
    Checkpoints go to ``out_dir/checkpoints`` (two kept); ``resume=True`` continues the last one.
    ``tokenizer`` is saved into every checkpoint, so each one is a loadable model directory (for LoRA:
    a peft adapter directory).

    The returned model is a plain transformers model (LoRA merged), in eval mode, on the device it
    came from, in its original dtype (float32 when that device is the CPU).
    """
    train_windows = _check_windows(train_windows, "--data (train split)")
    val_windows = _check_windows(val_windows, "--data (validation split)")
    step_budgets = {
        name: value
        for name, value in (
            ("max_steps", max_steps),
            ("max_train_tokens", max_train_tokens),
            ("epochs", max_epochs),
        )
        if value is not None
    }
    _check_options(
        method, teacher, step_budgets, lr, warmup_ratio, scheduler, batch_size, grad_accum, max_minutes
    )
    checkpoint_dir = Path(out_dir) / "checkpoints"
    resume_from = _resume_point(checkpoint_dir, resume)
    run_state = _read_run_state(resume_from)
    clock = _Clock(run_state["seconds"])

    on_gpu = torch.cuda.is_available()
    args = TrainingArguments(
        output_dir=str(checkpoint_dir),
        per_device_train_batch_size=batch_size,
        per_device_eval_batch_size=batch_size,
        gradient_accumulation_steps=grad_accum,
        learning_rate=lr,
        lr_scheduler_type=scheduler,
        warmup_steps=warmup_ratio,  # a float in [0, 1) is a ratio of the total steps
        max_steps=1,  # the step settings are set below, once the number of devices is known
        eval_strategy="steps",
        eval_steps=1,
        save_strategy="steps",
        save_steps=1,
        save_total_limit=2,
        logging_strategy="steps",
        logging_steps=1,
        prediction_loss_only=True,
        load_best_model_at_end=early_stopping_patience is not None,
        metric_for_best_model="loss",
        greater_is_better=False,
        seed=seed,
        data_seed=seed,
        bf16=on_gpu and torch.cuda.is_bf16_supported(),
        dataloader_pin_memory=on_gpu,
        include_num_input_tokens_seen="all",
        disable_tqdm=True,
        report_to="none",
    )
    # Accelerate gives every process ceil(N / (batch·devices)) batches per epoch.
    batches_per_epoch = math.ceil(len(train_windows) / (batch_size * args.world_size))
    tokens_per_step = batch_size * grad_accum * args.world_size * train_windows.shape[1]
    steps_per_epoch = math.ceil(batches_per_epoch / grad_accum)
    horizons = {
        "max_steps": max_steps,
        "max_train_tokens": None if max_train_tokens is None else max(1, max_train_tokens // tokens_per_step),
        "epochs": None if max_epochs is None else math.ceil(max_epochs * steps_per_epoch),
    }
    horizons = {name: steps for name, steps in horizons.items() if steps is not None}
    budget_reason = min(horizons, key=horizons.get)
    total_steps = horizons[budget_reason]
    args.max_steps = total_steps
    # ~10 evaluations, but at least one per epoch so a long run's stop rule fires in time
    args.eval_steps = args.save_steps = eval_every or max(1, min(round(total_steps / 10), steps_per_epoch))
    args.logging_steps = max(1, min(args.eval_steps, total_steps // 100))
    resumed_from_step, last_val_loss = None, None
    if resume_from is not None:
        saved_state = json.loads((resume_from / "trainer_state.json").read_text())
        resumed_from_step = saved_state["global_step"]
        last_val_loss = next(
            (entry["eval_loss"] for entry in reversed(saved_state["log_history"]) if "eval_loss" in entry),
            None,
        )
        if resumed_from_step >= total_steps:
            raise UserError(
                f"--resume: the checkpoint is at step {resumed_from_step}, already at the budget of {total_steps} "
                "steps; raise --max-steps/--max-epochs/--max-train-tokens to continue"
            )

    first = next(model.parameters())
    device, dtype = first.device, first.dtype
    use_cache = getattr(model.config, "use_cache", None)
    model.float()  # fp32 master weights; bf16 comes from autocast on GPUs that support it
    common = dict(
        model=add_lora(model, lora_r, lora_alpha) if method == "lora" else model,
        args=args,
        processing_class=tokenizer,
        data_collator=default_data_collator,
        train_dataset=_WindowDataset(train_windows),
        eval_dataset=_WindowDataset(val_windows),
    )
    if method == "distill":
        teacher_device, teacher_training = next(teacher.parameters()).device, teacher.training
        teacher.eval().to(args.device)
        keep = None if teacher_vocab_keep is None else torch.as_tensor(teacher_vocab_keep, dtype=torch.long)
        trainer = _DistillTrainer(
            **common,
            teacher=teacher,
            teacher_vocab_keep=keep,
            alpha=distill_alpha,
            temperature=distill_temperature,
        )
    else:
        trainer = _Trainer(**common)
    max_seconds = None if max_minutes is None else max_minutes * 60
    trainer.clock, trainer.max_seconds, trainer.warmup_ratio = clock, max_seconds, warmup_ratio
    trainer.remove_callback(PrinterCallback)  # our progress bar replaces the printed log dicts

    scale = _ValScale(
        scored_tokens=val_windows[:, 1:].numel(),
        scored_bytes=None if byte_lengths is None else int(byte_lengths[val_windows[:, 1:]].sum()),
    )
    with _without_transformers_bars():
        if resume_from is None:
            initial_eval = (0, trainer.evaluate()["eval_loss"])
            last_val_loss = initial_eval[1]
        else:
            initial_eval = run_state["initial_eval"]
        guard = _RunGuard(clock, max_seconds, stop_at_ppl, early_stopping_patience, initial_eval)
        trainer.add_callback(guard)
        if progress:
            trainer.add_callback(
                _ProgressBar(f"finetune ({method})", clock, max_seconds, scale, last_val_loss)
            )
        already_there = (
            resume_from is None and stop_at_ppl is not None and _ppl(initial_eval[1]) <= stop_at_ppl
        )
        if already_there:
            guard.reason = "stop_at_ppl"  # the paper's rule trains no step
        else:
            trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)

    state = trainer.state
    log = [] if already_there else state.log_history  # train() starts a fresh log (or the checkpoint's)
    evals = [tuple(initial_eval)] if initial_eval else []
    evals += [(entry["step"], entry["eval_loss"]) for entry in log if "eval_loss" in entry]
    train_losses = [entry["loss"] for entry in log if "loss" in entry]
    result = FinetuneResult(
        method=method,
        epochs=float(state.epoch or 0.0),
        steps=state.global_step,
        train_tokens=int(state.num_input_tokens_seen),
        seconds=clock.elapsed(),
        stopped_because=guard.reason or budget_reason,
        max_steps=total_steps,
        val_history=[(step, loss, _ppl(loss), scale.bpb(loss)) for step, loss in evals],
        best_val_loss=min((loss for _, loss in evals), default=None),
        final_val_loss=evals[-1][1] if evals else None,
        train_loss=train_losses[-1] if train_losses else None,
        resumed_from_step=resumed_from_step,
    )

    final = merge_lora(trainer.model) if method == "lora" else trainer.model
    if use_cache is not None:
        final.config.use_cache = use_cache  # Trainer switches the cache off for training
    final.to(device=device, dtype=torch.float32 if device.type == "cpu" else dtype).eval()
    if method == "distill":
        teacher.to(teacher_device).train(teacher_training)
    return final, result

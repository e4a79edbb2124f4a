"""Budgets of a recovery run: token/step budgets first, validation bounded, the clock only a cap.

A run's length is a number of optimizer steps fixed before it starts — ``max_steps``,
``max_train_tokens`` (whole steps of batch·accumulation·devices·seq_len tokens, never more than the
budget) or ``max_epochs`` over the training windows, the smallest of those given (``finetune``
gives one epoch only when no budget is given) — and that number
is also the horizon of the learning-rate schedule. So the same command trains on the same windows
with the same learning rates and gives the same numbers on any machine.

Validation is bounded by the same budget: the validation windows are scored before the first step,
after the last and every K steps, with K the smallest interval that keeps the validation tokens of
the whole run (start and end included) at or below ``VALIDATION_SHARE`` (10 %) of its training
tokens. When even the two evaluations at start and end would pass that share, the validation set is
cut to the windows that fit (at least one). ``eval_every`` overrides the rule.

``max_minutes`` is a safety cap on the wall clock of the whole recovery stage — the teacher pass,
training, validation and checkpoints, summed over resumed runs. After every step the run predicts
the next step (the longest of the last few) and the evaluation that must follow it (the longest
measured evaluation plus checkpoint save) and stops, evaluating and saving, when they would not fit.
It can overrun only by a step longer than the ones measured (the first step, or a slower machine).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

from transformers import TrainerCallback

from minigpts.errors import UserError

VALIDATION_SHARE = 0.10
now = time.monotonic  # the time source of every budget decision (tests replace it with a fake clock)


class Clock:
    """Seconds of the recovery stage across resumed runs (``seconds_before`` from the checkpoint)."""

    def __init__(self, seconds_before: float = 0.0):
        self.seconds_before = seconds_before
        self.started = now()

    def elapsed(self) -> float:
        return self.seconds_before + now() - self.started


@dataclass
class BudgetPlan:
    """The run decided before it starts: steps, what bounds them, validation interval and size."""

    total_steps: int
    horizon: str  # the budget that sets total_steps: max_steps | max_train_tokens | epochs
    windows_per_step: int
    tokens_per_step: int
    eval_every: int
    val_windows: int  # validation windows scored at each evaluation
    notes: list[str] = field(default_factory=list)

    @property
    def evaluations(self) -> int:
        """Evaluations of a run that reaches its budget: before the first step, every K steps, after the last."""
        return 1 + self.total_steps // self.eval_every + (1 if self.total_steps % self.eval_every else 0)

    def eval_steps_after(self, step: int) -> int:
        """Scheduled evaluations at steps in (step, total_steps]."""
        k, total = self.eval_every, self.total_steps
        if step >= total:
            return 0
        return total // k - step // k + (1 if total % k else 0)


def plan_budget(
    *,
    n_train: int,
    seq_len: int,
    n_val: int,
    val_seq_len: int,
    batch_size: int,
    grad_accum: int = 1,
    world_size: int = 1,
    max_steps: int | None = None,
    max_train_tokens: int | None = None,
    max_epochs: float | None = None,
    eval_every: int | None = None,
    share: float = VALIDATION_SHARE,
) -> BudgetPlan:
    """Steps, evaluation interval and validation size of a run (see the module's docstring)."""
    windows_per_step = batch_size * grad_accum * world_size
    tokens_per_step = windows_per_step * seq_len
    horizons = {}
    if max_steps is not None:
        horizons["max_steps"] = max_steps
    if max_train_tokens is not None:
        if max_train_tokens < tokens_per_step:
            raise UserError(
                f"--max-train-tokens {max_train_tokens}: less than one optimizer step of {tokens_per_step} "
                f"tokens (--train-batch-size {batch_size} × --grad-accum {grad_accum} × {world_size} device(s) "
                f"× --finetune-seq-len {seq_len})"
            )
        horizons["max_train_tokens"] = max_train_tokens // tokens_per_step
    if max_epochs is not None:
        horizons["epochs"] = max(1, math.ceil(max_epochs * n_train / windows_per_step))
    if not horizons:
        raise UserError(
            "finetune: give --max-epochs, --max-steps or --max-train-tokens (the schedule needs a length)"
        )
    horizon = min(horizons, key=horizons.get)
    total = horizons[horizon]
    k, n_val, notes = _validation(total, tokens_per_step, n_val, val_seq_len, eval_every, share)
    return BudgetPlan(total, horizon, windows_per_step, tokens_per_step, k, n_val, notes)


def _validation(total: int, tokens_per_step: int, n_val: int, val_seq_len: int, eval_every, share: float):
    """(evaluation interval, validation windows, notes) of ``plan_budget``, bounded by ``share``."""
    notes = []
    allowed = share * total * tokens_per_step
    if eval_every is not None:
        k = eval_every
        spent = (1 + total // k + (1 if total % k else 0)) * n_val * val_seq_len
        if spent > allowed:
            notes.append(
                f"--eval-every {k}: validation is {spent / (total * tokens_per_step):.0%} of training tokens"
            )
    else:
        fit = math.floor(allowed / (n_val * val_seq_len))
        if fit >= 2:
            k = max(1, math.ceil(total / (fit - 1)))
        else:
            k = total
            kept = max(1, math.floor(allowed / (2 * val_seq_len)))
            if kept < n_val:
                notes.append(
                    f"validation cut to {kept} of {n_val} windows: two evaluations (start, end) of all of them "
                    f"would pass {share:.0%} of the {total * tokens_per_step:,} training tokens"
                )
                n_val = kept
            if 2 * n_val * val_seq_len > allowed:
                notes.append(
                    f"validation is {2 * n_val * val_seq_len / (total * tokens_per_step):.0%} of training tokens: "
                    "one window at start and end is the least there is"
                )
    return k, n_val, notes


def _recent_max(values: list[float], n: int = 5) -> float:
    return max(values[-n:]) if values else 0.0


def _recent_mean(values: list[float], n: int = 10) -> float:
    recent = values[-n:]
    return sum(recent) / len(recent) if recent else 0.0


class BudgetTracker(TrainerCallback):
    """Measures steps and evaluations on ``Clock``, enforces the ``max_minutes`` cap, estimates time left.

    A step's duration runs from the end of the previous step (or of the evaluation and checkpoint
    after it) to its own end, so logging and data loading are counted; an evaluation's duration runs
    from the end of its step to the start of the next (evaluation + checkpoint save).
    """

    def __init__(self, clock: Clock, max_seconds: float | None, plan: BudgetPlan, initial_eval_seconds=None):
        self.clock = clock
        self.max_seconds = max_seconds
        self.plan = plan
        self.step_seconds: list[float] = []
        self.eval_seconds: list[float] = [] if initial_eval_seconds is None else [initial_eval_seconds]
        self.validation_seconds = (
            initial_eval_seconds or 0.0
        )  # every evaluation of this run, checkpoints included
        self.reason: str | None = None
        self.estimates: list[tuple[int, float, float]] = []  # (step, elapsed, predicted seconds left)
        self._ready = None
        self._last_end = None
        self._eval_pending = False

    def predicted_step(self) -> float:
        return _recent_max(self.step_seconds)

    def predicted_eval(self) -> float:
        return _recent_max(self.eval_seconds, 3)

    def seconds_left(self, step: int, elapsed: float, eval_pending: bool) -> float:
        """Steps left × mean step + evaluations left × mean evaluation; at most what the cap leaves."""
        evals = self.plan.eval_steps_after(step) + (1 if eval_pending else 0)
        left = (self.plan.total_steps - step) * _recent_mean(self.step_seconds) + evals * _recent_mean(
            self.eval_seconds
        )
        if self.max_seconds is not None:
            left = min(left, max(0.0, self.max_seconds - elapsed))
        return left

    def _close_eval(self, t: float) -> None:
        if self._eval_pending:
            self.eval_seconds.append(t - self._last_end)
            self.validation_seconds += t - self._last_end
            self._ready = t
            self._eval_pending = False

    def on_train_begin(self, args, state, control, **kwargs):
        self._ready = self.clock.elapsed()

    def on_step_begin(self, args, state, control, **kwargs):
        self._close_eval(self.clock.elapsed())

    def on_step_end(self, args, state, control, **kwargs):
        t = self.clock.elapsed()
        self.step_seconds.append(t - self._ready)
        self._last_end = self._ready = t
        self._eval_pending = bool(control.should_evaluate)
        step = state.global_step
        if self.max_seconds is not None and not control.should_training_stop and step < state.max_steps:
            pending = self.predicted_eval() if control.should_evaluate else 0.0
            from minigpts import distributed

            over = t + pending + self.predicted_step() + self.predicted_eval() > self.max_seconds
            if distributed.any_true(over):  # data parallel: the clocks differ; all stop when one must
                self.reason = "max_minutes"
                control.should_training_stop = True
                control.should_evaluate = control.should_save = True  # a stopped run can be resumed
                self._eval_pending = True
        self.estimates.append((step, t, self.seconds_left(step, t, self._eval_pending)))
        return control

    def on_train_end(self, args, state, control, **kwargs):
        self._close_eval(self.clock.elapsed())


class ProgressBar(TrainerCallback):
    """One tqdm bar: steps, last training loss, validation bits-per-byte (or loss), time left.

    The time left is the tracker's estimate from steps done against steps planned (see
    ``BudgetTracker.seconds_left``), not the clock cap.
    """

    def __init__(self, description, tracker: BudgetTracker, format_val, last_val_loss):
        self.description = description
        self.tracker = tracker
        self.format_val = format_val
        self.bar = None
        self.loss = None
        self.val = None if last_val_loss is None else format_val(last_val_loss)

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            from tqdm.auto import tqdm

            self.bar = tqdm(
                total=state.max_steps,
                initial=state.global_step,
                desc=self.description,
                unit="step",
                bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]",
                dynamic_ncols=True,
            )

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.loss = logs["loss"]

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        self.val = self.format_val(metrics["eval_loss"])
        self._refresh()

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)
            self._refresh()

    def _refresh(self):
        if self.bar is None:
            return
        parts = []
        if self.loss is not None:
            parts.append(f"loss {self.loss:.4f}")
        if self.val is not None:
            parts.append(self.val)
        if self.tracker.estimates:
            parts.append(f"left {self.bar.format_interval(self.tracker.estimates[-1][2])}")
        self.bar.set_postfix_str(", ".join(parts), refresh=True)

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.close()
            self.bar = None

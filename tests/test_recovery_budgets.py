"""Budgets are honest: a token/step budget fixes the run on any machine, validation stays within 10 %
of the training tokens, the minute cap stops before it is passed and the time left is right within a step.

The clock is fake: every forward pass of the model advances it by a fixed cost per token, so a
"machine" is a cost per token and the tests run in a second or two whatever the real load.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import SAMPLE_TEXT, make_tiny_llama

import minigpts.recovery.budget as budget
import minigpts.recovery.trainer as trainer_module
from minigpts.data import make_windows, tokenize_stream
from minigpts.errors import UserError
from minigpts.options import FinetuneOptions
from minigpts.recovery import finetune, plan_budget

SEQ_LEN = 32
BATCH = 4


@pytest.fixture(scope="module")
def windows(tiny_tokenizer):
    all_windows = make_windows(tokenize_stream(tiny_tokenizer, [SAMPLE_TEXT] * 3), SEQ_LEN)
    return all_windows[:-4], all_windows[-4:]


class FakeMachine:
    """A clock that advances only when the model computes: ``train_cost`` seconds per token of a
    training forward (backward included), ``eval_cost`` per token of a validation forward."""

    def __init__(self, train_cost: float, eval_cost: float):
        self.t = 1000.0
        self.train_cost, self.eval_cost = train_cost, eval_cost
        self.train_tokens = self.eval_tokens = 0
        self.eval_seconds = 0.0

    def __call__(self) -> float:
        return self.t

    def hook(self, module, args, kwargs, output):
        tokens = kwargs["input_ids"].numel()
        if module.training:
            self.train_tokens += tokens
            self.t += tokens * self.train_cost
        else:
            self.eval_tokens += tokens
            self.t += tokens * self.eval_cost
            self.eval_seconds += tokens * self.eval_cost

    def step_seconds(self) -> float:
        return BATCH * SEQ_LEN * self.train_cost


def scheduled_rate(
    step: int, total: int, scheduler: str, lr: float = 3e-3, warmup_ratio: float = 0.05
) -> float:
    """The rate optimizer step ``step`` (1-based) ran at: linear warm-up, then ``scheduler``'s decay to zero."""
    warmup = math.ceil(warmup_ratio * total)
    current = step - 1
    if current < warmup:
        return lr * current / warmup
    progress = (current - warmup) / (total - warmup)
    decay = {"linear": 1 - progress, "cosine": 0.5 * (1 + math.cos(math.pi * progress))}[scheduler]
    return lr * decay


class RecordingTracker(budget.BudgetTracker):
    instances: list = []

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        RecordingTracker.instances.append(self)


def run(monkeypatch, tmp_path, tiny_tokenizer, windows, machine, **options):
    train, val = windows
    monkeypatch.setattr(budget, "now", machine)
    monkeypatch.setattr(trainer_module, "BudgetTracker", RecordingTracker)
    learning_rates = []
    log = trainer_module.RecoveryTrainer.log

    def recording_log(self, logs, *args, **kwargs):
        if "learning_rate" in logs:
            learning_rates.append((self.state.global_step, logs["learning_rate"]))
        return log(self, logs, *args, **kwargs)

    monkeypatch.setattr(trainer_module.RecoveryTrainer, "log", recording_log)
    model = make_tiny_llama(len(tiny_tokenizer))
    handle = model.register_forward_hook(machine.hook, with_kwargs=True)
    options = dict(max_epochs=None, lr=3e-3, batch_size=BATCH, progress=False) | options
    try:
        tuned, result = finetune(model, tiny_tokenizer, train, val, out_dir=tmp_path, **options)
    finally:
        handle.remove()
    return tuned, result, RecordingTracker.instances[-1], dict(learning_rates)


def test_the_same_token_budget_gives_the_same_run_on_a_fast_and_a_slow_machine(
    monkeypatch, tmp_path, tiny_tokenizer, windows
):
    budget_tokens = 40 * BATCH * SEQ_LEN + 100  # not a whole number of steps: 40 steps, never more tokens
    fast, slow = FakeMachine(1e-5, 1e-5), FakeMachine(1e-2, 3e-3)
    runs = [
        run(monkeypatch, tmp_path / name, tiny_tokenizer, windows, machine, max_train_tokens=budget_tokens,
            max_minutes=1e4)  # a cap far away: a safety net that does not bind
        for name, machine in (("fast", fast), ("slow", slow))
    ]  # fmt: skip
    (fast_model, fast_result, _, fast_lr), (slow_model, slow_result, _, slow_lr) = runs
    assert fast_result.steps == slow_result.steps == 40
    assert fast_result.train_tokens == slow_result.train_tokens == 40 * BATCH * SEQ_LEN
    assert fast_result.stopped_because == slow_result.stopped_because == "max_train_tokens"
    assert fast_result.val_history == slow_result.val_history
    assert fast_lr == slow_lr and len(fast_lr) == 40
    assert slow_result.seconds > 100 * fast_result.seconds
    for (name, a), b in zip(fast_model.state_dict().items(), slow_model.state_dict().values()):
        assert torch.equal(a, b), name

    # The schedule's horizon is the token budget: warm-up, then the default (linear) decay to zero at step 40.
    assert FinetuneOptions().scheduler == "linear"
    for step, rate in fast_lr.items():
        assert rate == pytest.approx(scheduled_rate(step, 40, "linear"), rel=1e-6, abs=1e-12), step


def test_lr_scheduler_sets_the_decay_over_the_token_budget(monkeypatch, tmp_path, tiny_tokenizer, windows):
    machine = FakeMachine(1e-5, 1e-5)
    budget_tokens = 20 * BATCH * SEQ_LEN
    _, result, _, rates = run(
        monkeypatch,
        tmp_path,
        tiny_tokenizer,
        windows,
        machine,
        max_train_tokens=budget_tokens,
        scheduler="cosine",
    )
    assert result.steps == len(rates) == 20
    for step, rate in rates.items():
        assert rate == pytest.approx(scheduled_rate(step, 20, "cosine"), rel=1e-6, abs=1e-12), step
    # mid-way the two decays differ, so the check above tells them apart
    assert scheduled_rate(15, 20, "cosine") < 0.9 * scheduled_rate(15, 20, "linear")


def test_validation_stays_within_ten_percent_of_the_training_tokens(
    monkeypatch, tmp_path, tiny_tokenizer, windows
):
    machine = FakeMachine(3e-4, 1e-4)  # a validation token costs a third of a training token
    _, result, tracker, _ = run(monkeypatch, tmp_path, tiny_tokenizer, windows, machine, max_steps=50)
    assert machine.eval_tokens <= 0.10 * machine.train_tokens
    assert machine.eval_tokens == (len(result.val_history)) * 4 * SEQ_LEN
    # as often as the rule allows: 5 evaluations of 128 tokens fit in 10 % of 6,400 → every 13 steps
    assert result.eval_every == 13 and [step for step, *_ in result.val_history] == [0, 13, 26, 39, 50]
    assert tracker.validation_seconds == pytest.approx(machine.eval_seconds)
    assert result.validation_seconds / result.seconds <= 0.10


def test_a_minute_cap_never_overruns_by_more_than_one_step(monkeypatch, tmp_path, tiny_tokenizer, windows):
    machine = FakeMachine(1e-3, 1e-3)
    step = machine.step_seconds()  # 0.128 s of fake time
    cap_minutes = 5.0 / 60
    _, result, _, rates = run(
        monkeypatch, tmp_path, tiny_tokenizer, windows, machine, max_steps=200, max_minutes=cap_minutes
    )
    assert result.stopped_because == "max_minutes" and 3 < result.steps < 200
    assert result.seconds <= cap_minutes * 60 + step
    assert result.seconds >= cap_minutes * 60 - 2 * step - 4 * SEQ_LEN * 1e-3  # and not far before it
    assert result.val_history[-1][0] == result.steps  # the stop evaluates ...
    assert (tmp_path / "checkpoints" / f"checkpoint-{result.steps}").is_dir()  # ... and saves, for --resume
    assert result.max_steps == 200  # the clock never bends the schedule: its horizon stays the 200 steps
    assert rates and all(
        rate == pytest.approx(scheduled_rate(step, 200, "linear"), rel=1e-6) for step, rate in rates.items()
    )


def test_a_cap_spent_before_the_first_step_trains_nothing(monkeypatch, tmp_path, tiny_tokenizer, windows):
    machine = FakeMachine(1e-3, 10.0)  # the first validation alone takes 21 minutes
    _, result, _, _ = run(monkeypatch, tmp_path, tiny_tokenizer, windows, machine, max_steps=5, max_minutes=1)
    assert result.stopped_because == "max_minutes" and result.steps == 0 and len(result.val_history) == 1


def test_time_left_is_right_within_a_step(monkeypatch, tmp_path, tiny_tokenizer, windows):
    machine = FakeMachine(1e-3, 5e-4)
    _, result, tracker, _ = run(
        monkeypatch, tmp_path, tiny_tokenizer, windows, machine, max_steps=30, eval_every=7
    )
    end = result.seconds
    assert len(tracker.estimates) == 30
    for step, elapsed, left in tracker.estimates:
        assert abs((end - elapsed) - left) <= machine.step_seconds(), step
    # and with a cap that binds, the estimate is what the cap leaves
    _, capped, tracker, _ = run(
        monkeypatch, tmp_path / "capped", tiny_tokenizer, windows, machine, max_steps=300, max_minutes=0.1
    )
    assert capped.stopped_because == "max_minutes"
    for step, elapsed, left in tracker.estimates[1:]:
        assert abs((capped.seconds - elapsed) - left) <= machine.step_seconds() + 4 * SEQ_LEN * 5e-4, step


@pytest.mark.parametrize("steps", [1, 2, 3, 7, 10, 50, 333])
@pytest.mark.parametrize("n_val", [1, 4, 16])
def test_the_evaluation_interval_is_the_smallest_that_keeps_validation_within_ten_percent(steps, n_val):
    plan = plan_budget(n_train=100, seq_len=64, n_val=n_val, val_seq_len=64, batch_size=4, max_steps=steps)
    train_tokens = steps * 4 * 64

    def evaluations(k):
        return 1 + steps // k + (1 if steps % k else 0)

    assert plan.total_steps == steps and plan.tokens_per_step == 256
    assert plan.evaluations == evaluations(plan.eval_every)
    spent = plan.evaluations * plan.val_windows * 64
    if not plan.notes:
        assert spent <= 0.10 * train_tokens and plan.val_windows == n_val
        if plan.eval_every > 1:
            assert (
                evaluations(plan.eval_every - 1) * n_val * 64 > 0.10 * train_tokens
            )  # one less would pass 10 %
    else:  # start and end alone would pass 10 %: the set is cut to what fits, one window at least
        assert plan.eval_every == steps and plan.evaluations == 2
        assert plan.val_windows == max(1, math.floor(0.10 * train_tokens / 2 / 64))
        if plan.val_windows < n_val:
            assert "validation cut" in plan.notes[0]
        assert (spent <= 0.10 * train_tokens) == (len(plan.notes) == 1 and plan.val_windows < n_val)


def test_budgets_are_exact_and_the_smallest_wins():
    common = dict(n_train=100, seq_len=64, n_val=1, val_seq_len=64, batch_size=4, grad_accum=2)
    assert plan_budget(**common, max_train_tokens=5 * 512 + 511).total_steps == 5  # never over the budget
    plan = plan_budget(**common, max_train_tokens=10 * 512, max_steps=7, max_epochs=1.0)
    assert (plan.total_steps, plan.horizon) == (7, "max_steps")
    plan = plan_budget(**common, max_epochs=0.5)
    assert (plan.total_steps, plan.horizon) == (math.ceil(50 / 8), "epochs")
    assert plan_budget(**common, max_steps=9, eval_every=2).eval_every == 2  # --eval-every overrides the rule
    with pytest.raises(UserError, match="less than one optimizer step"):
        plan_budget(**common, max_train_tokens=511)

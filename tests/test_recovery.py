"""Recovery fine-tuning: it learns, LoRA merges exactly, distillation vanishes at the teacher,
every budget stops the run and says why, and a resumed run continues where it stopped.

Budgets (test_recovery_budgets.py), the teacher cache (test_recovery_distill.py) and the method
registry (test_recovery_methods.py) have their own files."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import SAMPLE_TEXT, make_tiny_llama
from peft.tuners.tuners_utils import BaseTunerLayer
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from minigpts.data import make_windows, tokenize_stream
from minigpts.errors import UserError
from minigpts.evaluation import evaluate_windows, token_byte_lengths
from minigpts.options import FinetuneOptions
from minigpts.recovery import add_lora, distillation_loss, finetune, merge_lora

SEQ_LEN = 32
BATCH = FinetuneOptions().batch_size  # the default --train-batch-size


@pytest.fixture(scope="module")
def windows(tiny_tokenizer):
    """Repetitive text packed into windows: the last four are validation."""
    all_windows = make_windows(tokenize_stream(tiny_tokenizer, [SAMPLE_TEXT] * 3), SEQ_LEN)
    assert len(all_windows) >= 12
    return all_windows[:-4], all_windows[-4:]


def mean_val_loss(model, val) -> float:
    scored = evaluate_windows(model, val, torch.ones(model.config.vocab_size, dtype=torch.long))
    return scored["nll_sum"] / scored["tokens"]


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_full_finetune_lowers_validation_loss(tiny_tokenizer, windows, tmp_path):
    train, val = windows
    byte_lengths = token_byte_lengths(tiny_tokenizer)
    model = make_tiny_llama(len(tiny_tokenizer))
    before = evaluate_windows(model, val, byte_lengths)
    tuned, result = finetune(
        model, tiny_tokenizer, train, val, out_dir=tmp_path, max_steps=30, eval_every=10,
        lr=3e-3, batch_size=BATCH, byte_lengths=byte_lengths, progress=False,
    )  # fmt: skip
    after = evaluate_windows(tuned, val, byte_lengths)
    assert after["nll_sum"] < 0.8 * before["nll_sum"]

    assert result.steps == 30 and result.stopped_because == "max_steps"
    # a step budget is not cut short by a default epoch; every step is a full batch, into epoch 2
    assert result.train_tokens == 30 * BATCH * SEQ_LEN
    assert result.epochs == pytest.approx(30 * BATCH / len(train))
    assert [step for step, *_ in result.val_history] == [0, 10, 20, 30]
    step0, last = result.val_history[0], result.val_history[-1]
    assert step0[1] == pytest.approx(before["nll_sum"] / before["tokens"], rel=1e-4)
    assert last[1] == pytest.approx(after["nll_sum"] / after["tokens"], rel=1e-4)
    assert last[2] == pytest.approx(math.exp(last[1]), rel=1e-9)
    assert last[3] == pytest.approx(after["nll_sum"] / math.log(2) / after["bytes"], rel=1e-4)
    assert result.best_val_loss == min(loss for _, loss, *_ in result.val_history)
    assert result.to_dict()["val_history"][0][0] == 0

    assert not tuned.training and tuned.dtype == torch.float32 and tuned.device.type == "cpu"
    assert tuned.config.use_cache is True  # Trainer turns it off for training; we give it back
    checkpoint = AutoModelForCausalLM.from_pretrained(tmp_path / "checkpoints" / "checkpoint-30")
    assert torch.allclose(logits(checkpoint, val), logits(tuned, val), atol=1e-5)


def test_lora_merge_gives_a_plain_model_with_the_peft_logits(tiny_tokenizer, windows):
    _, val = windows
    peft_model = add_lora(make_tiny_llama(len(tiny_tokenizer)), r=4, alpha=8)
    adapted = [m for m in peft_model.modules() if isinstance(m, BaseTunerLayer)]
    assert len(adapted) == 2 * 7  # q, k, v, o, gate, up, down in both layers; not the LM head
    torch.manual_seed(1)
    for name, param in peft_model.named_parameters():
        if "lora_B" in name:  # peft starts B at zero; make the adapters matter
            param.data.normal_(std=0.05)
    expected = logits(peft_model, val)

    merged = merge_lora(peft_model)
    assert type(merged) is LlamaForCausalLM
    assert not any(isinstance(m, BaseTunerLayer) for m in merged.modules())
    assert not any("lora" in name for name, _ in merged.named_parameters())
    assert (logits(merged, val) - expected).abs().max() <= 1e-5


def test_lora_finetune_returns_merged_plain_weights(tiny_tokenizer, windows, tmp_path):
    train, val = windows
    model = make_tiny_llama(len(tiny_tokenizer))
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    tuned, result = finetune(
        model, tiny_tokenizer, train, val, out_dir=tmp_path, method="lora", max_steps=3, lr=1e-2,
        lora_r=4, lora_alpha=8, progress=False,
    )  # fmt: skip
    assert result.method == "lora" and result.steps == 3
    assert type(tuned) is LlamaForCausalLM
    assert not any(isinstance(m, BaseTunerLayer) for m in tuned.modules())
    after = tuned.state_dict()
    assert after.keys() == before.keys()
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed and all(name.endswith("proj.weight") for name in changed)  # embeddings, norms untouched


def test_distillation_loss_vanishes_when_student_equals_teacher():
    torch.manual_seed(0)
    student = torch.randn(2, 9, 50) * 3
    labels = torch.randint(0, 50, (2, 9))
    labels[0, 4] = -100
    loss, ce, kl = distillation_loss(student, student.clone(), labels, alpha=0.5, temperature=2.0)
    assert kl.abs() <= 1e-6
    assert loss.item() == pytest.approx(0.5 * ce.item(), abs=1e-6)
    reference = F.cross_entropy(student[:, :-1].reshape(-1, 50), labels[:, 1:].reshape(-1), ignore_index=-100)
    assert ce.item() == pytest.approx(reference.item(), rel=1e-6)

    _, _, kl_apart = distillation_loss(student, student + torch.randn_like(student), labels)
    assert kl_apart > 1e-3
    with pytest.raises(UserError, match="teacher_vocab_keep"):
        distillation_loss(student, torch.randn(2, 9, 60), labels)


def test_distill_run_against_an_identical_teacher_with_a_trimmed_vocabulary(
    tiny_tokenizer, windows, tmp_path
):
    """The student is the teacher with its vocabulary trimmed and renumbered: nothing to learn, zero loss."""
    train, val = windows
    teacher = make_tiny_llama(len(tiny_tokenizer))
    used = torch.unique(torch.cat([train.flatten(), val.flatten()]))
    unused = torch.tensor(sorted(set(range(len(tiny_tokenizer))) - set(used.tolist()))[:20])
    keep = torch.cat([used, unused]).flip(0)  # old ids in the new order
    new_id = torch.full((len(tiny_tokenizer),), -1, dtype=torch.long)
    new_id[keep] = torch.arange(len(keep))
    student = make_tiny_llama(len(keep))
    state = teacher.state_dict()
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        if name in state:
            state[name] = state[name][keep]
    student.load_state_dict(state)
    train_new, val_new = new_id[train], new_id[val]
    assert (logits(student, val_new) - logits(teacher, val)[..., keep]).abs().max() <= 1e-5

    # Every teacher id cached (k = its vocabulary): no student token lies outside the bins, so the
    # teacher is renormalised over the kept vocabulary and the trimmed copy matches it exactly.
    _, result = finetune(
        student, tiny_tokenizer, train_new, val_new, out_dir=tmp_path, method="distill", teacher=teacher,
        teacher_vocab_keep=keep, distill_alpha=1.0, max_steps=2, lr=1e-2, teacher_top_k=len(tiny_tokenizer),
        teacher_cache_dtype="float32", progress=False,
    )  # fmt: skip
    assert result.steps == 2
    assert result.train_loss <= 1e-6
    assert not teacher.training
    assert result.method_stats["teacher_windows_computed"] == 2 * BATCH  # only the windows two steps reach


def test_resume_continues_from_the_saved_step(tiny_tokenizer, windows, tmp_path):
    train, val = windows
    vocab = len(tiny_tokenizer)
    options = dict(eval_every=2, lr=3e-3, scheduler="constant", warmup_ratio=0.0, progress=False)
    _, first = finetune(
        make_tiny_llama(vocab), tiny_tokenizer, train, val, out_dir=tmp_path, max_steps=4, **options
    )
    assert first.steps == 4 and first.resumed_from_step is None
    assert (tmp_path / "checkpoints" / "checkpoint-4").is_dir()
    with pytest.raises(UserError, match="--resume"):
        finetune(make_tiny_llama(vocab), tiny_tokenizer, train, val, out_dir=tmp_path, max_steps=8, **options)

    # A differently initialised model: the weights must come from the checkpoint.
    resumed, second = finetune(
        make_tiny_llama(vocab, seed=5), tiny_tokenizer, train, val, out_dir=tmp_path, max_steps=8, resume=True,
        **options,
    )  # fmt: skip
    assert second.resumed_from_step == 4 and second.steps == 8
    assert [step for step, *_ in second.val_history] == [0, 2, 4, 6, 8]
    assert [loss for _, loss, *_ in second.val_history[:3]] == [loss for _, loss, *_ in first.val_history]
    assert second.train_tokens == 8 * BATCH * SEQ_LEN
    assert second.seconds >= first.seconds  # the wall clock adds up over the two runs

    straight, _ = finetune(
        make_tiny_llama(vocab),
        tiny_tokenizer,
        train,
        val,
        out_dir=tmp_path / "straight",
        max_steps=8,
        **options,
    )
    assert (logits(resumed, val) - logits(straight, val)).abs().max() <= 1e-4

    with pytest.raises(UserError, match="already at the budget"):
        finetune(
            make_tiny_llama(vocab),
            tiny_tokenizer,
            train,
            val,
            out_dir=tmp_path,
            max_steps=8,
            resume=True,
            **options,
        )


def test_stop_at_ppl_stops_as_soon_as_validation_reaches_the_target(tiny_tokenizer, windows, tmp_path):
    train, val = windows
    model = make_tiny_llama(len(tiny_tokenizer))
    target = 0.7 * math.exp(mean_val_loss(model, val))
    _, result = finetune(
        model, tiny_tokenizer, train, val, out_dir=tmp_path, max_epochs=None, max_steps=60, eval_every=2, lr=3e-3,
        stop_at_ppl=target, progress=False,
    )  # fmt: skip
    assert result.stopped_because == "stop_at_ppl"
    assert result.steps < 60 and result.steps % 2 == 0
    ppls = [ppl for _, _, ppl, _ in result.val_history]
    assert ppls[-1] <= target and all(ppl > target for ppl in ppls[:-1])


def test_stop_at_ppl_already_met_trains_nothing(tiny_tokenizer, windows, tmp_path):
    train, val = windows
    model = make_tiny_llama(len(tiny_tokenizer))
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    tuned, result = finetune(
        model, tiny_tokenizer, train, val, out_dir=tmp_path, max_steps=10, stop_at_ppl=1e9, progress=False
    )
    assert result.stopped_because == "stop_at_ppl" and result.steps == 0
    assert len(result.val_history) == 1
    assert all(torch.equal(before[name], tensor) for name, tensor in tuned.state_dict().items())


def test_early_stopping_on_a_diverging_run_returns_the_best_checkpoint(tiny_tokenizer, windows, tmp_path):
    train, val = windows
    tuned, result = finetune(
        make_tiny_llama(len(tiny_tokenizer)), tiny_tokenizer, train, val, out_dir=tmp_path, max_epochs=None,
        max_steps=40, eval_every=1, lr=5.0, early_stopping_patience=2, progress=False,
    )  # fmt: skip
    assert result.stopped_because == "early_stopping" and result.steps < 40
    saved_losses = [loss for step, loss, *_ in result.val_history if step > 0]
    assert mean_val_loss(tuned, val) == pytest.approx(min(saved_losses), rel=1e-4)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (dict(method="bogus"), "--method bogus"),
        (dict(method="distill"), "teacher"),
        (dict(max_steps=0), "--max-steps"),
        (dict(max_epochs=0), "--max-epochs 0"),
        (dict(resume=True), "no checkpoint"),
        (dict(warmup_ratio=1.5), "--warmup-ratio"),
        (dict(scheduler="zigzag"), "--lr-scheduler zigzag"),
        (dict(batch_size=0), "--train-batch-size 0"),
        (dict(grad_accum=0), "--grad-accum 0"),
        (
            dict(max_train_tokens=10),
            f"--max-train-tokens 10: less than one optimizer step of {BATCH * SEQ_LEN}",
        ),
        (dict(eval_every=0), "--eval-every 0"),
        (dict(method="distill", teacher=make_tiny_llama(7)), "teacher predicts 7 tokens"),
        (dict(method="lora", lora_r=0), "--lora-r 0"),
    ],
)
def test_bad_options_are_user_errors(tiny_tokenizer, windows, tmp_path, options, message):
    train, val = windows
    with pytest.raises(UserError, match=message):
        finetune(
            make_tiny_llama(len(tiny_tokenizer)), tiny_tokenizer, train, val, out_dir=tmp_path, **options
        )


def test_empty_split_is_a_user_error(tiny_tokenizer, windows, tmp_path):
    train, _ = windows
    with pytest.raises(UserError, match="validation"):
        finetune(make_tiny_llama(len(tiny_tokenizer)), tiny_tokenizer, train, train[:0], out_dir=tmp_path)

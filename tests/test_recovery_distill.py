"""Distillation costs what fine-tuning costs: the teacher's top-k is cached once per training window.

The cache holds what a direct computation gives; with k = the vocabulary the cached loss is the exact
dense KL; and however many epochs, steps, resumed runs and controls share a cache, the teacher sees
each training window once.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import SAMPLE_TEXT, make_tiny_llama

from minigpts.data import make_windows, tokenize_stream
from minigpts.recovery import (
    TeacherCache,
    distillation_loss,
    finetune,
    sparse_distillation_loss,
    teacher_fingerprint,
)

SEQ_LEN = 32


@pytest.fixture(scope="module")
def windows(tiny_tokenizer):
    all_windows = make_windows(tokenize_stream(tiny_tokenizer, [SAMPLE_TEXT] * 3), SEQ_LEN)
    return all_windows[:16], all_windows[-4:]


def full_logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


class TeacherCounter:
    """Counts the training windows a teacher runs on (full-length windows; not the 8-token probe)."""

    def __init__(self, teacher):
        self.windows = 0
        teacher.register_forward_hook(self.hook, with_kwargs=True)

    def hook(self, module, args, kwargs, output):
        ids = kwargs["input_ids"]
        if ids.shape[-1] == SEQ_LEN:
            self.windows += ids.shape[0]


@pytest.mark.parametrize("dtype, tolerance", [("float32", 1e-5), ("float16", 2e-3)])
def test_cached_top_k_and_lse_equal_a_direct_computation(tiny_tokenizer, windows, tmp_path, dtype, tolerance):
    train, _ = windows
    teacher = make_tiny_llama(len(tiny_tokenizer))
    cache = TeacherCache(tmp_path, teacher, top_k=16, dtype=dtype)
    targets = cache.targets(train, range(5, 11), batch_size=4)  # windows 5..10 only
    assert cache.windows_computed == 6
    logits = full_logits(teacher, train)[:, :-1].float()
    lse = torch.logsumexp(logits, dim=-1)
    top_values, top_ids = logits.topk(16, dim=-1)
    rows = torch.tensor([5, 9, 10])
    ids, logprobs = targets.batch(rows, "cpu")
    assert torch.equal(ids, top_ids[rows])
    assert torch.allclose(logprobs, top_values[rows] - lse[rows].unsqueeze(-1), atol=tolerance, rtol=0)
    assert np.allclose(targets.lse(9), lse[9].numpy(), atol=1e-5)
    shard = targets.shards[0]
    assert isinstance(shard["ids"], np.memmap) and shard["ids"].dtype == np.int32
    assert shard["logprobs"].dtype == np.dtype(dtype) and shard["lse"].dtype == np.float32
    with pytest.raises(RuntimeError, match="missing"):
        targets.batch(torch.tensor([0]), "cpu")

    # A second lookup runs the teacher only on the windows no shard holds; another teacher has its own entry.
    again = TeacherCache(tmp_path, teacher, top_k=16, dtype=dtype)
    again.targets(train, range(8, 14))
    assert again.windows_computed == 3
    other = make_tiny_llama(len(tiny_tokenizer), seed=3)
    assert teacher_fingerprint(other) != teacher_fingerprint(teacher)
    assert TeacherCache(tmp_path, other, top_k=16, dtype=dtype).dir != cache.dir


def test_cached_loss_is_the_exact_kl_when_k_is_the_vocabulary(tiny_tokenizer, windows, tmp_path):
    train, _ = windows
    vocab = len(tiny_tokenizer)
    teacher = make_tiny_llama(vocab)
    ids = train[:3]
    targets = TeacherCache(tmp_path, teacher, top_k=vocab, dtype="float32").targets(ids, range(3))
    top_ids, logprobs = targets.batch(torch.arange(3), "cpu")
    teacher_logits = full_logits(teacher, ids)
    torch.manual_seed(0)
    student_logits = teacher_logits + torch.randn_like(teacher_logits)
    labels = ids.clone()
    labels[0, 5] = -100
    for alpha, temperature in ((0.5, 2.0), (1.0, 1.0), (0.3, 0.7)):
        dense = distillation_loss(student_logits, teacher_logits, labels, alpha, temperature)
        sparse = sparse_distillation_loss(
            student_logits, top_ids, logprobs, labels, alpha=alpha, temperature=temperature,
            teacher_vocab_size=vocab,
        )  # fmt: skip
        for a, b in zip(sparse, dense):
            assert a.item() == pytest.approx(b.item(), rel=1e-5, abs=1e-6)

    # A trimmed student vocabulary with every teacher id cached: the teacher renormalised over the kept ids.
    keep = torch.randperm(vocab, generator=torch.Generator().manual_seed(1))[:150]
    student_of_teacher = torch.full((vocab,), -1, dtype=torch.long)
    student_of_teacher[keep] = torch.arange(150)
    new_id_labels = torch.randint(0, 150, labels.shape)
    student_small = torch.randn(3, SEQ_LEN, 150)
    dense = distillation_loss(student_small, teacher_logits[..., keep], new_id_labels, 0.5, 2.0)
    sparse = sparse_distillation_loss(
        student_small, top_ids, logprobs, new_id_labels, alpha=0.5, temperature=2.0, teacher_vocab_size=vocab,
        student_of_teacher=student_of_teacher,
    )  # fmt: skip
    assert sparse[2].item() == pytest.approx(dense[2].item(), rel=1e-5)


def reference_sparse_kd(
    student_logits, teacher_ids, teacher_logprobs, labels, alpha, temperature, vocab_t, mapping
):
    """The loss spelled out with autograd: bins, tail, tempered KL, means over scored positions."""
    targets = labels[:, 1:]
    scored = targets != -100
    s = student_logits[:, :-1][scored].float()
    tid, tlp = teacher_ids[scored].long(), teacher_logprobs[scored].float()
    sid = tid if mapping is None else mapping[tid]
    valid = sid >= 0
    s_lp = torch.log_softmax(s, -1)
    ce = -s_lp.gather(-1, targets[scored].unsqueeze(-1)).mean()
    covered = torch.zeros_like(s, dtype=torch.bool)
    for row in range(len(s)):
        covered[row, sid[row][valid[row]]] = True
    s_bins = s_lp.gather(-1, sid.clamp_min(0))
    s_tail = torch.logsumexp(s_lp.masked_fill(covered, -1e30), -1)
    t_p = tlp.exp()
    t_tail = (t_p * ~valid).sum(-1) + ((1 - t_p.sum(-1)).clamp_min(0) if tid.shape[-1] < vocab_t else 0)
    active = torch.cat([valid, (valid.sum(-1) < s.shape[-1]).unsqueeze(-1)], -1)
    t_all = torch.cat([tlp, t_tail.clamp_min(1e-30).log().unsqueeze(-1)], -1).masked_fill(~active, -1e30)
    s_all = torch.cat([s_bins, s_tail.unsqueeze(-1)], -1).masked_fill(~active, -1e30)
    t_log = torch.log_softmax(t_all / temperature, -1)
    s_log = torch.log_softmax(s_all / temperature, -1)
    kl = torch.where(active, t_log.exp() * (t_log - s_log), 0.0).sum(-1).mean()
    return (1 - alpha) * ce + alpha * temperature**2 * kl, ce, kl


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("trimmed", [False, True])
def test_the_fused_loss_and_its_gradient_match_autograd(temperature, trimmed):
    """The loss runs as one function with an analytic gradient (a plain CE's cost); autograd agrees."""
    torch.manual_seed(0)
    vocab_t, k, b, length = 60, 12, 2, 7
    teacher_logits = torch.randn(b, length - 1, vocab_t) * 3
    top = torch.log_softmax(teacher_logits, -1).topk(k, -1)
    mapping = None
    vocab_s = vocab_t
    if trimmed:  # a student keeping 40 of the 60 ids: some top-k ids fall into the tail
        keep = torch.randperm(vocab_t)[:40]
        mapping = torch.full((vocab_t,), -1, dtype=torch.long)
        mapping[keep] = torch.arange(40)
        vocab_s = 40
    labels = torch.randint(0, vocab_s, (b, length))
    labels[1, 3] = -100
    student = (torch.randn(b, length, vocab_s) * 2).requires_grad_()
    reference = reference_sparse_kd(
        student, top.indices, top.values, labels, 0.3, temperature, vocab_t, mapping
    )
    reference[0].backward()
    expected_grad, student.grad = student.grad.clone(), None
    fused = sparse_distillation_loss(
        student, top.indices, top.values, labels, alpha=0.3, temperature=temperature, teacher_vocab_size=vocab_t,
        student_of_teacher=mapping,
    )  # fmt: skip
    fused[0].backward()
    for a, b_ in zip(fused, reference):
        assert a.item() == pytest.approx(b_.item(), rel=1e-5, abs=1e-7)
    assert torch.allclose(student.grad, expected_grad, rtol=1e-4, atol=1e-7)
    assert (student.grad[:, -1] == 0).all()  # the last position predicts nothing


def test_top_k_keeps_the_tail_mass_in_one_bin(tiny_tokenizer, windows, tmp_path):
    """k < vocabulary: the KL of both distributions coarsened to the k teacher ids + everything else."""
    train, _ = windows
    vocab, k, temperature = len(tiny_tokenizer), 8, 2.0
    teacher = make_tiny_llama(vocab)
    ids = train[:2]
    targets = TeacherCache(tmp_path, teacher, top_k=k, dtype="float32").targets(ids, range(2))
    top_ids, logprobs = targets.batch(torch.arange(2), "cpu")
    torch.manual_seed(0)
    student_logits = torch.randn(2, SEQ_LEN, vocab, requires_grad=True)
    _, _, kl = sparse_distillation_loss(
        student_logits, top_ids, logprobs, ids, alpha=1.0, temperature=temperature, teacher_vocab_size=vocab
    )

    p = F.softmax(full_logits(teacher, ids)[:, :-1].double(), -1)
    q = F.softmax(student_logits[:, :-1].detach().double(), -1)
    index = top_ids.long()
    p_bins, q_bins = p.gather(-1, index), q.gather(-1, index)
    p_bins = torch.cat([p_bins, 1 - p_bins.sum(-1, keepdim=True)], -1)
    q_bins = torch.cat([q_bins, 1 - q_bins.sum(-1, keepdim=True)], -1)
    pt = F.softmax(p_bins.log() / temperature, -1)
    qt = F.softmax(q_bins.log() / temperature, -1)
    expected = (pt * (pt.log() - qt.log())).sum(-1).mean()
    assert kl.item() == pytest.approx(expected.item(), rel=1e-4)

    loss, _, _ = sparse_distillation_loss(
        student_logits, top_ids, logprobs, ids, alpha=0.5, temperature=temperature, teacher_vocab_size=vocab
    )
    loss.backward()
    assert torch.isfinite(student_logits.grad).all()


def test_the_teacher_sees_each_training_window_once_whatever_uses_the_cache(
    tiny_tokenizer, windows, tmp_path
):
    train, val = windows
    vocab = len(tiny_tokenizer)
    teacher = make_tiny_llama(vocab)
    counter = TeacherCounter(teacher)
    cache_dir = tmp_path / "shared-cache"
    common = dict(
        method="distill", teacher=teacher, teacher_cache=cache_dir, batch_size=4, lr=1e-3, progress=False
    )

    # 3 steps reach 12 of the 16 windows: only those are computed
    _, short = finetune(
        make_tiny_llama(vocab, seed=1), tiny_tokenizer, train, val, out_dir=tmp_path / "a", max_epochs=None,
        max_steps=3, **common,
    )  # fmt: skip
    assert counter.windows == 12 == short.method_stats["teacher_windows_computed"]
    # three epochs: the 4 windows left, once
    _, long = finetune(
        make_tiny_llama(vocab, seed=1),
        tiny_tokenizer,
        train,
        val,
        out_dir=tmp_path / "b",
        max_epochs=3.0,
        **common,
    )
    assert long.steps == 12 and long.method_stats["teacher_windows_computed"] == 4
    # a control (another student on the same windows): nothing
    _, control = finetune(
        make_tiny_llama(vocab, seed=2),
        tiny_tokenizer,
        train,
        val,
        out_dir=tmp_path / "c",
        max_steps=5,
        **common,
    )
    assert control.method_stats["teacher_windows_computed"] == 0
    assert counter.windows == len(train)  # one pass over the training tokens, for all three runs
    assert long.method_stats["teacher_windows"] == len(train)

    # the same student and budget give the same run from a cold or a warm cache
    _, cold = finetune(
        make_tiny_llama(vocab, seed=1), tiny_tokenizer, train, val, out_dir=tmp_path / "d", max_epochs=None,
        max_steps=3, **(common | {"teacher_cache": tmp_path / "cold"}),
    )  # fmt: skip
    assert cold.val_history == short.val_history and cold.train_loss == short.train_loss


def test_a_distillation_step_runs_no_teacher_forward(tiny_tokenizer, windows, tmp_path):
    """The training loop itself never calls the teacher: a distill step is a plain step plus a lookup."""
    train, val = windows
    vocab = len(tiny_tokenizer)
    teacher = make_tiny_llama(vocab)
    TeacherCache(tmp_path / "cache", teacher).targets(train, range(len(train)))
    counter = TeacherCounter(teacher)
    _, result = finetune(
        make_tiny_llama(vocab, seed=1), tiny_tokenizer, train, val, out_dir=tmp_path / "run", method="distill",
        teacher=teacher, teacher_cache=tmp_path / "cache", max_epochs=None, max_steps=6, progress=False,
    )  # fmt: skip
    assert result.steps == 6 and counter.windows == 0

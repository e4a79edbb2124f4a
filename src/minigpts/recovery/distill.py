"""Distillation from the unpruned model at the cost of plain fine-tuning: the teacher runs once.

**The cache.** For every training window the teacher's next-token prediction at each position is
reduced to its top-k token ids (int32), their logits and the log-sum-exp of all logits (float32).
The logits are stored normalised — logit − lse, i.e. log-probabilities — so float16 (the default)
keeps its precision where the probability mass is; raw logits are those plus the stored lse. The
teacher's LM head is applied a few hundred positions at a time (as evaluation does), so the full
logits of a batch never exist. Entries live under ``<cache dir>/teacher-<fingerprint>-top<k>-<dtype>/``
(the fingerprint hashes every teacher weight) in append-only shards of ``.npy`` files read back
memory-mapped; windows are found by a hash of their teacher token ids. A run computes only the
windows its step budget reaches that no shard holds yet, so one pass over the training tokens serves
every epoch, step, resumed run, control and sweep setting that shares the directory (``--teacher-cache``).

**The loss.** With t the teacher's and s the student's log-probabilities, the k cached ids are k bins
and everything else one tail bin: the teacher's tail is 1 − Σ top-k (plus the mass of top-k ids that a
trimmed student vocabulary lacks), the student's its probability outside the bins. Training minimises

    (1 − α)·CE + α·T²·KL( softmax(t_bins / T) ‖ softmax(s_bins / T) )

over the k + 1 bins (T² keeps the gradient on the CE scale; Hinton, Vinyals & Dean 2015,
arXiv:1503.02531). At T = 1 this is the exact KL of the two distributions coarsened to those bins: a
lower bound of the full KL that keeps the teacher's tail mass instead of renormalising the top-k — the
bias that Anshumann et al., "Sparse Logit Sampling: Accelerating Knowledge Distillation in LLMs"
(ACL 2025, arXiv:2503.16870) show for plain top-k caching. With k = vocabulary size it is the exact,
dense KL (``distillation_loss``) at any T; when the student has no token outside the bins (k ≥ its
vocabulary) the tail bin is dropped and the teacher is renormalised over the student's vocabulary.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import uuid
import weakref
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from minigpts.errors import UserError
from minigpts.recovery.methods import vocab_size_of
from minigpts.recovery.trainer import RecoveryTrainer

CACHE_VERSION = 1
CACHE_DTYPES = ("float16", "float32")
_NEG = -1e30  # a log-probability that is zero after exp, yet finite (no NaN in the gradient)
_fingerprints: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _vocab_mismatch(teacher_vocab: int, student_vocab: int) -> UserError:
    """One message for a teacher and student of different vocabularies, from the option check or the loss."""
    return UserError(
        f"--method distill: the teacher predicts {teacher_vocab} tokens and the student "
        f"{student_vocab}; give teacher_vocab_keep when the student's vocabulary was trimmed"
    )


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    alpha: float = 0.5,
    temperature: float = 2.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Dense reference: (1-α)·CE + α·T²·KL(softmax(teacher/T) ‖ softmax(student/T)) on next-token predictions.

    Positions are shifted as the model's own loss does; labels equal to -100 are not scored. Returns
    (loss, ce, kl), ce and kl detached. Training uses ``sparse_distillation_loss`` on cached targets.
    """
    if student_logits.shape[-1] != teacher_logits.shape[-1]:
        raise _vocab_mismatch(teacher_logits.shape[-1], student_logits.shape[-1])
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


def sparse_distillation_loss(
    student_logits: torch.Tensor,
    teacher_ids: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    labels: torch.Tensor,
    *,
    alpha: float = 0.5,
    temperature: float = 2.0,
    teacher_vocab_size: int,
    student_of_teacher: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(1-α)·CE + α·T²·KL over the teacher's top-k bins plus one tail bin (see the module's docstring).

    ``student_logits`` [B, L, V_s]; ``teacher_ids``/``teacher_logprobs`` [B, L-1, k]: the teacher's
    top-k ids (its own vocabulary) and log-probabilities at T = 1 for the prediction at each position
    but the last; ``student_of_teacher`` [V_t] maps teacher ids to student ids (-1: not kept; None: the
    same vocabulary). Means over the positions whose label is not -100. Returns (loss, ce, kl), ce and
    kl detached.

    One autograd function with the analytic gradient, so a step costs what cross-entropy costs (a few
    passes over the [B, L, V] logits): with g_j = (Q_j − P_j)/T the gradient of the KL with respect to
    the student's log-probability of bin j (P, Q the tempered teacher and student bin distributions),
    d KL / d logit_v = g_bin(v) for a token in the bins and g_tail · p_v / q_tail for one in the tail.
    """
    targets = labels[:, 1:]
    scored = targets != -100
    weights = scored.float() / scored.sum().clamp_min(1)
    tid = teacher_ids.long()
    tlp = teacher_logprobs.float()
    sid = tid if student_of_teacher is None else student_of_teacher.to(tid.device)[tid]
    valid = sid >= 0
    vocab = student_logits.shape[-1]
    has_rest = valid.sum(-1) < vocab  # the student has tokens outside the bins: the tail bin exists
    t_p = tlp.exp()
    t_tail = (t_p * ~valid).sum(-1)  # top-k mass the student's vocabulary lacks
    if tid.shape[-1] < teacher_vocab_size:
        t_tail = t_tail + (1 - t_p.sum(-1)).clamp_min(0)
    active = torch.cat([valid, has_rest.unsqueeze(-1)], -1)
    t_bins = torch.cat([tlp, torch.log(t_tail.clamp_min(1e-30)).unsqueeze(-1)], -1).masked_fill(~active, _NEG)
    t_log = F.log_softmax(t_bins / temperature, dim=-1)
    loss, ce, kl = _SparseKD.apply(
        student_logits, targets.clamp_min(0), weights, torch.where(valid, sid, 0), valid, active, t_log, alpha,
        temperature,
    )  # fmt: skip
    return loss, ce.detach(), kl.detach()


class _SparseKD(torch.autograd.Function):
    """Forward and gradient of ``sparse_distillation_loss`` with the [B, L, V] work done in place."""

    @staticmethod
    def forward(ctx, logits, targets, weights, index, valid, active, t_log, alpha, temperature):
        x = logits[:, :-1]
        xf = x if x.dtype == torch.float32 else x.float()
        lse = torch.logsumexp(xf, dim=-1)
        grad = torch.empty(logits.shape, dtype=torch.float32, device=logits.device)
        grad[:, -1].zero_()
        p = grad[:, :-1]
        torch.sub(xf, lse.unsqueeze(-1), out=p)
        p.exp_()  # the student's probabilities; the bins are zeroed below, the tail stays
        p_bins = p.gather(-1, index)
        x_bins = xf.gather(-1, index)
        ce_pos = lse - xf.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        keep = (~valid).to(
            p.dtype
        )  # multiply the bins by 0, anything else by 1 (order-free, so deterministic)
        p.scatter_reduce_(-1, index, keep, reduce="prod")
        q_tail = p.sum(-1).clamp_min(1e-30)  # exact: a sum of the tail's probabilities, no 1 − Σ cancellation
        s_bins = torch.cat([x_bins - lse.unsqueeze(-1), q_tail.log().unsqueeze(-1)], -1).masked_fill(
            ~active, _NEG
        )
        s_log = F.log_softmax(s_bins / temperature, dim=-1)
        t_prob = t_log.exp()
        kl_pos = torch.where(active, t_prob * (t_log - s_log), 0.0).sum(-1)
        ce = (weights * ce_pos).sum()
        kl = (weights * kl_pos).sum()
        g = torch.where(active, (s_log.exp() - t_prob) / temperature, 0.0)
        ctx.save_for_backward(grad, p_bins, g, q_tail, index, valid, targets, weights)
        ctx.mark_non_differentiable(ce, kl)  # reported values; the gradient is the mixed loss's
        ctx.alpha, ctx.temperature, ctx.dtype = alpha, temperature, logits.dtype
        return (1 - alpha) * ce + alpha * temperature**2 * kl, ce, kl

    @staticmethod
    def backward(ctx, grad_loss, grad_ce, grad_kl):
        grad, p_bins, g, q_tail, index, valid, targets, weights = ctx.saved_tensors
        alpha, scale = ctx.alpha, ctx.alpha * ctx.temperature**2
        w = weights * grad_loss
        p = grad[:, :-1]  # the tail's probabilities (bins zeroed)
        tail = (1 - alpha) + scale * g[..., -1] / q_tail  # CE's p_v plus the KL's g_tail·p_v/q_tail
        p.mul_((w * tail).unsqueeze(-1))
        bins = (w.unsqueeze(-1) * ((1 - alpha) * p_bins + scale * g[..., :-1])).masked_fill(~valid, 0.0)
        p.scatter_add_(-1, index, bins)
        p.scatter_add_(-1, targets.unsqueeze(-1), (-(1 - alpha) * w).unsqueeze(-1))
        return grad.to(ctx.dtype), None, None, None, None, None, None, None, None


# --------------------------------------------------------------------------------------------------
# The cache


def teacher_fingerprint(teacher) -> str:
    """A hash of the teacher's class and every weight (names, shapes, dtypes, bytes).

    Remembered per module while no parameter changes in place (torch's version counters), so a
    sweep hashes its teacher once.
    """
    versions = tuple(p._version for p in teacher.parameters())
    known = _fingerprints.get(teacher)
    if known is not None and known[0] == versions:
        return known[1]
    h = hashlib.blake2b(digest_size=16)
    h.update(type(teacher).__name__.encode())
    for name, tensor in teacher.state_dict().items():
        h.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        h.update(tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    digest = h.hexdigest()
    _fingerprints[teacher] = (versions, digest)
    return digest


def _digests(windows: np.ndarray) -> list[str]:
    windows = np.ascontiguousarray(windows, dtype=np.int64)
    return [hashlib.blake2b(row.tobytes(), digest_size=16).hexdigest() for row in windows]


@torch.inference_mode()
def teacher_topk(teacher, ids: torch.Tensor, k: int, head) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(top-k ids int32, their log-probabilities, lse) of the predictions at every position but the last.

    ``head`` is ``evaluation.deferred_head``'s: the model then returns hidden states and the head is
    applied ``LOGIT_CHUNK_ELEMENTS`` logits at a time; None: the model's logits as they are.
    """
    from minigpts.evaluation import LOGIT_CHUNK_ELEMENTS

    out = teacher(input_ids=ids, use_cache=False).logits[:, :-1]
    b, positions = out.shape[:2]
    flat = out.reshape(b * positions, -1)
    vocab = head.out_features if head is not None else flat.shape[-1]
    chunk = max(1, LOGIT_CHUNK_ELEMENTS // vocab)
    top_ids, top_lp, lses = [], [], []
    for start in range(0, flat.shape[0], chunk):
        piece = flat[start : start + chunk]
        with torch.autocast(piece.device.type, enabled=False):  # the LM head in fp32 even under autocast
            logits = head(piece.float()) if head is not None else piece.float()
        lse = torch.logsumexp(logits, dim=-1)
        values, indices = logits.topk(k, dim=-1)
        top_ids.append(indices.to(torch.int32))
        top_lp.append(values - lse.unsqueeze(-1))
        lses.append(lse)
    shape = (b, positions)
    return (
        torch.cat(top_ids).view(*shape, k),
        torch.cat(top_lp).view(*shape, k),
        torch.cat(lses).view(*shape),
    )


class TeacherTargets:
    """The cached top-k of each training window, looked up by window index, read memory-mapped."""

    def __init__(self, shards: list[dict], locations: np.ndarray):
        self.shards = shards  # {"ids": memmap [n, L-1, k], "logprobs": …, "lse": …}
        self.locations = locations  # [N, 2]: (shard, row) of every window index; -1 when not cached

    def batch(self, window_index: torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids LongTensor, log-probabilities float32), each [B, L-1, k], of these windows."""
        rows = [self.locations[int(i)] for i in window_index.tolist()]
        if any(shard < 0 for shard, _ in rows):
            raise RuntimeError("a training window is missing from the teacher cache")
        ids = np.stack([self.shards[shard]["ids"][row] for shard, row in rows])
        logprobs = np.stack([self.shards[shard]["logprobs"][row] for shard, row in rows])
        return (
            torch.from_numpy(ids.astype(np.int64)).to(device),
            torch.from_numpy(logprobs.astype(np.float32)).to(device),
        )

    def lse(self, window: int) -> np.ndarray:
        shard, row = self.locations[window]
        return np.asarray(self.shards[shard]["lse"][row])


class TeacherCache:
    """A directory of a teacher's top-k predictions for token windows (see the module's docstring)."""

    def __init__(
        self, root, teacher, *, top_k: int = 64, dtype: str = "float16", bf16_autocast: bool = False
    ):
        if dtype not in CACHE_DTYPES:
            raise UserError(f"teacher cache dtype {dtype}: use one of {', '.join(CACHE_DTYPES)}")
        self.teacher = teacher
        self.vocab_size = vocab_size_of(teacher)
        self.top_k = min(top_k, self.vocab_size)
        self.dtype = dtype
        self.bf16_autocast = bf16_autocast  # the teacher's pass under bf16 autocast (a cache of its own)
        self.key = teacher_fingerprint(teacher)
        self.dir = (
            Path(root) / f"teacher-{self.key}-top{self.top_k}-{dtype}{'-bf16pass' if bf16_autocast else ''}"
        )
        self.windows_computed = 0  # windows this object ran the teacher on
        self.seconds = 0.0

    def _shards(self) -> list[Path]:
        if not self.dir.is_dir():
            return []
        return sorted(
            p for p in self.dir.iterdir() if p.name.startswith("shard-") and (p / "meta.json").is_file()
        )

    def _open(self) -> tuple[list[dict], dict[str, tuple[int, int]]]:
        shards, index = [], {}
        for number, path in enumerate(self._shards()):
            shard = {
                name: np.load(path / f"{name}.npy", mmap_mode="r") for name in ("ids", "logprobs", "lse")
            }
            shards.append(shard)
            for row, digest in enumerate(_digests(np.load(path / "windows.npy", mmap_mode="r"))):
                index.setdefault(digest, (number, row))
        return shards, index

    def targets(
        self, windows: torch.Tensor, rows, *, batch_size: int = 8, device=None, progress: bool = False
    ) -> TeacherTargets:
        """Targets for ``windows[rows]`` (teacher token ids), running the teacher on the uncached ones only."""
        windows_np = windows.to(torch.int64).numpy()
        rows = sorted({int(r) for r in rows})
        digests = _digests(windows_np[rows]) if rows else []
        shards, index = self._open()
        missing = sorted({d: r for d, r in zip(digests, rows) if d not in index}.values())
        if missing:
            self._build(windows_np[missing], batch_size=batch_size, device=device, progress=progress)
            shards, index = self._open()
        locations = np.full((len(windows_np), 2), -1, dtype=np.int64)
        for digest, row in zip(digests, rows):
            locations[row] = index[digest]
        return TeacherTargets(shards, locations)

    def _shard_meta(self, n: int, length: int) -> dict:
        """A shard's meta.json: what produced it and how its arrays are laid out."""
        return {
            "version": CACHE_VERSION,
            "teacher": self.key,
            "teacher_class": type(self.teacher).__name__,
            "teacher_vocab_size": self.vocab_size,
            "top_k": self.top_k,
            "dtype": self.dtype,
            "bf16_autocast": self.bf16_autocast,
            "windows": n,
            "seq_len": length,
            "stored": "ids int32 [n, L-1, k]; logprobs = logit - lse [n, L-1, k]; lse float32 [n, L-1]",
        }

    def _build(self, windows: np.ndarray, *, batch_size: int, device, progress: bool) -> None:
        from numpy.lib.format import open_memmap

        from minigpts.evaluation import deferred_head

        start = time.perf_counter()
        teacher = self.teacher
        first = next(teacher.parameters())
        home, was_training = first.device, teacher.training
        device = torch.device(device) if device is not None else home
        n, length = windows.shape
        k = self.top_k
        tmp = self.dir / f".tmp-{uuid.uuid4().hex}"
        tmp.mkdir(parents=True)
        bar = None
        try:
            teacher.eval().to(device)
            files = {
                "windows": open_memmap(tmp / "windows.npy", "w+", np.int32, (n, length)),
                "ids": open_memmap(tmp / "ids.npy", "w+", np.int32, (n, length - 1, k)),
                "logprobs": open_memmap(tmp / "logprobs.npy", "w+", np.dtype(self.dtype), (n, length - 1, k)),
                "lse": open_memmap(tmp / "lse.npy", "w+", np.float32, (n, length - 1)),
            }
            files["windows"][:] = windows
            if progress:
                from tqdm.auto import tqdm

                bar = tqdm(total=n * length, desc="teacher cache", unit="tok", leave=False)
            probe = torch.as_tensor(windows[0, :8], dtype=torch.long, device=device).unsqueeze(0)
            autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.bf16_autocast)
            with torch.inference_mode(), autocast, deferred_head(teacher, probe) as head:
                for at in range(0, n, batch_size):
                    ids = torch.as_tensor(windows[at : at + batch_size], dtype=torch.long, device=device)
                    top_ids, top_lp, lse = teacher_topk(teacher, ids, k, head)
                    files["ids"][at : at + len(ids)] = top_ids.cpu().numpy()
                    files["logprobs"][at : at + len(ids)] = top_lp.cpu().numpy().astype(self.dtype)
                    files["lse"][at : at + len(ids)] = lse.cpu().numpy()
                    if bar is not None:
                        bar.update(ids.numel())
            for array in files.values():
                array.flush()
            del files
            (tmp / "meta.json").write_text(json.dumps(self._shard_meta(n, length), indent=1))
            os.replace(tmp, self.dir / f"shard-{time.time_ns():020d}-{uuid.uuid4().hex[:8]}")
        finally:
            if bar is not None:
                bar.close()
            if tmp.exists():
                import shutil

                shutil.rmtree(tmp, ignore_errors=True)
            teacher.to(home).train(was_training)
        self.windows_computed += n
        self.seconds += time.perf_counter() - start


# --------------------------------------------------------------------------------------------------
# The recovery method's parts


def check_distill_options(ctx) -> None:
    options = ctx.options
    if not 0 <= options["distill_alpha"] <= 1:
        raise UserError(f"--distill-alpha {options['distill_alpha']}: must be in [0, 1]")
    if not options["distill_temperature"] > 0:
        raise UserError(f"--distill-temperature {options['distill_temperature']}: must be positive")
    if options["teacher_top_k"] < 1:
        raise UserError(f"--teacher-top-k {options['teacher_top_k']}: must be at least 1")
    if options["teacher_cache_dtype"] not in CACHE_DTYPES:
        raise UserError(
            f"teacher_cache_dtype {options['teacher_cache_dtype']}: use one of {', '.join(CACHE_DTYPES)}"
        )
    teacher_vocab = vocab_size_of(ctx.teacher)
    keep = ctx.teacher_vocab_keep
    if keep is None and teacher_vocab != ctx.student_vocab_size:
        raise _vocab_mismatch(teacher_vocab, ctx.student_vocab_size)
    if keep is not None:
        if len(keep) != ctx.student_vocab_size:
            raise UserError(
                f"--method distill: teacher_vocab_keep names {len(keep)} tokens, the student has "
                f"{ctx.student_vocab_size}"
            )
        if len(keep) and (int(keep.max()) >= teacher_vocab or int(keep.min()) < 0):
            raise UserError(
                f"--method distill: teacher_vocab_keep holds ids outside the teacher's {teacher_vocab}"
            )


def prepare_teacher_targets(ctx) -> None:
    """Look up (computing what is missing) the teacher's top-k for the windows this run reaches."""
    keep = ctx.teacher_vocab_keep
    teacher_vocab = vocab_size_of(ctx.teacher)
    windows = ctx.train_windows if keep is None else keep[ctx.train_windows]
    root = ctx.options.get("teacher_cache") or Path(ctx.out_dir) / "teacher-cache"
    cache = TeacherCache(
        root,
        ctx.teacher,
        top_k=ctx.options["teacher_top_k"],
        dtype=ctx.options["teacher_cache_dtype"],
        bf16_autocast=ctx.options.get("bf16_autocast", False),
    )
    ctx.state["teacher_targets"] = cache.targets(
        windows,
        ctx.used_windows.tolist(),
        batch_size=ctx.batch_size,
        device=ctx.device,
        progress=ctx.progress,
    )
    student_of_teacher = None
    if keep is not None:
        student_of_teacher = torch.full((teacher_vocab,), -1, dtype=torch.long)
        student_of_teacher[keep] = torch.arange(len(keep))
    ctx.state["student_of_teacher"] = student_of_teacher
    ctx.state["teacher_vocab_size"] = teacher_vocab
    ctx.stats.update(
        teacher_cache=str(cache.dir),
        teacher_top_k=cache.top_k,
        teacher_windows=len(ctx.used_windows),
        teacher_windows_computed=cache.windows_computed,
        teacher_seconds=cache.seconds,
    )


class DistillTrainer(RecoveryTrainer):
    """Trainer whose training loss mixes CE with KL to the cached teacher; validation stays plain CE."""

    loss_is_scaled_for_ga = False  # per-batch means: Trainer divides by the accumulation steps

    def __init__(
        self,
        *args,
        targets: TeacherTargets,
        student_of_teacher,
        teacher_vocab_size,
        alpha,
        temperature,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        self.targets = targets
        self.student_of_teacher = student_of_teacher
        self.teacher_vocab_size = teacher_vocab_size
        self.alpha = alpha
        self.temperature = temperature

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not model.training or "window_index" not in inputs:  # validation: plain CE for every method
            return super().compute_loss(model, inputs, return_outputs=return_outputs)
        outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask"))
        device = outputs.logits.device
        ids, logprobs = self.targets.batch(inputs["window_index"], device)
        mapping = None if self.student_of_teacher is None else self.student_of_teacher.to(device)
        loss, _, _ = sparse_distillation_loss(
            outputs.logits,
            ids,
            logprobs,
            inputs["labels"],
            alpha=self.alpha,
            temperature=self.temperature,
            teacher_vocab_size=self.teacher_vocab_size,
            student_of_teacher=mapping,
        )
        return (loss, outputs) if return_outputs else loss


__all__ = [
    "DistillTrainer",
    "TeacherCache",
    "TeacherTargets",
    "distillation_loss",
    "sparse_distillation_loss",
    "teacher_fingerprint",
    "teacher_topk",
]

"""The stages chained: split → evaluate base → analyze → plan → prune → evaluate → recover → save → report.

Each stage is a function of plain inputs so the CLI subcommands (``analyze``, ``prune``,
``finetune``, ``eval``, ``run``, ``sweep``) are thin wrappers, and each stage's output is a file a
user can keep (stats, plan, model directory, report).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from minigpts import __version__
from minigpts.data import Corpus, make_windows, text_within_token_budget, tokenize_stream
from minigpts.errors import UserError

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------
# Options of each stage (dataclasses so `run`/`sweep` can pass them along and record them)


@dataclass
class EvalOptions:
    split: str = "test"
    seq_len: int = 1024
    max_eval_tokens: int | None = None
    batch_size: int = 4
    mcq: list[str] = field(default_factory=list)
    general_data: str | list[str] | None = None  # a list: several paths read as one corpus
    general_max_tokens: int | None = None


@dataclass
class AnalysisOptions:
    calib_tokens: int = 65_536
    seq_len: int = 1024
    batch_size: int = 4
    moments: bool = True  # second moments for the refit and the error allocation
    fisher_tokens: int = 4096  # gradient pass for the error allocation (with moments)
    taylor_tokens: int = 0  # gradient pass of --criterion taylor
    depth_tokens: int = 0  # layer-removal passes of --layer-criterion loss


@dataclass
class PlanOptions:
    criterion: str = "l1"
    mlp_ratio: float | None = None
    head_ratio: float | None = None
    hidden_ratio: float | None = None
    target_params: float | None = None
    linear_threshold: float | None = None
    activation_threshold: float | None = None
    layout: str = "uniform"
    min_mlp: int = 8
    round_to: int = 8
    seed: int = 0
    target_groups: tuple[str, ...] = ("mlp", "heads")
    allocation: str = "error"
    reconstruct: str = "lstsq"
    ridge: float = 1e-2
    sequential: bool = False
    embedding_threshold: float | None = None
    vocab_min_count: int | None = None
    vocab_size: int | None = None
    vocab_keep_general: int = 0
    vocab_keep_expected: int = 0
    drop_layers: int | None = None
    layer_ratio: float | None = None
    layer_criterion: str = "bi"

    def has_structure(self) -> bool:
        values = [
            self.mlp_ratio,
            self.head_ratio,
            self.hidden_ratio,
            self.target_params,
            self.linear_threshold,
            self.activation_threshold,
            self.drop_layers,
            self.layer_ratio,
        ]
        return any(v is not None for v in values)

    def has_vocab(self) -> bool:
        return any(v is not None for v in (self.embedding_threshold, self.vocab_min_count, self.vocab_size))

    def structure_kwargs(self) -> dict[str, Any]:
        return {
            "criterion": self.criterion,
            "mlp_ratio": self.mlp_ratio,
            "head_ratio": self.head_ratio,
            "hidden_ratio": self.hidden_ratio,
            "target_params": self.target_params,
            "linear_threshold": self.linear_threshold,
            "activation_threshold": self.activation_threshold,
            "layout": self.layout,
            "min_mlp": self.min_mlp,
            "round_to": self.round_to,
            "seed": self.seed,
            "target_groups": self.target_groups,
            "allocation": self.allocation,
            "ridge": self.ridge,
            "drop_layers": self.drop_layers,
            "layer_ratio": self.layer_ratio,
            "layer_criterion": self.layer_criterion,
        }


@dataclass
class FinetuneOptions:
    method: str = "full"
    max_epochs: float | None = None  # None: 1 epoch unless max_steps or max_train_tokens is given
    max_steps: int | None = None
    max_train_tokens: int | None = None
    max_minutes: float | None = None
    stop_at_base: bool = False
    early_stopping_patience: int | None = None
    eval_every: int | None = None
    max_val_tokens: int | None = 4_096
    lr: float = 5e-5
    warmup_ratio: float = 0.05
    batch_size: int = 4
    grad_accum: int = 1
    seq_len: int = 512
    seed: int = 0
    resume: bool = False
    lora_r: int = 16
    lora_alpha: int = 32
    distill_alpha: float = 0.5
    distill_temperature: float = 2.0
    teacher: str | None = None
    teacher_cache: str | None = None  # teacher top-k cache shared by runs (default: inside the work dir)
    teacher_top_k: int = 64

    def budget(self) -> dict[str, Any]:
        """What a same-budget control must reuse."""
        return {
            "method": self.method,
            "max_epochs": self.max_epochs,
            "max_steps": self.max_steps,
            "max_train_tokens": self.max_train_tokens,
            "max_minutes": self.max_minutes,
            "stop_at_base": self.stop_at_base,
            "lr": self.lr,
            "seq_len": self.seq_len,
            "batch_size": self.batch_size,
            "grad_accum": self.grad_accum,
        }


# --------------------------------------------------------------------------------------------------
# Output directory discipline: refuse non-empty outputs without --force; write via temp then rename


def check_output_dir(out: str | Path, force: bool, flag: str = "--out") -> Path:
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"{flag} {out} is a file; pick a directory path")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise UserError(f"{flag} {out} is not empty: pass --force to replace it or pick another {flag}")
    return out


def check_output_file(path: str | Path, force: bool, flag: str) -> Path:
    path = Path(path)
    if path.exists() and not force:
        raise UserError(f"{flag} {path}: file exists; pass --force to overwrite or choose another path")
    return path


def write_json_atomic(path: str | Path, data: Any) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2, default=_json_default)
        f.write("\n")
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def _json_default(value):
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if hasattr(value, "item"):
        return value.item()
    if hasattr(value, "to_dict"):
        return value.to_dict()
    return str(value)


def work_dir_for(out: Path) -> Path:
    """Scratch space beside the output (fine-tuning checkpoints), so --resume finds it again."""
    return out.parent / f".{out.name}.work"


# --------------------------------------------------------------------------------------------------
# Stages


def calibration_windows(tokenizer, corpus: Corpus, options: AnalysisOptions) -> torch.LongTensor:
    """Windows of the calibration split; fewer tokens than asked is fine, less than one window is not."""
    texts = corpus.split("calibration")
    ids = tokenize_stream(tokenizer, texts, max_tokens=options.calib_tokens)
    windows = make_windows(ids, options.seq_len, max_tokens=options.calib_tokens)
    if len(windows) == 0:
        raise UserError(
            f"split 'calibration' has {len(ids)} tokens; --seq-len {options.seq_len} needs at least "
            f"{options.seq_len}: lower --seq-len or give more data"
        )
    if len(windows) * options.seq_len < options.calib_tokens:
        log.warning(
            "calibration split gives %d tokens (%d windows of %d), fewer than --calib-tokens %d",
            len(windows) * options.seq_len,
            len(windows),
            options.seq_len,
            options.calib_tokens,
        )
    return windows


def run_analysis(
    model, tokenizer, corpus: Corpus, options: AnalysisOptions, *, model_name: str, progress=True
):
    from minigpts.analysis import analyze

    windows = calibration_windows(tokenizer, corpus, options)
    metadata = {
        "model": model_name,
        "data": corpus.source,
        "seed": corpus.seed,
        "seq_len": options.seq_len,
        "calib_tokens_requested": options.calib_tokens,
        "minigpts_version": __version__,
    }
    return analyze(
        model,
        windows,
        batch_size=options.batch_size,
        progress=progress,
        metadata=metadata,
        moments=options.moments,
        fisher_tokens=options.fisher_tokens if options.moments else 0,
        taylor_tokens=options.taylor_tokens,
        depth_tokens=options.depth_tokens,
    )


def domain_token_counts(tokenizer, corpus: Corpus | None, stats=None):
    """Token frequencies over calibration + train (documents counted once), or the stats' own counts."""
    from minigpts.vocab import count_tokens

    if corpus is None:
        if stats is None:
            raise UserError("vocabulary pruning needs token counts: give --data (or stats from `analyze`)")
        return stats.token_counts.numpy()
    texts = list(dict.fromkeys(corpus.splits.get("train", []) + corpus.splits.get("calibration", [])))
    if not texts:
        raise UserError("vocabulary pruning needs the train or calibration split of --data")
    return count_tokens(tokenizer, texts)


def token_counts_source(corpus: Corpus | None, stats=None) -> str:
    """What ``domain_token_counts`` counted on, for plan.summary["vocab"]["counted_on"]."""
    if corpus is not None:
        return f"calibration + train splits of {corpus.source}"
    n_tokens = getattr(stats, "n_tokens", None)
    amount = f" ({int(n_tokens):,} tokens)" if n_tokens is not None else ""
    return f"calibration windows of the statistics{amount}"


EXPECTED_COUNT_TOKENS = 16_384  # calibration tokens behind --vocab-keep-expected (~1 min on 2 CPU cores)


def domain_expected_counts(model, tokenizer, corpus: Corpus | None, *, progress=True):
    """The model's expected token counts over the first calibration windows (see --vocab-keep-expected)."""
    from minigpts.vocab import expected_token_counts

    if corpus is None:
        raise UserError("--vocab-keep-expected runs the model over the domain text: give --data")
    positions = getattr(model.config, "max_position_embeddings", None) or 1024
    windows = calibration_windows(
        tokenizer, corpus, AnalysisOptions(calib_tokens=EXPECTED_COUNT_TOKENS, seq_len=min(1024, positions))
    )
    return expected_token_counts(model, windows, progress=progress)


def build_plan(model, tokenizer, stats, options: PlanOptions, *, corpus: Corpus | None = None, progress=True):
    """Structured plan from the stats (+ the vocabulary selection when asked)."""
    from minigpts.plan import LayerPlan, PruningPlan, make_plan

    if not options.has_structure() and not options.has_vocab():
        raise UserError(
            "nothing to prune: give a plan (--mlp-ratio, --head-ratio, --hidden-ratio, --target-params, "
            "--linear-threshold, --activation-threshold, --drop-layers, --layer-ratio) and/or a vocabulary "
            "option (--embedding-threshold, "
            "--vocab-min-count, --vocab-size)"
        )
    if not options.has_vocab() and (options.vocab_keep_general or options.vocab_keep_expected):
        raise UserError(
            "--vocab-keep-general / --vocab-keep-expected widen a vocabulary cut: add --embedding-threshold "
            "or --vocab-min-count"
        )
    selection = None
    if options.has_vocab():
        from minigpts.vocab import select_vocab

        counts = domain_token_counts(tokenizer, corpus, stats)
        expected = None
        if options.vocab_keep_expected:
            expected = domain_expected_counts(model, tokenizer, corpus, progress=progress)
        selection = select_vocab(
            tokenizer,
            counts,
            embedding_threshold=options.embedding_threshold,
            min_count=options.vocab_min_count,
            vocab_size=options.vocab_size,
            keep_general=options.vocab_keep_general,
            expected=expected,
            keep_expected=options.vocab_keep_expected,
            model_config=model.config,
            generation_config=getattr(model, "generation_config", None),
        )
    if options.has_structure():
        if stats is None:
            raise UserError("a structural plan needs activation statistics (run analysis or pass --stats)")
        kwargs = options.structure_kwargs()
        vocab_saved = vocab_parameters_saved(model, selection) if selection is not None else 0
        if kwargs["target_params"] is not None and vocab_saved:
            # --target-params counts the whole model: what the vocabulary cut saves, the structure need not
            total = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
            kwargs["target_params"] = min(1.0, kwargs["target_params"] + vocab_saved / total)
        plan = make_plan(model, stats, **kwargs)
        if vocab_saved:
            plan.summary["params_after_with_vocab"] = plan.summary["params_after"] - vocab_saved
            plan.settings["target_params"] = options.target_params
        if "target" in plan.summary and options.target_params is not None:
            # what the user asked for, of the whole model (vocabulary included), and what the plan reaches
            after = plan.summary.get("params_after_with_vocab", plan.summary["params_after"])
            plan.summary["target"]["requested"] = options.target_params
            plan.summary["target"]["achieved_with_vocab"] = round(after / plan.summary["params_before"], 6)
        record_score_distribution(model, stats, options, plan)
    else:
        from minigpts.arch import get_adapter

        adapter = get_adapter(model)
        layers = []
        for layer in adapter.layers(model):
            n_heads, n_kv, _ = adapter.head_layout(layer)
            layers.append(
                LayerPlan(
                    mlp_keep=list(range(adapter.mlp_width(layer))),
                    heads_keep=list(range(n_heads)),
                    kv_heads_keep=list(range(n_kv)),
                )
            )
        plan = PruningPlan(family=adapter.family, layers=layers, criterion="none", settings={})
    if selection is not None:
        plan.vocab_keep = list(selection.keep_ids)
        plan.summary["vocab"] = {
            "before": selection.vocab_before,
            "after": selection.vocab_after,
            "mode": selection.mode,
            "value": selection.value,
            "kept_special": selection.kept_special,
            "kept_byte": selection.kept_byte,
            "kept_seen": selection.kept_seen,
            "kept_widened": selection.kept_widened,
            "kept_closure": selection.kept_closure,
            "parameters_saved": vocab_parameters_saved(model, selection),
            "counted_on": token_counts_source(corpus, stats),
        }
        plan.settings.update(
            embedding_threshold=options.embedding_threshold,
            vocab_min_count=options.vocab_min_count,
            vocab_size=options.vocab_size,
            vocab_keep_general=options.vocab_keep_general,
            vocab_keep_expected=options.vocab_keep_expected,
        )
    return plan


def record_score_distribution(model, stats, options: PlanOptions, plan) -> None:
    """The criterion's score distribution per group in ``plan.summary["score_distribution"]``, and a
    note (``summary["notes"]``, starting "warning:") for each threshold that removes nothing or almost
    everything. The plan itself is not changed."""
    from minigpts.arch import get_adapter
    from minigpts.criteria import unit_scores
    from minigpts.distribution import score_distribution, threshold_warnings

    scores = unit_scores(model, stats, options.criterion, options.seed)
    plan.summary["score_distribution"] = {
        "criterion": options.criterion,
        "groups": score_distribution(scores),
    }
    adapter = get_adapter(model)
    groups = ["mlp"]
    groups += [] if adapter.head_pruning_problem(model.config) else ["heads"]
    groups += [] if adapter.hidden_pruning_problem(model.config) else ["hidden"]
    warnings = threshold_warnings(
        scores,
        plan.summary,
        activation_threshold=options.activation_threshold,
        linear_threshold=options.linear_threshold,
        criterion=options.criterion,
        groups=tuple(groups),
    )
    if warnings:
        plan.summary.setdefault("notes", []).extend(warnings)


def vocab_parameters_saved(model, selection) -> int:
    from minigpts.vocab import vocab_summary

    return vocab_summary(model, selection).parameters_saved


def apply_full_plan(
    model, tokenizer, plan, *, stats=None, reconstruct: str = "none", ridge: float = 1e-2, calibration=None
):
    """Refit (``reconstruct="lstsq"``, from ``stats``' second moments; layer by layer on the
    ``calibration`` windows when given), structure surgery, then vocabulary surgery; returns (model,
    tokenizer) — the model is modified. The refit is recorded in the plan."""
    from minigpts.reconstruct import RECONSTRUCT_METHODS
    from minigpts.surgery import apply_plan

    if reconstruct not in RECONSTRUCT_METHODS:
        raise UserError(f"--reconstruct {reconstruct}: use one of {', '.join(RECONSTRUCT_METHODS)}")
    if reconstruct == "lstsq" and plan.criterion != "none":
        from minigpts.reconstruct import reconstruct as refit_projections
        from minigpts.reconstruct import sequential_reconstruct

        if stats is None:
            raise UserError(
                "--reconstruct lstsq needs the statistics of the model (run analysis or pass --stats)"
            )
        if calibration is not None:
            plan.summary["reconstructed"] = sequential_reconstruct(
                model, plan, stats, calibration, ridge=ridge
            )
        else:
            plan.summary["reconstructed"] = refit_projections(model, plan, stats, ridge=ridge)
    plan.settings["reconstruct"] = reconstruct
    plan.settings["sequential"] = calibration is not None and reconstruct == "lstsq"
    apply_plan(model, plan)
    if plan.vocab_keep is not None:
        from minigpts.vocab import slice_model_vocab, trim_tokenizer

        slice_model_vocab(model, plan.vocab_keep)
        tokenizer = trim_tokenizer(tokenizer, plan.vocab_keep)
    return model, tokenizer


def evaluate_stage(
    model,
    tokenizer,
    corpus: Corpus,
    options: EvalOptions,
    *,
    name: str,
    model_path=None,
    general: Corpus | None = None,
    mcq_sets: dict | None = None,
    progress: bool = True,
    budget_tokenizer=None,
) -> dict:
    """Held-out evaluation of one stage (+ general text and MCQ when given) as a JSON-ready dict.

    ``budget_tokenizer`` (the unpruned model's) fixes the text that the token budgets cover, so
    stages with trimmed vocabularies are scored on the same bytes as the base.
    """
    from minigpts.evaluation import evaluate

    result = evaluate(
        model,
        tokenizer,
        corpus.split(options.split),
        model_name=name,
        split=options.split,
        seq_len=options.seq_len,
        max_tokens=options.max_eval_tokens,
        batch_size=options.batch_size,
        model_path=model_path,
        progress=progress,
        budget_tokenizer=budget_tokenizer,
    ).to_dict()
    result["vocab_size"] = len(tokenizer)
    if general is not None:
        g = evaluate(
            model,
            tokenizer,
            general.split("test"),
            model_name=name,
            split="test",
            seq_len=options.seq_len,
            max_tokens=options.general_max_tokens or options.max_eval_tokens,
            batch_size=options.batch_size,
            progress=progress,
            budget_tokenizer=budget_tokenizer,
        ).to_dict()
        result["general"] = {k: g[k] for k in ("perplexity", "bits_per_byte", "eval_tokens", "eval_bytes")}
        result["general"]["data"] = general.source
    if mcq_sets:
        from minigpts.mcq import evaluate_mcq

        result["mcq"] = {
            stem: evaluate_mcq(model, tokenizer, items, batch_size=max(1, options.batch_size * 2))
            for stem, items in mcq_sets.items()
        }
    return result


def load_mcq_sets(paths: list[str]) -> dict:
    from minigpts.mcq import load_mcq

    sets = {}
    for path in paths:
        stem = Path(path).stem
        if stem in sets:
            raise UserError(f"--mcq {path}: two MCQ files share the name {stem!r}; rename one")
        sets[stem] = load_mcq(path)
    return sets


def validation_bpb_target(base_model, base_tokenizer, corpus: Corpus, options: FinetuneOptions) -> float:
    """The unpruned model's validation bits-per-byte: the paper's stop rule, made tokenizer-fair."""
    from minigpts.evaluation import evaluate

    r = evaluate(
        base_model,
        base_tokenizer,
        corpus.split("validation"),
        model_name="base",
        split="validation",
        seq_len=options.seq_len,
        max_tokens=options.max_val_tokens,
        progress=False,
    )
    return r.bits_per_byte


def validation_bpb(
    model, tokenizer, corpus: Corpus, *, seq_len: int, max_tokens: int | None, budget_tokenizer=None
) -> float:
    """Bits-per-byte on the validation split: the first ``max_tokens`` (``--max-val-tokens``) counted in
    ``budget_tokenizer``'s tokens (the base's), in windows of ``seq_len``; what the sweep's frontier compares."""
    from minigpts.evaluation import evaluate

    r = evaluate(
        model,
        tokenizer,
        corpus.split("validation"),
        model_name="validation",
        split="validation",
        seq_len=seq_len,
        max_tokens=max_tokens,
        progress=False,
        budget_tokenizer=budget_tokenizer,
    )
    return r.bits_per_byte


def run_finetune(
    model,
    tokenizer,
    corpus: Corpus,
    options: FinetuneOptions,
    *,
    work_dir: Path,
    teacher=None,
    teacher_vocab_keep=None,
    stop_at_bpb: float | None = None,
    progress: bool = True,
    budget_tokenizer=None,
):
    """Recovery on the train split, validated on the validation split; returns (model, FinetuneResult).

    ``--max-val-tokens`` is counted in ``budget_tokenizer``'s tokens (the unpruned model's, as in
    ``validation_bpb_target``) so the stop rule compares bits-per-byte on the same text.
    """
    from minigpts.evaluation import token_byte_lengths
    from minigpts.recovery import finetune

    train_ids = tokenize_stream(tokenizer, corpus.split("train"), max_tokens=options.max_train_tokens)
    train_windows = make_windows(train_ids, options.seq_len)
    val_texts = text_within_token_budget(
        budget_tokenizer or tokenizer, corpus.split("validation"), options.max_val_tokens
    )
    val_ids = tokenize_stream(tokenizer, val_texts)
    val_windows = make_windows(val_ids, options.seq_len)
    for name, ids, windows in (("train", train_ids, train_windows), ("validation", val_ids, val_windows)):
        if len(windows) == 0:
            raise UserError(
                f"split '{name}' has {len(ids)} tokens; fine-tuning with --finetune-seq-len {options.seq_len} "
                f"needs at least {options.seq_len}: lower --finetune-seq-len or give more data"
            )
    byte_lengths = token_byte_lengths(tokenizer)
    return finetune(
        model,
        tokenizer,
        train_windows,
        val_windows,
        out_dir=work_dir,
        method=options.method,
        teacher=teacher,
        teacher_vocab_keep=teacher_vocab_keep,
        max_epochs=options.max_epochs,
        max_steps=options.max_steps,
        max_train_tokens=options.max_train_tokens,
        max_minutes=options.max_minutes,
        stop_at_bpb=stop_at_bpb,  # converted on the validation windows finetune keeps
        early_stopping_patience=options.early_stopping_patience,
        eval_every=options.eval_every,
        lr=options.lr,
        warmup_ratio=options.warmup_ratio,
        batch_size=options.batch_size,
        grad_accum=options.grad_accum,
        seed=options.seed,
        resume=options.resume,
        lora_r=options.lora_r,
        lora_alpha=options.lora_alpha,
        distill_alpha=options.distill_alpha,
        distill_temperature=options.distill_temperature,
        teacher_cache=options.teacher_cache,
        teacher_top_k=options.teacher_top_k,
        byte_lengths=byte_lengths,
        progress=progress,
    )


def recover_stage(
    model,
    tokenizer,
    name: str,
    work_dir: Path,
    teacher_vocab_keep,
    *,
    corpus: Corpus,
    evaluation: EvalOptions,
    recovery: FinetuneOptions,
    teacher,
    stop_at_bpb: float | None,
    eval_kwargs: dict,
):
    """Fine-tune one model under the shared budget, evaluate it, and drop its checkpoints.

    Returns (model, stage dict with the evaluation keys and a ``finetune`` object).
    """
    # a resumed `run` continues each recovery that saved a checkpoint and starts the others afresh
    recovery = dataclasses.replace(
        recovery, resume=recovery.resume and _has_checkpoint(work_dir / "checkpoints")
    )
    model, result = run_finetune(
        model,
        tokenizer,
        corpus,
        recovery,
        work_dir=work_dir,
        teacher=teacher,
        teacher_vocab_keep=teacher_vocab_keep,
        stop_at_bpb=stop_at_bpb,
        progress=eval_kwargs.get("progress", True),
        budget_tokenizer=eval_kwargs.get("budget_tokenizer"),
    )
    stage = evaluate_stage(model, tokenizer, corpus, evaluation, name=name, **eval_kwargs)
    stage["finetune"] = result.to_dict()
    cleanup(work_dir)
    return model, stage


def recovery_method_or_none(name: str, flag: str = "--finetune"):
    """The registered recovery method called ``name``, or None for ``none``; a UserError names the choices."""
    from minigpts.recovery import get_recovery_method, recovery_method_names

    if name == "none":
        return None
    if name not in recovery_method_names():
        raise UserError(f"{flag} {name}: use none, {', '.join(recovery_method_names())}")
    return get_recovery_method(name, flag)


def with_shared_teacher_cache(recovery: FinetuneOptions, method, work: Path) -> FinetuneOptions:
    """One teacher cache for every recovery of a run or sweep (unless --teacher-cache names one)."""
    if method is None or not method.needs_teacher or recovery.teacher_cache is not None:
        return recovery
    return dataclasses.replace(recovery, teacher_cache=str(work / "teacher-cache"))


def random_plan_like(model, plan, seed: int = 0):
    """A plan keeping exactly as many units of each kind per layer as ``plan``, chosen at random.

    The control that any claim about a criterion must beat: same widths, same vocabulary, random units.
    """
    from minigpts.plan import LayerPlan, PruningPlan

    generator = torch.Generator().manual_seed(seed)
    from minigpts.arch import get_adapter

    adapter = get_adapter(model)
    layers = []
    for layer, layer_plan in zip(adapter.layers(model), plan.layers, strict=True):
        n_mlp = adapter.mlp_width(layer)
        n_heads, n_kv, _ = adapter.head_layout(layer)
        group = n_heads // n_kv
        mlp = sorted(torch.randperm(n_mlp, generator=generator)[: len(layer_plan.mlp_keep)].tolist())
        kv = sorted(torch.randperm(n_kv, generator=generator)[: len(layer_plan.kv_heads_keep)].tolist())
        per_group = len(layer_plan.heads_keep) // max(1, len(layer_plan.kv_heads_keep))
        heads = []
        for g in kv:
            members = torch.randperm(group, generator=generator)[:per_group].tolist()
            heads.extend(g * group + m for m in members)
        layers.append(LayerPlan(mlp_keep=mlp, heads_keep=sorted(heads), kv_heads_keep=kv))
    hidden = None
    if plan.hidden_keep is not None:
        size = adapter.hidden_size(model)
        hidden = sorted(torch.randperm(size, generator=generator)[: len(plan.hidden_keep)].tolist())
    return PruningPlan(
        family=plan.family,
        layers=layers,
        hidden_keep=hidden,
        vocab_keep=plan.vocab_keep,
        layers_keep=plan.layers_keep,
        layout=plan.layout,
        criterion="random",
        settings={**plan.settings, "control": "random units, same widths", "control_seed": seed},
        summary=dict(plan.summary),
    )


GENERAL_CONTROL = "control_general_calibration"
GENERAL_CONTROL_NEEDS = (
    "control_general_calibration (the same cut calibrated on general text) needs --general-data: a "
    "general-domain corpus such as a WikiText sample (none is bundled: WikiText is CC BY-SA)"
)


def general_calibration_corpus(general: Corpus) -> Corpus:
    """The general corpus as calibration text: its calibration split, else every document it has
    (``sample-medical`` is a test split only); train = the same text, for the vocabulary counts."""
    texts = general.splits.get("calibration") or list(
        dict.fromkeys(doc for docs in general.splits.values() for doc in docs)
    )
    return Corpus(
        general.source,
        {"calibration": list(texts), "train": list(texts)},
        presplit=True,
        seed=general.seed,
        notes=[f"general calibration text of {general.source}"],
    )


def general_plan_like(model, tokenizer, plan, general_stats, general_corpus: Corpus, options: PlanOptions):
    """The thesis control's plan: exactly ``plan``'s widths per layer (so the same parameter count),
    but the units chosen by the same criterion scored on statistics of general text, and the
    vocabulary (same size) chosen by the general text's token counts."""
    from minigpts.arch import get_adapter
    from minigpts.plan import LayerPlan, PruningPlan, _select_heads, _top, unit_scores

    adapter = get_adapter(model)
    notes = []
    layers, hidden = plan.layers, plan.hidden_keep
    if options.has_structure():
        scores = unit_scores(model, general_stats, options.criterion, options.seed)
        layers = []
        for i, (layer, layer_plan) in enumerate(zip(adapter.layers(model), plan.layers, strict=True)):
            n_heads, n_kv, _ = adapter.head_layout(layer)
            kv_kept = len(layer_plan.kv_heads_keep)
            per_kv = len(layer_plan.heads_keep) // max(1, kv_kept)
            heads, kv, _ = _select_heads(scores.heads[i], n_kv, kv_kept, per_kv)
            layers.append(
                LayerPlan(
                    mlp_keep=_top(scores.mlp[i], len(layer_plan.mlp_keep)), heads_keep=heads, kv_heads_keep=kv
                )
            )
        if plan.hidden_keep is not None:
            hidden = _top(scores.hidden, len(plan.hidden_keep))
        if plan.layers_keep is not None:
            notes.append("dropped layers: the domain plan's (layer removal is not re-chosen on general text)")
    vocab = plan.vocab_keep
    if plan.vocab_keep is not None:
        from minigpts.vocab import select_vocab

        selection = select_vocab(
            tokenizer,
            domain_token_counts(tokenizer, general_corpus),
            vocab_size=len(plan.vocab_keep),
            model_config=model.config,
            generation_config=getattr(model, "generation_config", None),
        )
        if len(selection.keep_ids) == len(plan.vocab_keep):
            vocab = list(selection.keep_ids)
        else:
            notes.append("vocabulary: the domain plan's (general counts could not give the same size)")
    settings = {
        **plan.settings,
        "control": "units chosen on general text, same widths",
        "calibration_data": general_corpus.source,
    }
    if notes:
        settings["control_notes"] = notes
    return PruningPlan(
        family=plan.family,
        layers=layers,
        hidden_keep=hidden,
        vocab_keep=vocab,
        layers_keep=plan.layers_keep,
        layout=plan.layout,
        criterion=plan.criterion,
        settings=settings,
        summary=dict(plan.summary),
    )


def copy_model(model):
    return copy.deepcopy(model)


def cleanup(path: Path) -> None:
    from minigpts import distributed

    if distributed.is_main():  # data parallel: rank 0 owns the files
        shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def timed(timings: dict, name: str):
    """Record the seconds spent in a stage under ``timings[name]``."""
    start = time.perf_counter()
    try:
        yield
    finally:
        timings[name] = round(time.perf_counter() - start, 2)


# --------------------------------------------------------------------------------------------------
# Finished stages of `run`, kept in the work dir for --resume

TEST_INTERRUPT_ENV = "MINIGPTS_TEST_INTERRUPT_AFTER"


def interrupt_point(stage: str) -> None:
    """Test hook: deliver SIGINT to this process right after ``stage`` when the environment variable
    ``MINIGPTS_TEST_INTERRUPT_AFTER`` names it (``analyze``, ``plan``, ``eval_base``, ``prune``,
    ``eval_pruned``, or ``checkpoint-N`` after fine-tuning saved step N), so tests interrupt a run
    at a known point, exactly as Ctrl-C would. Unset (always, outside tests): nothing happens."""
    if os.environ.get(TEST_INTERRUPT_ENV) == stage:
        import signal

        signal.raise_signal(signal.SIGINT)


def _stage_key(*parts) -> str:
    """A short hash of the options (and data) that produced a stage's output."""
    import hashlib

    text = json.dumps(parts, sort_keys=True, default=_json_default)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _corpus_fingerprint(corpus: Corpus) -> str:
    import hashlib

    digest = hashlib.sha256()
    for name in sorted(corpus.splits):
        digest.update(name.encode() + b"\0")
        for text in corpus.splits[name]:
            digest.update(text.encode("utf-8", "surrogatepass") + b"\0")
    return digest.hexdigest()[:16]


@dataclass
class StageCache:
    """Where `run` keeps each finished stage (``work/stages``), keyed by what produced it."""

    root: Path
    stats: Path
    plan: Path
    base: Path
    pruned_dir: Path
    pruned: Path

    @classmethod
    def for_run(cls, work: Path, options: RunOptions, corpus: Corpus) -> StageCache:
        source = [options.model, options.dtype, options.seed, _corpus_fingerprint(corpus), __version__]
        stats = _stage_key(source, dataclasses.asdict(options.analysis))
        plan = _stage_key(stats, dataclasses.asdict(options.plan))
        base = _stage_key(source, dataclasses.asdict(options.evaluation))
        pruned = _stage_key(plan, base)
        root = work / "stages"
        return cls(
            root=root,
            stats=root / f"stats-{stats}.safetensors",
            plan=root / f"plan-{plan}.json",
            base=root / f"base-{base}.json",
            pruned_dir=root / f"pruned-{pruned}",
            pruned=root / f"pruned-{pruned}.json",
        )

    def finished(self) -> list[str]:
        names = {
            "statistics": self.stats,
            "plan": self.plan,
            "base metrics": self.base,
            "pruning": self.pruned,
        }
        return [name for name, path in names.items() if path.exists()]


def _has_checkpoint(folder: Path) -> bool:
    from transformers.trainer_utils import get_last_checkpoint

    return folder.is_dir() and get_last_checkpoint(str(folder)) is not None


# --------------------------------------------------------------------------------------------------
# The whole experiment (`minigpts run`)


@dataclass
class RunOptions:
    model: str | None
    data: str | list[str]  # a list: several paths read as one corpus
    out: str | None  # None only with dry_run
    text_field: str = "text"
    encoding: str = "utf-8"
    seed: int = 0
    device: str = "auto"
    dtype: str | None = None
    trust_remote_code: bool = False  # let a directory's auto_map run code (--trust-remote-code)
    allow_pickle: bool = False  # also read pickle (.bin) weights
    force: bool = False
    finetune: str = "none"  # none or a registered recovery method (minigpts.recovery.recovery_method_names())
    controls: bool = False
    dry_run: bool = False
    evaluation: EvalOptions = field(default_factory=EvalOptions)
    analysis: AnalysisOptions = field(default_factory=AnalysisOptions)
    plan: PlanOptions = field(default_factory=PlanOptions)
    recovery: FinetuneOptions = field(default_factory=FinetuneOptions)


def run_experiment(options: RunOptions, *, corpus: Corpus | None = None, say=print, progress=True) -> dict:
    """Run every stage and save the pruned (and recovered) model with report.json / report.md in --out."""
    from minigpts.data import load_corpus
    from minigpts.export import save_model
    from minigpts.models import load_model

    method = recovery_method_or_none(options.finetune)
    if options.out is None and not options.dry_run:
        raise UserError("--out is required (the output directory), unless --dry-run only prints the plan")
    out = Path(options.out) if options.out is not None else None
    if not options.dry_run:
        check_output_dir(out, options.force)
    from minigpts import distributed

    distributed.barrier()  # data parallel: every process has checked --out before rank 0 writes
    timings: dict[str, float] = {}
    if corpus is None:
        corpus = load_corpus(
            options.data, text_field=options.text_field, encoding=options.encoding, seed=options.seed
        )
    general = None
    if options.evaluation.general_data:
        general = load_corpus(options.evaluation.general_data, seed=options.seed)
    mcq_sets = load_mcq_sets(options.evaluation.mcq) if options.evaluation.mcq else None
    work = cache = None
    resume = options.recovery.resume and not options.dry_run
    if out is not None and not options.dry_run:
        work = work_dir_for(out)
        cache = StageCache.for_run(work, options, corpus)
        checkpoints = [
            name
            for name in ("finetuned", "control_base", "control_random", "control_general")
            if _has_checkpoint(work / name / "checkpoints")
        ]
        if resume:
            finished = cache.finished() + [f"{name} checkpoint" for name in checkpoints]
            if not finished:
                raise UserError(
                    f"--resume: nothing to resume for these options under {work} (no finished stage, no "
                    "checkpoint): run without --resume"
                )
            say(f"resume: reusing {', '.join(finished)} from {work}")
        elif checkpoints and options.finetune != "none":
            raise UserError(
                f"{work} holds fine-tuning checkpoints of an interrupted run: pass --resume to continue it, "
                "or delete that folder to start over"
            )

    with timed(timings, "load"):
        loaded = load_model(
            options.model,
            device=options.device,
            dtype=options.dtype,
            trust_remote_code=options.trust_remote_code,
            allow_pickle=options.allow_pickle,
        )
    base_model, base_tokenizer = loaded.model, loaded.tokenizer
    say(f"model: {loaded.description}")

    stats = None
    if options.plan.has_structure() and resume and cache.stats.is_file():
        from minigpts.analysis import ActivationStats

        stats = ActivationStats.load(cache.stats)
        say(f"analysis: reused {cache.stats.name}")
    elif options.plan.has_structure():
        say(
            f"analysis: {options.analysis.calib_tokens:,} calibration tokens, windows of {options.analysis.seq_len}"
        )
        with timed(timings, "analyze"):
            stats = run_analysis(
                base_model,
                base_tokenizer,
                corpus,
                options.analysis,
                model_name=loaded.source_id,
                progress=progress,
            )
        if cache is not None:  # kept for --resume; read back so a resumed run sees the same numbers
            from minigpts.analysis import ActivationStats

            stats.save(cache.stats)
            stats = ActivationStats.load(cache.stats)
            interrupt_point("analyze")
    with timed(timings, "plan"):
        if resume and cache.plan.is_file():
            from minigpts.plan import PruningPlan

            plan = PruningPlan.load(cache.plan)
            say(f"plan: reused {cache.plan.name}")
        else:
            plan = build_plan(
                base_model, base_tokenizer, stats, options.plan, corpus=corpus, progress=progress
            )
            if cache is not None:
                write_json_atomic(cache.plan, plan.to_dict())
                interrupt_point("plan")
    if options.dry_run:
        return {"plan": plan, "timings": timings}
    from rich.markup import escape

    for note in plan.summary.get("notes") or []:
        if note.startswith("warning:"):
            say(f"[yellow]{escape(note)}[/yellow]")

    stages: dict[str, dict] = {}
    eval_kwargs = dict(general=general, mcq_sets=mcq_sets, progress=progress, budget_tokenizer=base_tokenizer)
    if resume and cache.base.is_file():
        stages["base"] = json.loads(cache.base.read_text())
        say(f"base evaluation: reused {cache.base.name}")
    else:
        with timed(timings, "eval_base"):
            stages["base"] = evaluate_stage(
                base_model,
                base_tokenizer,
                corpus,
                options.evaluation,
                name="base",
                model_path=loaded.path,
                **eval_kwargs,
            )
        if cache is not None:
            write_json_atomic(cache.base, stages["base"])
            interrupt_point("eval_base")
    say(
        f"base: bits/byte {stages['base']['bits_per_byte']:.4f}, perplexity {stages['base']['perplexity']:.3f}"
    )

    recovery = dataclasses.replace(options.recovery, method=options.finetune)
    stop_at_bpb = None
    if options.finetune != "none" and recovery.stop_at_base:
        stop_at_bpb = validation_bpb_target(base_model, base_tokenizer, corpus, recovery)
        say(f"stop rule: validation bits/byte ≤ {stop_at_bpb:.4f} (the unpruned model's)")
    # The unpruned model is only needed later as a teacher or to build the controls; otherwise it is
    # pruned in place, so the run never holds two models (peak memory ≈ one model + activations).
    keep_base = options.controls or (method is not None and method.needs_teacher)
    calibration = None
    if options.plan.sequential and options.plan.reconstruct == "lstsq":
        calibration = calibration_windows(base_tokenizer, corpus, options.analysis)
    pruned_plan_file = cache.pruned_dir.with_suffix(".plan.json") if cache is not None else None
    if resume and cache.pruned_dir.is_dir() and pruned_plan_file.is_file():
        from minigpts.export import load as load_saved
        from minigpts.models import resolve_device, resolve_dtype
        from minigpts.plan import PruningPlan

        device = resolve_device(options.device)
        pruned, pruned_tokenizer = load_saved(
            cache.pruned_dir, device=device, dtype=resolve_dtype(options.dtype, device)
        )
        plan = PruningPlan.load(pruned_plan_file)
        say(f"pruning: reused {cache.pruned_dir.name}")
        if not keep_base:
            base_model = loaded.model = None
    else:
        with timed(timings, "prune"):
            pruned, pruned_tokenizer = _prune(
                base_model, base_tokenizer, plan, stats, options, calibration, keep_base
            )
            if not keep_base:
                base_model = loaded.model = None
        if cache is not None:
            write_json_atomic(pruned_plan_file, plan.to_dict())
            save_model(pruned, pruned_tokenizer, cache.pruned_dir, plan=plan, force=True)
            interrupt_point("prune")
    if resume and cache.pruned.is_file():
        stages["pruned"] = json.loads(cache.pruned.read_text())
        say(f"pruned evaluation: reused {cache.pruned.name}")
    else:
        with timed(timings, "eval_pruned"):
            stages["pruned"] = evaluate_stage(
                pruned, pruned_tokenizer, corpus, options.evaluation, name="pruned", **eval_kwargs
            )
        if cache is not None:
            write_json_atomic(cache.pruned, stages["pruned"])
            interrupt_point("eval_pruned")
    say(
        f"pruned: bits/byte {stages['pruned']['bits_per_byte']:.4f}, perplexity {stages['pruned']['perplexity']:.3f}"
    )

    final_model, final_tokenizer = pruned, pruned_tokenizer
    recovery = with_shared_teacher_cache(recovery, method, work)
    recover = functools.partial(
        recover_stage,
        corpus=corpus,
        evaluation=options.evaluation,
        recovery=recovery,
        teacher=base_model if method is not None and method.needs_teacher else None,
        stop_at_bpb=stop_at_bpb,
        eval_kwargs=eval_kwargs,
    )
    if options.finetune != "none":
        with timed(timings, "finetune"):
            final_model, stages["finetuned"] = recover(
                pruned, pruned_tokenizer, "finetuned", work / "finetuned", plan.vocab_keep
            )
        say(
            f"finetuned: bits/byte {stages['finetuned']['bits_per_byte']:.4f} "
            f"({stages['finetuned']['finetune']['stopped_because']})"
        )
    if options.controls:
        if options.finetune != "none":
            with timed(timings, "control_base_finetuned"):
                _, stages["control_base_finetuned"] = recover(
                    copy_model(base_model),
                    base_tokenizer,
                    "control_base_finetuned",
                    work / "control_base",
                    None,
                )
        random_plan = random_plan_like(base_model, plan, seed=options.seed)
        control, control_tokenizer = apply_full_plan(
            copy_model(base_model),
            base_tokenizer,
            random_plan,
            stats=stats,
            reconstruct=options.plan.reconstruct,
            ridge=options.plan.ridge,
            calibration=calibration,
        )
        if options.finetune != "none":
            with timed(timings, "control_random_finetuned"):
                _, stages["control_random_finetuned"] = recover(
                    control,
                    control_tokenizer,
                    "control_random_finetuned",
                    work / "control_random",
                    random_plan.vocab_keep,
                )
        else:
            with timed(timings, "control_random"):
                stages["control_random"] = evaluate_stage(
                    control,
                    control_tokenizer,
                    corpus,
                    options.evaluation,
                    name="control_random",
                    **eval_kwargs,
                )
        del control
        if general is None:
            say(f"[yellow]skipped {GENERAL_CONTROL}: {GENERAL_CONTROL_NEEDS}[/yellow]")
        else:
            with timed(timings, GENERAL_CONTROL):
                name, stage = general_control_stage(
                    base_model,
                    base_tokenizer,
                    plan,
                    corpus,
                    general,
                    options,
                    recover,
                    eval_kwargs,
                    work,
                    model_name=loaded.source_id,
                    progress=progress,
                )
                stages[name] = stage

    report = {
        "minigpts_version": __version__,
        "model": loaded.name,
        "model_description": loaded.description,
        "data": corpus.source,
        "splits": corpus.describe(),
        "split": options.evaluation.split,
        "seq_len": options.evaluation.seq_len,
        "protocol": stages["base"]["protocol"],
        "budget_tokenizer": loaded.source_id,  # the tokenizer the token budgets are counted in
        "options": _options_dict(options),
        "plan_summary": plan.summary,
        "vocab": plan.summary.get("vocab"),
        "stats": stats.metadata if stats is not None else None,
        "stages": stages,
        **stages,
        "timings": timings,
    }
    if not distributed.is_main():  # data parallel: every process holds the same model; rank 0 saves
        return report
    with timed(timings, "save"):
        from minigpts.export import base_license

        metadata = {
            "base_model": loaded.source_id,
            "base_description": loaded.description,
            "base_license": base_license(loaded.path, loaded.name),
            "params_before": stages["base"]["params"],
            "data": corpus.source,
            "evaluation": {
                "split": options.evaluation.split,
                "seq_len": options.evaluation.seq_len,
                "protocol": stages["base"]["protocol"],
                "general_data": general.source if general is not None else None,
            },
            "stats": stats.metadata if stats is not None else None,
            "metrics": {name: _card_metrics(s) for name, s in stages.items()},
            "controls": [name for name in stages if name.startswith("control")],
            "finetune": stages.get("finetuned", {}).get("finetune"),
        }
        save_model(final_model, final_tokenizer, out, plan=plan, metadata=metadata, force=options.force)
        if stats is not None:
            stats.save(out / "stats.safetensors")
    size_on_disk = sum(f.stat().st_size for f in out.glob("*.safetensors") if f.name != "stats.safetensors")
    last = "finetuned" if "finetuned" in stages else "pruned"
    stages[last]["size_bytes"] = size_on_disk
    stages[last]["size_source"] = "disk"
    write_report(report, out, stats=stats)
    cleanup(work)
    return report


def general_control_stage(
    base_model,
    base_tokenizer,
    plan,
    corpus,
    general,
    options: RunOptions,
    recover,
    eval_kwargs,
    work,
    *,
    model_name,
    progress,
):
    """(stage name, stage) of control_general_calibration in `run`: statistics of the general text
    (same analysis options and calibration budget), the same widths, refit and recovery."""
    text = general_calibration_corpus(general)
    general_stats = None
    if options.plan.has_structure():
        general_stats = run_analysis(
            base_model, base_tokenizer, text, options.analysis, model_name=model_name, progress=progress
        )
    control_plan = general_plan_like(base_model, base_tokenizer, plan, general_stats, text, options.plan)
    calibration = None
    if options.plan.sequential and options.plan.reconstruct == "lstsq":
        calibration = calibration_windows(base_tokenizer, text, options.analysis)
    model, tokenizer = apply_full_plan(
        copy_model(base_model),
        base_tokenizer,
        control_plan,
        stats=general_stats,
        reconstruct=options.plan.reconstruct,
        ridge=options.plan.ridge,
        calibration=calibration,
    )
    if options.finetune != "none":
        name = f"{GENERAL_CONTROL}_finetuned"
        _, stage = recover(model, tokenizer, name, work / "control_general", control_plan.vocab_keep)
    else:
        name = GENERAL_CONTROL
        stage = evaluate_stage(model, tokenizer, corpus, options.evaluation, name=name, **eval_kwargs)
    stage["calibration"] = {
        "data": general.source,
        "stats": general_stats.metadata if general_stats is not None else None,
        "plan_settings": control_plan.settings,
    }
    return name, stage


def _prune(base_model, base_tokenizer, plan, stats, options: RunOptions, calibration, keep_base: bool):
    """The pruned (model, tokenizer): ``base_model`` itself, or a copy when the run still needs it."""
    target = copy_model(base_model) if keep_base else base_model
    return apply_full_plan(
        target,
        base_tokenizer,
        plan,
        stats=stats,
        reconstruct=options.plan.reconstruct,
        ridge=options.plan.ridge,
        calibration=calibration,
    )


def _card_metrics(stage: dict) -> dict:
    """The numbers of one stage that the model card tabulates (bits/byte, general text, MCQ)."""
    metrics = {k: stage[k] for k in ("params", "perplexity", "bits_per_byte") if k in stage}
    if (stage.get("general") or {}).get("bits_per_byte") is not None:
        metrics["general_bits_per_byte"] = stage["general"]["bits_per_byte"]
    for stem, result in (stage.get("mcq") or {}).items():
        metrics[f"mcq_{stem}_accuracy"] = result.get("accuracy")
        metrics[f"mcq_{stem}_accuracy_norm"] = result.get("accuracy_norm")
    return metrics


def write_report(report: dict, out: Path, *, stats=None) -> None:
    """report.json and report.md, with the plots (PNG) the run's data allow, in ``out``."""
    from minigpts.report import write_run_plots, write_run_report

    magnitudes = token_counts = None
    if stats is not None:
        magnitudes = torch.cat([t.flatten() for t in stats.mlp_l1]).double().numpy()
        token_counts = stats.token_counts.numpy()
    report["figures"] = write_run_plots(report, out, magnitudes=magnitudes, token_counts=token_counts)
    write_json_atomic(out / "report.json", report)
    write_run_report(report, out)


def _options_dict(options: RunOptions) -> dict:
    from dataclasses import asdict

    return asdict(options)

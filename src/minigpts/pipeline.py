"""The stages chained: split → evaluate base → analyze → plan → prune → evaluate → recover → save → report.

Each stage is a function of plain inputs so the CLI subcommands (``analyze``, ``prune``,
``finetune``, ``eval``, ``run``, ``sweep``) are thin wrappers, and each stage's output is a file a
user can keep (stats, plan, model directory, report).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from minigpts import __version__
from minigpts.data import Corpus, make_windows, text_within_token_budget, tokenize_stream
from minigpts.errors import UserError
from minigpts.options import (  # noqa: F401 - the stages' options, importable from here as before
    AnalysisOptions,
    EvalOptions,
    FinetuneOptions,
    PlanOptions,
    RunOptions,
    SweepOptions,
    flag_of,
)

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------
# Output directory discipline: refuse non-empty outputs without --force; write via temp then rename


def check_output_dir(out: str | Path, force: bool, flag: str | None = None) -> Path:
    out, flag = Path(out), flag or flag_of(RunOptions, "out")
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
    model, tokenizer, corpus: Corpus, options: AnalysisOptions, *, model_name: str, progress=True,
    expected_tokens: int = 0,
):  # fmt: skip
    """The statistics of the calibration windows; ``expected_tokens``: --vocab-keep-expected's counts too."""
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
        expected_tokens=expected_tokens,
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


EXPECTED_COUNT_TOKENS = 16_384  # calibration tokens behind --vocab-keep-expected (in the analysis pass)


def expected_tokens_for(options: PlanOptions) -> int:
    """Calibration tokens whose expected counts the analysis pass measures for this plan (0: none)."""
    return EXPECTED_COUNT_TOKENS if options.vocab_keep_expected and options.has_vocab() else 0


def domain_expected_counts(model, tokenizer, corpus: Corpus | None, *, stats=None, progress=True):
    """The model's expected token counts over the first calibration windows (see --vocab-keep-expected):
    the statistics' own when the analysis measured them, else one more pass over windows of 1024."""
    from minigpts.vocab import expected_token_counts

    measured = stats is not None and stats.expected_counts is not None
    if measured and stats.expected_tokens >= min(EXPECTED_COUNT_TOKENS, stats.n_tokens):
        return stats.expected_counts.numpy()
    if corpus is None:
        raise UserError("--vocab-keep-expected runs the model over the domain text: give --data")
    positions = getattr(model.config, "max_position_embeddings", None) or 1024
    windows = calibration_windows(
        tokenizer, corpus, AnalysisOptions(calib_tokens=EXPECTED_COUNT_TOKENS, seq_len=min(1024, positions))
    )
    return expected_token_counts(model, windows, progress=progress)


def build_plan(model, tokenizer, stats, options: PlanOptions, *, corpus: Corpus | None = None, progress=True):
    """Structured plan from the stats (+ the vocabulary selection when asked)."""
    from minigpts.plan import identity_plan

    flags = {
        names: [flag_of(PlanOptions, n) for n in names]
        for names in (options.STRUCTURE_FIELDS, options.VOCAB_FIELDS)
    }
    if not options.has_structure() and not options.has_vocab():
        structure, vocab = (
            ", ".join(flags[names]) for names in (options.STRUCTURE_FIELDS, options.VOCAB_FIELDS)
        )
        raise UserError(f"nothing to prune: give a plan ({structure}) and/or a vocabulary option ({vocab})")
    if not options.has_vocab() and (options.vocab_keep_general or options.vocab_keep_expected):
        widen = " / ".join(flag_of(PlanOptions, n) for n in ("vocab_keep_general", "vocab_keep_expected"))
        cut = " or ".join(flags[options.VOCAB_FIELDS][:2])
        raise UserError(f"{widen} widen a vocabulary cut: add {cut}")
    selection = (
        _select_vocab(model, tokenizer, stats, options, corpus, progress) if options.has_vocab() else None
    )
    plan = (
        _structure_plan(model, stats, options, selection) if options.has_structure() else identity_plan(model)
    )
    if selection is not None:
        from minigpts.vocab import selection_summary

        plan.vocab_keep = list(selection.keep_ids)
        plan.summary["vocab"] = selection_summary(model, selection, token_counts_source(corpus, stats))
        names = (*options.VOCAB_FIELDS, "vocab_keep_general", "vocab_keep_expected")
        plan.settings.update({name: getattr(options, name) for name in names})
    return plan


def _select_vocab(model, tokenizer, stats, options: PlanOptions, corpus: Corpus | None, progress: bool):
    from minigpts.vocab import select_vocab

    counts = domain_token_counts(tokenizer, corpus, stats)
    expected = None
    if options.vocab_keep_expected:
        expected = domain_expected_counts(model, tokenizer, corpus, stats=stats, progress=progress)
    return select_vocab(
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


def _structure_plan(model, stats, options: PlanOptions, selection):
    """make_plan with the options; --target-params counts the whole model, vocabulary cut included."""
    from minigpts.plan import make_plan

    if stats is None:
        raise UserError("a structural plan needs activation statistics (run analysis or pass --stats)")
    kwargs = options.structure_kwargs()
    vocab_saved = vocab_parameters_saved(model, selection) if selection is not None else 0
    if kwargs["target_params"] is not None and vocab_saved:
        # what the vocabulary cut saves, the structure need not
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
    if options.reconstruct == "lstsq" and stats.has_moments:
        from minigpts.reconstruct import thin_calibration_warning

        warning = thin_calibration_warning(stats)
        if warning:
            plan.summary.setdefault("notes", []).append(warning)
    return plan


def record_score_distribution(model, stats, options: PlanOptions, plan) -> None:
    """The criterion's score distribution per group in ``plan.summary["score_distribution"]``, and a
    note (``summary["notes"]``, starting "warning:") for each threshold that removes nothing or almost
    everything. The plan itself is not changed."""
    from minigpts.arch import get_adapter
    from minigpts.criteria import unit_scores
    from minigpts.distribution import score_distribution, threshold_warnings

    criterion = plan.criterion  # the one the plan used
    scores = unit_scores(model, stats, criterion, options.seed)
    plan.summary["score_distribution"] = {
        "criterion": criterion,
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
        criterion=criterion,
        groups=tuple(groups),
    )
    if warnings:
        plan.summary.setdefault("notes", []).extend(warnings)


def vocab_parameters_saved(model, selection) -> int:
    from minigpts.vocab import vocab_summary

    return vocab_summary(model, selection).parameters_saved


def apply_full_plan(
    model,
    tokenizer,
    plan,
    *,
    stats=None,
    reconstruct: str = "none",
    ridge: float | None = None,
    calibration=None,
    sequential_target: str = "residual",
):
    """Refit (``reconstruct="lstsq"``, from ``stats``' second moments; layer by layer on the
    ``calibration`` windows when given, toward ``sequential_target``), structure surgery, then
    vocabulary surgery; returns (model, tokenizer) — the model is modified. The refit is recorded in
    the plan."""
    from minigpts.reconstruct import RECONSTRUCT_METHODS
    from minigpts.surgery import apply_plan

    if reconstruct not in RECONSTRUCT_METHODS:
        raise UserError(f"--reconstruct {reconstruct}: use one of {', '.join(RECONSTRUCT_METHODS)}")
    if reconstruct == "lstsq" and plan.criterion != "none":
        from minigpts.reconstruct import DEFAULT_RIDGE, sequential_reconstruct
        from minigpts.reconstruct import reconstruct as refit_projections

        if stats is None:
            raise UserError(
                "--reconstruct lstsq needs the statistics of the model (run analysis or pass --stats)"
            )
        ridge = DEFAULT_RIDGE if ridge is None else ridge
        if calibration is not None:
            plan.summary["reconstructed"] = sequential_reconstruct(
                model, plan, stats, calibration, ridge=ridge, target=sequential_target
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

    common = dict(model_name=name, seq_len=options.seq_len, batch_size=options.batch_size, progress=progress)
    common["budget_tokenizer"] = budget_tokenizer
    texts, split, max_tokens = corpus.split(options.split), options.split, options.max_eval_tokens
    result = evaluate(
        model, tokenizer, texts, split=split, max_tokens=max_tokens, model_path=model_path, **common
    )
    result = result.to_dict()
    result["vocab_size"] = len(tokenizer)
    if general is not None:
        max_tokens = options.general_max_tokens or options.max_eval_tokens
        g = evaluate(model, tokenizer, general.split("test"), split="test", max_tokens=max_tokens, **common)
        result["general"] = {
            k: getattr(g, k) for k in ("perplexity", "bits_per_byte", "eval_tokens", "eval_bytes")
        }
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
    return validation_bpb(
        base_model, base_tokenizer, corpus, seq_len=options.seq_len, max_tokens=options.max_val_tokens
    )


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
    import inspect

    accepted = set(inspect.signature(finetune).parameters) - {"teacher"}  # the option names a model
    settings = {f.name: getattr(options, f.name) for f in dataclasses.fields(options) if f.name in accepted}
    return finetune(
        model,
        tokenizer,
        train_windows,
        val_windows,
        out_dir=work_dir,
        teacher=teacher,
        teacher_vocab_keep=teacher_vocab_keep,
        stop_at_bpb=stop_at_bpb,  # converted on the validation windows finetune keeps
        byte_lengths=token_byte_lengths(tokenizer),
        progress=progress,
        **settings,
    )


def recovery_method_or_none(name: str, flag: str | None = None):
    """The registered recovery method called ``name``, or None for ``none``; a UserError names the choices."""
    from minigpts.recovery import get_recovery_method, recovery_method_names

    if name == "none":
        return None
    flag = flag or flag_of(RunOptions, "finetune")
    if name not in recovery_method_names():
        raise UserError(f"{flag} {name}: use none, {', '.join(recovery_method_names())}")
    return get_recovery_method(name, flag)


def with_shared_teacher_cache(recovery: FinetuneOptions, method, work: Path) -> FinetuneOptions:
    """One teacher cache for every recovery of a run or sweep (unless --teacher-cache names one)."""
    if method is None or not method.needs_teacher or recovery.teacher_cache is not None:
        return recovery
    return dataclasses.replace(recovery, teacher_cache=str(work / "teacher-cache"))


GENERAL_CONTROL = "control_general_calibration"
# The same units from general text but the domain's vocabulary: separates the choice of units from the
# vocabulary's (the general control also counts the vocabulary on general text). Only for plans that cut both.
GENERAL_UNITS_CONTROL = "control_general_units"
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


def general_controls(plan, options: PlanOptions) -> list[tuple[str, bool]]:
    """(stage name, vocabulary from general text?) of the general-text controls ``plan`` calls for."""
    controls = [(GENERAL_CONTROL, True)]
    if options.has_structure() and plan.vocab_keep is not None:
        controls.append((GENERAL_UNITS_CONTROL, False))
    return controls


def general_plan_like(
    model, tokenizer, plan, general_stats, general_corpus: Corpus, options: PlanOptions, *, general_vocab=True
):
    """The thesis control's plan: exactly ``plan``'s widths per layer (so the same parameter count),
    but the units chosen by the same criterion scored on statistics of general text, and the
    vocabulary (same size) chosen by the general text's token counts (``general_vocab``; else the
    domain plan's vocabulary, to measure the choice of units alone)."""
    from minigpts.plan import best_units_like, unit_scores

    notes = []
    layers, hidden = plan.layers, plan.hidden_keep
    if options.has_structure():
        layers, hidden = best_units_like(
            model, plan, unit_scores(model, general_stats, plan.criterion, options.seed)
        )
        if plan.layers_keep is not None:
            notes.append("dropped layers: the domain plan's (layer removal is not re-chosen on general text)")
    vocab = plan.vocab_keep
    if plan.vocab_keep is not None and general_vocab:
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
        "control": "units chosen on general text, same widths"
        + ("" if general_vocab or vocab is None else ", the domain's vocabulary"),
        "calibration_data": general_corpus.source,
    }
    if notes:
        settings["control_notes"] = notes
    return dataclasses.replace(
        plan,
        layers=layers,
        hidden_keep=hidden,
        vocab_keep=vocab,
        settings=settings,
        summary=dict(plan.summary),
    )


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
# One setting of one domain: plan → prune (+ refit) → evaluate → recover → evaluate (`run`, `sweep`)


def sequential_calibration(tokenizer, corpus: Corpus, options: RunOptions | SweepOptions):
    """The calibration windows of ``--sequential`` (the refit layer by layer), or None without it."""
    if options.plan.refits_sequentially(calibration_text=True):
        return calibration_windows(tokenizer, corpus, options.analysis)
    return None


def prune_copy(model, tokenizer, plan, options: PlanOptions, *, stats=None, calibration=None, in_place=False):
    """``apply_full_plan`` with the options' refit on a copy of ``model`` (``in_place``: on ``model``)."""
    target = model if in_place else copy.deepcopy(model)
    return apply_full_plan(
        target,
        tokenizer,
        plan,
        stats=stats,
        reconstruct=options.reconstruct,
        ridge=options.ridge,
        calibration=calibration,
    )


def _compute(step: str, compute):
    return compute()


@dataclass
class Domain:
    """What every setting of one domain shares: its corpus, the unpruned model, the evaluation and the
    recovery budget; ``run_setting`` runs one setting (`run` has one, `sweep` many, plus controls)."""

    corpus: Corpus
    options: RunOptions | SweepOptions
    base_model: Any
    base_tokenizer: Any
    method: Any  # the recovery method; None for --finetune none
    recovery: FinetuneOptions
    eval_kwargs: dict
    stop_at_bpb: float | None = None
    calibration: torch.Tensor | None = None  # --sequential windows of the corpus
    teacher_model: Any = None  # --teacher's model; None: the unpruned model teaches

    @classmethod
    def prepare(
        cls, options, corpus, base_model, base_tokenizer, *, method, work, general, mcq_sets, say, progress
    ):
        finetune = options.finetune if options.finetune != "none" else "full"
        recovery = dataclasses.replace(options.recovery, method=finetune)
        recovery = with_shared_teacher_cache(recovery, method, work)  # one teacher pass per window, in all
        stop_at_bpb = None
        if method is not None and recovery.stop_at_base:
            stop_at_bpb = validation_bpb_target(base_model, base_tokenizer, corpus, recovery)
            say(f"stop rule: validation bits/byte ≤ {stop_at_bpb:.4f} (the unpruned model's)")
        kwargs = dict(general=general, mcq_sets=mcq_sets, progress=progress, budget_tokenizer=base_tokenizer)
        calibration = sequential_calibration(base_tokenizer, corpus, options)
        teacher = given_teacher(options, base_model) if method is not None and method.needs_teacher else None
        return cls(
            corpus, options, base_model, base_tokenizer, method, recovery, kwargs, stop_at_bpb, calibration,
            teacher,
        )  # fmt: skip

    def prune(self, plan, stats, calibration, in_place=False):
        """(model, tokenizer): the base model pruned with ``plan`` (a copy unless ``in_place``)."""
        base = self.base_model, self.base_tokenizer
        return prune_copy(
            *base, plan, self.options.plan, stats=stats, calibration=calibration, in_place=in_place
        )

    @property
    def teacher(self):
        if self.method is None or not self.method.needs_teacher:
            return None
        return self.teacher_model if self.teacher_model is not None else self.base_model

    def evaluate(self, model, tokenizer, name: str, **kwargs) -> dict:
        evaluation = self.options.evaluation
        return evaluate_stage(
            model, tokenizer, self.corpus, evaluation, name=name, **self.eval_kwargs, **kwargs
        )

    def recover(self, model, tokenizer, name: str, work: Path, vocab_keep=None):
        """(model, stage) of ``model`` fine-tuned under the shared budget, then evaluated; its
        checkpoints are dropped. A resumed `run` continues each recovery that saved a checkpoint."""
        recovery = self.recovery
        recovery = dataclasses.replace(
            recovery, resume=recovery.resume and _has_checkpoint(work / "checkpoints")
        )
        model, result = run_finetune(
            model,
            tokenizer,
            self.corpus,
            recovery,
            work_dir=work,
            teacher=self.teacher,
            teacher_vocab_keep=vocab_keep,
            stop_at_bpb=self.stop_at_bpb,
            progress=self.eval_kwargs["progress"],
            budget_tokenizer=self.base_tokenizer,
        )
        stage = self.evaluate(model, tokenizer, name)
        stage["finetune"] = result.to_dict()
        cleanup(work)
        return model, stage

    def run_setting(
        self, plan, work: Path, *, stats, calibration, names=("pruned", "finetuned"), evaluate_pruned=True,
        in_place=False, steps=_compute
    ):  # fmt: skip
        """Prune (a copy of, or with ``in_place`` the very) base model with ``plan``, evaluate it as
        ``names[0]``, recover it and evaluate it as ``names[1]``: (model, tokenizer, plan, stages).
        ``steps(step, compute)`` runs each step ("prune", "eval_pruned", "finetune"); `run` times,
        caches and reports them there."""
        model, tokenizer, plan = steps(
            "prune", lambda: (*self.prune(plan, stats, calibration, in_place), plan)
        )
        if in_place:
            self.base_model = None  # it is the pruned model now (or, resumed, not needed)
        stages = {}
        if evaluate_pruned:
            stages[names[0]] = steps("eval_pruned", lambda: self.evaluate(model, tokenizer, names[0]))
        if self.method is not None:
            model, stages[names[1]] = steps(
                "finetune", lambda: self.recover(model, tokenizer, names[1], work, plan.vocab_keep)
            )
        return model, tokenizer, plan, stages


@dataclass
class GeneralCalibration:
    """The thesis control's calibration text: the general corpus, its statistics, its --sequential windows."""

    source: str
    text: Corpus
    stats: Any
    calibration: torch.Tensor | None

    @classmethod
    def prepare(
        cls, general: Corpus, options, model, tokenizer, *, with_stats: bool, model_name: str, progress
    ):
        text = general_calibration_corpus(general)
        stats = None
        if with_stats:
            stats = run_analysis(
                model, tokenizer, text, options.analysis, model_name=model_name, progress=progress
            )
        return cls(general.source, text, stats, sequential_calibration(tokenizer, text, options))

    def plan_like(self, domain: Domain, plan, options: PlanOptions, *, general_vocab=True):
        return general_plan_like(
            domain.base_model,
            domain.base_tokenizer,
            plan,
            self.stats,
            self.text,
            options,
            general_vocab=general_vocab,
        )

    def record(self, control_plan) -> dict:
        """What the control was calibrated on (``stage["calibration"]``)."""
        stats = self.stats.metadata if self.stats is not None else None
        return {"data": self.source, "stats": stats, "plan_settings": control_plan.settings}


# --------------------------------------------------------------------------------------------------
# The whole experiment (`minigpts run`)


def run_experiment(options: RunOptions, *, corpus: Corpus | None = None, say=print, progress=True) -> dict:
    """Run every stage and save the pruned (and recovered) model with report.json / report.md in --out."""
    from minigpts import distributed

    method = recovery_method_or_none(options.finetune)
    if options.out is None and not options.dry_run:
        raise UserError("--out is required (the output directory), unless --dry-run only prints the plan")
    out = Path(options.out) if options.out is not None else None
    if not options.dry_run:
        check_output_dir(out, options.force)
    distributed.barrier()  # data parallel: every process has checked --out before rank 0 writes
    timings: dict[str, float] = {}
    corpus, general, mcq_sets = _run_inputs(options, corpus)
    work, cache, resume = _run_work(options, out, corpus, say)
    with timed(timings, "load"):
        loaded = load_base(options)
    say(f"model: {loaded.description}")
    stats = _run_stats(options, loaded, corpus, cache, resume, timings, say, progress)
    plan = _run_plan(options, loaded, corpus, stats, cache, resume, timings, say, progress)
    if options.dry_run:
        return {"plan": plan, "timings": timings}
    _say_warnings(plan, say)
    general_options = dict(general=general, mcq_sets=mcq_sets, progress=progress)
    stages = {"base": _run_base(options, loaded, corpus, cache, resume, timings, say, general_options)}
    domain = Domain.prepare(
        options, corpus, loaded.model, loaded.tokenizer, method=method, work=work, say=say, **general_options
    )
    # The unpruned model is only needed later as a teacher or to build the controls; otherwise it is
    # pruned in place, so the run never holds two models (peak memory ≈ one model + activations).
    keep_base = options.controls or (domain.teacher is not None and domain.teacher_model is None)
    if not keep_base:
        loaded.model = None
    steps = _run_steps(options, cache, resume, timings, say)
    final_model, final_tokenizer, plan, setting = domain.run_setting(
        plan,
        work / "finetuned",
        stats=stats,
        calibration=domain.calibration,
        in_place=not keep_base,
        steps=steps,
    )
    stages.update(setting)
    if options.controls:
        stages.update(
            _run_controls(domain, plan, stats, general, work, timings, say, loaded.source_id, progress)
        )
    report = _run_report(options, loaded, corpus, plan, stats, stages, timings)
    if not distributed.is_main():  # data parallel: every process holds the same model; rank 0 saves
        return report
    with timed(timings, "save"):
        _save_run(final_model, final_tokenizer, out, options, loaded, corpus, general, plan, stats, stages)
    last = stages["finetuned" if "finetuned" in stages else "pruned"]
    weights = [f for f in out.glob("*.safetensors") if f.name != "stats.safetensors"]
    last.update(size_bytes=sum(f.stat().st_size for f in weights), size_source="disk")
    write_report(report, out, stats=stats)
    cleanup(work)
    return report


def _say_warnings(plan, say) -> None:
    from rich.markup import escape

    for note in plan.summary.get("notes") or []:
        if note.startswith("warning:"):
            say(f"[yellow]{escape(note)}[/yellow]")


def given_teacher(options: RunOptions | SweepOptions, base_model):
    """--teacher's model (None without the flag): it teaches every recovery of the run, controls included,
    in the unpruned model's token ids, so it must share the unpruned model's vocabulary."""
    from minigpts.models import load_model
    from minigpts.recovery.methods import vocab_size_of

    name = options.recovery.teacher
    if not name:
        return None
    flag = flag_of(FinetuneOptions, "teacher")
    access = dict(trust_remote_code=options.trust_remote_code, allow_pickle=options.allow_pickle)
    teacher = load_model(name, device=options.device, dtype=options.dtype, flag=flag, **access).model
    if vocab_size_of(teacher) != vocab_size_of(base_model):
        raise UserError(
            f"{flag} {name}: it predicts {vocab_size_of(teacher):,} tokens and the unpruned model "
            f"{vocab_size_of(base_model):,}; the teacher must share the unpruned model's tokenizer"
        )
    return teacher


def load_base(options: RunOptions | SweepOptions):
    """The unpruned model (and tokenizer) the options name."""
    from minigpts.models import load_model

    return load_model(
        options.model,
        device=options.device,
        dtype=options.dtype,
        trust_remote_code=options.trust_remote_code,
        allow_pickle=options.allow_pickle,
    )


def _run_inputs(options: RunOptions, corpus: Corpus | None):
    """(corpus, general corpus or None, MCQ sets or None), all read before any model runs."""
    from minigpts.data import load_corpus

    if corpus is None:
        corpus = load_corpus(
            options.data, text_field=options.text_field, encoding=options.encoding, seed=options.seed
        )
    general = None
    if options.evaluation.general_data:
        general = load_corpus(options.evaluation.general_data, seed=options.seed)
    mcq_sets = load_mcq_sets(options.evaluation.mcq) if options.evaluation.mcq else None
    return corpus, general, mcq_sets


def _run_work(options: RunOptions, out: Path | None, corpus: Corpus, say):
    """(work dir, stage cache, resume?) of a run; --resume needs something to resume, and a run that
    left fine-tuning checkpoints needs --resume."""
    resume = options.recovery.resume and not options.dry_run
    if out is None or options.dry_run:
        return None, None, resume
    work = work_dir_for(out)
    cache = StageCache.for_run(work, options, corpus)
    names = ("finetuned", "control_base", "control_random", GENERAL_CONTROL, GENERAL_UNITS_CONTROL)
    checkpoints = [name for name in names if _has_checkpoint(work / name / "checkpoints")]
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
    return work, cache, resume


def _run_stats(options: RunOptions, loaded, corpus, cache, resume, timings, say, progress):
    """The statistics of the calibration split (None when the plan has no structure)."""
    from minigpts.analysis import ActivationStats

    if not options.plan.has_structure():
        return None
    if resume and cache.stats.is_file():
        say(f"analysis: reused {cache.stats.name}")
        return ActivationStats.load(cache.stats)
    analysis = options.analysis
    say(f"analysis: {analysis.calib_tokens:,} calibration tokens, windows of {analysis.seq_len}")
    with timed(timings, "analyze"):
        stats = run_analysis(
            loaded.model, loaded.tokenizer, corpus, analysis, model_name=loaded.source_id, progress=progress,
            expected_tokens=expected_tokens_for(options.plan),
        )  # fmt: skip
    if cache is not None:  # kept for --resume; read back so a resumed run sees the same numbers
        stats.save(cache.stats)
        stats = ActivationStats.load(cache.stats)
        interrupt_point("analyze")
    return stats


def _run_plan(options: RunOptions, loaded, corpus, stats, cache, resume, timings, say, progress):
    from minigpts.plan import PruningPlan

    with timed(timings, "plan"):
        if resume and cache.plan.is_file():
            say(f"plan: reused {cache.plan.name}")
            return PruningPlan.load(cache.plan)
        plan = build_plan(
            loaded.model, loaded.tokenizer, stats, options.plan, corpus=corpus, progress=progress
        )
        if cache is not None:
            write_json_atomic(cache.plan, plan.to_dict())
            interrupt_point("plan")
    return plan


def _run_base(options: RunOptions, loaded, corpus, cache, resume, timings, say, general_options) -> dict:
    """The unpruned model's evaluation."""
    if resume and cache.base.is_file():
        base = json.loads(cache.base.read_text())
        say(f"base evaluation: reused {cache.base.name}")
    else:
        with timed(timings, "eval_base"):
            base = evaluate_stage(
                loaded.model,
                loaded.tokenizer,
                corpus,
                options.evaluation,
                name="base",
                model_path=loaded.path,
                budget_tokenizer=loaded.tokenizer,
                **general_options,
            )
        if cache is not None:
            write_json_atomic(cache.base, base)
            interrupt_point("eval_base")
    say(f"base: bits/byte {base['bits_per_byte']:.4f}, perplexity {base['perplexity']:.3f}")
    return base


def _run_steps(options: RunOptions, cache, resume, timings, say):
    """`run`'s steps of the pruned model (see ``Domain.run_setting``): timed, kept in the stage cache
    for --resume (the pruned model and its evaluation), and reported."""

    def steps(step: str, compute):
        if step == "prune":
            plan_file = cache.pruned_dir.with_suffix(".plan.json") if cache is not None else None
            if resume and cache.pruned_dir.is_dir() and plan_file.is_file():
                from minigpts.plan import PruningPlan

                say(f"pruning: reused {cache.pruned_dir.name}")
                return (*_load_pruned(cache.pruned_dir, options), PruningPlan.load(plan_file))
            with timed(timings, "prune"):
                model, tokenizer, plan = compute()
            if cache is not None:
                from minigpts.export import save_model

                write_json_atomic(plan_file, plan.to_dict())
                save_model(model, tokenizer, cache.pruned_dir, plan=plan, force=True)
                interrupt_point("prune")
            return model, tokenizer, plan
        if step == "eval_pruned":
            if resume and cache.pruned.is_file():
                stage = json.loads(cache.pruned.read_text())
                say(f"pruned evaluation: reused {cache.pruned.name}")
            else:
                with timed(timings, "eval_pruned"):
                    stage = compute()
                if cache is not None:
                    write_json_atomic(cache.pruned, stage)
                    interrupt_point("eval_pruned")
            say(f"pruned: bits/byte {stage['bits_per_byte']:.4f}, perplexity {stage['perplexity']:.3f}")
            return stage
        with timed(timings, step):
            model, stage = compute()
        say(f"finetuned: bits/byte {stage['bits_per_byte']:.4f} ({stage['finetune']['stopped_because']})")
        return model, stage

    return steps


def _load_pruned(path: Path, options: RunOptions):
    from minigpts.export import load as load_saved
    from minigpts.models import resolve_device, resolve_dtype

    device = resolve_device(options.device)
    return load_saved(path, device=device, dtype=resolve_dtype(options.dtype, device))


def _run_controls(domain: Domain, plan, stats, general, work, timings, say, model_name, progress) -> dict:
    """The controls of `run`: the unpruned model fine-tuned with the same budget, a random cut of the
    same widths, and the same cut calibrated on general text (--general-data; when the plan also cuts
    the vocabulary, once more with the domain's vocabulary); each recovered when the run recovers
    (evaluated only then), else evaluated as pruned."""
    from minigpts.plan import random_plan_like

    tuned = domain.method is not None
    stages = {}
    if tuned:
        with timed(timings, "control_base_finetuned"):
            _, stages["control_base_finetuned"] = domain.recover(
                copy.deepcopy(domain.base_model),
                domain.base_tokenizer,
                "control_base_finetuned",
                work / "control_base",
            )
    random_plan = random_plan_like(domain.base_model, plan, seed=domain.options.seed)
    names = ("control_random", "control_random_finetuned")
    with timed(timings, names[tuned]):
        *_, control = domain.run_setting(
            random_plan, work / "control_random", stats=stats, calibration=domain.calibration, names=names,
            evaluate_pruned=not tuned
        )  # fmt: skip
    stages.update(control)
    if general is None:
        say(f"[yellow]skipped {GENERAL_CONTROL}: {GENERAL_CONTROL_NEEDS}[/yellow]")
        return stages
    with timed(timings, "general_calibration_analysis"):
        reference = GeneralCalibration.prepare(
            general,
            domain.options,
            domain.base_model,
            domain.base_tokenizer,
            with_stats=domain.options.plan.has_structure(),
            model_name=model_name,
            progress=progress,
        )
    for control, general_vocab in general_controls(plan, domain.options.plan):
        names = (control, f"{control}_finetuned")
        with timed(timings, control):
            control_plan = reference.plan_like(domain, plan, domain.options.plan, general_vocab=general_vocab)
            *_, result = domain.run_setting(
                control_plan, work / control, stats=reference.stats, calibration=reference.calibration,
                names=names, evaluate_pruned=not tuned
            )  # fmt: skip
            stages[names[tuned]] = {**result[names[tuned]], "calibration": reference.record(control_plan)}
    return stages


def _run_report(options: RunOptions, loaded, corpus, plan, stats, stages, timings) -> dict:
    recorded = dataclasses.asdict(options)
    recorded["plan"]["criterion"] = plan.criterion  # the one used, not None (= default)
    return {
        "minigpts_version": __version__,
        "model": loaded.name,
        "model_description": loaded.description,
        "data": corpus.source,
        "splits": corpus.describe(),
        "split": options.evaluation.split,
        "seq_len": options.evaluation.seq_len,
        "protocol": stages["base"]["protocol"],
        "budget_tokenizer": loaded.source_id,  # the tokenizer the token budgets are counted in
        "options": recorded,
        "plan_summary": plan.summary,
        "vocab": plan.summary.get("vocab"),
        "stats": stats.metadata if stats is not None else None,
        "stages": stages,
        **stages,
        "timings": timings,
    }


def _save_run(
    model, tokenizer, out, options: RunOptions, loaded, corpus, general, plan, stats, stages
) -> None:
    """The final model (with its card and minigpts.json) and the statistics, in --out."""
    from minigpts.export import base_license, save_model

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
    save_model(model, tokenizer, out, plan=plan, metadata=metadata, force=options.force)
    if stats is not None:
        stats.save(out / "stats.safetensors")


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

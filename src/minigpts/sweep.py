"""The paper's experiment: for each domain, a grid of pruning settings, each pruned, recovered, evaluated.

Analysis runs once per domain (statistics are reused by every setting); the base model is evaluated
once per domain; each setting prunes a fresh copy of the base model. Rows follow the paper's table
(relative size, perplexity and bits-per-byte base → pruned → recovered, MCQ, recovery time) and the
report adds the neuron-magnitude, token-frequency and size-vs-bits-per-byte figures. Several
criteria (``SweepOptions.criteria``, ``--criterion A B``) compare methods: every setting for every
criterion, on the same statistics and recovery budget, one plotted line per criterion.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from minigpts.errors import UserError
from minigpts.evaluation import decode_speed
from minigpts.pipeline import (
    GENERAL_CONTROL_NEEDS,
    AnalysisOptions,
    EvalOptions,
    FinetuneOptions,
    PlanOptions,
    apply_full_plan,
    build_plan,
    calibration_windows,
    check_output_dir,
    cleanup,
    evaluate_stage,
    general_calibration_corpus,
    general_plan_like,
    load_mcq_sets,
    random_plan_like,
    recover_stage,
    recovery_method_or_none,
    run_analysis,
    validation_bpb,
    validation_bpb_target,
    with_shared_teacher_cache,
    work_dir_for,
    write_json_atomic,
)
from minigpts.recovery import get_recovery_method
from minigpts.report import frontier_lines, sweep_frontier

PAPER_GRID = [(e, e, emb) for e in (1e-5, 1e-3, 1e-1) for emb in (None, 0.0)]


@dataclass
class SweepOptions:
    model: str | None
    data: list[str]
    out: str
    target_params: list[float] = field(default_factory=list)  # empty: the paper's threshold grid
    criteria: list[str] = field(default_factory=list)  # several: criteria × sizes; empty: plan.criterion
    finetune: str = "full"
    controls: bool = False
    mcq: list[str] = field(default_factory=list)  # FILE (every domain) or DOMAIN=FILE
    text_field: str = "text"
    encoding: str = "utf-8"
    seed: int = 0
    device: str = "auto"
    dtype: str | None = None
    trust_remote_code: bool = False  # let a directory's auto_map run code (--trust-remote-code)
    allow_pickle: bool = False  # also read pickle (.bin) weights
    force: bool = False
    evaluation: EvalOptions = field(default_factory=EvalOptions)
    analysis: AnalysisOptions = field(default_factory=AnalysisOptions)
    plan: PlanOptions = field(default_factory=PlanOptions)
    recovery: FinetuneOptions = field(default_factory=FinetuneOptions)


_SPLIT_SUFFIX = re.compile(
    r"[._\-\s]+(train|training|valid|validation|val|dev|test|calib|calibration)$", re.I
)


def domain_name(spec: str) -> str:
    """'../datasets/economics.*.jsonl' → 'economics'; 'law_train.jsonl' → 'law'; a directory → its name."""
    name = Path(spec.rstrip("/")).name
    name = re.split(r"[.*?\[]", name)[0] or Path(spec).parent.name
    name = _SPLIT_SUFFIX.sub("", name) or name
    return name or "data"


def group_corpora(specs: list[str]) -> dict[str, list[str]]:
    """Domain name → its --data paths, in order of first appearance.

    A shell expands ``economics.*.jsonl skyrim.*.jsonl`` into every file; paths in one folder whose
    domain name (file name up to the first dot, a trailing split word dropped) is the same form one
    corpus, so ``economics.train.jsonl economics.valid.jsonl economics.test.jsonl`` is one domain.
    """
    groups: dict[str, list[str]] = {}
    folders: dict[str, Path] = {}
    for spec in specs:
        domain = domain_name(spec)
        folder = Path(spec.rstrip("/")).expanduser().parent.resolve()
        if domain in folders and folders[domain] != folder:
            raise UserError(
                f"--data: {groups[domain][0]} and {spec} are in different folders but share the domain "
                f"name {domain!r}; rename one (paths in one folder with one domain name form one corpus)"
            )
        folders[domain] = folder
        groups.setdefault(domain, []).append(spec)
    return groups


def settings_grid(options: SweepOptions) -> list[tuple[str, PlanOptions]]:
    """(label, plan options) for each setting: target sizes if given, else the paper's threshold grid;
    with several ``criteria``, that grid for each criterion (labels start with the criterion)."""
    if len(options.criteria) > 1:
        grid = []
        for criterion in options.criteria:
            single = replace(options, criteria=[], plan=replace(options.plan, criterion=criterion))
            grid += [(f"{criterion} · {label}", plan) for label, plan in settings_grid(single)]
        return grid
    base = options.plan if not options.criteria else replace(options.plan, criterion=options.criteria[0])
    if options.target_params:
        return [(f"target={t:g}", replace(base, target_params=t)) for t in options.target_params]
    grid = []
    for linear, activation, embedding in PAPER_GRID:
        label = f"lin={linear:g} act={activation:g} emb={'off' if embedding is None else f'{embedding:g}'}"
        grid.append(
            (
                label,
                replace(
                    base,
                    linear_threshold=linear,
                    activation_threshold=activation,
                    embedding_threshold=embedding,
                ),
            )
        )
    return grid


def _mcq_for_domains(entries: list[str], domains: list[str]) -> dict[str, list[str]]:
    mapping: dict[str, list[str]] = {d: [] for d in domains}
    for entry in entries:
        if "=" in entry:
            domain, path = entry.split("=", 1)
            if domain not in mapping:
                raise UserError(f"--mcq {entry}: unknown domain {domain!r}; domains are {', '.join(domains)}")
            mapping[domain].append(path)
        else:
            for domain in domains:
                mapping[domain].append(entry)
    return mapping


def _accuracy(stage: dict) -> float | None:
    mcq = stage.get("mcq") or {}
    if not mcq:
        return None
    return sum(r["accuracy"] for r in mcq.values()) / len(mcq)


def run_sweep(options: SweepOptions, *, say=print, progress=True) -> dict:
    from minigpts.data import load_corpus
    from minigpts.models import load_model
    from minigpts.report import write_sweep_report

    method = recovery_method_or_none(options.finetune)
    out = check_output_dir(options.out, options.force)
    groups = group_corpora(options.data)
    domains = list(groups)
    corpora = {
        d: load_corpus(specs, text_field=options.text_field, encoding=options.encoding, seed=options.seed)
        for d, specs in groups.items()
    }
    general = None
    if options.evaluation.general_data:
        general = load_corpus(options.evaluation.general_data, seed=options.seed)
    mcq_paths = _mcq_for_domains(options.mcq, domains)
    mcq_sets = {d: load_mcq_sets(paths) if paths else None for d, paths in mcq_paths.items()}
    grid = settings_grid(options)

    loaded = load_model(
        options.model,
        device=options.device,
        dtype=options.dtype,
        trust_remote_code=options.trust_remote_code,
        allow_pickle=options.allow_pickle,
    )
    base_model, base_tokenizer = loaded.model, loaded.tokenizer
    out.mkdir(parents=True, exist_ok=True)
    work = work_dir_for(out)
    rows: list[dict] = []
    magnitudes: dict[str, list[float]] = {}
    frequencies: dict[str, list[int]] = {}
    runs: dict[str, dict] = {}
    protocol = None
    general_text = general_stats = None
    if options.controls and general is None:
        say(f"[yellow]skipped control_general_calibration: {GENERAL_CONTROL_NEEDS}[/yellow]")
    elif options.controls:  # one analysis of the general text serves every domain
        general_text = general_calibration_corpus(general)
        if any(p.has_structure() for _, p in grid):
            say(f"general calibration: analysis of {general.source}")
            general_stats = run_analysis(
                base_model,
                base_tokenizer,
                general_text,
                options.analysis,
                model_name=loaded.source_id,
                progress=progress,
            )
    for domain in domains:
        corpus = corpora[domain]
        say(f"[bold]{domain}[/bold]: {len(grid)} settings")
        stats = run_analysis(
            base_model,
            base_tokenizer,
            corpus,
            options.analysis,
            model_name=loaded.source_id,
            progress=progress,
        )
        magnitudes[domain] = torch.cat(stats.mlp_l1).tolist()
        frequencies[domain] = stats.token_counts.tolist()
        stats.save(out / f"stats-{domain}.safetensors")
        kwargs = dict(
            general=general, mcq_sets=mcq_sets[domain], progress=progress, budget_tokenizer=base_tokenizer
        )
        base_eval = evaluate_stage(
            base_model, base_tokenizer, corpus, options.evaluation, name="base", **kwargs
        )
        base_eval["decode_tokens_per_second"] = decode_speed(base_model)
        protocol = base_eval["protocol"]
        recovery = replace(
            options.recovery, method=options.finetune if options.finetune != "none" else "full"
        )
        recovery = with_shared_teacher_cache(
            recovery, method, work
        )  # one teacher pass per window, whole sweep
        stop_at_bpb = None
        if options.finetune != "none" and recovery.stop_at_base:
            stop_at_bpb = validation_bpb_target(base_model, base_tokenizer, corpus, recovery)
        # the frontier is chosen on validation (then confirmed on test): the base's bits/byte there
        base_eval["validation_bits_per_byte"] = validation_bpb(
            base_model, base_tokenizer, corpus, **_validation_protocol(options, base_tokenizer)
        )
        control_base = None
        if options.controls and options.finetune != "none":
            _, control_base = recover_stage(
                copy.deepcopy(base_model),
                base_tokenizer,
                "control_base_finetuned",
                work / f"{domain}-control-base",
                None,
                corpus=corpus,
                evaluation=options.evaluation,
                recovery=recovery,
                teacher=base_model if method is not None and method.needs_teacher else None,
                stop_at_bpb=stop_at_bpb,
                eval_kwargs=kwargs,
            )
        domain_runs = runs.setdefault(
            domain, {"base": base_eval, "control_base_finetuned": control_base, "settings": {}}
        )
        for index, (label, plan_options) in enumerate(grid):
            say(f"  {domain} · {label}")
            try:
                plan = build_plan(
                    base_model, base_tokenizer, stats, plan_options, corpus=corpus, progress=progress
                )
            except UserError as err:  # e.g. a threshold that would remove every unit: record and go on
                say(f"  [yellow]skipped: {err}[/yellow]")
                domain_runs["settings"][label] = {"skipped": str(err)}
                continue
            stage = _prune_recover(
                base_model,
                base_tokenizer,
                plan,
                corpus,
                options,
                recovery,
                stop_at_bpb,
                work / f"{domain}-{index}",
                kwargs,
                stats=stats,
                plan_options=plan_options,
            )
            control_random = None
            if options.controls:
                random_plan = random_plan_like(base_model, plan, seed=options.seed)
                control_random = _prune_recover(
                    base_model,
                    base_tokenizer,
                    random_plan,
                    corpus,
                    options,
                    recovery,
                    stop_at_bpb,
                    work / f"{domain}-{index}-random",
                    kwargs,
                    stats=stats,
                    plan_options=plan_options,
                )
            control_general = None
            if general_text is not None:
                general_plan = general_plan_like(
                    base_model, base_tokenizer, plan, general_stats, general_text, plan_options
                )
                control_general = _prune_recover(
                    base_model,
                    base_tokenizer,
                    general_plan,
                    corpus,
                    options,
                    recovery,
                    stop_at_bpb,
                    work / f"{domain}-{index}-general",
                    kwargs,
                    stats=general_stats,
                    plan_options=plan_options,
                    calibration_corpus=general_text,
                )
                control_general["calibration"] = {
                    "data": general.source,
                    "stats": general_stats.metadata if general_stats is not None else None,
                    "plan_settings": general_plan.settings,
                }
            domain_runs["settings"][label] = {
                "plan_summary": plan.summary,
                **stage,
                "control_random": control_random,
                "control_general_calibration": control_general,
            }
            final = stage.get("finetuned") or stage["pruned"]
            finetune_info = (stage.get("finetuned") or {}).get("finetune") or {}
            control_final = general_final = None
            if control_random is not None:
                control_final = control_random.get("finetuned") or control_random["pruned"]
            if control_general is not None:
                general_final = control_general.get("finetuned") or control_general["pruned"]
            rows.append(
                {
                    "model": loaded.name,
                    "domain": domain,
                    "setting": label,
                    "criterion": plan_options.criterion,
                    "relative_size": final["params"] / base_eval["params"],
                    "params": final["params"],
                    "size_bytes": final["size_bytes"],
                    "ppl_base": base_eval["perplexity"],
                    "ppl_pruned": stage["pruned"]["perplexity"],
                    "ppl_recovered": stage["finetuned"]["perplexity"] if "finetuned" in stage else None,
                    "bpb_base": base_eval["bits_per_byte"],
                    "bpb_pruned": stage["pruned"]["bits_per_byte"],
                    "bpb_recovered": stage["finetuned"]["bits_per_byte"] if "finetuned" in stage else None,
                    "mcq_base": _accuracy(base_eval),
                    "mcq_pruned": _accuracy(stage["pruned"]),
                    "mcq_recovered": _accuracy(stage["finetuned"]) if "finetuned" in stage else None,
                    "epochs": finetune_info.get("epochs"),
                    "recovery_seconds": finetune_info.get("seconds"),
                    "control_base_finetuned_bpb": control_base["bits_per_byte"] if control_base else None,
                    "control_random_bpb": control_final["bits_per_byte"] if control_final else None,
                    "control_general_bpb": general_final["bits_per_byte"] if general_final else None,
                    "control_general_params": general_final["params"] if general_final else None,
                    "bpb_val_base": base_eval["validation_bits_per_byte"],
                    "bpb_val": stage["validation_bits_per_byte"],
                    "decode_tps_base": base_eval["decode_tokens_per_second"],
                    "decode_tps": stage["decode_tokens_per_second"],
                }
            )
            write_json_atomic(out / "sweep_runs.json", runs)  # partial results survive an interruption
    if not rows:
        raise UserError("sweep: every setting was skipped; see the messages above")
    paths = write_sweep_report(
        rows,
        out,
        magnitudes=magnitudes,
        token_frequencies=frequencies,
        title=f"minigpts sweep: {loaded.name}",
        protocol=protocol,
    )
    write_json_atomic(out / "sweep_runs.json", runs)
    for line in frontier_lines(sweep_frontier(rows)):
        say(line)
    cleanup(work)
    return {"rows": rows, "paths": paths, "runs": runs}


def _validation_protocol(options: SweepOptions, base_tokenizer) -> dict:
    """The frontier's validation evaluation: the test protocol's windows, --max-val-tokens base tokens."""
    return {
        "seq_len": options.evaluation.seq_len,
        "max_tokens": options.recovery.max_val_tokens,
        "budget_tokenizer": base_tokenizer,
    }


def _prune_recover(
    base_model,
    base_tokenizer,
    plan,
    corpus,
    options,
    recovery,
    stop_at_bpb,
    work,
    kwargs,
    *,
    stats,
    plan_options,
    calibration_corpus=None,
) -> dict:
    """Prune a copy of the base model with ``plan`` (refit as ``plan_options`` says), evaluate, recover,
    evaluate (the final model on validation too, for the frontier). ``calibration_corpus``: where the
    sequential refit's windows come from (default ``corpus``)."""
    model, tokenizer = apply_full_plan(
        copy.deepcopy(base_model),
        base_tokenizer,
        plan,
        stats=stats,
        reconstruct=plan_options.reconstruct,
        ridge=plan_options.ridge,
        calibration=calibration_windows(base_tokenizer, calibration_corpus or corpus, options.analysis)
        if plan_options.sequential and plan_options.reconstruct == "lstsq"
        else None,
    )
    stage = {"pruned": evaluate_stage(model, tokenizer, corpus, options.evaluation, name="pruned", **kwargs)}
    stage["decode_tokens_per_second"] = decode_speed(model)  # recovery changes no shape
    final = None
    if options.finetune != "none":
        final, stage["finetuned"] = recover_stage(
            model,
            tokenizer,
            "finetuned",
            work,
            plan.vocab_keep,
            corpus=corpus,
            evaluation=options.evaluation,
            recovery=recovery,
            teacher=base_model if get_recovery_method(recovery.method).needs_teacher else None,
            stop_at_bpb=stop_at_bpb,
            eval_kwargs=kwargs,
        )
    stage["validation_bits_per_byte"] = validation_bpb(
        final if final is not None else model,
        tokenizer,
        corpus,
        **_validation_protocol(options, base_tokenizer),
    )
    return stage

"""The paper's experiment: for each domain, a grid of pruning settings, each pruned, recovered, evaluated.

Analysis runs once per domain (statistics are reused by every setting); the base model is evaluated
once per domain; each setting prunes a fresh copy of the base model. Rows follow the paper's table
(relative size, perplexity and bits-per-byte base → pruned → recovered, MCQ, recovery time) and the
report adds the neuron-magnitude, token-frequency and size-vs-bits-per-byte figures.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from minigpts.errors import UserError
from minigpts.pipeline import (
    AnalysisOptions,
    EvalOptions,
    FinetuneOptions,
    PlanOptions,
    apply_full_plan,
    build_plan,
    check_output_dir,
    cleanup,
    evaluate_stage,
    load_mcq_sets,
    random_plan_like,
    recover_stage,
    run_analysis,
    validation_bpb_target,
    work_dir_for,
    write_json_atomic,
)

PAPER_GRID = [(e, e, emb) for e in (1e-5, 1e-3, 1e-1) for emb in (None, 0.0)]


@dataclass
class SweepOptions:
    model: str | None
    data: list[str]
    out: str
    target_params: list[float] = field(default_factory=list)  # empty: the paper's threshold grid
    finetune: str = "full"
    controls: bool = False
    mcq: list[str] = field(default_factory=list)  # FILE (every domain) or DOMAIN=FILE
    text_field: str = "text"
    encoding: str = "utf-8"
    seed: int = 0
    device: str = "auto"
    dtype: str | None = None
    force: bool = False
    evaluation: EvalOptions = field(default_factory=EvalOptions)
    analysis: AnalysisOptions = field(default_factory=AnalysisOptions)
    plan: PlanOptions = field(default_factory=PlanOptions)
    recovery: FinetuneOptions = field(default_factory=FinetuneOptions)


def domain_name(spec: str) -> str:
    """'../datasets/economics.*.jsonl' → 'economics'; a directory → its name."""
    name = Path(spec.rstrip("/")).name
    name = re.split(r"[.*?\[]", name)[0] or Path(spec).parent.name
    return name or "data"


def settings_grid(options: SweepOptions) -> list[tuple[str, PlanOptions]]:
    """(label, plan options) for each setting: target sizes if given, else the paper's threshold grid."""
    base = options.plan
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

    if options.finetune not in {"none", "full", "lora", "distill"}:
        raise UserError(f"--finetune {options.finetune}: use none, full, lora or distill")
    out = check_output_dir(options.out, options.force)
    domains = [domain_name(spec) for spec in options.data]
    if len(set(domains)) != len(domains):
        raise UserError(f"--data: two corpora share the domain name ({', '.join(domains)}); rename one")
    corpora = {
        d: load_corpus(spec, text_field=options.text_field, encoding=options.encoding, seed=options.seed)
        for d, spec in zip(domains, options.data)
    }
    general = None
    if options.evaluation.general_data:
        general = load_corpus(options.evaluation.general_data, seed=options.seed)
    mcq_paths = _mcq_for_domains(options.mcq, domains)
    mcq_sets = {d: load_mcq_sets(paths) if paths else None for d, paths in mcq_paths.items()}
    grid = settings_grid(options)

    loaded = load_model(options.model, device=options.device, dtype=options.dtype)
    base_model, base_tokenizer = loaded.model, loaded.tokenizer
    out.mkdir(parents=True, exist_ok=True)
    work = work_dir_for(out)
    rows: list[dict] = []
    magnitudes: dict[str, list[float]] = {}
    frequencies: dict[str, list[int]] = {}
    runs: dict[str, dict] = {}
    protocol = None
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
        protocol = base_eval["protocol"]
        recovery = replace(
            options.recovery, method=options.finetune if options.finetune != "none" else "full"
        )
        stop_at_bpb = None
        if options.finetune != "none" and recovery.stop_at_base:
            stop_at_bpb = validation_bpb_target(base_model, base_tokenizer, corpus, recovery)
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
                teacher=base_model if recovery.method == "distill" else None,
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
                )
            domain_runs["settings"][label] = {
                "plan_summary": plan.summary,
                **stage,
                "control_random": control_random,
            }
            final = stage.get("finetuned") or stage["pruned"]
            finetune_info = (stage.get("finetuned") or {}).get("finetune") or {}
            control_final = None
            if control_random is not None:
                control_final = control_random.get("finetuned") or control_random["pruned"]
            rows.append(
                {
                    "model": loaded.name,
                    "domain": domain,
                    "setting": label,
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
    cleanup(work)
    return {"rows": rows, "paths": paths, "runs": runs}


def _prune_recover(
    base_model, base_tokenizer, plan, corpus, options, recovery, stop_at_bpb, work, kwargs
) -> dict:
    """Prune a copy of the base model with ``plan``, evaluate, recover (unless none), evaluate."""
    model, tokenizer = apply_full_plan(copy.deepcopy(base_model), base_tokenizer, plan)
    stage = {"pruned": evaluate_stage(model, tokenizer, corpus, options.evaluation, name="pruned", **kwargs)}
    if options.finetune != "none":
        _, stage["finetuned"] = recover_stage(
            model,
            tokenizer,
            "finetuned",
            work,
            plan.vocab_keep,
            corpus=corpus,
            evaluation=options.evaluation,
            recovery=recovery,
            teacher=base_model if recovery.method == "distill" else None,
            stop_at_bpb=stop_at_bpb,
            eval_kwargs=kwargs,
        )
    return stage

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
from dataclasses import replace
from pathlib import Path

import torch

from minigpts.errors import UserError
from minigpts.evaluation import decode_speed
from minigpts.options import SweepOptions
from minigpts.pipeline import (
    GENERAL_CONTROL,
    GENERAL_CONTROL_NEEDS,
    GENERAL_UNITS_CONTROL,
    Domain,
    GeneralCalibration,
    PlanOptions,
    build_plan,
    check_output_dir,
    cleanup,
    expected_tokens_for,
    general_controls,
    load_base,
    load_mcq_sets,
    recovery_method_or_none,
    run_analysis,
    validation_bpb,
    work_dir_for,
    write_json_atomic,
)
from minigpts.report import frontier_lines, sweep_frontier

PAPER_GRID = [(e, e, emb) for e in (1e-5, 1e-3, 1e-1) for emb in (None, 0.0)]


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
    return [
        (
            f"lin={lin:g} act={act:g} emb={'off' if emb is None else f'{emb:g}'}",
            replace(base, linear_threshold=lin, activation_threshold=act, embedding_threshold=emb),
        )
        for lin, act, emb in PAPER_GRID
    ]


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
    from minigpts.report import write_sweep_report

    method = recovery_method_or_none(options.finetune)
    out = check_output_dir(options.out, options.force)
    corpora, general, mcq_sets = _sweep_inputs(options)
    grid = settings_grid(options)
    loaded = load_base(options)
    out.mkdir(parents=True, exist_ok=True)
    work = work_dir_for(out)
    reference = _general_reference(options, general, grid, loaded, say, progress)
    rows: list[dict] = []
    figures: dict[str, dict] = {"magnitudes": {}, "token_frequencies": {}}
    runs: dict[str, dict] = {}
    for name, corpus in corpora.items():
        say(f"[bold]{name}[/bold]: {len(grid)} settings")
        domain, stats = _sweep_domain(
            options, name, corpus, loaded, method, general, mcq_sets[name], out, say, progress
        )
        figures["magnitudes"][name] = torch.cat(stats.mlp_l1).tolist()
        figures["token_frequencies"][name] = stats.token_counts.tolist()
        runs[name] = _domain_runs(domain, name, work)
        for index, (label, plan_options) in enumerate(grid):
            say(f"  {name} · {label}")
            try:
                plan = build_plan(
                    loaded.model, loaded.tokenizer, stats, plan_options, corpus=corpus, progress=progress
                )
            except UserError as err:  # e.g. a threshold that would remove every unit: record and go on
                say(f"  [yellow]skipped: {err}[/yellow]")
                runs[name]["settings"][label] = {"skipped": str(err)}
                continue
            entry = _sweep_setting(domain, plan, plan_options, stats, reference, work / f"{name}-{index}")
            runs[name]["settings"][label] = entry
            rows.append(_sweep_row(loaded.name, name, label, plan_options, runs[name], entry))
            write_json_atomic(out / "sweep_runs.json", runs)  # partial results survive an interruption
    if not rows:
        raise UserError("sweep: every setting was skipped; see the messages above")
    protocol = runs[list(runs)[-1]]["base"]["protocol"]
    title = f"minigpts sweep: {loaded.name}"
    paths = write_sweep_report(rows, out, **figures, title=title, protocol=protocol)
    write_json_atomic(out / "sweep_runs.json", runs)
    for line in frontier_lines(sweep_frontier(rows)):
        say(line)
    cleanup(work)
    return {"rows": rows, "paths": paths, "runs": runs}


def _sweep_inputs(options: SweepOptions):
    """(corpus of each domain, general corpus or None, MCQ sets of each domain), read before any model runs."""
    from minigpts.data import load_corpus

    groups = group_corpora(options.data)
    corpora = {
        d: load_corpus(specs, text_field=options.text_field, encoding=options.encoding, seed=options.seed)
        for d, specs in groups.items()
    }
    general = None
    if options.evaluation.general_data:
        general = load_corpus(options.evaluation.general_data, seed=options.seed)
    mcq_paths = _mcq_for_domains(options.mcq, list(groups))
    return corpora, general, {d: load_mcq_sets(paths) if paths else None for d, paths in mcq_paths.items()}


def _general_reference(
    options: SweepOptions, general, grid, loaded, say, progress
) -> GeneralCalibration | None:
    """The general text's calibration for control_general_calibration (one analysis serves every domain)."""
    if not options.controls:
        return None
    if general is None:
        say(f"[yellow]skipped {GENERAL_CONTROL}: {GENERAL_CONTROL_NEEDS}[/yellow]")
        return None
    with_stats = any(p.has_structure() for _, p in grid)
    if with_stats:
        say(f"general calibration: analysis of {general.source}")
    return GeneralCalibration.prepare(
        general,
        options,
        loaded.model,
        loaded.tokenizer,
        with_stats=with_stats,
        model_name=loaded.source_id,
        progress=progress,
    )


def _sweep_domain(options: SweepOptions, name, corpus, loaded, method, general, mcq_sets, out, say, progress):
    """(Domain, statistics) of one domain: its analysis (saved in --out) and recovery budget."""
    stats = run_analysis(
        loaded.model,
        loaded.tokenizer,
        corpus,
        options.analysis,
        model_name=loaded.source_id,
        progress=progress,
        expected_tokens=max(expected_tokens_for(plan) for _, plan in settings_grid(options)),
    )
    stats.save(out / f"stats-{name}.safetensors")
    domain = Domain.prepare(
        options,
        corpus,
        loaded.model,
        loaded.tokenizer,
        method=method,
        work=work_dir_for(out),
        general=general,
        mcq_sets=mcq_sets,
        say=say,
        progress=progress,
    )
    return domain, stats


def _domain_runs(domain: Domain, name: str, work: Path) -> dict:
    """The unpruned model's evaluation in a domain (on validation too, for the frontier) and, with
    --controls and recovery, the unpruned model fine-tuned with the same budget."""
    base_eval = domain.evaluate(domain.base_model, domain.base_tokenizer, "base")
    base_eval["decode_tokens_per_second"] = decode_speed(domain.base_model)
    # the frontier is chosen on validation (then confirmed on test): the base's bits/byte there
    base_eval["validation_bits_per_byte"] = _validation_bpb(domain, domain.base_model, domain.base_tokenizer)
    control_base = None
    if domain.options.controls and domain.method is not None:
        _, control_base = domain.recover(
            copy.deepcopy(domain.base_model),
            domain.base_tokenizer,
            "control_base_finetuned",
            work / f"{name}-control-base",
        )
    return {"base": base_eval, "control_base_finetuned": control_base, "settings": {}}


def _validation_bpb(domain: Domain, model, tokenizer) -> float:
    """The frontier's validation evaluation: the test protocol's windows, --max-val-tokens base tokens."""
    options = domain.options
    return validation_bpb(
        model,
        tokenizer,
        domain.corpus,
        seq_len=options.evaluation.seq_len,
        max_tokens=options.recovery.max_val_tokens,
        budget_tokenizer=domain.base_tokenizer,
    )


def _frontier_setting(domain: Domain, plan, work: Path, **setting) -> dict:
    """``Domain.run_setting`` (pruned, finetuned) + the final model's decoding speed and validation bpb."""
    model, tokenizer, _, stage = domain.run_setting(plan, work, **setting)
    stage["decode_tokens_per_second"] = decode_speed(model)  # recovery changes no shape
    stage["validation_bits_per_byte"] = _validation_bpb(domain, model, tokenizer)
    return stage


def _sweep_setting(domain: Domain, plan, plan_options, stats, reference, work: Path) -> dict:
    """One setting and its controls (a random cut of the same widths; the cut chosen on general text,
    and, when the plan cuts the vocabulary too, the same with the domain's vocabulary)."""
    from minigpts.plan import random_plan_like

    stage = _frontier_setting(domain, plan, work, stats=stats, calibration=domain.calibration)
    controls = {"control_random": None, GENERAL_CONTROL: None, GENERAL_UNITS_CONTROL: None}
    if domain.options.controls:
        random_plan = random_plan_like(domain.base_model, plan, seed=domain.options.seed)
        controls["control_random"] = _frontier_setting(
            domain,
            random_plan,
            work.with_name(f"{work.name}-random"),
            stats=stats,
            calibration=domain.calibration,
        )
    for name, general_vocab in general_controls(plan, plan_options) if reference is not None else ():
        general_plan = reference.plan_like(domain, plan, plan_options, general_vocab=general_vocab)
        controls[name] = _frontier_setting(
            domain,
            general_plan,
            work.with_name(f"{work.name}-{name.removeprefix('control_').replace('_', '-')}"),
            stats=reference.stats,
            calibration=reference.calibration,
        )
        controls[name]["calibration"] = reference.record(general_plan)
    return {"plan_summary": plan.summary, "criterion": plan.criterion, **stage, **controls}


def _sweep_row(
    model_name: str, domain: str, label: str, plan_options, domain_runs: dict, entry: dict
) -> dict:
    """One row of the sweep table: sizes, perplexity and bits/byte base → pruned → recovered, MCQ, controls."""
    base, pruned, recovered = domain_runs["base"], entry["pruned"], entry.get("finetuned")
    control_base = domain_runs["control_base_finetuned"]
    final = recovered or pruned
    finetune_info = (recovered or {}).get("finetune") or {}
    controls = {}
    for key in ("control_random", GENERAL_CONTROL, GENERAL_UNITS_CONTROL):
        control = entry.get(key)
        controls[key] = (control.get("finetuned") or control["pruned"]) if control is not None else None
    general_final = controls[GENERAL_CONTROL]

    def recovered_value(key: str):
        return recovered[key] if recovered is not None else None

    return {
        "model": model_name,
        "domain": domain,
        "setting": label,
        "criterion": entry.get("criterion") or plan_options.resolved_criterion(),
        "relative_size": final["params"] / base["params"],
        "params": final["params"],
        "size_bytes": final["size_bytes"],
        "ppl_base": base["perplexity"],
        "ppl_pruned": pruned["perplexity"],
        "ppl_recovered": recovered_value("perplexity"),
        "bpb_base": base["bits_per_byte"],
        "bpb_pruned": pruned["bits_per_byte"],
        "bpb_recovered": recovered_value("bits_per_byte"),
        "mcq_base": _accuracy(base),
        "mcq_pruned": _accuracy(pruned),
        "mcq_recovered": _accuracy(recovered) if recovered is not None else None,
        "epochs": finetune_info.get("epochs"),
        "recovery_seconds": finetune_info.get("seconds"),
        "control_base_finetuned_bpb": control_base["bits_per_byte"] if control_base else None,
        "control_random_bpb": (controls["control_random"] or {}).get("bits_per_byte"),
        "control_general_bpb": general_final["bits_per_byte"] if general_final else None,
        "control_general_params": general_final["params"] if general_final else None,
        "control_general_units_bpb": (controls[GENERAL_UNITS_CONTROL] or {}).get("bits_per_byte"),
        "bpb_val_base": base["validation_bits_per_byte"],
        "bpb_val": entry["validation_bits_per_byte"],
        "decode_tps_base": base["decode_tokens_per_second"],
        "decode_tps": entry["decode_tokens_per_second"],
    }

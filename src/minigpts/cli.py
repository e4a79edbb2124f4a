"""The ``minigpts`` command: a thin layer over the Python API (see ``minigpts.api``)."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from minigpts import __version__
from minigpts.errors import UserError
from minigpts.options import (  # noqa: F401 - re-exported: benchmarks and tests import them from here
    GENERAL_SAMPLE_ALIAS,
    Q8_0_BLOCK,
    SAMPLE_ALIAS,
    AnalysisOptions,
    CommandOptions,
    EvalOptions,
    FinetuneOptions,
    PlanOptions,
    RunOptions,
    SourceOptions,
    SweepOptions,
    add_options,
    flag_of,
    from_args,
    resolve_data_spec,
    resolve_general_spec,
    sample_data_dir,
    writes_q8_0_gguf,
)
from minigpts.report import format_bytes


def model_access(args) -> dict:
    """What the user allows a loaded model directory to run: load_model's keyword arguments."""
    return {"trust_remote_code": args.trust_remote_code, "allow_pickle": args.allow_pickle}


def load_data(args):
    """Read --data with the shared data flags; the bundled sample keeps its short name in output."""
    from minigpts.data import load_corpus

    corpus = load_corpus(
        resolve_data_spec(args.data), text_field=args.text_field, encoding=args.encoding, seed=args.seed
    )
    if args.data == [SAMPLE_ALIAS]:
        corpus.source = "sample (bundled OpenStax economics, CC BY 4.0)"
    return corpus


def analysis_options(args) -> AnalysisOptions:
    return from_args(AnalysisOptions, args)


# --------------------------------------------------------------------------------------------------
# Output helpers


def console():
    from rich.console import Console

    return Console(highlight=False, width=None if sys.stdout.isatty() else 120)


def print_table(out, table) -> None:
    """The title on a line of its own, then the table.

    rich fits a title into the table's width, so a long one (a model description, several --data
    paths) wraps into padded fragments, worst in a log or a pipe; the title is also printed as plain
    text, not markup, since paths may hold brackets.
    """
    from rich.table import Table
    from rich.text import Text

    title = None
    if isinstance(table, Table):
        title, table.title = table.title, None
    if title:
        out.print(title if isinstance(title, Text) else Text(str(title), style="bold"), soft_wrap=True)
    out.print(table)


def print_splits(corpus) -> None:
    from rich.table import Table

    table = Table(title=f"corpus {corpus.source}", title_justify="left")
    table.add_column("split")
    table.add_column("documents", justify="right")
    table.add_column("characters", justify="right")
    for row in corpus.describe():
        table.add_row(row["split"], f"{row['documents']:,}", f"{row['characters']:,}")
    out = console()
    print_table(out, table)
    for note in corpus.notes:
        out.print(f"[dim]{note}[/dim]")


def print_eval_table(rows: list[tuple[str, dict]], title: str) -> None:
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for col in ("model", "params", "non-emb", "size", "perplexity", "bits/byte", "tokens", "tok/s"):
        table.add_column(col, justify="left" if col == "model" else "right")
    for name, r in rows:
        table.add_row(
            name,
            f"{r['params'] / 1e6:.2f}M",
            f"{r['params_non_embedding'] / 1e6:.2f}M",
            f"{format_bytes(r['size_bytes'])} ({r['size_source']})",
            f"{r['perplexity']:.3f}",
            f"{r['bits_per_byte']:.4f}",
            f"{r['eval_tokens']:,}",
            f"{r['tokens_per_second']:.0f}",
        )
    out = console()
    print_table(out, table)
    if rows:
        out.print(f"[dim]protocol: split '{rows[0][1]['split']}'; {rows[0][1]['protocol']}[/dim]")


# --------------------------------------------------------------------------------------------------
# Subcommands


def eval_budget_tokenizer(spec: str | None, loaded, *, trust_remote_code: bool = False):
    """(tokenizer, name) that --max-eval-tokens counts in: --budget-tokenizer, else the recorded base.

    Counting in the unpruned model's tokens keeps a trimmed-vocabulary model on the base's text.
    """
    from minigpts.export import recorded_base_model
    from minigpts.models import load_tokenizer

    flag = flag_of(CommandOptions, "budget_tokenizer")
    given, spec = spec is not None, spec if spec is not None else recorded_base_model(loaded.path)
    if spec is None:
        return None, None
    try:
        tokenizer = load_tokenizer(spec, flag=flag, trust_remote_code=trust_remote_code)
    except UserError as err:
        if given:
            raise
        console().print(
            f"[yellow]--max-eval-tokens counts this model's own tokens: {err}; pass "
            f"{flag} MODEL to score the same text as the unpruned model[/yellow]"
        )
        return None, None
    console().print(f"--max-eval-tokens counted in the tokens of {spec}")
    return tokenizer, spec


def cmd_eval(args) -> int:
    from minigpts.data import normalize_split_name
    from minigpts.models import load_model
    from minigpts.pipeline import check_output_file, load_mcq_sets

    from_args(EvalOptions, args)  # checks the window options
    if not args.data and not args.mcq:
        raise UserError("eval needs --data (perplexity, bits-per-byte) and/or --mcq FILE (multiple choice)")
    if args.budget_tokenizer is not None and args.max_eval_tokens is None:
        flag = flag_of(CommandOptions, "budget_tokenizer")
        raise UserError(f"{flag}: only meaningful with --max-eval-tokens N (the whole split is scored)")
    split = normalize_split_name(args.split)
    if args.json:
        check_output_file(args.json, args.force, flag_of(CommandOptions, "json"))
    mcq_sets = load_mcq_sets(args.mcq) if args.mcq else None  # checked before any model runs, as `run` does
    corpus = texts = None
    if args.data:
        corpus = load_data(args)
        print_splits(corpus)
        texts = corpus.split(split)
    loaded = load_model(args.model, device=args.device, dtype=args.dtype, **model_access(args))
    result = _eval_texts(args, loaded, corpus, texts, split) if texts is not None else _model_size(loaded)
    if mcq_sets:
        from minigpts.mcq import evaluate_mcq

        batch_size = max(1, 2 * args.batch_size)
        result["mcq"] = {
            stem: evaluate_mcq(loaded.model, loaded.tokenizer, items, batch_size=batch_size)
            for stem, items in mcq_sets.items()
        }
    from minigpts import distributed

    if not distributed.is_main():  # data parallel: the metrics are reduced; rank 0 prints and writes
        return 0
    _print_eval(loaded, result, scored=texts is not None)
    if args.json:
        from minigpts.pipeline import write_json_atomic

        write_json_atomic(args.json, result)
    return 0


def _eval_texts(args, loaded, corpus, texts, split: str) -> dict:
    """Perplexity and bits-per-byte of the split, its token budget counted in the recorded base's tokens."""
    from minigpts.evaluation import evaluate

    budget_tokenizer, budget_name = None, None
    if args.max_eval_tokens is not None:
        budget_tokenizer, budget_name = eval_budget_tokenizer(
            args.budget_tokenizer, loaded, trust_remote_code=args.trust_remote_code
        )
    result = evaluate(
        loaded.model,
        loaded.tokenizer,
        texts,
        model_name=loaded.name,
        split=split,
        seq_len=args.seq_len,
        max_tokens=args.max_eval_tokens,
        batch_size=args.batch_size,
        model_path=loaded.path,
        budget_tokenizer=budget_tokenizer,
    ).to_dict()
    return {**result, "data": corpus.source, "budget_tokenizer": budget_name}


def _model_size(loaded) -> dict:
    """MCQ only: the model's size, no perplexity."""
    from minigpts.evaluation import count_parameters, model_size

    params, params_non_embedding = count_parameters(loaded.model)
    size_bytes, size_source = model_size(loaded.model, loaded.path)
    return {
        "model": loaded.name,
        "params": params,
        "params_non_embedding": params_non_embedding,
        "size_bytes": size_bytes,
        "size_source": size_source,
    }


def _print_eval(loaded, result: dict, *, scored: bool) -> None:
    if scored:
        print_eval_table([(loaded.name, result)], f"held-out evaluation ({loaded.description})")
    else:
        console().print(
            f"{loaded.description}: {result['params'] / 1e6:.2f}M parameters, "
            f"{format_bytes(result['size_bytes'])} ({result['size_source']})"
        )
    for stem, r in (result.get("mcq") or {}).items():
        console().print(
            f"MCQ {stem}: accuracy {r['accuracy']:.3f}, length-normalised {r['accuracy_norm']:.3f} "
            f"({r['questions']} questions, chance {r['chance']:.3f})"
        )


def cmd_analyze(args) -> int:
    from minigpts.models import load_model
    from minigpts.pipeline import check_output_file, run_analysis

    out = check_output_file(args.out, args.force, flag_of(SourceOptions, "out"))
    options = analysis_options(args)
    corpus = load_data(args)
    print_splits(corpus)
    if args.offload:
        out.parent.mkdir(parents=True, exist_ok=True)  # the second moments are spilled beside the output
        stats = analyze_offloaded_cli(args, corpus, options, work_dir=out.parent)
        model = None
    else:
        loaded = load_model(args.model, device=args.device, dtype=args.dtype, **model_access(args))
        stats = run_analysis(loaded.model, loaded.tokenizer, corpus, options, model_name=loaded.source_id)
        model = loaded.model
    from minigpts import distributed

    if not distributed.is_main():  # data parallel: the statistics are reduced; rank 0 writes them
        return 0
    out.parent.mkdir(parents=True, exist_ok=True)
    stats.save(out)
    console().print(f"statistics of {stats.n_tokens:,} calibration tokens written to {out}")
    if model is not None:  # the score distribution reads the weights, which --offload never holds
        print_score_distribution(model, stats)
    return 0


def analyze_offloaded_cli(args, corpus, options, work_dir):
    """`analyze --offload`: the tokenizer alone, then the statistics one decoder layer at a time
    (temporary files, e.g. each layer's second moments, under ``work_dir``: the output's folder)."""
    from minigpts.analysis_offload import analyze_offloaded
    from minigpts.models import load_tokenizer
    from minigpts.pipeline import calibration_windows

    offload_reads_safetensors(args)
    tokenizer = load_tokenizer(args.model, trust_remote_code=args.trust_remote_code)
    windows = calibration_windows(tokenizer, corpus, options)
    metadata = {"data": corpus.source, "seed": corpus.seed, "calib_tokens_requested": options.calib_tokens}
    return analyze_offloaded(
        args.model, windows, batch_size=options.batch_size, metadata=metadata, moments=options.moments,
        fisher_tokens=options.fisher_tokens if options.moments else 0, taylor_tokens=options.taylor_tokens,
        depth_tokens=options.depth_tokens, device=args.device, dtype=args.dtype,
        trust_remote_code=args.trust_remote_code, work_dir=work_dir,
    )  # fmt: skip


def offload_reads_safetensors(args) -> None:
    if args.allow_pickle:
        offload, pickle = flag_of(CommandOptions, "offload"), flag_of(SourceOptions, "allow_pickle")
        raise UserError(f"{offload} reads safetensors only: drop {pickle}")


def print_score_distribution(model, stats, criterion: str = "l1") -> None:
    """The distribution of every group's scores, and what the paper's thresholds would remove of each."""
    from minigpts.criteria import unit_scores
    from minigpts.distribution import (
        GROUP_NAMES,
        PAPER_THRESHOLDS,
        describe_distribution,
        paper_threshold_shares,
        score_distribution,
    )

    scores = unit_scores(model, stats, criterion)
    out = console()
    print_table(out, describe_distribution(score_distribution(scores), criterion))
    shares = paper_threshold_shares(scores)
    for group, by_threshold in shares.items():
        cut = ", ".join(f"{eps:g} removes {share:.1%}" for eps, share in by_threshold.items())
        out.print(f"[dim]{GROUP_NAMES[group]}: the paper's thresholds (score ≤ E): {cut}[/dim]")
    mlp = shares.get("mlp", {})
    if mlp and (all(share == 0 for share in mlp.values()) or all(share >= 0.95 for share in mlp.values())):
        out.print(
            f"[yellow]the paper's thresholds {', '.join(f'{eps:g}' for eps in PAPER_THRESHOLDS)} do not suit these "
            "scores: size the cut with --mlp-ratio / --head-ratio / --target-params, or pick a threshold from "
            "the quantiles above[/yellow]"
        )


def print_plan(plan) -> None:
    from rich.text import Text

    from minigpts.distribution import describe_distribution
    from minigpts.plan import describe_plan

    out = console()
    distribution = plan.summary.get("score_distribution")
    if distribution:
        print_table(out, describe_distribution(distribution["groups"], distribution["criterion"]))
    if plan.criterion != "none":  # a vocabulary-only plan has no structure to tabulate
        print_table(out, describe_plan(plan, warnings=False))
    for note in plan.summary.get("notes") or []:
        if note.startswith("warning:"):  # full width, not wrapped into the table's caption
            out.print(Text(note, style="yellow"), soft_wrap=True)
    vocab = plan.summary.get("vocab")
    if vocab:
        out.print(
            f"vocabulary: {vocab['before']:,} → {vocab['after']:,} tokens "
            f"(kept: {vocab['kept_seen']:,} seen, {vocab.get('kept_widened', 0):,} expected/general, "
            f"{vocab['kept_special']:,} special, "
            f"{vocab['kept_byte']:,} byte, {vocab['kept_closure']:,} merge parents); "
            f"{vocab['parameters_saved'] / 1e6:.2f}M parameters saved"
        )
        if vocab.get("counted_on"):
            out.print(f"[dim]token counts: {vocab['counted_on']}[/dim]")
    if "params_after_with_vocab" in plan.summary:
        before = plan.summary["params_before"]
        after = plan.summary["params_after_with_vocab"]
        out.print(
            f"with the vocabulary cut: {before / 1e6:.2f}M → {after / 1e6:.2f}M ({after / before:.1%} of the base)"
        )


def require_out(args) -> None:
    """--out may be left out only with --dry-run (which writes nothing)."""
    if args.out is None and not args.dry_run:
        raise UserError("--out is required (the output directory), unless --dry-run only prints the plan")


def sequential_windows(tokenizer, corpus, stats):
    """The calibration windows the statistics were measured on, for --sequential (needs --data)."""
    from minigpts.pipeline import calibration_windows

    if corpus is None:
        raise UserError(
            "--sequential re-runs the calibration text layer by layer: pass the --data of `analyze`"
        )
    seq_len = int(stats.metadata.get("seq_len", 1024))
    return calibration_windows(
        tokenizer, corpus, AnalysisOptions(calib_tokens=stats.n_tokens, seq_len=seq_len)
    )


def prune_calibration(options: PlanOptions, tokenizer, corpus, stats):
    """--sequential's windows, or None for the one-shot refit (with a note where only --data is missing)."""
    if stats is not None and options.refits_sequentially(corpus is not None):
        return sequential_windows(tokenizer, corpus, stats)
    if stats is not None and options.refits_sequentially(calibration_text=True):
        console().print(
            "[dim]note: one-shot refit from the statistics; pass the --data of `analyze` to refit layer by "
            "layer (--sequential, the default where the calibration text is at hand)[/dim]"
        )
    return None


def cmd_prune(args) -> int:
    from minigpts.analysis import ActivationStats
    from minigpts.export import save_model
    from minigpts.models import load_model
    from minigpts.pipeline import build_plan, check_output_dir, prune_copy

    options = from_args(PlanOptions, args)
    require_out(args)
    if options.has_vocab() and not args.data:
        flag = next(flag_of(PlanOptions, n) for n in options.VOCAB_FIELDS if getattr(options, n) is not None)
        raise UserError(
            f"{flag}: the vocabulary cut counts tokens over the calibration + train splits of --data; pass "
            "--data (the statistics alone hold only the counts of their calibration windows)"
        )
    if not args.dry_run:
        check_output_dir(args.out, args.force)
    if args.offload:
        return prune_offloaded_cli(args, options)
    stats = ActivationStats.load(args.stats) if args.stats else None
    corpus = load_data(args) if args.data else None
    loaded = load_model(args.model, device=args.device, dtype=args.dtype, **model_access(args))
    if stats is not None:
        stats.check_model(loaded.model)
    plan = build_plan(loaded.model, loaded.tokenizer, stats, options, corpus=corpus)
    print_plan(plan)
    if args.dry_run:
        console().print("[dim]--dry-run: nothing written[/dim]")
        return 0
    calibration = prune_calibration(options, loaded.tokenizer, corpus, stats)
    model, tokenizer = prune_copy(
        loaded.model, loaded.tokenizer, plan, options, stats=stats, calibration=calibration, in_place=True
    )
    metadata = prune_metadata(loaded, plan, stats, corpus)
    save_model(model, tokenizer, args.out, plan=plan, metadata=metadata, force=args.force)
    console().print(f"pruned model written to {args.out}")
    return 0


def prune_metadata(loaded, plan, stats, corpus) -> dict:
    """What minigpts.json and the model card record of a pruning: the base model, statistics, data."""
    from minigpts.export import base_license

    metadata = {"base_model": loaded.source_id, "stats": stats.metadata if stats is not None else None}
    metadata["params_before"] = plan.summary.get("params_before")
    metadata["base_description"] = loaded.description
    metadata["base_license"] = base_license(loaded.path, loaded.name)
    if corpus is not None:
        metadata["data"] = corpus.source
    return metadata


def prune_offloaded_cli(args, options) -> int:
    """`prune --offload`: the plan from the skeleton and the statistics, then surgery layer by layer."""
    from minigpts.models import (
        DEFAULT_MODEL,
        LoadedModel,
        _resolve_source,
        load_tokenizer,
        resolve_device,
        resolve_dtype,
    )
    from minigpts.surgery_offload import load_stats, plan_offloaded, prune_offloaded

    offload_reads_safetensors(args)
    spec = args.model or DEFAULT_MODEL
    stats = load_stats(args.stats) if args.stats else None
    corpus = load_data(args) if args.data else None
    tokenizer = load_tokenizer(spec, trust_remote_code=args.trust_remote_code)
    dtype = resolve_dtype(args.dtype, resolve_device(args.device))
    access = {"dtype": dtype, "trust_remote_code": args.trust_remote_code}
    # --sequential's windows, checked before the plan: it may take long
    calibration = None if args.dry_run else prune_calibration(options, tokenizer, corpus, stats)
    plan = plan_offloaded(spec, tokenizer, stats, options, corpus=corpus, **access)
    print_plan(plan)
    if args.dry_run:
        console().print("[dim]--dry-run: nothing written[/dim]")
        return 0
    _, path, description = _resolve_source(spec)
    loaded = LoadedModel(model=None, tokenizer=tokenizer, name=spec, path=path, description=description)
    metadata = prune_metadata(loaded, plan, stats, corpus)
    prune_offloaded(
        spec, plan, stats, args.out, tokenizer=tokenizer, reconstruct=options.reconstruct, ridge=options.ridge,
        calibration=calibration, metadata=metadata, force=args.force, **access,
    )  # fmt: skip
    console().print(f"pruned model written to {args.out}, one decoder layer at a time")
    return 0


def cmd_finetune(args) -> int:
    from minigpts import distributed
    from minigpts.export import read_metadata, save_model
    from minigpts.models import load_model
    from minigpts.pipeline import check_output_dir, run_finetune, validation_bpb_target, work_dir_for

    out = check_output_dir(args.out, args.force)
    distributed.barrier()  # every process has checked --out before rank 0 writes into it
    options = from_args(FinetuneOptions, args)
    corpus = load_data(args)
    print_splits(corpus)
    loaded = load_model(args.model, device=args.device, dtype=args.dtype, **model_access(args))
    info = read_metadata(loaded.path)
    plan = info.get("plan") or {}
    # a model minigpts did not cut is its own unpruned model: distilling from a frozen copy of it keeps
    # domain fine-tuning close to what the model knew (and gives the stop rule its base)
    teacher_name = (
        args.teacher or (info.get("metadata") or {}).get("base_model") or (None if plan else args.model)
    )
    from minigpts.recovery import get_recovery_method

    needs_teacher = get_recovery_method(options.method).needs_teacher
    base = _finetune_base(args, teacher_name) if needs_teacher or options.stop_at_base else None
    stop_at_bpb = (
        validation_bpb_target(base.model, base.tokenizer, corpus, options) if options.stop_at_base else None
    )
    model, result = run_finetune(
        loaded.model,
        loaded.tokenizer,
        corpus,
        options,
        work_dir=work_dir_for(out),
        teacher=base.model if needs_teacher else None,
        teacher_vocab_keep=plan.get("vocab_keep"),
        stop_at_bpb=stop_at_bpb,
        budget_tokenizer=base.tokenizer if base is not None else None,
    )
    metadata = dict(info.get("metadata") or {})
    metadata["finetune"] = result.to_dict()
    if not distributed.is_main():  # data parallel: every process holds the same weights; rank 0 saves
        distributed.barrier()
        return 0
    from minigpts.pipeline import cleanup
    from minigpts.plan import PruningPlan

    plan = PruningPlan.from_dict(plan) if plan else None
    save_model(model, loaded.tokenizer, out, plan=plan, metadata=metadata, force=args.force)
    cleanup(work_dir_for(out))
    distributed.barrier()
    console().print(
        f"fine-tuned ({result.method}, {result.steps} steps, {result.train_tokens:,} tokens, "
        f"{result.seconds:.0f} s, stopped: {result.stopped_because}) → {out}"
    )
    return 0


def _finetune_base(args, teacher_name: str | None):
    """The unpruned model (teacher and stop rule): --teacher, else the one the model's minigpts.json names."""
    from minigpts.models import load_model

    if not teacher_name:
        raise UserError(
            f"--model {args.model}: a pruned model whose minigpts.json records no unpruned model; "
            f"pass {flag_of(FinetuneOptions, 'teacher')} MODEL"
        )
    flag = flag_of(FinetuneOptions, "teacher")
    try:
        return load_model(teacher_name, device=args.device, dtype=args.dtype, flag=flag, **model_access(args))
    except UserError as err:
        if args.teacher:
            raise
        raise UserError(
            f"the unpruned model recorded in {args.model}/minigpts.json ({teacher_name}) cannot be loaded "
            f"({err}); pass {flag} MODEL"
        ) from err


def cmd_run(args) -> int:
    from minigpts.pipeline import recovery_method_or_none, run_experiment

    recovery_method_or_none(args.finetune)
    require_out(args)
    if args.gguf and Path(args.gguf).exists() and not args.force:
        flag = flag_of(CommandOptions, "gguf")
        raise UserError(f"{flag} {args.gguf} exists: pass --force to replace it or pick another file")
    options = from_args(RunOptions, args)
    options.recovery.method = args.finetune if args.finetune != "none" else "full"
    corpus = load_data(args)
    print_splits(corpus)
    out = console()
    if args.round_to is None and writes_q8_0_gguf(args):
        out.print(
            f"[dim]note: MLP widths in multiples of {Q8_0_BLOCK} (--round-to {Q8_0_BLOCK}) for the q8_0 GGUF: "
            "every matrix quantises; pass --round-to 8 for finer widths (rows not in blocks of 32 stay f16)[/dim]"
        )
    report = run_experiment(options, corpus=corpus, say=out.print)
    from minigpts import distributed

    if not distributed.is_main():  # data parallel: rank 0 prints, writes and exports
        return 0
    if args.dry_run:
        print_plan(report["plan"])
        out.print("[dim]--dry-run: nothing written[/dim]")
        return 0
    print_run_table(report)
    out.print(f"model, report.json and report.md written to {args.out}")
    if args.gguf:
        from minigpts.export import load

        model, tokenizer = load(args.out, trust_remote_code=args.trust_remote_code)
        write_gguf(model, tokenizer, args.gguf, args.gguf_outtype, args.force, name=Path(args.out).name)
    return 0


def print_run_table(report: dict) -> None:
    from rich.table import Table

    stages = report["stages"]
    base = stages["base"]
    table = Table(title=f"{report['model']} on {report['data']}", title_justify="left")
    columns = ["stage", "params", "rel. size", "size", "vocab", "perplexity", "bits/byte", "Δ bpb"]
    has_general = any("general" in s for s in stages.values())
    if has_general:
        columns.append("general bpb")
    mcq_names = sorted({k for s in stages.values() for k in (s.get("mcq") or {})})
    columns += [f"mcq {m}" for m in mcq_names]
    for col in columns:
        table.add_column(col, justify="left" if col == "stage" else "right")
    for name, s in stages.items():
        row = [
            name,
            f"{s['params'] / 1e6:.2f}M",
            f"{s['params'] / base['params']:.2f}",
            format_bytes(s["size_bytes"]),
            f"{s.get('vocab_size', 0):,}",
            f"{s['perplexity']:.3f}",
            f"{s['bits_per_byte']:.4f}",
            f"{100 * (s['bits_per_byte'] / base['bits_per_byte'] - 1):+.1f}%",
        ]
        if has_general:
            row.append(f"{s['general']['bits_per_byte']:.4f}" if "general" in s else "–")
        for m in mcq_names:
            r = (s.get("mcq") or {}).get(m)
            row.append(f"{r['accuracy']:.3f}" if r else "–")
        table.add_row(*row)
    out = console()
    print_table(out, table)
    out.print(f"[dim]protocol: split '{report['split']}'; {report['protocol']}[/dim]")
    out.print("[dim]perplexity is per token of each model's own tokenizer; compare models by bits/byte[/dim]")


def cmd_sweep(args) -> int:
    from minigpts.options import DEFAULT_TAYLOR_TOKENS
    from minigpts.sweep import run_sweep

    given = args.criterion if isinstance(args.criterion, list) else [args.criterion]
    criteria = [name for name in given if name]  # none given: the plan options' default criterion
    args.criterion = criteria[0] if criteria else None  # settings_grid sets each one
    if "taylor" in criteria and args.taylor_tokens is None:
        args.taylor_tokens = DEFAULT_TAYLOR_TOKENS  # one analysis serves every criterion
    options = from_args(SweepOptions, args, criteria=list(dict.fromkeys(criteria)))
    options.recovery.method = args.finetune if args.finetune != "none" else "full"
    for value in options.target_params:
        if not 0 < value <= 1:
            flag = flag_of(PlanOptions, "target_params")
            raise UserError(f"{flag} {value}: each target must be a fraction in (0, 1]")
    out = console()
    result = run_sweep(options, say=out.print)
    from minigpts.report import sweep_table

    headers, _, cells = sweep_table(result["rows"])
    from rich.table import Table

    table = Table(title="sweep", title_justify="left")
    for h in headers:
        table.add_column(h)
    for row in cells:
        table.add_row(*row)
    print_table(out, table)
    out.print(f"tables, plots and report.html written to {args.out}")
    return 0


def apply_config_file(parser: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """``--config FILE`` (YAML): its keys (option names, dashes or underscores) become command-line flags.

    They go through argparse like typed flags (types, lists, repeatable options), placed before the
    real command line so that flags given there win.
    """
    config = flag_of(CommandOptions, "config")
    if config not in argv:
        return argv
    i = argv.index(config)
    if i + 1 >= len(argv):
        raise UserError(f"{config} needs a YAML file")
    path = Path(argv[i + 1])
    import yaml

    if not path.is_file():
        raise UserError(f"{config} {path}: no such file")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise UserError(f"{config} {path}: not valid YAML ({str(err).splitlines()[0]})") from err
    if not isinstance(data, dict):
        raise UserError(f"{config} {path}: expected a mapping of option names to values")
    command = next((a for a in argv if not a.startswith("-")), None)
    sub = parser._subparsers._group_actions[0].choices.get(command) if command else None  # noqa: SLF001
    if sub is None:
        raise UserError(f"{config}: put it after the subcommand, e.g. `minigpts sweep {config} recipe.yaml`")
    actions = {a.dest: a for a in sub._actions if a.option_strings and a.dest not in {"help", "config"}}  # noqa: SLF001
    tokens: list[str] = []
    for key, value in data.items():
        action = actions.get(str(key).replace("-", "_"))
        if action is None:
            valid = ", ".join(sorted(name.replace("_", "-") for name in actions))
            raise UserError(f"{config} {path}: unknown option {key!r}; valid keys: {valid}")
        flag = action.option_strings[-1]
        if isinstance(action, argparse._StoreTrueAction | argparse.BooleanOptionalAction):  # noqa: SLF001
            if value not in (True, False):
                raise UserError(f"{config} {path}: {key} must be true or false")
            on, off = action.option_strings[0], action.option_strings[-1]  # --x, and --no-x when there is one
            tokens += [on] if value else ([off] if off != on else [])
            continue
        values = value if isinstance(value, list) else [value]
        if action.nargs in ("+", "*"):
            tokens += [flag, *map(str, values)]
        elif isinstance(action, argparse._AppendAction):  # noqa: SLF001
            for v in values:
                tokens += [flag, str(v)]
        elif isinstance(value, list):
            raise UserError(f"{config} {path}: {key} takes one value, not a list")
        else:
            tokens += [flag, str(value)]
    # The recipe's options come right after the subcommand, so flags on the command line win.
    position = argv.index(command) + 1
    argv = argv[:i] + argv[i + 2 :]
    return argv[:position] + tokens + argv[position:]


def write_gguf(model, tokenizer, path, outtype: str, force: bool, name: str | None = None) -> None:
    """Export to GGUF and print one line: file, llama.cpp architecture, size, tensor types."""
    from minigpts.export_gguf import export_gguf

    result = export_gguf(model, tokenizer, path, outtype=outtype, force=force, name=name)
    types = ", ".join(f"{count} {kind}" for kind, count in sorted(result.tensor_types.items()))
    out = console()
    out.print(
        f"GGUF written to {result.path}: llama.cpp architecture '{result.arch}'"
        f"{' (per-layer widths)' if result.per_layer else ''}, {format_bytes(result.size_bytes)}, "
        f"{result.n_tensors} tensors ({types}), tokenizer pre '{result.tokenizer_pre or 'spm'}'"
    )
    for note in result.notes:
        out.print(f"[dim]{note}[/dim]")


def cmd_export(args) -> int:
    from minigpts.models import load_model

    if not args.gguf:
        raise UserError("--gguf FILE is required: the GGUF file to write")
    loaded = load_model(args.model, device="cpu", dtype="float32", **model_access(args))
    write_gguf(loaded.model, loaded.tokenizer, args.gguf, args.outtype, args.force, name=loaded.name)
    return 0


class OneLineParser(argparse.ArgumentParser):
    """An argparse parser whose errors are one line on stderr (exit 2), like every other user error."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


MODEL = ("model", "device", "dtype", "trust_remote_code", "allow_pickle")
DATA = ("data", "text_field", "encoding", "seed")
WINDOWS = ("seq_len", "max_eval_tokens", "batch_size")
PLAN = (PlanOptions, PlanOptions.HELP_ORDER)
# subcommand → (help, handler name, [(options class, fields in --help order; () = all), ...])
SUBCOMMANDS = {
    "eval": (
        "perplexity, bits-per-byte (and MCQ accuracy) on a held-out split",
        "cmd_eval",
        [(SourceOptions, MODEL + DATA), (EvalOptions, WINDOWS + ("split", "mcq"))]
        + [(CommandOptions, ("budget_tokenizer", "json")), (SourceOptions, ("force",))],
    ),
    "analyze": (
        "activation statistics of every unit over the calibration split",
        "cmd_analyze",
        [(SourceOptions, MODEL + DATA), (AnalysisOptions, ()), (CommandOptions, ("offload",))]
        + [(SourceOptions, ("out", "force"))],
    ),
    "prune": (
        "plan from statistics and physically remove units",
        "cmd_prune",
        [(SourceOptions, MODEL + DATA), PLAN, (CommandOptions, ("stats", "offload"))]
        + [(RunOptions, ("out", "dry_run", "force"))],
    ),
    "finetune": (
        "recovery fine-tuning on the train split (full, LoRA, distillation)",
        "cmd_finetune",
        [(SourceOptions, MODEL + DATA), (FinetuneOptions, ()), (SourceOptions, ("out", "force"))],
    ),
    "run": (
        "split → evaluate → analyze → plan → prune → recover → evaluate → save + report",
        "cmd_run",
        [(RunOptions, MODEL + DATA), (EvalOptions, WINDOWS), (AnalysisOptions, ()), PLAN]
        + [(FinetuneOptions, ()), (EvalOptions, ("split",)), (RunOptions, ("finetune", "controls"))]
        + [
            (EvalOptions, ("mcq", "general_data", "general_max_tokens")),
            (RunOptions, ("out", "dry_run", "force")),
        ]
        + [(CommandOptions, ("gguf", "outtype"))],
    ),
    "sweep": (
        "the paper's experiment: domains × pruning settings, with a report",
        "cmd_sweep",
        [(SweepOptions, MODEL + DATA), (EvalOptions, WINDOWS), (AnalysisOptions, ()), PLAN]
        + [(FinetuneOptions, ()), (EvalOptions, ("split",)), (SweepOptions, ("finetune", "controls", "mcq"))]
        + [
            (EvalOptions, ("general_data", "general_max_tokens")),
            (CommandOptions, ("config",)),
            (SweepOptions, ("out", "force")),
        ],
    ),
    "export": (
        "write a model as one GGUF file for llama.cpp (tokenizer included)",
        "cmd_export",
        [(SourceOptions, ("model", "trust_remote_code", "allow_pickle"))]
        + [(CommandOptions, ("gguf", "outtype")), (SourceOptions, ("force",))],
    ),
}


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="minigpts",
        description="Contextual pruning: turn a causal LM and a domain corpus into a smaller domain model.",
    )
    parser.add_argument("--version", action="version", version=f"minigpts {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command, (text, handler, sections) in SUBCOMMANDS.items():
        p = sub.add_parser(command, help=text)
        for cls, names in sections:
            add_options(p, command, cls, names)
        p.set_defaults(func=globals()[handler])
    return parser


def _warn_slow_bf16(args) -> None:
    if getattr(args, "mixed_precision", None) != "bf16":
        return
    import torch

    from minigpts.recovery.trainer import slow_bf16_warning

    warning = slow_bf16_warning(args.mixed_precision, torch.cuda.is_available())
    if warning:
        print(f"minigpts: {warning}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    if debug:
        argv.remove("--debug")
    parser = build_parser()
    try:
        argv = apply_config_file(parser, argv)
    except UserError as err:
        print(f"minigpts: error: {err}", file=sys.stderr)
        return 2
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help, --version, or a one-line usage error (OneLineParser)
        return exit_.code if isinstance(exit_.code, int) else 2
    from minigpts import distributed

    distributed.init()  # under torchrun / accelerate launch (WORLD_SIZE > 1): the process group
    logging.basicConfig(level=logging.INFO if debug else logging.WARNING, format="%(message)s")
    if not debug:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    _warn_slow_bf16(args)
    try:
        return args.func(args)
    except UserError as err:
        if debug:
            raise
        print(f"minigpts: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("minigpts: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

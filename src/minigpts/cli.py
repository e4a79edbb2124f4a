"""The ``minigpts`` command: a thin layer over the Python API (see ``minigpts.api``)."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from minigpts import __version__
from minigpts.errors import UserError
from minigpts.report import format_bytes

SAMPLE_ALIAS = "sample"
GENERAL_SAMPLE_ALIAS = "sample-medical"


def sample_data_dir() -> Path:
    return Path(__file__).parent / "sample_data"


def resolve_data_spec(spec: str | list[str]) -> str | list[str]:
    """``sample`` names the bundled CC BY economics sample; anything else is passed through.

    A list (``--data`` takes several paths, as a shell expands ``law.*.jsonl``) resolves item by item;
    a one-item list becomes its item.
    """
    if isinstance(spec, list):
        resolved = [resolve_data_spec(s) for s in spec]
        return resolved[0] if len(resolved) == 1 else resolved
    if spec == SAMPLE_ALIAS:
        return str(sample_data_dir() / "economics.*.jsonl")
    if spec == GENERAL_SAMPLE_ALIAS:
        return str(sample_data_dir() / "medical.test.jsonl")
    return spec


def resolve_general_spec(spec: str | list[str] | None) -> str | list[str] | None:
    return None if spec is None else resolve_data_spec(spec)


# --------------------------------------------------------------------------------------------------
# Option groups shared by the subcommands (``run`` accepts every option of the stages it chains).


def add_model_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument(
        "--model",
        default=None,
        help="hub id, local HF directory, .gguf file, or alias 'smollm2-135m' (default)",
    )
    g.add_argument("--device", default="auto", help="auto (GPU when present) | cpu | cuda[:N]")
    g.add_argument("--dtype", default=None, help="float32 (CPU default) | bfloat16 (GPU default) | float16")
    g.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="let a model directory's auto_map run its own Python code (only for authors you trust; "
        "minigpts' per-layer exports load without it while their modeling_minigpts.py is unchanged)",
    )
    g.add_argument(
        "--allow-pickle",
        action="store_true",
        help="also read pickle weights (pytorch_model.bin), which can run code when loaded; "
        "by default only safetensors are read",
    )


def model_access(args) -> dict:
    """What the user allows a loaded model directory to run: load_model's keyword arguments."""
    return {"trust_remote_code": args.trust_remote_code, "allow_pickle": args.allow_pickle}


def add_data_options(p: argparse.ArgumentParser, required: bool = True) -> None:
    g = p.add_argument_group("data")
    g.add_argument(
        "--data",
        nargs="+",
        metavar="D",
        required=required,
        help="file(s), directory, glob (.txt .md .jsonl .json .csv .parquet), saved HF dataset, hub "
        "dataset, or 'sample' (the bundled CC BY economics sample); several paths (e.g. a glob the "
        "shell expanded) form one corpus",
    )
    g.add_argument("--text-field", default="text", help="column(s) holding the text, e.g. question,answer")
    g.add_argument("--encoding", default="utf-8", help="text encoding of the files (default utf-8)")
    g.add_argument("--seed", type=int, default=0, help="seed for the document split (default 0)")


def add_eval_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("evaluation")
    g.add_argument("--seq-len", type=int, default=1024, help="window length in tokens (default 1024)")
    g.add_argument(
        "--max-eval-tokens", type=int, default=None, help="score at most this many tokens per split"
    )
    g.add_argument("--batch-size", type=int, default=4, help="windows per forward pass (default 4)")


def load_data(args):
    """Read --data with the shared data flags; the bundled sample keeps its short name in output."""
    from minigpts.data import load_corpus

    corpus = load_corpus(
        resolve_data_spec(args.data), text_field=args.text_field, encoding=args.encoding, seed=args.seed
    )
    if args.data == [SAMPLE_ALIAS]:
        corpus.source = "sample (bundled OpenStax economics, CC BY 4.0)"
    return corpus


def add_analysis_options(p: argparse.ArgumentParser, seq_len: bool = True) -> None:
    g = p.add_argument_group("analysis")
    g.add_argument(
        "--calib-tokens", type=int, default=65_536, help="calibration tokens to run (default 65,536)"
    )
    if seq_len:
        g.add_argument("--seq-len", type=int, default=1024, help="window length in tokens (default 1024)")
        g.add_argument("--batch-size", type=int, default=4, help="windows per forward pass (default 4)")
    g.add_argument(
        "--moments",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also record the second moments of the MLP and attention outputs' inputs, which the refit "
        "(--reconstruct lstsq) and --allocation error need; (width)² floats per layer, e.g. ~620 MiB for "
        "SmolLM2-135M (default on; --no-moments for the paper's first-order statistics only)",
    )
    g.add_argument(
        "--fisher-tokens",
        type=int,
        default=4096,
        help="with --moments: tokens of a gradient pass (the first calibration windows) that weighs each "
        "block's output error by what it costs the loss, for --allocation error (default 4,096; 0 = off)",
    )
    g.add_argument(
        "--taylor-tokens",
        type=int,
        default=None,
        metavar="N",
        help="tokens of the gradient pass --criterion taylor reads (the first calibration windows; default: "
        f"{DEFAULT_TAYLOR_TOKENS:,} when this command plans with --criterion taylor, else 0 = off)",
    )
    g.add_argument(
        "--depth-tokens",
        type=int,
        default=None,
        metavar="N",
        help="tokens of the loss passes --layer-criterion loss reads: the loss without each layer costs "
        f"N × (layers + 1) tokens of forward passes (default: {DEFAULT_DEPTH_TOKENS:,} when this command "
        "drops layers by loss, else 0 = off)",
    )


def add_plan_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("plan (structure)")
    g.add_argument("--mlp-ratio", type=float, help="fraction of MLP channels to remove, in [0, 1)")
    g.add_argument("--head-ratio", type=float, help="fraction of attention heads to remove, in [0, 1)")
    g.add_argument("--hidden-ratio", type=float, help="fraction of hidden (residual) channels to remove")
    g.add_argument(
        "--target-params",
        type=float,
        help="fraction of all parameters to keep (vocabulary cut included); the planner spreads the rest "
        "over --target-groups",
    )
    g.add_argument(
        "--target-groups",
        default="mlp,heads",
        help="groups --target-params may shrink: any of mlp, heads, hidden (default mlp,heads)",
    )
    g.add_argument("--linear-threshold", type=float, help="paper: prune heads/hidden channels with score ≤ E")
    g.add_argument("--activation-threshold", type=float, help="paper: prune MLP channels with score ≤ E")
    from minigpts.criteria import criterion_names, get_criterion

    g.add_argument(
        "--criterion",
        default="l1",
        choices=criterion_names(),  # read when the parser is built: criteria registered before main() appear
        help="unit score: " + "; ".join(f"{name}: {get_criterion(name).help}" for name in criterion_names()),
    )
    g.add_argument(
        "--layout",
        default="uniform",
        choices=["uniform", "per-layer"],
        help="uniform: same widths in every layer, loads with plain transformers (default); "
        "per-layer: widths follow the domain, loads with trust_remote_code=True",
    )
    g.add_argument("--min-mlp", type=int, default=8, help="per-layer layout: MLP channels kept at least")
    g.add_argument(
        "--round-to", type=int, default=8, help="round MLP widths to a multiple of this (default 8)"
    )
    g.add_argument("--plan-seed", type=int, default=0, help="seed of the random criterion")
    g.add_argument(
        "--drop-layers",
        type=int,
        metavar="N",
        help="depth: remove the N decoder layers --layer-criterion ranks lowest",
    )
    g.add_argument(
        "--layer-ratio",
        type=float,
        metavar="R",
        help="depth: remove this fraction of the decoder layers, in [0, 1)",
    )
    from minigpts.depth import LAYER_CRITERIA

    g.add_argument(
        "--layer-criterion",
        default="bi",
        choices=list(LAYER_CRITERIA),
        help="which layers go: "
        + "; ".join(f"{name}: {text}" for name, text in LAYER_CRITERIA.items())
        + " (default bi)",
    )
    g.add_argument(
        "--allocation",
        default="error",
        choices=["error", "paper"],
        help="how widths are spread: error (default) = per-layer widths, and a --target-params split "
        "between MLP and heads, that minimise the output error left after the refit (needs --moments); "
        "paper = the paper's global ranking of raw scores (per-layer) and one common ratio (--target-params); "
        "measured on held-out text, paper's per-layer cut is close to a random one",
    )
    g.add_argument(
        "--reconstruct",
        default="lstsq",
        choices=["none", "lstsq"],
        help="after removing MLP channels or heads, refit the output projection on the kept ones by ridge "
        "least squares from the calibration second moments (default lstsq; none = slice only, as the paper)",
    )
    g.add_argument(
        "--ridge",
        type=float,
        default=1e-2,
        help="ridge of the refit, relative to the mean second moment of the kept inputs (default 0.01)",
    )
    g.add_argument(
        "--sequential",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="refit layer by layer: each layer's statistics are re-measured on the outputs of the layers "
        "already pruned and refit, and its kept units re-chosen (SparseGPT/Wanda-style calibration; needs "
        "--data; about three more forward passes over the calibration tokens)",
    )
    v = p.add_argument_group("plan (vocabulary)")
    v.add_argument(
        "--embedding-threshold",
        type=float,
        help="paper: prune tokens whose domain frequency is ≤ E (0 = exactly the unseen tokens)",
    )
    v.add_argument("--vocab-min-count", type=int, help="prune tokens seen fewer than N times")
    v.add_argument(
        "--vocab-keep-general",
        type=int,
        default=0,
        metavar="N",
        help="also keep the tokenizer's first N BPE merges (its most general tokens), so held-out words "
        "keep their usual spelling",
    )
    v.add_argument(
        "--vocab-keep-expected",
        type=int,
        default=0,
        metavar="K",
        help="also keep the K tokens the model expects most in the domain text (its summed next-token "
        "probabilities over 16,384 calibration tokens): domain words the sample never showed",
    )
    v.add_argument(
        "--vocab-size", type=int, help="keep exactly K tokens: the always-kept ones, then the most frequent"
    )


def add_finetune_options(p: argparse.ArgumentParser, method_flag: str) -> None:
    from minigpts.recovery import recovery_method_help, recovery_method_names

    g = p.add_argument_group(
        "recovery fine-tuning",
        "The run's length is its step budget — the smallest of --max-steps, --max-train-tokens and "
        "--max-epochs — and the learning-rate schedule's horizon, so the same command gives the same "
        "numbers on any machine; --max-minutes is only a safety cap.",
    )
    if method_flag == "--method":
        g.add_argument(
            "--method",
            default="full",
            choices=recovery_method_names(),  # read when the parser is built: registered methods appear
            help="default full; " + recovery_method_help(),
        )
    g.add_argument(
        "--max-epochs",
        type=float,
        help="epochs over the train split (default 1 when neither --max-steps nor --max-train-tokens is given)",
    )
    g.add_argument("--max-steps", type=int, help="optimizer steps (exact)")
    g.add_argument(
        "--max-train-tokens",
        type=int,
        help="training tokens: floor(N / tokens per step) whole steps, never more than N "
        "(tokens per step = --train-batch-size × --grad-accum × devices × --finetune-seq-len)",
    )
    g.add_argument(
        "--max-minutes",
        type=float,
        help="safety cap on the recovery stage's wall clock (teacher pass, training, validation, "
        "checkpoints): it stops before a step whose predicted end would pass the cap; the schedule "
        "still follows the step budget",
    )
    g.add_argument(
        "--stop-at-base",
        action="store_true",
        help="paper's rule: stop once validation bits-per-byte ≤ the unpruned model's",
    )
    g.add_argument(
        "--early-stopping", type=int, default=None, metavar="N", help="stop after N evals without gain"
    )
    g.add_argument(
        "--eval-every",
        type=int,
        help="validate every N steps (default: validation at start, end and every K steps, K the smallest "
        "that keeps all validation tokens ≤ 10%% of the training tokens; when even start + end would pass "
        "10%%, the validation set is cut to fit, at least one window)",
    )
    g.add_argument(
        "--max-val-tokens",
        type=int,
        default=4_096,
        help="validation set size in tokens, counted in the unpruned model's tokens when it is known "
        "(default 4,096)",
    )
    g.add_argument("--lr", type=float, default=5e-5, help="learning rate (default 5e-5, as in the paper)")
    g.add_argument("--warmup-ratio", type=float, default=0.05, help="warm-up fraction (default 0.05)")
    g.add_argument("--train-batch-size", type=int, default=4, help="windows per step (default 4)")
    g.add_argument("--grad-accum", type=int, default=1, help="gradient accumulation steps (default 1)")
    g.add_argument("--finetune-seq-len", type=int, default=512, help="training window length (default 512)")
    g.add_argument(
        "--resume", action="store_true", help="continue from the last checkpoint of an interrupted run"
    )
    g.add_argument("--lora-r", type=int, default=16, help="LoRA rank (default 16)")
    g.add_argument("--lora-alpha", type=int, default=32, help="LoRA alpha (default 32)")
    g.add_argument("--distill-alpha", type=float, default=0.5, help="weight of the KL term (default 0.5)")
    g.add_argument("--distill-temperature", type=float, default=2.0, help="distillation temperature")
    g.add_argument("--teacher", help="teacher model for distill (default: the unpruned model)")
    g.add_argument(
        "--teacher-cache",
        metavar="DIR",
        help="keep the teacher's cached top-k predictions here, so later runs (controls, sweep settings, "
        "resumed runs) reuse them (default: the work directory, deleted after the run)",
    )
    g.add_argument(
        "--teacher-top-k", type=int, default=64, help="teacher predictions cached per position (default 64)"
    )


def eval_options(args):
    from minigpts.pipeline import EvalOptions

    positive_int("--seq-len", args.seq_len)
    positive_int("--max-eval-tokens", args.max_eval_tokens)
    positive_int("--batch-size", args.batch_size)
    return EvalOptions(
        split=getattr(args, "split", "test"),
        seq_len=args.seq_len,
        max_eval_tokens=args.max_eval_tokens,
        batch_size=args.batch_size,
        mcq=list(getattr(args, "mcq", None) or []),
        general_data=resolve_general_spec(getattr(args, "general_data", None)),
    )


def analysis_options(args):
    from minigpts.pipeline import AnalysisOptions

    positive_int("--calib-tokens", args.calib_tokens)
    return AnalysisOptions(
        calib_tokens=args.calib_tokens,
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        moments=getattr(args, "moments", True),
        fisher_tokens=getattr(args, "fisher_tokens", 4096),
        taylor_tokens=_pass_tokens(
            args, "taylor_tokens", getattr(args, "criterion", None) == "taylor", DEFAULT_TAYLOR_TOKENS
        ),
        depth_tokens=_pass_tokens(
            args,
            "depth_tokens",
            getattr(args, "layer_criterion", None) == "loss"
            and bool(getattr(args, "drop_layers", None) or getattr(args, "layer_ratio", None)),
            DEFAULT_DEPTH_TOKENS,
        ),
    )


DEFAULT_TAYLOR_TOKENS = 4096  # LLM-Pruner itself takes 10 samples of 64 tokens
DEFAULT_DEPTH_TOKENS = 2048  # × (layers + 1) forward passes


def _pass_tokens(args, name: str, needed: bool, default: int) -> int:
    """Tokens of an optional analysis pass: the flag's value, else ``default`` when the plan needs it."""
    value = getattr(args, name, None)
    if value is None:
        return default if needed else 0
    if value < 0:
        raise UserError(f"--{name.replace('_', '-')} {value}: must be 0 (off) or a positive number of tokens")
    return value


def parse_target_groups(value: str) -> tuple[str, ...]:
    groups = tuple(g.strip() for g in value.split(",") if g.strip())
    unknown = [g for g in groups if g not in {"mlp", "heads", "hidden"}]
    if unknown or not groups:
        raise UserError(f"--target-groups {value}: use a comma-separated subset of mlp, heads, hidden")
    return groups


def plan_options(args):
    from minigpts.pipeline import PlanOptions

    return PlanOptions(
        criterion=args.criterion,
        mlp_ratio=args.mlp_ratio,
        head_ratio=args.head_ratio,
        hidden_ratio=args.hidden_ratio,
        target_params=args.target_params,
        linear_threshold=args.linear_threshold,
        activation_threshold=args.activation_threshold,
        layout=args.layout,
        min_mlp=args.min_mlp,
        round_to=args.round_to,
        seed=args.plan_seed,
        target_groups=parse_target_groups(args.target_groups),
        allocation=args.allocation,
        reconstruct=args.reconstruct,
        ridge=args.ridge,
        sequential=args.sequential,
        embedding_threshold=args.embedding_threshold,
        vocab_min_count=args.vocab_min_count,
        vocab_size=args.vocab_size,
        vocab_keep_general=args.vocab_keep_general,
        vocab_keep_expected=args.vocab_keep_expected,
        drop_layers=args.drop_layers,
        layer_ratio=args.layer_ratio,
        layer_criterion=args.layer_criterion,
    )


def finetune_options(args, method: str):
    from minigpts.pipeline import FinetuneOptions

    for flag in (
        "max_steps",
        "max_train_tokens",
        "train_batch_size",
        "grad_accum",
        "finetune_seq_len",
        "eval_every",
        "teacher_top_k",
    ):
        positive_int("--" + flag.replace("_", "-"), getattr(args, flag))
    return FinetuneOptions(
        method=method,
        max_epochs=args.max_epochs,
        max_steps=args.max_steps,
        max_train_tokens=args.max_train_tokens,
        max_minutes=args.max_minutes,
        stop_at_base=args.stop_at_base,
        early_stopping_patience=args.early_stopping,
        eval_every=args.eval_every,
        max_val_tokens=args.max_val_tokens,
        lr=args.lr,
        warmup_ratio=args.warmup_ratio,
        batch_size=args.train_batch_size,
        grad_accum=args.grad_accum,
        seq_len=args.finetune_seq_len,
        seed=args.seed,
        resume=args.resume,
        lora_r=args.lora_r,
        lora_alpha=args.lora_alpha,
        distill_alpha=args.distill_alpha,
        distill_temperature=args.distill_temperature,
        teacher=args.teacher,
        teacher_cache=args.teacher_cache,
        teacher_top_k=args.teacher_top_k,
    )


def positive_int(name: str, value: int | None) -> None:
    if value is not None and value <= 0:
        raise UserError(f"{name} {value}: must be a positive integer")


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
    for col, justify in [
        ("model", "left"),
        ("params", "right"),
        ("non-emb", "right"),
        ("size", "right"),
        ("perplexity", "right"),
        ("bits/byte", "right"),
        ("tokens", "right"),
        ("tok/s", "right"),
    ]:
        table.add_column(col, justify=justify)
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
    import json as _json

    from minigpts.models import load_tokenizer

    if spec is not None:
        tokenizer = load_tokenizer(spec, flag="--budget-tokenizer", trust_remote_code=trust_remote_code)
    else:
        info_file = loaded.path / "minigpts.json" if loaded.path is not None else None
        if info_file is None or not info_file.exists():
            return None, None
        spec = (_json.loads(info_file.read_text()).get("metadata") or {}).get("base_model")
        if spec is None:
            return None, None
        try:
            tokenizer = load_tokenizer(spec, flag="--budget-tokenizer", trust_remote_code=trust_remote_code)
        except UserError as err:
            console().print(
                f"[yellow]--max-eval-tokens counts this model's own tokens: {err}; pass "
                "--budget-tokenizer MODEL to score the same text as the unpruned model[/yellow]"
            )
            return None, None
    console().print(f"--max-eval-tokens counted in the tokens of {spec}")
    return tokenizer, spec


def cmd_eval(args) -> int:
    from minigpts.data import normalize_split_name
    from minigpts.evaluation import count_parameters, evaluate, model_size
    from minigpts.models import load_model

    positive_int("--seq-len", args.seq_len)
    positive_int("--max-eval-tokens", args.max_eval_tokens)
    positive_int("--batch-size", args.batch_size)
    if not args.data and not args.mcq:
        raise UserError("eval needs --data (perplexity, bits-per-byte) and/or --mcq FILE (multiple choice)")
    if args.budget_tokenizer is not None and args.max_eval_tokens is None:
        raise UserError(
            "--budget-tokenizer: only meaningful with --max-eval-tokens N (the whole split is scored)"
        )
    split = normalize_split_name(args.split)
    if args.json:
        from minigpts.pipeline import check_output_file

        check_output_file(args.json, args.force, "--json")
    mcq_sets = None
    if args.mcq:  # checked before any model runs, as `run` does
        from minigpts.pipeline import load_mcq_sets

        mcq_sets = load_mcq_sets(args.mcq)
    texts = None
    if args.data:
        corpus = load_data(args)
        print_splits(corpus)
        texts = corpus.split(split)
    loaded = load_model(args.model, device=args.device, dtype=args.dtype, **model_access(args))
    if texts is not None:
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
        result["data"] = corpus.source
        result["budget_tokenizer"] = budget_name
    else:  # MCQ only: the model's size, no perplexity
        params, params_non_embedding = count_parameters(loaded.model)
        size_bytes, size_source = model_size(loaded.model, loaded.path)
        result = {
            "model": loaded.name,
            "params": params,
            "params_non_embedding": params_non_embedding,
            "size_bytes": size_bytes,
            "size_source": size_source,
        }
    if mcq_sets:
        from minigpts.mcq import evaluate_mcq

        result["mcq"] = {
            stem: evaluate_mcq(loaded.model, loaded.tokenizer, items, batch_size=max(1, 2 * args.batch_size))
            for stem, items in mcq_sets.items()
        }
    from minigpts import distributed

    if not distributed.is_main():  # data parallel: the metrics are reduced; rank 0 prints and writes
        return 0
    if texts is not None:
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
    if args.json:
        from minigpts.pipeline import write_json_atomic

        write_json_atomic(args.json, result)
    return 0


def cmd_analyze(args) -> int:
    from minigpts.models import load_model
    from minigpts.pipeline import check_output_file, run_analysis

    out = check_output_file(args.out, args.force, "--out")
    options = analysis_options(args)
    positive_int("--seq-len", args.seq_len)
    positive_int("--batch-size", args.batch_size)
    corpus = load_data(args)
    print_splits(corpus)
    loaded = load_model(args.model, device=args.device, dtype=args.dtype, **model_access(args))
    stats = run_analysis(loaded.model, loaded.tokenizer, corpus, options, model_name=loaded.source_id)
    from minigpts import distributed

    if not distributed.is_main():  # data parallel: the statistics are reduced; rank 0 writes them
        return 0
    out.parent.mkdir(parents=True, exist_ok=True)
    stats.save(out)
    console().print(f"statistics of {stats.n_tokens:,} calibration tokens written to {out}")
    print_score_distribution(loaded.model, stats)
    return 0


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
    from minigpts.pipeline import AnalysisOptions, calibration_windows

    if corpus is None:
        raise UserError(
            "--sequential re-runs the calibration text layer by layer: pass the --data of `analyze`"
        )
    seq_len = int(stats.metadata.get("seq_len", 1024))
    return calibration_windows(
        tokenizer, corpus, AnalysisOptions(calib_tokens=stats.n_tokens, seq_len=seq_len)
    )


def cmd_prune(args) -> int:
    from minigpts.analysis import ActivationStats
    from minigpts.export import save_model
    from minigpts.models import load_model
    from minigpts.pipeline import apply_full_plan, build_plan, check_output_dir

    options = plan_options(args)
    require_out(args)
    if options.has_vocab() and not args.data:
        flag = next(
            f
            for f, v in [
                ("--embedding-threshold", args.embedding_threshold),
                ("--vocab-min-count", args.vocab_min_count),
                ("--vocab-size", args.vocab_size),
            ]
            if v is not None
        )
        raise UserError(
            f"{flag}: the vocabulary cut counts tokens over the calibration + train splits of --data; pass "
            "--data (the statistics alone hold only the counts of their calibration windows)"
        )
    if not args.dry_run:
        check_output_dir(args.out, args.force)
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
    calibration = None
    if options.sequential and options.reconstruct == "lstsq" and stats is not None:
        calibration = sequential_windows(loaded.tokenizer, corpus, stats)
    model, tokenizer = apply_full_plan(
        loaded.model,
        loaded.tokenizer,
        plan,
        stats=stats,
        reconstruct=options.reconstruct,
        ridge=options.ridge,
        calibration=calibration,
    )
    from minigpts.export import base_license

    metadata = {"base_model": loaded.source_id, "stats": stats.metadata if stats is not None else None}
    metadata["params_before"] = plan.summary.get("params_before")
    metadata["base_description"] = loaded.description
    metadata["base_license"] = base_license(loaded.path, loaded.name)
    if corpus is not None:
        metadata["data"] = corpus.source
    save_model(model, tokenizer, args.out, plan=plan, metadata=metadata, force=args.force)
    console().print(f"pruned model written to {args.out}")
    return 0


def cmd_finetune(args) -> int:
    import json as _json

    from minigpts import distributed
    from minigpts.export import save_model
    from minigpts.models import load_model
    from minigpts.pipeline import check_output_dir, run_finetune, validation_bpb_target, work_dir_for

    out = check_output_dir(args.out, args.force)
    distributed.barrier()  # every process has checked --out before rank 0 writes into it
    options = finetune_options(args, args.method)
    corpus = load_data(args)
    print_splits(corpus)
    loaded = load_model(args.model, device=args.device, dtype=args.dtype, **model_access(args))
    info = {}
    if loaded.path is not None and (loaded.path / "minigpts.json").exists():
        info = _json.loads((loaded.path / "minigpts.json").read_text())
    teacher_name = args.teacher or (info.get("metadata") or {}).get("base_model")
    plan = info.get("plan") or {}
    from minigpts.recovery import get_recovery_method

    needs_teacher = get_recovery_method(options.method).needs_teacher
    needs_base = needs_teacher or options.stop_at_base
    base = None
    if needs_base:
        if not teacher_name:
            raise UserError(
                f"--model {args.model}: no unpruned model is recorded in its minigpts.json; pass --teacher MODEL"
            )
        try:
            base = load_model(
                teacher_name, device=args.device, dtype=args.dtype, flag="--teacher", **model_access(args)
            )
        except UserError as err:
            if args.teacher:
                raise
            raise UserError(
                f"the unpruned model recorded in {args.model}/minigpts.json ({teacher_name}) cannot be loaded "
                f"({err}); pass --teacher MODEL"
            ) from err
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
    from minigpts.plan import PruningPlan

    save_model(
        model,
        loaded.tokenizer,
        out,
        plan=PruningPlan.from_dict(plan) if plan else None,
        metadata=metadata,
        force=args.force,
    )
    from minigpts.pipeline import cleanup

    cleanup(work_dir_for(out))
    distributed.barrier()
    console().print(
        f"fine-tuned ({result.method}, {result.steps} steps, {result.train_tokens:,} tokens, "
        f"{result.seconds:.0f} s, stopped: {result.stopped_because}) → {out}"
    )
    return 0


def cmd_run(args) -> int:
    from minigpts.pipeline import RunOptions, recovery_method_or_none, run_experiment

    recovery_method_or_none(args.finetune)
    require_out(args)
    if args.gguf and Path(args.gguf).exists() and not args.force:
        raise UserError(f"--gguf {args.gguf} exists: pass --force to replace it or pick another file")
    evaluation = eval_options(args)
    options = RunOptions(
        model=args.model,
        data=resolve_data_spec(args.data),
        out=args.out,
        text_field=args.text_field,
        encoding=args.encoding,
        seed=args.seed,
        device=args.device,
        dtype=args.dtype,
        trust_remote_code=args.trust_remote_code,
        allow_pickle=args.allow_pickle,
        force=args.force,
        finetune=args.finetune,
        controls=args.controls,
        dry_run=args.dry_run,
        evaluation=evaluation,
        analysis=analysis_options(args),
        plan=plan_options(args),
        recovery=finetune_options(args, args.finetune if args.finetune != "none" else "full"),
    )
    corpus = load_data(args)
    print_splits(corpus)
    out = console()
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
    from minigpts.sweep import SweepOptions, run_sweep

    criteria = args.criterion if isinstance(args.criterion, list) else [args.criterion]
    args.criterion = criteria[0]  # the plan options' default; settings_grid sets each one
    if "taylor" in criteria and args.taylor_tokens is None:
        args.taylor_tokens = DEFAULT_TAYLOR_TOKENS  # one analysis serves every criterion
    options = SweepOptions(
        model=args.model,
        data=[resolve_data_spec(d) for d in args.data],
        out=args.out,
        target_params=list(args.target_params or []),
        criteria=list(dict.fromkeys(criteria)),
        finetune=args.finetune,
        controls=args.controls,
        mcq=list(args.mcq or []),
        text_field=args.text_field,
        encoding=args.encoding,
        seed=args.seed,
        device=args.device,
        dtype=args.dtype,
        trust_remote_code=args.trust_remote_code,
        allow_pickle=args.allow_pickle,
        force=args.force,
        evaluation=eval_options(args),
        analysis=analysis_options(args),
        plan=plan_options(args),
        recovery=finetune_options(args, args.finetune if args.finetune != "none" else "full"),
    )
    for value in options.target_params:
        if not 0 < value <= 1:
            raise UserError(f"--target-params {value}: each target must be a fraction in (0, 1]")
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
    if "--config" not in argv:
        return argv
    i = argv.index("--config")
    if i + 1 >= len(argv):
        raise UserError("--config needs a YAML file")
    path = Path(argv[i + 1])
    import yaml

    if not path.is_file():
        raise UserError(f"--config {path}: no such file")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise UserError(f"--config {path}: not valid YAML ({str(err).splitlines()[0]})") from err
    if not isinstance(data, dict):
        raise UserError(f"--config {path}: expected a mapping of option names to values")
    command = next((a for a in argv if not a.startswith("-")), None)
    sub = parser._subparsers._group_actions[0].choices.get(command) if command else None  # noqa: SLF001
    if sub is None:
        raise UserError("--config: put it after the subcommand, e.g. `minigpts sweep --config recipe.yaml`")
    actions = {action.dest: action for action in sub._actions if action.option_strings}  # noqa: SLF001
    tokens: list[str] = []
    for key, value in data.items():
        action = actions.get(str(key).replace("-", "_"))
        if action is None or action.dest in {"help", "config"}:
            raise UserError(f"--config {path}: unknown option {key!r}")
        flag = action.option_strings[-1]
        if isinstance(action, argparse._StoreTrueAction):  # noqa: SLF001
            if value not in (True, False):
                raise UserError(f"--config {path}: {key} must be true or false")
            tokens += [flag] if value else []
            continue
        values = value if isinstance(value, list) else [value]
        if action.nargs in ("+", "*"):
            tokens += [flag, *map(str, values)]
        elif isinstance(action, argparse._AppendAction):  # noqa: SLF001
            for v in values:
                tokens += [flag, str(v)]
        elif isinstance(value, list):
            raise UserError(f"--config {path}: {key} takes one value, not a list")
        else:
            tokens += [flag, str(value)]
    # The recipe's options come right after the subcommand, so flags on the command line win.
    position = argv.index(command) + 1
    argv = argv[:i] + argv[i + 2 :]
    return argv[:position] + tokens + argv[position:]


def add_gguf_outtype(p: argparse.ArgumentParser, flag: str) -> None:
    p.add_argument(
        flag,
        default="f32",
        choices=["f32", "f16", "bf16", "q8_0"],
        help="GGUF weight type: f32 (default, exact), f16, bf16 or q8_0 (8-bit blocks; 1-D tensors stay f32)",
    )


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


def build_parser() -> argparse.ArgumentParser:
    from minigpts.recovery import recovery_method_help

    parser = OneLineParser(
        prog="minigpts",
        description="Contextual pruning: turn a causal LM and a domain corpus into a smaller domain model.",
    )
    parser.add_argument("--version", action="version", version=f"minigpts {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("eval", help="perplexity, bits-per-byte (and MCQ accuracy) on a held-out split")
    add_model_options(p)
    add_data_options(p, required=False)
    add_eval_options(p)
    p.add_argument("--split", default="test", help="split to score: test (default), validation, train")
    p.add_argument("--mcq", action="append", help="multiple-choice set (paper JSON or JSONL); repeatable")
    p.add_argument(
        "--budget-tokenizer",
        default=None,
        metavar="MODEL",
        help="count --max-eval-tokens in this model's tokens, so models with different vocabularies "
        "score the same text (default: the unpruned model named in the model's minigpts.json, "
        "else the model's own)",
    )
    p.add_argument("--json", default=None, help="write the result as JSON to this file")
    p.add_argument("--force", action="store_true", help="overwrite an existing --json file")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("analyze", help="activation statistics of every unit over the calibration split")
    add_model_options(p)
    add_data_options(p)
    add_analysis_options(p)
    p.add_argument("--out", required=True, help="statistics file to write (.safetensors)")
    p.add_argument("--force", action="store_true", help="overwrite an existing --out")
    p.set_defaults(func=cmd_analyze)

    p = sub.add_parser("prune", help="plan from statistics and physically remove units")
    add_model_options(p)
    add_data_options(p, required=False)
    add_plan_options(p)
    p.add_argument("--stats", help="statistics file from `minigpts analyze` (needed for structural plans)")
    p.add_argument("--out", help="output model directory (required unless --dry-run)")
    p.add_argument("--dry-run", action="store_true", help="print the plan, write nothing")
    p.add_argument("--force", action="store_true", help="replace a non-empty --out")
    p.set_defaults(func=cmd_prune)

    p = sub.add_parser("finetune", help="recovery fine-tuning on the train split (full, LoRA, distillation)")
    add_model_options(p)
    add_data_options(p)
    add_finetune_options(p, "--method")
    p.add_argument("--out", required=True, help="output model directory")
    p.add_argument("--force", action="store_true", help="replace a non-empty --out")
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser(
        "run", help="split → evaluate → analyze → plan → prune → recover → evaluate → save + report"
    )
    add_model_options(p)
    add_data_options(p)
    add_eval_options(p)
    add_analysis_options(p, seq_len=False)
    add_plan_options(p)
    add_finetune_options(p, "--finetune")
    p.add_argument("--split", default="test", help="held-out split to report (default test)")
    p.add_argument("--finetune", default="none", help="recovery: " + recovery_method_help("default"))
    p.add_argument(
        "--controls",
        action="store_true",
        help="add the unpruned model fine-tuned with the same budget and a random pruning of the same size",
    )
    p.add_argument("--mcq", action="append", help="multiple-choice set evaluated at every stage; repeatable")
    p.add_argument(
        "--general-data",
        nargs="+",
        metavar="D",
        help="off-domain corpus evaluated at every stage ('sample-medical' bundled); several paths form one corpus",
    )
    p.add_argument(
        "--out", help="output directory: model + report.json + report.md (required unless --dry-run)"
    )
    p.add_argument("--dry-run", action="store_true", help="print the plan, write nothing")
    p.add_argument("--force", action="store_true", help="replace a non-empty --out")
    p.add_argument("--gguf", metavar="FILE", help="also write the final model as one GGUF file for llama.cpp")
    add_gguf_outtype(p, "--gguf-outtype")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("sweep", help="the paper's experiment: domains × pruning settings, with a report")
    add_model_options(p)
    g = p.add_argument_group("data")
    g.add_argument(
        "--data",
        nargs="+",
        metavar="D",
        required=True,
        help="one corpus per domain (same forms as elsewhere); paths whose file names share the domain "
        "name (up to the first dot, split word dropped: law.train.jsonl, law.test.jsonl) form one corpus",
    )
    g.add_argument("--text-field", default="text", help="column(s) holding the text")
    g.add_argument("--encoding", default="utf-8", help="text encoding of the files")
    g.add_argument("--seed", type=int, default=0, help="seed for the document split (default 0)")
    add_eval_options(p)
    add_analysis_options(p, seq_len=False)
    add_plan_options(p)
    p.set_defaults(target_params=None)
    for action in p._actions:  # noqa: SLF001 - sweep takes a list of targets, and of criteria
        if action.dest == "target_params":
            action.nargs = "+"
            action.help = "target sizes (fractions of parameters) instead of the paper's threshold grid"
        if action.dest == "criterion":
            action.nargs = "+"
            action.help = (
                "unit score(s); several compare them: every size for every criterion, one table, one "
                "line per criterion in size_vs_bpb.png. " + action.help
            )
    add_finetune_options(p, "--finetune")
    p.add_argument("--split", default="test", help="held-out split to report (default test)")
    p.add_argument(
        "--finetune", default="full", help="recovery (default full): " + recovery_method_help("no recovery")
    )
    p.add_argument(
        "--controls", action="store_true", help="add base-fine-tuned and random-same-size controls"
    )
    p.add_argument("--mcq", action="append", help="FILE for every domain or DOMAIN=FILE; repeatable")
    p.add_argument(
        "--general-data",
        nargs="+",
        metavar="D",
        help="off-domain corpus evaluated at every stage (its test split); several paths form one corpus",
    )
    p.add_argument("--config", help="YAML recipe holding any of these options")
    p.add_argument("--out", required=True, help="output directory for tables, plots and report")
    p.add_argument("--force", action="store_true", help="replace a non-empty --out")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("export", help="write a model as one GGUF file for llama.cpp (tokenizer included)")
    g = p.add_argument_group("model")
    g.add_argument(
        "--model", default=None, help="model directory (e.g. the --out of prune/run), .gguf, or alias"
    )
    g.add_argument("--trust-remote-code", action="store_true", help="as for the other commands")
    g.add_argument("--allow-pickle", action="store_true", help="as for the other commands")
    p.add_argument("--gguf", required=True, metavar="FILE", help="GGUF file to write")
    add_gguf_outtype(p, "--outtype")
    p.add_argument("--force", action="store_true", help="replace an existing --gguf file")
    p.set_defaults(func=cmd_export)
    return parser


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

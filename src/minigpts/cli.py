"""The ``minigpts`` command: a thin layer over the Python API (see ``minigpts.api``)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
from pathlib import Path

from minigpts import __version__
from minigpts.errors import UserError

SAMPLE_ALIAS = "sample"


def sample_data_dir() -> Path:
    return Path(__file__).parent / "sample_data"


def resolve_data_spec(spec: str) -> str:
    """``sample`` names the bundled CC BY economics sample; anything else is passed through."""
    if spec == SAMPLE_ALIAS:
        return str(sample_data_dir() / "economics.*.jsonl")
    return spec


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


def add_data_options(p: argparse.ArgumentParser, required: bool = True) -> None:
    g = p.add_argument_group("data")
    g.add_argument(
        "--data",
        required=required,
        help="file, directory, glob (.txt .md .jsonl .json .csv .parquet), saved HF dataset, hub "
        "dataset, or 'sample' (the bundled CC BY economics sample)",
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
    if args.data == SAMPLE_ALIAS:
        corpus.source = "sample (bundled OpenStax economics, CC BY 4.0)"
    return corpus


def positive_int(name: str, value: int | None) -> None:
    if value is not None and value <= 0:
        raise UserError(f"{name} {value}: must be a positive integer")


# --------------------------------------------------------------------------------------------------
# Output helpers


def console():
    from rich.console import Console

    return Console(highlight=False, width=None if sys.stdout.isatty() else 120)


def print_splits(corpus) -> None:
    from rich.table import Table

    table = Table(title=f"corpus {corpus.source}", title_justify="left")
    table.add_column("split")
    table.add_column("documents", justify="right")
    table.add_column("characters", justify="right")
    for row in corpus.describe():
        table.add_row(row["split"], f"{row['documents']:,}", f"{row['characters']:,}")
    out = console()
    out.print(table)
    for note in corpus.notes:
        out.print(f"[dim]{note}[/dim]")


def write_json(path: str, data, force: bool) -> None:
    """Write JSON atomically; never replace an existing file without --force."""
    target = Path(path)
    if target.exists() and not force:
        raise UserError(f"--json {path}: file exists; pass --force to overwrite or choose another path")
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2, default=str)
        f.write("\n")
    os.replace(tmp, target)


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
            f"{r['size_bytes'] / 2**20:.1f} MiB ({r['size_source']})",
            f"{r['perplexity']:.3f}",
            f"{r['bits_per_byte']:.4f}",
            f"{r['eval_tokens']:,}",
            f"{r['tokens_per_second']:.0f}",
        )
    out = console()
    out.print(table)
    if rows:
        out.print(f"[dim]protocol: split '{rows[0][1]['split']}'; {rows[0][1]['protocol']}[/dim]")


# --------------------------------------------------------------------------------------------------
# Subcommands


def cmd_eval(args) -> int:
    from minigpts.data import normalize_split_name
    from minigpts.evaluation import evaluate
    from minigpts.models import load_model

    positive_int("--seq-len", args.seq_len)
    positive_int("--max-eval-tokens", args.max_eval_tokens)
    positive_int("--batch-size", args.batch_size)
    split = normalize_split_name(args.split)
    corpus = load_data(args)
    print_splits(corpus)
    texts = corpus.split(split)
    loaded = load_model(args.model, device=args.device, dtype=args.dtype)
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
    ).to_dict()
    result["data"] = corpus.source
    print_eval_table([(loaded.name, result)], f"held-out evaluation ({loaded.description})")
    if args.json:
        write_json(args.json, result, args.force)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="minigpts",
        description="Contextual pruning: turn a causal LM and a domain corpus into a smaller domain model.",
    )
    parser.add_argument("--version", action="version", version=f"minigpts {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("eval", help="perplexity and bits-per-byte on a held-out split")
    add_model_options(p)
    add_data_options(p)
    add_eval_options(p)
    p.add_argument("--split", default="test", help="split to score: test (default), validation, train")
    p.add_argument("--json", default=None, help="write the result as JSON to this file")
    p.add_argument("--force", action="store_true", help="overwrite an existing --json file")
    p.set_defaults(func=cmd_eval)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    if debug:
        argv.remove("--debug")
    parser = build_parser()
    args = parser.parse_args(argv)
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

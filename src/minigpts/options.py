"""Every option once: one dataclass per stage whose fields carry the flag, type, default, choices, help
and argparse group (``option(...)``). The CLI's parsers (``add_options``), the dataclasses built from a
command line (``from_args``), YAML recipe keys, report.json settings (``asdict``) and error messages
(``flag_of``) all read these declarations. A subcommand that shows an option differently (another help
line, required, a list) says so in the option's ``variants``, keyed by subcommand.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import re
from collections.abc import Callable, Mapping
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any

from minigpts.errors import UserError

SAMPLE_ALIAS = "sample"
GENERAL_SAMPLE_ALIAS = "sample-medical"
DEFAULT_TAYLOR_TOKENS = 4096  # LLM-Pruner itself takes 10 samples of 64 tokens
DEFAULT_DEPTH_TOKENS = 2048  # × (layers + 1) forward passes
MIXED_PRECISION = ("auto", "bf16", "no")  # recovery's --mixed-precision
LR_SCHEDULERS = ("linear", "cosine", "constant_with_warmup")  # --lr-scheduler: transformers' names
GROUP_DESCRIPTIONS = {
    "recovery fine-tuning": "The run's length is its step budget — the smallest of --max-steps, "
    "--max-train-tokens and --max-epochs — and the learning-rate schedule's horizon, so the same command "
    "gives the same numbers on any machine; --max-minutes is only a safety cap."
}


_SAME = object()  # Option.cli_default: the field's own default


@dataclass(frozen=True)
class Option:
    """How one dataclass field appears on the command line (``help`` and ``choices`` may be callables,
    read when a parser is built, so registered criteria and recovery methods appear)."""

    flag: str | None
    help: str | Callable[[], str] = ""
    group: str | None = None
    choices: Any = None
    nargs: str | None = None
    metavar: str | None = None
    action: Any = None
    required: bool = False
    cli_default: Any = _SAME  # the parser's default, when it is not the field's (e.g. None = "auto")
    positive: bool = False  # a positive integer when given
    convert: Callable | None = None  # command-line value → field value
    commands: tuple[str, ...] | None = None  # only these subcommands show it
    variants: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)  # per subcommand


def option(default: Any = MISSING, flag: str | None = None, *, default_factory: Any = MISSING, **meta):
    """A dataclass field declared as a command-line option (see ``Option``)."""
    return field(default=default, default_factory=default_factory, metadata={"option": Option(flag, **meta)})


def reuse(cls, name: str, *, default: Any = MISSING, default_factory: Any = MISSING, **changes):
    """A field of another class sharing ``cls.name``'s option (same flag): its default unless given."""
    original = next(f for f in fields(cls) if f.name == name)
    if default is MISSING and default_factory is MISSING:
        default, default_factory = original.default, original.default_factory
    opt = original.metadata["option"]
    opt = dataclasses.replace(opt, group=opt.group or getattr(cls, "GROUP", None), **changes)
    return field(default=default, default_factory=default_factory, metadata={"option": opt})


def option_of(cls, name: str) -> Option:
    return next(f for f in fields(cls) if f.name == name).metadata["option"]


def flag_of(cls, name: str) -> str:
    """The flag of ``cls.name``, for messages: ``flag_of(PlanOptions, "mlp_ratio")`` → ``--mlp-ratio``."""
    return option_of(cls, name).flag


def dest_of(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")


def _field_default(f: dataclasses.Field) -> Any:
    if f.default is not MISSING:
        return f.default
    return f.default_factory() if f.default_factory is not MISSING else None


def _resolved(opt: Option, command: str) -> Option:
    return dataclasses.replace(opt, **opt.variants.get(command, {}))


def _help(opt: Option, default: Any) -> str:
    text = opt.help() if callable(opt.help) else opt.help
    shown = default is not None and default is not False and opt.action is not argparse.BooleanOptionalAction
    if shown and "default" not in text:
        text += f" (default {default})"
    return text


def add_options(parser: argparse.ArgumentParser, command: str, cls, names: tuple[str, ...] = ()) -> None:
    """Add ``cls``'s options (``names``, in that order; default: every field) to ``command``'s parser.

    A flag already on the parser (shared by two stages, e.g. --seq-len) is added once; an option's
    argparse group is created the first time one of its options is added.
    """
    by_name = {f.name: f for f in fields(cls)}
    groups = parser.__dict__.setdefault("_minigpts_groups", {})
    for name in names or [f.name for f in fields(cls) if "option" in f.metadata]:
        f = by_name[name]
        opt = _resolved(f.metadata["option"], command)
        if opt.flag is None or opt.flag in parser._option_string_actions:  # noqa: SLF001
            continue
        if opt.commands is not None and command not in opt.commands:
            continue
        default = _field_default(f) if opt.cli_default is _SAME else opt.cli_default
        if isinstance(default, tuple):  # e.g. --target-groups mlp,heads
            default = ",".join(default)
        group, target = opt.group or getattr(cls, "GROUP", None), parser
        if group is not None:
            if group not in groups:
                groups[group] = parser.add_argument_group(group, GROUP_DESCRIPTIONS.get(group))
            target = groups[group]
        kwargs: dict[str, Any] = {"default": default, "help": _help(opt, default)}
        if opt.action is None and str(f.type) == "bool":  # a switch, off unless given
            kwargs["action"] = "store_true"
        elif opt.action is None and (number := re.search(r"\b(int|float)\b", str(f.type))):
            kwargs["type"] = {"int": int, "float": float}[number.group(1)]  # list[float]: each item
        for key in ("nargs", "metavar", "action", "required"):
            kwargs.update({key: getattr(opt, key)} if getattr(opt, key) else {})
        if opt.choices is not None:
            kwargs["choices"] = opt.choices() if callable(opt.choices) else opt.choices
        target.add_argument(opt.flag, **kwargs)


def from_args(cls, args: argparse.Namespace, **overrides):
    """``cls`` filled from parsed arguments (nested stage dataclasses too); fields the command does not
    have keep their defaults. Positive-integer options are checked; a class's ``finish_from_args(args)``
    then fills what depends on several flags."""
    values: dict[str, Any] = {}
    for f in fields(cls):
        if f.name in overrides:
            values[f.name] = overrides[f.name]
        elif dataclasses.is_dataclass(f.default_factory):
            values[f.name] = from_args(f.default_factory, args)
        elif "option" in f.metadata and f.metadata["option"].flag is not None:
            opt = f.metadata["option"]
            if not hasattr(args, dest_of(opt.flag)):
                continue
            value = getattr(args, dest_of(opt.flag))
            if opt.positive and value is not None and value <= 0:
                raise UserError(f"{opt.flag} {value}: must be a positive integer")
            values[f.name] = opt.convert(value) if opt.convert is not None else value
    result = cls(**values)
    if hasattr(result, "finish_from_args"):
        result.finish_from_args(args)
    return result


# --------------------------------------------------------------------------------------------------
# Conversions of command-line values


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


def _as_list(value) -> list:
    return list(value or [])


def _each_data_spec(specs: list[str]) -> list[str]:
    return [resolve_data_spec(spec) for spec in specs]


def parse_target_groups(value: str | tuple[str, ...]) -> tuple[str, ...]:
    if isinstance(value, tuple):
        return value
    groups = tuple(g.strip() for g in value.split(",") if g.strip())
    unknown = [g for g in groups if g not in {"mlp", "heads", "hidden"}]
    if unknown or not groups:
        flag = flag_of(PlanOptions, "target_groups")
        raise UserError(f"{flag} {value}: use a comma-separated subset of mlp, heads, hidden")
    return groups


def _registry(module: str, name: str) -> Callable[[], Any]:
    """``module.name`` (called when callable) read when a parser is built: registered criteria and
    recovery methods appear in --help and the choices."""

    def read():
        value = getattr(importlib.import_module(module), name)
        return value() if callable(value) else list(value)

    return read


def _criterion_help() -> str:
    from minigpts.criteria import criterion_names, get_criterion

    scores = "; ".join(f"{name}: {get_criterion(name).help}" for name in criterion_names())
    return (
        "unit score (default wanda: with the refit the best, or within 1 %% of the best, in our "
        "measurements; l1 when a paper threshold --activation-threshold/--linear-threshold is given, "
        f"whose values are l1's): {scores}"
    )


def _layer_criterion_help() -> str:
    from minigpts.depth import LAYER_CRITERIA

    return "which layers go: " + "; ".join(f"{n}: {t}" for n, t in LAYER_CRITERIA.items()) + " (default bi)"


def _recovery_help(prefix: str, with_none: str | None = None) -> Callable[[], str]:
    def text() -> str:
        from minigpts.recovery import recovery_method_help

        return prefix + recovery_method_help(with_none)

    return text


# --------------------------------------------------------------------------------------------------
# The options of every stage


@dataclass
class SourceOptions:
    """The model and the corpus (the `model` and `data` groups), the output and --force."""

    model: str | None = option(
        flag="--model",
        group="model",
        help="hub id, local HF directory, .gguf file, or alias 'smollm2-135m' (default)",
        variants={"export": {"help": "model directory (e.g. the --out of prune/run), .gguf, or alias"}},
    )
    data: str | list[str] = option(
        flag="--data",
        group="data",
        nargs="+",
        metavar="D",
        required=True,
        convert=resolve_data_spec,
        help="file(s), directory, glob (.txt .md .jsonl .json .csv .parquet), saved HF dataset, hub "
        "dataset, or 'sample' (the bundled CC BY economics sample); several paths (e.g. a glob the "
        "shell expanded) form one corpus",
        variants={
            "eval": {"required": False},
            "prune": {"required": False},
            "sweep": {
                "help": "one corpus per domain (same forms as elsewhere); paths whose file names share the "
                "domain name (up to the first dot, split word dropped: law.train.jsonl, law.test.jsonl) form "
                "one corpus"
            },
        },
    )
    out: str | None = option(
        flag="--out",
        help="output directory: model + report.json + report.md (required unless --dry-run)",
        variants={
            "analyze": {"required": True, "help": "statistics file to write (.safetensors)"},
            "prune": {"help": "output model directory (required unless --dry-run)"},
            "finetune": {"required": True, "help": "output model directory"},
            "sweep": {"required": True, "help": "output directory for tables, plots and report"},
        },
    )
    text_field: str = option(
        "text",
        "--text-field",
        group="data",
        help="column(s) holding the text, e.g. question,answer",
        variants={"sweep": {"help": "column(s) holding the text"}},
    )
    encoding: str = option("utf-8", "--encoding", group="data", help="text encoding of the files")
    seed: int = option(0, "--seed", group="data", help="seed for the document split")
    device: str = option("auto", "--device", group="model", help="auto (GPU when present) | cpu | cuda[:N]")
    dtype: str | None = option(
        None, "--dtype", group="model", help="float32 (CPU default) | bfloat16 (GPU default) | float16"
    )
    trust_remote_code: bool = option(
        False,
        "--trust-remote-code",
        group="model",
        help="let a model directory's auto_map run its own Python code (only for authors you trust; "
        "minigpts' per-layer exports load without it while their modeling_minigpts.py is unchanged)",
        variants={"export": {"help": "as for the other commands"}},
    )
    allow_pickle: bool = option(
        False,
        "--allow-pickle",
        group="model",
        help="also read pickle weights (pytorch_model.bin), which can run code when loaded; "
        "by default only safetensors are read",
        variants={"export": {"help": "as for the other commands"}},
    )
    force: bool = option(
        False,
        "--force",
        help="replace a non-empty --out",
        variants={
            "eval": {"help": "overwrite an existing --json file"},
            "analyze": {"help": "overwrite an existing --out"},
            "export": {"help": "replace an existing --gguf file"},
        },
    )


@dataclass
class EvalOptions:
    split: str = option(
        "test",
        "--split",
        help="held-out split to report (default test)",
        variants={"eval": {"help": "split to score: test (default), validation, train"}},
    )
    seq_len: int = option(
        1024,
        "--seq-len",
        group="evaluation",
        positive=True,
        help="window length in tokens",
        variants={"analyze": {"group": "analysis"}},
    )
    max_eval_tokens: int | None = option(
        None,
        "--max-eval-tokens",
        group="evaluation",
        positive=True,
        help="score at most this many tokens per split",
    )
    batch_size: int = option(
        4,
        "--batch-size",
        group="evaluation",
        positive=True,
        help="windows per forward pass",
        variants={"analyze": {"group": "analysis"}},
    )
    mcq: list[str] = option(
        flag="--mcq",
        default_factory=list,
        cli_default=None,
        action="append",
        convert=_as_list,
        help="multiple-choice set evaluated at every stage; repeatable",
        variants={
            "eval": {"help": "multiple-choice set (paper JSON or JSONL); repeatable"},
            "sweep": {"help": "FILE for every domain or DOMAIN=FILE; repeatable"},
        },
    )
    general_data: str | list[str] | None = option(  # a list: several paths read as one corpus
        None,
        "--general-data",
        nargs="+",
        metavar="D",
        convert=resolve_general_spec,
        help="off-domain corpus evaluated at every stage ('sample-medical' bundled); several paths form "
        "one corpus",
        variants={
            "sweep": {
                "help": "off-domain corpus evaluated at every stage (its test split); several paths form "
                "one corpus"
            }
        },
    )
    general_max_tokens: int | None = option(
        None,
        "--general-max-tokens",
        positive=True,
        help="score at most this many tokens of the off-domain corpus per stage (default: --max-eval-tokens); "
        "it only watches forgetting, so a smaller sample than the domain's saves time",
    )


def _pass_tokens(args, flag: str, needed: bool, default: int) -> int:
    """Tokens of an optional analysis pass: the flag's value, else ``default`` when the plan needs it."""
    value = getattr(args, dest_of(flag), None)
    if value is None:
        return default if needed else 0
    if value < 0:
        raise UserError(f"{flag} {value}: must be 0 (off) or a positive number of tokens")
    return value


@dataclass
class AnalysisOptions:
    GROUP = "analysis"  # the argparse group of the fields that name none
    calib_tokens: int = option(
        65_536,
        "--calib-tokens",
        positive=True,
        help="calibration tokens to run (default 65,536; fewer save time and cost quality: at the demo's recipe "
        "16,384 tokens end +1.4 %% above the base after recovery; with round 2's refit 16,384 / 24,576 / 32,768 "
        "ended +1.8 / +1.2 / +0.8 %%)",
    )
    seq_len: int = reuse(EvalOptions, "seq_len")
    batch_size: int = reuse(EvalOptions, "batch_size")
    moments: bool = option(  # second moments for the refit and the error allocation
        True,
        "--moments",
        action=argparse.BooleanOptionalAction,
        help="also record the second moments of the MLP and attention outputs' inputs, which the refit "
        "(--reconstruct lstsq) and --allocation error need; (width)² floats per layer, e.g. ~620 MiB for "
        "SmolLM2-135M (default on; --no-moments for the paper's first-order statistics only)",
    )
    fisher_tokens: int = option(  # gradient pass for the error allocation (with moments)
        4096,
        "--fisher-tokens",
        help="with --moments: tokens of a gradient pass (the first calibration windows) that weighs each "
        "block's output error by what it costs the loss, for --allocation error (default 4,096; 0 = off)",
    )
    taylor_tokens: int = option(  # gradient pass of --criterion taylor
        0,
        "--taylor-tokens",
        cli_default=None,
        metavar="N",
        help="tokens of the gradient pass --criterion taylor reads (the first calibration windows; default: "
        f"{DEFAULT_TAYLOR_TOKENS:,} when this command plans with --criterion taylor, else 0 = off)",
    )
    depth_tokens: int = option(  # layer-removal passes of --layer-criterion loss
        0,
        "--depth-tokens",
        cli_default=None,
        metavar="N",
        help="tokens of the loss passes --layer-criterion loss reads: the loss without each layer costs "
        f"N × (layers + 1) tokens of forward passes (default: {DEFAULT_DEPTH_TOKENS:,} when this command "
        "drops layers by loss, else 0 = off)",
    )

    def finish_from_args(self, args) -> None:
        """The gradient / loss passes default to on when the command's plan needs them."""
        taylor = getattr(args, "criterion", None) == "taylor"
        depth = getattr(args, "layer_criterion", None) == "loss" and bool(
            getattr(args, "drop_layers", None) or getattr(args, "layer_ratio", None)
        )
        flags = flag_of(AnalysisOptions, "taylor_tokens"), flag_of(AnalysisOptions, "depth_tokens")
        self.taylor_tokens = _pass_tokens(args, flags[0], taylor, DEFAULT_TAYLOR_TOKENS)
        self.depth_tokens = _pass_tokens(args, flags[1], depth, DEFAULT_DEPTH_TOKENS)


STRUCTURE = "plan (structure)"
Q8_0_BLOCK = 32  # values in one q8_0 block (gguf.GGML_QUANT_SIZES): a row of any other length stays f16


def writes_q8_0_gguf(args) -> bool:
    """Whether the command (`run --gguf F --gguf-outtype q8_0`) ends by writing a q8_0 GGUF file."""
    return bool(getattr(args, "gguf", None)) and getattr(args, "gguf_outtype", None) == "q8_0"


VOCABULARY = "plan (vocabulary)"


@dataclass
class PlanOptions:
    GROUP = STRUCTURE
    criterion: str | None = option(  # None: `plan.resolve_criterion` (wanda, or l1 with a paper threshold)
        None,
        "--criterion",
        choices=_registry("minigpts.criteria", "criterion_names"),
        help=_criterion_help,
        variants={
            "sweep": {
                "nargs": "+",
                "help": lambda: (
                    "unit score(s); several compare them: every size for every criterion, one "
                    "table, one line per criterion in size_vs_bpb.png. " + _criterion_help()
                ),
            }
        },
    )
    mlp_ratio: float | None = option(
        None, "--mlp-ratio", help="fraction of MLP channels to remove, in [0, 1)"
    )
    head_ratio: float | None = option(
        None, "--head-ratio", help="fraction of attention heads to remove, in [0, 1)"
    )
    hidden_ratio: float | None = option(
        None, "--hidden-ratio", help="fraction of hidden (residual) channels to remove"
    )
    target_params: float | None = option(
        None,
        "--target-params",
        help="fraction of all parameters to keep (vocabulary cut included); the planner spreads the rest "
        "over --target-groups",
        variants={
            "sweep": {
                "nargs": "+",
                "help": "target sizes (fractions of parameters) instead of the paper's threshold grid",
            }
        },
    )
    linear_threshold: float | None = option(
        None, "--linear-threshold", help="paper: prune heads/hidden channels with score ≤ E"
    )
    activation_threshold: float | None = option(
        None, "--activation-threshold", help="paper: prune MLP channels with score ≤ E"
    )
    layout: str = option(
        "uniform",
        "--layout",
        choices=["uniform", "per-layer"],
        help="uniform: same widths in every layer, loads with plain transformers (default); "
        "per-layer: widths follow the domain, loads with trust_remote_code=True",
    )
    min_mlp: int = option(8, "--min-mlp", help="per-layer layout: MLP channels kept at least")
    round_to: int = option(
        8,
        "--round-to",
        cli_default=None,
        metavar="N",
        help=f"round MLP widths to a multiple of N (default 8; {Q8_0_BLOCK} for `run --gguf-outtype q8_0`, whose "
        "matrices quantise only in whole blocks of 32: others are written as f16)",
    )
    seed: int = option(0, "--plan-seed", help="seed of the random criterion")
    target_groups: tuple[str, ...] = option(
        ("mlp", "heads"),
        "--target-groups",
        convert=parse_target_groups,
        help="groups --target-params may shrink: any of mlp, heads, hidden",
    )
    allocation: str = option(
        "error",
        "--allocation",
        choices=["error", "paper"],
        help="how widths are spread: error (default) = per-layer widths, and a --target-params split "
        "between MLP and heads, that minimise the output error left after the refit (needs --moments); "
        "paper = the paper's global ranking of raw scores (per-layer) and one common ratio (--target-params); "
        "measured on held-out text, paper's per-layer cut is close to a random one",
    )
    reconstruct: str = option(
        "lstsq",
        "--reconstruct",
        choices=["none", "lstsq"],
        help="after removing MLP channels or heads, refit the output projection on the kept ones by ridge "
        "least squares from the calibration second moments (default lstsq; none = slice only, as the paper)",
    )
    ridge: float = option(
        0.32,
        "--ridge",
        help="how hard the refit pulls each kept input's weights back toward their sliced values, in units of "
        "that input's second moment, x kept/removed x inputs/calibration tokens (the fit's noise: 0 = plain "
        "least squares; large = plain slicing); 0.32, the best measured on SmolLM2's MLP from 16,384 "
        "tokens, is within 0.04 %% of the best fixed ridge measured from 4,096 and 65,536 (25 %%, 50 %% cuts)",
    )
    sequential: bool | None = option(
        None,
        "--sequential",
        action=argparse.BooleanOptionalAction,
        help="refit layer by layer: each layer's statistics are re-measured on the outputs of the layers "
        "already pruned and refit, its kept units re-chosen, and its refit aimed partly at the unpruned "
        "model's residual stream (as far as held-out calibration windows show that generalises), so it also "
        "absorbs what earlier layers lost. Default: on wherever the calibration text is at hand (run, sweep; "
        "prune with --data); --no-sequential for the one-shot refit from the analysis's second moments. "
        "Cost: about 2.6 more forward passes over the calibration tokens (~100 s for SmolLM2-135M's 16,384 "
        "on 2 CPU cores); measured before recovery it removes 39-57 %% of slicing's increase at a 25 %% MLP "
        "cut and 56-62 %% at 50 %% (one-shot: 32-47 %% and 44-54 %%)",
    )
    embedding_threshold: float | None = option(
        None,
        "--embedding-threshold",
        group=VOCABULARY,
        help="paper: prune tokens whose domain frequency is ≤ E (0 = exactly the unseen tokens)",
    )
    vocab_min_count: int | None = option(
        None, "--vocab-min-count", group=VOCABULARY, help="prune tokens seen fewer than N times"
    )
    vocab_size: int | None = option(
        None,
        "--vocab-size",
        group=VOCABULARY,
        help="keep exactly K tokens: the always-kept ones, then the most frequent",
    )
    vocab_keep_general: int = option(
        0,
        "--vocab-keep-general",
        group=VOCABULARY,
        metavar="N",
        help="also keep the tokenizer's first N BPE merges (its most general tokens), so held-out words "
        "keep their usual spelling",
    )
    vocab_keep_expected: int = option(
        0,
        "--vocab-keep-expected",
        group=VOCABULARY,
        metavar="K",
        help="also keep the K tokens the model expects most in the domain text (its summed next-token "
        "probabilities over 16,384 calibration tokens): domain words the sample never showed",
    )
    drop_layers: int | None = option(
        None,
        "--drop-layers",
        metavar="N",
        help="depth: remove the N decoder layers --layer-criterion ranks lowest",
    )
    layer_ratio: float | None = option(
        None,
        "--layer-ratio",
        metavar="R",
        help="depth: remove this fraction of the decoder layers, in [0, 1)",
    )
    layer_criterion: str = option(
        "bi",
        "--layer-criterion",
        choices=_registry("minigpts.depth", "LAYER_CRITERIA"),
        help=_layer_criterion_help,
    )

    STRUCTURE_FIELDS = (
        "mlp_ratio",
        "head_ratio",
        "hidden_ratio",
        "target_params",
        "linear_threshold",
        "activation_threshold",
        "drop_layers",
        "layer_ratio",
    )
    VOCAB_FIELDS = ("embedding_threshold", "vocab_min_count", "vocab_size")

    def finish_from_args(self, args) -> None:
        """--round-to: 8 unless given, or q8_0's block where the command also writes a q8_0 GGUF."""
        if self.round_to is None:
            self.round_to = Q8_0_BLOCK if writes_q8_0_gguf(args) else 8

    def has_structure(self) -> bool:
        return any(getattr(self, name) is not None for name in self.STRUCTURE_FIELDS)

    def has_vocab(self) -> bool:
        return any(getattr(self, name) is not None for name in self.VOCAB_FIELDS)

    def refits_sequentially(self, calibration_text: bool) -> bool:
        """Whether the refit runs layer by layer: never with --reconstruct none or --no-sequential; by
        default wherever ``calibration_text`` is at hand; with --sequential always (the caller then
        asks for --data where it is missing)."""
        if self.reconstruct != "lstsq" or self.sequential is False:
            return False
        return self.sequential is True or calibration_text

    def resolved_criterion(self) -> str:
        """The criterion the plan scores with (``--criterion`` when given; see ``plan.resolve_criterion``)."""
        from minigpts.plan import resolve_criterion

        return resolve_criterion(self.criterion, self.activation_threshold, self.linear_threshold)

    def structure_kwargs(self) -> dict[str, Any]:
        """``make_plan``'s keyword arguments."""
        import inspect

        from minigpts.plan import make_plan

        accepted = inspect.signature(make_plan).parameters
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name in accepted}


# the order --help lists the plan's options in
PlanOptions.HELP_ORDER = (
    *("mlp_ratio", "head_ratio", "hidden_ratio", "target_params", "target_groups", "linear_threshold"),
    *("activation_threshold", "criterion", "layout", "min_mlp", "round_to", "seed", "drop_layers"),
    *("layer_ratio", "layer_criterion", "allocation", "reconstruct", "ridge", "sequential"),
    *("embedding_threshold", "vocab_min_count", "vocab_keep_general", "vocab_keep_expected", "vocab_size"),
)

RECOVERY = "recovery fine-tuning"


@dataclass
class FinetuneOptions:
    GROUP = RECOVERY
    method: str = option(
        "full",
        "--method",
        choices=_registry("minigpts.recovery", "recovery_method_names"),
        commands=("finetune",),  # `run` and `sweep` name the method with --finetune
        help=_recovery_help("default full; "),
    )
    max_epochs: float | None = option(  # None: 1 epoch unless max_steps or max_train_tokens is given
        None,
        "--max-epochs",
        help="epochs over the train split (default 1 when neither --max-steps nor --max-train-tokens is given)",
    )
    max_steps: int | None = option(None, "--max-steps", positive=True, help="optimizer steps (exact)")
    max_train_tokens: int | None = option(
        None,
        "--max-train-tokens",
        positive=True,
        help="training tokens: floor(N / tokens per step) whole steps, never more than N "
        "(tokens per step = --train-batch-size × --grad-accum × devices × --finetune-seq-len)",
    )
    max_minutes: float | None = option(
        None,
        "--max-minutes",
        help="safety cap on the recovery stage's wall clock (teacher pass, training, validation, "
        "checkpoints): it stops before a step whose predicted end would pass the cap; the schedule "
        "still follows the step budget",
    )
    stop_at_base: bool = option(
        False,
        "--stop-at-base",
        help="paper's rule: stop once validation bits-per-byte ≤ the unpruned model's",
    )
    early_stopping_patience: int | None = option(
        None, "--early-stopping", metavar="N", help="stop after N evals without gain"
    )
    eval_every: int | None = option(
        None,
        "--eval-every",
        positive=True,
        help="validate every N steps (default: validation at start, end and every K steps, K the smallest "
        "that keeps all validation tokens ≤ 10%% of the training tokens; when even start + end would pass "
        "10%%, the validation set is cut to fit, at least one window)",
    )
    max_val_tokens: int | None = option(
        4_096,
        "--max-val-tokens",
        help="validation set size in tokens, counted in the unpruned model's tokens when it is known "
        "(default 4,096)",
    )
    lr: float = option(
        3e-4,
        "--lr",
        help="learning rate (default 3e-4: measured best for recovering a pruned model, flat from 1.5e-4 "
        "to 3e-4, far worse at 1e-3; the paper's 5e-5 recovers too slowly)",
    )
    warmup_ratio: float = option(0.05, "--warmup-ratio", help="warm-up fraction")
    scheduler: str = option(
        "linear",
        "--lr-scheduler",
        choices=LR_SCHEDULERS,
        help="learning rate after the warm-up: linear or cosine decay to zero at the end of the step budget, "
        "or constant (default linear: recovered better than cosine at equal tokens on economics, Skyrim and "
        "the demo)",
    )
    batch_size: int = option(
        2,
        "--train-batch-size",
        positive=True,
        help="windows per step (default 2: at a fixed token budget, more and smaller steps recovered "
        "better than 4 per step on economics, Skyrim and the demo)",
    )
    grad_accum: int = option(1, "--grad-accum", positive=True, help="gradient accumulation steps")
    seq_len: int = option(512, "--finetune-seq-len", positive=True, help="training window length")
    seed: int = reuse(SourceOptions, "seed")
    resume: bool = option(False, "--resume", help="continue from the last checkpoint of an interrupted run")
    lora_r: int = option(16, "--lora-r", help="LoRA rank")
    lora_alpha: int = option(32, "--lora-alpha", help="LoRA alpha")
    distill_alpha: float = option(
        0.25,
        "--distill-alpha",
        help="weight of the KL term (default 0.25: better than 0.5 after 65,536 tokens on the bundled "
        "sample and on Skyrim, measured at 80 %% of SmolLM2)",
    )
    distill_temperature: float = option(2.0, "--distill-temperature", help="distillation temperature")
    teacher: str | None = option(
        None,
        "--teacher",
        help="teacher model for distill (default: the unpruned model; for a model minigpts did not "
        "prune, a frozen copy of itself)",
    )
    teacher_cache: str | None = option(  # teacher top-k cache shared by runs (default: inside the work dir)
        None,
        "--teacher-cache",
        metavar="DIR",
        help="keep the teacher's cached top-k predictions here, so later runs (controls, sweep settings, "
        "resumed runs) reuse them (default: the work directory, deleted after the run)",
    )
    teacher_top_k: int = option(
        64, "--teacher-top-k", positive=True, help="teacher predictions cached per position"
    )
    mixed_precision: str = option(
        "auto",
        "--mixed-precision",
        choices=MIXED_PRECISION,
        help="auto: bf16 autocast (fp32 master weights) where bf16 is native — GPUs that support it, CPUs "
        "with AVX512-BF16/AMX (~1.5× faster steps, the same bits/byte as fp32 in our measurements) — else "
        "fp32; bf16: everywhere (~4.5× slower than fp32 on a CPU that emulates it, e.g. AVX2 only: a "
        "warning says so); no: fp32",
    )

    def budget(self) -> dict[str, Any]:
        """What a same-budget control must reuse."""
        names = ("method", "max_epochs", "max_steps", "max_train_tokens", "max_minutes", "stop_at_base", "lr")
        names += ("seq_len", "batch_size", "grad_accum")
        return {name: getattr(self, name) for name in names}


@dataclass
class CommandOptions:
    """Switches of single subcommands (no stage reads them)."""

    stats: str | None = option(
        None, "--stats", help="statistics file from `minigpts analyze` (needed for structural plans)"
    )
    dry_run: bool = option(False, "--dry-run", help="print the plan, write nothing")
    offload: bool = option(
        False,
        "--offload",
        help="analyse a model larger than memory layer by layer: built empty, then its embedding rows and one "
        "decoder layer at a time are read from the safetensors file(s) and the calibration hidden states "
        "pushed through it; the same statistics as in memory; peak memory ≈ one layer + the hidden states "
        "(+ --moments' (width)² sums per layer: --no-moments to stay small); needs a local directory, GGUF "
        "file or alias, and --taylor-tokens / --depth-tokens 0",
        variants={
            "prune": {
                "help": "prune a model larger than memory: plan from --stats and the shapes alone, then read, "
                "refit, cut and write one decoder layer at a time (output in safetensors shards); the same "
                "model as without it; criteria that read the weights, --allocation error and --sequential read one "
                "layer at a time; hidden channels and depth are refused"
            }
        },
    )
    budget_tokenizer: str | None = option(
        None,
        "--budget-tokenizer",
        metavar="MODEL",
        help="count --max-eval-tokens in this model's tokens, so models with different vocabularies "
        "score the same text (default: the unpruned model named in the model's minigpts.json, "
        "else the model's own)",
    )
    json: str | None = option(None, "--json", help="write the result as JSON to this file")
    gguf: str | None = option(
        None,
        "--gguf",
        metavar="FILE",
        help="also write the final model as one GGUF file for llama.cpp",
        variants={"export": {"required": True, "help": "GGUF file to write"}},
    )
    outtype: str = option(
        "f32",
        "--outtype",
        choices=["f32", "f16", "bf16", "q8_0"],
        help="GGUF weight type: f32 (default, exact), f16, bf16 or q8_0 (8-bit blocks; 1-D tensors stay f32)",
        variants={"run": {"flag": "--gguf-outtype"}},
    )
    config: str | None = option(None, "--config", help="YAML recipe holding any of these options")


@dataclass
class RunOptions(SourceOptions):
    """The whole experiment (`minigpts run`)."""

    finetune: str = (
        option(  # none or a registered recovery method (minigpts.recovery.recovery_method_names())
            "none",
            "--finetune",
            help=_recovery_help("recovery: ", "default"),
            variants={"sweep": {"help": _recovery_help("recovery (default full): ", "no recovery")}},
        )
    )
    controls: bool = option(
        False,
        "--controls",
        help="add the unpruned model fine-tuned with the same budget and a random pruning of the same size",
        variants={"sweep": {"help": "add base-fine-tuned and random-same-size controls"}},
    )
    dry_run: bool = reuse(CommandOptions, "dry_run")
    evaluation: EvalOptions = field(default_factory=EvalOptions)
    analysis: AnalysisOptions = field(default_factory=AnalysisOptions)
    plan: PlanOptions = field(default_factory=PlanOptions)
    recovery: FinetuneOptions = field(default_factory=FinetuneOptions)


@dataclass
class SweepOptions(SourceOptions):
    """The paper's experiment (`minigpts sweep`): domains × settings."""

    data: list[str] = reuse(SourceOptions, "data", convert=_each_data_spec)
    target_params: list[float] = reuse(  # empty: the paper's threshold grid
        PlanOptions, "target_params", default_factory=list, convert=_as_list
    )
    criteria: list[str] = reuse(PlanOptions, "criterion", default_factory=list)  # several: criteria × sizes
    finetune: str = reuse(RunOptions, "finetune", default="full")
    controls: bool = reuse(RunOptions, "controls")
    mcq: list[str] = reuse(EvalOptions, "mcq")  # FILE (every domain) or DOMAIN=FILE
    evaluation: EvalOptions = field(default_factory=EvalOptions)
    analysis: AnalysisOptions = field(default_factory=AnalysisOptions)
    plan: PlanOptions = field(default_factory=PlanOptions)
    recovery: FinetuneOptions = field(default_factory=FinetuneOptions)

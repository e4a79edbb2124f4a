"""Every option is declared once (minigpts.options) and the parsers, recipes and Python API agree."""

from __future__ import annotations

import argparse
import dataclasses
import re
from pathlib import Path

import pytest

import minigpts
from minigpts import options as opts
from minigpts.cli import apply_config_file, build_parser, main
from minigpts.errors import UserError

SRC = Path(minigpts.__file__).parent
CLASSES = [
    opts.SourceOptions,
    opts.EvalOptions,
    opts.AnalysisOptions,
    opts.PlanOptions,
    opts.FinetuneOptions,
    opts.CommandOptions,
    opts.RunOptions,
    opts.SweepOptions,
]


def declared_flags() -> set[str]:
    flags = set()
    for cls in CLASSES:
        for f in dataclasses.fields(cls):
            option = f.metadata.get("option")
            if option is None:
                continue
            flags |= {option.flag} | {v["flag"] for v in option.variants.values() if "flag" in v}
    return flags - {None}


def subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    return dict(parser._subparsers._group_actions[0].choices)  # noqa: SLF001


def test_each_flag_string_occurs_in_exactly_one_declaration():
    sources = {path: path.read_text() for path in SRC.rglob("*.py")}
    flags = declared_flags()
    assert {"--mlp-ratio", "--finetune-seq-len", "--gguf-outtype", "--config"} <= flags
    for flag in sorted(flags):
        where = [
            f"{p.name}:{text.count(f'{flag!r}'.replace(chr(39), chr(34)))}" for p, text in sources.items()
        ]
        hits = {w for w in where if not w.endswith(":0")}
        assert hits == {"options.py:1"}, f"{flag} is spelled out in {sorted(hits)}"
    for path, text in sources.items():  # no parser declares options by hand
        assert not re.search(r"add_argument\(\s*\"--(?!version|debug)", text), path


def test_every_option_of_every_subcommand_is_declared_and_shows_its_default():
    flags = declared_flags()
    for command, parser in subparsers().items():
        text = parser.format_help()
        for action in parser._actions:  # noqa: SLF001
            if not action.option_strings or action.dest == "help":
                continue
            assert set(action.option_strings) & (flags | {f"--no-{f[2:]}" for f in flags}), action
            assert action.option_strings[0] in text
            if action.default is not None and action.default is not False:
                assert "default" in (action.help or ""), f"{command} {action.option_strings[0]}: no default"


@pytest.mark.parametrize(
    "argv, cls",
    [(["run", "--data", "d", "--out", "o"], opts.RunOptions), (["sweep", "--data", "d", "--out", "o"], None)],
)
def test_command_line_defaults_are_the_python_api_defaults(argv, cls):
    args = build_parser().parse_args(argv)
    if cls is None:
        built = opts.from_args(opts.SweepOptions, args, criteria=[])
        assert built == opts.SweepOptions(model=None, data=["d"], out="o")
        return
    built = opts.from_args(cls, args)
    assert built == cls(model=None, data="d", out="o")
    assert dataclasses.asdict(built)["plan"]["target_groups"] == ("mlp", "heads")


def test_recipe_keys_come_from_the_declarations(tmp_path, capsys):
    import yaml

    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"data": "sample", "moments": False, "banana-ratio": 0.5}))
    parser = build_parser()
    with pytest.raises(UserError, match=r"unknown option 'banana-ratio'; valid keys: .*mlp-ratio"):
        apply_config_file(parser, ["sweep", "--config", str(recipe), "--out", "o"])
    assert main(["sweep", "--config", str(recipe), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "valid keys" in err
    recipe.write_text(yaml.safe_dump({"data": "sample", "moments": False, "sequential": True}))
    args = parser.parse_args(apply_config_file(parser, ["sweep", "--config", str(recipe), "--out", "o"]))
    assert args.moments is False and args.sequential is True


def test_positive_options_are_checked_with_their_flag():
    args = build_parser().parse_args(["run", "--data", "d", "--out", "o", "--finetune-seq-len", "0"])
    with pytest.raises(UserError, match=r"^--finetune-seq-len 0: must be a positive integer$"):
        opts.from_args(opts.RunOptions, args)


@pytest.mark.parametrize(
    "extra, round_to",
    [
        ([], 8),
        (["--gguf", "m.gguf"], 8),
        (["--gguf", "m.gguf", "--gguf-outtype", "f16"], 8),
        (["--gguf", "m.gguf", "--gguf-outtype", "q8_0"], 32),
        (["--gguf", "m.gguf", "--gguf-outtype", "q8_0", "--round-to", "8"], 8),
        (["--round-to", "16"], 16),
    ],
)
def test_round_to_is_q8_0s_block_where_run_writes_a_q8_0_gguf(extra, round_to):
    args = build_parser().parse_args(["run", "--data", "d", "--out", "o", *extra])
    assert opts.from_args(opts.RunOptions, args).plan.round_to == round_to
    assert opts.from_args(opts.PlanOptions, build_parser().parse_args(["prune", "--out", "o"])).round_to == 8

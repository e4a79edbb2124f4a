"""Behaviour unchanged: help texts, plans and report metrics of seeded tiny-model runs equal the fixtures.

The fixtures (tests/fixtures/behaviour/) are written by ``python tests/fixtures/record_behaviour.py``;
re-record them only for an intended change of behaviour, and say so in the change.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

FIXTURES = Path(__file__).parent / "fixtures"
_spec = importlib.util.spec_from_file_location("record_behaviour", FIXTURES / "record_behaviour.py")
record_behaviour = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(record_behaviour)


def recorded(name: str):
    return json.loads((FIXTURES / "behaviour" / f"{name}.json").read_text())


def test_help_of_every_subcommand_is_unchanged():
    expected = recorded("help")
    current = record_behaviour.help_texts()
    assert sorted(current) == sorted(expected)
    for command, text in current.items():
        assert text == expected[command], f"`minigpts {command} --help` changed"


@pytest.fixture(scope="module")
def runs():
    return record_behaviour.runs()


RUNS = sorted(p.stem for p in (FIXTURES / "behaviour").glob("*.json") if p.stem != "help")


@pytest.mark.parametrize("name", RUNS)
def test_plans_and_reports_are_unchanged(runs, name):
    expected = recorded(name)
    current = json.loads(json.dumps(runs[name]))  # tuples → lists, as in the file
    for part in expected:
        assert current[part] == expected[part], f"{name}: {part} changed"
    assert sorted(current) == sorted(expected)

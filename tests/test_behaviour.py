"""Behaviour unchanged: help texts, plans and report metrics of seeded tiny-model runs equal the fixtures.

The fixtures (tests/fixtures/behaviour/) are written by ``python tests/fixtures/record_behaviour.py``;
re-record them only for an intended change of behaviour, and say so in the change.
"""

from __future__ import annotations

import importlib.util
import json
import math
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


def differences(current, expected, path: str = "") -> list[str]:
    """Where two recorded results differ; floats are equal within 1e-5 (relative), since another CPU's
    kernels may move a 6-digit rounding by one in the last digit."""
    if isinstance(expected, dict) and isinstance(current, dict):
        keys = sorted(set(current) | set(expected))
        return [d for k in keys for d in differences(current.get(k), expected.get(k), f"{path}/{k}")]
    if isinstance(expected, list) and isinstance(current, list) and len(current) == len(expected):
        return [
            d for i, (c, e) in enumerate(zip(current, expected)) for d in differences(c, e, f"{path}/{i}")
        ]
    floats = all(isinstance(x, float) and not isinstance(x, bool) for x in (current, expected))
    if floats and math.isclose(current, expected, rel_tol=1e-5, abs_tol=1e-9):
        return []
    return [] if current == expected else [f"{path}: {current!r} != {expected!r} (recorded)"]


@pytest.mark.parametrize("name", RUNS)
def test_plans_and_reports_are_unchanged(runs, name):
    expected = recorded(name)
    current = json.loads(json.dumps(runs[name]))  # tuples → lists, as in the file
    changed = differences(current, expected)
    assert not changed, f"{name} changed:\n" + "\n".join(changed[:20])


def test_differences_tolerate_rounding_only():
    assert differences({"a": [1.0, 389.152]}, {"a": [1.0, 389.151]}) == []
    assert differences({"a": 389.2}, {"a": 389.1}) == ["/a: 389.2 != 389.1 (recorded)"]
    assert differences({"a": True}, {"a": False}) and differences({"a": 1}, {"b": 1})
    assert differences({"k": [1, 2]}, {"k": [1, 2, 3]})

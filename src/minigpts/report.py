"""Tables, plots and pages for ``minigpts run`` and ``minigpts sweep``.

Every input is a plain JSON-like object (what ``report.json`` / ``sweep.json`` hold), so a report can
be rebuilt from saved files without a model. Plots go through matplotlib's ``Figure`` with the Agg
canvas: no pyplot state, no display needed. A missing value (None or NaN) prints as an en dash, never
as "nan" or a crash, because partial runs (no MCQ, no controls, no general text) are the common case.
"""

from __future__ import annotations

import base64
import csv
import html
import json
import math
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

DASH = "–"

# Stage order of a `run` report; the table follows it whatever order the dict arrives in.
STAGE_ORDER = (
    "base",
    "pruned",
    "finetuned",
    "control_base_finetuned",
    "control_random_finetuned",
    "control_random",
    "control_general_calibration_finetuned",
    "control_general_calibration",
    "control_general_units_finetuned",
    "control_general_units",
)
STAGE_LABELS = {
    "base": "base",
    "pruned": "pruned",
    "finetuned": "pruned + recovered",
    "control_base_finetuned": "control: base, same fine-tuning",
    "control_random_finetuned": "control: random same size, recovered",
    "control_random": "control: random same size",
    "control_general_calibration_finetuned": "control: calibrated on general text, recovered",
    "control_general_calibration": "control: calibrated on general text",
    "control_general_units_finetuned": "control: units from general text, domain vocabulary, recovered",
    "control_general_units": "control: units from general text, domain vocabulary",
}

# The documented columns of sweep rows, in the order sweep.csv writes them (extra keys follow).
SWEEP_COLUMNS = (
    "model",
    "domain",
    "setting",
    "relative_size",
    "params",
    "size_bytes",
    "ppl_base",
    "ppl_pruned",
    "ppl_recovered",
    "bpb_base",
    "bpb_pruned",
    "bpb_recovered",
    "mcq_base",
    "mcq_pruned",
    "mcq_recovered",
    "epochs",
    "recovery_seconds",
    "control_base_finetuned_bpb",
    "control_random_bpb",
    "criterion",
    "decode_tps_base",
    "decode_tps",
    "control_general_bpb",
    "control_general_params",
    "bpb_val_base",
    "bpb_val",
    "control_general_units_bpb",
)

# The paper's linear/activation thresholds, drawn on the magnitude plot to show what each would cut.
PAPER_THRESHOLDS = (1e-5, 1e-3, 1e-1)

SWEEP_NOTE = (
    "Bits per byte (bpb) on the held-out test split: lower is better, and unlike per-token perplexity it "
    "stays comparable when the vocabulary is trimmed. Relative size = parameters / base parameters. "
    "Δbpb compares the recovered model with the unpruned base. Controls: the unpruned model fine-tuned "
    "with the same budget (base fine-tuned), a random pruning of the same size recovered the same way "
    "(random) and, with --general-data, the same widths chosen from statistics of general text instead "
    "of the domain's, the vocabulary counted on the general text too (general) or, when the vocabulary is "
    "cut, kept as the domain's (general units)."
)

FRONTIER_NOTE = (
    "Frontier: the largest parameter reduction whose final model (recovered, else pruned) has validation "
    "bits/byte ≤ the unpruned base's, chosen on the validation split and then confirmed (or not) on test."
)


# --------------------------------------------------------------------------------------------------
# Formatting helpers


def _is_missing(value: Any) -> bool:
    if value is None:
        return True
    try:
        return math.isnan(float(value))
    except (TypeError, ValueError):
        return False


def _num(value: Any, digits: int) -> str:
    return DASH if _is_missing(value) else f"{float(value):.{digits}f}"


def _accuracy(value: Any) -> str:
    return DASH if _is_missing(value) else f"{100 * float(value):.1f}%"


def _count(n: Any) -> str:
    """Parameter counts the way papers print them (134.52M), exact below a thousand."""
    if _is_missing(n):
        return DASH
    n = float(n)
    for scale, suffix, digits in ((1e9, "B", 2), (1e6, "M", 2), (1e3, "K", 1)):
        if abs(n) >= scale:
            return f"{n / scale:.{digits}f}{suffix}"
    return f"{n:.0f}"


def _ratio(a: Any, b: Any) -> str:
    if _is_missing(a) or _is_missing(b) or float(b) == 0:
        return DASH
    return f"{float(a) / float(b):.2f}"


def _plain(value: Any) -> str:
    """Any JSON value as one short table cell."""
    if isinstance(value, bool):
        return str(value).lower()
    if _is_missing(value):
        return DASH
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (dict, list)):
        return json.dumps(value, separators=(",", ":"), default=str)
    return str(value)


def format_bytes(n: Any) -> str:
    """Bytes as MiB with one decimal ("256.3 MiB"), the unit model sizes are compared in."""
    return DASH if _is_missing(n) else f"{float(n) / 2**20:,.1f} MiB"


def format_seconds(seconds: Any) -> str:
    """A duration in the largest unit that keeps it readable (0.5 s, 42 s, 3.2 min, 1.5 h)."""
    if _is_missing(seconds):
        return DASH
    s = float(seconds)
    if s < 10:
        return f"{s:.1f} s"
    if s < 60:
        return f"{s:.0f} s"
    if s < 3600:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.1f} h"


def pct(a: Any, b: Any) -> str:
    """Relative change of ``a`` against the reference ``b`` as a signed percentage ("-3.2%")."""
    if _is_missing(a) or _is_missing(b) or float(b) == 0:
        return DASH
    return f"{100 * (float(a) / float(b) - 1):+.1f}%"


def _md_cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _md_table(headers: list[str], align: str, rows: list[list[str]]) -> str:
    """A GitHub-flavoured Markdown table; ``align`` holds one 'l' or 'r' per column."""
    lines = [
        "| " + " | ".join(_md_cell(h) for h in headers) + " |",
        "|" + "|".join(":---" if a == "l" else "---:" for a in align) + "|",
    ]
    lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _html_table(headers: list[str], align: str, rows: list[list[str]]) -> str:
    def cells(tag: str, values: list[str]) -> str:
        return "".join(
            f'<{tag} class="{"num" if a == "r" else "txt"}">{html.escape(str(v))}</{tag}>'
            for v, a in zip(values, align)
        )

    body = "\n".join(f"<tr>{cells('td', row)}</tr>" for row in rows)
    return f"<table>\n<thead><tr>{cells('th', headers)}</tr></thead>\n<tbody>\n{body}\n</tbody>\n</table>"


# --------------------------------------------------------------------------------------------------
# One `minigpts run`


def _ordered_stages(stages: Mapping[str, dict]) -> list[tuple[str, dict]]:
    known = [(name, stages[name]) for name in STAGE_ORDER if name in stages]
    return known + [(name, stage) for name, stage in stages.items() if name not in STAGE_ORDER]


def _finetune_budget(finetune: Mapping | None) -> str:
    if not finetune:
        return DASH
    parts = [
        str(finetune.get("method") or DASH),
        f"{_num(finetune.get('epochs'), 2)} ep",
        f"{_plain(finetune.get('steps'))} steps",
        f"{_count(finetune.get('train_tokens'))} tok",
        format_seconds(finetune.get("seconds")),
    ]
    if finetune.get("stopped_because"):
        parts.append(f"stopped: {finetune['stopped_because']}")
    return " · ".join(parts)


def _keys_in_order(collections: Iterable[Iterable[str]]) -> list[str]:
    """Every key of ``collections`` once, in the order first seen (table columns)."""
    return list(dict.fromkeys(key for keys in collections for key in keys))


def _mcq_stems(stages: list[tuple[str, dict]]) -> list[str]:
    return _keys_in_order(stage.get("mcq") or {} for _, stage in stages)


def _run_columns(report: Mapping) -> list[tuple[str, str, Callable[[str, dict], str]]]:
    """(header, alignment, cell function) for each column the report has data for."""
    stages = _ordered_stages(report.get("stages") or {})
    base = (report.get("stages") or {}).get("base") or {}
    base_general = base.get("general") or {}

    def bold(text: str) -> str:
        return text if text == DASH else f"**{text}**"

    columns: list[tuple[str, str, Callable[[str, dict], str]]] = [
        ("stage", "l", lambda name, s: STAGE_LABELS.get(name, name)),
        ("params", "r", lambda name, s: _count(s.get("params"))),
        ("relative size", "r", lambda name, s: _ratio(s.get("params"), base.get("params"))),
        (
            "non-emb params (rel.)",
            "r",
            lambda name, s: (
                f"{_count(s.get('params_non_embedding'))} "
                f"({_ratio(s.get('params_non_embedding'), base.get('params_non_embedding'))})"
            ),
        ),
        ("size on disk", "r", lambda name, s: format_bytes(s.get("size_bytes"))),
        ("perplexity", "r", lambda name, s: _num(s.get("perplexity"), 2)),
        ("**bits/byte**", "r", lambda name, s: bold(_num(s.get("bits_per_byte"), 4))),
        ("Δbpb vs base", "r", lambda name, s: pct(s.get("bits_per_byte"), base.get("bits_per_byte"))),
    ]
    if any(not _is_missing(s.get("vocab_size")) for _, s in stages):
        columns.append(("vocab", "r", lambda name, s: _plain(s.get("vocab_size"))))
    if any(s.get("general") for _, s in stages):

        def general(name: str, s: dict) -> str:
            bpb = (s.get("general") or {}).get("bits_per_byte")
            if _is_missing(bpb):
                return DASH
            return f"{_num(bpb, 4)} ({pct(bpb, base_general.get('bits_per_byte'))})"

        columns.append(("general bpb (Δ)", "r", general))
    for stem in _mcq_stems(stages):

        def mcq(name: str, s: dict, stem: str = stem) -> str:
            result = (s.get("mcq") or {}).get(stem)
            if not result:
                return DASH
            return f"{_accuracy(result.get('accuracy'))} (norm {_accuracy(result.get('accuracy_norm'))})"

        columns.append((f"MCQ {stem}", "r", mcq))
    if any(s.get("finetune") for _, s in stages):
        columns.append(("fine-tune budget", "l", lambda name, s: _finetune_budget(s.get("finetune"))))
    return columns


def run_table_markdown(report: Mapping) -> str:
    """The stage table of one `run` report (base, pruned, recovered, controls) as Markdown."""
    stages = _ordered_stages(report.get("stages") or {})
    if not stages:
        raise ValueError("run report has no stages to tabulate")
    columns = _run_columns(report)
    rows = [[cell(name, stage) for _, _, cell in columns] for name, stage in stages]
    return _md_table([h for h, _, _ in columns], "".join(a for _, a, _ in columns), rows)


def _protocol_line(report: Mapping) -> str:
    stages = _ordered_stages(report.get("stages") or {})
    first = stages[0][1] if stages else {}
    scored = ""
    if not _is_missing(first.get("eval_bytes")):
        scored = (
            f"; {stages[0][0]} scored {_plain(first.get('eval_tokens'))} tokens over "
            f"{_plain(first.get('eval_bytes'))} UTF-8 bytes"
        )
    return (
        f"**Protocol.** Held-out split `{report.get('split', DASH)}`, sequence length "
        f"{_plain(report.get('seq_len'))}: {report.get('protocol') or DASH}{scored}."
    )


def _mcq_note(report: Mapping) -> str | None:
    stages = _ordered_stages(report.get("stages") or {})
    notes = []
    for stem in _mcq_stems(stages):
        result = next((s["mcq"][stem] for _, s in stages if stem in (s.get("mcq") or {})), {})
        notes.append(
            f"{stem}: chance {_accuracy(result.get('chance'))} over {_plain(result.get('questions'))} questions"
        )
    if not notes:
        return None
    return "MCQ cells: accuracy (length-normalised accuracy); " + "; ".join(notes) + "."


def _share(value: Any) -> str:
    return DASH if _is_missing(value) else f"{100 * float(value):.1f} %"


def _target_line(summary: Mapping) -> str | None:
    """What the user asked of the whole model (vocabulary included) and what the plan reaches.

    ``target["target_params"]`` is the structural part only: with a vocabulary cut, ``build_plan``
    raises it by what the vocabulary saves, so it must not be shown as the request.
    """
    target = summary.get("target")
    if not isinstance(target, Mapping):
        return None
    requested = target.get("requested", target.get("target_params"))
    achieved = target.get("achieved_with_vocab")
    before, with_vocab = summary.get("params_before"), summary.get("params_after_with_vocab")
    if _is_missing(achieved) and not _is_missing(before) and not _is_missing(with_vocab) and float(before):
        achieved = float(with_vocab) / float(before)
    if _is_missing(achieved):
        achieved = target.get("achieved")
    how = (
        f"one common removal ratio ({_num(target['common_ratio'], 4)})"
        if "common_ratio" in target
        else "least output error per parameter"
    )
    groups = ", ".join(target.get("groups") or []) or DASH
    line = (
        f"- target: {_share(requested)} of all parameters (vocabulary included) → {_share(achieved)} achieved; "
        f"the structure ({groups}, by {how}) was sized to {_share(target.get('target_params'))} "
        f"and reached {_share(target.get('achieved'))}"
    )
    if not _is_missing(with_vocab):
        line += ", the vocabulary cut saving the rest"
    return line


def _layer_label(first: int, last: int) -> str:
    return str(first) if first == last else f"{first}–{last}"


def collapse_rows(rows: list[list[str]]) -> list[list[str]]:
    """Runs of identical per-layer rows as one row labelled "first–last" (rows are [label, cells...])."""
    runs: list[tuple[int, int, list[str]]] = []
    for i, row in enumerate(rows):
        if runs and runs[-1][2] == row[1:] and runs[-1][1] == i - 1:
            runs[-1] = (runs[-1][0], i, runs[-1][2])
        else:
            runs.append((i, i, row[1:]))
    return [[_layer_label(a, b), *cells] for a, b, cells in runs]


DISTRIBUTION_GROUPS = {"mlp": "MLP channels", "heads": "attention heads", "hidden": "hidden channels"}
DISTRIBUTION_COLUMNS = ("min", "p1", "p5", "p25", "p50", "p75", "p95", "p99", "max")


def _distribution_markdown(distribution: Mapping) -> str:
    groups = distribution.get("groups") or {}
    rows = [
        [
            DISTRIBUTION_GROUPS.get(group, group),
            _plain(row.get("units")),
            *(_g(row.get(c)) for c in DISTRIBUTION_COLUMNS),
        ]
        for group, row in groups.items()
        if row.get("units")
    ]
    headers = ["group", "units", *(c if c in ("min", "max") else f"{c[1:]}%" for c in DISTRIBUTION_COLUMNS)]
    return (
        f"Scores per unit ({distribution.get('criterion', DASH)}; a threshold removes the units at or below it):\n\n"
        + _md_table(headers, "l" + "r" * (len(headers) - 1), rows)
    )


def _g(value: Any) -> str:
    return DASH if _is_missing(value) else f"{float(value):.4g}"


def _plan_markdown(summary: Mapping) -> str:
    """Scalars as a list; lists of dicts (per-layer widths) as tables, so any plan summary renders."""
    lines = ["## Pruning plan", ""]
    before, after = summary.get("params_before"), summary.get("params_after")
    with_vocab = summary.get("params_after_with_vocab")
    if not _is_missing(before) and not _is_missing(with_vocab):
        lines.append(
            f"- parameters: {_plain(before)} → {_plain(with_vocab)} ({_ratio(with_vocab, before)} of the base, "
            f"vocabulary included; the structural cut alone keeps {_plain(after)}, {_ratio(after, before)}, "
            "and the figures below are its own)"
        )
    elif not _is_missing(before) and not _is_missing(after):
        lines.append(
            f"- parameters: {_plain(before)} → {_plain(after)} ({_ratio(after, before)} of the base)"
        )
    target = _target_line(summary)
    if target:
        lines.append(target)
    size_before, size_after = summary.get("size_bytes_before"), summary.get("size_bytes_after")
    if not _is_missing(size_before) and not _is_missing(size_after):
        dtype = f" ({summary['dtype']})" if summary.get("dtype") else ""
        lines.append(f"- expected size{dtype}: {format_bytes(size_before)} → {format_bytes(size_after)}")
    lines += [
        f"- {note}" if str(note).startswith("warning:") else f"- note: {note}"
        for note in summary.get("notes") or []
    ]
    shown = {
        "params_before",
        "params_after",
        "params_after_with_vocab",
        "target",
        "size_bytes_before",
        "size_bytes_after",
        "dtype",
        "notes",
        "score_distribution",
    }
    tables = []
    for key, value in summary.items():
        if key in shown:
            continue
        if isinstance(value, list) and value and all(isinstance(v, Mapping) for v in value):
            tables.append((key, value))
        else:
            lines.append(f"- {key.replace('_', ' ')}: {_plain(value)}")
    for key, items in tables:
        keys = _keys_in_order(items)
        rows = collapse_rows([[str(i), *(_plain(item.get(k)) for k in keys)] for i, item in enumerate(items)])
        lines += [
            "",
            f"{key.replace('_', ' ')} (per layer; identical neighbouring layers in one row):",
            "",
            _md_table(["layer", *keys], "r" * (len(keys) + 1), rows),
        ]
    if isinstance(summary.get("score_distribution"), Mapping):
        lines += ["", _distribution_markdown(summary["score_distribution"])]
    return "\n".join(lines)


def run_report_markdown(report: Mapping) -> str:
    """The whole report.md: title, stage table, protocol, vocabulary, timings and plan summary."""
    parts = [
        f"# minigpts run: {report.get('model', DASH)} on {report.get('data', DASH)}",
        run_table_markdown(report),
        _protocol_line(report),
    ]
    mcq_note = _mcq_note(report)
    if mcq_note:
        parts.append(mcq_note)
    vocab = report.get("vocab") or {}
    if not _is_missing(vocab.get("before")) and not _is_missing(vocab.get("after")):
        parts.append(
            f"**Vocabulary.** {_plain(vocab['before'])} → {_plain(vocab['after'])} tokens "
            f"({_ratio(vocab['after'], vocab['before'])} kept)."
        )
    timings = report.get("timings") or {}
    if timings:
        parts.append(
            "**Time per stage.** "
            + " · ".join(f"{name} {format_seconds(seconds)}" for name, seconds in timings.items())
        )
    if report.get("plan_summary"):
        parts.append(_plan_markdown(report["plan_summary"]))
    figures = report.get("figures") or {}
    if figures:
        parts.append("## Plots")
        parts += [f"![{RUN_FIGURES.get(key, key)}]({name})" for key, name in figures.items()]
    return "\n\n".join(parts) + "\n"


def write_run_report(report: Mapping, out_dir: str | Path) -> dict[str, Path]:
    """Write report.md for one `run` into ``out_dir``; returns {"markdown": path}.

    It links the plots named in ``report["figures"]`` ({key: file name}, from ``write_run_plots``).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "report.md"
    path.write_text(run_report_markdown(report), encoding="utf-8")
    return {"markdown": path}


# --------------------------------------------------------------------------------------------------
# A sweep: table, CSV, JSON


def _several_models(rows: list[Mapping]) -> bool:
    return len({row.get("model") for row in rows}) > 1


def _several_criteria(rows: list[Mapping]) -> bool:
    return len({row.get("criterion") for row in rows if row.get("criterion")}) > 1


def _series_label(row: Mapping, several_models: bool, several_criteria: bool = False) -> str:
    """One line per plotted series: the domain, with the model and the criterion when they vary."""
    label = str(row.get("domain", DASH))
    if several_models:
        label = f"{row.get('model')} · {label}"
    return f"{label} · {row.get('criterion')}" if several_criteria else label


def _arrow(row: Mapping, prefix: str, fmt: Callable[[Any], str]) -> str:
    return " → ".join(fmt(row.get(f"{prefix}_{stage}")) for stage in ("base", "pruned", "recovered"))


def _controls_cell(row: Mapping) -> str:
    return (
        f"base ft {_num(row.get('control_base_finetuned_bpb'), 4)} · "
        f"random {_num(row.get('control_random_bpb'), 4)}"
        + (
            ""
            if _is_missing(row.get("control_general_bpb"))
            else f" · general {_num(row.get('control_general_bpb'), 4)}"
        )
        + (
            ""
            if _is_missing(row.get("control_general_units_bpb"))
            else f" · general units {_num(row.get('control_general_units_bpb'), 4)}"
        )
    )


def _recovery_cell(row: Mapping) -> str:
    return f"{_num(row.get('epochs'), 2)} ep / {format_seconds(row.get('recovery_seconds'))}"


def sweep_table(rows: list[Mapping]) -> tuple[list[str], str, list[list[str]]]:
    """(headers, alignment, cells) of the paper-like sweep table; shared by sweep.md and report.html."""
    columns: list[tuple[str, str, Callable[[Mapping], str]]] = [
        ("model", "l", lambda r: str(r.get("model", DASH))),
        ("domain", "l", lambda r: str(r.get("domain", DASH))),
        ("setting", "l", lambda r: str(r.get("setting", DASH))),
        ("relative size", "r", lambda r: _num(r.get("relative_size"), 2)),
        ("params", "r", lambda r: DASH if _is_missing(r.get("params")) else f"{r['params'] / 1e6:.2f}M"),
        ("perplexity base → pruned → recovered", "r", lambda r: _arrow(r, "ppl", lambda v: _num(v, 2))),
        ("bits/byte base → pruned → recovered", "r", lambda r: _arrow(r, "bpb", lambda v: _num(v, 4))),
        ("Δbpb recovered vs base", "r", lambda r: pct(r.get("bpb_recovered"), r.get("bpb_base"))),
    ]
    if any(not _is_missing(r.get(f"mcq_{s}")) for r in rows for s in ("base", "pruned", "recovered")):
        columns.append(("MCQ base → pruned → recovered", "r", lambda r: _arrow(r, "mcq", _accuracy)))
    if any(
        not _is_missing(r.get(k))
        for r in rows
        for k in ("control_base_finetuned_bpb", "control_random_bpb", "control_general_bpb")
    ):
        columns.append(("controls bpb", "r", _controls_cell))
    if any(not _is_missing(r.get("decode_tps")) for r in rows):
        columns.append(
            (
                "decode tok/s base → pruned",
                "r",
                lambda r: f"{_num(r.get('decode_tps_base'), 1)} → {_num(r.get('decode_tps'), 1)}",
            )
        )
    columns.append(("epochs / time to recover", "r", _recovery_cell))
    cells = [[cell(row) for _, _, cell in columns] for row in rows]
    return [h for h, _, _ in columns], "".join(a for _, a, _ in columns), cells


def _jsonable(value: Any) -> Any:
    """Plain JSON types: arrays become lists, numpy scalars Python numbers, NaN becomes null."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if hasattr(value, "tolist"):  # numpy arrays and scalars, torch tensors
        return _jsonable(value.tolist())
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _csv_value(value: Any) -> Any:
    if _is_missing(value):
        return ""
    if isinstance(value, (dict, list)):
        return json.dumps(_jsonable(value), separators=(",", ":"))
    return value


def _write_csv(rows: list[Mapping], path: Path) -> None:
    columns = _keys_in_order([SWEEP_COLUMNS, *rows])
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _csv_value(row.get(k)) for k in columns})


def read_sweep_inputs(directory: str | Path) -> dict[str, Any]:
    """The keyword arguments of a written sweep report, so ``write_sweep_report(**inputs, out_dir=...)``
    rebuilds it from files alone (sweep.json, plus sweep_figures.json when plots had data)."""
    directory = Path(directory)
    inputs = json.loads((directory / "sweep.json").read_text(encoding="utf-8"))
    inputs.pop("frontier", None)  # derived from the rows; write_sweep_report recomputes it
    figures = directory / "sweep_figures.json"
    if figures.exists():
        inputs.update(json.loads(figures.read_text(encoding="utf-8")))
    return inputs


# --------------------------------------------------------------------------------------------------
# Plots (matplotlib Figure + Agg canvas, PNG)


def _colors(labels: list[str]) -> dict[str, Any]:
    """One colour per domain, the same in every plot."""
    import matplotlib

    palette = matplotlib.colormaps["tab10"].colors
    ordered = list(dict.fromkeys(labels))
    return {label: palette[i % len(palette)] for i, label in enumerate(ordered)}


def _figure():
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.5, 4.8), dpi=110, layout="constrained")
    return fig, fig.add_subplot()


def plot_neuron_magnitudes(magnitudes: Mapping[str, Any], path: str | Path, colors=None) -> Path:
    """The paper's neuron-magnitude figure: per domain, every MLP channel's mean |activation| sorted
    descending (log y), with the paper's thresholds drawn so one sees how much each would prune."""
    import numpy as np

    colors = colors or _colors(list(magnitudes))
    fig, ax = _figure()
    for domain, values in magnitudes.items():
        v = np.asarray(values, dtype=float).ravel()
        v = np.sort(v[np.isfinite(v)])[::-1]
        if v.size == 0:
            continue
        zeros = int((v <= 0).sum())
        label = f"{domain} ({zeros:,} channels at 0)" if zeros else domain
        ax.plot(
            np.arange(1, v.size + 1), np.where(v > 0, v, np.nan), color=colors[domain], lw=1.5, label=label
        )
    for eps in PAPER_THRESHOLDS:
        ax.axhline(eps, color="0.55", ls=":", lw=0.9)
        ax.text(
            0.995,
            eps,
            f"ε = {eps:g}",
            transform=ax.get_yaxis_transform(),
            ha="right",
            va="bottom",
            fontsize=7,
            color="0.35",
        )
    ax.set_yscale("log")
    ax.set_xlabel("MLP channel rank (all layers, sorted by magnitude)")
    ax.set_ylabel("mean |activation| per token")
    ax.set_title("Neuron magnitudes per domain")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.savefig(path)
    return Path(path)


def plot_token_frequencies(token_frequencies: Mapping[str, Any], path: str | Path, colors=None) -> Path:
    """Rank-frequency curves (log-log) of each domain's token counts; the legend gives the share of
    the vocabulary the domain never uses, i.e. what embedding pruning at ε = 0 removes."""
    import numpy as np

    colors = colors or _colors(list(token_frequencies))
    fig, ax = _figure()
    for domain, values in token_frequencies.items():
        counts = np.asarray(values, dtype=float).ravel()
        total = counts.sum()
        if counts.size == 0 or total <= 0:
            continue
        freq = np.sort(counts[counts > 0])[::-1] / total
        unseen = float((counts <= 0).mean())
        label = f"{domain}: {unseen:.1%} of {counts.size:,} tokens never seen"
        ax.loglog(np.arange(1, freq.size + 1), freq, color=colors[domain], lw=1.5, label=label)
    ax.set_xlabel("token rank")
    ax.set_ylabel("normalized frequency")
    ax.set_title("Token frequencies per domain")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.savefig(path)
    return Path(path)


def sweep_frontier(rows: list[Mapping]) -> list[dict[str, Any]]:
    """Per model, domain and criterion: the setting with the smallest relative size whose final model
    has validation bits/byte ≤ the base's (``found``), with its test bits/byte and whether test agrees;
    when none reaches the base, ``found`` is False and the setting is the closest on validation."""
    groups: dict[tuple, list[Mapping]] = {}
    for row in rows:
        groups.setdefault((row.get("model"), row.get("domain"), row.get("criterion")), []).append(row)
    frontier = []
    for (model, domain, criterion), group in groups.items():
        entry: dict[str, Any] = {"model": model, "domain": domain, "criterion": criterion, "found": False}
        usable = [
            r
            for r in group
            if not any(_is_missing(r.get(k)) for k in ("bpb_val", "bpb_val_base", "relative_size"))
        ]
        if not usable:
            frontier.append({**entry, "setting": None, "note": "no validation bits/byte in these rows"})
            continue
        reaching = [r for r in usable if float(r["bpb_val"]) <= float(r["bpb_val_base"])]
        if reaching:
            best = min(reaching, key=lambda r: (float(r["relative_size"]), float(r["bpb_val"])))
        else:
            best = min(usable, key=lambda r: float(r["bpb_val"]) - float(r["bpb_val_base"]))
        test = best.get("bpb_recovered")
        if _is_missing(test):
            test = best.get("bpb_pruned")
        base_test = best.get("bpb_base")
        confirmed = None
        if not _is_missing(test) and not _is_missing(base_test):
            confirmed = float(test) <= float(base_test)
        frontier.append(
            {
                **entry,
                "found": bool(reaching),
                "setting": best.get("setting"),
                "relative_size": float(best["relative_size"]),
                "parameter_reduction": 1.0 - float(best["relative_size"]),
                "params": best.get("params"),
                "bpb_val": float(best["bpb_val"]),
                "bpb_val_base": float(best["bpb_val_base"]),
                "bpb_test": None if _is_missing(test) else float(test),
                "bpb_test_base": None if _is_missing(base_test) else float(base_test),
                "confirmed_on_test": confirmed,
            }
        )
    return frontier


def frontier_lines(frontier: list[Mapping]) -> list[str]:
    """One sentence per frontier entry, for sweep.md and the console."""
    several_models = len({f.get("model") for f in frontier}) > 1
    several_criteria = len({f.get("criterion") for f in frontier}) > 1
    lines = []
    for f in frontier:
        who = f"{f.get('model')} · " if several_models else ""
        who += str(f.get("domain"))
        if several_criteria:
            who += f" ({f.get('criterion')})"
        if f.get("setting") is None:
            lines.append(f"frontier {who}: none ({f.get('note', 'no data')})")
            continue
        if f["found"]:
            verdict = {True: "confirmed", False: "not confirmed", None: "no test number"}[
                f["confirmed_on_test"]
            ]
            lines.append(
                f"frontier {who}: {f['setting']}: {f['parameter_reduction']:.1%} fewer parameters "
                f"(relative size {f['relative_size']:.3f}), validation bits/byte {f['bpb_val']:.4f} ≤ base "
                f"{f['bpb_val_base']:.4f}; test {_num(f['bpb_test'], 4)} vs base {_num(f['bpb_test_base'], 4)} "
                f"({verdict} on test)"
            )
        else:
            lines.append(
                f"frontier {who}: none reaches the base's validation bits/byte {f['bpb_val_base']:.4f}; closest: "
                f"{f['setting']} (relative size {f['relative_size']:.3f}) at {f['bpb_val']:.4f} "
                f"({pct(f['bpb_val'], f['bpb_val_base'])}), test {_num(f['bpb_test'], 4)} vs base "
                f"{_num(f['bpb_test_base'], 4)}"
            )
    return lines


def _points(rows: list[Mapping], x_key: str | None, y_key: str) -> tuple[list[float], list[float]]:
    """(x, y) pairs with both present, sorted by x; ``x_key`` None pins x to 1 (the unpruned size)."""
    pairs = sorted(
        (1.0 if x_key is None else float(row[x_key]), float(row[y_key]))
        for row in rows
        if not _is_missing(row.get(y_key)) and (x_key is None or not _is_missing(row.get(x_key)))
    )
    return [x for x, _ in pairs], [y for _, y in pairs]


# (legend key, x column (None: the base's size, 1), y column, format, style) of each marker of a domain
_SIZE_SERIES = (
    ("recovered", "relative_size", "bpb_recovered", "-o", {"lw": 1.8, "ms": 5}),
    ("pruned", "relative_size", "bpb_pruned", "--", {"marker": ".", "lw": 1.2}),
    ("base", None, "bpb_base", "o", {"mfc": "white", "ms": 7, "mew": 1.5}),
    ("random", "relative_size", "control_random_bpb", "x", {"ms": 9, "mew": 2}),
    ("base_ft", None, "control_base_finetuned_bpb", "*", {"ms": 13, "mec": "black", "mew": 0.6}),
    ("general", "relative_size", "control_general_bpb", "s", {"mfc": "none", "ms": 8, "mew": 1.5}),
    (
        "general_units",
        "relative_size",
        "control_general_units_bpb",
        "D",
        {"mfc": "none", "ms": 7, "mew": 1.5},
    ),
)
# legend key -> the style legend's entry (drawn in grey)
_SIZE_STYLES = {
    "recovered": {"ls": "-", "marker": "o", "label": "pruned + recovered"},
    "pruned": {"ls": "--", "marker": ".", "label": "pruned, no recovery"},
    "base": {"ls": ":", "marker": "o", "mfc": "white", "label": "unpruned base"},
    "random": {"ls": "", "marker": "x", "mew": 2, "label": "random same size, recovered"},
    "base_ft": {"ls": "", "marker": "*", "ms": 11, "label": "base fine-tuned, same budget"},
    "general": {"ls": "", "marker": "s", "mfc": "none", "label": "same widths, calibrated on general text"},
    "general_units": {
        "ls": "",
        "marker": "D",
        "mfc": "none",
        "label": "units from general text, domain vocabulary",
    },
    "frontier": {
        "ls": "",
        "marker": "o",
        "mfc": "none",
        "ms": 12,
        "mew": 2,
        "label": "frontier (≤ base on validation)",
    },
}


def plot_size_vs_bpb(rows: list[Mapping], path: str | Path, colors=None) -> Path:
    """Relative size vs held-out bits-per-byte per domain: recovered (solid), pruned without recovery
    (dashed), the base (dotted line and a marker at x = 1), controls as × (random same size) and ★
    (base fine-tuned with the same budget)."""
    from matplotlib.lines import Line2D

    several, criteria = _several_models(rows), _several_criteria(rows)
    groups: dict[str, list[Mapping]] = {}
    for row in rows:  # one line per domain (and per model, per criterion when they vary)
        groups.setdefault(_series_label(row, several, criteria), []).append(row)
    colors = colors or _colors(list(groups))
    fig, ax = _figure()
    drawn: set[str] = set()
    ys: list[float] = []
    for label, group in groups.items():
        ys += _plot_size_group(ax, group, colors[label], drawn)
    positive = [y for y in ys if y > 0]
    if positive and max(positive) / min(positive) > 3:
        ax.set_yscale("log")  # an unrecovered pruning can sit far above; keep the recovered curves readable
    ax.set_xlim(right=max(1.04, ax.get_xlim()[1]))
    ax.set_xlabel("relative size (parameters / base parameters)")
    ax.set_ylabel("bits per byte, held-out (lower is better)")
    ax.set_title("Size vs bits-per-byte")
    ax.grid(alpha=0.3)
    domain_handles = [Line2D([], [], color=colors[label], lw=2, label=label) for label in groups]
    ax.add_artist(ax.legend(handles=domain_handles, fontsize=8, loc="upper left"))
    styles = {key: Line2D([], [], color="0.2", **style) for key, style in _SIZE_STYLES.items()}
    fig.legend(
        handles=[h for k, h in styles.items() if k in drawn], loc="outside lower center", ncol=3, fontsize=8
    )
    fig.savefig(path)
    return Path(path)


def _plot_size_group(ax, group: list[Mapping], color, drawn: set[str]) -> list[float]:
    """Draw one domain's series and frontier points (noting their legend keys in ``drawn``); its y values."""
    ys: list[float] = []
    for key, x_key, y_key, fmt, style in _SIZE_SERIES:
        x, y = _points(group, x_key, y_key)
        ys += y
        if x:
            if key == "base":  # a dotted line at the base's value, one marker at x = 1
                ax.axhline(y[0], color=color, ls=":", lw=1.1)
                x, y = [1.0], y[:1]
            ax.plot(x, y, fmt, color=color, **style)
            drawn.add(key)
    for point in sweep_frontier(group):
        if point["found"] and not _is_missing(point.get("bpb_test")):
            ax.plot([point["relative_size"]], [point["bpb_test"]], "o", color=color, mfc="none", ms=17, mew=2)
            ax.annotate(
                f"frontier {point['relative_size']:.2f}×",
                (point["relative_size"], point["bpb_test"]),
                textcoords="offset points",
                xytext=(8, 10),
                fontsize=8,
                color=color,
            )
            drawn.add("frontier")
    return ys


# --------------------------------------------------------------------------------------------------
# The plots of one `run`

# key -> caption; the file of each is f"{key}.png"
RUN_FIGURES = {
    "layer_widths": "Kept width per layer (fraction of each group kept)",
    "neuron_magnitudes": "Sorted mean absolute activation of the MLP channels, with the paper's thresholds",
    "token_frequencies": "Token rank-frequency over the calibration windows",
    "bpb_per_stage": "Held-out bits-per-byte per stage",
    "size_vs_bpb": "Relative size vs held-out bits-per-byte",
}


def plot_layer_widths(layers: list[Mapping], path: str | Path) -> Path:
    """Per decoder layer, the fraction of MLP channels, query heads and KV heads the plan keeps."""
    fig, ax = _figure()
    x = list(range(len(layers)))
    for key, label, style in (
        ("mlp", "MLP channels", "-o"),
        ("heads", "query heads", "-s"),
        ("kv_heads", "KV heads", "--^"),
    ):
        if not all(not _is_missing(layer.get(key)) and layer.get(f"{key}_before") for layer in layers):
            continue
        kept = [float(layer[key]) / float(layer[f"{key}_before"]) for layer in layers]
        ax.plot(x, kept, style, lw=1.5, ms=4, label=label)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("fraction kept")
    ax.set_title("Kept width per layer")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.savefig(path)
    return Path(path)


def plot_stage_bpb(stages: Mapping[str, Mapping], path: str | Path) -> Path:
    """Held-out bits-per-byte of every stage (and on the general text when measured), as bars."""
    import numpy as np

    ordered = [(name, s) for name, s in _ordered_stages(stages) if not _is_missing(s.get("bits_per_byte"))]
    labels = [STAGE_LABELS.get(name, name) for name, _ in ordered]
    domain = [float(s["bits_per_byte"]) for _, s in ordered]
    general = [(s.get("general") or {}).get("bits_per_byte") for _, s in ordered]
    has_general = any(not _is_missing(g) for g in general)
    fig, ax = _figure()
    y = np.arange(len(ordered))
    height = 0.4 if has_general else 0.6
    bars = ax.barh(y - (height / 2 if has_general else 0), domain, height, label="domain (test split)")
    ax.bar_label(bars, fmt="%.4f", fontsize=7, padding=2)
    if has_general:
        values = [float("nan") if _is_missing(g) else float(g) for g in general]
        bars = ax.barh(y + height / 2, values, height, label="general text")
        ax.bar_label(bars, fmt="%.4f", fontsize=7, padding=2)
    ax.set_yticks(y, labels)
    ax.invert_yaxis()
    ax.set_xlabel("bits per byte, held-out (lower is better)")
    ax.set_title("Bits-per-byte per stage")
    ax.set_xlim(right=ax.get_xlim()[1] * 1.12)  # room for the value labels
    ax.grid(alpha=0.3, axis="x")
    fig.legend(loc="outside lower center", ncol=2, fontsize=8)
    fig.savefig(path)
    return Path(path)


def run_size_row(report: Mapping) -> dict[str, Any]:
    """One sweep-style row (``plot_size_vs_bpb``'s input) from a `run` report's stages."""
    stages = report.get("stages") or {}
    base, pruned = stages.get("base") or {}, stages.get("pruned") or {}
    final = stages.get("finetuned") or {}
    control_random = stages.get("control_random_finetuned") or stages.get("control_random") or {}
    relative = None
    if not _is_missing(pruned.get("params")) and base.get("params"):
        relative = float(pruned["params"]) / float(base["params"])
    return {
        "domain": _short_label(report.get("data")),
        "relative_size": relative,
        "bpb_base": base.get("bits_per_byte"),
        "bpb_pruned": pruned.get("bits_per_byte"),
        "bpb_recovered": final.get("bits_per_byte"),
        "control_base_finetuned_bpb": (stages.get("control_base_finetuned") or {}).get("bits_per_byte"),
        "control_random_bpb": control_random.get("bits_per_byte"),
        "control_general_bpb": (
            stages.get("control_general_calibration_finetuned")
            or stages.get("control_general_calibration")
            or {}
        ).get("bits_per_byte"),
        "control_general_units_bpb": (
            stages.get("control_general_units_finetuned") or stages.get("control_general_units") or {}
        ).get("bits_per_byte"),
    }


def _short_label(data: Any) -> str:
    text = str(data if data is not None else "domain")
    name = Path(text).name or text
    return name if len(name) <= 40 else name[:39] + "…"


def write_run_plots(
    report: Mapping,
    out_dir: str | Path,
    *,
    magnitudes: Any = None,
    token_counts: Any = None,
) -> dict[str, str]:
    """The PNG plots of one `run` that its data allow, in ``out_dir``: {key of RUN_FIGURES: file name}.

    ``magnitudes``: every MLP channel's mean |activation| (the statistics' ``mlp_l1``, concatenated);
    ``token_counts``: the calibration token counts. A plot that fails is skipped with a log line, so
    a finished run always gets its report.
    """
    import logging

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    label = _short_label(report.get("data"))
    stages = report.get("stages") or {}
    layers = (report.get("plan_summary") or {}).get("layers") or []
    row = run_size_row(report)
    makers: dict[str, Callable[[Path], Any]] = {}
    if layers:
        makers["layer_widths"] = lambda path: plot_layer_widths(layers, path)
    if magnitudes is not None and len(magnitudes):
        makers["neuron_magnitudes"] = lambda path: plot_neuron_magnitudes({label: magnitudes}, path)
    if token_counts is not None and len(token_counts):
        makers["token_frequencies"] = lambda path: plot_token_frequencies({label: token_counts}, path)
    if any(not _is_missing(s.get("bits_per_byte")) for s in stages.values()):
        makers["bpb_per_stage"] = lambda path: plot_stage_bpb(stages, path)
    if not _is_missing(row["relative_size"]) and not _is_missing(row["bpb_base"]):
        makers["size_vs_bpb"] = lambda path: plot_size_vs_bpb([row], path)
    written: dict[str, str] = {}
    for key, make in makers.items():
        path = out / f"{key}.png"
        try:
            make(path)
        except Exception as err:  # a plot must not cost the report of a finished run
            logging.getLogger(__name__).warning("plot %s skipped: %s", path.name, err)
            continue
        written[key] = path.name
    return written


# --------------------------------------------------------------------------------------------------
# The sweep report


def _html_page(title: str, notes: list[str], table: str, images: list[tuple[str, Path]]) -> str:
    figures = "\n".join(
        f'<figure><img alt="{html.escape(caption)}" src="data:image/png;base64,'
        f'{base64.b64encode(path.read_bytes()).decode("ascii")}"><figcaption>{html.escape(caption)}'
        "</figcaption></figure>"
        for caption, path in images
    )
    paragraphs = "\n".join(f"<p>{html.escape(note)}</p>" for note in notes)
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{html.escape(title)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }}
table {{ border-collapse: collapse; font-size: 0.9em; margin: 1em 0; }}
th, td {{ border-bottom: 1px solid #ddd; padding: 0.3em 0.6em; }}
th {{ background: #f4f4f4; }}
td.num, th.num {{ text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }}
td.txt, th.txt {{ text-align: left; }}
figure {{ margin: 1.5em 0; }}
img {{ max-width: 100%; }}
figcaption {{ color: #555; font-size: 0.9em; }}
</style>
</head>
<body>
<h1>{html.escape(title)}</h1>
{paragraphs}
{table}
{figures}
</body>
</html>
"""


def _sweep_plots(
    rows, out: Path, magnitudes, token_frequencies, colors, paths: dict
) -> list[tuple[str, Path]]:
    """Draw the sweep's PNGs into ``out`` (their paths added to ``paths``); (caption, path) of each."""
    images: list[tuple[str, Path]] = []
    if magnitudes:
        paths["neuron_magnitudes"] = plot_neuron_magnitudes(magnitudes, out / "neuron_magnitudes.png", colors)
        images.append(
            ("Sorted mean absolute activation of MLP channels per domain", paths["neuron_magnitudes"])
        )
    if token_frequencies:
        paths["token_frequencies"] = plot_token_frequencies(
            token_frequencies, out / "token_frequencies.png", colors
        )
        images.append(("Token rank-frequency per domain", paths["token_frequencies"]))
    paths["size_vs_bpb"] = plot_size_vs_bpb(rows, out / "size_vs_bpb.png", colors)
    images.append(("Relative size vs held-out bits-per-byte", paths["size_vs_bpb"]))
    return images


def write_sweep_report(
    rows: list[Mapping],
    out_dir: str | Path,
    *,
    magnitudes: Mapping[str, Any] | None = None,
    token_frequencies: Mapping[str, Any] | None = None,
    title: str = "minigpts sweep",
    protocol: str | None = None,
) -> dict[str, Path]:
    """Write sweep.md, sweep.csv, sweep.json, the PNG plots and a self-contained report.html.

    Returns paths under the keys markdown, csv, json, html, size_vs_bpb, and, when their data were
    given, neuron_magnitudes, token_frequencies and figures_json (sweep_figures.json, their data, so
    ``read_sweep_inputs`` can rebuild everything). NaN in rows is written to JSON as null.
    """
    if not rows:
        raise ValueError("sweep report needs at least one row")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = [dict(row) for row in rows]
    labels = [_series_label(row, _several_models(rows), _several_criteria(rows)) for row in rows]
    colors = _colors(labels + list(magnitudes or {}) + list(token_frequencies or {}))
    paths: dict[str, Path] = {}
    images = _sweep_plots(rows, out, magnitudes, token_frequencies, colors, paths)

    headers, align, cells = sweep_table(rows)
    notes = [SWEEP_NOTE] + ([f"Protocol: {protocol}"] if protocol else [])
    frontier = sweep_frontier(rows)
    markdown = [f"# {title}", *notes, _md_table(headers, align, cells)]
    markdown += ["## Frontier", FRONTIER_NOTE, "\n".join(f"- {line}" for line in frontier_lines(frontier))]
    markdown += [f"![{caption}]({path.name})" for caption, path in images]
    paths["markdown"] = out / "sweep.md"
    paths["markdown"].write_text("\n\n".join(markdown) + "\n", encoding="utf-8")

    paths["csv"] = out / "sweep.csv"
    _write_csv(rows, paths["csv"])
    paths["json"] = out / "sweep.json"
    saved = {"title": title, "protocol": protocol, "rows": _jsonable(rows), "frontier": _jsonable(frontier)}
    paths["json"].write_text(json.dumps(saved, indent=1, allow_nan=False) + "\n", encoding="utf-8")
    if magnitudes or token_frequencies:
        paths["figures_json"] = out / "sweep_figures.json"
        figures = {"magnitudes": _jsonable(magnitudes), "token_frequencies": _jsonable(token_frequencies)}
        paths["figures_json"].write_text(json.dumps(figures, allow_nan=False), encoding="utf-8")

    paths["html"] = out / "report.html"
    page = _html_page(title, notes, _html_table(headers, align, cells), images)
    paths["html"].write_text(page, encoding="utf-8")
    return paths

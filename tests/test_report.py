"""Reports from plain data: every file is written and valid, tables hold the numbers they were given."""

from __future__ import annotations

import base64
import csv
import json
import math
import re

import numpy as np
import pytest

from minigpts.report import (
    DASH,
    SWEEP_COLUMNS,
    format_bytes,
    format_seconds,
    pct,
    read_sweep_inputs,
    run_report_markdown,
    run_table_markdown,
    write_run_report,
    write_sweep_report,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def table_rows(markdown: str) -> list[list[str]]:
    """Cells of the first Markdown table's body rows (header and separator dropped)."""
    lines = markdown.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    block = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        block.append([cell.strip() for cell in line.strip("|").split(" | ")])
    return block[2:]


def table_header(markdown: str) -> list[str]:
    line = next(line for line in markdown.splitlines() if line.startswith("|"))
    return [cell.strip() for cell in line.strip("|").split(" | ")]


def assert_png(path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    assert len(data) > 5_000  # a real plot, not an empty canvas
    import matplotlib.image

    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 200
    assert image[..., :3].std() > 0.01  # something was drawn


# --------------------------------------------------------------------------------------------------
# Sweep


def sweep_rows() -> list[dict]:
    rows = []
    for d, domain in enumerate(["economics", "medical"]):
        base_bpb = 1.1 + 0.1 * d
        for s, size in enumerate([0.9, 0.7, 0.5]):
            rows.append(
                {
                    "model": "tiny-llama",
                    "domain": domain,
                    "setting": f"target={size}",
                    "relative_size": size,
                    "params": int(1_000_000 * size),
                    "size_bytes": int(4_000_000 * size),
                    "ppl_base": 20.0 + d,
                    "ppl_pruned": 30.0 + 10 * s,
                    "ppl_recovered": 19.5 + s,
                    "bpb_base": base_bpb,
                    "bpb_pruned": base_bpb + 0.5 * (s + 1),
                    "bpb_recovered": base_bpb + 0.01 * s + 0.00006,
                    "mcq_base": 0.5,
                    "mcq_pruned": 0.3 + 0.05 * s,
                    "mcq_recovered": 0.45,
                    "epochs": 1.0 + s,
                    "recovery_seconds": 30.0 + 60 * s,
                    "control_base_finetuned_bpb": base_bpb - 0.02,
                    "control_random_bpb": base_bpb + 0.3,
                }
            )
    return rows


def figure_data() -> tuple[dict, dict]:
    rng = np.random.default_rng(0)
    magnitudes = {
        "economics": np.concatenate([rng.lognormal(-3, 1.5, 500), np.zeros(7)]),
        "medical": rng.lognormal(-2.5, 1.2, 507).tolist(),
    }
    counts = {
        "economics": np.where(rng.random(400) < 0.3, 0, rng.zipf(1.5, 400)),
        "medical": np.where(rng.random(400) < 0.5, 0, rng.zipf(1.3, 400)).tolist(),
    }
    return magnitudes, counts


def test_sweep_report_writes_every_file_with_the_numbers(tmp_path):
    rows = sweep_rows()
    magnitudes, counts = figure_data()
    paths = write_sweep_report(
        rows,
        tmp_path,
        magnitudes=magnitudes,
        token_frequencies=counts,
        title="test sweep",
        protocol="window 64",
    )
    for key in ("markdown", "csv", "json", "html", "neuron_magnitudes", "token_frequencies", "size_vs_bpb"):
        assert paths[key].exists() and paths[key].parent == tmp_path, key
    for key in ("neuron_magnitudes", "token_frequencies", "size_vs_bpb"):
        assert_png(paths[key])

    with paths["csv"].open(newline="") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == SWEEP_COLUMNS
        csv_rows = list(reader)
    assert len(csv_rows) == len(rows)
    assert paths["csv"].read_text().count("\n") == len(rows) + 1
    for got, row in zip(csv_rows, rows):
        assert got["domain"] == row["domain"] and got["setting"] == row["setting"]
        assert float(got["bpb_recovered"]) == pytest.approx(row["bpb_recovered"])

    saved = json.loads(paths["json"].read_text())
    assert saved["rows"] == rows
    assert saved["title"] == "test sweep"

    markdown = paths["markdown"].read_text()
    assert markdown.startswith("# test sweep")
    body = table_rows(markdown)
    assert len(body) == len(rows)
    assert all(len(r) == len(table_header(markdown)) for r in body)
    first = rows[0]
    bpb_cell = f"{first['bpb_base']:.4f} → {first['bpb_pruned']:.4f} → {first['bpb_recovered']:.4f}"
    assert bpb_cell in body[0]
    assert "1.1001" in bpb_cell  # the recovered value, rounded to four places
    assert "50.0% → 30.0% → 45.0%" in body[0]
    assert "window 64" in markdown
    for name in ("neuron_magnitudes.png", "token_frequencies.png", "size_vs_bpb.png"):
        assert f"]({name})" in markdown

    page = paths["html"].read_text()
    images = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(images) == 3
    assert all(base64.b64decode(image)[:8] == PNG_SIGNATURE for image in images)
    assert page.count("<tr>") == len(rows) + 1
    assert "<h1>test sweep</h1>" in page and bpb_cell in page


def test_sweep_report_rebuilds_from_its_own_files(tmp_path):
    magnitudes, counts = figure_data()
    first = write_sweep_report(sweep_rows(), tmp_path / "a", magnitudes=magnitudes, token_frequencies=counts)
    inputs = read_sweep_inputs(tmp_path / "a")
    second = write_sweep_report(**inputs, out_dir=tmp_path / "b")
    for key in ("markdown", "csv", "json", "html"):
        assert first[key].read_text() == second[key].read_text(), key
    assert second["neuron_magnitudes"].exists() and second["token_frequencies"].exists()


def test_sweep_report_renders_missing_values_as_dash(tmp_path):
    rows = sweep_rows()[:2]
    rows[0].update(mcq_base=None, mcq_pruned=None, mcq_recovered=None, control_random_bpb=None)
    rows[0]["ppl_pruned"] = float("nan")
    del rows[0]["control_base_finetuned_bpb"]
    paths = write_sweep_report(rows, tmp_path)

    assert "neuron_magnitudes" not in paths and "token_frequencies" not in paths
    assert not (tmp_path / "neuron_magnitudes.png").exists()
    assert_png(paths["size_vs_bpb"])
    page = paths["html"].read_text()
    assert page.count("data:image/png;base64,") == 1

    header = table_header(paths["markdown"].read_text())
    row = dict(zip(header, table_rows(paths["markdown"].read_text())[0]))
    assert row["MCQ base → pruned → recovered"] == f"{DASH} → {DASH} → {DASH}"
    assert row["perplexity base → pruned → recovered"].split(" → ")[1] == DASH
    assert row["controls bpb"] == f"base ft {DASH} · random {DASH}"
    assert "nan" not in paths["markdown"].read_text().lower()

    with paths["csv"].open(newline="") as f:
        got = next(csv.DictReader(f))
    assert got["mcq_base"] == "" and got["ppl_pruned"] == "" and got["control_base_finetuned_bpb"] == ""
    saved = json.loads(paths["json"].read_text())  # strict JSON: NaN is written as null
    assert saved["rows"][0]["ppl_pruned"] is None


def test_sweep_table_drops_columns_no_row_has(tmp_path):
    rows = sweep_rows()[:3]
    for row in rows:
        for key in (
            "mcq_base",
            "mcq_pruned",
            "mcq_recovered",
            "control_base_finetuned_bpb",
            "control_random_bpb",
        ):
            row[key] = None
    header = table_header(write_sweep_report(rows, tmp_path)["markdown"].read_text())
    assert "MCQ base → pruned → recovered" not in header and "controls bpb" not in header
    assert header[:4] == ["model", "domain", "setting", "relative size"]


# --------------------------------------------------------------------------------------------------
# One run


def stage(params: int, bpb: float, **extra) -> dict:
    return {
        "params": params,
        "params_non_embedding": params - 200_000,
        "size_bytes": params * 4,
        "perplexity": 2**bpb * 3,
        "bits_per_byte": bpb,
        "eval_tokens": 10_000,
        "eval_bytes": 41_000,
        **extra,
    }


FINETUNE = {
    "method": "full",
    "epochs": 1.0,
    "steps": 120,
    "train_tokens": 61_440,
    "seconds": 192.0,
    "stopped_because": "stop_at_ppl",
}


def run_report(stage_names) -> dict:
    mcq = {"econ": {"accuracy": 0.5, "accuracy_norm": 0.55, "questions": 40, "chance": 0.25}}
    all_stages = {
        # deliberately not in stage order: the table must reorder
        "control_random_finetuned": stage(600_000, 1.3, finetune=FINETUNE),
        "pruned": stage(600_000, 1.25, general={"perplexity": 40.0, "bits_per_byte": 1.6}, mcq=mcq),
        "base": stage(1_000_000, 1.0, general={"perplexity": 30.0, "bits_per_byte": 1.2}, mcq=mcq),
        "finetuned": stage(600_000, 0.95, finetune=FINETUNE, mcq=mcq),
        "control_base_finetuned": stage(1_000_000, 0.9, finetune=FINETUNE),
    }
    return {
        "model": "tiny-llama",
        "data": "economics.jsonl",
        "protocol": "non-overlapping windows of 64 tokens",
        "seq_len": 64,
        "split": "test",
        "stages": {name: all_stages[name] for name in all_stages if name in stage_names},
        "plan_summary": {
            "params_before": 1_000_000,
            "params_after": 600_000,
            "layers": [{"mlp": 128, "heads": 4, "kv_heads": 2}, {"mlp": 96, "heads": 2, "kv_heads": 1}],
        },
        "vocab": {"before": 1000, "after": 640},
        "timings": {"analyze": 12.0, "prune": 0.5, "finetune": 192.0},
    }


def run_cells(markdown: str) -> list[dict[str, str]]:
    header = table_header(markdown)
    return [dict(zip(header, row)) for row in table_rows(markdown)]


def test_run_report_with_every_stage(tmp_path):
    report = run_report(["base", "pruned", "finetuned", "control_base_finetuned", "control_random_finetuned"])
    paths = write_run_report(report, tmp_path)
    markdown = paths["markdown"].read_text()
    assert markdown == run_report_markdown(report)
    assert run_table_markdown(report) in markdown

    rows = run_cells(markdown)
    assert [r["stage"] for r in rows] == [
        "base",
        "pruned",
        "pruned + recovered",
        "control: base, same fine-tuning",
        "control: random same size, recovered",
    ]
    base, pruned, recovered, control_base, control_random = rows
    assert base["relative size"] == "1.00" and pruned["relative size"] == "0.60"
    assert base["**bits/byte**"] == "**1.0000**" and pruned["**bits/byte**"] == "**1.2500**"
    assert base["Δbpb vs base"] == "+0.0%"
    assert pruned["Δbpb vs base"] == "+25.0%"
    assert recovered["Δbpb vs base"] == "-5.0%"
    assert control_base["Δbpb vs base"] == "-10.0%"
    assert pruned["size on disk"] == format_bytes(2_400_000)
    assert pruned["general bpb (Δ)"] == "1.6000 (+33.3%)"
    assert recovered["general bpb (Δ)"] == DASH  # this stage was not evaluated on general text
    assert base["MCQ econ"] == "50.0% (norm 55.0%)" and control_base["MCQ econ"] == DASH
    assert base["fine-tune budget"] == DASH
    assert recovered["fine-tune budget"].startswith("full · 1.00 ep · 120 steps")
    assert "stopped: stop_at_ppl" in recovered["fine-tune budget"]

    assert "split `test`" in markdown and "non-overlapping windows of 64 tokens" in markdown
    assert "chance 25.0% over 40 questions" in markdown
    assert "1,000 → 640 tokens" in markdown
    assert "1,000,000 → 600,000 (0.60 of the base)" in markdown
    plan_rows = table_rows(markdown.split("## Pruning plan")[1])
    assert plan_rows == [["0", "128", "4", "2"], ["1", "96", "2", "1"]]
    assert "finetune 3.2 min" in markdown


def test_plan_section_leads_with_the_whole_model_when_the_vocabulary_is_cut():
    """A structural summary alone would claim 0.60 of the base while the model holds 0.45 of it."""
    report = run_report(["base", "pruned"])
    report["plan_summary"]["params_after_with_vocab"] = 450_000
    section = run_report_markdown(report).split("## Pruning plan")[1]
    assert "1,000,000 → 450,000 (0.45 of the base, vocabulary included" in section
    assert "the structural cut alone keeps 600,000, 0.60" in section
    assert "params after with vocab" not in section  # shown once, in the headline


def test_run_report_with_base_and_pruned_only(tmp_path):
    report = run_report(["base", "pruned"])
    del report["stages"]["base"]["mcq"]
    del report["stages"]["pruned"]["general"]
    del report["plan_summary"], report["vocab"], report["timings"]
    markdown = write_run_report(report, tmp_path)["markdown"].read_text()

    rows = run_cells(markdown)
    assert [r["stage"] for r in rows] == ["base", "pruned"]
    assert rows[0]["relative size"] == "1.00"
    assert rows[1]["Δbpb vs base"] == "+25.0%"
    assert rows[1]["general bpb (Δ)"] == DASH
    assert rows[0]["MCQ econ"] == DASH
    assert "fine-tune budget" not in rows[0]  # no stage was fine-tuned
    assert "Pruning plan" not in markdown and "Vocabulary" not in markdown


def test_run_report_without_base_cannot_compare():
    report = run_report(["pruned", "finetuned"])
    rows = run_cells(run_table_markdown(report))
    assert [r["relative size"] for r in rows] == [DASH, DASH]
    assert [r["Δbpb vs base"] for r in rows] == [DASH, DASH]


def test_run_table_escapes_pipes_and_rejects_empty_reports():
    report = run_report(["base"])
    report["stages"] = {"odd|name": report["stages"]["base"]}
    assert "odd\\|name" in run_table_markdown(report)
    with pytest.raises(ValueError):
        run_table_markdown({"stages": {}})


# --------------------------------------------------------------------------------------------------
# Helpers


def test_format_helpers():
    assert pct(1.25, 1.0) == "+25.0%"
    assert pct(0.95, 1.0) == "-5.0%"
    assert pct(1.0, 0) == DASH and pct(None, 1.0) == DASH and pct(1.0, math.nan) == DASH
    assert format_bytes(3 * 2**20) == "3.0 MiB"
    assert format_bytes(None) == DASH and format_bytes(float("nan")) == DASH
    assert (
        format_seconds(0.5) == "0.5 s"
        and format_seconds(42) == "42 s"
        and format_seconds(192) == "3.2 min"
        and format_seconds(5400) == "1.5 h"
    )

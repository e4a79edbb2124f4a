"""How the units' scores are spread, and whether a threshold flag cuts anything at all.

The paper's thresholds (``--activation-threshold 1e-3``, ``--linear-threshold 1e-3``) are absolute
values of a score whose scale depends on the model, the corpus and the criterion: on SmolLM2 they
remove nothing, on another model they may remove nearly everything. ``score_distribution`` gives per
group (MLP channels, attention heads, hidden channels) the minimum, the 1/5/25/50/75/95/99 %
quantiles and the maximum of the scores, which ``analyze`` and ``--dry-run`` print, and
``threshold_warnings`` says when a threshold removes nothing or almost everything, with the flags
and the threshold that would cut a useful amount instead.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from minigpts.options import PlanOptions, flag_of


def _flag(name: str) -> str:
    return flag_of(PlanOptions, name)


QUANTILES = (0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99)
COLUMNS = ("min", *(f"p{round(q * 100)}" for q in QUANTILES), "max")
GROUP_NAMES = {"mlp": "MLP channels", "heads": "attention heads", "hidden": "hidden channels"}
THRESHOLD_FLAGS = {
    "mlp": _flag("activation_threshold"),
    "heads": _flag("linear_threshold"),
    "hidden": _flag("linear_threshold"),
}
RATIO_FLAGS = {"mlp": _flag("mlp_ratio"), "heads": _flag("head_ratio"), "hidden": _flag("hidden_ratio")}
PAPER_THRESHOLDS = (1e-5, 1e-3, 1e-1)
ALMOST_ALL = 0.95  # a threshold removing at least this share of a group is warned about
SUGGESTED_REMOVAL = 0.25  # the quantile a warning offers as a threshold


def group_values(scores) -> dict[str, Any]:
    """{group: 1-D float64 numpy array of every unit's score} from a ``criteria.UnitScores``."""
    import numpy as np

    def flat(tensors) -> np.ndarray:
        arrays = [t.detach().to("cpu").double().numpy().ravel() for t in tensors]
        return np.concatenate(arrays) if arrays else np.zeros(0)

    return {"mlp": flat(scores.mlp), "heads": flat(scores.heads), "hidden": flat([scores.hidden])}


def describe_values(values) -> dict[str, float]:
    """{"units", "min", "p1", "p5", "p25", "p50", "p75", "p95", "p99", "max"} of a score array."""
    import numpy as np

    values = np.asarray(values, dtype=float).ravel()
    values = values[np.isfinite(values)]
    if values.size == 0:
        return {"units": 0}
    quantiles = np.quantile(values, QUANTILES)
    row = {"units": int(values.size), "min": float(values.min())}
    row.update({name: float(q) for name, q in zip(COLUMNS[1:-1], quantiles, strict=True)})
    row["max"] = float(values.max())
    return row


def score_distribution(scores) -> dict[str, dict[str, float]]:
    """Per group (mlp, heads, hidden), the distribution of a ``UnitScores``' scores (``describe_values``)."""
    return {group: describe_values(values) for group, values in group_values(scores).items()}


def share_at_or_below(values, threshold: float) -> float:
    """The fraction of ``values`` that a threshold removes (score <= threshold)."""
    import numpy as np

    values = np.asarray(values, dtype=float).ravel()
    return float((values <= threshold).mean()) if values.size else 0.0


def planned_removal(summary: Mapping[str, Any]) -> dict[str, float]:
    """The fraction of each group a plan removes, from its summary (after rounding to legal widths)."""
    layers = summary.get("layers") or []
    removal = {}
    for group, key in (("mlp", "mlp"), ("heads", "heads")):
        before = sum(layer.get(f"{key}_before", 0) for layer in layers)
        if before:
            removal[group] = 1 - sum(layer[key] for layer in layers) / before
    if summary.get("hidden_before"):
        removal["hidden"] = 1 - summary["hidden_after"] / summary["hidden_before"]
    return removal


def _g(value: float) -> str:
    return f"{value:.4g}"


def threshold_warnings(
    scores,
    summary: Mapping[str, Any],
    *,
    activation_threshold: float | None = None,
    linear_threshold: float | None = None,
    criterion: str = "l1",
    groups: tuple[str, ...] = ("mlp", "heads", "hidden"),
) -> list[str]:
    """One line per group whose threshold flag removes nothing or at least ``ALMOST_ALL`` of it.

    ``scores`` is the plan's ``UnitScores``; ``summary`` its summary (what was really removed, after
    rounding); ``groups`` the groups the family lets a threshold prune. Each line starts with
    "warning:" and suggests the ratio flags and the threshold at the 25 % quantile.
    """
    values = group_values(scores)
    removed = planned_removal(summary)
    thresholds = {"mlp": activation_threshold, "heads": linear_threshold, "hidden": linear_threshold}
    warnings = []
    for group in groups:
        threshold = thresholds[group]
        if threshold is None or group not in removed or values[group].size == 0:
            continue
        name, flag = GROUP_NAMES[group], THRESHOLD_FLAGS[group]
        share, planned = share_at_or_below(values[group], threshold), removed[group]
        spread = describe_values(values[group])
        if planned > 0 and max(share, planned) < ALMOST_ALL:
            continue
        if planned <= 0:
            if share == 0:
                what = (
                    f"{flag} {threshold:g} removes no {name}: every {criterion} score is above it "
                    f"(min {_g(spread['min'])}, median {_g(spread['p50'])}, max {_g(spread['max'])})"
                )
            else:
                what = (
                    f"{flag} {threshold:g} removes no {name}: only {share:.2%} of them score at or below it, "
                    f"too few for a smaller legal width (min {_g(spread['min'])}, median {_g(spread['p50'])})"
                )
        else:
            what = (
                f"{flag} {threshold:g} removes {planned:.1%} of the {name} ({share:.1%} score at or below it; "
                f"median {_g(spread['p50'])}, max {_g(spread['max'])})"
            )
        quantile = spread[f"p{round(SUGGESTED_REMOVAL * 100)}"]
        warnings.append(
            f"warning: {what}. The paper's thresholds assume its models' scale: size the cut with "
            f"{RATIO_FLAGS[group]} R or --target-params F, or use a threshold from this distribution, e.g. "
            f"{flag} {_g(quantile)} (the {SUGGESTED_REMOVAL:.0%} quantile) removes about "
            f"{SUGGESTED_REMOVAL:.0%} of the {name}"
        )
    return warnings


def paper_threshold_shares(scores) -> dict[str, dict[float, float]]:
    """{group: {paper threshold: share of the group's scores at or below it}}."""
    return {
        group: {eps: share_at_or_below(values, eps) for eps in PAPER_THRESHOLDS}
        for group, values in group_values(scores).items()
        if values.size
    }


def describe_distribution(distribution: Mapping[str, Mapping[str, float]], criterion: str):
    """A rich Table of ``score_distribution``: one row per group, min / quantiles / max."""
    from rich.table import Table

    table = Table(title=f"{criterion} scores per unit (min / quantiles / max)", caption_justify="left")
    table.add_column("group", no_wrap=True)
    table.add_column("units", justify="right")
    for column in COLUMNS:
        table.add_column(column if column in ("min", "max") else f"{column[1:]}%", justify="right")
    for group, row in distribution.items():
        if not row.get("units"):
            continue
        table.add_row(
            GROUP_NAMES.get(group, group), f"{row['units']:,}", *(f"{row[column]:.3g}" for column in COLUMNS)
        )
    return table

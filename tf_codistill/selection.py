"""Choosing a study's grid points on the validation split, and saying where
the choice is not to be trusted.

A study whose dataset holds out a validation split (`mnist1d_fresh`, the text
datasets) sets `select` to one of `SELECT`:

* `val_accuracy`: the highest mean final validation accuracy over seeds;
* `val_updates_to_target`: the fewest updates to `target_accuracy` on
  validation (every seed must reach it; then the fewest mean updates; then
  the higher final validation accuracy), the measure of a batch-size study
  (Shallue et al. 2019).

The test split plays no part in either; `check` refuses to choose on test
where validation exists. A point with a failed or diverged seed is never
chosen. Where a chosen point lies on the edge of its grid (the smallest or
largest value of a swept flag), the optimum may lie outside it: the report
flags it and names the next value to run, so the grid can be extended until
the best point is interior.

Pure Python on the rows of the study's CSVs (`tf_codistill.study` passes its
indexed data); nothing here loads TensorFlow.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from tf_codistill import stats

__all__ = [
    "SELECT",
    "VALIDATION_DATASETS",
    "check",
    "curve_split",
    "has_validation_split",
    "updates_to_target",
    "choose",
    "edges",
    "fit_critical_batch",
    "knee",
    "report_lines",
]

SELECT = ("val_accuracy", "val_updates_to_target")
#: Datasets whose curves' `val_accuracy` is a validation split's (not test).
VALIDATION_DATASETS = ("mnist1d_fresh", "tiny_shakespeare")
# Doubling the batch is "no longer worth it" where it saves less than a
# third of the updates (perfect scaling saves half).
KNEE_RATIO = 1.5


def check(path: str, study: dict) -> None:
    """Fills in and checks `select`: a validation criterion where the dataset
    has a validation split (the default there), never the test set.

    Raises:
        ValueError: a validation criterion without a validation split, or a
            test criterion with one, or `val_updates_to_target` without a target.
    """
    dataset = study.get("common", {}).get("dataset")
    has_validation = has_validation_split(study)
    select = study.setdefault("select", "val_accuracy" if has_validation else "test_accuracy")
    if select in SELECT and not has_validation:
        raise ValueError(
            f"{path}: select = {select!r} needs a validation split: a dataset with one "
            f"({', '.join(VALIDATION_DATASETS)}) or validation_fraction > 0 in [common]; got {dataset!r}."
        )
    if has_validation and select == "test_accuracy":
        raise ValueError(
            f"{path}: {dataset} has a validation split: choose grid points on it "
            f"(select = one of {list(SELECT)}), not on the test set."
        )
    if select == "val_updates_to_target" and study.get("target_accuracy") is None:
        raise ValueError(f'{path}: select = "val_updates_to_target" needs `target_accuracy`.')
    flag = study.get("common", {}).get("target_accuracy")
    if flag is not None and flag != study.get("target_accuracy"):
        raise ValueError(
            f"{path}: [common] target_accuracy = {flag!r} (where train.py stops) differs from the study's "
            f"target_accuracy = {study.get('target_accuracy')!r} (what the report measures); make them equal."
        )


def curve_split(study: dict) -> str:
    """Which split a study's curves (`val_accuracy`) were measured on."""
    return "validation" if has_validation_split(study) else "test"


def has_validation_split(study: dict) -> bool:
    """Whether the study's runs evaluate on a validation split during
    training (their curves' `val_accuracy`): a dataset with one, or a TFDS
    dataset with `validation_fraction` held out of its training split."""
    common = study.get("common", {})
    return common.get("dataset") in VALIDATION_DATASETS or bool(common.get("validation_fraction", 0))


def updates_to_target(accuracy: Sequence[float], updates: Sequence[int], target: float) -> int | None:
    """The updates at the first evaluation whose accuracy is at or above
    `target` (None if none is): `accuracy[i]` was measured after `updates[i]`."""
    if len(accuracy) != len(updates):
        raise ValueError(f"{len(accuracy)} accuracies but {len(updates)} update counts.")
    for value, count in zip(accuracy, updates):
        if value is not None and math.isfinite(value) and value >= target:
            return int(count)
    return None


def _final_val(data, label: str, seed: int) -> float | None:
    rows = data.curves.get((label, seed), [])
    return rows[-1]["val_accuracy"] if rows else None


def _point_key(data, label: str) -> tuple:
    """Sort key of one grid point (larger is better)."""
    runs = data.runs.get(label, [])
    ok = [r for r in runs if r["status"] == "ok"]
    finals = [_final_val(data, label, r["seed"]) for r in ok]
    if not runs or len(ok) < len(runs) or any(v is None or not math.isfinite(v) for v in finals):
        return (-math.inf,)  # a failed, diverged or curveless seed disqualifies the point
    final = math.fsum(finals) / len(finals)
    if data.study["select"] == "val_accuracy":
        return (final,)
    target = data.study["target_accuracy"]
    reached = [u for u in (data.updates_to(label, r["seed"], target) for r in ok) if u is not None]
    mean_updates = math.fsum(reached) / len(reached) if reached else math.inf
    return (len(reached) / len(ok), -mean_updates, final)


def choose(data, labels: list[str]) -> str:
    """The best of a base arm's grid points, on validation (the first of equals)."""
    return max(labels, key=lambda label: _point_key(data, label))


def _numeric(values) -> bool:
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)


def edges(data) -> list[str]:
    """One sentence per grid flag whose chosen value is the smallest or largest
    swept, with the next value to run (the grid's outer step repeated)."""
    notes = []
    for base, labels in data.points.items():
        if len(labels) < 2:
            continue
        chosen = data.by_label[data.chosen[base]]["_point"]
        for key, value in chosen.items():
            values = sorted({data.by_label[label]["_point"][key] for label in labels})
            if len(values) < 2 or not _numeric(values):
                continue
            if value == values[0]:
                side, step = "smallest", values[0] / values[1] if values[1] else None
            elif value == values[-1]:
                side, step = "largest", values[-1] / values[-2] if values[-2] else None
            else:
                continue
            nxt = f"; run --{key}={value * step:g} next" if step and math.isfinite(step) else ""
            notes.append(
                f"EDGE: `{base}` chose --{key}={value:g}, the {side} of its grid "
                f"({', '.join(f'{v:g}' for v in values)}): the optimum may lie beyond it{nxt}."
            )
    return notes


def fit_critical_batch(points: Sequence[tuple[float, float]]) -> tuple[float, float] | None:
    """McCandlish et al. (2018): updates S(b) = S_min (1 + B_noise / b).
    Least squares of S on 1/b over `points` (b, S); returns (S_min, B_noise),
    or None with fewer than two points or a fit without positive S_min."""
    points = [(b, s) for b, s in points if s is not None and math.isfinite(s)]
    if len(points) < 2:
        return None
    xs = [1.0 / b for b, _ in points]
    ys = [s for _, s in points]
    mx, my = math.fsum(xs) / len(xs), math.fsum(ys) / len(ys)
    sxx = math.fsum((x - mx) ** 2 for x in xs)
    if sxx == 0:
        return None
    slope = math.fsum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    intercept = my - slope * mx
    if intercept <= 0:
        return None
    return intercept, slope / intercept


def knee(points: Sequence[tuple[float, float]]) -> float | None:
    """The smallest b whose doubling (the next point, at 2b) saves less than a
    third of the updates: S(b) / S(2b) < KNEE_RATIO. None where every doubling
    still pays (or the points skip a doubling)."""
    got = dict((b, s) for b, s in points if s is not None and math.isfinite(s))
    for b in sorted(got):
        if 2 * b in got and got[b] / got[2 * b] < KNEE_RATIO:
            return b
    return None


def report_lines(data, effective: Callable[[str, str], object]) -> list[str]:
    """The validation-selection section of a study's report: every grid point
    (validation figures that chose it, test beside it for reference), the
    edge flags, and for a target study the critical batch of its sync arms.
    `effective(label, flag)` is a run's value of a train.py flag."""
    study = data.study
    if study.get("select") not in SELECT:
        return []
    target = study.get("target_accuracy")
    what = (
        "highest mean final validation accuracy"
        if study["select"] == "val_accuracy"
        else f"fewest updates to {100 * target:g}% validation accuracy (every seed must reach it), then "
        "the higher final validation accuracy"
    )
    lines = [
        f"Grid points are chosen on the validation split ({what}); the test split is only reported.",
        "",
        "| arm | point | final val accuracy % | updates to target (val) | test accuracy % | failed | chosen |",
        "|---|---|---|---|---|---|---|",
    ]
    for base, labels in data.points.items():
        for label in labels:
            runs = data.runs.get(label, [])
            ok = [r for r in runs if r["status"] == "ok"]
            finals = [v for v in (_final_val(data, label, r["seed"]) for r in ok) if v is not None]
            acc = "-"
            if finals:
                mean, se = stats.mean_se([100 * v for v in finals])
                acc = f"{mean:.2f} ± {se:.2f}"
            reach = "-"
            if target is not None:
                got = [u for u in (data.updates_to(label, r["seed"], target) for r in ok) if u is not None]
                reach = f"{len(got)}/{len(ok)} seeds"
                if got:
                    mean, se = stats.mean_se(got)
                    reach = f"{mean:,.0f} ± {se:,.0f} ({reach})"
            tests = [r["test_accuracy"] for r in ok if r.get("test_accuracy") is not None]
            test = "-"
            if tests:
                mean, se = stats.mean_se([100 * v for v in tests])
                test = f"{mean:.2f} ± {se:.2f}"
            point = " ".join(
                f"--{k}={v:g}" if _numeric([v]) else f"--{k}={v}"
                for k, v in data.by_label[label]["_point"].items()
            )
            lines.append(
                f"| {base} | `{point or '-'}` | {acc} | {reach} | {test} | {len(runs) - len(ok)} | "
                f"{'yes' if data.chosen[base] == label else ''} |"
            )
    lines.append("")
    flags = edges(data)
    lines += (flags or ["Every chosen grid point is interior (no flag at the edge of its grid)."]) + [""]
    if target is None:
        return lines
    points = []
    for base in data.points:
        label = data.chosen[base]
        if effective(label, "mode") != "sync":
            continue
        got = [
            data.updates_to(label, r["seed"], target) for r in data.runs.get(label, []) if r["status"] == "ok"
        ]
        got = [u for u in got if u is not None]
        if got and len(got) == len(data.runs.get(label, [])):
            points.append((int(effective(label, "batch_size")), math.fsum(got) / len(got)))
    points.sort()
    if len(points) >= 2:
        fit = fit_critical_batch(points)
        found = knee(points)
        text = ", ".join(f"b={b:,}: {s:,.0f}" for b, s in points)
        lines.append(
            f"Sync, updates to {100 * target:g}% validation accuracy at each b's chosen point: {text}."
        )
        if fit is not None:
            lines.append(
                f"Fit S(b) = S_min (1 + B_noise / b) (McCandlish et al. 2018) to {len(points)} batch sizes"
                f"{' (two parameters, two points: an exact fit, not a test of the form)' if len(points) == 2 else ''}: "
                f"S_min = {fit[0]:,.0f} updates, B_noise = {fit[1]:,.0f} examples (the critical batch)."
            )
        doublings = [b for b, _ in points if 2 * b in dict(points)]
        if found is not None:
            lines.append(f"Knee: doubling b saves less than a third of the updates from b = {found:,}.")
        elif doublings:
            lines.append(
                "Knee: every doubling measured still saves a third of the updates or more (none in range)."
            )
        else:
            lines.append("Knee: not measured (no two batch sizes a doubling apart).")
        lines.append("")
    return lines

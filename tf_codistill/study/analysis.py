"""What a study's CSV rows say, as numbers: means over seeds, the grid point
each arm is reported at, the convergence and overfitting checks, and every
declared comparison with its Welch interval and verdict (`tf_codistill.stats`).
Pure functions of the rows `tables.read_csvs` returns: no files, no text."""

from __future__ import annotations

import dataclasses
import math

from tf_codistill import selection, stats
from tf_codistill.study.spec import effective, reported_arms
from tf_codistill.study.tables import curve_keys

__all__ = ["StudyData", "convergence", "overfitting", "comparisons", "target_series", "series"]

# The convergence criterion: sync's mean test accuracy may change by less than
# this many points over the last `TAIL` of the run's updates.
CONVERGED_POINTS = 0.2
TAIL = 0.2
# A sync arm's validation NLL that ends this far (nats) above its lowest epoch overfits.
OVERFIT_RISE = 0.01


def mean(values) -> float:
    return math.fsum(values) / len(values)


def finite(values) -> list[float]:
    """The values that are numbers (not None, NaN or infinite)."""
    return [v for v in values if v is not None and math.isfinite(v)]


class StudyData:
    """A study's CSV rows, indexed; grid arms resolved to their best point."""

    def __init__(self, study: dict, runs: list[dict], curves: list[dict]):
        self.study = study
        self.by_label = {arm["label"]: arm for arm in study["arms"]}
        self.runs = {}
        for r in runs:
            self.runs.setdefault(r["arm"], []).append(r)
        self.curves = {}
        for c in curves:
            self.curves.setdefault((c["arm"], c["seed"]), []).append(c)
        for rows in self.curves.values():
            rows.sort(key=lambda c: c["epoch"])
        self.points = {}  # base label -> [labels of its points]
        for arm in study["arms"]:
            self.points.setdefault(arm["_base"], []).append(arm["label"])
        self.chosen = {base: self._choose(labels) for base, labels in self.points.items()}

    def ok(self, label: str) -> list[dict]:
        return [r for r in self.runs.get(label, []) if r["status"] == "ok"]

    def score(self, label: str) -> float:
        """The selection score of one grid point (higher is better)."""
        key = self.study["select"]
        runs = self.runs.get(label, [])
        values = [r[key] for r in runs if r["status"] == "ok"]
        if not runs or len(values) < len(runs) or not values or not all(math.isfinite(v) for v in values):
            return -math.inf  # a failed or diverged seed disqualifies the point
        return mean(values) if key == "test_accuracy" else -mean(values)

    def _choose(self, labels: list[str]) -> str:
        if len(labels) == 1:
            return labels[0]
        if self.study["select"] in selection.SELECT:
            return selection.choose(self, labels)
        return max(labels, key=self.score)  # the first of equals, in file order

    def accuracies(self, base: str, key: str = "test_accuracy") -> list[float]:
        return [r[key] for r in self.ok(self.chosen[base])]

    def history(self, label: str, seed: int) -> dict:
        rows = self.curves.get((label, seed), [])
        return {
            key: [c[key] for c in rows] if rows and rows[0][key] is not None else []
            for key in curve_keys(self.study)
        }

    def updates_to(self, label: str, seed: int, target: float):
        for c in self.curves.get((label, seed), []):
            if c["val_accuracy"] is not None and c["val_accuracy"] >= target:
                return c["updates"]
        return None


def _sync_bases(data: StudyData) -> list[str]:
    """The reported arms that train one synchronous model."""
    return [
        base
        for base in reported_arms(data.study)
        if effective(data.study, data.by_label[data.chosen[base]], "mode") == "sync"
    ]


@dataclasses.dataclass(frozen=True)
class Convergence:
    """A sync arm's mean test accuracy (over seeds) from the last epoch ending
    at or before (1 - TAIL) of the run to the last epoch."""

    base: str
    start: int  # 0-based epoch the change is measured from
    length: int  # epochs every seed has
    start_updates: int
    total_updates: int
    seeds: int
    change_points: float
    first_loss: float  # mean training task loss, first and last epoch
    last_loss: float

    @property
    def holds(self) -> bool:
        return abs(self.change_points) < CONVERGED_POINTS and self.length > 1

    @property
    def learned(self) -> bool:
        """False where the loss stayed flat at its first epoch's (or rose): it diverged."""
        return self.last_loss < 0.9 * self.first_loss


def convergence(data: StudyData) -> list[Convergence | str]:
    """Per sync arm its `Convergence`, or its base label where it has no
    per-epoch curve."""
    found = []
    for base in _sync_bases(data):
        label = data.chosen[base]
        curves = [data.curves.get((label, r["seed"]), []) for r in data.ok(label)]
        curves = [c for c in curves if c]
        if not curves:
            found.append(base)
            continue
        length = min(len(c) for c in curves)
        total = curves[0][length - 1]["updates"]
        start = 0
        for i in range(length):
            if curves[0][i]["updates"] <= (1 - TAIL) * total:
                start = i
        accuracy = [mean([c[i]["val_accuracy"] for c in curves]) for i in range(length)]
        losses = [mean([c[i]["task_loss"] for c in curves]) for i in (0, length - 1)]
        found.append(
            Convergence(
                base=base,
                start=start,
                length=length,
                start_updates=curves[0][start]["updates"],
                total_updates=total,
                seeds=len(curves),
                change_points=100 * (accuracy[-1] - accuracy[start]),
                first_loss=losses[0],
                last_loss=losses[1],
            )
        )
    return found


@dataclasses.dataclass(frozen=True)
class Regime:
    """Where a sync arm's mean validation NLL is lowest, and how far its last
    epoch ends above that: a curve that passes a minimum and rises overfits."""

    base: str
    low: int  # 0-based epoch of the lowest mean
    length: int
    low_updates: int
    low_loss: float
    final_loss: float

    @property
    def rise(self) -> float:
        return self.final_loss - self.low_loss

    @property
    def overfits(self) -> bool:
        return self.rise > OVERFIT_RISE


def overfitting(data: StudyData) -> list[Regime]:
    """Language models: the `Regime` of every sync arm with a validation curve."""
    found = []
    for base in _sync_bases(data):
        label = data.chosen[base]
        curves = [data.curves.get((label, r["seed"]), []) for r in data.ok(label)]
        curves = [c for c in curves if c and c[0]["val_loss"] is not None]
        if not curves:
            continue
        length = min(len(c) for c in curves)
        losses = [mean([c[i]["val_loss"] for c in curves]) for i in range(length)]
        low = min(range(length), key=losses.__getitem__)
        found.append(Regime(base, low, length, curves[0][low]["updates"], losses[low], losses[-1]))
    return found


@dataclasses.dataclass
class Comparison:
    """One declared comparison: sum of `coefficients[i]` x mean of `samples[i]`."""

    name: str
    samples: list[list[float]]
    coefficients: list[int]
    expected: str | None
    formula: str | None = None  # a contrast's arms, as written in the study
    result: stats.Contrast | None = None  # None: fewer than 2 seeds in an arm
    verdict: str = ""


def comparisons(data: StudyData, key: str = "test_accuracy") -> list[Comparison]:
    """Every declared comparison of outcome `key`: arm vs its baseline, then the contrasts."""
    study = data.study
    items = []
    for base in reported_arms(study):
        arm = data.by_label[data.points[base][0]]
        against = arm.get("compare_to", study.get("baseline"))
        if against is None or against == base:
            continue
        samples = [data.accuracies(base, key), data.accuracies(against, key)]
        items.append(Comparison(f"{base} - {against}", samples, [1, -1], arm.get("expected")))
    for item in study["contrasts"]:
        items.append(
            Comparison(
                item["name"],
                [data.accuracies(b, key) for b in item["plus"] + item["minus"]],
                [1] * len(item["plus"]) + [-1] * len(item["minus"]),
                item.get("expected"),
                formula=" + ".join(item["plus"]) + " - " + " - ".join(item["minus"]),
            )
        )
    for item in items:
        if all(len(s) >= 2 for s in item.samples):
            item.result = stats.contrast(item.samples, item.coefficients)
            item.verdict = stats.verdict(item.result, item.expected)
        else:
            item.verdict = "needs 2 or more seeds per arm"
    return items


def series(study: dict, arm: dict) -> tuple[str, str]:
    """The line an arm belongs to in the target plots: (method, optimizer)."""
    method = "sync"
    if effective(study, arm, "mode") != "sync":
        method = f"codistill, {effective(study, arm, 'num_groups')} groups"
    return method, effective(study, arm, "optimizer")


def target_series(data: StudyData) -> dict[tuple[str, str], list[tuple[int, str]]]:
    """Per line of the target plots (`series`): its arms at their best grid
    points, as (total batch, label), sorted by batch."""
    lines = {}
    for base in reported_arms(data.study):
        label = data.chosen[base]
        arm = data.by_label[label]
        lines.setdefault(series(data.study, arm), []).append(
            (effective(data.study, arm, "batch_size"), label)
        )
    return {key: sorted(points) for key, points in lines.items()}

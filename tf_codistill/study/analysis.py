"""What a study's CSV rows say, as numbers: means over seeds, the grid point
each arm is reported at, the convergence and overfitting checks, and every
declared comparison with its Welch interval and verdict (`tf_codistill.stats`).
Pure functions of the rows `tables.read_csvs` returns: no files, no text."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

from tf_codistill import config, selection, stats
from tf_codistill.study.spec import effective, reported_arms
from tf_codistill.study.tables import curve_keys

__all__ = [
    "StudyData",
    "rate_fraction",
    "healthy_end",
    "convergence",
    "overfitting",
    "comparisons",
    "target_series",
    "series",
]

# The convergence criterion: sync's mean accuracy may change by less than
# CONVERGED_POINTS over the last TAIL of the updates at which the learning rate
# is still at least HEALTHY_RATE of its peak. Updates at a lower rate are not
# counted: a rate decayed to nearly zero stops the weights moving, so accuracy
# flattens there whether or not the model has converged (with the step
# schedule's "goyal" milestones the last third of a run is at 1/100 of the peak
# or less). The change is measured between evaluations (epochs), so the window
# needs MIN_INTERVALS epochs or more in it, or it is "not assessable".
CONVERGED_POINTS = 0.2
TAIL = 0.2
HEALTHY_RATE = 0.1
MIN_INTERVALS = 2
# A sync arm's validation NLL that ends this far (nats) above its lowest epoch overfits.
OVERFIT_RISE = 0.01


def mean(values) -> float:
    return math.fsum(values) / len(values)


def finite(values) -> list[float]:
    """The values that are numbers (not None, NaN or infinite)."""
    return [v for v in values if v is not None and math.isfinite(v)]


class StudyData:
    """A study's CSV rows, indexed; grid arms resolved to their best point."""

    def __init__(self, study: dict, runs: list[dict], curves: list[dict], shared=None):
        self.study = study
        self.shared = shared  # a `shared.Shared`: runs and comparisons other studies report too (or None)
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


def warmup_updates(study: dict, arm: dict, total: int, steps_per_epoch: int) -> int:
    """The updates of `arm`'s linear warmup (as train.py cuts it to the run)."""
    warmup = effective(study, arm, "warmup_steps")
    warmup = warmup or int(round(effective(study, arm, "warmup_epochs") * steps_per_epoch))
    return min(warmup, max(total - 1, 0))


def rate_fraction(study: dict, arm: dict, total: int, steps_per_epoch: int) -> Callable[[int], float]:
    """The learning rate of a sync `arm` at an update (0-based), as a fraction
    of its peak, for a run of `total` updates: train.py's schedule
    (runner._arm_schedules with schedules' formulas), in plain Python."""
    warmup = warmup_updates(study, arm, total, steps_per_epoch)
    kind = effective(study, arm, "lr_schedule")

    def warm(step: int) -> float | None:
        return min((step + 1) / warmup, 1.0) if warmup and step < warmup else None

    if kind == "step":
        fractions = config.parse_milestones(effective(study, arm, "lr_milestones"))
        boundaries = [max(1, int(round(f * total))) for f in fractions]  # schedules.milestone_steps

        def step_rate(step: int) -> float:
            decayed = 0.1 ** sum(step >= b for b in boundaries)
            w = warm(step)
            return decayed if w is None else w * decayed

        return step_rate
    if kind == "cosine":
        floor = effective(study, arm, "lr_floor")

        def cosine_rate(step: int) -> float:
            w = warm(step)
            if w is not None:
                return w
            progress = min(max((step - warmup) / (total - warmup), 0.0), 1.0)
            return floor + 0.5 * (1 - floor) * (1 + math.cos(math.pi * progress))

        return cosine_rate
    return lambda step: warm(step) or 1.0


def healthy_end(rate: Callable[[int], float], total: int, warmup_end: int = 0) -> int:
    """The updates done before the rate first falls below HEALTHY_RATE of its
    peak after warmup (and stays there: the schedules never rise again), or
    `total` where it never does."""
    for step in range(warmup_end, total):
        if rate(step) < HEALTHY_RATE - 1e-12:
            return step
    return total


@dataclasses.dataclass(frozen=True)
class Convergence:
    """A sync arm's mean accuracy (over seeds) over the window the criterion
    reads: the last TAIL of the updates before `cutoff`, where the learning
    rate falls below HEALTHY_RATE of its peak (the run's end where it never does).
    `start`/`end` are the epochs measured between; None where there is no window."""

    base: str
    cutoff: int  # updates at a healthy rate
    total: int  # updates the schedule is laid out over
    tail_rate: float  # the highest rate after `cutoff`, as a fraction of the peak (0: none)
    start: int | None  # 0-based epochs the change is measured between
    end: int | None
    start_updates: int
    end_updates: int
    seeds: int
    change_points: float
    first_loss: float  # mean training task loss, first and last epoch
    last_loss: float
    why_not: str = ""  # why the window cannot be assessed

    @property
    def status(self) -> str:
        """ "holds", "fails" or "not assessable"."""
        if self.why_not:
            return "not assessable"
        return "holds" if abs(self.change_points) < CONVERGED_POINTS else "fails"

    @property
    def holds(self) -> bool:
        return self.status == "holds"

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
        arm = data.by_label[label]
        runs = data.ok(label)
        curves = [data.curves.get((label, r["seed"]), []) for r in runs]
        curves = [c for c in curves if c]
        if not curves:
            found.append(base)
            continue
        length = min(len(c) for c in curves)
        total = effective(data.study, arm, "steps") or max(r["steps"] for r in runs)
        per_epoch = runs[0]["steps_per_epoch"]
        rate = rate_fraction(data.study, arm, total, per_epoch)
        cutoff = healthy_end(rate, total, warmup_updates(data.study, arm, total, per_epoch))
        tail_rate = rate(cutoff) if cutoff < total else 0.0
        updates = [curves[0][i]["updates"] for i in range(length)]
        window = (1 - TAIL) * cutoff
        start = max((i for i in range(length) if updates[i] <= window), default=None)
        end = max((i for i in range(length) if updates[i] <= cutoff), default=None)
        ran = min(c[length - 1]["updates"] for c in curves)
        why_not = ""
        if ran < cutoff:
            why_not = (
                f"the runs end at update {ran:,}, before update {cutoff:,} where the window ends "
                f"(the schedule is laid out over {total:,})"
            )
        elif start is None or end is None or end - start < MIN_INTERVALS:
            why_not = (
                f"fewer than {MIN_INTERVALS + 1} evaluations span updates {window:,.0f} -> {cutoff:,}, the "
                f"window (one every {per_epoch:,} updates)"
            )
        accuracy = [mean([c[i]["val_accuracy"] for c in curves]) for i in range(length)]
        losses = [mean([c[i]["task_loss"] for c in curves]) for i in (0, length - 1)]
        change = 100 * (accuracy[end] - accuracy[start]) if not why_not else math.nan
        found.append(
            Convergence(
                base=base,
                cutoff=cutoff,
                total=total,
                tail_rate=tail_rate,
                start=None if why_not else start,
                end=None if why_not else end,
                start_updates=updates[start] if start is not None else 0,
                end_updates=updates[end] if end is not None else 0,
                seeds=len(curves),
                change_points=change,
                first_loss=losses[0],
                last_loss=losses[1],
                why_not=why_not,
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
    planned: bool = False  # confirmatory: named in the study's `planned` (declared before the runs)
    labels: tuple[str, ...] = ()  # the (chosen) arm label of each sample
    key: str = "test_accuracy"  # the outcome compared
    holm_p: float | None = None  # Holm-adjusted p within the study's confirmatory family (this outcome)
    repeat_of: str | None = None  # "study: name" of the first comparison of the same runs, if another


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
        items.append(
            Comparison(
                f"{base} - {against}",
                samples,
                [1, -1],
                arm.get("expected"),
                planned=base in study["planned"],
                labels=(data.chosen[base], data.chosen[against]),
                key=key,
            )
        )
    for item in study["contrasts"]:
        arms = item["plus"] + item["minus"]
        items.append(
            Comparison(
                item["name"],
                [data.accuracies(b, key) for b in arms],
                [1] * len(item["plus"]) + [-1] * len(item["minus"]),
                item.get("expected"),
                formula=" + ".join(item["plus"]) + " - " + " - ".join(item["minus"]),
                planned=item["name"] in study["planned"],
                labels=tuple(data.chosen[b] for b in arms),
                key=key,
            )
        )
    for item in items:
        if all(len(s) >= 2 for s in item.samples):
            item.result = stats.contrast(item.samples, item.coefficients)
            item.verdict = stats.verdict(item.result, item.expected)
        else:
            item.verdict = "needs 2 or more seeds per arm"
    family = [i for i in items if i.planned and i.result is not None]
    for item, adjusted in zip(family, holm([i.result.p for i in family])):
        item.holm_p = adjusted
    if data.shared is not None:
        for item in items:
            item.repeat_of = data.shared.repeat_of(study, item)
    return items


def holm(p_values: list[float]) -> list[float]:
    """Holm's step-down adjusted p-values (family-wise error), in the given order."""
    m = len(p_values)
    order = sorted(range(m), key=lambda i: p_values[i])
    adjusted = [0.0] * m
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted


def series(study: dict, arm: dict) -> tuple[str, str]:
    """The line an arm belongs to in the target plots: (method, optimizer)."""
    method = "sync"
    if effective(study, arm, "mode") != "sync":
        method = f"codistill, {effective(study, arm, 'num_groups')} groups"
        if effective(study, arm, "alpha") == 0:  # independent models: a line of their own
            method += ", alpha 0"
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

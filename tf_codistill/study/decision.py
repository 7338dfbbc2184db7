"""The scale-out decision in the user's terms: at each per-group batch b,
add a codistilled group (2 x b) or double the synchronous batch (2b)?

A study declares its decision points in `[[decision]]` tables, each naming
four of its arms::

    [[decision]]
    b = 512
    sync = "sync_b512"            # sync at b: W workers
    sync_2b = "sync_b1024"        # sync at 2b: 2W workers
    codistill = "codistill_2x512" # two groups of b: 2W workers
    alpha0 = "codistill0_2x512"   # the same two groups at alpha 0 (and their ensemble)

and optionally a `[walltime]` table (below). The report then gives, per b:
updates to the target validation accuracy of each arm (mean ± s.e. over the
seeds that reached it; seeds that did not, and diverged seeds, counted
apart), workers and bytes per step, and a verdict from the 95% Welch
interval of codistill - sync_2b in updates: "add a group" (the interval
lies below 0), "double the batch" (above 0), or "cannot be told apart".
The second planned comparison, codistill - alpha0, says whether the
distillation term itself saved updates.

`[walltime]` turns updates into time over a link of each rate, with the
network sweep's fitted constants (docs/results/network/costmodel.json)::

    step seconds = compute + messages x latency + bytes sent per worker x 8 / (efficiency x rate)

where each worker holds `per_worker_batch` examples, so an arm of total
batch B has B / per_worker_batch workers; sync all-reduces the gradient
over all of them (a ring), codistillation all-reduces inside each group and
all-gathers the logits of its batch slice across groups
(`tf_codistill.traffic`). Compute per step is declared per model and arm
kind (measured as the file says); communication does not overlap it (an
upper bound on its cost).

Pure Python on the rows of the study's CSVs.
"""

from __future__ import annotations

import math

from tf_codistill import stats
from tf_codistill.traffic import allgather_bytes, allreduce_bytes

__all__ = ["check", "report_lines", "verdict", "step_seconds", "workers", "planned_count"]

ROLES = ("sync", "sync_2b", "codistill", "alpha0")
WALLTIME_KEYS = (
    "source",
    "efficiency",
    "latency_seconds",
    "rates_gbit",
    "per_worker_batch",
    "models",
)
MODEL_KEYS = ("name", "params", "classes", "sync_seconds", "codistill_seconds")


def check(path: str, study: dict) -> None:
    """Checks `[[decision]]` and `[walltime]`. Raises ValueError naming the
    file and the key."""
    labels = {arm["label"] for arm in study["arms"]}  # before grids are expanded: the base labels
    points = study.get("decision", [])
    if not isinstance(points, list):
        raise ValueError(f"{path}: `decision` must be [[decision]] tables.")
    if points and study.get("target_accuracy") is None:
        raise ValueError(f"{path}: [[decision]] reads updates to `target_accuracy`; set it.")
    for i, point in enumerate(points):
        where = f"{path}: [[decision]] #{i + 1}"
        unknown = sorted(set(point) - {"b", *ROLES})
        if unknown:
            raise ValueError(f"{where} has unknown keys {unknown}; it takes b and {', '.join(ROLES)}.")
        b = point.get("b")
        if isinstance(b, bool) or not isinstance(b, int) or b < 1:
            raise ValueError(f"{where}: b must be an integer >= 1, got {b!r}.")
        for role in ROLES:
            if point.get(role) not in labels:
                raise ValueError(
                    f"{where}: {role} = {point.get(role)!r} is not an arm of this study ({sorted(labels)})."
                )
    wall = study.get("walltime")
    if wall is None:
        return
    if not points:
        raise ValueError(f"{path}: [walltime] prices the [[decision]] arms; declare them.")
    unknown = sorted(set(wall) - set(WALLTIME_KEYS))
    missing = sorted(set(WALLTIME_KEYS) - {"source"} - set(wall))
    if unknown or missing:
        raise ValueError(f"{path}: [walltime] unknown keys {unknown}, missing {missing}.")
    numbers = [wall["efficiency"], wall["latency_seconds"], wall["per_worker_batch"]]
    if not all(_positive_or_zero(v) for v in numbers + list(wall["rates_gbit"])) or wall["efficiency"] == 0:
        raise ValueError(f"{path}: [walltime] numbers must be >= 0 (efficiency > 0).")
    for model in wall["models"]:
        if set(model) != set(MODEL_KEYS):
            raise ValueError(
                f"{path}: [[walltime.models]] takes exactly {list(MODEL_KEYS)}; got {sorted(model)}."
            )


def planned_count(study: dict) -> int:
    """The confirmatory intervals a study's decision table reports: codistill -
    sync 2b and codistill - alpha 0 at each point."""
    return 2 * len(study.get("decision", []))


def _positive_or_zero(value) -> bool:
    return (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value >= 0
    )


def verdict(result: stats.Contrast | None) -> str:
    """codistill - sync_2b in updates to the target: negative means the
    added group needs fewer updates."""
    if result is None:
        return "not measured (fewer than 2 seeds of an arm reached the target)"
    if result.high < 0:
        return "add a group"
    if result.low > 0:
        return "double the batch"
    return "cannot be told apart"


def workers(total_batch: int, per_worker_batch: int) -> int:
    """Workers an arm of `total_batch` examples per step uses, `per_worker_batch` each."""
    return max(1, math.ceil(total_batch / per_worker_batch))


def step_seconds(
    kind: str,
    groups: int,
    total_batch: int,
    params: int,
    classes: int,
    compute: float,
    rate_gbit: float,
    wall: dict,
) -> float:
    """Seconds per update of an arm over links of `rate_gbit`, with `wall`'s
    network constants. `kind`: "sync" (one all-reduce ring over every
    worker), "codistill" (a ring inside each group and the logits all-gathered
    across groups) or "independent" (rings inside the groups only)."""
    per_worker = wall["per_worker_batch"]
    in_group = workers(total_batch // groups, per_worker)
    sent = allreduce_bytes(params, in_group)
    messages = 2.0 * (in_group - 1)
    if kind == "codistill" and groups > 1:
        sent += allgather_bytes(min(per_worker, total_batch // groups), classes, groups)
        messages += groups - 1
    rate = rate_gbit * 1e9
    return compute + messages * wall["latency_seconds"] + sent * 8.0 / (wall["efficiency"] * rate)


def _reach(data, label: str, target: float, key: str = "val_accuracy"):
    """(updates of each seed that reached the target, seeds that did not,
    diverged or failed seeds) for one arm."""
    got, missed = [], 0
    runs = data.runs.get(label, [])
    for run in runs:
        if run["status"] != "ok":
            continue
        updates = None
        for c in data.curves.get((label, run["seed"]), []):
            if c.get(key) is not None and c[key] >= target:
                updates = c["updates"]
                break
        if updates is None:
            missed += 1
        else:
            got.append(updates)
    return got, missed, sum(1 for r in runs if r["status"] != "ok")


def _cell(got, missed, lost) -> str:
    if not got:
        text = "never"
    else:
        mean, se = stats.mean_se(got)
        text = f"{mean:,.0f} ± {se:,.0f}"
    notes = [f"{len(got)}/{len(got) + missed} reached"]
    if lost:
        notes.append(f"{lost} diverged")
    return f"{text} ({', '.join(notes)})"


def _interval(a, b) -> stats.Contrast | None:
    if len(a) < 2 or len(b) < 2:
        return None
    return stats.welch(a, b)


def _ci(result: stats.Contrast | None) -> str:
    if result is None:
        return "-"
    return f"{result.diff:+,.0f} [{result.low:+,.0f}, {result.high:+,.0f}]"


def report_lines(data, effective) -> list[str]:
    """The decision section of a study's report (empty without `[[decision]]`).
    `effective(label, flag)` is a run's value of a train.py flag."""
    study = data.study
    points = study.get("decision", [])
    if not points:
        return []
    target = study["target_accuracy"]
    pct = f"{100 * target:g}%"
    lines = [
        f"**The decision, in updates to {pct} validation accuracy** (read from each run's curve; a seed that "
        "never reached it within its run is counted as not reached, a diverged seed apart; means and "
        "intervals over the seeds that reached it). Planned comparisons, declared before the runs: "
        f"codistill - sync 2b (the decision) and codistill - alpha 0 (the distillation term), per b: "
        f"{planned_count(study)} confirmatory intervals, 95% each, not adjusted for multiplicity.",
        "",
        "| b | sync b | sync 2b | codistill 2 x b | alpha 0, 2 x b | ensemble of the alpha-0 pair | "
        "codistill - sync 2b (95% CI) | verdict | codistill - alpha 0 (95% CI) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    reached = {}
    for point in points:
        cells = {}
        for role in ROLES:
            label = data.chosen[point[role]]
            reached[(point["b"], role)] = _reach(data, label, target)
            cells[role] = _cell(*reached[(point["b"], role)])
        ensemble = _reach(data, data.chosen[point["alpha0"]], target, "val_ensemble_accuracy")
        decision = _interval(reached[(point["b"], "codistill")][0], reached[(point["b"], "sync_2b")][0])
        distill = _interval(reached[(point["b"], "codistill")][0], reached[(point["b"], "alpha0")][0])
        lines.append(
            f"| {point['b']:,} | {cells['sync']} | {cells['sync_2b']} | {cells['codistill']} | "
            f"{cells['alpha0']} | {_cell(*ensemble)} | {_ci(decision)} | **{verdict(decision)}** | "
            f"{_ci(distill)} |"
        )
    lines.append("")
    lines += _resources(data, effective, points)
    wall = study.get("walltime")
    if wall:
        lines += _walltime(data, effective, points, reached, wall)
    return lines


def _resources(data, effective, points) -> list[str]:
    lines = [
        "| b | arm | groups x batch | bytes per step (equiv., the runs' accounting) |",
        "|---|---|---|---|",
    ]
    for point in points:
        for role in ROLES:
            label = data.chosen[point[role]]
            groups = int(effective(label, "num_groups")) if effective(label, "mode") != "sync" else 1
            batch = int(effective(label, "batch_size")) // groups
            runs = data.ok(label)
            sent = runs[0].get("bytes_equivalent_per_step") if runs else None
            lines.append(
                f"| {point['b']:,} | {point[role]} | {groups} x {batch:,} | "
                f"{'-' if sent is None else f'{sent:,.0f}'} |"
            )
    return lines + [""]


def _walltime(data, effective, points, reached, wall) -> list[str]:
    rates = wall["rates_gbit"]
    per_worker = wall["per_worker_batch"]
    lines = [
        f"**Wall time to {100 * data.study['target_accuracy']:g}%**, mean updates x step time, with "
        f"{per_worker} examples per worker (an arm of total batch B uses B / {per_worker} workers) and the "
        f"network constants of {wall.get('source', 'the [walltime] table')}: efficiency "
        f"{wall['efficiency']:g}, latency {wall['latency_seconds']:g} s per message. Compute per update is "
        "declared below; communication is not overlapped with it (an upper bound on its cost).",
        "",
    ]
    for model in wall["models"]:
        lines += [
            f"{model['name']} ({model['params']:,} parameters, {model['classes']:,} classes; compute per update: sync "
            f"{model['sync_seconds'] * 1e3:g} ms, codistillation {model['codistill_seconds'] * 1e3:g} ms), "
            "seconds:",
            "",
            "| b | arm | workers | " + " | ".join(f"{r:g} Gbit/s" for r in rates) + " |",
            "|---|---|---|" + "---|" * len(rates),
        ]
        for point in points:
            for role in ROLES:
                label = data.chosen[point[role]]
                kind = "sync" if effective(label, "mode") == "sync" else "codistill"
                groups = int(effective(label, "num_groups")) if kind == "codistill" else 1
                total = int(effective(label, "batch_size"))
                got = reached[(point["b"], role)][0]
                compute = model[f"{kind}_seconds"]
                if role == "alpha0":  # two independent models: nothing crosses between the groups
                    kind, compute = "independent", model["sync_seconds"]
                cells = []
                for rate in rates:
                    if not got:
                        cells.append("-")
                        continue
                    step = step_seconds(
                        kind, groups, total, model["params"], model["classes"], compute, rate, wall
                    )
                    cells.append(f"{math.fsum(got) / len(got) * step:,.1f}")
                count = groups * workers(total // groups, per_worker)
                lines.append(f"| {point['b']:,} | {point[role]} | {count} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines

"""A study's REPORT.md section, as Markdown lines, from `analysis`'s numbers:
the results table, convergence or overfitting checks, comparisons with their
verdicts, the grid, the plots, and the combined report's header."""

from __future__ import annotations

from tf_codistill import selection, stats
from tf_codistill.study import analysis, decision
from tf_codistill.study.analysis import Comparison, StudyData, finite
from tf_codistill.study.spec import arm_flags, effective, flags, reported_arms, value_text

__all__ = ["study_lines", "summary_lines"]

# The two NLL outcomes every language-model comparison reports.
NLL_OUTCOMES = (("best_val_loss", "best validation NLL"), ("val_loss", "final validation NLL"))


def _pct(values, digits=2) -> str:
    values = finite(values)
    if not values:
        return "-"
    mean, se = stats.mean_se(values)
    return f"{100 * mean:.{digits}f} ± {100 * se:.{digits}f}"


def _num(values, digits=4) -> str:
    values = finite(values)
    if not values:
        return "-"
    mean, se = stats.mean_se(values)
    return f"{mean:.{digits}f} ± {se:.{digits}f}"


def _minutes(runs) -> str:
    seconds = finite([r["process_seconds"] for r in runs])
    return f"{analysis.mean(seconds) / 60:.1f}" if seconds else "-"


def _fraction_text(value: float) -> str:
    """1/100 for 0.01; a rate that is not 1/10^k as a decimal."""
    inverse = 1 / value
    if abs(inverse - round(inverse)) < 1e-6 and round(inverse) in (10, 100, 1000, 10000):
        return f"1/{round(inverse)}"
    return f"{value:.2g}"


CRITERION = (
    "Convergence criterion: sync's mean accuracy changes by less than {points:g} points over the last "
    "{tail:g}% of the updates at which the learning rate is still at least 1/10 of its peak. Updates at a "
    "lower rate are not counted: a rate decayed to nearly zero stops the weights moving, so the curve "
    "flattens there whether or not the model has converged, and a criterion read there could not fail. "
    "Where the window holds fewer than {evals} evaluations the criterion is not assessable."
)


def _convergence_lines(data: StudyData) -> list[str]:
    found_all = analysis.convergence(data)
    if not found_all:
        return [
            "Convergence: this study has no sync arm; its run length is the one the studies with a "
            "sync arm are checked at."
        ]
    lines = [
        CRITERION.format(
            points=analysis.CONVERGED_POINTS, tail=100 * analysis.TAIL, evals=analysis.MIN_INTERVALS + 1
        ),
        "",
    ]
    for found in found_all:
        if isinstance(found, str):
            lines.append(f"Convergence of `{found}`: no per-epoch curve (criterion not computed).")
            continue
        tail = ""
        if found.cutoff < found.total:
            share = 100 * (found.total - found.cutoff) / found.total
            below = (
                f"at {_fraction_text(found.tail_rate)} of the peak rate or less"
                if found.tail_rate <= analysis.HEALTHY_RATE / 10 + 1e-12
                else "below 1/10 of the peak rate"
            )
            tail = (
                f" The last {share:.0f}% of the run (updates {found.cutoff:,} -> {found.total:,}) is {below} "
                "and is not counted."
            )
        if found.status == "not assessable":
            lines.append(f"Convergence of `{found.base}`: not assessable: {found.why_not}.{tail}")
            continue
        status = found.status
        if not found.learned:
            status += (
                f", but it did not learn (training loss {found.first_loss:.3g} -> {found.last_loss:.3g})"
            )
        lines.append(
            f"Convergence of `{found.base}`: sync accuracy changed by {found.change_points:+.2f} points from "
            f"epoch {found.start + 1} to {found.end + 1} (updates {found.start_updates:,} -> "
            f"{found.end_updates:,}, the last {100 * analysis.TAIL:g}% of the {found.cutoff:,} at >= 1/10 of "
            f"the peak rate; mean of {found.seeds} seeds; criterion < {analysis.CONVERGED_POINTS:g}): "
            f"{status}.{tail}"
        )
    return lines


def _overfitting_lines(data: StudyData) -> list[str]:
    lines = []
    for found in analysis.overfitting(data):
        regime = "overfits (passes a minimum and rises)" if found.overfits else "does not overfit"
        lines.append(
            f"Regime of `{found.base}`: mean validation NLL lowest at epoch {found.low + 1} of {found.length} "
            f"(update {found.low_updates:,}: {found.low_loss:.4f}), final {found.final_loss:.4f} "
            f"({found.rise:+.4f}): it {regime}."
        )
    return lines


def _arm_name(data: StudyData, base: str) -> str:
    """An arm's name in a table, with the study/arm whose runs these are, if another's."""
    same = data.shared.same_runs(data.study, data.chosen[base]) if data.shared is not None else None
    return base if same is None else f"{base} (the same runs as {same})"


def _interval(item: Comparison, scale: float, digits: int) -> str:
    return f"[{scale * item.result.low:+.{digits}f}, {scale * item.result.high:+.{digits}f}]"


def _finding(study: dict, items: list[Comparison], scale: float = 100, digits: int = 2) -> str:
    """The confirmatory comparisons' verdicts, then the exploratory intervals
    that exclude 0 (leads). "Same" is never read from an interval that
    includes 0: the interval bounds the difference, it does not show one."""
    judged = [i for i in items if i.planned and i.repeat_of is None]
    seeds = len(study["seeds"])
    if not judged:
        text = "Finding: no comparison of this study was planned (confirmatory) before its runs"
        text += (
            "; nothing to hold or fail." if not any(i.planned for i in items) else " that is not a repeat."
        )
    else:
        parts = []
        for verdict in ("held", "failed", "differs", "cannot be told apart", "needs 2 or more seeds per arm"):
            names = []
            for i in judged:
                if i.verdict != verdict:
                    continue
                what = f"expected {i.expected}" if i.expected else "no direction expected"
                if i.expected == "same" and verdict == "cannot be told apart":
                    what += f"; the interval {_interval(i, scale, digits)} bounds the difference, it does not show none"
                names.append(f"{i.name} ({what})")
            if names:
                label = (
                    f"cannot be told apart at {seeds} seeds" if verdict == "cannot be told apart" else verdict
                )
                parts.append(f"{label} for {', '.join(names)}")
        text = "Finding (confirmatory): the planned difference " + "; ".join(parts)
    leads = [i for i in items if not i.planned and i.result is not None and i.result.excludes_zero()]
    leads = [i for i in leads if i.repeat_of is None]
    if leads:
        text += ". Exploratory intervals that exclude 0 (leads to replicate, not findings): " + ", ".join(
            f"{i.name} {_interval(i, scale, digits)}" for i in leads
        )
    return text + "."


def _multiplicity(items: list[Comparison]) -> str:
    new = [i for i in items if i.repeat_of is None]
    planned = sum(i.planned for i in new)
    repeats = len(items) - len(new)
    again = (
        f"; {repeats} repeat{'s' if repeats != 1 else ''} of another study's comparison of the same runs, not counted"
        if repeats
        else ""
    )
    return (
        f"Multiplicity: {planned} confirmatory interval{'s' if planned != 1 else ''} (named in the study's "
        f"`planned` before the runs) and {len(new) - planned} exploratory{again}. At 95% per interval about "
        "1 in 20 exploratory intervals excludes 0 by chance where there is no difference, so an exploratory "
        '"held" or "differs" is a lead, not a finding. Holm p: the p-value adjusted by Holm\'s step-down '
        "method over this study's confirmatory family (family-wise error 5% where < 0.05)."
    )


def _comparison_table(items: list[Comparison], columns: str, scale: float, digits: int) -> list[str]:
    """The Markdown table of `analysis.comparisons`' items: `columns` names the
    first two columns; differences and intervals are multiplied by `scale`
    (100: points) and shown with `digits` decimals."""
    lines = [
        f"| {columns} | 95% CI (Welch) | p (two-sided) | Holm p | planned | expected | verdict |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for item in items:
        res = item.result
        name = item.name if item.formula is None else f"{item.name}: {item.formula}"
        if item.repeat_of is not None:
            name += f" (a repeat of {item.repeat_of})"
        kind = "confirmatory" if item.planned else "exploratory"
        if res is None:
            lines.append(f"| {name} | - | - | - | - | {kind} | {item.expected or '-'} | {item.verdict} |")
            continue
        diff, low, high = (f"{scale * v:+.{digits}f}" for v in (res.diff, res.low, res.high))
        holm = "-" if item.holm_p is None else f"{item.holm_p:.3f}"
        lines.append(
            f"| {name} | {diff} | [{low}, {high}] | {res.p:.3f} | {holm} | {kind} | {item.expected or '-'} "
            f"| {item.verdict} |"
        )
    return lines


def _nll_lines(study: dict, data: StudyData, image_dir: str) -> list[str]:
    """The language-model report: NLL table, comparisons on best and final
    validation NLL, generated text."""
    lines = _overfitting_lines(data) + [""]
    header = (
        "| arm | flags | best val NLL | final val NLL | ensemble best | ensemble final | test NLL "
        "| train task loss | updates | bytes/step (equiv.) | minutes/run |"
    )
    lines += [header, "|" + "---|" * header.count(" |")]
    for base in reported_arms(study):
        label = data.chosen[base]
        runs = data.ok(label)
        arm = data.by_label[label]
        if not runs:
            lines.append(f"| {_arm_name(data, base)} | `{arm_flags(arm)}` |" + " - |" * 9)
            continue
        steps = sorted({r["steps"] for r in runs})
        cells = [_num([r[k] for r in runs]) for k in ("best_val_loss", "val_loss")]
        cells += [_num([r[k] for r in runs]) for k in ("ensemble_best_val_loss", "ensemble_val_loss")]
        cells += [_num([r["test_loss"] for r in runs]), _num([r["train_loss"] for r in runs])]
        lines.append(
            f"| {_arm_name(data, base)} | `{arm_flags(arm)}` | {' | '.join(cells)} | {'/'.join(f'{s:,}' for s in steps)} | "
            f"{runs[0]['bytes_equivalent_per_step']:,.0f} | {_minutes(runs)} |"
        )
    lines += [
        "",
        "NLL in nats per character: mean of a run's groups, mean ± standard error over seeds; best: the "
        "lowest epoch's (validation split, as nanoGPT reports), final: the last epoch's; test NLL at the "
        "end of the run; ensemble: the members' mean probabilities.",
        "",
    ]
    for key, what in NLL_OUTCOMES:
        items = analysis.comparisons(data, key)
        if not items:
            continue
        lines += _comparison_table(items, f"comparison ({what}) | difference, nats", 1, 4)
        finding = _finding(study, items, 1, 4).replace("Finding", f"Finding ({what})", 1)
        lines += ["", finding, "", _multiplicity(items), ""]
    lines += [f"![{study['name']}]({image_dir}curves.png)", ""]
    lines += _bytes_image(study, image_dir)
    for base in reported_arms(study):
        runs = [r for r in data.ok(data.chosen[base]) if r.get("sample")]
        if runs:
            lines += [f"Generated by `{base}` (group 0, seed {runs[0]['seed']}, 300 characters):", ""]
            lines += ["```", runs[0]["sample"].rstrip("\n"), "```", ""]
    return lines


def _accuracy_table(study: dict, data: StudyData) -> list[str]:
    """One row per reported arm: test and ensemble accuracy, training loss,
    updates, bytes, minutes (and the updates to the target, where declared)."""
    target = study.get("target_accuracy")
    header = (
        "| arm | flags | test accuracy % | ensemble % | train task loss | updates | bytes/step (equiv.) "
        "| minutes/run |"
    )
    if target is not None:
        header += f" updates to {100 * target:g}% |"
    lines = [header, "|" + "---|" * header.count(" |")]
    for base in reported_arms(study):
        label = data.chosen[base]
        runs = data.ok(label)
        arm = data.by_label[label]
        first = runs[0] if runs else {}
        steps = sorted({r["steps"] for r in runs})
        row = (
            f"| {_arm_name(data, base)} | `{arm_flags(arm)}` | {_pct([r['test_accuracy'] for r in runs])} | "
            f"{_pct([r['ensemble_test_accuracy'] for r in runs])} | {_num([r['train_loss'] for r in runs])} | "
            f"{'/'.join(f'{s:,}' for s in steps) or '-'} | "
            f"{first['bytes_equivalent_per_step']:,.0f} | {_minutes(runs)} |"
            if first
            else f"| {_arm_name(data, base)} | `{arm_flags(arm)}` | - | - | - | - | - | - |"
        )
        if target is not None:
            got = finite([data.updates_to(label, r["seed"], target) for r in runs])
            text = "-"
            if got:
                mean, se = stats.mean_se(got)
                text = f"{mean:,.0f} ± {se:,.0f}"
            row += f" {text} ({len(got)}/{len(runs)} seeds) |"
        lines.append(row)
    return lines


def _lost_seeds(study: dict, data: StudyData) -> list[str]:
    lost = []
    for base in reported_arms(study):
        label = data.chosen[base]
        bad = [r for r in data.runs.get(label, []) if r["status"] != "ok"]
        if bad:
            seeds = ", ".join(f"{r['seed']} ({r['status']})" for r in bad)
            lost.append(f"{base}: {len(bad)} of {len(data.runs[label])} seeds, {seeds}")
    if not lost:
        return []
    return [
        "Seeds left out of the means and comparisons (a diverged run stopped on NaN or Inf "
        "predictions): " + "; ".join(lost) + ".",
        "",
    ]


def _grid_lines(study: dict, data: StudyData) -> list[str]:
    """Every point of every grid arm, and which one is reported."""
    grids = [base for base, labels in data.points.items() if len(labels) > 1]
    lines = selection.report_lines(data, lambda label, key: effective(study, data.by_label[label], key))
    if not grids or study["select"] in selection.SELECT:
        return lines
    how = (
        "highest mean final test accuracy over seeds. That is the test set itself (train.py holds out "
        "no validation split), so the chosen point's accuracy is optimistic: it is the best of the grid"
        if study["select"] == "test_accuracy"
        else "lowest mean final training task loss over seeds (the test set plays no part)"
    )
    lines += [
        f"Grid: every arm is reported at its best point, chosen by the {how}. A point with a failed or "
        "non-finite seed is not chosen.",
        "",
        "| arm | point | test accuracy % | train task loss | failed seeds | chosen |",
        "|---|---|---|---|---|---|",
    ]
    for base in grids:
        for label in data.points[base]:
            point = data.by_label[label]["_point"]
            runs = data.ok(label)
            failed = len(data.runs.get(label, [])) - len(runs)
            lines.append(
                f"| {base} | `{' '.join(f'--{k}={value_text(v)}' for k, v in point.items())}` | "
                f"{_pct([r['test_accuracy'] for r in runs])} | {_num([r['train_loss'] for r in runs])} | "
                f"{failed} | {'yes' if data.chosen[base] == label else ''} |"
            )
    return lines + [""]


def study_lines(study: dict, data: StudyData, image_dir: str, config_shown: str) -> list[str]:
    """The study's section of a report. `image_dir`: the plots' folder as
    seen from the report ("" in the study's own REPORT.md); `config_shown`:
    the study file as its command line names it."""
    runs_all = [r for rows in data.runs.values() for r in rows]
    minutes = finite([r["process_seconds"] for r in runs_all])
    lines = [
        f"## {study['title']}",
        "",
        f"`python -m tf_codistill.study --config={config_shown}` ({len(study['seeds'])} seeds: "
        f"{study['seeds']}; common flags: `{' '.join(flags(study['common']))}`; {len(runs_all)} runs, "
        f"{sum(minutes) / 60:.1f} minutes of train.py processes)",
        "",
    ]
    if study.get("expect"):
        lines += [f"Expected (written before the run): {study['expect']}", ""]
    if study.get("metric") == "nll":
        return lines + _nll_lines(study, data, image_dir)
    lines += _convergence_lines(data) + [""]
    lines += _accuracy_table(study, data)
    lines += [
        "",
        "Test accuracy: mean of a run's groups, in percent, mean ± standard error over seeds; "
        "train task loss: the last epoch's.",
        "",
    ]
    lines += _lost_seeds(study, data)
    items = analysis.comparisons(data)
    if items:
        lines += _comparison_table(items, "comparison (test accuracy) | difference, points", 100, 2)
        lines += ["", _finding(study, items), "", _multiplicity(items), ""]
    lines += _grid_lines(study, data)
    lines += decision.report_lines(data, lambda label, key: effective(study, data.by_label[label], key))
    lines += [f"![{study['name']}]({image_dir}curves.png)", ""]
    lines += _bytes_image(study, image_dir)
    if study.get("target_accuracy") is not None:
        lines += [f"![{study['name']}: updates to target]({image_dir}updates_to_target.png)", ""]
    return lines


def _summary_counts(context: list, shared) -> list[str]:
    """Runs and intervals across the studies, each set of runs and each
    comparison of the same runs counted once."""
    rows = distinct = 0
    marked = []
    confirmatory = exploratory = repeats = 0
    for study, data in context:
        for label, runs in data.runs.items():
            rows += len(runs)
            same = shared.same_runs(study, label)
            if same is None:
                distinct += len(runs)
            elif label in data.chosen.values():
                marked.append(f"{study['name']}/{label} = {same}")
        keys = NLL_OUTCOMES if study.get("metric") == "nll" else (("test_accuracy", ""),)
        for key, _ in keys:
            for item in analysis.comparisons(StudyData(study, _rows(data), _curve_rows(data), shared), key):
                if item.repeat_of is not None:
                    repeats += 1
                elif item.planned:
                    confirmatory += 1
                else:
                    exploratory += 1
        confirmatory += decision.planned_count(study)
    lines = []
    if marked:
        lines += [
            f"Shared runs: these studies hold {rows} runs, {distinct} of them distinct. The runner copies a "
            "run whose flags and seed equal another study's, so these arms are the same runs as the first "
            "study's (in run order) and are reported as that one, marked in their tables, not as new evidence: "
            + "; ".join(marked)
            + ".",
            "",
        ]
    lines += [
        f"Multiplicity: {confirmatory} confirmatory intervals (declared before the runs: a study's `planned`, "
        "and two per point of a `[[decision]]` table) "
        f"and {exploratory} exploratory ones across these studies ({repeats} repeats of an earlier comparison of "
        "the same runs not counted). At 95% per interval about 1 in 20 exploratory intervals excludes 0 by "
        f'chance where there is no difference (here about {exploratory / 20:.1f}), so an exploratory "held" or '
        '"differs" is a lead to replicate, not a finding. Holm p adjusts each study\'s confirmatory family.',
        "",
    ]
    return lines


def _rows(data: StudyData) -> list[dict]:
    return [r for rows in data.runs.values() for r in rows]


def _curve_rows(data: StudyData) -> list[dict]:
    return [c for rows in data.curves.values() for c in rows]


def summary_lines(command: str, not_run: list[str], out: str, context=(), shared=None) -> list[str]:
    """The combined REPORT.md's header: how it was made and how to read it.
    `not_run`: the study files (as shown) that have no runs.csv under `out`;
    `context`: (study, StudyData) of the studies reported, `shared` their
    `shared.Shared`, for the counts across studies."""
    lines = [
        "# Study report",
        "",
        f"Generated from each study's `runs.csv` and `curves.csv` by `{command}`; the same command with "
        "`--report_only` rebuilds this file, every study's REPORT.md and the plots from those CSVs without "
        "training.",
        "",
        "Test accuracy is the mean over a run's groups (models), in percent: mean ± standard error over "
        "seeds. Each comparison is a difference of mean test accuracies in points with its 95% Welch "
        "confidence interval and two-sided p-value; the verdict reads the interval: it excludes 0 with the "
        "expected sign (held), with the other sign or where no difference was expected (failed), or it "
        'includes 0 (cannot be told apart at this number of seeds: not "the same"; the interval bounds the '
        "difference). A comparison is confirmatory where the study named it in `planned` before its runs, "
        "exploratory otherwise.",
        "",
    ]
    if not_run:
        names = ", ".join(f"`{name}`" for name in not_run)
        lines += [f"Not run yet (no runs.csv under `{out}`): {names}.", ""]
    if shared is not None and context:
        lines += _summary_counts(list(context), shared)
    return lines


def _bytes_image(study: dict, image_dir: str) -> list[str]:
    """The plot against bytes sent, for a study that asks for it (`plot_bytes`)."""
    if not study.get("plot_bytes"):
        return []
    return [f"![{study['name']}: against bytes sent]({image_dir}curves_bytes.png)", ""]

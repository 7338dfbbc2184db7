"""Every matplotlib figure of a study report, drawn from `analysis.StudyData`:
test accuracy (or validation NLL) and training loss against epochs, and for a
study with a `target_accuracy` the curves per total batch and the updates to
the target against the batch."""

from __future__ import annotations

import os
import textwrap

from tf_codistill import config, selection, stats
from tf_codistill.study.analysis import StudyData, finite, target_series
from tf_codistill.study.spec import effective, reported_arms

__all__ = ["draw"]


def draw(data: StudyData, study_dir: str) -> None:
    """Writes the study's plots into `study_dir`: curves.png, and
    updates_to_target.png where the study has a `target_accuracy`."""
    if data.study.get("target_accuracy") is not None:
        _plot_curves_by_batch(data, os.path.join(study_dir, "curves.png"))
        _plot_updates(data, os.path.join(study_dir, "updates_to_target.png"))
    else:
        _plot_curves(data, os.path.join(study_dir, "curves.png"))
    if data.study.get("plot_bytes"):
        _plot_bytes(data, os.path.join(study_dir, "curves_bytes.png"))


def curve_runs(data: StudyData) -> tuple[dict[str, list[dict]], str | None, str]:
    """What curves.png draws: name -> each seed's history (with its "updates"),
    the x key and the x label. Against updates where the arms' epochs differ in
    length (a batch or training set of their own) or where an epoch is a fixed
    number of updates rather than a pass over the data (`steps_per_epoch` set,
    as the language models); otherwise against epochs, each the same updates."""
    sizes = {}  # updates per epoch
    for base in reported_arms(data.study):
        ok = data.ok(data.chosen[base])
        sizes[base] = ok[0]["steps_per_epoch"] if ok else None
    known = sorted({size for size in sizes.values() if size is not None})
    fixed = any(effective(data.study, arm, "steps_per_epoch") for arm in data.study["arms"])
    runs = {}
    for base in reported_arms(data.study):
        label = data.chosen[base]
        histories = []
        for r in data.ok(label):
            history = data.history(label, r["seed"])
            history["updates"] = [c["updates"] for c in data.curves.get((label, r["seed"]), [])]
            histories.append(history)
        runs[base] = histories
    if len(known) > 1 or fixed:
        every = f"; evaluated every {known[0]:,} updates" if len(known) == 1 else ""
        return runs, "updates", f"updates per model{every}"
    size = f" ({known[0]:,} updates each)" if known else ""
    return runs, None, f"epoch{size}"


def _plot_curves(data: StudyData, path: str) -> None:
    from tf_codistill.report import plot_runs  # loads Keras: only when a report is built

    runs, x_key, xlabel = curve_runs(data)
    kwargs = {"xlabel": xlabel, "x_key": x_key}
    if data.study.get("metric") == "nll":
        kwargs["metric"] = "loss"
    plot_runs(runs, path, title=data.study["title"], **kwargs)


def _plot_bytes(data: StudyData, path: str) -> None:
    """The evaluation metric of each arm (mean over seeds) against the bytes
    one worker has sent by then: updates x the arm's bytes per step (for sync,
    its ring all-reduce). Log x: the arms differ by orders of magnitude."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from tf_codistill.report import arm_colour, curve_band

    nll = data.study.get("metric") == "nll"
    key = "val_loss" if nll else "val_accuracy"
    runs, _, _ = curve_runs(data)
    fig, ax = plt.subplots(figsize=(11, 5), layout="constrained")
    for index, (base, histories) in enumerate(runs.items()):
        ok = data.ok(data.chosen[base])
        per_step = ok[0]["bytes_equivalent_per_step"] if ok else None
        curves = [h[key] for h in histories if h.get(key)]
        if not curves or not per_step:
            continue
        mean, _ = curve_band(curves)
        updates = np.asarray(next(h["updates"] for h in histories if h.get(key))[: len(mean)], dtype=float)
        scale = 1.0 if nll else 100.0
        ax.plot(updates * float(per_step) / 1e6, np.asarray(mean) * scale, marker=".", color=arm_colour(index),
                label=f"{base} ({float(per_step):,.0f} B/step)")  # fmt: skip
    ax.set_xscale("log")
    ax.set_xlabel("MB sent per worker (updates x bytes per step)")
    ax.set_ylabel(
        "validation NLL (nats), mean over seeds"
        if nll
        else "accuracy % (per-epoch evaluation), mean over seeds"
    )
    if not nll:
        finals = [line.get_ydata()[-1] for line in ax.get_lines()]
        if finals:
            ax.set_ylim(max(min(finals) - 3.0, 0.0), min(max(finals) + 0.7, 100.0))
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside: no curve hidden under it
    ax.set_title("\n".join(textwrap.wrap(data.study["title"] + ": against bytes sent", 90)), fontsize=10)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _series_name(series: tuple[str, str]) -> str:
    """The method, and the optimizer when that is not the default."""
    method, optimizer = series
    return method if optimizer == config.SETTINGS["optimizer"].default else f"{method}, {optimizer.upper()}"


_SERIES_COLOURS = {
    "sync": "tab:blue",
    "codistill, 2 groups": "tab:orange",
    "codistill, 4 groups": "tab:green",
}


def _series_style(series: tuple[str, str], index: int) -> dict:
    """One colour per method, dashed with square markers for a non-default optimizer."""
    method, optimizer = series
    colour = _SERIES_COLOURS.get(method, f"C{(index + 3) % 10}")
    other = optimizer != config.SETTINGS["optimizer"].default
    return {"color": colour, "linestyle": "--" if other else "-", "marker": "s" if other else "o"}


def _batch_axis(ax, batches) -> None:
    from matplotlib.ticker import FuncFormatter

    ax.set_xscale("log", base=2)
    if batches:
        ax.set_xticks(batches)
    ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:,.0f}"))
    ax.xaxis.set_minor_formatter(FuncFormatter(lambda value, _: ""))
    ax.set_xlabel("total batch (examples per update, all groups)")
    ax.grid(alpha=0.3, which="both")


def _plot_updates(data: StudyData, path: str) -> None:
    """Two panels against the total batch, one line per kind of arm (sync,
    codistillation with G groups; per optimizer), each at its best grid point:
    the updates to the target accuracy (over the seeds that reached it, with
    how many did) and the final test accuracy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    study, target = data.study, data.study["target_accuracy"]
    series = target_series(data)
    batches = sorted({b for points in series.values() for b, _ in points})
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8), layout="constrained")
    for i, (key, points) in enumerate(series.items()):
        name, style = _series_name(key), _series_style(key, i)
        reached, final = [], []
        for batch, label in points:
            runs = data.ok(label)
            got = finite([data.updates_to(label, r["seed"], target) for r in runs])
            if got:
                reached.append((batch, *stats.mean_se(got), len(got), len(runs)))
            accs = finite([100 * r["test_accuracy"] for r in runs])
            if accs:
                final.append((batch, *stats.mean_se(accs)))
        if reached:
            xs, ys, es, _, _ = zip(*reached)
            left.errorbar(xs, ys, yerr=es, capsize=3, label=name, **style)
            if key[0] == "sync":
                _critical_batch(left, [(x, y) for x, y, _, got, seeds in reached if got == seeds], style)
            for x, y, _, got, seeds in reached:
                if got < seeds:  # not every seed reached it
                    left.annotate(
                        f"{got}/{seeds}", (x, y), textcoords="offset points", xytext=(5, 5), fontsize=7
                    )
        if final:
            xs, ys, es = zip(*final)
            right.errorbar(xs, ys, yerr=es, capsize=3, label=name, **style)
    left.set_yscale("log")
    plain = FuncFormatter(lambda value, _: f"{value:,.0f}")
    left.yaxis.set_major_formatter(plain)
    left.yaxis.set_minor_formatter(plain)
    left.set(
        ylabel=f"updates to {100 * target:g}% {selection.curve_split(study)} accuracy",
        title=f"Updates to {100 * target:g}% (seeds that reached it; n/m where not all did; none: no point)",
    )
    right.set(ylabel="final test accuracy, %", title="Final test accuracy")
    right.axhline(100 * target, color="grey", linewidth=0.8, linestyle=":")
    for ax in (left, right):
        _batch_axis(ax, batches)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.suptitle(
        "\n".join(textwrap.wrap(f"{study['title']}: mean ± s.e. over seeds, best grid point per arm", 110))
    )
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_curves_by_batch(data: StudyData, path: str) -> None:
    """A target study's curves: one panel per total batch, test accuracy against
    updates, one line per kind of arm at its best grid point (mean ± s.e.)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from tf_codistill.report import curve_band

    series = target_series(data)
    batches = sorted({b for points in series.values() for b, _ in points})
    fig, axes = plt.subplots(
        1, len(batches), figsize=(4 * len(batches), 4), layout="constrained", squeeze=False
    )
    target = data.study["target_accuracy"]
    for ax, batch in zip(axes[0], batches):
        for i, (key, points) in enumerate(series.items()):
            for b, label in points:
                if b != batch:
                    continue
                curves = [data.curves.get((label, r["seed"]), []) for r in data.ok(label)]
                curves = [c for c in curves if c]
                if not curves:
                    continue
                mean, se = curve_band([[100 * c["val_accuracy"] for c in curve] for curve in curves])
                xs = [c["updates"] for c in curves[0][: len(mean)]]
                style = _series_style(key, i)
                ax.plot(xs, mean, color=style["color"], linestyle=style["linestyle"], label=_series_name(key))
                if se is not None:
                    ax.fill_between(xs, mean - se, mean + se, color=style["color"], alpha=0.2)
        ax.axhline(100 * target, color="grey", linewidth=0.8, linestyle=":")
        ax.set(title=f"total batch {batch:,}", xlabel="updates", ylim=(0, 100))
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(f"{selection.curve_split(data.study)} accuracy, % (mean ± s.e. over seeds)")
    handles = {}  # every line once, whichever panel has it (e.g. an optimizer at one batch only)
    for ax in axes[0]:
        for handle, name in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(name, handle)
    axes[0][0].legend(list(handles.values()), list(handles), fontsize=8, loc="lower right")
    fig.suptitle("\n".join(textwrap.wrap(f"{data.study['title']}: best grid point per arm", 110)))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _critical_batch(ax, points, style) -> None:
    """Over sync's updates-to-target points (every seed reached it): the fit
    S(b) = S_min (1 + B_noise / b), dashed, and the knee (the smallest b whose
    doubling saves less than a third of the updates), named on the plot."""
    import numpy as np

    if len(points) < 3:
        return
    fit = selection.fit_critical_batch(points)
    if fit is not None:
        s_min, b_noise = fit
        grid = np.geomspace(min(b for b, _ in points), max(b for b, _ in points), 100)
        ax.plot(
            grid,
            s_min * (1 + b_noise / grid),
            linestyle="--",
            linewidth=1,
            color=style.get("color", "grey"),
            label=f"fit S_min (1 + B_noise / b): B_noise = {b_noise:,.0f}",
        )
    found = selection.knee(points)
    if found is not None:
        ax.axvline(found, color="grey", linewidth=0.8, linestyle=":")
        ax.annotate(
            f"knee: b = {found:,}",
            (found, dict(points)[found]),
            textcoords="offset points",
            xytext=(6, 12),
            fontsize=8,
        )

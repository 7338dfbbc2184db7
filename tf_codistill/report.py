"""What a run reports: the console line per epoch, per-epoch training time,
bytes on the wire, the results table and the plots (train.py's and the study
runner's)."""

from __future__ import annotations

import io
import math
import textwrap
import time

import keras

from tf_codistill import files, traffic
from tf_codistill.results import RunResult

__all__ = ["EpochLine", "EpochTimer", "keras_verbose", "plot_runs", "plot_histories", "format_table"]

# Pooled metrics, in the order of the console line; per-group ones (g0_...)
# go to TensorBoard, history.csv and --verbose=3.
EPOCH_LINE_KEYS = (
    "loss",
    "task_loss",
    "distill_loss",
    "accuracy",
    "agreement",
    "val_accuracy",
    "val_ensemble_accuracy",
)
# Language models: validation NLL (nats per token) in place of accuracy.
TEXT_LINE_KEYS = (
    "loss",
    "task_loss",
    "distill_loss",
    "accuracy",
    "agreement",
    "val_loss",
    "val_ensemble_loss",
)


def keras_verbose(verbose: int) -> int:
    """`model.fit`'s verbose for train.py's --verbose: at 2 `EpochLine` prints
    the short line instead of Keras; 3 is Keras's own line, every metric."""
    return {2: 0, 3: 2}.get(verbose, verbose)


class EpochLine(keras.callbacks.Callback):
    """Prints one short line per epoch (train.py --verbose=2): the pooled
    metrics, then seconds (`epoch_seconds`, training only, where an
    `EpochTimer` runs before this callback; else the epoch's wall time,
    evaluation included).

        [codistill] epoch 2/12  loss 1.9719  task_loss 1.8876  ...  val_accuracy 0.2525  3.1s

    Args:
        epochs: Epochs in the run (the denominator printed).
        verbose: train.py's --verbose; the line is printed only at 2.
    """

    def __init__(self, epochs: int, verbose: int = 2, keys: tuple[str, ...] = EPOCH_LINE_KEYS):
        super().__init__()
        self.epochs = epochs
        self.keys = keys
        self.enabled = verbose == 2
        self._start = None

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        if self.enabled:
            wall = time.perf_counter() - self._start if self._start is not None else math.nan
            print(
                format_epoch_line(self.model.name, epoch, self.epochs, logs or {}, wall, self.keys),
                flush=True,
            )


def format_epoch_line(
    name: str,
    epoch: int,
    epochs: int,
    logs: dict,
    wall_seconds: float,
    keys: tuple[str, ...] = EPOCH_LINE_KEYS,
) -> str:
    """`EpochLine`'s text for `epoch` (0-based) of `epochs`."""
    parts = [f"[{name}] epoch {epoch + 1}/{epochs}"]
    parts += [f"{key} {float(logs[key]):.4f}" for key in keys if key in logs]
    if float(logs.get("bad_peer_steps", 0)):  # only when a peer misbehaved
        parts.append(f"bad_peer_steps {float(logs['bad_peer_steps']):g}")
    if "staleness" in logs:
        parts.append(f"staleness {float(logs['staleness']):g}")
    parts.append(f"{float(logs.get('epoch_seconds', wall_seconds)):.1f}s")
    return "  ".join(parts)


class EpochTimer(keras.callbacks.Callback):
    """Puts `epoch_seconds` into each epoch's logs: the time spent in training
    batches, evaluation left out. `seconds` sums them over the run.

    Keras hands one logs dict to the callbacks in list order, so put this
    callback before every one that reads or saves epoch logs (a backup,
    `CSVLogger`, `TensorBoard`, `EpochLine`); Keras's `History` comes last.
    """

    def __init__(self):
        super().__init__()
        self.seconds = 0.0
        self._epoch_seconds = 0.0
        self._start = None

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch_seconds = 0.0
        self._start = time.perf_counter()

    def on_test_begin(self, logs=None):  # validation: the epoch's training is over
        if self._start is not None:
            self._epoch_seconds += time.perf_counter() - self._start
            self._start = None

    def on_epoch_end(self, epoch, logs=None):
        self.on_test_begin()
        self.seconds += self._epoch_seconds
        if logs is not None:
            logs["epoch_seconds"] = self._epoch_seconds


def _traffic(config, runtime, exchange, groups: int, batch: int, spec, num_params: int):
    """Bytes per training step, per worker: (inside the group, across
    groups, sent over a process boundary in all, what a multi-worker job of
    this arm would send). Predictions count every position of a sequence."""
    outputs = spec.num_classes * (spec.context or 1)  # logits per example
    if runtime.distributed or runtime.separate_group:
        group_size = runtime.topology.group_size if runtime.distributed else 1
        in_group = traffic.allreduce_bytes(num_params, group_size)
        cross_group = (
            exchange.bytes_sent_per_step(batch // group_size, outputs, num_params) if exchange else 0.0
        )
        sent = in_group + cross_group
        equivalent = sent
    elif exchange is not None:
        in_group = cross_group = sent = 0.0
        equivalent = exchange.bytes_sent_per_step(batch, outputs, num_params)
    else:
        in_group = cross_group = sent = 0.0
        if groups > 1:
            # An all-gather of every group's logits: each worker sends its own
            # (batch x classes) block to each of the other groups.
            equivalent = traffic.allgather_bytes(batch, outputs, groups)
        else:
            # Ring all-reduce of the gradient over as many workers as the
            # codistillation arm has groups.
            equivalent = traffic.allreduce_bytes(num_params, max(config.num_groups, 1))
    return in_group, cross_group, sent, equivalent


ZOOM_POINTS = 3.0  # the zoomed panel shows the lines that end within this many points of the best


def curve_band(curves):
    """The mean over runs of per-epoch values, and its standard error (None
    for one run), over the epochs every run has: two NumPy arrays."""
    import numpy as np

    length = min(len(c) for c in curves)
    data = np.array([c[:length] for c in curves], dtype=float)
    se = data.std(0, ddof=1) / np.sqrt(len(curves)) if len(curves) > 1 else None
    return data.mean(0), se


EXTRA_COLOURS = ("black", "navy", "darkgoldenrod", "maroon", "teal", "indigo", "olive", "salmon")


def arm_colour(index: int) -> str:
    """The colour of the index-th arm of a plot: the default cycle's ten, then
    eight darker ones (past ten arms the cycle would repeat)."""
    return f"C{index}" if index < 10 else EXTRA_COLOURS[(index - 10) % len(EXTRA_COLOURS)]


def plot_runs(
    runs: dict[str, list[dict]],
    path: str,
    title: str | None = None,
    xlabel: str = "epoch (of the sync arm; equal updates per model)",
    metric: str = "accuracy",
    x_key: str | None = None,
) -> None:
    """Test accuracy and training task loss against epochs, one line per label
    (with 5 or more epochs, a middle panel zooms into the last 40% of the
    epochs' test accuracy).

    train.py plots one run per arm; the study runner several seeds per arm,
    drawn as their mean with a band of ± one standard error. Where runs log
    `val_ensemble_accuracy` (codistillation), the ensemble's test accuracy is
    dashed in the same colour.

    Args:
        runs: label -> the histories of that label's runs (`{"val_accuracy":
            [...], "task_loss": [...], ...}`, one value per epoch).
        path: Where the PNG goes.
        title: Drawn above both panels (wrapped, never clipped).
        xlabel: Both panels' x-axis label.
        metric: "accuracy", or "loss" for language models (validation NLL
            from `val_loss`, lower is better).
        x_key: A history key holding each epoch's x value (e.g. "updates"),
            drawn against instead of the epoch number (None: epochs 1, 2, ...).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    longest = max((len(h.get("task_loss", [])) for hs in runs.values() for h in hs), default=0)
    # Converged runs differ by tenths of a point, invisible on the whole
    # curve's scale: a third panel shows the last 40% of the epochs, zoomed.
    zoom = longest >= 5
    fig, axes = plt.subplots(1, 3 if zoom else 2, figsize=(16 if zoom else 11, 4.5), layout="constrained")
    ax_acc, ax_loss = axes[0], axes[-1]
    ax_zoom = axes[1] if zoom else None
    zoom_spans = []  # (final mean, lowest, highest) of each accuracy line in the zoomed range
    for index, (label, histories) in enumerate(runs.items()):
        color = arm_colour(index)
        for key, ax, style in (
            (f"val_{metric}", ax_acc, "-"),
            (f"val_ensemble_{metric}", ax_acc, "--"),
            ("task_loss", ax_loss, "-"),
        ):
            curves = [h[key] for h in histories if h.get(key)]
            if not curves:
                continue
            mean, se = curve_band(curves)
            length = len(mean)
            epochs = np.arange(1, length + 1)
            if x_key is not None:
                epochs = np.asarray(next(h[x_key] for h in histories if h.get(key))[:length])
            (line,) = ax.plot(
                epochs,
                mean,
                style,
                color=color,
                label=label if style == "-" else f"{label} ensemble",
                marker="o" if length <= 30 else None,  # few epochs: every point visible
                markersize=3,
            )
            color = line.get_color()
            if se is not None:
                ax.fill_between(epochs, mean - se, mean + se, color=color, alpha=0.2, linewidth=0)
            if zoom and ax is ax_acc:
                tail = slice(int(length * 0.6), None)
                ax_zoom.plot(epochs[tail], mean[tail], style, color=color, marker="o", markersize=3)
                low, high = mean[tail], mean[tail]
                if se is not None:
                    low, high = (mean - se)[tail], (mean + se)[tail]
                    ax_zoom.fill_between(epochs[tail], low, high, color=color, alpha=0.2, linewidth=0)
                zoom_spans.append((mean[-1], float(low.min()), float(high.max())))
    if (
        longest <= 30 and x_key is None
    ):  # few epochs: whole-number ticks need room on both sides, even for one point
        for ax in (ax_acc, ax_loss):
            ax.set_xlim(0.5, longest + 0.5)
    text = metric == "loss"
    what = "validation NLL (nats per token)" if text else "test accuracy"
    if zoom:
        title_zoom = f"{what[0].upper()}{what[1:]}, last 40% of the epochs (zoomed)"
        if zoom_spans:
            # The y-range of the lines that end within ZOOM_POINTS of the best:
            # a collapsed arm would otherwise flatten the rest.
            sign = -1 if text else 1
            best = max(sign * final for final, _, _ in zoom_spans)
            near = [
                (low, high) for final, low, high in zoom_spans if sign * final >= best - ZOOM_POINTS / 100
            ]
            low, high = min(lo for lo, _ in near), max(hi for _, hi in near)
            margin = max((high - low) * 0.08, 1e-4)
            ax_zoom.set_ylim(low - margin, high + margin)
            if len(near) < len(zoom_spans):
                title_zoom += f";\nlines ending over {ZOOM_POINTS:g} points below the best are off the panel"
        ax_zoom.set(xlabel=xlabel, ylabel=what, title=title_zoom)
    seeds = max((len(h) for h in runs.values()), default=1)
    spread = f" (mean ± s.e. over {seeds} seeds)" if seeds > 1 else ""
    ax_acc.set(
        xlabel=xlabel,
        ylabel=f"{what} (mean of a run's groups)",
        title=("Validation NLL" if text else "Test accuracy") + spread,
    )
    ax_loss.set(
        xlabel=xlabel, ylabel="training task loss (log scale)", title="Training loss" + spread, yscale="log"
    )
    # Log-scale ticks as plain numbers (1.5, not 1.5 x 10^0); over more than a
    # decade only 2s and 5s between the powers of ten, so that labels stay apart.
    low, high = ax_loss.get_ylim()
    ax_loss.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    ax_loss.yaxis.set_minor_formatter(
        FuncFormatter(
            lambda value, _: (
                f"{value:g}"
                if high / low < 10 or round(value / 10 ** math.floor(math.log10(value))) in (2, 5)
                else ""
            )
        )
    )
    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
        ax.grid(alpha=0.3)
    for ax in (ax_acc, ax_loss):
        ax.legend(fontsize=8)
    if title:
        fig.suptitle("\n".join(textwrap.wrap(title, 110)))
    image = io.BytesIO()
    fig.savefig(image, format="png", dpi=110)
    plt.close(fig)
    files.write_atomic(path, image.getvalue())  # any tf.io.gfile filesystem


def plot_histories(histories: dict[str, dict], path: str, metric: str = "accuracy") -> None:
    """train.py's comparison plot: one run per arm (see `plot_runs`)."""
    plot_runs({arm: [history] for arm, history in histories.items()}, path, metric=metric)


def format_table(runs: list[RunResult]) -> str:
    """The table train.py prints at the end: one column per arm."""
    rows = [("", *[r.arm for r in runs])]

    def row(name, fn):
        rows.append((name, *[fn(r) for r in runs]))

    def mean(values):
        return sum(values) / len(values)

    def groups(run: RunResult, key: str) -> list[float]:
        return [getattr(g, key) for g in run.groups]

    row("groups x batch", lambda r: f"{r.num_groups} x {r.batch_size_per_group}")
    row("updates per model", lambda r: str(r.steps))
    row("test accuracy (mean of groups)", lambda r: f"{mean(groups(r, 'test_accuracy')):.4f}")
    row("test accuracy per group", lambda r: " ".join(f"{v:.4f}" for v in groups(r, "test_accuracy")))
    row(
        "ensemble test accuracy",
        lambda r: "-" if r.ensemble_test_accuracy is None else f"{r.ensemble_test_accuracy:.4f}",
    )
    row("test loss (mean)", lambda r: f"{mean(groups(r, 'test_loss')):.4f}")
    if all(r.groups[0].best_val_loss is not None for r in runs):  # language models: NLL in nats per token
        row("validation NLL, final (mean)", lambda r: f"{mean(groups(r, 'val_loss')):.4f}")
        row("validation NLL, best (mean)", lambda r: f"{mean(groups(r, 'best_val_loss')):.4f}")
        row(
            "ensemble validation NLL, final",
            lambda r: "-" if r.ensemble_val_loss is None else f"{r.ensemble_val_loss:.4f}",
        )
        row("test perplexity (mean)", lambda r: f"{mean(groups(r, 'test_perplexity')):.2f}")
    row("train task loss (mean)", lambda r: f"{mean(groups(r, 'train_loss')):.4f}")
    row("bytes exchanged per step (equiv.)", lambda r: f"{r.bytes_equivalent_per_step:,.0f}")
    row("examples / second", lambda r: f"{r.examples_per_second:,.0f}")
    row("wall seconds", lambda r: f"{r.wall_seconds:.1f}")
    widths = [max(len(str(c)) for c in col) for col in zip(*rows)]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)

"""What a run reports: bytes on the wire, the results table and the plots."""

from __future__ import annotations


def _traffic(config, runtime, exchange, groups: int, batch: int, spec, num_params: int):
    """Bytes per training step, per worker: (inside the group, across
    groups, sent over a process boundary in all, what a multi-worker job of
    this arm would send)."""
    if runtime.distributed or config.separate_group():
        group_size = runtime.topology.group_size if runtime.distributed else 1
        in_group = 2 * (group_size - 1) / group_size * num_params * 4
        cross_group = (
            exchange.bytes_sent_per_step(batch // group_size, spec.num_classes, num_params)
            if exchange
            else 0.0
        )
        sent = in_group + cross_group
        equivalent = sent
    elif exchange is not None:
        in_group = cross_group = sent = 0.0
        equivalent = exchange.bytes_sent_per_step(batch, spec.num_classes, num_params)
    else:
        in_group = cross_group = sent = 0.0
        if groups > 1:
            # An all-gather of every group's logits: each worker sends its own
            # (batch x classes) block to each of the other groups.
            equivalent = (groups - 1) * batch * spec.num_classes * 4
        else:
            # Ring all-reduce of the gradient over as many workers as the
            # codistillation arm has groups.
            workers = max(config.num_groups, 1)
            equivalent = 2 * (workers - 1) / workers * num_params * 4
    return in_group, cross_group, sent, equivalent


def plot_histories(histories: dict[str, dict], path: str) -> None:
    """Test accuracy and training (task) loss per epoch, one line per arm."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(11, 4))
    colors = {"sync": "tab:blue", "codistill": "tab:orange"}
    for arm, h in histories.items():
        epochs = range(1, len(h["task_loss"]) + 1)
        color = colors.get(arm)
        label = arm if arm == "sync" else f"{arm} (mean of groups)"
        ax_acc.plot(epochs, h["val_accuracy"], label=label, color=color)
        if "val_ensemble_accuracy" in h:
            ax_acc.plot(epochs, h["val_ensemble_accuracy"], "--", label=f"{arm} ensemble", color=color)
        ax_loss.plot(epochs, h["task_loss"], label=label, color=color)
    ax_acc.set(xlabel="epoch (equal updates per model)", ylabel="test accuracy", title="Test accuracy")
    ax_loss.set(
        xlabel="epoch (equal updates per model)",
        ylabel="training task loss",
        title="Training loss",
        yscale="log",
    )
    for ax in (ax_acc, ax_loss):
        ax.grid(alpha=0.3)
        ax.legend()
    lows = [min(h["val_accuracy"][len(h["val_accuracy"]) // 3 :]) for h in histories.values()]
    if lows:
        ax_acc.set_ylim(max(0.0, min(lows) - 0.05), 1.0)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def format_table(runs: list[dict]) -> str:
    rows = [("", *[r["arm"] for r in runs])]

    def row(name, fn):
        rows.append((name, *[fn(r) for r in runs]))

    def mean(values):
        return sum(values) / len(values)

    row("groups x batch", lambda r: f"{r['num_groups']} x {r['batch_size_per_group']}")
    row("updates per model", lambda r: str(r["steps"]))
    row("test accuracy (mean of groups)", lambda r: f"{mean([g['test_accuracy'] for g in r['groups']]):.4f}")
    row("test accuracy per group", lambda r: " ".join(f"{g['test_accuracy']:.4f}" for g in r["groups"]))
    row(
        "ensemble test accuracy",
        lambda r: "-" if r["ensemble_test_accuracy"] is None else f"{r['ensemble_test_accuracy']:.4f}",
    )
    row("test loss (mean)", lambda r: f"{mean([g['test_loss'] for g in r['groups']]):.4f}")
    row("train task loss (mean)", lambda r: f"{mean([g['train_loss'] for g in r['groups']]):.4f}")
    row("bytes exchanged per step (equiv.)", lambda r: f"{r['bytes_equivalent_per_step']:,.0f}")
    row("examples / second", lambda r: f"{r['examples_per_second']:,.0f}")
    row("wall seconds", lambda r: f"{r['wall_seconds']:.1f}")
    widths = [max(len(str(c)) for c in col) for col in zip(*rows)]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)

"""report.py: the per-epoch console line, per-epoch training seconds, and the
plot shared by train.py and the study runner."""

import csv

import keras
import numpy as np
import pytest

from tf_codistill import report


def _fit(tmp_path, callbacks, epochs=3, verbose=0):
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)], name="arm")
    model.compile(optimizer="sgd", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x, y = np.random.default_rng(0).normal(size=(64, 4)), np.arange(64) % 3
    return model.fit(
        x, y, batch_size=16, epochs=epochs, validation_data=(x, y), callbacks=callbacks, verbose=verbose
    )


def test_epoch_timer_puts_training_seconds_into_every_logger(tmp_path):
    timer = report.EpochTimer()
    path = tmp_path / "history.csv"
    history = _fit(tmp_path, [timer, keras.callbacks.CSVLogger(str(path))]).history
    with open(path) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3 and all(float(r["epoch_seconds"]) > 0 for r in rows)
    assert history["epoch_seconds"] == [float(r["epoch_seconds"]) for r in rows]
    assert timer.seconds == pytest.approx(sum(history["epoch_seconds"]))


def test_epoch_line_is_short_and_pooled(capsys):
    logs = {
        "loss": 1.9719,
        "task_loss": 1.8876,
        "distill_loss": 0.0799,
        "accuracy": 0.247,
        "agreement": 0.536,
        "alpha": 1.0,
        "bad_peer_steps": 0.0,
        "g0_accuracy": 0.2445,
        "g0_task_loss": 1.9127,
        "g1_accuracy": 0.2495,
        "g1_task_loss": 1.8624,
        "val_accuracy": 0.2525,
        "val_agreement": 0.494,
        "val_ensemble_accuracy": 0.257,
        "val_g0_accuracy": 0.257,
        "val_loss": 1.8303,
        "epoch_seconds": 12.34,
    }
    line = report.format_epoch_line("codistill", 59, 60, logs, wall_seconds=99.0)
    assert line.startswith("[codistill] epoch 60/60  loss 1.9719  task_loss 1.8876  distill_loss 0.0799")
    assert "val_ensemble_accuracy 0.2570" in line and line.endswith("12.3s")
    assert "g0_" not in line and "bad_peer_steps" not in line and "alpha" not in line
    assert len(line) <= 200, len(line)
    warned = report.format_epoch_line("codistill", 0, 60, {**logs, "bad_peer_steps": 3.0}, 1.0)
    assert "bad_peer_steps 3" in warned


@pytest.mark.parametrize("verbose,lines", [(0, 0), (1, 0), (2, 3), (3, 0)])
def test_epoch_line_prints_at_verbose_2_only(verbose, lines, tmp_path, capsys):
    _fit(tmp_path, [report.EpochLine(3, verbose)], verbose=0)
    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[arm] epoch")]
    assert len(printed) == lines
    assert report.keras_verbose(verbose) == {0: 0, 1: 1, 2: 0, 3: 2}[verbose]


def test_plot_runs_one_run_and_seeds(tmp_path):
    one = {"sync": [{"val_accuracy": [0.1, 0.5, 0.7], "task_loss": [50.0, 1.0, 0.5]}]}
    report.plot_runs(one, str(tmp_path / "one.png"))
    seeds = {
        "sync": [{"val_accuracy": [0.2, 0.6], "task_loss": [2.0, 1.0]} for _ in range(3)],
        "codistill": [
            {
                "val_accuracy": [0.3, 0.5 + s / 100],
                "val_ensemble_accuracy": [0.4, 0.6],
                "task_loss": [2.0, 1.1],
            }
            for s in range(3)
        ],
    }
    report.plot_runs(seeds, str(tmp_path / "seeds.png"), title="A title " * 20)
    assert (tmp_path / "one.png").stat().st_size > 10_000 and (tmp_path / "seeds.png").stat().st_size > 10_000

"""The slow-network benchmark's bookkeeping (no namespaces, no root, no TensorFlow):
time to target from epoch_seconds, bytes per step from counter samples, sweep rows."""

import argparse
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))

import bench_slow_network as bench  # noqa: E402
import sweep_network as sweep  # noqa: E402


def _run(curve, seconds, steps=60, epochs=3):
    return {
        "examples_per_second": 640.0,
        "val_accuracy_curve": curve,
        "epoch_seconds_curve": seconds,
        "steps_per_epoch": steps // epochs,
        "epochs": epochs,
        "steps": steps,
        "train_seconds": sum(seconds),
        "wall_seconds": sum(seconds) + 5,
        "groups": [{"test_accuracy": 0.9}, {"test_accuracy": 0.8}],
        "params_per_model": 1000,
        "bytes_sent_per_step": 4000.0,
        "exchange": "horovod",
        "wire": {"tx_bytes_per_step": 4200.0, "rx_bytes_per_step": 4100.0, "window_steps": 50},
    }


def test_time_to_target_sums_the_measured_epochs():
    args = argparse.Namespace(batch_size=64, target_accuracy=0.85)
    row = bench.summarise("predictions", _run([0.5, 0.86, 0.9], [5.0, 1.0, 2.0]), args)
    # Reached in epoch 2: the first two epochs' training seconds, not 2/3 of the total.
    assert row["epochs_to_target"] == 2
    assert row["seconds_to_target"] == pytest.approx(6.0)
    assert row["steps_to_target"] == 40
    # Steady: the 40 steps after the tracing epoch in 3 s.
    assert row["steady_steps_per_second"] == pytest.approx(40 / 3.0)
    assert row["steps_per_second"] == pytest.approx(10.0)
    assert row["wire_tx_bytes_per_step"] == 4200.0
    assert row["test_accuracy"] == pytest.approx(0.85)
    missed = bench.summarise("sync", _run([0.5, 0.6, 0.7], [5.0, 1.0, 2.0]), args)
    assert missed["seconds_to_target"] is None and missed["epochs_to_target"] is None


def test_wire_counters_per_step_window():
    w = bench.WireCounters.__new__(bench.WireCounters)
    w.hosts = 2
    # (time, tx, rx, steps logged): setup traffic before step 1 and after the end left out.
    host = [(0, 0, 0, 0), (1, 500, 50, 1), (2, 1500, 550, 11), (3, 2400, 1050, 20), (4, 9999, 9999, 20)]
    w.samples = [host, host]
    got = w.per_step(20)
    assert got["tx_bytes_per_step"] == pytest.approx((2400 - 500) / 19)
    assert got["rx_bytes_per_step"] == pytest.approx((1050 - 50) / 19)
    assert got["window_steps"] == 19
    w.samples = [[(0, 0, 0, 0)], host]
    assert w.per_step(20) is None  # too few samples inside training


def test_sweep_rows_and_refit():
    def summary(rate, sync_s, pred_s):
        arms = []
        for arm, s in (("sync", sync_s), ("predictions", pred_s)):
            arms.append(
                {
                    "arm": arm, "params": 1_000_000, "steps": 100, "epochs": 5, "steps_per_second": 1 / s,
                    "steady_steps_per_second": 1 / s, "bytes_sent_per_step": 4e6 if arm == "sync" else 1280.0,
                    "wire_tx_bytes_per_step": None, "epochs_to_target": 2, "steps_to_target": 40,
                    "seconds_to_target": 40 * s, "test_accuracy": 0.9,
                }
            )  # fmt: skip
        return {
            "args": {"model": "m", "dataset": "digits", "hosts": 2, "rate_mbit": rate, "batch_size": 64,
                     "exchange_every": 50, "target_accuracy": 0.9},
            "link_check": {"mbit_s": rate * 0.95},
            "arms": arms,
        }  # fmt: skip

    rows = []
    for rate, sync_s, pred_s in ((1000, 0.052, 0.02001), (100, 0.34, 0.0201), (10, 3.22, 0.021)):
        rows += sweep.rows_from_summary(summary(rate, sync_s, pred_s), loadavg=1.0)
    assert len(rows) == 6 and rows[0]["classes"] == 10 and rows[0]["batch_per_worker"] == 32
    fit = sweep.refit(rows, cores=2)
    assert fit["fitted"] and fit["fit_points"] == 3 and fit["held_out_points"] == 3
    by = {(r["rate_mbit"], r["arm"]): r for r in rows}
    assert by[(100.0, "predictions")]["speedup_vs_sync"] == pytest.approx(0.34 / 0.0201)
    assert by[(100.0, "predictions")]["time_to_target_speedup_vs_sync"] == pytest.approx(0.34 / 0.0201)
    # 4 MB at 100 vs 1,000 Mbit/s took 0.288 s more: efficiency 1; the 10 Mbit/s sync point is held out.
    assert fit["params"]["efficiency"] == pytest.approx(1.0, rel=1e-3)
    assert by[(10.0, "sync")]["role"] == "held-out"
    assert abs(by[(10.0, "sync")]["prediction_error"]) < 0.01
    assert abs(fit["worst_held_out"]["relative_error"]) < 0.01

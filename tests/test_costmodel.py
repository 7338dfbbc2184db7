"""The cost model's arithmetic (bench/costmodel.py): pure Python, fast."""

import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))

import costmodel  # noqa: E402
from costmodel import Params, Point  # noqa: E402

from tf_codistill import traffic  # noqa: E402


def test_traffic_formulas():
    """tf_codistill.traffic: the formulas the cost model, the exchanges and the report share."""
    # Ring all-reduce: 2 (N-1)/N x params x 4.
    assert traffic.allreduce_bytes(1_000, 2) == 4_000
    assert traffic.allreduce_bytes(1_000, 4) == 6_000
    assert traffic.allreduce_bytes(1_000, 1) == 0
    # All-gather of logits: (N-1) x batch x classes x 4.
    assert traffic.allgather_bytes(32, 10, 2) == 1_280
    assert traffic.allgather_bytes(32, 10, 4) == 3_840
    # Stale weights every K: (N-1) x params x 4 / K.
    assert traffic.stale_weights_bytes(1_000, 2, 50) == 80
    assert traffic.stale_weights_bytes(1_000, 3, 50) == 160
    assert traffic.stale_weights_bytes(1_000, 2, 0) == 0


def test_traffic_matches_train_py_accounting():
    # The figures train.py reported for mlp_wide (1,076,010 parameters) on digits, 2 hosts, batch 32.
    sync = Point("mlp_wide", "sync", 2, 100, 1_076_010, 10, 32)
    assert sync.traffic() == (4_304_040, 2.0)
    assert Point("mlp_wide", "predictions", 2, 100, 1_076_010, 10, 32).traffic() == (1_280, 1.0)
    sent, messages = Point("mlp_wide", "weights", 2, 100, 1_076_010, 10, 32, every=50).traffic()
    assert sent == pytest.approx(86_080.8)
    assert messages == pytest.approx(1 / 50)
    with pytest.raises(ValueError, match="unknown arm"):
        Point("m", "bogus", 2, 100, 1, 1, 1).traffic()


def test_averaging_arms_traffic_and_compute():
    """Averaging every H: the sync all-reduce's bytes and messages / H; with the distillation term
    between the islands, every step the batch's inputs out and the peers' logits back (what
    AveragingExchange accounts)."""
    sent, messages = Point("mlp_wide", "average", 2, 100, 1_076_010, 10, 32, every=50).traffic()
    assert sent == pytest.approx(4_304_040 / 50)
    assert messages == pytest.approx(2 / 50)
    sent, messages = Point("m", "average_predictions", 4, 100, 1_000, 10, 32, every=10, inputs=64).traffic()
    assert sent == pytest.approx(traffic.allreduce_bytes(1_000, 4, 10) + 3 * 32 * (64 + 10) * 4)
    assert messages == pytest.approx(6 / 10 + 6)
    # Unfitted arms take the compute named in COMPUTE_AS; a fitted value of their own wins.
    params = Params(compute={("m", "predictions"): 0.01}, efficiency=1.0)
    p = Point("m", "average", 2, 100, 1_000_000, 10, 32, every=100)
    assert params.step_seconds(p) == pytest.approx(0.01 + 40_000 * 8 / 100e6)
    params.compute[("m", "average")] = 0.02
    assert params.step_seconds(p) == pytest.approx(0.02 + 40_000 * 8 / 100e6)
    assert set(costmodel.ALL_ARMS) == set(costmodel.ARMS) | set(costmodel.COMPUTE_AS)


def test_step_time_and_oversubscription():
    params = Params(compute={("m", "sync"): 0.05}, efficiency=0.5, latency=0.001)
    p = Point("m", "sync", 2, 100, 1_000_000, 10, 32)
    # 4 MB at 50 Mbit/s effective = 0.64 s, plus 2 messages x 1 ms, plus 50 ms.
    assert params.step_seconds(p) == pytest.approx(0.05 + 0.002 + 0.64)
    # 4 workers of 1 thread on 2 cores: compute twice as long.
    p4 = Point("m", "sync", 4, 100, 1_000_000, 10, 32, cores=2)
    assert p4.oversubscription() == 2
    assert params.step_seconds(p4) == pytest.approx(0.1 + 6 * 0.001 + 6e6 * 8 / 50e6)
    with pytest.raises(KeyError, match="no compute time"):
        params.step_seconds(Point("other", "sync", 2, 100, 1, 1, 1))


def _synthetic(truth: Params):
    points = []
    for model, params in (("a", 1_000_000), ("b", 250_000)):
        for rate in (10, 100, 1000):
            for arm in costmodel.ARMS:
                points.append(Point(model, arm, 2, rate, params, 10, 32, cores=2))
        for arm in costmodel.ARMS:
            points.append(Point(model, arm, 4, 100, params, 10, 16, cores=2))
    return points, [truth.step_seconds(p) for p in points]


def test_fit_recovers_known_constants():
    truth = Params(
        compute={(m, a): c for m, c in (("a", 0.02), ("b", 0.06)) for a in costmodel.ARMS},
        efficiency=0.7,
        latency=0.004,
    )
    points, seconds = _synthetic(truth)
    rates = [10, 100, 1000]
    roles = [costmodel.default_fit_role(p, rates) for p in points]
    # 3 arms x 2 models at 1,000 Mbit/s; sync at 100 for each model, 2 and 4 workers.
    assert sum(roles) == 10
    fitted = costmodel.fit(points, seconds, roles)
    assert fitted.efficiency == pytest.approx(0.7, rel=1e-6)
    assert fitted.latency == pytest.approx(0.004, rel=1e-6)
    for p, t in zip(points, seconds):
        assert fitted.step_seconds(p) == pytest.approx(t, rel=1e-6)


def test_fit_keeps_constants_non_negative_and_checks_input():
    # One ring size: latency cannot be told from compute, so it is 0 and compute takes it.
    p = Point("a", "sync", 2, 100, 1_000_000, 10, 32)
    q = Point("a", "sync", 2, 1000, 1_000_000, 10, 32)
    fitted = costmodel.fit([p, q], [0.9, 0.1], [True, True])
    assert fitted.latency == 0
    # 4 MB (32 Mbit) at 100 vs 1,000 Mbit/s took 0.8 s more: efficiency 0.36.
    assert fitted.efficiency == pytest.approx(32e6 * (1 / 100e6 - 1 / 1000e6) / 0.8)
    assert fitted.step_seconds(p) == pytest.approx(0.9)
    # Data that would need a negative latency: pinned to 0, not negative.
    r = Point("a", "sync", 4, 100, 1_000_000, 10, 32)
    fitted = costmodel.fit([p, q, r], [0.9, 0.1, 0.5], [True] * 3)
    assert fitted.latency >= 0 and fitted.efficiency > 0
    with pytest.raises(ValueError, match="same length"):
        costmodel.fit([p], [1.0, 2.0], [True])
    with pytest.raises(ValueError, match="no points"):
        costmodel.fit([p], [1.0], [False])


def test_relative_error():
    assert costmodel.relative_error(1.2, 1.0) == pytest.approx(0.2)
    assert costmodel.relative_error(0.8, 1.0) == pytest.approx(-0.2)


def test_projection_arithmetic():
    # ResNet-50-like: 25.6M parameters, 1,000 classes, batch 32, 16 workers, 10 Gbit/s, ideal network.
    rows = costmodel.projection(25_600_000, 1000, 32, 16, [10.0], 0.1, efficiency=1.0, latency=0.0)
    (row,) = rows
    allreduce = 2 * 15 / 16 * 25_600_000 * 4 * 8 / 10e9
    assert row["sync_step_seconds"] == pytest.approx(0.1 + allreduce)
    gather = 15 * 32 * 1000 * 4 * 8 / 10e9
    assert row["predictions_step_seconds"] == pytest.approx(0.1 + gather)
    assert row["weights_step_seconds"] == pytest.approx(0.1 + 15 * 25_600_000 * 4 / 50 * 8 / 10e9)
    assert row["predictions_speedup"] == pytest.approx(
        row["sync_step_seconds"] / row["predictions_step_seconds"]
    )
    # Two groups of 8: an all-reduce of 8 inside each group plus one all-gather across.
    (two,) = costmodel.projection(25_600_000, 1000, 32, 16, [10.0], 0.1, 1.0, 0.0, groups_of=8)
    inside = 2 * 7 / 8 * 25_600_000 * 4 * 8 / 10e9
    assert two["predictions_step_seconds"] == pytest.approx(0.1 + inside + 1 * 32 * 1000 * 4 * 8 / 10e9)


def test_time_to_target_projection_reproduces_the_measured_link(capsys):
    """bench/time_to_target.py on the committed 100 Mbit/s run: at the run's own rate each arm's
    projection (measured start-up + updates x the model's step) is within the step model's error of
    the measured time to target; slower links never make an arm faster; the printout names a winner."""
    import time_to_target  # noqa: PLC0415

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    run_json = os.path.join(root, "docs", "results", "network", "low_communication_100mbit.json")
    with open(run_json) as f:
        run = json.load(f)
    rows = time_to_target.project(
        run, time_to_target.load_params(time_to_target.COSTMODEL_JSON), [10, 100, 1000], 2
    )
    assert {r["arm"] for r in rows} == {a["arm"] for a in run["arms"] if a.get("steps_to_target")}
    for r in rows:
        measured = r["measured_seconds_to_target"]
        assert abs(r["projected_seconds"][100] - measured) / measured < 0.25, r
        assert r["projected_seconds"][10] >= r["projected_seconds"][100] >= r["projected_seconds"][1000]
    assert time_to_target.main([run_json, "--rates_mbit=10,1000"]) == 0
    out = capsys.readouterr().out
    assert "10 Mbit/s: codistill, predictions every step" in out
    with pytest.raises(SystemExit):
        time_to_target.main([run_json, "--rates_mbit=fast"])

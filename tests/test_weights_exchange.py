"""The stale-weights exchange: local reference, shared-directory transport,
groups that survive each other, and bad peer files."""

import json
import os
import signal
import subprocess
import sys
import time

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import REPO, horovodrun, python_env, worker_env
from test_model import _batch, _clone, _members, _weights

from tf_codistill import CodistillModel
from tf_codistill.exchange.weights import DirectoryTransport, Snapshot, StaleWeightsExchange


def _independent_dataset(steps, size=32):
    batches = [_batch(i, size) for i in range(steps + 1)]

    def gen():
        for i in range(steps):
            (x0, y0), (x1, y1) = batches[i], batches[i + 1]
            yield (x0, x1), (y0, y1)

    spec = ((tf.TensorSpec((size, 12)),) * 2, (tf.TensorSpec((size,), tf.int64),) * 2)
    return tf.data.Dataset.from_generator(gen, output_signature=spec)


def test_refresh_every_step_equals_the_local_exchange_with_own_batches():
    a = _members(2)
    b = [_clone(m) for m in a]
    local = CodistillModel(a, alpha=0.7, distance="kl", data_mode="independent")
    stale = CodistillModel(
        b, alpha=0.7, distance="kl", data_mode="independent", exchange=StaleWeightsExchange(every=1)
    )
    for m in (local, stale):
        m.compile(optimizer=keras.optimizers.SGD(0.3, momentum=0.9))
    ha = local.fit(_independent_dataset(8), epochs=1, verbose=0).history
    hb = stale.fit(_independent_dataset(8), epochs=1, verbose=0).history
    for x, y in zip(_weights(local), _weights(stale)):
        np.testing.assert_allclose(x, y, atol=1e-6)
    assert hb["distill_loss"] == pytest.approx(ha["distill_loss"], abs=1e-6)
    assert hb["staleness"] == [0.0]


def test_stale_copies_lag_by_the_refresh_period():
    members = _members(2)
    exchange = StaleWeightsExchange(every=4)
    model = CodistillModel(members, alpha=0.5, data_mode="independent", exchange=exchange)
    model.compile(optimizer=keras.optimizers.SGD(0.3))
    staleness = []
    model.fit(
        _independent_dataset(10),
        epochs=1,
        verbose=0,
        callbacks=[keras.callbacks.LambdaCallback(on_train_batch_end=lambda b, logs: staleness.append(logs))],
    )
    # Steps since the peer copy was taken, logged as the current value.
    got = [float(logs["staleness"]) for logs in staleness]
    assert got == [0, 1, 2, 3, 0, 1, 2, 3, 0, 1]
    assert exchange.refreshes >= 3


def _weights_of(model_seed=0, classes=5):
    return [np.array(w) for w in _members(1, seed=model_seed)[0].get_weights()]


def test_directory_snapshots_are_atomic_and_pruned(tmp_path):
    transport = DirectoryTransport(str(tmp_path / "x"), keep=2)
    weights = _weights_of()
    for step in (10, 20, 30):
        transport.write(Snapshot(0, step, weights))
    files = sorted(os.listdir(tmp_path / "x" / "group0"))
    assert files == ["step0000000020.npz", "step0000000030.npz"]  # no temporary files left
    snap = transport.newest(0)
    assert snap.step == 30 and all(np.array_equal(a, b) for a, b in zip(snap.weights, weights))


def test_corrupt_or_truncated_peer_files_are_skipped_with_a_warning(tmp_path, capsys):
    transport = DirectoryTransport(str(tmp_path / "x"))
    good = transport.write(Snapshot(1, 100, _weights_of()))
    folder = os.path.dirname(good)
    with open(good, "rb") as f:
        data = f.read()
    with open(os.path.join(folder, "step0000000200.npz"), "wb") as f:
        f.write(data[: len(data) // 2])  # truncated
    with open(os.path.join(folder, "step0000000300.npz"), "wb") as f:
        f.write(b"not a snapshot at all")
    snap = transport.newest(1)
    assert snap.step == 100
    out = capsys.readouterr().out
    assert "skipping unreadable peer snapshot" in out and "step0000000300.npz" in out


def test_a_peer_from_an_incompatible_model_is_a_clear_error(tmp_path):
    transport = DirectoryTransport(str(tmp_path / "x"))
    other = [np.zeros((12, 7), np.float32), np.zeros((7,), np.float32)]
    transport.write(Snapshot(1, 50, other))
    members = _members(1)
    exchange = StaleWeightsExchange(every=5, transport=transport, group=0, num_groups=2)
    model = CodistillModel(members, alpha=1.0, exchange=exchange)
    model.compile(optimizer="sgd")
    x, y = _batch(0)
    with pytest.raises(ValueError, match=r"incompatible model.*\(12, 7\).*this model's are \[\(12, 100\)"):
        model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    exchange.close()


def test_an_unwritable_exchange_directory_fails_at_start(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(ValueError, match="is not writable"):
        DirectoryTransport(str(blocker / "exchange"))


# ------------------------------------------------------------- real processes
def _group_cmd(group, exchange_dir, workdir, data_dir, *extra):
    return [
        sys.executable,
        "train.py",
        "--mode=codistill",
        "--exchange=weights",
        f"--exchange_dir={exchange_dir}",
        f"--group={group}",
        "--num_groups=2",
        "--batch_size=64",
        "--verbose=0",
        f"--data_dir={data_dir}",
        f"--workdir={workdir}",
        "--warmup_epochs=0.2",
        *extra,
    ]


def _start(cmd, log):
    return subprocess.Popen(cmd, cwd=REPO, env=python_env(), stdout=log, stderr=subprocess.STDOUT, text=True)


def _results(workdir):
    return json.loads((workdir / "results.json").read_text())["runs"][0]


def test_two_groups_as_separate_processes_through_a_directory(tmp_path, data_dir, mnist1d_spec):
    exchange_dir = tmp_path / "exchange"
    procs = []
    for g in (0, 1):
        log = open(tmp_path / f"g{g}.log", "w")
        cmd = _group_cmd(g, exchange_dir, tmp_path / f"g{g}", data_dir, "--steps=186", "--exchange_every=20")
        procs.append((_start(cmd, log), log))
    for proc, log in procs:
        assert proc.wait(timeout=240) == 0, (tmp_path / "g0.log").read_text()[-3000:]
        log.close()
    for g in (0, 1):
        run = _results(tmp_path / f"g{g}")
        assert run["exchange"] == "weights/directory" and run["num_groups"] == 2
        assert [x["group"] for x in run["groups"]] == [g]
        assert run["peer_refreshes"] > 0 and run["peer_bytes_received"] > 0
        assert run["bytes_cross_group_per_step"] == pytest.approx(run["params_per_model"] * 4 / 20)
        steps = [json.loads(line) for line in open(tmp_path / f"g{g}" / "codistill" / "steps.jsonl")]
        assert steps[-1]["peer_scale"] == 1.0 and "staleness" in steps[-1]
    assert sorted(os.listdir(exchange_dir)) == ["group0", "group1"]


def _wait_for(predicate, timeout, what, proc=None):
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process ended (code {proc.returncode}) while waiting for {what}")
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.3)


def test_a_killed_group_is_survived_and_rejoins_after_restart(tmp_path, data_dir, mnist1d_spec):
    """Kill group 1 mid-run: group 0 goes on, warns once, drops alpha to 0
    after --peer_timeout; restarted, group 1 resumes from its own backup and
    rejoins; both finish and nothing written before the kill is lost."""
    exchange_dir = tmp_path / "exchange"
    common = ["--exchange_every=10", "--peer_timeout=3", "--on_stale=drop"]
    log0 = open(tmp_path / "g0.log", "w")
    g0 = _start(_group_cmd(0, exchange_dir, tmp_path / "g0", data_dir, "--epochs=160", *common), log0)
    log1 = open(tmp_path / "g1.log", "w")
    g1_cmd = _group_cmd(1, exchange_dir, tmp_path / "g1", data_dir, "--epochs=12", *common)
    g1 = _start(g1_cmd, log1)
    history1 = tmp_path / "g1" / "codistill" / "history.csv"
    try:
        _wait_for(
            lambda: history1.exists() and len(history1.read_text().splitlines()) >= 4,
            120,
            "group 1 to finish 3 epochs",
            g1,
        )
        g1.send_signal(signal.SIGKILL)
        g1.wait(timeout=30)
        log1.close()
        rows_before = history1.read_text().splitlines()
        _wait_for(
            lambda: "peer group 1 is stale" in (tmp_path / "g0.log").read_text(), 60, "group 0 to notice", g0
        )
        log1 = open(tmp_path / "g1.restart.log", "w")
        g1 = _start(g1_cmd, log1)
        assert g1.wait(timeout=180) == 0, (tmp_path / "g1.restart.log").read_text()[-3000:]
        assert g0.wait(timeout=240) == 0, (tmp_path / "g0.log").read_text()[-3000:]
    finally:
        for proc in (g0, g1):
            if proc.poll() is None:
                proc.kill()
        log0.close()
        log1.close()
    out0 = (tmp_path / "g0.log").read_text()
    # Once per outage, not once per step. A loaded machine can stall the
    # restarted group past --peer_timeout again: each extra warning must then
    # be answered by a "back".
    stale, back = out0.count("peer group 1 is stale"), out0.count("peer group 1 is back")
    assert 1 <= stale <= back + 1 and back >= 1, out0[-3000:]
    assert "[backup] resumed from epoch" in (tmp_path / "g1.restart.log").read_text()
    scale = [json.loads(line)["peer_scale"] for line in open(tmp_path / "g0" / "codistill" / "steps.jsonl")]
    assert 0.0 in scale and scale[-1] == 1.0  # dropped while stale, restored once back
    run0, run1 = _results(tmp_path / "g0"), _results(tmp_path / "g1")
    assert run0["groups"][0]["group"] == 0 and run1["groups"][0]["group"] == 1
    rows_after = history1.read_text().splitlines()
    assert rows_after[: len(rows_before)] == rows_before  # nothing written before the kill is lost
    epochs = [int(r.split(",")[0]) for r in rows_after[1:]]
    assert epochs == list(range(12)), epochs


def test_weights_over_horovod_two_groups_of_two(tmp_path, data_dir, mnist1d_spec, horovod_installed):
    """Leaders all-gather flattened weights every K steps and broadcast them in
    their group: groups stay different, workers of a group stay equal."""
    env = worker_env()
    cmd = horovodrun(
        4,
        sys.executable,
        "train.py",
        "--mode=codistill",
        "--exchange=weights",
        "--exchange_every=10",
        "--num_groups=2",
        "--batch_size=64",
        "--steps=40",
        "--verbose=0",
        "--warmup_epochs=0.2",
        "--collective_timeout=60",
        f"--data_dir={data_dir}",
        f"--workdir={tmp_path}",
    )
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run = _results(tmp_path)
    assert run["exchange"] == "weights/horovod" and [g["group"] for g in run["groups"]] == [0, 1]
    sums = {r["rank"]: r["weights_checksum"] for r in run["ranks"]}
    assert sums[0] == sums[1] and sums[2] == sums[3] and sums[0] != sums[2], sums
    assert run["peer_refreshes"] >= 4 and run["staleness_max"] == 9  # copies age 0..9 between refreshes
    steps = [json.loads(line) for line in open(tmp_path / "codistill" / "steps.rank2.jsonl")]
    assert all(s["peer_scale"] == 1.0 for s in steps) and steps[-1]["distill_loss"] > 0


def test_custom_loop_refreshes_stale_copies_like_fit():
    from tf_codistill.loop import CodistillLoop

    a = _members(2)
    b = [_clone(m) for m in a]
    models = []
    for members in (a, b):
        model = CodistillModel(
            members, alpha=0.7, distance="kl", data_mode="independent", exchange=StaleWeightsExchange(every=3)
        )
        model.compile(optimizer=keras.optimizers.SGD(0.3))
        models.append(model)
    models[0].fit(_independent_dataset(9), epochs=1, verbose=0)
    CodistillLoop(models[1]).train(_independent_dataset(9), steps=9)
    for x, y in zip(_weights(models[0]), _weights(models[1])):
        np.testing.assert_allclose(x, y, atol=1e-6)
    assert models[1].exchange.refreshes >= 9

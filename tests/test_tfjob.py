"""A local TFJob stand-in: plain `python train.py` processes (no horovodrun),
each with TF_CONFIG exactly as the Kubeflow Training Operator injects it.

Worker 0 serves Horovod's Gloo rendezvous and every worker sets Horovod's
environment itself (tf_codistill.tfjob.bootstrap_from_tf_config). The
TFJob host names resolve to 127.0.0.1 through TF_CODISTILL_HOST_ALIASES.
"""

import json
import os
import subprocess
import sys
import time

import pytest
from conftest import REPO, python_env, run_tfjobs

from tf_codistill.topology import free_port

TIMEOUT_S = 180
TINY = [
    "--dataset=mnist1d",
    "--model=cnn1d",
    "--batch_size=64",
    "--steps=12",
    "--verbose=0",
    "--warmup_epochs=0.2",
    "--collective_timeout=60",
]


pytestmark = pytest.mark.usefixtures("horovod_installed")


def _ok(results):
    failed = [r for r in results if r[2] != 0]
    report = "\n".join(f"--- {job} worker {i}: exit {code}\n{out[-3000:]}" for job, i, code, out in failed)
    assert not failed, report


def _run(workdir):
    return json.loads((workdir / "results.json").read_text())["runs"][0]


def test_sync_tfjob_is_one_mwms_group(tmp_path, data_dir, mnist1d_spec):
    args = [*TINY, "--mode=sync", f"--data_dir={data_dir}", f"--workdir={tmp_path}"]
    _ok(run_tfjobs([("sync", 2, args)]))
    run = _run(tmp_path)
    assert run["world_size"] == 2 and run["num_groups"] == 1 and run["exchange"] == "allreduce"
    assert [r["rank"] for r in run["ranks"]] == [0, 1]
    assert len({r["weights_checksum"] for r in run["ranks"]}) == 1, run["ranks"]


def test_prediction_exchange_tfjob_splits_workers_into_groups(tmp_path, data_dir, mnist1d_spec):
    args = [*TINY, "--mode=codistill", "--num_groups=2", f"--data_dir={data_dir}", f"--workdir={tmp_path}"]
    _ok(run_tfjobs([("predictions", 4, args)]))
    run = _run(tmp_path)
    assert run["world_size"] == 4 and run["num_groups"] == 2 and run["exchange"] == "horovod"
    assert [g["group"] for g in run["groups"]] == [0, 1]
    sums = {r["rank"]: r["weights_checksum"] for r in run["ranks"]}
    assert [r["group"] for r in run["ranks"]] == [0, 0, 1, 1]
    assert sums[0] == sums[1] and sums[2] == sums[3], sums  # lock-step inside a group
    assert sums[0] != sums[2], sums  # different models across groups


def test_weights_through_a_directory_two_single_worker_tfjobs(tmp_path, data_dir, mnist1d_spec):
    """A TFJob of one worker is a single process (no Horovod); the groups meet in the directory."""
    exchange_dir = tmp_path / "exchange"

    def args(g):
        return [
            *TINY,
            "--mode=codistill",
            "--exchange=weights",
            f"--exchange_dir={exchange_dir}",
            f"--group={g}",
            "--num_groups=2",
            "--exchange_every=5",
            f"--data_dir={data_dir}",
            f"--workdir={tmp_path / f'group{g}'}",
        ]

    _ok(run_tfjobs([("weights-g0", 1, args(0)), ("weights-g1", 1, args(1))]))
    for g in (0, 1):
        run = _run(tmp_path / f"group{g}")
        assert run["exchange"] == "weights/directory" and run["world_size"] == 1
        assert [x["group"] for x in run["groups"]] == [g]


@pytest.mark.parametrize(
    "tf_config, message",
    [
        (
            {
                "cluster": {"worker": ["a:1", "b:2"]},
                "task": {"type": "worker", "index": 2},
                "environment": "cloud",
            },
            "TF_CONFIG: task index 2 is out of range for the 2 worker task(s)",
        ),
        (
            {
                "cluster": {"worker": ["a:1"], "ps": ["p:3"]},
                "task": {"type": "worker", "index": 0},
                "environment": "cloud",
            },
            "TF_CONFIG has parameter servers",
        ),
        (
            {
                "cluster": {"worker": ["a", "b:2"]},
                "task": {"type": "worker", "index": 0},
                "environment": "cloud",
            },
            "expected 'host:port'",
        ),
    ],
)
def test_a_malformed_tfjob_config_fails_at_start(tmp_path, tf_config, message):
    env = python_env()
    env.pop("HOROVOD_RANK", None)
    env["TF_CONFIG"] = json.dumps(tf_config)
    proc = subprocess.run(
        [sys.executable, "train.py", "--mode=sync", f"--workdir={tmp_path}"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("train.py: error:")]
    assert len(errors) == 1 and message in errors[0], proc.stderr[-2000:]
    assert not (tmp_path / "results.json").exists()


def _cloud(monkeypatch, cluster, task, aliases=None):
    for key in ("HOROVOD_RANK", "TF_CODISTILL_RENDEZVOUS_PORT", "TF_CODISTILL_HOST_ALIASES"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": cluster, "task": task, "environment": "cloud"}))
    if aliases:
        monkeypatch.setenv("TF_CODISTILL_HOST_ALIASES", aliases)


def test_chief_comes_first_and_slots_match_horovodrun(monkeypatch):
    from horovod.runner.common.util.hosts import HostInfo, get_host_assignments

    from tf_codistill import tfjob, topology

    cluster = {"chief": ["c:2222"], "worker": ["w0:2222", "w1:2222"], "evaluator": ["e:2222"]}
    _cloud(monkeypatch, cluster, {"type": "worker", "index": 1}, aliases="w0=10.0.0.2")
    job = tfjob.read_tfjob_config()
    assert job.hosts == ("c", "10.0.0.2", "w1") and job.rank == 2 and job.size == 3
    assert tfjob.launched_by_tfjob() and topology.multi_process_launch()
    assert tfjob._rendezvous_port(job) == 2222
    monkeypatch.setenv("TF_CODISTILL_RENDEZVOUS_PORT", "3333")
    assert tfjob._rendezvous_port(job) == 3333
    # Two hosts with two tasks each: the layout `horovodrun -H a:2,b:2` gives.
    _cloud(monkeypatch, {"worker": ["a:1", "a:2", "b:1", "b:2"]}, {"type": "worker", "index": 0})
    expected = get_host_assignments([HostInfo("a", 2), HostInfo("b", 2)], 4)
    assert tfjob.read_tfjob_config().slots() == [vars(s) for s in expected]


def test_one_worker_and_non_cloud_configs_need_no_horovod(monkeypatch):
    from tf_codistill import tfjob

    _cloud(monkeypatch, {"worker": ["w0:2222"]}, {"type": "worker", "index": 0})
    assert not tfjob.launched_by_tfjob() and not tfjob.bootstrap_from_tf_config(1)
    monkeypatch.setenv(
        "TF_CONFIG",
        json.dumps({"cluster": {"worker": ["a:1", "b:2"]}, "task": {"type": "worker", "index": 0}}),
    )
    assert not tfjob.launched_by_tfjob()  # e.g. the per-group TF_CONFIG of group_tf_config
    assert "HOROVOD_RANK" not in os.environ


def test_a_worker_without_its_rendezvous_fails_in_bounded_time(monkeypatch):
    from tf_codistill import tfjob

    port = free_port()
    _cloud(
        monkeypatch,
        {"worker": [f"w0:{port}", "w1:2"]},
        {"type": "worker", "index": 1},
        "w0=127.0.0.1,w1=127.0.0.1",
    )
    start = time.monotonic()
    with pytest.raises(
        TimeoutError, match=f"waited 2s for the Horovod rendezvous that worker 0 serves at 127.0.0.1:{port}"
    ):
        tfjob.bootstrap_from_tf_config(2)
    assert time.monotonic() - start < 10
    assert "HOROVOD_RANK" not in os.environ


def test_a_taken_rendezvous_port_is_named(monkeypatch):
    import socket

    from tf_codistill import tfjob

    with socket.socket() as taken:
        taken.bind(("", 0))
        taken.listen()
        port = taken.getsockname()[1]
        _cloud(
            monkeypatch,
            {"worker": [f"w0:{port}", "w1:2"]},
            {"type": "worker", "index": 0},
            "w0=127.0.0.1,w1=127.0.0.1",
        )
        with pytest.raises(RuntimeError, match=f"cannot serve the Horovod rendezvous on port {port}"):
            tfjob.bootstrap_from_tf_config(10)
    assert "HOROVOD_RANK" not in os.environ

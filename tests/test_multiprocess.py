"""Replica groups across real processes on localhost: Horovod between groups,
MultiWorkerMirroredStrategy inside them.

Every job is a real `horovodrun --gloo` launch of train.py (or of a small
script using the library), with real sockets and a bounded wall time.
"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import REPO, horovodrun, train_pid, worker_env

import train

COMMON = [
    "--dataset=mnist1d",
    "--model=cnn1d",
    "--verbose=0",
    "--warmup_epochs=0.2",
    "--collective_timeout=60",
]


pytestmark = pytest.mark.usefixtures("horovod_installed")


def launch(np_, args, timeout=240, program=("train.py",)):
    cmd = horovodrun(np_, sys.executable, *program, *args)
    return subprocess.run(cmd, cwd=REPO, env=worker_env(), capture_output=True, text=True, timeout=timeout)


def _ok(proc):
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]


def _steps(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_two_groups_of_two_workers(tmp_path, data_dir, mnist1d_spec):
    proc = launch(
        4,
        [
            *COMMON,
            "--mode=codistill",
            "--num_groups=2",
            "--batch_size=64",
            "--steps=40",
            f"--data_dir={data_dir}",
            f"--workdir={tmp_path}",
        ],
    )
    _ok(proc)
    run = json.loads((tmp_path / "results.json").read_text())["runs"][0]
    assert run["world_size"] == 4 and run["num_groups"] == 2 and run["exchange"] == "horovod"
    assert [g["group"] for g in run["groups"]] == [0, 1]
    sums = {r["rank"]: r["weights_checksum"] for r in run["ranks"]}
    assert sums[0] == sums[1] and sums[2] == sums[3], sums  # lock-step inside a group
    assert sums[0] != sums[2], sums  # groups stay different models
    # No thread leak from MWMS collectives (a per-collective timeout leaked
    # about 20 threads per step here).
    assert max(r["threads"] for r in run["ranks"]) < 400, run["ranks"]
    assert 0.0 <= run["ensemble_test_accuracy"] <= 1.0
    # per worker: logits of 16 examples x 10 classes to the other group, plus
    # the in-group ring all-reduce of the gradient.
    assert run["bytes_cross_group_per_step"] == 16 * 10 * 4
    assert run["bytes_in_group_per_step"] == pytest.approx(2 * 0.5 * run["params_per_model"] * 4)
    rank2 = _steps(tmp_path / "codistill" / "steps.rank2.jsonl")
    assert len(rank2) == 40 and rank2[-1]["distill_loss"] > 0


def test_horovod_exchange_reproduces_the_local_exchange(tmp_path, data_dir, mnist1d_spec):
    steps = 12
    common = dict(dataset="mnist1d", model="cnn1d", batch_size=64, steps=steps, warmup_epochs=0.2, verbose=0)
    local = train.TrainConfig(
        **common, mode="codistill", num_groups=2, data_mode="shared", exchange="local", data_dir=data_dir
    )
    train.train_and_evaluate(local, str(tmp_path / "local"))
    proc = launch(
        2,
        [
            *COMMON,
            "--mode=codistill",
            "--num_groups=2",
            "--batch_size=64",
            f"--steps={steps}",
            f"--data_dir={data_dir}",
            f"--workdir={tmp_path / 'hvd'}",
        ],
    )
    _ok(proc)
    local_steps = _steps(tmp_path / "local" / "codistill" / "steps.jsonl")
    ranks = [_steps(tmp_path / "hvd" / "codistill" / f"steps.rank{r}.jsonl") for r in (0, 1)]
    for k in range(steps):
        for g in (0, 1):
            assert ranks[g][k]["task_loss"] == pytest.approx(local_steps[k][f"g{g}_task_loss"], abs=1e-5)
        distill = (ranks[0][k]["distill_loss"] + ranks[1][k]["distill_loss"]) / 2
        assert distill == pytest.approx(local_steps[k]["distill_loss"], abs=1e-5)


def test_one_group_of_four_is_mwms_sync_training(tmp_path, data_dir, mnist1d_spec):
    steps = 10
    local = train.TrainConfig(
        dataset="mnist1d",
        model="cnn1d",
        batch_size=64,
        steps=steps,
        warmup_epochs=0.2,
        verbose=0,
        mode="sync",
        exchange="local",
        data_dir=data_dir,
    )
    train.train_and_evaluate(local, str(tmp_path / "local"))
    proc = launch(
        4,
        [
            *COMMON,
            "--mode=sync",
            "--batch_size=64",
            f"--steps={steps}",
            f"--data_dir={data_dir}",
            f"--workdir={tmp_path / 'hvd'}",
        ],
    )
    _ok(proc)
    run = json.loads((tmp_path / "hvd" / "results.json").read_text())["runs"][0]
    assert run["num_groups"] == 1 and run["world_size"] == 4 and run["exchange"] == "allreduce"
    assert len({r["weights_checksum"] for r in run["ranks"]}) == 1
    local_steps = _steps(tmp_path / "local" / "sync" / "steps.jsonl")
    hvd_steps = _steps(tmp_path / "hvd" / "sync" / "steps.rank0.jsonl")
    for a, b in zip(local_steps, hvd_steps, strict=True):
        assert b["task_loss"] == pytest.approx(a["task_loss"], abs=1e-5)


def test_three_groups_of_one_worker(tmp_path, data_dir, mnist1d_spec):
    proc = launch(
        3,
        [
            *COMMON,
            "--mode=codistill",
            "--num_groups=3",
            "--batch_size=96",
            "--steps=8",
            f"--data_dir={data_dir}",
            f"--workdir={tmp_path}",
        ],
    )
    _ok(proc)
    run = json.loads((tmp_path / "results.json").read_text())["runs"][0]
    assert [g["group"] for g in run["groups"]] == [0, 1, 2]
    assert len({r["weights_checksum"] for r in run["ranks"]}) == 3


def test_groups_that_do_not_divide_the_world_fail_at_start(tmp_path, data_dir):
    args = [*COMMON, "--mode=codistill", "--num_groups=3", "--batch_size=96", f"--workdir={tmp_path}"]
    proc = launch(4, args, timeout=120)
    assert proc.returncode != 0
    assert "num_groups=3 does not divide the world size 4" in proc.stdout + proc.stderr


SHAPES_SCRIPT = r"""
import os, sys
from tf_codistill import topology
topo, _, pair_set = topology.init_horovod(2, timeout_s=30)
strategy = topology.make_group_strategy(topo)
from models import build_model
from tf_codistill import CodistillModel
from tf_codistill.exchange import HorovodExchange
member = build_model("mlp", (8,), 10 + topo.group)   # group 1 has 11 classes
try:
    CodistillModel([member], exchange=HorovodExchange(topo, pair_set))
except ValueError as err:
    print("ERROR:", err)
    sys.exit(3)
"""


def test_groups_with_different_output_shapes_fail_clearly(tmp_path):
    script = tmp_path / "shapes.py"
    script.write_text(SHAPES_SCRIPT)
    proc = launch(2, [], timeout=120, program=(str(script),))
    assert proc.returncode != 0
    assert "group 0: (10,), group 1: (11,)" in proc.stdout


def test_a_killed_worker_ends_the_job_with_an_error_in_bounded_time(tmp_path, data_dir, mnist1d_spec):
    workdir = tmp_path / "killed"
    cmd = horovodrun(
        2,
        sys.executable,
        "train.py",
        *COMMON,
        "--collective_timeout=20",
        "--mode=codistill",
        "--num_groups=2",
        "--batch_size=64",
        "--steps=100000",
        f"--data_dir={data_dir}",
        f"--workdir={workdir}",
    )
    proc = subprocess.Popen(
        cmd,
        cwd=REPO,
        env=worker_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        steps_file = workdir / "codistill" / "steps.rank1.jsonl"
        deadline = time.monotonic() + 120
        while not (steps_file.exists() and steps_file.stat().st_size > 0):
            assert proc.poll() is None, proc.stdout.read()[-3000:]
            assert time.monotonic() < deadline, "training never started"
            time.sleep(0.5)
        victim = train_pid(str(workdir), rank=1)
        assert victim is not None
        os.kill(victim, signal.SIGKILL)
        killed_at = time.monotonic()
        out, _ = proc.communicate(timeout=90)
        detected = time.monotonic() - killed_at
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode != 0
    assert "Process name: 1" in out or "rank 1" in out, out[-3000:]
    print(f"job ended {detected:.1f} s after the kill")
    assert detected < 60, detected

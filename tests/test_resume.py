"""kill -9 in the middle of training, then the same command: the run goes on
from its last backup and ends exactly where an uninterrupted run ends.

Every mode: one process (local prediction exchange, local stale weights) and
Horovod jobs (sync over MultiWorkerMirroredStrategy, prediction exchange,
stale weights over Horovod). The schedules cross the kill point: alpha ramps
up, the learning rate and weight decay step down. Resumed runs read on in
the uninterrupted run's data order, so on this CPU build every per-step log
line, every epoch row and the final weights match bit for bit.
"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import REPO, horovodrun, python_env, train_pid, worker_env

from tf_codistill import backup

STEPS = 186  # 3 epochs of 62 steps (4,000 examples, batch 64)
COMMON = [
    "--dataset=mnist1d",
    "--model=cnn1d",
    "--batch_size=64",
    f"--steps={STEPS}",
    "--warmup_epochs=0.5",
    "--verbose=0",
    "--seed=2",
    "--collective_timeout=60",
    "--lr_milestones=0.5,0.8",  # lr and weight decay step down after the kill point
    "--wd_schedule=paper",
]
CODISTILL = ["--mode=codistill", "--burn_in_steps=40", "--alpha_ramp_steps=60"]  # alpha ramps over it


def _command(workdir, data_dir, processes, extra):
    train = [sys.executable, "train.py", *COMMON, *extra, f"--data_dir={data_dir}", f"--workdir={workdir}"]
    if processes == 1:
        return train
    return horovodrun(processes, *train)


def _env(processes):
    return python_env() if processes == 1 else worker_env()


def _without_wall_time(name: str, data: bytes) -> bytes:
    """The file less `epoch_seconds` (wall time, which no rerun reproduces)."""
    if name.endswith(".csv"):
        rows = [line.split(",") for line in data.decode().splitlines()]
        if rows and "epoch_seconds" in rows[0]:
            drop = rows[0].index("epoch_seconds")
            rows = [row[:drop] + row[drop + 1 :] for row in rows]
        return "\n".join(",".join(row) for row in rows).encode()
    if name.startswith("history") and name.endswith(".json"):
        history = json.loads(data)
        history.pop("epoch_seconds", None)
        return json.dumps(history, sort_keys=True).encode()
    return data


def _files(workdir, arm):
    folder = os.path.join(workdir, arm)
    return {
        name: _without_wall_time(name, open(os.path.join(folder, name), "rb").read())
        for name in sorted(os.listdir(folder))
        if name.endswith((".jsonl", ".csv", ".json"))
    }


def _kill_and_resume(tmp_path, data_dir, processes, extra, arm, victim):
    """Uninterrupted run, then the same run killed (SIGKILL of rank `victim`)
    once its second backup exists, then the same command again."""
    env = _env(processes)
    straight = tmp_path / "straight"
    proc = subprocess.run(
        _command(straight, data_dir, processes, extra),
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    killed = tmp_path / "killed"
    log = open(tmp_path / "killed.log", "w")
    cmd = _command(killed, data_dir, processes, extra)
    job = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    # Every rank's second backup: ranks in separate groups (stale weights) run
    # apart, and a resume starts from the epoch every rank has.
    folders = [killed / arm / "backup" / (f"rank{r}" if processes > 1 else "") for r in range(processes)]
    try:
        deadline = time.monotonic() + 240
        while not all(2 in backup.list_backups(str(folder)) for folder in folders):
            assert job.poll() is None, (tmp_path / "killed.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "no second backup on every rank within 240 s"
            time.sleep(0.05)
        pid = train_pid(f"--workdir={killed}", victim if processes > 1 else None)
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        job.wait(timeout=60)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
            job.wait(timeout=30)
        log.close()
    assert job.returncode != 0
    assert not (killed / "results.json").exists()
    for folder in folders:  # the kill left every backup whole
        for epoch in backup.list_backups(str(folder)):
            assert backup.verify(str(folder), epoch) is None

    again = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "[backup] resumed from epoch" in again.stdout
    assert _files(killed, arm) == _files(straight, arm)  # every step and epoch, bit for bit
    first = json.loads((straight / "results.json").read_text())["runs"][0]
    second = json.loads((killed / "results.json").read_text())["runs"][0]
    assert second["resumed_from_epoch"] in (2, 3) and first["resumed_from_epoch"] is None
    assert second["groups"] == first["groups"]  # test accuracy and loss
    # Weight checksums (each rank's entry also holds its thread count, which varies).
    sums = [(r["rank"], r["group"], r["weights_checksum"]) for r in first.get("ranks", [])]
    assert [(r["rank"], r["group"], r["weights_checksum"]) for r in second.get("ranks", [])] == sums
    assert second["steps"] == STEPS
    # Finished runs leave no backups behind: a rerun starts afresh.
    left = [str(path) for path in (killed / arm).glob("backup/**/epoch-*")]
    assert not left, left
    steps = [json.loads(line)["step"] for line in open(killed / arm / _steps_name(processes))]
    assert steps == list(range(1, STEPS + 1))
    return first


def _steps_name(processes):
    return "steps.jsonl" if processes == 1 else "steps.rank0.jsonl"


def test_local_prediction_exchange_resumes_exactly(tmp_path, data_dir, mnist1d_spec):
    run = _kill_and_resume(tmp_path, data_dir, 1, [*CODISTILL, "--data_mode=independent"], "codistill", 0)
    assert run["exchange"] == "local"


def test_local_stale_weights_resume_exactly(tmp_path, data_dir, mnist1d_spec):
    extra = [*CODISTILL, "--exchange=weights", "--exchange_every=25"]
    run = _kill_and_resume(tmp_path, data_dir, 1, extra, "codistill", 0)
    assert run["exchange"] == "weights/local"


@pytest.mark.parametrize(
    "name, extra, arm",
    [
        ("sync 1 x 2 (MWMS)", ["--mode=sync"], "sync"),
        ("predictions 2 x 1", [*CODISTILL, "--num_groups=2"], "codistill"),
        (
            "stale weights 2 x 1",
            [*CODISTILL, "--exchange=weights", "--exchange_every=25"],
            "codistill",
        ),
    ],
)
def test_horovod_jobs_resume_exactly(name, extra, arm, tmp_path, data_dir, mnist1d_spec, horovod_installed):
    run = _kill_and_resume(tmp_path, data_dir, 2, extra, arm, victim=1)
    assert run["world_size"] == 2

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


_STRAIGHT: dict = {}  # (processes, extra) -> the workdir of its uninterrupted run


def _straight(tmp_path_factory, data_dir, processes, extra):
    """The uninterrupted run of this layout, once per test session."""
    key = (processes, tuple(extra))
    if key not in _STRAIGHT:
        workdir = tmp_path_factory.mktemp("straight")
        proc = subprocess.run(
            _command(workdir, data_dir, processes, extra),
            cwd=REPO,
            env=_env(processes),
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        _STRAIGHT[key] = workdir
    return _STRAIGHT[key]


def _alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie, exited but not yet reaped, does not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _backup_folders(workdir, arm, processes):
    return [workdir / arm / "backup" / (f"rank{r}" if processes > 1 else "") for r in range(processes)]


def _steps_done(workdir, arm, processes) -> int:
    """Lines in rank 0's per-step log: the updates done so far."""
    path = workdir / arm / _steps_name(processes)
    return len(path.read_bytes().splitlines()) if path.exists() else 0


def _interrupt_and_resume(
    tmp_path,
    tmp_path_factory,
    data_dir,
    processes,
    extra,
    arm,
    victim,
    ready,
    signum=signal.SIGKILL,
    flags=(),
):
    """The run of `extra` interrupted (`signum` to rank `victim`) once
    `ready(folders)` holds for its backup folders, then the same command
    again; both compared with the uninterrupted run. `flags` are given to
    the interrupted run only (they must not change its results). Returns
    (uninterrupted results entry, resumed one, facts about the interruption)."""
    env = _env(processes)
    straight = _straight(tmp_path_factory, data_dir, processes, extra)
    killed = tmp_path / "killed"
    log = open(tmp_path / "killed.log", "w")
    cmd = _command(killed, data_dir, processes, [*extra, *flags])
    job = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    folders = _backup_folders(killed, arm, processes)
    facts = {}
    try:
        deadline = time.monotonic() + 240
        while not ready(folders, killed):
            assert job.poll() is None, (tmp_path / "killed.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "not ready to interrupt within 240 s"
            time.sleep(0.02)
        pid = train_pid(f"--workdir={killed}", victim if processes > 1 else None)
        assert pid is not None
        sent = time.monotonic()
        os.kill(pid, signum)
        while _alive(pid) and time.monotonic() < sent + 60:
            job.poll()  # reaps it when it is the job itself (one process)
            time.sleep(0.01)
        facts["victim_exit_s"] = time.monotonic() - sent
        job.wait(timeout=60)
        facts["job_exit_s"] = time.monotonic() - sent
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
            job.wait(timeout=30)
        log.close()
    facts["returncode"] = job.returncode
    facts["output"] = (tmp_path / "killed.log").read_text()
    facts["steps_done"] = _steps_done(killed, arm, processes)
    assert job.returncode != 0
    assert not (killed / "results.json").exists()
    for folder in folders:  # the interruption left every backup whole
        for unit in ("epoch", "step"):
            for number in backup.list_backups(str(folder), unit):
                assert backup.verify(str(folder), number, unit) is None

    again = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    facts["rerun_output"] = again.stdout
    assert _files(killed, arm) == _files(straight, arm)  # every step and epoch, bit for bit
    first = json.loads((straight / "results.json").read_text())["runs"][0]
    second = json.loads((killed / "results.json").read_text())["runs"][0]
    assert first["resumed_from_epoch"] is None and second["resumed_from_step"] is not None
    assert second["groups"] == first["groups"]  # test accuracy and loss
    # Weight checksums (each rank's entry also holds its thread count, which varies).
    sums = [(r["rank"], r["group"], r["weights_checksum"]) for r in first.get("ranks", [])]
    assert [(r["rank"], r["group"], r["weights_checksum"]) for r in second.get("ranks", [])] == sums
    assert second["steps"] == STEPS
    # Finished runs leave no backups behind: a rerun starts afresh.
    left = [str(path) for path in (killed / arm).glob("backup/**/*-0*")]
    assert not left, left
    steps = [json.loads(line)["step"] for line in open(killed / arm / _steps_name(processes))]
    assert steps == list(range(1, STEPS + 1))
    facts["updates_redone"] = facts["steps_done"] - second["resumed_from_step"]
    return first, second, facts


def _has_epoch(epoch):
    """Ready once every rank holds the backup of `epoch`: ranks in separate
    groups (stale weights) run apart, and a resume starts from the backup
    every rank has."""

    def ready(folders, workdir):
        return all(epoch in backup.list_backups(str(folder)) for folder in folders)

    return ready


def _kill_and_resume(tmp_path, tmp_path_factory, data_dir, processes, extra, arm, victim):
    """SIGKILL of rank `victim` once every rank holds its second epoch backup."""
    first, second, _ = _interrupt_and_resume(
        tmp_path, tmp_path_factory, data_dir, processes, extra, arm, victim, _has_epoch(2)
    )
    assert second["resumed_from_epoch"] in (2, 3)
    return first


def _steps_name(processes):
    return "steps.jsonl" if processes == 1 else "steps.rank0.jsonl"


def test_local_prediction_exchange_resumes_exactly(tmp_path, tmp_path_factory, data_dir, mnist1d_spec):
    run = _kill_and_resume(
        tmp_path, tmp_path_factory, data_dir, 1, [*CODISTILL, "--data_mode=independent"], "codistill", 0
    )
    assert run["exchange"] == "local"


def test_local_stale_weights_resume_exactly(tmp_path, tmp_path_factory, data_dir, mnist1d_spec):
    extra = [*CODISTILL, "--exchange=weights", "--exchange_every=25"]
    run = _kill_and_resume(tmp_path, tmp_path_factory, data_dir, 1, extra, "codistill", 0)
    assert run["exchange"] == "weights/local"


HOROVOD_LAYOUTS = [
    ("sync 1 x 2 (MWMS)", ["--mode=sync"], "sync"),
    ("predictions 2 x 1", [*CODISTILL, "--num_groups=2"], "codistill"),
    ("stale weights 2 x 1", [*CODISTILL, "--exchange=weights", "--exchange_every=25"], "codistill"),
]


@pytest.mark.parametrize("name, extra, arm", HOROVOD_LAYOUTS)
def test_horovod_jobs_resume_exactly(
    name, extra, arm, tmp_path, tmp_path_factory, data_dir, mnist1d_spec, horovod_installed
):
    run = _kill_and_resume(tmp_path, tmp_path_factory, data_dir, 2, extra, arm, victim=1)
    assert run["world_size"] == 2


# ------------------------------------------------- mid-epoch backups, SIGTERM
EVERY = 20  # --backup_every_steps: backups at steps 20, 40, 80, 100, ... (60 and 120 fall in epoch 1 and 2)


def _has_mid_epoch_backup(folders, workdir):
    """Every rank holds a step backup inside the second epoch (steps 63-123)."""
    return all(any(62 < s < 124 for s in backup.list_backups(str(f), "step")) for f in folders)


def test_sigkill_mid_epoch_resumes_from_the_step_backup(tmp_path, tmp_path_factory, data_dir, mnist1d_spec):
    """--backup_every_steps=20: a SIGKILL in the middle of the second epoch
    loses fewer than 20 updates (plus the one in flight), and the rerun
    continues mid-epoch, bit-identical."""
    _, second, facts = _interrupt_and_resume(
        tmp_path,
        tmp_path_factory,
        data_dir,
        1,
        [*CODISTILL, "--data_mode=independent"],
        "codistill",
        0,
        _has_mid_epoch_backup,
        flags=[f"--backup_every_steps={EVERY}"],
    )
    assert second["resumed_from_step"] % EVERY == 0 and 62 < second["resumed_from_step"] < 186
    assert second["resumed_from_epoch"] == second["resumed_from_step"] // 62
    assert "[backup] resumed from step" in facts["rerun_output"]
    assert 0 <= facts["updates_redone"] <= EVERY + 1


def _mid_epoch(folders, workdir, arm="codistill", processes=1):
    return 70 <= _steps_done(workdir, arm, processes) < 110


def _check_preempted(facts, processes):
    """SIGTERM: every process stopped at one step, backed it up, exited 143,
    and the rerun redid nothing."""
    from tf_codistill.config import ExitStatus

    lines = [line for line in facts["output"].splitlines() if "train.py: preempted:" in line]
    assert len(lines) == processes, facts["output"][-3000:]
    assert len({line.split("stopped after step ")[1].split(",")[0] for line in lines}) == 1, lines
    assert sum("SIGTERM received" in line for line in lines) == 1, lines
    if processes == 1:
        assert facts["returncode"] == ExitStatus.PREEMPTED
    # horovodrun prints its own traceback when a rank exits non-zero; the ranks print none.
    rank_lines = facts["output"].splitlines()
    if processes > 1:
        rank_lines = [line.split(">:", 1)[1] for line in rank_lines if line.startswith("[") and ">:" in line]
    assert not [line for line in rank_lines if line.startswith("Traceback")], facts["output"][-3000:]
    assert facts["updates_redone"] == 0
    assert facts["victim_exit_s"] < 20 and facts["job_exit_s"] < 30, facts


def test_sigterm_one_process_stops_at_a_step_and_resumes_there(
    tmp_path, tmp_path_factory, data_dir, mnist1d_spec
):
    """Epoch backups only (the default): SIGTERM mid-epoch still backs up the
    step it stops at, so nothing is redone."""
    _, second, facts = _interrupt_and_resume(
        tmp_path,
        tmp_path_factory,
        data_dir,
        1,
        [*CODISTILL, "--data_mode=independent"],
        "codistill",
        0,
        _mid_epoch,
        signum=signal.SIGTERM,
    )
    _check_preempted(facts, 1)
    assert second["resumed_from_step"] % 62 != 0
    print(
        f"one process: SIGTERM -> exit {facts['victim_exit_s']:.2f} s, updates redone {facts['updates_redone']}"
    )


# make test runs the prediction exchange; `pytest tests/test_resume.py` all three (about a minute each
# on 2 cores; tests/faults has the same layouts, slow, without the bit-for-bit comparison).
SIGTERM_LAYOUTS = [
    layout if layout[0].startswith("predictions") else pytest.param(*layout, marks=pytest.mark.slow)
    for layout in HOROVOD_LAYOUTS
]


@pytest.mark.parametrize("name, extra, arm", SIGTERM_LAYOUTS)
def test_sigterm_to_one_rank_stops_the_whole_job_at_one_step(
    name, extra, arm, tmp_path, tmp_path_factory, data_dir, mnist1d_spec, horovod_installed
):
    """SIGTERM to rank 1 of a Horovod job: both ranks agree on a step, both
    back it up and exit 143; the same command resumes there, bit-identical."""

    def ready(folders, workdir):
        return _mid_epoch(folders, workdir, arm, 2)

    _, second, facts = _interrupt_and_resume(
        tmp_path, tmp_path_factory, data_dir, 2, extra, arm, 1, ready, signum=signal.SIGTERM
    )
    _check_preempted(facts, 2)
    assert "[backup] resumed from step" in facts["rerun_output"]
    print(
        f"{name}: SIGTERM -> rank 1 exit {facts['victim_exit_s']:.2f} s, job exit {facts['job_exit_s']:.2f} s"
    )

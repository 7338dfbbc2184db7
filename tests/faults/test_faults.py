"""Fault injection into real training processes: kill a worker or a group, stop
one past its timeout, fill the disk, corrupt a checkpoint.

The expected outcome of every case is written down in EXPECTED.md (before
these tests were). Each case measures how long the job took to notice and
checks that nothing written before the fault was lost; its row goes to the
report printed at the end of the session (and to runs/faults/report.md).
Every wait is bounded, and every process a case started is continued
(SIGCONT) and killed when the case ends.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, python_env, train_pid, worker_env

from tf_codistill import backup as backup_mod

BASE = ["--dataset=mnist1d", "--model=cnn1d", "--batch_size=64", "--verbose=0", "--warmup_epochs=0.1"]
POLL_S = 0.1


# ------------------------------------------------------------------ helpers
class Job:
    """A process started in its own session, output to a log file."""

    def __init__(self, cmd, log: Path, env=None, marker: str | None = None):
        self.log = log
        self.marker = marker  # a string in the command line of every process of this job
        self._file = open(log, "w")  # noqa: SIM115 - closed in stop()
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            [str(c) for c in cmd],
            cwd=REPO,
            env=env or python_env(),
            stdout=self._file,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(self, predicate, timeout: float, what: str) -> float:
        """Waits until predicate() holds; returns the time it held (monotonic)."""
        deadline = time.monotonic() + timeout
        while not predicate():
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"the job ended (status {self.proc.returncode}) while waiting for {what}:\n"
                    + self.text()[-3000:]
                )
            assert time.monotonic() < deadline, f"timed out after {timeout:.0f} s waiting for {what}"
            time.sleep(POLL_S)
        return time.monotonic()

    def wait_for_line(self, needle: str, timeout: float) -> float:
        return self.wait_for(lambda: needle in self.text(), timeout, repr(needle))

    def wait(self, timeout: float) -> int | None:
        """The exit status, or None when it did not exit within timeout."""
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    def pids(self) -> list[int]:
        """This job's processes: the one started and every process whose
        command line carries the marker (horovodrun's workers)."""
        pids = [self.proc.pid]
        if self.marker:
            for name in os.listdir("/proc"):
                if name.isdigit() and int(name) != self.proc.pid and self.marker in _cmdline(int(name)):
                    pids.append(int(name))
        return pids

    def stop(self) -> None:
        for pid in self.pids():
            for sig in (signal.SIGCONT, signal.SIGKILL):
                try:
                    os.kill(pid, sig)
                except (ProcessLookupError, PermissionError):
                    pass
        self.wait(30)
        self._file.close()


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().decode(errors="replace").replace("\0", " ")
    except OSError:
        return ""


def pid_of_rank(rank: int, marker: str) -> int:
    """The train.py process of Horovod rank `rank` in the job marked by `marker`."""
    pid = train_pid(marker, rank)
    if pid is None:
        raise AssertionError(f"no process of rank {rank} found")
    return pid


def signal_pid(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def has_backup(directory: Path, epoch: int):
    return lambda: (directory / f"epoch-{epoch:06d}" / backup_mod.META).is_file()


def check_backups(directory: Path) -> list[int]:
    """Every complete backup in `directory` verifies; returns their epochs."""
    epochs = backup_mod.list_backups(str(directory))
    for epoch in epochs:
        problem = backup_mod.verify(str(directory), epoch)
        assert problem is None, f"backup of epoch {epoch} in {directory}: {problem}"
    return epochs


def flip_bytes(path: Path, count: int = 64) -> None:
    """Inverts `count` bytes in the middle of the file (the size stays)."""
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    for i in range(middle, min(middle + count, len(data))):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def csv_rows(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def assert_prefix(before: list[str], after: list[str], rows: int, what: str) -> None:
    """After the fault the file has its first `rows` lines (header included),
    and those of them that were written before the fault are unchanged. (The
    backup of an epoch is taken before its CSV row is written: the newest
    backup's row may not have been written yet when the fault struck.)"""
    assert len(after) >= rows, f"{what}: {len(after)} lines after the fault, expected at least {rows}"
    kept = min(rows, len(before))
    assert after[:kept] == before[:kept], f"{what}: rows written before the fault changed or went missing"


def launch_cmd(np_, groups, workdir, *args, timeout=300, collective_timeout=20):
    return [
        sys.executable,
        "-m",
        "tf_codistill.launch",
        "--np",
        np_,
        "--groups",
        groups,
        "--timeout",
        timeout,
        "--collective_timeout",
        collective_timeout,
        "--",
        "train.py",
        *BASE,
        f"--workdir={workdir}",
        *args,
    ]


def results(workdir: Path) -> dict:
    return json.loads((workdir / "results.json").read_text())["runs"][0]


# ------------------------------------------------------------- 4. full disk
@pytest.fixture
def tmpfs(tmp_path):
    """A 16 MiB tmpfs, unmounted at the end (skips when it cannot be mounted)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    where = tmp_path / "disk"
    where.mkdir()
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(where)], capture_output=True, text=True
    )
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {proc.stderr.strip() or proc.returncode}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


def fill(directory: Path) -> Path:
    """Writes a file into `directory` until the filesystem has no space left."""
    filler = directory / "filler"
    with open(filler, "wb", buffering=0) as f:  # unbuffered: nothing left to flush at close
        for size in (1 << 20, 1 << 12, 1):
            block = b"\0" * size
            try:
                while f.write(block):
                    pass
            except OSError:
                pass
    return filler


def test_disk_full(tmpfs, data_dir, mnist1d_spec, fault_report):
    workdir = tmpfs / "run"
    backups = workdir / "sync" / "backup"
    cmd = [sys.executable, "train.py", *BASE, "--mode=sync", "--epochs=6", f"--data_dir={data_dir}"]
    cmd.append(f"--workdir={workdir}")
    job = Job(cmd, tmpfs.parent / "run.log")
    try:
        job.wait_for(has_backup(backups, 1), 120, "the backup of epoch 1")
        filler = fill(tmpfs)
        full_at = time.monotonic()
        newest = backup_mod.list_backups(str(backups))[0]
        rows_before = csv_rows(workdir / "sync" / "history.csv")
        status = job.wait(60)
        detected = time.monotonic() - full_at
    finally:
        job.stop()
    out = job.text()
    assert status is not None, "the job did not end within 60 s of the disk filling up"
    errors = [line for line in out.splitlines() if line.startswith("train.py: error:")]
    lines = [line for line in out.splitlines() if line.strip()]
    fault_report(
        "disk-full",
        f"exit {status}: {errors[0].split(' while ')[0] if errors else lines[-1][:90]}",
        detected,
        "no" if backup_mod.verify(str(backups), newest) is None else "YES",
        f"backup of epoch {newest} kept",
    )
    assert status == 4, f"expected exit status 4, got {status}:\n{out[-3000:]}"
    assert len(errors) == 1 and "no space left on device" in errors[0].lower(), out[-3000:]
    # says which backup survived: BackupError's "the backup of epoch N is intact", or the general
    # no-space line's "the newest intact: <arm>/backup epoch N"
    assert f"backup of epoch {newest} is intact" in errors[0] or f"backup epoch {newest}" in errors[0], (
        errors[0]
    )
    assert lines[-1].startswith("train.py: error:"), out[-3000:]
    assert detected < 15, detected
    assert backup_mod.verify(str(backups), newest) is None
    check_backups(backups)

    filler.unlink()
    rerun = Job(cmd, tmpfs.parent / "rerun.log")
    try:
        status = rerun.wait(180)
    finally:
        rerun.stop()
    assert status == 0, rerun.text()[-3000:]
    assert "[backup] resumed from epoch" in rerun.text()
    assert results(workdir)["resumed_from_epoch"] >= newest
    assert_prefix(rows_before, csv_rows(workdir / "sync" / "history.csv"), newest + 1, "history.csv")


# ----------------------------------------------------- 5. corrupt a backup
def test_corrupt_backup_and_leftover_temporary(tmp_path, data_dir, mnist1d_spec, fault_report):
    workdir = tmp_path / "run"
    backups = workdir / "sync" / "backup"
    cmd = [sys.executable, "train.py", *BASE, "--mode=sync", "--epochs=8", f"--data_dir={data_dir}"]
    cmd.append(f"--workdir={workdir}")
    job = Job(cmd, tmp_path / "run.log")
    try:
        job.wait_for(has_backup(backups, 3), 120, "the backup of epoch 3")
        job.proc.kill()
        job.wait(30)
    finally:
        job.stop()
    epochs = check_backups(backups)
    newest = epochs[0]
    assert newest - 1 in epochs, epochs
    rows_before = csv_rows(workdir / "sync" / "history.csv")
    flip_bytes(backups / f"epoch-{newest:06d}" / backup_mod.WEIGHTS)
    leftover = backups / f".tmp-{newest + 1:06d}-99999"
    leftover.mkdir()
    weights = (backups / f"epoch-{newest - 1:06d}" / backup_mod.WEIGHTS).read_bytes()
    (leftover / backup_mod.WEIGHTS).write_bytes(weights[: len(weights) // 2])

    rerun = Job(cmd, tmp_path / "rerun.log")
    try:
        warned = rerun.wait_for_line(f"skipping the backup of epoch {newest}", 120) - rerun.started
        resumed = rerun.wait_for_line("[backup] resumed from epoch", 60)
        leftover_gone_at_resume = not leftover.exists()
        resumed -= rerun.started
        status = rerun.wait(180)
    finally:
        rerun.stop()
    out = rerun.text()
    ok = status == 0 and f"[backup] resumed from epoch {newest - 1} " in out
    fault_report(
        "corrupt-backup",
        f"warned, resumed from epoch {newest - 1}, exit {status}" if ok else f"exit {status}",
        warned,
        "no (epoch redone)",
        "at start-up (from process start)",
    )
    fault_report(
        "leftover-tmp",
        "removed before resuming" if leftover_gone_at_resume else "still there at resume",
        resumed,
        "no",
        "at start-up (from process start)",
    )
    assert status == 0, out[-3000:]
    assert "does not match its checksum" in out, out[-3000:]
    assert f"[backup] resumed from epoch {newest - 1} " in out, out[-3000:]
    assert leftover_gone_at_resume
    assert results(workdir)["resumed_from_epoch"] == newest - 1
    # header + the rows of the epochs before the restored one
    assert_prefix(rows_before, csv_rows(workdir / "sync" / "history.csv"), newest, "history.csv")


LOOP_SCRIPT = r"""
import sys
import keras
import numpy as np
import tensorflow as tf
from models import build_model
from tf_codistill import CodistillModel
from tf_codistill.loop import CodistillLoop

checkpoint_dir, steps = sys.argv[1], int(sys.argv[2])
rng = np.random.default_rng(0)
x = rng.normal(size=(64, 12)).astype("float32")
y = rng.integers(0, 5, size=64)
ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(16).repeat()
model = CodistillModel([build_model("mlp", (12,), 5, seed=g) for g in range(2)], alpha=0.5, data_mode="shared")
model.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9))
loop = CodistillLoop(model, checkpoint_dir=checkpoint_dir, checkpoint_every=5)
loop.train(ds, steps=steps)
print(f"finished at step {loop.step}", flush=True)
"""


def test_corrupt_loop_checkpoint(tmp_path, fault_report):
    script = tmp_path / "loop.py"
    script.write_text(LOOP_SCRIPT)
    ckpt = tmp_path / "ckpt"
    first = subprocess.run(
        [sys.executable, str(script), str(ckpt), "15"],
        cwd=REPO,
        env=python_env(),
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
    data = sorted(ckpt.glob("step-000015/state.weights.h5"))
    assert data, sorted(os.listdir(ckpt))
    kept = {p.name: p.read_bytes() for p in ckpt.glob("step-000010/*")}
    flip_bytes(data[0])

    def warnings():
        return [
            line
            for line in rerun.text().splitlines()
            if "step 15" in line
            and not line.startswith("WARNING:tensorflow:")  # TensorFlow's own notes on partial restores
            and not line.startswith(("tensorflow.", "Traceback"))  # an uncaught error
            and any(w in line.lower() for w in ("warn", "skip", "corrupt", "unreadable"))
        ]

    rerun = Job([sys.executable, script, ckpt, "20"], tmp_path / "rerun.log")
    warned = None
    try:
        deadline = time.monotonic() + 180
        while warned is None and rerun.proc.poll() is None and time.monotonic() < deadline:
            if warnings():
                warned = time.monotonic() - rerun.started
            time.sleep(POLL_S)
        status = rerun.wait(180)
    finally:
        rerun.stop()
    out = rerun.text()
    fallback = status == 0 and "step-000010 at step 10" in out and "finished at step 20" in out
    last = [line for line in out.splitlines() if line.strip()][-1:] or [""]
    fault_report(
        "corrupt-loop-checkpoint",
        "warned, restored step-000010, trained to 20"
        if fallback and warnings()
        else f"exit {status}: {last[0][:90]}",
        warned,
        "no" if {p.name: p.read_bytes() for p in ckpt.glob("step-000010/*")} == kept else "YES",
        "at start-up (from process start)",
    )
    assert status == 0, out[-3000:]
    assert warnings(), out[-3000:]
    assert "step-000010 at step 10" in out and "finished at step 20" in out, out[-3000:]


# ------------------------------------------------ 2/3. groups in a directory
def _group_cmd(group, tmp_path, data_dir, epochs):
    return [
        sys.executable,
        "train.py",
        *BASE,
        "--mode=codistill",
        "--exchange=weights",
        f"--exchange_dir={tmp_path / 'exchange'}",
        f"--group={group}",
        "--num_groups=2",
        f"--epochs={epochs}",
        "--exchange_every=10",
        "--peer_timeout=4",
        f"--data_dir={data_dir}",
        f"--workdir={tmp_path / f'g{group}'}",
    ]


def _start_groups(tmp_path, data_dir, epochs0, epochs1):
    g0 = Job(_group_cmd(0, tmp_path, data_dir, epochs0), tmp_path / "g0.log", env=worker_env())
    g1 = Job(_group_cmd(1, tmp_path, data_dir, epochs1), tmp_path / "g1.log", env=worker_env())
    return g0, g1


def _wait_until_exchanging(g0, g1, tmp_path):
    """Both groups train and group 1 has epochs of backups and published snapshots."""
    g0.wait_for(has_backup(tmp_path / "g0" / "codistill" / "backup" / "group0", 1), 180, "group 0's epoch 1")
    g1.wait_for(has_backup(tmp_path / "g1" / "codistill" / "backup" / "group1", 2), 180, "group 1's epoch 2")
    g0.wait_for(lambda: any((tmp_path / "exchange" / "group1").glob("step*.npz")), 30, "group 1's snapshot")


STALE = "WARNING: peer group 1 is stale"


def _last_snapshot_at(tmp_path) -> float:
    """When group 1 wrote its newest snapshot, on the monotonic clock: --peer_timeout runs from there,
    which may be before group 1 was stopped or killed."""
    newest = max(p.stat().st_mtime for p in (tmp_path / "exchange" / "group1").glob("step*.npz"))
    return time.monotonic() - (time.time() - newest)


def test_sigstop_group_through_a_directory(tmp_path, data_dir, mnist1d_spec, fault_report):
    # Group 1 never waits for group 0: long enough not to finish while group 0
    # is still starting (a loaded machine), and group 0 outlasts its stop and return.
    g0, g1 = _start_groups(tmp_path, data_dir, 60, 40)
    stopped = False
    try:
        _wait_until_exchanging(g0, g1, tmp_path)
        g1.proc.send_signal(signal.SIGSTOP)
        stopped_at = time.monotonic()
        stopped = True
        snapshot_at = _last_snapshot_at(tmp_path)
        warned_at = g0.wait_for_line(STALE, 60)
        stale = warned_at - stopped_at
        g1.proc.send_signal(signal.SIGCONT)
        continued_at = time.monotonic()
        stopped = False
        back = g0.wait_for_line("peer group 1 is back", 60) - continued_at
        status0, status1 = g0.wait(240), g1.wait(240)
    finally:
        if stopped:
            g1.proc.send_signal(signal.SIGCONT)
        g0.stop()
        g1.stop()
    out0, out1 = g0.text(), g1.text()
    fault_report(
        "sigstop-group-directory",
        f"group 0 warned stale, went on; back {back:.1f} s after SIGCONT; exits {status0}/{status1}",
        stale,
        "no",
        "--peer_timeout=4",
    )
    assert status0 == 0, out0[-3000:]
    assert status1 == 0, out1[-3000:]
    assert out0.count(STALE) == 1
    assert warned_at - snapshot_at >= 4 and stale <= 14, (warned_at - snapshot_at, stale)
    for g in (0, 1):
        assert results(tmp_path / f"g{g}")["groups"][0]["group"] == g


@pytest.mark.slow
def test_kill_group_through_a_directory(tmp_path, data_dir, mnist1d_spec, fault_report):
    g0, g1 = _start_groups(tmp_path, data_dir, 40, 40)
    g1_backups = tmp_path / "g1" / "codistill" / "backup" / "group1"
    try:
        _wait_until_exchanging(g0, g1, tmp_path)
        g1.proc.kill()
        killed_at = time.monotonic()
        g1.wait(30)
        snapshot_at = _last_snapshot_at(tmp_path)
        rows_before = csv_rows(tmp_path / "g1" / "codistill" / "history.csv")
        warned_at = g0.wait_for_line(STALE, 60)
        stale = warned_at - killed_at
        status0 = g0.wait(240)
    finally:
        g0.stop()
        g1.stop()
    epochs = check_backups(g1_backups)
    fault_report(
        "kill-group-directory",
        f"group 0 warned stale, went on, exit {status0}",
        stale,
        "no",
        f"--peer_timeout=4; group 1 keeps backups {sorted(epochs)}",
    )
    assert status0 == 0, g0.text()[-3000:]
    assert g0.text().count(STALE) == 1
    assert warned_at - snapshot_at >= 4 and stale <= 14, (warned_at - snapshot_at, stale)
    assert results(tmp_path / "g0")["groups"][0]["group"] == 0
    assert epochs and len(rows_before) >= 2
    assert csv_rows(tmp_path / "g1" / "codistill" / "history.csv") == rows_before


# ------------------------------------------------------ 1/2/3. Horovod jobs
def _rank_dirs(workdir: Path, arm: str, ranks) -> dict[int, Path]:
    return {r: workdir / arm / "backup" / f"rank{r}" for r in ranks}


def _wait_all(job, dirs, epoch, timeout):
    job.wait_for(lambda: all(has_backup(d, epoch)() for d in dirs.values()), timeout, f"epoch {epoch} on all")


@pytest.mark.slow
@pytest.mark.usefixtures("horovod_installed")
def test_kill_worker_then_corrupt_its_newest_backup(tmp_path, data_dir, mnist1d_spec, fault_report):
    workdir = tmp_path / "run"
    cmd = launch_cmd(2, 2, workdir, "--mode=codistill", "--exchange=horovod", "--epochs=8")
    cmd.append(f"--data_dir={data_dir}")
    dirs = _rank_dirs(workdir, "codistill", (0, 1))
    job = Job(cmd, tmp_path / "run.log", env=worker_env(), marker=str(workdir))
    try:
        _wait_all(job, dirs, 2, 240)
        os.kill(pid_of_rank(1, str(workdir)), signal.SIGKILL)
        killed_at = time.monotonic()
        rows_before = {r: csv_rows(workdir / "codistill" / f"history.rank{r}.csv") for r in dirs}
        status = job.wait(90)
        detected = time.monotonic() - killed_at
    finally:
        job.stop()
    out = job.text()
    epochs = {r: check_backups(d) for r, d in dirs.items()}
    fault_report(
        "kill-worker",
        f"launcher exit {status}; "
        + ("names rank 1" if "rank 1 failed first" in out else "rank 1 NOT named"),
        detected,
        "no",
        f"backups {epochs}",
    )
    assert status not in (0, None), out[-3000:]
    assert "rank 1 failed first" in out or "Process 1 exit with status code" in out, out[-3000:]
    assert detected < 30, detected

    # 5c: rank 1's newest backup is corrupt; every rank goes back to the newest common intact one.
    newest1 = epochs[1][0]
    flip_bytes(dirs[1] / f"epoch-{newest1:06d}" / backup_mod.WEIGHTS)
    common = max(set(epochs[0]) & (set(epochs[1]) - {newest1}))
    rerun = Job(cmd, tmp_path / "rerun.log", env=worker_env(), marker=str(workdir))
    try:
        warned = rerun.wait_for_line(f"skipping the backup of epoch {newest1}", 180) - rerun.started
        status = rerun.wait(300)
    finally:
        rerun.stop()
    out = rerun.text()
    resumed = out.count(f"[backup] resumed from epoch {common} ")
    fault_report(
        "corrupt-backup-rank",
        f"rank 1 warned; {resumed} ranks resumed from epoch {common} (newest {newest1}); exit {status}",
        warned,
        "no (epoch redone)",
        "at start-up (from launch)",
    )
    assert status == 0, out[-3000:]
    assert resumed == 2, out[-3000:]
    assert results(workdir)["resumed_from_epoch"] == common
    for r in dirs:
        assert_prefix(
            rows_before[r], csv_rows(workdir / "codistill" / f"history.rank{r}.csv"), common + 1, f"rank {r}"
        )


@pytest.mark.slow
@pytest.mark.usefixtures("horovod_installed")
def test_kill_a_whole_group_of_a_horovod_job(tmp_path, data_dir, mnist1d_spec, fault_report):
    workdir = tmp_path / "run"
    cmd = launch_cmd(4, 2, workdir, "--mode=codistill", "--exchange=horovod", "--epochs=6")
    cmd.append(f"--data_dir={data_dir}")
    dirs = _rank_dirs(workdir, "codistill", range(4))
    job = Job(cmd, tmp_path / "run.log", env=worker_env(), marker=str(workdir))
    try:
        _wait_all(job, dirs, 1, 300)
        victims = [pid_of_rank(r, str(workdir)) for r in (2, 3)]
        for pid in victims:
            os.kill(pid, signal.SIGKILL)
        killed_at = time.monotonic()
        status = job.wait(90)
        detected = time.monotonic() - killed_at
    finally:
        job.stop()
    out = job.text()
    epochs = {r: check_backups(d) for r, d in dirs.items()}
    named = [r for r in (2, 3) if f"rank {r} failed first" in out]
    fault_report(
        "kill-group-horovod",
        f"launcher exit {status}; names rank {named[0] if named else '?'}",
        detected,
        "no",
        "2 x 2 workers, ranks 2+3 killed",
    )
    assert status not in (0, None), out[-3000:]
    assert named, out[-3000:]
    assert detected < 30, detected
    assert all(epochs.values()), epochs


def _sigstop_rank(tmp_path, data_dir, fault_report, case, np_, groups, args, bound, says):
    workdir = tmp_path / "run"
    cmd = launch_cmd(np_, groups, workdir, *args, timeout=240, collective_timeout=15)
    cmd.append(f"--data_dir={data_dir}")
    arm = "sync" if "--mode=sync" in args else "codistill"
    dirs = _rank_dirs(workdir, arm, range(np_))
    job = Job(cmd, tmp_path / "run.log", env=worker_env(), marker=str(workdir))
    victim = None
    try:
        _wait_all(job, dirs, 1, 240)
        victim = pid_of_rank(1, str(workdir))
        os.kill(victim, signal.SIGSTOP)
        stopped_at = time.monotonic()
        status = job.wait(260)
        detected = time.monotonic() - stopped_at
    finally:
        if victim is not None:
            signal_pid(victim, signal.SIGCONT)
            signal_pid(victim, signal.SIGKILL)
        job.stop()
    out = job.text()
    epochs = {r: check_backups(d) for r, d in dirs.items()}
    first = [line for line in out.splitlines() if "failed first" in line or "timed out after" in line]
    fault_report(
        case,
        f"exit {status}: {first[0][:100] if first else 'no launcher line'}",
        detected,
        "no",
        "--collective_timeout=15",
    )
    assert status is not None, out[-3000:]
    assert status != 124, f"only the launcher's --timeout ended the job:\n{out[-3000:]}"
    assert status != 0, out[-3000:]
    assert detected < bound, detected
    assert says in out, f"no {says!r} in the output:\n{out[-3000:]}"
    # The survivor ends with one clear line (exit 5), not only a traceback.
    assert "train.py: error: lost contact with another process of the job" in out, out[-3000:]
    assert all(epochs.values()), epochs


@pytest.mark.slow
@pytest.mark.usefixtures("horovod_installed")
def test_sigstop_a_rank_of_a_prediction_exchange(tmp_path, data_dir, mnist1d_spec, fault_report):
    args = ["--mode=codistill", "--exchange=horovod", "--epochs=10"]
    # Rank 0's Horovod background loop: Gloo "Timed out waiting ..." after --collective_timeout.
    _sigstop_rank(tmp_path, data_dir, fault_report, "sigstop-horovod-rank", 2, 2, args, 45, "Timed out")


@pytest.mark.slow
@pytest.mark.usefixtures("horovod_installed")
def test_sigstop_a_worker_of_a_sync_mwms_group(tmp_path, data_dir, mnist1d_spec, fault_report):
    args = ["--mode=sync", "--epochs=10"]
    # TensorFlow's coordination service: task 1 "stopped sending heartbeats".
    _sigstop_rank(
        tmp_path, data_dir, fault_report, "sigstop-mwms-worker", 2, 1, args, 120, "stopped sending heartbeats"
    )


# ------------------------------------------------------- 6. SIGTERM (preemption)
def _steps_in(path: Path) -> int:
    return len(path.read_bytes().splitlines()) if path.exists() else 0


def _stopped_steps(out: str) -> set[int]:
    """The steps named by every `train.py: preempted: ... stopped after step S` line."""
    return {
        int(line.split("stopped after step ")[1].split(",")[0])
        for line in out.splitlines()
        if "train.py: preempted:" in line
    }


def _resumed_step(out: str) -> int | None:
    for line in out.splitlines():
        if "[backup] resumed from step " in line:
            return int(line.split("[backup] resumed from step ")[1].split()[0])
        if "[backup] resumed from epoch " in line:
            return int(line.split("(step ")[1].split(")")[0])
    return None


def _preempt(tmp_path, fault_report, case, cmd, steps_log, target, ranks, signum=signal.SIGTERM, env=None):
    """Starts `cmd`, sends `signum` to `target()` (a pid) in the middle of the
    second epoch, waits for the exit, reruns the same command, and reports
    the seconds from the signal to the exit and the updates redone."""
    marker = str(tmp_path / "run")
    job = Job(cmd, tmp_path / "run.log", env=env or worker_env(), marker=marker)
    try:
        job.wait_for(lambda: 70 <= _steps_in(steps_log) < 110, 240, "the middle of epoch 2")
        pid = target(job)
        sent = time.monotonic()
        signal_pid(pid, signum)
        status = job.wait(60)
        seconds = time.monotonic() - sent
    finally:
        job.stop()
    out = job.text()
    stopped = _stopped_steps(out)
    done = _steps_in(steps_log)
    rerun = Job(cmd, tmp_path / "rerun.log", env=env or worker_env(), marker=marker)
    try:
        rerun_status = rerun.wait(240)
    finally:
        rerun.stop()
    resumed = _resumed_step(rerun.text())
    redone = None if resumed is None else done - resumed
    fault_report(
        case,
        f"{len([ln for ln in out.splitlines() if 'train.py: preempted:' in ln])}/{ranks} processes "
        f"stopped at step {'/'.join(map(str, sorted(stopped))) or '?'}, exit {status}; rerun exit {rerun_status}",
        seconds,
        f"no: {redone} updates redone" if redone == 0 else f"{redone} updates redone",
        f"SIGTERM to exit; resumed at step {resumed}",
    )
    assert status is not None, f"{case}: no exit within 60 s of the signal:\n{out[-3000:]}"
    assert len(stopped) == 1, f"{case}: the processes did not stop at one step:\n{out[-3000:]}"
    assert out.count("train.py: preempted:") == ranks, out[-3000:]
    assert rerun_status == 0, rerun.text()[-3000:]
    assert resumed == stopped.pop() == done and redone == 0, (resumed, done)
    assert seconds < 30, seconds
    return status


def test_sigterm_one_process(tmp_path, data_dir, mnist1d_spec, fault_report):
    workdir = tmp_path / "run"
    cmd = [sys.executable, "train.py", *BASE, "--mode=codistill", "--epochs=4", f"--data_dir={data_dir}"]
    cmd.append(f"--workdir={workdir}")
    status = _preempt(
        tmp_path,
        fault_report,
        "sigterm-one-process",
        cmd,
        workdir / "codistill" / "steps.jsonl",
        lambda job: job.proc.pid,
        1,
        env=python_env(),
    )
    assert status == 143


def _horovod_preempt(tmp_path, data_dir, fault_report, case, np_, groups, args, arm, victim):
    workdir = tmp_path / "run"
    cmd = launch_cmd(np_, groups, workdir, *args, "--epochs=4", f"--data_dir={data_dir}", timeout=400)
    marker = f"--workdir={workdir}"
    status = _preempt(
        tmp_path,
        fault_report,
        case,
        cmd,
        workdir / arm / "steps.rank0.jsonl",
        lambda job: pid_of_rank(victim, marker),
        np_,
    )
    assert status == 143, status  # the launcher passes the ranks' status on


@pytest.mark.slow
@pytest.mark.usefixtures("horovod_installed")
@pytest.mark.parametrize(
    "case, np_, groups, args, arm, victim",
    [
        ("sigterm-mwms-1x2", 2, 1, ["--mode=sync"], "sync", 1),
        ("sigterm-predictions-2x1", 2, 2, ["--mode=codistill", "--exchange=horovod"], "codistill", 1),
        ("sigterm-weights-2x1", 2, 2, ["--mode=codistill", "--exchange=weights"], "codistill", 0),
        ("sigterm-predictions-2x2", 4, 2, ["--mode=codistill", "--exchange=horovod"], "codistill", 2),
    ],
)
def test_sigterm_to_one_rank(
    tmp_path, data_dir, mnist1d_spec, fault_report, case, np_, groups, args, arm, victim
):
    _horovod_preempt(tmp_path, data_dir, fault_report, case, np_, groups, args, arm, victim)


@pytest.mark.slow
@pytest.mark.usefixtures("horovod_installed")
def test_sigterm_to_the_launcher(tmp_path, data_dir, mnist1d_spec, fault_report):
    """SIGTERM to `python -m tf_codistill.launch`: horovodrun passes it to every rank."""
    workdir = tmp_path / "run"
    args = ["--mode=codistill", "--exchange=horovod", "--epochs=4", f"--data_dir={data_dir}"]
    cmd = launch_cmd(2, 2, workdir, *args, timeout=400)
    status = _preempt(
        tmp_path,
        fault_report,
        "sigterm-launcher-2x1",
        cmd,
        workdir / "codistill" / "steps.rank0.jsonl",
        lambda job: job.proc.pid,
        2,
    )
    assert status == 143


@pytest.mark.slow
def test_sigterm_a_group_through_a_directory(tmp_path, data_dir, mnist1d_spec, fault_report):
    """A group of a directory exchange saves alone; the other group goes on."""
    g0 = Job(_group_cmd(0, tmp_path, data_dir, 12), tmp_path / "g0.log", env=worker_env())
    try:
        cmd = _group_cmd(1, tmp_path, data_dir, 4)
        cmd[cmd.index(f"--workdir={tmp_path / 'g1'}")] = f"--workdir={tmp_path / 'run'}"
        status = _preempt(
            tmp_path,
            fault_report,
            "sigterm-directory-group",
            cmd,
            tmp_path / "run" / "codistill" / "steps.jsonl",
            lambda job: job.proc.pid,
            1,
        )
        assert status == 143
        assert g0.wait(300) == 0, g0.text()[-3000:]
    finally:
        g0.stop()


def test_sigkill_with_step_backups_redoes_at_most_n(tmp_path, data_dir, mnist1d_spec, fault_report):
    """SIGKILL cannot be caught: with --backup_every_steps=10 at most 10 updates are redone."""
    workdir = tmp_path / "run"
    cmd = [sys.executable, "train.py", *BASE, "--mode=sync", "--epochs=4", "--backup_every_steps=10"]
    cmd += [f"--data_dir={data_dir}", f"--workdir={workdir}"]
    steps_log = workdir / "sync" / "steps.jsonl"
    job = Job(cmd, tmp_path / "run.log", env=python_env())
    try:
        job.wait_for(lambda: 75 <= _steps_in(steps_log) < 110, 240, "the middle of epoch 2")
        sent = time.monotonic()
        job.proc.kill()
        status = job.wait(30)
        seconds = time.monotonic() - sent
        done = _steps_in(steps_log)
    finally:
        job.stop()
    for unit in ("epoch", "step"):
        for number in backup_mod.list_backups(str(workdir / "sync" / "backup"), unit):
            assert backup_mod.verify(str(workdir / "sync" / "backup"), number, unit) is None
    rerun = Job(cmd, tmp_path / "rerun.log", env=python_env())
    try:
        rerun_status = rerun.wait(240)
    finally:
        rerun.stop()
    resumed = _resumed_step(rerun.text())
    redone = None if resumed is None else done - resumed
    fault_report(
        "sigkill-every-10-steps",
        f"exit {status}; rerun resumed at step {resumed}, exit {rerun_status}",
        seconds,
        f"{redone} updates redone (at most 10)",
        "kill to exit",
    )
    assert rerun_status == 0, rerun.text()[-3000:]
    assert resumed is not None and 0 <= redone <= 10, (resumed, done)

"""tf_codistill.launch: argument checks in-process, and real horovodrun jobs on tiny scripts."""

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import uuid

import pytest
from conftest import REPO, python_env

from tf_codistill import launch

HOROVODRUN = launch.find_horovodrun()
needs_horovod = pytest.mark.skipif(HOROVODRUN is None, reason="Horovod is not installed (make horovod)")

JOB_TIMEOUT_S = 120  # bound on every launcher run in this file


def _script(tmp_path, stem, body):
    """Writes a tiny program with a unique file name (so pgrep finds only this test's processes)."""
    path = tmp_path / f"{stem}_{uuid.uuid4().hex[:12]}.py"
    path.write_text(
        "import os, sys, time, signal\nRANK = int(os.environ['HOROVOD_RANK'])\n" + textwrap.dedent(body)
    )
    return path


LAUNCHER = [sys.executable, "-m", "tf_codistill.launch"]


def _launch(*args, timeout=JOB_TIMEOUT_S):
    """Runs `python -m tf_codistill.launch ARGS` and returns the completed process (text output)."""
    return subprocess.run(
        [*LAUNCHER, *map(str, args)],
        cwd=REPO,
        env=python_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _survivors(path):
    """Command lines of live processes that mention the script's unique file name."""
    found = subprocess.run(["pgrep", "-af", path.name], capture_output=True, text=True)
    return found.stdout.strip()


def _no_survivors(path, wait_s=5.0):
    deadline = time.monotonic() + wait_s
    while _survivors(path) and time.monotonic() < deadline:
        time.sleep(0.2)
    return _survivors(path) == ""


# ---------------------------------------------------------------- argument checks (no processes)


@pytest.fixture
def no_spawn(monkeypatch):
    """Fails the test if the launcher tries to start anything."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"started a process: {args}")

    monkeypatch.setattr(launch.subprocess, "Popen", refuse)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--np", "4", "--groups", "3", "--", "x.py"], "--groups=3 does not divide --np=4"),
        (["--np", "0", "--groups", "1", "--", "x.py"], "--np must be >= 1"),
        (["--np", "2", "--groups", "0", "--", "x.py"], "--groups must be >= 1"),
        (["--np", "2", "--groups", "1"], "missing `-- PROGRAM"),
        (["--np", "2", "--groups", "1", "--"], "no program after `--`"),
        (["--np", "2", "--", "x.py"], "give --groups"),
        (
            ["--np", "4", "--groups", "2", "--", "x.py", "--num_groups=4"],
            "disagrees with the program's --num_groups=4",
        ),
        (["--np", "4", "--", "x.py", "--num_groups", "3"], "--groups=3 does not divide --np=4"),
        (["--np", "2", "--groups", "1", "--timeout", "0", "--", "x.py"], "--timeout must be > 0"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(argv, message, no_spawn, capsys):
    assert launch.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("launch: error: "), err
    assert message in err


def test_groups_must_divide_np_from_the_command_line(tmp_path):
    script = tmp_path / "never_started.py"
    script.write_text("raise SystemExit('started')\n")
    start = time.monotonic()
    result = _launch("--np", 4, "--groups", 3, "--", script, timeout=60)
    assert result.returncode == 2, result
    assert "--groups=3 does not divide --np=4" in result.stderr
    assert result.stdout == "" and result.stderr.count("\n") == 1  # one line; nothing ran
    assert time.monotonic() - start < 60


def test_missing_horovodrun_says_how_to_install(monkeypatch, no_spawn, capsys):
    monkeypatch.setattr(launch, "find_horovodrun", lambda: None)
    assert launch.main(["--np", "2", "--groups", "1", "--", "x.py"]) == 2
    assert "Horovod is not installed: run `make horovod`" in capsys.readouterr().err


def test_missing_program_file(no_spawn, capsys, tmp_path):
    if HOROVODRUN is None:
        pytest.skip("the horovodrun check comes first")
    assert launch.main(["--np", "2", "--groups", "1", "--", str(tmp_path / "absent.py")]) == 2
    assert "not found" in capsys.readouterr().err


def test_command_and_environment():
    command = launch.build_command("/bin/horovodrun", 4, ["echo", "-v"], 2, 30.0)
    assert command == [
        "/bin/horovodrun",
        "--gloo",
        "-np",
        "4",
        "-H",
        "localhost:4",
        "echo",
        "-v",
        "--num_groups=2",
        "--collective_timeout=30",
    ]
    env = launch.child_env(2, 30.0, base={"OMP_NUM_THREADS": "7"})
    assert env["OMP_NUM_THREADS"] == "7"  # the user's setting wins
    assert env["TF_CPP_MIN_LOG_LEVEL"] == "2"
    assert env["HOROVOD_GLOO_TIMEOUT_SECONDS"] == "30"
    assert env["HOROVOD_STALL_SHUTDOWN_TIME_SECONDS"] == "30"
    assert env["HOROVOD_STALL_CHECK_TIME_SECONDS"] == "7"
    threads = str(max(1, (os.cpu_count() or 1) // 2))
    assert env["TF_NUM_INTRAOP_THREADS"] == env["TF_NUM_INTEROP_THREADS"] == threads


def test_py_programs_run_under_this_interpreter(tmp_path):
    script = tmp_path / "prog.py"
    script.write_text("")
    command = launch.build_command("/bin/horovodrun", 2, [str(script), "--num_groups=1"], None, None)
    assert command[6:] == [sys.executable, str(script), "--num_groups=1"]


def test_output_formatter_reprefixes_and_streams_partial_chunks():
    formatter = launch.OutputFormatter()
    out = formatter.feed(b"[0]<stdout>:hel")
    assert out == ""  # waits for the end of the line
    out += formatter.feed(b"lo\n[1]<stderr>:oops\n[1]<stdout>:a\rb\nProcess 1 exit with status code 3.\n")
    out += formatter.feed("[0]<stdout>:caf\u00e9\n".encode()[:-2])
    out += formatter.feed("[0]<stdout>:caf\u00e9\n".encode()[-2:])
    out += formatter.feed(b"Terminating remaining workers after failure of Process 1.\n[0]<stdout>:tail")
    out += formatter.feed(b"")
    assert out == (
        "[rank 0] hello\n[rank 1:stderr] oops\n[rank 1] a\rb\nProcess 1 exit with status code 3.\n"
        "[rank 0] caf\u00e9\nTerminating remaining workers after failure of Process 1.\n[rank 0] tail"
    )
    assert formatter.failure() == (1, 3)


def test_output_formatter_names_a_rank_killed_from_outside_over_a_survivor_that_crashed():
    # Ranks 2 and 3 got SIGKILL; rank 0 aborted on the broken connection and was reaped first.
    formatter = launch.OutputFormatter()
    formatter.feed(
        b"Process 0 exit with status code 134.\n"
        b"Terminating remaining workers after failure of Process 0.\n"
        b"Process 2 exit with status code 137.\nProcess 3 exit with status code 137.\n"
        b"Process 1 exit with status code 143.\n"
    )
    assert formatter.failure() == (2, 137)
    # A SIGKILL long after the first failure is horovodrun's own escalation, not the cause.
    formatter = launch.OutputFormatter()
    formatter.feed(b"Process 0 exit with status code 5.\n")
    formatter.reported_at[0] -= 10.0
    formatter.feed(b"Process 1 exit with status code 137.\n")
    assert formatter.failure() == (0, 5)


# ---------------------------------------------------------------- real jobs


@needs_horovod
def test_two_ranks_print_with_rank_prefixes(tmp_path):
    script = _script(
        tmp_path,
        "hello",
        """
        print(f"hello from rank {RANK} of {os.environ['HOROVOD_SIZE']}")
        print(f"note from rank {RANK}", file=sys.stderr)
        """,
    )
    result = _launch("--np", 2, "--groups", 1, "--", script)
    assert result.returncode == 0, result.stdout + result.stderr
    for rank in (0, 1):
        assert f"[rank {rank}] hello from rank {rank} of 2\n" in result.stdout
        assert f"[rank {rank}:stderr] note from rank {rank}\n" in result.stdout
    assert "horovodrun --gloo -np 2 -H localhost:2" in result.stderr


@needs_horovod
def test_failing_rank_fails_the_job(tmp_path):
    script = _script(
        tmp_path,
        "fails",
        """
        print(f"rank {RANK} up")
        sys.exit(3 if RANK == 1 else 0)
        """,
    )
    result = _launch("--np", 2, "--groups", 1, "--", script)
    assert result.returncode != 0
    assert "[rank 1] rank 1 up" in result.stdout
    assert "Process 1 exit with status code 3" in result.stdout
    assert "rank 1 failed first, with exit status 3" in result.stderr
    assert _no_survivors(script)


@needs_horovod
def test_a_preempted_job_exits_with_the_preempted_status(tmp_path):
    from tf_codistill.config import ExitStatus
    from tf_codistill.launch import EXIT_PREEMPTED

    assert EXIT_PREEMPTED == ExitStatus.PREEMPTED
    script = _script(tmp_path, "preempted", "sys.exit(143)")
    result = _launch("--np", 2, "--groups", 1, "--", script)
    assert result.returncode == ExitStatus.PREEMPTED, result.stdout + result.stderr
    assert "was preempted (exit status 143)" in result.stderr and "run the same command" in result.stderr


@needs_horovod
def test_num_groups_and_environment_are_forwarded(tmp_path):
    script = _script(
        tmp_path,
        "groups",
        """
        ok = "--num_groups=2" in sys.argv and "--collective_timeout=30" in sys.argv
        ok = ok and os.environ.get("HOROVOD_GLOO_TIMEOUT_SECONDS") == "30"
        ok = ok and os.environ.get("TF_CPP_MIN_LOG_LEVEL") == "2" and int(os.environ["OMP_NUM_THREADS"]) >= 1
        print(f"rank {RANK} argv {sys.argv[1:]} ok {ok}")
        sys.exit(0 if ok else 5)
        """,
    )
    result = _launch("--np", 2, "--groups", 2, "--collective_timeout", 30, "--", script)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count(" ok True") == 2


@needs_horovod
def test_timeout_kills_everything_and_exits_124(tmp_path):
    script = _script(
        tmp_path,
        "sleeps",
        """
        print(f"rank {RANK} sleeping")
        while True:
            time.sleep(1)
        """,
    )
    start = time.monotonic()
    result = _launch("--np", 2, "--groups", 1, "--timeout", 5, "--", script, timeout=90)
    elapsed = time.monotonic() - start
    assert result.returncode == 124, result.stdout + result.stderr
    assert "timed out after 5 s" in result.stderr
    assert elapsed < 35, elapsed  # 5 s + launcher start-up + at most ~10 s of teardown
    assert _no_survivors(script, wait_s=0.0), _survivors(script)


@needs_horovod
def test_sigterm_is_forwarded_and_stubborn_workers_are_killed(tmp_path):
    script = _script(
        tmp_path,
        "stubborn",
        """
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        print(f"rank {RANK} started", flush=True)
        while True:
            time.sleep(1)
        """,
    )
    proc = subprocess.Popen(
        [*LAUNCHER, "--np", "2", "--groups", "1", "--", str(script)],
        cwd=REPO,
        env=python_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 90
        while not all(any(f"[rank {r}] rank {r} started" in line for line in list(lines)) for r in (0, 1)):
            assert proc.poll() is None, "".join(lines)
            assert time.monotonic() < deadline, "workers did not start:\n" + "".join(lines)
            time.sleep(0.2)
        assert _survivors(script)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=40) == 128 + signal.SIGTERM
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    reader.join(timeout=5)
    assert "received SIGTERM" in "".join(lines)
    assert _no_survivors(script, wait_s=0.0), _survivors(script)


def test_no_default_wall_clock_bound():
    """A healthy long job is never cut short by default; waits inside it are bounded by
    --collective_timeout, and --timeout stays available."""
    parser = launch._parser()
    assert parser.parse_args(["--np", "2"]).timeout is None
    assert parser.parse_args(["--np", "2", "--timeout", "60"]).timeout == 60.0

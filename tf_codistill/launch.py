"""Run a program as N local Horovod (Gloo) processes, e.g. train.py split into groups.

Single machine, 4 processes in 2 codistillation groups:

    python -m tf_codistill.launch --np 4 --groups 2 -- train.py --mode=codistill --steps=60

Everything after `--` is the program and its arguments; a program ending in `.py` runs
under this interpreter. The launcher wraps `horovodrun --gloo -np N -H localhost:N ...`
and adds:

* `--num_groups=<groups>` and `--collective_timeout=<seconds>` to the program's flags,
  unless the program's arguments already carry them;
* a child environment with quiet TensorFlow logging, Horovod's Gloo and stall timeouts
  derived from `--collective_timeout`, and per-process thread counts that share the cores
  (`max(1, cpu_count // np)`); variables the user already set are kept;
* each rank's output re-printed line by line as it arrives, as `[rank R] ...` (stdout)
  and `[rank R:stderr] ...` (stderr); the launcher's own messages go to stderr as
  `launch: ...`;
* an optional whole-job wall-clock bound (`--timeout`, exit status 124 on expiry; none by
  default, so a healthy long job is never cut short: every wait inside it is bounded by
  `--collective_timeout` instead) and forwarding of SIGINT/SIGTERM, both of which tear the
  whole job down so no worker outlives it.

Exit status: 0 when every rank succeeded; horovodrun's status otherwise (never 0 when a
rank failed); 143 when the first rank to stop was preempted (train.py's ExitStatus.PREEMPTED);
2 for bad arguments; 124 on timeout; 128 + signal number when interrupted.

The module uses only the standard library (and psutil, a Horovod dependency, when
present), so `python tf_codistill/launch.py ...` works too.
"""

from __future__ import annotations

import argparse
import codecs
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType
from typing import IO, Any, TextIO

__all__ = ["main", "build_command", "child_env", "OutputFormatter"]

PROG = "launch"
EXIT_USAGE = 2
EXIT_TIMEOUT = 124
KILL_GRACE_S = 10.0
_POLL_S = 0.2

# Horovod's per-line prefix (safe_shell_exec.prefix_connection): "[<rank>]<stdout|stderr>:".
_RANK_PREFIX = re.compile(r"^\[(?P<rank>\d+)\]<(?P<stream>stdout|stderr)>:")
# horovodrun's own lines about failed ranks (gloo_run._exec_command).
_PROCESS_EXIT = re.compile(r"^Process (?P<rank>\d+) exit with status code (?P<code>-?\d+)\.")
_FIRST_FAILURE = re.compile(r"^Terminating remaining workers after failure of Process (?P<rank>\d+)\.")
# Exit statuses of a process killed by SIGKILL, as horovodrun's shell reports them (128 + 9) or
# as a negative signal number.
_SIGKILLED = (128 + signal.SIGKILL, -signal.SIGKILL)
# horovodrun stops the remaining workers with SIGTERM and sends SIGKILL only after 5 s
# (safe_shell_exec.GRACEFUL_TERMINATION_TIME_S), so a SIGKILL reported sooner than this after
# the first failure came from outside the job: the OOM killer, a user, the cluster.
_OUTSIDE_KILL_WINDOW_S = 2.0
# train.py's ExitStatus.PREEMPTED (this module imports nothing of the library): a rank stopped on
# SIGTERM/SIGINT at a step the job agreed on and backed it up. The same number as 128 + SIGTERM.
EXIT_PREEMPTED = 143


class UsageError(Exception):
    """Bad command line; reported as one line with exit status 2."""


def _error_line(message: str) -> str:
    return f"{PROG}: error: {message}"


def _info(message: str) -> None:
    sys.stdout.flush()
    print(f"{PROG}: {message}", file=sys.stderr, flush=True)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=f"{Path(sys.executable).name} -m tf_codistill.launch",
        description="Run a program as N local Horovod (Gloo) processes.",
        usage="%(prog)s --np N [--groups G] [--timeout S] [--collective_timeout S] -- PROGRAM [ARGS...]",
    )
    parser.add_argument("--np", type=int, required=True, help="Number of processes (ranks).")
    parser.add_argument(
        "--groups",
        type=int,
        default=None,
        help="Codistillation groups; passed to the program as --num_groups (default: the program's own "
        "--num_groups).",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=None,
        help="Wall-clock bound for the whole job, in seconds (exit status 124). Default: none; a stuck "
        "job still ends, since every collective and rendezvous waits at most --collective_timeout.",
    )
    parser.add_argument(
        "--collective_timeout",
        type=float,
        default=None,
        help="Seconds a collective or rendezvous may wait (default: the program's own value, else 120).",
    )
    return parser


def _split_argv(argv: Sequence[str]) -> tuple[list[str], list[str] | None]:
    """Splits the launcher's arguments from the program's at the first `--` (None: no `--`)."""
    argv = list(argv)
    if "--" not in argv:
        return argv, None
    at = argv.index("--")
    return argv[:at], argv[at + 1 :]


def _find_flag(args: Sequence[str], name: str) -> str | None:
    """The value of `--name=V`, `--name V`, `-name=V` or `-name V` in args (last wins), else None."""
    value = None
    spellings = (f"--{name}", f"-{name}")
    for i, arg in enumerate(args):
        if arg == "--":
            break
        for flag in spellings:
            if arg.startswith(flag + "="):
                value = arg[len(flag) + 1 :]
            elif arg == flag:
                if i + 1 >= len(args):
                    raise UsageError(f"the program's {flag} has no value.")
                value = args[i + 1]
    return value


def _resolve_forwarded(
    name: str, launcher_flag: str, launcher_value, program_args: Sequence[str], parse, kind: str
):
    """One setting both the launcher and the program may carry (`--name`).

    Returns (value, whether to pass `--name=value` to the program): the
    program's own value wins when the launcher has none; both given and
    different is an error.
    """
    given = _find_flag(program_args, name)
    if given is None:
        return launcher_value, True
    try:
        program_value = parse(given)
    except ValueError:
        raise UsageError(f"the program's --{name}={given!r} is not {kind}.") from None
    if launcher_value is not None and launcher_value != program_value:
        raise UsageError(
            f"--{launcher_flag}={launcher_value:g} disagrees with the program's "
            f"--{name}={program_value:g}; give one of them."
        )
    return program_value, False


def _resolve_groups(launcher_groups: int | None, program_args: Sequence[str]) -> tuple[int, bool]:
    """Returns (groups, whether to pass --num_groups to the program)."""
    groups, forward = _resolve_forwarded(
        "num_groups", "groups", launcher_groups, program_args, int, "an integer"
    )
    if groups is None:
        raise UsageError("give --groups G (or --num_groups=G among the program's arguments).")
    return groups, forward


def _resolve_collective_timeout(
    launcher_value: float | None, program_args: Sequence[str]
) -> tuple[float, bool]:
    """Returns (collective timeout in seconds, whether to pass --collective_timeout to the program)."""
    value, forward = _resolve_forwarded(
        "collective_timeout", "collective_timeout", launcher_value, program_args, float, "a number"
    )
    return (120.0 if value is None else value), forward


def find_horovodrun() -> str | None:
    """Path of `horovodrun`: next to this interpreter first, then on PATH; None if missing."""
    beside = Path(sys.executable).parent / "horovodrun"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which("horovodrun")


def _program_command(program: Sequence[str]) -> list[str]:
    """The program's argv, run with this interpreter when it is a `.py` file."""
    head = program[0]
    if head.endswith(".py"):
        if not Path(head).is_file():
            raise UsageError(f"program {head!r} not found.")
        return [sys.executable, *program]
    if os.sep not in head and shutil.which(head) is None:
        raise UsageError(f"program {head!r} not found on PATH.")
    if os.sep in head and not os.access(head, os.X_OK):
        raise UsageError(f"program {head!r} not found or not executable.")
    return list(program)


def build_command(
    horovodrun: str,
    np: int,
    program: Sequence[str],
    groups: int | None,
    collective_timeout: float | None,
) -> list[str]:
    """The horovodrun command line.

    Args:
        horovodrun: Path of the horovodrun executable.
        np: Number of processes.
        program: The program's argv (the program itself first).
        groups: Passed as `--num_groups=groups` when not None.
        collective_timeout: Passed as `--collective_timeout=...` when not None.

    Returns:
        The argv to execute.
    """
    command = [horovodrun, "--gloo", "-np", str(np), "-H", f"localhost:{np}", *_program_command(program)]
    if groups is not None:
        command.append(f"--num_groups={groups}")
    if collective_timeout is not None:
        command.append(f"--collective_timeout={collective_timeout:g}")
    return command


def child_env(np: int, collective_timeout: float, base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for horovodrun and its workers; variables already in `base` win.

    Args:
        np: Number of processes sharing this machine's cores.
        collective_timeout: Seconds a collective or rendezvous may wait.
        base: Starting environment (os.environ by default).

    Returns:
        A new environment dictionary.
    """
    env = dict(os.environ if base is None else base)
    seconds = max(1, int(collective_timeout))
    threads = str(max(1, (os.cpu_count() or 1) // np))
    defaults = {
        "TF_CPP_MIN_LOG_LEVEL": "2",
        "PYTHONUNBUFFERED": "1",  # horovodrun's own messages arrive in order with the ranks' lines
        "HOROVOD_GLOO_TIMEOUT_SECONDS": str(seconds),
        "HOROVOD_STALL_CHECK_TIME_SECONDS": str(max(1, seconds // 4)),
        "HOROVOD_STALL_SHUTDOWN_TIME_SECONDS": str(seconds),
        "OMP_NUM_THREADS": threads,
        "TF_NUM_INTRAOP_THREADS": threads,
        "TF_NUM_INTEROP_THREADS": threads,
    }
    for key, value in defaults.items():
        env.setdefault(key, value)
    return env


class OutputFormatter:
    """Turns horovodrun's byte stream into reformatted text, one line (or `\\r` segment) at a time.

    `[3]<stdout>:text` becomes `[rank 3] text` and `[3]<stderr>:text` becomes
    `[rank 3:stderr] text`; other lines (horovodrun's own) pass through unchanged. It also
    notes which ranks horovodrun reported as failed.
    """

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._pending = ""
        self.failed: dict[int, int] = {}  # rank -> exit code, in the order reported
        self.reported_at: dict[int, float] = {}  # rank -> time.monotonic() of the report
        self.first_failure: int | None = None

    def feed(self, data: bytes) -> str:
        """Consumes a chunk (b"" at end of stream) and returns the complete text ready to print."""
        text = self._pending + self._decoder.decode(data, final=not data)
        self._pending = ""
        out = []
        for segment in re.split(r"(?<=[\r\n])", text):
            if not segment:
                continue
            if data and not segment.endswith(("\n", "\r")):
                self._pending = segment  # incomplete; wait for the rest
                break
            out.append(self._format(segment))
        return "".join(out)

    def _format(self, segment: str) -> str:
        match = _RANK_PREFIX.match(segment)
        if match:
            rank, stream = match["rank"], match["stream"]
            tag = f"[rank {rank}]" if stream == "stdout" else f"[rank {rank}:stderr]"
            return f"{tag} {segment[match.end() :]}"
        if match := _PROCESS_EXIT.match(segment):
            rank = int(match["rank"])
            if rank not in self.failed:
                self.failed[rank] = int(match["code"])
                self.reported_at[rank] = time.monotonic()
        elif match := _FIRST_FAILURE.match(segment):
            if self.first_failure is None:
                self.first_failure = int(match["rank"])
        return segment

    def failure(self) -> tuple[int, int] | None:
        """(rank, exit code) of the rank whose failure started it all, or None.

        That is the rank horovodrun names first, unless another rank was SIGKILLed from outside
        at about the same time: when a whole group is killed, a survivor can crash on the broken
        connection (SIGABRT from Gloo) before horovodrun reaps the killed ranks, and the kill is
        the cause worth naming.
        """
        if not self.failed:
            return None
        first = self.first_failure if self.first_failure in self.failed else next(iter(self.failed))
        if self.failed[first] not in _SIGKILLED:
            start = min(self.reported_at.values())
            for rank, code in self.failed.items():
                if code in _SIGKILLED and self.reported_at[rank] - start < _OUTSIDE_KILL_WINDOW_S:
                    return rank, code
        return first, self.failed[first]


def _pump(stream: IO[bytes], formatter: OutputFormatter, out: TextIO) -> None:
    """Copies the child's output to `out` as it arrives, flushing each piece."""
    fd = stream.fileno()
    broken = False
    while True:
        data = os.read(fd, 65536)
        text = formatter.feed(data)
        if text and not broken:
            try:
                out.write(text)
                out.flush()
            except (BrokenPipeError, ValueError):
                broken = True  # keep draining so the child never blocks on a full pipe
        if not data:
            return


def _descendants(pid: int) -> list[Any]:
    """psutil.Process objects below pid (empty when psutil is missing or pid is gone)."""
    try:
        import psutil
    except ImportError:
        return []
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []


def _die_with_parent() -> None:
    """In horovodrun before exec: on Linux, die with the launcher even if it is SIGKILLed.

    SIGKILL, not SIGTERM: the death signal comes once per exiting launcher thread, and two quick
    SIGTERMs can deadlock horovodrun's signal handler (it calls threading.Event.set re-entrantly).
    Horovod's per-rank middlemen notice horovodrun's death and stop the workers themselves.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class _Job:
    """A running horovodrun, in its own session, plus everything it has started."""

    def __init__(self, command: list[str], env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
        self.pgid = self.proc.pid  # session leader: its pid is the group id
        # Horovod's per-rank "middleman" processes call setsid(), so they and the workers leave
        # horovodrun's process group; remember every descendant seen so none is orphaned.
        self._seen: dict[int, Any] = {}  # pid -> psutil.Process

    def note_descendants(self) -> None:
        """Records the processes currently below horovodrun."""
        for child in _descendants(self.proc.pid):
            self._seen.setdefault(child.pid, child)

    def _signal_group(self, signum: int) -> None:
        try:
            os.killpg(self.pgid, signum)
        except (ProcessLookupError, PermissionError):
            pass

    def terminate(
        self,
        signum: int = signal.SIGTERM,
        grace_s: float = KILL_GRACE_S,
        hurry: Callable[[], bool] | None = None,
    ) -> None:
        """Stops the whole job: signal the group, wait up to grace_s, then SIGKILL what is left.

        Args:
            signum: First signal for horovodrun's process group (it then stops the workers itself).
            grace_s: Seconds to wait for a clean exit before SIGKILL.
            hurry: Optional predicate; once it returns True, the grace period ends early.
        """
        self.note_descendants()
        self._signal_group(signum)
        deadline = time.monotonic() + grace_s
        while self.proc.poll() is None and time.monotonic() < deadline:
            if hurry is not None and hurry():
                break
            self.note_descendants()
            time.sleep(_POLL_S)
        if self.proc.poll() is None:
            self.note_descendants()
            self._signal_group(signal.SIGKILL)
            self.proc.wait()
        self._signal_group(signal.SIGKILL)  # stragglers left in horovodrun's own group
        self._reap_descendants(max(1.0, deadline - time.monotonic()))

    def _reap_descendants(self, grace_s: float) -> None:
        """Terminates, then kills, any recorded descendant that is still alive."""
        if not self._seen:
            return
        import psutil

        alive = []
        for child in self._seen.values():
            try:
                if child.is_running():  # also checks the pid was not reused
                    child.terminate()
                    alive.append(child)
            except psutil.Error:
                pass
        _, alive = psutil.wait_procs(alive, timeout=grace_s)
        for child in alive:
            try:
                child.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(alive, timeout=5)


def _exit_status(returncode: int) -> int:
    return 128 - returncode if returncode < 0 else returncode


def _run(command: list[str], env: dict[str, str], timeout_s: float | None, out: TextIO) -> int:
    """Runs horovodrun, streaming its output; returns the launcher's exit status.
    `timeout_s=None`: no bound on the whole job."""
    received: list[int] = []  # a list, not a threading.Event: handlers must not take locks

    def on_signal(signum: int, frame: FrameType | None) -> None:
        received.append(signum)

    def hurry() -> bool:
        return len(received) > 1  # a second signal skips the grace period

    handlers = {}
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGINT, signal.SIGTERM):
            handlers[signum] = signal.signal(signum, on_signal)
    formatter = OutputFormatter()
    try:
        try:
            job = _Job(command, env)
        except OSError as err:
            _info(f"could not start horovodrun: {err}")
            return 1
        pump = threading.Thread(target=_pump, args=(job.proc.stdout, formatter, out), daemon=True)
        pump.start()
        deadline = math.inf if timeout_s is None else time.monotonic() + timeout_s
        status = None
        while status is None:
            try:
                returncode = job.proc.wait(timeout=_POLL_S)
            except subprocess.TimeoutExpired:
                pass
            else:
                status = _exit_status(returncode)
                break
            if received:
                signum = received[0]
                _info(f"received {signal.Signals(signum).name}; stopping all {_np_of(command)} processes.")
                job.terminate(signum, hurry=hurry)
                status = 128 + signum
            elif time.monotonic() >= deadline:
                _info(f"timed out after {timeout_s:g} s (--timeout); stopping all processes.")
                job.terminate(signal.SIGTERM, hurry=hurry)
                status = EXIT_TIMEOUT
        pump.join(timeout=5.0)
        job.proc.stdout.close()
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
    if status == EXIT_TIMEOUT or status >= 128:
        return status  # the job was stopped; the message is already out
    failure = formatter.failure()
    if failure is not None:
        rank, code = failure
        if code == EXIT_PREEMPTED:
            _info(
                f"rank {rank} was preempted (exit status {code}): the job stopped at a step every rank "
                "backed up; run the same command to resume."
            )
            return EXIT_PREEMPTED
        if status == 0:  # horovodrun reported a failed rank yet exited 0: never hide the failure
            status = code if 0 < code < 256 else 1
        _info(f"rank {rank} failed first, with exit status {code}; the job exits with status {status}.")
    elif status != 0:
        _info(f"horovodrun exited with status {status}.")
    return status


def _np_of(command: list[str]) -> str:
    return command[command.index("-np") + 1]


def main(argv: Sequence[str] | None = None) -> int:
    """Parses the launcher's command line, runs the job, and returns the exit status.

    Args:
        argv: Arguments without the program name (sys.argv[1:] by default).

    Returns:
        0 on success; 2 for bad arguments; 124 on timeout; 128 + signal when interrupted;
        otherwise horovodrun's (non-zero) status.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = _parser()
    try:
        own, program = _split_argv(argv)
        try:
            args = parser.parse_args(own)
        except SystemExit as done:  # --help, or argparse's own usage error (already printed)
            return done.code if isinstance(done.code, int) else EXIT_USAGE
        if program is None:
            raise UsageError("missing `-- PROGRAM [ARGS...]`: put the program to run after `--`.")
        if args.np < 1:
            raise UsageError(f"--np must be >= 1, got {args.np}.")
        if args.groups is not None and args.groups < 1:
            raise UsageError(f"--groups must be >= 1, got {args.groups}.")
        for flag, value in (("timeout", args.timeout), ("collective_timeout", args.collective_timeout)):
            if value is not None and not math.isfinite(value):  # nan passes every comparison
                raise UsageError(f"--{flag} must be a finite number of seconds, got {value:g}.")
        if args.timeout is not None and args.timeout <= 0:
            raise UsageError(f"--timeout must be > 0 seconds, got {args.timeout:g}.")
        if args.collective_timeout is not None and args.collective_timeout <= 0:
            raise UsageError(f"--collective_timeout must be > 0 seconds, got {args.collective_timeout:g}.")
        if not program:
            raise UsageError("no program after `--`.")
        groups, pass_groups = _resolve_groups(args.groups, program[1:])
        if groups < 1:
            raise UsageError(f"--num_groups must be >= 1, got {groups}.")
        if args.np % groups:
            raise UsageError(
                f"--groups={groups} does not divide --np={args.np}: every group needs the same number "
                f"of processes; use an --np that is a multiple of {groups}."
            )
        collective_timeout, pass_timeout = _resolve_collective_timeout(args.collective_timeout, program[1:])
        if not (math.isfinite(collective_timeout) and collective_timeout > 0):
            raise UsageError(
                f"the program's --collective_timeout must be a finite number > 0 seconds, "
                f"got {collective_timeout:g}."
            )
        horovodrun = find_horovodrun()
        if horovodrun is None:
            raise UsageError("Horovod is not installed: run `make horovod` (horovodrun not found).")
        command = build_command(
            horovodrun,
            args.np,
            program,
            groups if pass_groups else None,
            collective_timeout if pass_timeout else None,
        )
    except UsageError as err:
        print(_error_line(str(err)), file=sys.stderr, flush=True)
        return EXIT_USAGE
    env = child_env(args.np, collective_timeout)
    _info(f"{args.np} processes, {groups} groups: {shlex.join(command)}")
    return _run(command, env, args.timeout, sys.stdout)


if __name__ == "__main__":
    sys.exit(main())

"""SIGTERM and SIGINT during `fit`: stop at one agreed step, back it up, exit.

Kubernetes, Slurm and spot instances stop a worker with SIGTERM and a grace
period. `PreemptionHandler` is a Keras callback whose signal handler only
sets a flag. Between two steps, the processes that must stay in step (every
process of the Horovod job: the workers of an MWMS group and the groups of a
prediction or weights exchange) take the maximum of their flags in one
all-reduce, so all of them see a signal any one of them got, at the same
step. Then each writes a backup of that step (`Backup.save_now`), waits until
every other has written its own, and `fit` raises `Preempted`; `train.py`
exits with `ExitStatus.PREEMPTED`. Running the same command again resumes at
that step, and ends where an uninterrupted run ends.

In one process, or a job that is one group meeting the others through a
shared directory (which never waits for them), the flag is read between every
two steps. In a job of several processes the all-reduce costs about 2 ms on a
CPU host, so it runs only every `check_seconds` of training or so: the
processes agree, at each check, on the number of steps to the next one (the
largest any of them proposes from its own step time). A signal therefore
stops training within about `check_seconds` plus a step, plus the backup.

The wait is bounded: the all-reduce fails after the job's collective timeout
(Horovod's Gloo timeout) when a process is gone; a process that had the
signal then backs itself up alone and the error goes on (train.py: exit 5).
A second SIGINT interrupts at once (KeyboardInterrupt); further SIGTERMs are
ignored, so a supervisor that repeats its SIGTERM does not cut the backup
short (SIGKILL still does).

Example:

    backup = tf_codistill.Backup("ckpt/backup", every_steps=500)
    stop = tf_codistill.PreemptionHandler(backup)
    try:
        model.fit(ds.skip(backup.resume_step()), epochs=90, steps_per_epoch=1000,
                  callbacks=[backup, stop])
    except tf_codistill.Preempted as e:
        sys.exit(143)   # run the same command again to resume at e.step
"""

from __future__ import annotations

import math
import signal
import threading
import time
from collections.abc import Callable, Sequence

import keras

__all__ = ["Preempted", "PreemptionHandler"]

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Preempted(Exception):
    """Training stopped on a signal at an agreed step, backed up when a backup
    was given.

    Attributes:
        step: the updates done (and backed up).
        signal_name: the signal this process got (``SIGTERM``, ``SIGINT``), or
            ``None`` when only another process of the job got one.
        seconds: from this process's signal (else from the agreement) to the
            end of the backup.
        folder: the backup written, or None (none asked for, or the newest
            existing backup already holds this step).
    """

    def __init__(
        self, step: int, signal_name: str | None, seconds: float, folder: str | None, backed_up: bool = True
    ):
        self.step, self.signal_name, self.seconds, self.folder = step, signal_name, seconds, folder
        who = f"{signal_name} received" if signal_name else "another process of the job was signalled"
        if not backed_up:
            where = "no backups kept, so a rerun starts afresh"
        else:
            where = (
                f"backed up in {folder}" if folder else "no new backup (a rerun resumes from the newest one)"
            )
        super().__init__(f"{who}: stopped after step {step}, {where} ({seconds:.1f} s after the signal)")


class PreemptionHandler(keras.callbacks.Callback):
    """Stops `fit` or `CodistillLoop.train` at one agreed step after SIGTERM/SIGINT.

    Put it after every callback that writes per-step logs: the backup is
    written at the start of a step, once every callback has seen the end of
    the one before.

    Args:
        backup: what writes the step, through its `save_now()`: the run's
            `Backup` under `fit`, the `CodistillLoop` under its `train`.
            None: stop without a backup.
        agree: for jobs of several processes: `agree(values) -> values` takes
            a list of non-negative ints and returns their element-wise
            maximum over every process, called by all at once
            (`Runtime.max_over_job`). None: this process decides alone.
        check_seconds: in a job, seconds of training between two agreements
            (> 0); one process reads its flag at every step.
        signals: the signals handled (SIGTERM and SIGINT).
    """

    def __init__(
        self,
        backup=None,
        agree: Callable[[Sequence[int]], Sequence[int]] | None = None,
        check_seconds: float = 1.0,
        signals: Sequence[int] = SIGNALS,
    ):
        super().__init__()
        if not (
            isinstance(check_seconds, (int, float)) and math.isfinite(check_seconds) and check_seconds > 0
        ):
            raise ValueError(f"check_seconds must be a finite number > 0, got {check_seconds!r}.")
        self.backup = backup
        self.agree = agree
        self.check_seconds = float(check_seconds)
        self.signals = tuple(signals)
        self.received: list[tuple[int, float]] = []  # (signal, time.monotonic()) as they came
        self._previous: dict[int, object] = {}
        self._interval = 1  # steps between agreements, as last agreed
        self._since = 0
        self._clock = None

    # ------------------------------------------------------------ signals
    def _on_signal(self, signum, frame):
        self.received.append((signum, time.monotonic()))
        if signum == signal.SIGINT and sum(s == signal.SIGINT for s, _ in self.received) > 1:
            raise KeyboardInterrupt  # a second Ctrl-C: the user does not want to wait

    def on_train_begin(self, logs=None):
        self.received, self._interval, self._since, self._clock = [], 1, 0, None
        if threading.current_thread() is threading.main_thread():  # Python only lets it install handlers
            for signum in self.signals:
                self._previous[signum] = signal.signal(signum, self._on_signal)

    def on_train_end(self, logs=None):
        self._restore()

    def _restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    # --------------------------------------------------------------- steps
    def on_train_batch_begin(self, batch, logs=None):
        flag = 1 if self.received else 0
        if self.agree is None:
            stop = bool(flag)
        else:
            self._since += 1
            if self._since < self._interval:  # every process counts the same steps
                return
            now = time.monotonic()
            proposal = 1
            if self._clock is not None:
                per_step = (now - self._clock) / max(self._since, 1)
                proposal = max(1, min(10_000, int(self.check_seconds / max(per_step, 1e-6))))
            try:
                flag_max, interval = self.agree([flag, proposal])
            except Exception:
                if flag:  # keep what this process has; the error says why the job stops
                    self._save()
                raise
            stop, self._interval, self._since, self._clock = bool(flag_max), int(interval), 0, now
        if stop:
            self._stop()

    def _save(self) -> str | None:
        return self.backup.save_now() if self.backup is not None else None

    def _stop(self) -> None:
        agreed = time.monotonic()
        folder = self._save()
        if self.agree is not None:
            self.agree([0, 0])  # every process has written its backup: none exits before
        self._restore()
        first = self.received[0] if self.received else None
        name = signal.Signals(first[0]).name if first else None
        seconds = time.monotonic() - (first[1] if first else agreed)
        step = int(self.model.optimizer.iterations.numpy())
        raise Preempted(step, name, seconds, folder, backed_up=self.backup is not None)

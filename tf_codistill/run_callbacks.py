"""The Keras callbacks a `train.py` run adds to `fit`: its CSV of epoch logs
and JSON lines of step logs (both resumable), and its two ways to stop (at an
exact update count; at a target validation accuracy)."""

from __future__ import annotations

import csv
import io
import json
import os

import keras

from tf_codistill import files

__all__ = ["ResumableCSVLogger", "StepLogger", "StopAtStep", "StopAtTarget"]


def _remove_stale_temporaries(path: str) -> None:
    """Deletes what a kill during `files.write_atomic(path, ...)` left beside
    `path` (its `.tmp-<pid>-<name>` files)."""
    folder, name = os.path.split(path)
    if not files.isdir(folder):
        return
    for entry in files.listdir(folder):
        if entry.startswith(".tmp-") and entry.endswith(f"-{name}"):
            files.remove(files.join(folder, entry))


def _resumed(backup) -> bool:
    return backup is not None and backup.restored_epoch is not None


class ResumableCSVLogger(keras.callbacks.Callback):
    """One row of epoch logs per epoch, the file rewritten whole (atomically)
    at every epoch end, on any `tf.io.gfile` filesystem. After a resume the
    rows come from the backup's history: every epoch appears once, however
    the kill fell between the backup and the row."""

    def __init__(self, path: str, backup=None):
        super().__init__()
        self.path = path
        self.backup = backup
        self._keys: list[str] | None = None
        self._rows: list[list] = []

    def on_train_begin(self, logs=None):
        self._keys, self._rows = None, []
        _remove_stale_temporaries(self.path)
        if _resumed(self.backup):
            history = self.backup.restored_history
            self._keys = sorted(history)
            count = len(history[self._keys[0]]) if self._keys else 0
            self._rows = [[epoch, *(history[k][epoch] for k in self._keys)] for epoch in range(count)]
            self._write()
        elif files.exists(self.path):
            files.remove(self.path)

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        if self._keys is None:
            self._keys = sorted(logs)
        self._rows.append([epoch, *(float(logs[k]) if k in logs else "NA" for k in self._keys)])
        self._write()

    def _write(self) -> None:
        text = io.StringIO()
        writer = csv.writer(text, lineterminator="\n")
        writer.writerow(["epoch", *(self._keys or [])])
        writer.writerows(self._rows)
        files.write_atomic(self.path, text.getvalue().encode())


class StepLogger(keras.callbacks.Callback):
    """Writes every training batch's logs (running epoch means) as JSON lines:
    on a local disk a line per step, flushed (none is lost to a kill after
    its step); elsewhere (gs://, ...) the file rewritten at every epoch end.
    After a resume it keeps the lines up to the restored step and appends."""

    def __init__(self, path: str, backup=None):
        super().__init__()
        self.path = path
        self.backup = backup
        self._file = None
        self._lines: list[str] = []
        self._step = 0

    def on_train_begin(self, logs=None):
        self._step = int(self.model.optimizer.iterations.numpy())
        kept = []
        if _resumed(self.backup) and files.exists(self.path):
            for line in files.read_bytes(self.path).decode().splitlines(keepends=True):
                try:
                    if json.loads(line)["step"] <= self._step:
                        kept.append(line)
                except (ValueError, KeyError):
                    break  # a line cut short by the kill
        self._lines = kept
        _remove_stale_temporaries(self.path)
        if files.is_local(self.path):
            # Unbuffered: every line reaches the file at its step, and a failed
            # write (a full disk) leaves nothing behind to flush at exit.
            self._file = open(self.path, "wb", buffering=0)  # noqa: SIM115 - closed in on_train_end
            self._file.write("".join(kept).encode())
        else:
            files.write_atomic(self.path, "".join(kept).encode())

    def on_train_batch_end(self, batch, logs=None):
        self._step += 1
        line = json.dumps({"step": self._step, **{k: float(v) for k, v in (logs or {}).items()}}) + "\n"
        if self._file is not None:
            self._file.write(line.encode())
        else:
            self._lines.append(line)

    def on_epoch_end(self, epoch, logs=None):
        if self._file is None:
            files.write_atomic(self.path, "".join(self._lines).encode())

    def on_train_end(self, logs=None):
        if self._file is not None:
            self._file.close()
        else:
            files.write_atomic(self.path, "".join(self._lines).encode())


class StopAtStep(keras.callbacks.Callback):
    """Ends training after exactly `total_steps` updates: the last epoch is
    cut short when the run is not a whole number of epochs."""

    def __init__(self, total_steps: int):
        super().__init__()
        self.total_steps = total_steps

    def on_train_batch_end(self, batch, logs=None):
        if int(self.model.optimizer.iterations.numpy()) >= self.total_steps:
            self.model.stop_training = True


class StopAtTarget(keras.callbacks.Callback):
    """Ends training at the first evaluation whose validation accuracy (the
    groups' pooled `val_accuracy`) is at or above `target` (--stop_at_target)."""

    def __init__(self, target: float):
        super().__init__()
        self.target = target

    def on_epoch_end(self, epoch, logs=None):
        if (logs or {}).get("val_accuracy", -1.0) >= self.target:
            self.model.stop_training = True

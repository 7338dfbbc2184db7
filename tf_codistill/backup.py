"""Crash-safe training backups for `model.fit`, in one process or many.

`Backup` is a Keras callback. At the end of every epoch it writes the model's
weights and optimizer state (so the step count, and with it every schedule
driven by `optimizer.iterations`: learning rate, weight decay, alpha) to a
new directory, and only then renames that directory into place, so a kill at
any moment leaves either the previous backup or the new one, never half of
one. Each backup carries the SHA-256 of its weights file; a backup whose file
no longer matches (bit rot, a truncated copy) is skipped with a warning and
the one before it is used. The newest `keep` backups are kept.

When training starts, the newest usable backup is restored and `fit`
continues from the epoch after it: run the same command again after a crash.

The directory may be local or on any `tf.io.gfile` filesystem (`gs://` for
TPU jobs). An object store cannot rename a directory atomically, so there a
backup is staged on local disk, its files are copied into `epoch-N/`, and its
`meta.json` (which names the checksums) is written last, through a temporary
name: a backup without `meta.json` is incomplete and is ignored, then deleted.

Several processes (the workers of a MultiWorkerMirroredStrategy group, the
groups of a Horovod job) each keep their own backups, and must resume from the
same epoch: pass `agree`, a function that takes this process's usable epochs
and returns the newest epoch every process has (see
`tf_codistill.topology.agree_on_epoch`).

Example:

    backup = Backup("ckpt/backup")
    model.fit(ds, epochs=90, callbacks=[backup])
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence

import keras
import numpy as np

from tf_codistill import files

WEIGHTS = "state.weights.h5"
EXCHANGE = "exchange.npz"  # the exchange's own state (stale peer copies), when it has one
META = "meta.json"
_TMP = ".tmp-"


class BackupError(RuntimeError):
    """A backup could not be written (the directory is full or unwritable)."""


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    if files.is_local(path):
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    else:
        digest.update(files.read_bytes(path))
    return digest.hexdigest()


def _epoch_names(directory: str, unit: str = "epoch") -> dict[int, str]:
    prefix = f"{unit}-"
    return {
        int(name[len(prefix) :]): name
        for name in files.listdir(directory)
        if name.startswith(prefix) and name[len(prefix) :].isdigit()
    }


def list_backups(directory: str, unit: str = "epoch") -> list[int]:
    """Epochs (or steps, with `unit="step"`) of the complete backups in
    `directory` (those with a `meta.json`), newest first, not yet checked
    against their checksums."""
    return sorted(
        (
            e
            for e, name in _epoch_names(directory, unit).items()
            if files.exists(files.join(directory, name, META))
        ),
        reverse=True,
    )


def read_meta(directory: str, epoch: int, unit: str = "epoch") -> dict:
    return json.loads(files.read_bytes(files.join(directory, f"{unit}-{epoch:06d}", META)).decode())


def verify(directory: str, epoch: int, unit: str = "epoch") -> str | None:
    """None when the backup of `epoch` is intact, else why it is not."""
    path = files.join(directory, f"{unit}-{epoch:06d}")
    try:
        meta = read_meta(directory, epoch, unit)
    except (OSError, ValueError) as e:
        return f"unreadable {META} ({e})"
    expected_sums = {WEIGHTS: meta.get("sha256")}
    if meta.get("exchange_sha256"):
        expected_sums[EXCHANGE] = meta["exchange_sha256"]
    for name, expected in expected_sums.items():
        if not files.exists(files.join(path, name)):
            return f"{name} is missing"
        try:
            actual = _sha256(files.join(path, name))
        except OSError as e:
            return f"unreadable {name} ({e})"
        if actual != expected:
            return f"{name} does not match its checksum (corrupt or truncated)"
    return None


def intact_epochs(
    directory: str, on_skip: Callable[[int, str], None] | None = None, unit: str = "epoch"
) -> list[int]:
    """Epochs of the backups in `directory` that pass their checksums, newest
    first; `on_skip(epoch, why)` hears of each one that does not."""
    good = []
    for epoch in list_backups(directory, unit):
        problem = verify(directory, epoch, unit)
        if problem is None:
            good.append(epoch)
        elif on_skip is not None:
            on_skip(epoch, problem)
    return good


class Backup(keras.callbacks.Callback):
    """Backs training up at every epoch end and resumes from the newest
    intact backup when training starts.

    Args:
        directory: this process's backup directory (created when needed).
            Processes that train together each need their own.
        keep: how many backups to keep (>= 1). Two or more survive a
            corrupted newest backup.
        agree: for jobs of several processes: called with this process's
            intact epochs (newest first) on every process at once, returns
            the epoch they all resume from, or None to start afresh.
        extra: called at every save; its dict (JSON) is stored with the
            backup and handed back as `restored_extra` on resume.
        delete_on_finish: remove the backups when `fit` ends. `train.py`
            keeps them until its results are written and calls `remove`.
        verbose: print what was restored or skipped.
        unit: ``"epoch"`` (folders `epoch-N`, saved by `fit` at epoch ends) or
            ``"step"`` (folders `step-N`: `CodistillLoop` saves with `save(step)`).

    After `on_train_begin`: `restored_epoch` (None when starting afresh),
    `restored_step`, `restored_history` (the per-epoch logs of the epochs
    before it, as `History.history`), `restored_extra`.
    """

    def __init__(
        self,
        directory: str,
        keep: int = 2,
        agree: Callable[[Sequence[int]], int | None] | None = None,
        extra: Callable[[], dict] | None = None,
        delete_on_finish: bool = True,
        verbose: bool = True,
        unit: str = "epoch",
    ):
        super().__init__()
        if not directory:
            raise ValueError("Backup needs a directory.")
        if not isinstance(keep, int) or keep < 1:
            raise ValueError(f"Backup keep must be an integer >= 1, got {keep!r}.")
        if unit not in ("epoch", "step"):
            raise ValueError(f"Backup unit must be 'epoch' or 'step', got {unit!r}.")
        self.directory = directory
        self.unit = unit
        self.keep = keep
        self.agree = agree
        self.extra = extra
        self.delete_on_finish = delete_on_finish
        self.verbose = verbose
        self.restored_epoch: int | None = None
        self.restored_step = 0
        self.restored_history: dict[str, list[float]] = {}
        self.restored_extra: dict = {}
        self.history: dict[str, list[float]] = {}
        self._plan: tuple[int | None] | None = None
        self.save_seconds = 0.0

    # ------------------------------------------------------------- helpers
    def _say(self, message: str) -> None:
        if self.verbose:
            print(f"[backup] {message}", flush=True)

    def _path(self, epoch: int) -> str:
        return files.join(self.directory, f"{self.unit}-{epoch:06d}")

    def _exchange(self):
        exchange = getattr(self.model, "exchange", None)
        return exchange if hasattr(exchange, "state_dict") else None

    def _exchange_state(self) -> dict:
        exchange = self._exchange()
        return exchange.state_dict() if exchange is not None else {}

    def check_writable(self) -> None:
        """Raises BackupError when the directory cannot be created or written."""
        try:
            files.probe_writable(self.directory)
        except OSError as e:
            raise BackupError(
                f"backup directory {self.directory} is not writable ({e}); point the workdir at a "
                "writable directory."
            ) from e

    def intact_epochs(self) -> list[int]:
        """Epochs of the backups that pass their checksum, newest first; the
        others are skipped with a warning."""

        def warn(epoch, problem):
            print(
                f"WARNING: skipping the backup of {self.unit} {epoch} in {self.directory}: {problem}.",
                flush=True,
            )

        return intact_epochs(self.directory, warn, self.unit)

    def _clean_temporaries(self) -> None:
        """Deletes what a kill mid-save left: temporary folders, and (on an
        object store, where a backup is assembled in place) epochs without
        their meta.json."""
        for name in files.listdir(self.directory):
            if name.startswith(_TMP):
                files.rmtree(files.join(self.directory, name))
        complete = set(list_backups(self.directory, self.unit))
        for epoch, name in _epoch_names(self.directory, self.unit).items():
            if epoch not in complete:
                files.rmtree(files.join(self.directory, name))

    # ------------------------------------------------------------- restore
    def resume_epoch(self) -> int | None:
        """The epoch training will resume from (None: from the start). Call it
        before `fit` to build the input pipeline to match (every process of a
        job at once when `agree` is set); `fit` then restores that backup."""
        if self._plan is None:
            self._clean_temporaries()
            self.check_writable()
            epochs = self.intact_epochs()
            chosen = self.agree(epochs) if self.agree is not None else (epochs[0] if epochs else None)
            if chosen is None and epochs:
                self._say(f"the other processes hold none of the epochs {epochs}: starting afresh")
            self._plan = (chosen,)
        return self._plan[0]

    def on_train_begin(self, logs=None):
        chosen = self.resume_epoch()
        self._plan = None  # a later fit looks again
        self.restored_epoch = None
        if chosen is None:
            self.history = {}
            return
        epochs = list_backups(self.directory, self.unit)
        if chosen not in epochs:
            raise BackupError(
                f"processes agreed to resume from {self.unit} {chosen}, which {self.directory} does not hold "
                f"(it has {epochs}); remove the backup directories to start afresh."
            )
        model = self.model
        if model.optimizer is not None and not model.optimizer.built:
            model.optimizer.build(model.trainable_variables)
        try:
            self._load_weights(files.join(self._path(chosen), WEIGHTS))
        except (ValueError, KeyError) as e:
            raise BackupError(
                f"the backup of {self.unit} {chosen} in {self.directory} does not fit this model ({e}); it "
                "was written by another configuration: use another workdir or remove it."
            ) from e
        meta = read_meta(self.directory, chosen, self.unit)
        self.restored_epoch = chosen
        self.restored_step = int(model.optimizer.iterations.numpy()) if model.optimizer else 0
        if self.restored_step != meta.get("step", self.restored_step):
            raise BackupError(
                f"backup of {self.unit} {chosen} in {self.directory} says step {meta.get('step')} but holds "
                f"optimizer step {self.restored_step}: it belongs to another run; remove it."
            )
        if meta.get("exchange_sha256") and self._exchange() is not None:
            data = files.read_bytes(files.join(self._path(chosen), EXCHANGE))
            with np.load(io.BytesIO(data)) as state:
                self._exchange().load_state_dict(dict(state))
        self.restored_history = {k: list(v) for k, v in meta.get("history", {}).items()}
        self.restored_extra = dict(meta.get("extra", {}))
        self.history = {k: list(v) for k, v in self.restored_history.items()}
        model._initial_epoch = chosen
        self._say(f"resumed from {self.unit} {chosen} (step {self.restored_step}) in {self.directory}")

    # ---------------------------------------------------------------- save
    def on_epoch_end(self, epoch, logs=None):
        for key, value in (logs or {}).items():
            self.history.setdefault(key, []).append(float(value))
        self.save(epoch + 1)

    def _load_weights(self, path: str) -> None:
        if files.is_local(path):
            self.model.load_weights(path)
            return
        with tempfile.TemporaryDirectory(prefix="codistill-restore-") as local:
            files.copy_to_local(path, os.path.join(local, WEIGHTS))
            self.model.load_weights(os.path.join(local, WEIGHTS))

    def _write_files(self, folder: str, epoch: int, sync: bool) -> None:
        """Writes the weights, the exchange state and meta.json into the local `folder`."""
        weights = os.path.join(folder, WEIGHTS)
        self.model.save_weights(weights)
        exchange_state = self._exchange_state()
        exchange_sha = None
        if exchange_state:
            with open(os.path.join(folder, EXCHANGE), "wb") as f:
                np.savez(f, **exchange_state)
            exchange_sha = _sha256(os.path.join(folder, EXCHANGE))
        meta = {
            "epoch": epoch,
            "step": int(self.model.optimizer.iterations.numpy()) if self.model.optimizer else 0,
            "sha256": _sha256(weights),
            "exchange_sha256": exchange_sha,
            "time": time.time(),
            "history": self.history,
            "extra": self.extra() if self.extra is not None else {},
        }
        with open(os.path.join(folder, META), "w") as f:
            json.dump(meta, f)
            if sync:
                f.flush()
                os.fsync(f.fileno())
        if sync:
            with open(weights, "rb+") as f:
                os.fsync(f.fileno())
            files.fsync_dir(folder)

    def _save_local(self, epoch: int, final: str) -> None:
        """A whole folder written under a temporary name, then renamed (atomic)."""
        tmp = os.path.join(self.directory, f"{_TMP}{epoch:06d}-{os.getpid()}")
        try:
            os.makedirs(self.directory, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
            self._write_files(tmp, epoch, sync=True)
            if os.path.exists(final):  # a rerun of this epoch after resuming from an older one
                shutil.rmtree(final)
            os.rename(tmp, final)
            files.fsync_dir(self.directory)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def _save_remote(self, epoch: int, final: str) -> None:
        """Staged locally, copied into `final`, meta.json last (through a
        temporary name): object stores rename objects, not folders."""
        import tensorflow as tf

        with tempfile.TemporaryDirectory(prefix="codistill-backup-") as local:
            self._write_files(local, epoch, sync=False)
            try:
                # A rerun of this epoch: unmark the old backup before replacing its files.
                files.remove(files.join(final, META))
                files.makedirs(final)
                for name in sorted(os.listdir(local)):
                    if name != META:
                        files.copy_from_local(os.path.join(local, name), files.join(final, name))
                with open(os.path.join(local, META), "rb") as f:
                    files.write_atomic(files.join(final, META), f.read())
            except tf.errors.OpError as e:
                raise OSError(f"{type(e).__name__}: {e.message}") from e

    def save(self, epoch: int) -> str:
        """Writes the backup of the state after `epoch` epochs, atomically."""
        begin = time.perf_counter()
        final = self._path(epoch)
        try:
            if files.is_local(self.directory):
                self._save_local(epoch, final)
            else:
                self._save_remote(epoch, final)
        except OSError as e:
            kept = list_backups(self.directory, self.unit)
            where = f"the backup of {self.unit} {kept[0]} is intact" if kept else "no earlier backup exists"
            raise BackupError(
                f"could not write the backup of {self.unit} {epoch} to {self.directory}: {e}. Nothing was "
                f"half-written ({where}); free space or fix the directory, then run the same command "
                "to resume."
            ) from e
        for old in list_backups(self.directory, self.unit)[self.keep :]:
            files.rmtree(self._path(old))
        self.save_seconds += time.perf_counter() - begin
        return final

    def on_train_end(self, logs=None):
        if self.delete_on_finish:
            self.remove()

    def remove(self) -> None:
        """Deletes every backup (training finished; a rerun starts afresh)."""
        files.rmtree(self.directory)

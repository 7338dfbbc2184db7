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

With `every_steps=N` a backup is also written between two steps of an epoch
whenever the step count is a multiple of N (folders `step-S`, S the number of
updates so far), and `save_now()` writes one at the current step (what
`tf_codistill.preemption` does on SIGTERM). A resume from such a backup
continues mid-epoch: that epoch runs only its remaining steps, its metrics
go on from their saved running totals, and the input pipeline must skip the
`resume_step()` batches already consumed. Mid-epoch backups need
`steps_per_execution=1`.

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

import io
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence

import keras
import numpy as np

from tf_codistill import files, keras_compat
from tf_codistill.backup_files import (  # noqa: F401  (re-exported: tf_codistill.backup.list_backups, ...)
    _TMP,
    EXCHANGE,
    META,
    METRICS,
    WEIGHTS,
    BackupError,
    _epoch_names,
    _sha256,
    intact_epochs,
    list_backups,
    read_meta,
    verify,
)


class Backup(keras.callbacks.Callback):
    """Backs training up at every epoch end (and, with `every_steps`, between
    steps) and resumes from the newest intact backup when training starts.

    Args:
        directory: this process's backup directory (created when needed).
            Processes that train together each need their own.
        keep: how many backups to keep (>= 1). Two or more survive a
            corrupted newest backup.
        agree: for jobs of several processes: called with the steps of this
            process's intact backups (newest first; a backup is named by the
            number of updates it holds) on every process at once, returns
            the step they all resume from, or None to start afresh.
        extra: called at every save; its dict (JSON) is stored with the
            backup and handed back as `restored_extra` on resume.
        delete_on_finish: remove the backups when `fit` ends. `train.py`
            keeps them until its results are written and calls `remove`.
        verbose: print what was restored or skipped.
        unit: ``"epoch"`` (folders `epoch-N`, saved by `fit` at epoch ends) or
            ``"step"`` (folders `step-N`: a loop such as `CodistillLoop`
            calls `restore()` and `save(step)` itself).
        every_steps: `fit` also writes a backup between two steps of an epoch
            whenever the update count is a multiple of this (folders
            `step-S`); None or 0: at epoch ends only.

    After `on_train_begin` (or `restore()`): `restored_epoch` (the epochs completed in the
    restored backup; None when starting afresh), `restored_step`,
    `restored_history` (the per-epoch logs of the epochs before it, as
    `History.history`), `restored_extra`.
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
        every_steps: int | None = None,
    ):
        super().__init__()
        if not directory:
            raise ValueError("Backup needs a directory.")
        if not isinstance(keep, int) or keep < 1:
            raise ValueError(f"Backup keep must be an integer >= 1, got {keep!r}.")
        if unit not in ("epoch", "step"):
            raise ValueError(f"Backup unit must be 'epoch' or 'step', got {unit!r}.")
        if every_steps is not None and (isinstance(every_steps, bool) or not isinstance(every_steps, int)):
            raise TypeError(f"Backup every_steps must be an integer or None, got {every_steps!r}.")
        if every_steps is not None and every_steps < 0:
            raise ValueError(f"Backup every_steps must be >= 0 (0: at epoch ends only), got {every_steps}.")
        if every_steps and unit != "epoch":
            raise ValueError(
                "Backup every_steps is for fit (unit='epoch'); CodistillLoop saves with save(step)."
            )
        self.directory = directory
        self.unit = unit
        self.keep = keep
        self.agree = agree
        self.extra = extra
        self.delete_on_finish = delete_on_finish
        self.verbose = verbose
        self.every_steps = every_steps or 0
        self.restored_epoch: int | None = None
        self.restored_step = 0
        self.restored_history: dict[str, list[float]] = {}
        self.restored_extra: dict = {}
        self.history: dict[str, list[float]] = {}
        self._plan: tuple | None = None
        self.save_seconds = 0.0
        self._epoch = 0  # the epoch fit is in
        self._epoch_batches = 0  # batches of it trained so far (a restored part included)
        self._resume_batches = 0  # batches of the first epoch the restored backup holds
        self._metric_values: list | None = None
        self._shortened = None  # (epoch iterator, its steps_per_epoch) while the first epoch is short
        self._saved_step = -1
        self._usable: list[int] = []  # steps of the intact backups found at the last restore

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

    def _step(self) -> int:
        optimizer = self.model.optimizer
        return int(optimizer.iterations.numpy()) if optimizer is not None else 0

    def _metric_parts(self) -> list:
        """The metrics' variables as this process holds them: each one's part
        per local replica. Reading a metric variable whole under
        MultiWorkerMirroredStrategy sums it over every worker of the group (a
        collective, and not this worker's running total); its parts are this
        worker's own. (`_value`: the tf.Variable inside a Keras 3.15 one.)"""
        strategy = self.model.distribute_strategy
        return [
            part
            for variable in self.model.metrics_variables
            for part in strategy.experimental_local_results(getattr(variable, "_value", variable))
        ]

    def check_writable(self) -> None:
        """Raises BackupError when the directory cannot be created or written."""
        try:
            files.probe_writable(self.directory)
        except OSError as e:
            raise BackupError(
                f"backup directory {self.directory} is not writable ({e}); point the workdir at a "
                "writable directory."
            ) from e

    def _names(self) -> dict[str, tuple[str, int]]:
        """Every backup folder (complete or not): name -> (unit, number)."""
        units = ("epoch", "step") if self.unit == "epoch" else ("step",)
        return {
            name: (unit, number)
            for unit in units
            for number, name in _epoch_names(self.directory, unit).items()
        }

    def _complete(self) -> dict[int, str]:
        """step -> folder name of the backups with a meta.json. A step backup
        is named by its step; an epoch backup's step is in its meta.json."""
        out = {}
        for name, (unit, number) in self._names().items():
            if not files.exists(files.join(self.directory, name, META)):
                continue
            if unit == "step":
                out[number] = name
                continue
            try:
                step = int(read_meta(self.directory, number, unit).get("step", number))
            except (OSError, ValueError):
                step = -1 - number  # unreadable: verify() says why, and it is never chosen
            out[step] = name
        return out

    def intact_steps(self) -> dict[int, str]:
        """step -> folder of the backups that pass their checksums; the others
        are skipped with a warning."""
        good = {}
        for step, name in sorted(self._complete().items(), reverse=True):
            unit, number = self._names()[name]
            problem = verify(self.directory, number, unit)
            if problem is None:
                good[step] = name
            else:
                print(
                    f"WARNING: skipping the backup of {unit} {number} in {self.directory}: {problem}.",
                    flush=True,
                )
        return good

    def _clean_temporaries(self) -> None:
        """Deletes what a kill mid-save left: temporary folders, and (on an
        object store, where a backup is assembled in place) backups without
        their meta.json."""
        for name in files.listdir(self.directory):
            if name.startswith(_TMP):
                files.rmtree(files.join(self.directory, name))
        complete = set(self._complete().values())
        for name in self._names():
            if name not in complete:
                files.rmtree(files.join(self.directory, name))

    # ------------------------------------------------------------- restore
    def _chosen(self) -> tuple[int | None, str | None, dict]:
        """(step, folder, meta) of the backup training resumes from; (None,
        None, {}) to start afresh. Agreed with the other processes once."""
        if self._plan is None:
            self._clean_temporaries()
            self.check_writable()
            intact = self.intact_steps()
            steps = self._usable = sorted(intact, reverse=True)
            chosen = self.agree(steps) if self.agree is not None else (steps[0] if steps else None)
            if chosen is None:
                if steps:
                    self._say(
                        f"the other processes hold none of the backups at steps {steps}: starting afresh"
                    )
                self._plan = (None, None, {})
            else:
                names = self._complete()
                if chosen not in names:
                    raise BackupError(
                        f"processes agreed to resume from step {chosen}, which {self.directory} does not hold "
                        f"(it has steps {sorted(names)}); remove the backup directories to start afresh."
                    )
                unit, number = self._names()[names[chosen]]
                self._plan = (chosen, names[chosen], read_meta(self.directory, number, unit))
        return self._plan

    def resume_epoch(self) -> int | None:
        """The epoch training will resume in (the epochs the backup completed;
        None: from the start). Call it, or `resume_step`, before `fit` to build
        the input pipeline to match (every process of a job at once when
        `agree` is set); `fit` then restores that backup."""
        step, _, meta = self._chosen()
        if step is None:
            return None
        return int(meta.get("epoch", 0)) if self.unit == "epoch" else self._names()[self._plan[1]][1]

    def resume_step(self) -> int:
        """The updates the backup training will resume from holds (0: from the
        start): the batches the input pipeline must skip."""
        step, _, _ = self._chosen()
        return step or 0

    def on_train_begin(self, logs=None):
        plan = self._take_plan()
        if self.every_steps and getattr(self.model, "steps_per_execution", 1) != 1:
            raise ValueError(
                f"Backup every_steps={self.every_steps} writes backups between steps, which needs "
                f"steps_per_execution=1 (it is {self.model.steps_per_execution})."
            )
        what = self._load(*plan)
        if what is None:
            return
        keras_compat.set_initial_epoch(self.model, self.restored_epoch)  # where fit's epoch loop starts
        if self._resume_batches:
            where = f"batch {self._resume_batches} of epoch {self.restored_epoch + 1}"
        else:
            where = f"step {self.restored_step}"
        self._say(f"resumed from {what} ({where}) in {self.directory}")

    def restore(self) -> int | None:
        """Restores the newest intact backup now, as `fit` does when it
        starts: the checkpoint-manager half of a loop that is not `fit`
        (`CodistillLoop` calls it, with `unit="step"`).

        Returns:
            The step (`optimizer.iterations`) restored; None when there is no
            backup to resume from.

        Raises:
            BackupError: backups exist but none passes its checksum, or one
                does not fit the model.
        """
        plan = self._take_plan()
        if self._load(*plan) is None:
            if not self._usable and self._complete():
                raise BackupError(
                    f"no backup in {self.directory} could be restored (all corrupt); move the "
                    "directory away to start afresh."
                )
            return None
        self._say(f"restored {self._path(self.restored_epoch)} at step {self.restored_step}")
        return self.restored_step

    def _take_plan(self) -> tuple:
        plan = self._chosen()
        self._plan = None  # a later fit looks again
        self.restored_epoch = None
        self._epoch, self._epoch_batches, self._resume_batches = 0, 0, 0
        self._metric_values, self._shortened, self._saved_step = None, None, -1
        return plan

    def _load(self, chosen: int | None, name: str | None, meta: dict) -> str | None:
        """Loads the backup `_chosen` picked into the model (weights,
        optimizer, exchange state) and sets the `restored_*` fields.
        Returns what was restored (e.g. "epoch 3"), or None (nothing)."""
        if chosen is None:
            self.history = {}
            return None
        model = self.model
        folder = files.join(self.directory, name)
        if model.optimizer is not None and not model.optimizer.built:
            model.optimizer.build(model.trainable_variables)
        unit, number = self._names()[name]
        what = f"{unit} {number}"
        try:
            self._load_weights(files.join(folder, WEIGHTS))
        except (ValueError, KeyError) as e:
            raise BackupError(
                f"the backup of {what} in {self.directory} does not fit this model ({e}); it "
                "was written by another configuration: use another workdir or remove it."
            ) from e
        self.restored_step = self._step()
        if self.restored_step != meta.get("step", self.restored_step):
            raise BackupError(
                f"backup of {what} in {self.directory} says step {meta.get('step')} but holds "
                f"optimizer step {self.restored_step}: it belongs to another run; remove it."
            )
        if meta.get("exchange_sha256") and self._exchange() is not None:
            with np.load(io.BytesIO(files.read_bytes(files.join(folder, EXCHANGE)))) as state:
                self._exchange().load_state_dict(dict(state))
        self.restored_epoch = number if self.unit == "step" else int(meta.get("epoch", number))
        self._resume_batches = int(meta.get("epoch_step", 0))
        if self._resume_batches:
            with np.load(io.BytesIO(files.read_bytes(files.join(folder, METRICS)))) as saved:
                self._metric_values = [saved[f"m{i}"] for i in range(len(saved.files))]
            if len(self._metric_values) != len(self._metric_parts()):
                raise BackupError(
                    f"the backup of {what} in {self.directory} holds {len(self._metric_values)} metric "
                    f"values and this model has {len(self._metric_parts())}: it was written by "
                    "another configuration or layout; use another workdir or remove it."
                )
        self.restored_history = {k: list(v) for k, v in meta.get("history", {}).items()}
        self.restored_extra = dict(meta.get("extra", {}))
        self.history = {k: list(v) for k, v in self.restored_history.items()}
        self._saved_step = self.restored_step
        return what

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch, self._epoch_batches = epoch, 0
        self._full_length()  # the epoch after the one resumed mid-way
        if not self._resume_batches:
            return
        # Resumed mid-epoch: this epoch runs only its remaining steps, and its
        # metrics go on from the totals they had (Keras reset them just now).
        iterator = keras_compat.fit_epoch_iterator()
        if iterator is None or not iterator.steps_per_epoch:
            raise BackupError(
                "resuming mid-epoch needs model.fit with steps_per_epoch (the backup holds "
                f"{self._resume_batches} batches of epoch {epoch + 1})."
            )
        if self._resume_batches >= iterator.steps_per_epoch:
            raise BackupError(
                f"the backup holds {self._resume_batches} batches of epoch {epoch + 1}, which has only "
                f"{iterator.steps_per_epoch} (steps_per_epoch changed since it was written); remove it."
            )
        self._shortened = (iterator, iterator.steps_per_epoch)
        iterator.steps_per_epoch -= self._resume_batches
        for part, value in zip(self._metric_parts(), self._metric_values):
            part.assign(value)
        self._epoch_batches, self._resume_batches, self._metric_values = self._resume_batches, 0, None

    def _full_length(self) -> None:
        if self._shortened is not None:
            iterator, steps = self._shortened
            iterator.steps_per_epoch, self._shortened = steps, None

    def on_train_batch_begin(self, batch, logs=None):
        # Between two steps, after every callback has seen the last one's end
        # (a backup at a step never lacks that step's log lines).
        if self.every_steps and self._epoch_batches and self._step() % self.every_steps == 0:
            self.save_now()

    def on_train_batch_end(self, batch, logs=None):
        self._epoch_batches += 1

    # ---------------------------------------------------------------- save
    def on_epoch_end(self, epoch, logs=None):
        self._full_length()
        self._epoch_batches = 0
        for key, value in (logs or {}).items():
            self.history.setdefault(key, []).append(float(value))
        self.save(epoch + 1)
        self._saved_step = self._step()

    def save_now(self) -> str | None:
        """Writes a backup of the state now, between two steps of `fit`
        (call it from `on_train_batch_begin`), unless one of this step exists.
        Returns its folder, or None when there was nothing new to save."""
        step = self._step()
        if step == self._saved_step:
            return None
        if not self._epoch_batches:  # an epoch's first step: the last epoch backup holds it
            return None
        if getattr(self.model, "steps_per_execution", 1) != 1:
            self._say(
                "no backup between steps with steps_per_execution > 1: a rerun starts epoch "
                f"{self._epoch + 1} again"
            )
            return None
        folder = self.save(self._epoch, epoch_step=self._epoch_batches)
        self._saved_step = step
        return folder

    def _load_weights(self, path: str) -> None:
        if files.is_local(path):
            self.model.load_weights(path)
            return
        with tempfile.TemporaryDirectory(prefix="codistill-restore-") as local:
            files.copy_to_local(path, os.path.join(local, WEIGHTS))
            self.model.load_weights(os.path.join(local, WEIGHTS))

    def _write_npz(self, folder: str, name: str, arrays: dict) -> str | None:
        if not arrays:
            return None
        with open(os.path.join(folder, name), "wb") as f:
            np.savez(f, **arrays)
        return _sha256(os.path.join(folder, name))

    def _write_files(self, folder: str, epoch: int, sync: bool, epoch_step: int = 0) -> None:
        """Writes the weights, the exchange state (and mid-epoch the metrics'
        running totals) and meta.json into the local `folder`."""
        weights = os.path.join(folder, WEIGHTS)
        self.model.save_weights(weights)
        metrics = {}
        if epoch_step:
            metrics = {f"m{i}": part.numpy() for i, part in enumerate(self._metric_parts())}
        meta = {
            "epoch": epoch,
            "step": self._step(),
            "sha256": _sha256(weights),
            "exchange_sha256": self._write_npz(folder, EXCHANGE, self._exchange_state()),
            "time": time.time(),
            "history": self.history,
            "extra": self.extra() if self.extra is not None else {},
        }
        if epoch_step:
            meta.update(epoch_step=epoch_step, metrics_sha256=self._write_npz(folder, METRICS, metrics))
        with open(os.path.join(folder, META), "w") as f:
            json.dump(meta, f)
            if sync:
                f.flush()
                os.fsync(f.fileno())
        if sync:
            with open(weights, "rb+") as f:
                os.fsync(f.fileno())
            files.fsync_dir(folder)

    def _save_local(self, name: str, final: str, write) -> None:
        """A whole folder written under a temporary name, then renamed (atomic)."""
        tmp = os.path.join(self.directory, f"{_TMP}{name}-{os.getpid()}")
        try:
            os.makedirs(self.directory, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
            write(tmp, True)
            if os.path.exists(final):  # a rerun of this epoch after resuming from an older one
                shutil.rmtree(final)
            os.rename(tmp, final)
            files.fsync_dir(self.directory)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def _save_remote(self, final: str, write) -> None:
        """Staged locally, copied into `final`, meta.json last (through a
        temporary name): object stores rename objects, not folders."""
        import tensorflow as tf

        with tempfile.TemporaryDirectory(prefix="codistill-backup-") as local:
            write(local, False)
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

    def save(self, epoch: int, epoch_step: int = 0) -> str:
        """Writes the backup of the state after `epoch` epochs (and
        `epoch_step` batches of the next: a mid-epoch backup, folder
        `step-S`), atomically. With `unit="step"`, `save(step)` writes the
        folder `step-N` of that step: the other half, with `restore()`, of
        the checkpoint manager `CodistillLoop` takes.

        Returns:
            The folder written.
        """
        begin = time.perf_counter()
        if epoch_step:
            unit, number = "step", self._step()
        else:
            unit, number = self.unit, epoch
        name = f"{unit}-{number:06d}"
        final = files.join(self.directory, name)

        def write(folder, sync):
            self._write_files(folder, epoch, sync, epoch_step)

        try:
            if files.is_local(self.directory):
                self._save_local(name, final, write)
            else:
                self._save_remote(final, write)
        except OSError as e:
            kept = self._complete()
            newest = self._names()[kept[max(kept)]] if kept else None
            where = f"the backup of {newest[0]} {newest[1]} is intact" if kept else "no earlier backup exists"
            raise BackupError(
                f"could not write the backup of {unit} {number} to {self.directory}: {e}. Nothing was "
                f"half-written ({where}); free space or fix the directory, then run the same command "
                "to resume."
            ) from e
        names = self._complete()
        for step in sorted(names, reverse=True)[self.keep :]:
            files.rmtree(files.join(self.directory, names[step]))
        self.save_seconds += time.perf_counter() - begin
        return final

    def on_train_end(self, logs=None):
        self._full_length()
        if self.delete_on_finish:
            self.remove()

    def remove(self) -> None:
        """Deletes every backup (training finished; a rerun starts afresh)."""
        files.rmtree(self.directory)

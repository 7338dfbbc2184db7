"""A custom training loop for `CodistillModel`, for users who do not call `fit`.

The loop is split the way Orbit splits it: an outer Python loop (step
counting, logging, summaries, checkpoints) around an inner compiled step that
runs `CodistillModel.train_step` / `test_step` on every replica. The losses,
the exchange and the metrics are therefore exactly those of `model.fit`::

    with strategy.scope():
        model = CodistillModel([build(seed=0), build(seed=1)], alpha=1.0)
        model.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9), metrics=["accuracy"])
    loop = CodistillLoop(model, strategy, checkpoint_dir="ckpt", summary_dir="tb")
    logs = loop.train(train_ds, steps=10_000, log_every=100)   # resumes from "ckpt"
    print(loop.evaluate(test_ds))

Callbacks run as under `fit`: `train(..., callbacks=[...])` calls every
training hook `fit` calls, in its order (`tf_codistill.callbacks.CallbackDriver`),
after adding the ones the model needs (the exchange's, the peer-health check).
`PreemptionHandler(loop)` stops at one agreed step on SIGTERM and saves it::

    try:
        loop.train(train_ds.skip(loop.restore()), 10_000, callbacks=[tf_codistill.PreemptionHandler(loop)])
    except tf_codistill.Preempted:
        sys.exit(143)   # the same command resumes at that step

`steps` counts optimizer updates in total (`model.optimizer.iterations`), so a
rerun with the same `checkpoint_dir` restores the latest checkpoint and trains
only the remaining steps; learning-rate, alpha and weight-decay schedules
continue where they stopped, and the stale-weights exchange's peer copies
come back with the weights (the same `tf_codistill.Backup` as `fit`'s). The dataset is read from its beginning on every
call: to continue the data order too, pass `dataset.skip(loop.step)` (or a
dataset whose order does not matter).
"""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import keras
import tensorflow as tf

from tf_codistill.backup import Backup
from tf_codistill.callbacks import CallbackDriver
from tf_codistill.checks import check_int
from tf_codistill.model import CodistillModel

__all__ = ["CheckpointManager", "CodistillLoop", "reduce_logs"]


@runtime_checkable
class CheckpointManager(Protocol):
    """What `CodistillLoop` needs of its checkpoints: `tf_codistill.Backup`
    (with `unit="step"`) is one; any object with these two methods is another."""

    def restore(self) -> int | None:
        """Restores the newest usable checkpoint into the model; returns its
        step, or None when there is none."""

    def save(self, step: int) -> str | None:
        """Writes a checkpoint of the model's state at `step`; returns where."""


def _reduce_value(strategy: tf.distribute.Strategy, value):
    """Mean over replicas of one per-replica log value.

    `CodistillModel` returns scalars, except under multi-worker
    MultiWorkerMirroredStrategy where its logs have shape `[1]` (see
    `CodistillModel._for_reduction`): those are averaged along axis 0, which
    both reduces across replicas and drops the extra dimension.
    """
    local = strategy.experimental_local_results(value)[0]
    rank = local.shape.rank
    if rank == 1:
        return strategy.reduce("MEAN", value, axis=0)
    if rank not in (0, None):
        raise ValueError(f"train/test step logs must be scalars or shape [1]; got shape {local.shape}.")
    return strategy.reduce("MEAN", value, axis=None)


def reduce_logs(strategy: tf.distribute.Strategy, logs: dict) -> dict:
    """Reduces a dict of per-replica step logs to scalar tensors (replica mean).

    Args:
        strategy: the strategy whose `run` produced `logs`.
        logs: name -> per-replica value (scalar, or shape `[1]` under
            multi-worker MultiWorkerMirroredStrategy).

    Returns:
        name -> scalar tensor.
    """
    return {name: _reduce_value(strategy, value) for name, value in logs.items()}


def _is_chief(strategy: tf.distribute.Strategy) -> bool:
    return bool(getattr(strategy.extended, "should_checkpoint", True))


def _format_logs(logs: dict[str, float]) -> str:
    return " ".join(f"{name}={value:.4f}" for name, value in logs.items())


class CodistillLoop:
    """Trains and evaluates a compiled `CodistillModel` without `model.fit`.

    Every step calls `strategy.run(model.train_step, ...)` inside one
    `tf.function` (never XLA-compiled: exchanges may run collectives) and
    averages the per-replica logs. Logs are running means since the start of
    the `train` / `evaluate` call, like Keras's.

    When the groups live in different processes (e.g. `HorovodExchange`),
    each group writes its own checkpoints and summaries under
    `<dir>/group<g>`, since the groups' weights differ. Under a multi-worker
    strategy only the chief writes checkpoints and summaries (a group's
    workers hold the same state); every worker restores from the chief's
    checkpoints, so put `checkpoint_dir` on storage they share.

    Checkpoints are the same as `fit`'s backups (`tf_codistill.Backup`, one
    `step-N` folder per save): written whole or not at all, checksummed (a
    corrupt newest one is skipped with a warning), and they hold the
    exchange's state too, so a stale-weights exchange resumes with the peer
    copies it had. The loop uses them only through `restore()` and
    `save(step)` (`CheckpointManager`), so `checkpoints=` takes another
    implementation.

    Args:
        model: a compiled `CodistillModel`, created under `strategy.scope()`
            when `strategy` is not the default strategy.
        strategy: the distribution strategy; defaults to the one the model
            was created under (or the default strategy).
        checkpoint_dir: where checkpoints of the model and optimizer go; the
            latest one is restored when training starts. `None`: no
            checkpoints.
        summary_dir: where TensorBoard scalars of the logs go every
            `log_every` steps. `None`: no summaries.
        max_checkpoints: how many checkpoints to keep.
        checkpoint_every: save every this many steps; 0 saves only at the end
            of `train`.
        checkpoints: instead of `checkpoint_dir`, a `CheckpointManager`
            (bound to the model: the loop calls its `set_model` if it has
            one); under a multi-worker strategy the loop calls `save` on the
            chief only and `restore` on every worker.

    Raises:
        ValueError: the model is not a compiled `CodistillModel`, it was
            created under another strategy, a count is negative, or both
            `checkpoint_dir` and `checkpoints` are given.
        TypeError: `checkpoints` lacks `restore()` or `save(step)`.
    """

    def __init__(
        self,
        model: CodistillModel,
        strategy: tf.distribute.Strategy | None = None,
        checkpoint_dir: str | None = None,
        summary_dir: str | None = None,
        max_checkpoints: int = 3,
        checkpoint_every: int = 0,
        checkpoints: CheckpointManager | None = None,
    ):
        if not isinstance(model, CodistillModel):
            raise ValueError(f"CodistillLoop trains a CodistillModel; got {type(model).__name__}.")
        if not getattr(model, "compiled", False) or getattr(model, "optimizer", None) is None:
            raise ValueError(
                "The model is not compiled: call model.compile(optimizer=...) (under "
                "strategy.scope() when distributed) before building a CodistillLoop; the loop "
                "uses the compiled optimizer, task loss and metrics."
            )
        check_int("max_checkpoints", max_checkpoints, 1)
        check_int("checkpoint_every", checkpoint_every, 0)
        if checkpoints is not None and checkpoint_dir is not None:
            raise ValueError("give checkpoint_dir or checkpoints (a checkpoint manager), not both.")
        if checkpoints is not None and not isinstance(checkpoints, CheckpointManager):
            raise TypeError(
                f"checkpoints must have restore() and save(step) methods (a CheckpointManager, e.g. "
                f"tf_codistill.Backup(dir, unit='step')); got {type(checkpoints).__name__}."
            )
        for name, directory in (("checkpoint_dir", checkpoint_dir), ("summary_dir", summary_dir)):
            if directory is not None and os.path.isfile(directory):
                raise ValueError(f"{name}={directory} is an existing file; give a directory.")
        own = getattr(model, "_distribute_strategy", None)
        if strategy is None:
            strategy = model.distribute_strategy
        if own is not None and strategy is not own:
            raise ValueError(
                "The model was created under a different distribution strategy than the one "
                "given to CodistillLoop; build and compile the model under strategy.scope() of "
                "the strategy the loop runs."
            )
        if own is None and strategy.num_replicas_in_sync > 1:
            raise ValueError(
                f"The strategy has {strategy.num_replicas_in_sync} replicas but the model was not "
                "created under its scope; build and compile the model under strategy.scope()."
            )
        self.model = model
        self.strategy = strategy
        self.max_checkpoints = max_checkpoints
        self.checkpoint_every = checkpoint_every
        self.checkpoint_dir = self._per_group(checkpoint_dir)
        self.summary_dir = self._per_group(summary_dir)
        self.is_chief = _is_chief(strategy)
        if checkpoints is None and self.checkpoint_dir is not None:
            # The same atomic, checksummed backups as fit's, one folder per
            # saved step: weights, optimizer state and the exchange's state
            # (a stale-weights exchange's peer copies).
            checkpoints = Backup(
                self.checkpoint_dir,
                keep=max_checkpoints,
                delete_on_finish=False,
                verbose=self.is_chief,
                unit="step",
            )
        if checkpoints is not None and hasattr(checkpoints, "set_model"):
            checkpoints.set_model(model)
        self._manager = checkpoints
        self._restored = False
        self._saved_step = -1  # the step of the newest checkpoint written or restored
        self._writer = None
        self._train_fn = None
        self._test_fn = None

    # ------------------------------------------------------------------ setup
    def _per_group(self, directory: str | None) -> str | None:
        model = self.model
        if directory is None:
            return None
        if model.num_groups > model.num_local_members:  # other groups are in other processes
            return os.path.join(directory, f"group{model.exchange.group}")
        return directory

    @property
    def step(self) -> int:
        """Optimizer updates applied so far (restored from checkpoints)."""
        return int(self.model.optimizer.iterations.numpy())

    def _build(self) -> None:
        optimizer = self.model.optimizer
        if not optimizer.built:
            with self.strategy.scope():
                optimizer.build(self.model.trainable_variables)

    def _checkpoints(self) -> CheckpointManager | None:
        if self._manager is not None:
            self._build()  # slot variables must exist before a restore fills them
        return self._manager

    def restore(self) -> int:
        """Restores the newest intact checkpoint, if any (a corrupt newest
        one is skipped with a warning).

        `train` calls it once per loop; call it yourself to evaluate a
        checkpoint without training, or to learn how many batches to skip.

        Returns:
            The restored step (`optimizer.iterations`); the current step when
            there is no checkpoint.

        Raises:
            RuntimeError: checkpoints exist but none could be restored.
        """
        manager = self._checkpoints()
        self._restored = True
        if manager is not None and manager.restore() is not None:
            self._saved_step = self.step
        return self.step

    def save(self, step: int | None = None) -> str | None:
        """Saves a checkpoint numbered `step` (the current step by default),
        written whole or not at all. Under a multi-worker strategy only the
        chief writes (the workers of a group hold the same state).

        Returns:
            The checkpoint path on the chief, else `None`.
        """
        manager = self._checkpoints()
        step = self.step if step is None else step
        self._saved_step = step
        if manager is None or not self.is_chief:
            return None
        return manager.save(step)

    def save_now(self) -> str | None:
        """Saves the current step unless the newest checkpoint holds it; what
        `tf_codistill.PreemptionHandler(loop)` calls when it stops on a signal.

        Returns:
            The checkpoint path (chief only), or None.
        """
        if self._manager is None or self.step == self._saved_step:
            return None
        return self.save()

    def _summary_writer(self):
        if self.summary_dir is None or not self.is_chief:
            return None
        if self._writer is None:
            self._writer = tf.summary.create_file_writer(self.summary_dir)
        return self._writer

    def _distribute(self, dataset):
        if isinstance(dataset, tf.distribute.DistributedDataset):
            return dataset
        if isinstance(dataset, tf.data.Dataset):
            return self.strategy.experimental_distribute_dataset(dataset)
        raise TypeError(
            f"dataset must be a tf.data.Dataset or a tf.distribute.DistributedDataset; got "
            f"{type(dataset).__name__}."
        )

    def _step_function(self, step):
        strategy = self.strategy

        def run(batch):
            return reduce_logs(strategy, strategy.run(step, args=(batch,)))

        # Not autograph-converted, and never XLA: as in Keras's own train function.
        return tf.function(run, jit_compile=False, autograph=False, reduce_retracing=True)

    # ------------------------------------------------------------------ train
    def train(
        self,
        dataset,
        steps: int,
        log_every: int = 0,
        callbacks: Sequence[keras.callbacks.Callback] | None = None,
    ) -> dict[str, float]:
        """Trains until `model.optimizer.iterations` reaches `steps`.

        Restores the latest checkpoint first (once per loop), so a rerun
        resumes. Resets the model's metrics. Stops early when a callback
        sets `model.stop_training`, as `fit` does.

        Args:
            dataset: a `tf.data.Dataset` of batches (distributed with the
                loop's strategy), or a `tf.distribute.DistributedDataset`.
                It should hold at least the remaining number of batches.
            steps: total number of optimizer updates to reach.
            log_every: every this many steps print a progress line and write
                summaries; 0 only writes summaries at the end.
            callbacks: Keras callbacks; they, and the ones the model needs,
                get every training hook `fit` calls, in its order (one epoch
                per call, its batches numbered from 0).

        Returns:
            The logs of the last step (running means over this call), as
            floats; `{}` when no step was left to run.

        Raises:
            ValueError: negative `steps` or `log_every`.
        """
        check_int("steps", steps)
        check_int("log_every", log_every)
        if steps < 0 or log_every < 0:
            raise ValueError(f"steps and log_every must be >= 0; got steps={steps}, log_every={log_every}.")
        start = self.step if self._restored else self.restore()
        if start >= steps:
            if self.is_chief:
                print(f"already at step {start} of {steps}; nothing to train", flush=True)
            return {}
        self._build()
        if self._train_fn is None:
            self._train_fn = self._step_function(self.model.train_step)
        iterator = iter(self._distribute(dataset))
        writer = self._summary_writer()
        step = start
        driver = CallbackDriver(self.model, callbacks, steps=steps - start)
        driver.begin()
        while step < steps and not self.model.stop_training:
            try:
                batch = next(iterator)
            except (StopIteration, tf.errors.OutOfRangeError):
                warnings.warn(
                    f"The dataset ran out after {step - start} batches, at step {step} of {steps}; "
                    "repeat it (dataset.repeat()) to train all steps.",
                    stacklevel=2,
                )
                break
            driver.step(functools.partial(self._train_fn, batch))
            step += 1
            if self.checkpoint_every and step % self.checkpoint_every == 0:
                self.save(step)
            if log_every and (step % log_every == 0 or step == steps):
                self._report(step, steps, driver.logs, writer)
        driver.end()
        logs = driver.logs
        if step == start:
            return {}
        if not log_every:
            self._report(step, steps, logs, writer, echo=False)
        if self._manager is not None and self._saved_step != step:
            self.save(step)
        if writer is not None:
            writer.flush()
        return {name: float(value) for name, value in logs.items()}

    def _report(self, step: int, steps: int, logs: dict, writer, echo: bool = True) -> None:
        values = {name: float(value) for name, value in logs.items()}
        if writer is not None:
            with writer.as_default(step=step):
                for name, value in values.items():
                    tf.summary.scalar(name, value)
                tf.summary.scalar("learning_rate", float(self.model.optimizer.learning_rate))
        if echo and self.is_chief:
            print(f"step {step}/{steps}: {_format_logs(values)}", flush=True)

    # --------------------------------------------------------------- evaluate
    def evaluate(self, dataset, steps: int | None = None) -> dict[str, float]:
        """Evaluates on `dataset` (to its end, or `steps` batches).

        Resets the model's metrics; under a multi-worker strategy every
        worker must see the same number of batches.

        Args:
            dataset: a `tf.data.Dataset` or a `tf.distribute.DistributedDataset`.
            steps: number of batches; `None` reads the whole dataset.

        Returns:
            The final logs (`loss`, per-member and ensemble metrics, ...) as
            floats; `{}` when the dataset is empty.
        """
        if steps is not None:
            check_int("steps", steps, 0)
        self.model.reset_metrics()
        if self._test_fn is None:
            self._test_fn = self._step_function(self.model.test_step)
        logs, done = {}, 0
        iterator = iter(self._distribute(dataset))
        while steps is None or done < steps:
            try:
                batch = next(iterator)
            except (StopIteration, tf.errors.OutOfRangeError):
                break
            logs = self._test_fn(batch)
            done += 1
        if not done:
            warnings.warn("evaluate() read no batch; returning no logs.", stacklevel=2)
        return {name: float(value) for name, value in logs.items()}

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

`steps` counts optimizer updates in total (`model.optimizer.iterations`), so a
rerun with the same `checkpoint_dir` restores the latest checkpoint and trains
only the remaining steps; learning-rate, alpha and weight-decay schedules
continue where they stopped, and the stale-weights exchange's peer copies
come back with the weights (the same `tf_codistill.Backup` as `fit`'s). The dataset is read from its beginning on every
call: to continue the data order too, pass `dataset.skip(loop.step)` (or a
dataset whose order does not matter).
"""

from __future__ import annotations

import os
import warnings

import tensorflow as tf

from tf_codistill.backup import Backup, list_backups
from tf_codistill.checks import check_int
from tf_codistill.model import CodistillModel

__all__ = ["CodistillLoop", "reduce_logs"]


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
    copies it had.

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

    Raises:
        ValueError: the model is not a compiled `CodistillModel`, it was
            created under another strategy, or a count is negative.
    """

    def __init__(
        self,
        model: CodistillModel,
        strategy: tf.distribute.Strategy | None = None,
        checkpoint_dir: str | None = None,
        summary_dir: str | None = None,
        max_checkpoints: int = 3,
        checkpoint_every: int = 0,
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
        self._backup = None
        self._restored = False
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

    def _checkpoints(self) -> Backup | None:
        """The same atomic, checksummed backups as `fit`'s (`tf_codistill.Backup`),
        one folder per saved step: weights, optimizer state and the exchange's
        state (a stale-weights exchange's peer copies)."""
        if self.checkpoint_dir is None:
            return None
        if self._backup is None:
            self._build()  # slot variables must exist before a restore fills them
            self._backup = Backup(
                self.checkpoint_dir,
                keep=self.max_checkpoints,
                delete_on_finish=False,
                verbose=False,
                unit="step",
            )
            self._backup.set_model(self.model)
        return self._backup

    def restore(self) -> int:
        """Restores the newest intact checkpoint in `checkpoint_dir`, if any
        (a corrupt newest one is skipped with a warning).

        `train` calls it once per loop; call it yourself to evaluate a
        checkpoint without training.

        Returns:
            The restored step (`optimizer.iterations`); the current step when
            there is no checkpoint.

        Raises:
            RuntimeError: checkpoints exist but none could be restored.
        """
        backup = self._checkpoints()
        self._restored = True
        if backup is None:
            return self.step
        backup.on_train_begin()
        if backup.restored_epoch is None:
            if list_backups(self.checkpoint_dir, "step"):
                raise RuntimeError(
                    f"no checkpoint in {self.checkpoint_dir} could be restored (all corrupt); move the "
                    "directory away to start afresh."
                )
            return self.step
        if self.is_chief:
            print(f"restored {backup._path(backup.restored_epoch)} at step {self.step}", flush=True)
        return self.step

    def save(self, step: int | None = None) -> str | None:
        """Saves a checkpoint numbered `step` (the current step by default),
        written whole or not at all. Under a multi-worker strategy only the
        chief writes (the workers of a group hold the same state).

        Returns:
            The checkpoint path on the chief, else `None`.
        """
        backup = self._checkpoints()
        if backup is None or not self.is_chief:
            return None
        return backup.save(self.step if step is None else step)

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
    def train(self, dataset, steps: int, log_every: int = 0) -> dict[str, float]:
        """Trains until `model.optimizer.iterations` reaches `steps`.

        Restores the latest checkpoint first (once per loop), so a rerun
        resumes. Resets the model's metrics.

        Args:
            dataset: a `tf.data.Dataset` of batches (distributed with the
                loop's strategy), or a `tf.distribute.DistributedDataset`.
                It should hold at least the remaining number of batches.
            steps: total number of optimizer updates to reach.
            log_every: every this many steps print a progress line and write
                summaries; 0 only writes summaries at the end.

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
        self.model.reset_metrics()
        if self._train_fn is None:
            self._train_fn = self._step_function(self.model.train_step)
        iterator = iter(self._distribute(dataset))
        writer = self._summary_writer()
        logs, last_saved = {}, start
        step = start
        # The exchange's hooks (e.g. refreshing stale peer copies) run here as
        # they do under fit.
        hooks = self.model.training_hooks()
        for hook in hooks:
            hook.set_model(self.model)
            hook.on_train_begin()
        while step < steps:
            try:
                batch = next(iterator)
            except (StopIteration, tf.errors.OutOfRangeError):
                warnings.warn(
                    f"The dataset ran out after {step - start} batches, at step {step} of {steps}; "
                    "repeat it (dataset.repeat()) to train all steps.",
                    stacklevel=2,
                )
                break
            for hook in hooks:
                hook.on_train_batch_begin(step - start)
            logs = self._train_fn(batch)
            step += 1
            for hook in hooks:  # e.g. the averaging exchange's outer step, before a checkpoint
                hook.on_train_batch_end(step - start - 1, logs)
            if self.checkpoint_every and step % self.checkpoint_every == 0:
                self.save(step)
                last_saved = step
            if log_every and (step % log_every == 0 or step == steps):
                self._report(step, steps, logs, writer)
        for hook in hooks:
            hook.on_train_end()
        if step == start:
            return {}
        if not log_every:
            self._report(step, steps, logs, writer, echo=False)
        if self.checkpoint_dir is not None and last_saved != step:
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

"""The Keras and TensorFlow private names `CodistillModel` relies on, in one
place, each with why (pinned range: keras>=3.12,<3.16, TensorFlow 2.21).

`tests/test_keras_compat.py` fails when an upgrade renames or removes one.

* `keras.src.backend.get_keras_mask` / `set_keras_mask`: Keras losses and
  metrics read a sequence model's mask from `y_pred`'s `_keras_mask`; the
  float32 cast and the ensemble make new tensors that must carry it again.
* `keras.Model._maybe_symbolic_build` and `_symbolic_build`: Keras 3.12-3.15
  `fit`/`evaluate` fail under MultiWorkerMirroredStrategy with more than one
  worker (tensorflow#72388, keras#20585): `_maybe_symbolic_build` calls
  `strategy.reduce("MEAN", batch)` on the whole (x, y) structure of PerReplica
  values, which MWMS rejects. The build only needs shapes, so it is given this
  worker's batch, or none at all when the members are built.
* `MultiWorkerMirroredStrategy.extended._in_multi_worker_mode`: the test Keras
  itself applies before those cross-worker reductions.
* `keras.src.trainers.epoch_iterator.EpochIterator`, found in `fit`'s frame:
  Keras 3.15's `fit` keeps it in a local and reads its `steps_per_epoch` when
  each epoch's loop starts; a backup resumed mid-epoch shortens that epoch by
  setting the attribute (there is no public way to start an epoch part-way).
* `keras.Model._initial_epoch`: where `fit`'s epoch loop starts; a restored
  backup sets it, so the epochs already trained are not run again.
* Step logs are reduced with `strategy.reduce("MEAN", v, axis=0)`, which fails
  on scalars: under multi-worker MWMS the steps return shape-[1] logs
  (`for_reduction`), which that reduction averages to a scalar.

Each override acts only in the multi-worker case, so everywhere else the
pinned Keras range keeps its own behaviour.
"""

from __future__ import annotations

import sys

import keras
import tensorflow as tf
from keras import ops

__all__ = [
    "get_mask",
    "with_mask",
    "multi_worker",
    "symbolic_build",
    "for_reduction",
    "fit_epoch_iterator",
    "set_initial_epoch",
]


def get_mask(x):
    """The Keras mask a layer attached to `x` (None without one)."""
    return keras.src.backend.get_keras_mask(x)


def with_mask(x, mask):
    """`x` carrying `mask`, where Keras losses and metrics look for it."""
    if mask is not None:
        keras.src.backend.set_keras_mask(x, mask)
    return x


def multi_worker(strategy) -> bool:
    """True under MultiWorkerMirroredStrategy with more than one worker."""
    in_multi_worker_mode = getattr(strategy.extended, "_in_multi_worker_mode", None)
    return isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy) and bool(
        in_multi_worker_mode and in_multi_worker_mode()
    )


def _local_value(value):
    if isinstance(value, tf.distribute.DistributedValues):
        return value.values[0]
    return value


def symbolic_build(model: keras.Model, parent, iterator=None, data_batch=None) -> None:
    """`model._maybe_symbolic_build`, safe under multi-worker MWMS (`parent`
    is Keras's own method, bound to `model`)."""
    strategy = model._distribute_strategy
    if strategy is None:
        return parent(iterator=iterator, data_batch=data_batch)
    if all(layer.built for layer in model._flatten_layers()):
        # Only the optimizer is left to build, which needs no data: do not
        # draw a batch (the restarted iterator would reshuffle, so the run
        # would not see the data order a single process sees).
        data_batch, iterator = None, None
    elif not multi_worker(strategy):
        return parent(iterator=iterator, data_batch=data_batch)
    elif iterator is not None:
        for _, _, it in iterator:
            data_batch = tf.nest.map_structure(_local_value, next(it))
            break
    with strategy.scope():
        model._symbolic_build(data_batch=data_batch)


def for_reduction(logs: dict) -> dict:
    """Step logs Keras can reduce across workers: shape [1] under multi-worker MWMS."""
    if multi_worker(tf.distribute.get_strategy()):
        return {k: ops.reshape(v, (1,)) for k, v in logs.items()}
    return logs


def fit_epoch_iterator():
    """The `EpochIterator` of the `model.fit` call running now, or None.

    Keras 3.15's fit keeps it in a local variable and reads its
    `steps_per_epoch` when each epoch's loop starts; a callback shortens the
    epoch it resumes in by setting that attribute in `on_epoch_begin` (there
    is no public way to start an epoch part-way through).
    """
    from keras.src.trainers.epoch_iterator import EpochIterator

    frame = sys._getframe(1)  # the caller: a callback that fit called
    while frame is not None:
        candidate = frame.f_locals.get("epoch_iterator") if frame.f_code.co_name == "fit" else None
        if isinstance(candidate, EpochIterator):
            return candidate
        frame = frame.f_back
    return None


def set_initial_epoch(model: keras.Model, epoch: int) -> None:
    """Makes the `fit` call being set up start its epoch loop at `epoch`
    (what `fit(initial_epoch=...)` does, from a callback's `on_train_begin`)."""
    model._initial_epoch = epoch

"""The private Keras and TensorFlow names tf_codistill/keras_compat.py relies
on still exist with the shape it expects: this fails on the Keras upgrade that
changes one, before any training run does."""

import inspect

import keras
import numpy as np
import pytest
import tensorflow as tf

from tf_codistill import keras_compat


def test_keras_masks_are_read_and_set_where_losses_look():
    logits = np.zeros((2, 3, 4), "float32")
    logits[..., 0] = 3.0
    x = tf.constant(logits)
    mask = tf.constant([[True, True, False], [True, False, False]])
    labels = np.where(mask.numpy(), 0, 1)  # the masked positions would cost far more
    assert keras_compat.get_mask(x) is None
    keras_compat.with_mask(x, mask)
    np.testing.assert_array_equal(keras_compat.get_mask(x).numpy(), mask.numpy())
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)(labels, x)
    # Keras's losses average over the valid positions of y_pred's mask.
    assert float(loss) == pytest.approx(-np.log(np.exp(3.0) / (np.exp(3.0) + 3.0)), rel=1e-5)


def test_the_build_hooks_keras_calls_exist_with_their_arguments():
    build = inspect.signature(keras.Model._maybe_symbolic_build).parameters
    assert {"iterator", "data_batch"} <= set(build)
    assert "data_batch" in inspect.signature(keras.Model._symbolic_build).parameters
    assert hasattr(keras.Model, "_flatten_layers")
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    assert hasattr(model, "_distribute_strategy")


def test_multi_worker_mode_is_asked_as_keras_asks_it():
    assert callable(tf.distribute.MultiWorkerMirroredStrategy.extended.fget)  # a property
    strategy = tf.distribute.get_strategy()
    assert not keras_compat.multi_worker(strategy)
    from tensorflow.python.distribute import collective_all_reduce_strategy

    assert callable(collective_all_reduce_strategy.CollectiveAllReduceExtended._in_multi_worker_mode)


def test_a_callback_finds_fits_epoch_iterator_and_initial_epoch():
    """Backup's mid-epoch resume shortens the running epoch through fit's
    EpochIterator, and a restore starts fit's loop at `_initial_epoch`."""
    seen = {}

    class Probe(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            keras_compat.set_initial_epoch(self.model, 1)  # epoch 0 is skipped

        def on_epoch_begin(self, epoch, logs=None):
            iterator = keras_compat.fit_epoch_iterator()
            seen.setdefault("epochs", []).append(epoch)
            seen["steps"] = iterator.steps_per_epoch
            iterator.steps_per_epoch = 2  # every epoch from here runs 2 batches, not 4

        def on_train_batch_end(self, batch, logs=None):
            seen["batches"] = seen.get("batches", 0) + 1

    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile(optimizer="sgd", loss="mse")
    x, y = np.zeros((16, 2), "float32"), np.zeros((16, 1), "float32")
    model.fit(x, y, batch_size=4, epochs=3, steps_per_epoch=4, callbacks=[Probe()], verbose=0)
    assert seen["epochs"] == [1, 2] and seen["batches"] == 4
    assert keras_compat.fit_epoch_iterator() is None  # outside fit

"""What a Keras user types first works on CodistillModel: plain (x, y) arrays
split across the local members like tf.distribute splits a global batch, and
any form of task loss (a loss object, a string, a function, a lambda)."""

import keras
import numpy as np
import pytest

from models import build_model
from tf_codistill import CodistillModel

INPUT = (12,)
CLASSES = 5


def _members(n, seed=0):
    return [build_model("mlp", INPUT, CLASSES, seed=seed + i) for i in range(n)]


def _data(size, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(size, *INPUT)).astype("float32"), rng.integers(0, CLASSES, size=size)


def test_plain_arrays_and_a_loss_object_fit_with_the_defaults():
    x, y = _data(256)
    model = CodistillModel(_members(2))
    model.compile(optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    history = model.fit(x, y, batch_size=64, epochs=3, verbose=0)
    losses = history.history["task_loss"]
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0]


@pytest.mark.parametrize("size", [16, 15])
def test_a_plain_batch_is_split_across_the_members(size):
    """With alpha 0, each member's update is a plain Keras step on its own
    slice of the batch (the first slice one longer when the batch is odd)."""
    x, y = _data(size, seed=1)
    weights = np.random.default_rng(2).uniform(0.5, 2.0, size=size).astype("float32")
    model = CodistillModel(_members(2), alpha=0.0)
    model.compile(optimizer=keras.optimizers.SGD(0.5))
    model.train_on_batch(x, y, sample_weight=weights)
    first = (size + 1) // 2
    for i, part in enumerate([slice(0, first), slice(first, size)]):
        plain = _members(2)[i]
        plain.compile(
            optimizer=keras.optimizers.SGD(0.5),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
        plain.train_on_batch(x[part], y[part], sample_weight=weights[part])
        for a, b in zip(model.members[i].get_weights(), plain.get_weights()):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_peer_logits_are_taken_on_the_students_slice():
    """The distillation term of member 0 uses member 1's logits on member 0's slice."""
    x, y = _data(16, seed=3)
    model = CodistillModel(_members(2), alpha=1.0)
    model.compile(optimizer=keras.optimizers.SGD(0.0))
    logs = model.train_on_batch(x, y, return_dict=True)
    members = model.members
    expected = 0.0
    for i, part in enumerate([slice(0, 8), slice(8, 16)]):
        student = members[i](x[part])
        teacher = members[1 - i](x[part])
        p = keras.ops.softmax(teacher)
        kl = keras.ops.sum(p * (keras.ops.log_softmax(teacher) - keras.ops.log_softmax(student)), axis=-1)
        expected += float(keras.ops.mean(kl)) / 2  # logs average the members
    assert logs["distill_loss"] == pytest.approx(expected, rel=1e-4)


def _sparse_ce(y_true, logits):
    return keras.losses.sparse_categorical_crossentropy(y_true, logits, from_logits=True)


@pytest.mark.parametrize(
    "loss",
    [
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        "sparse_categorical_crossentropy",
        _sparse_ce,
        lambda y, z: keras.losses.sparse_categorical_crossentropy(y, z, from_logits=True),
    ],
    ids=["object", "string", "function", "lambda"],
)
def test_every_form_of_task_loss_gives_the_same_loss(loss):
    x, y = _data(32, seed=4)
    reference = CodistillModel(_members(2))
    reference.compile(optimizer=keras.optimizers.SGD(0.1))
    model = CodistillModel(_members(2))
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss=loss)
    got = model.train_on_batch(x, y, return_dict=True)
    want = reference.train_on_batch(x, y, return_dict=True)
    assert got["task_loss"] == pytest.approx(want["task_loss"], rel=1e-6)


def test_explicit_independent_mode_still_asks_for_one_batch_per_member():
    model = CodistillModel(_members(2), data_mode="independent")
    model.compile(optimizer="sgd")
    x, y = _data(16)
    with pytest.raises(ValueError, match="data_mode='auto' \\(the default\\) to split"):
        model.train_on_batch(x, y)

"""Per-position arithmetic of `CodistillModel`: logits `[batch, classes]` or
`[batch, ..., classes]`, reduced over the valid positions.

Pure functions of tensors, shared by the task and distillation terms, the
agreement metric and the batch split of several local members.
"""

from __future__ import annotations

import keras
import tensorflow as tf
from keras import ops

__all__ = ["split_batch", "rows", "position_weights", "position_mean", "agreement"]


def split_batch(data, n: int) -> list:
    """Splits every tensor of `data` along the batch axis into n slices, as
    even as the batch allows (the first batch % n slices one longer)."""
    if data is None:
        return [None] * n
    flat = keras.tree.flatten(data)
    size = tf.shape(flat[0])[0]
    base, extra = size // n, size % n
    sizes = tf.stack([base + tf.cast(i < extra, size.dtype) for i in range(n)])
    parts = [tf.split(t, sizes, num=n, axis=0) for t in flat]
    return [keras.tree.pack_sequence_as(data, [p[i] for p in parts]) for i in range(n)]


def rows(x):
    """[batch, ..., classes] as [positions, classes] (classifier logits unchanged)."""
    return x if len(x.shape) == 2 else tf.reshape(x, [-1, tf.shape(x)[-1]])


def position_weights(values, sample_weight, mask):
    """Weights of the per-position `values` ([batch, ...]) from per-example or
    per-position sample weights and a Keras mask; None when all are 1."""
    weights = None
    if sample_weight is not None:
        weights = ops.cast(sample_weight, values.dtype)
        while len(weights.shape) < len(values.shape):
            weights = ops.expand_dims(weights, -1)
        weights = ops.broadcast_to(weights, ops.shape(values))
    if mask is not None:
        m = ops.cast(mask, values.dtype)
        weights = m if weights is None else weights * m
    return weights


def position_mean(values, weights=None, mask=None):
    """Mean over the valid positions of `values` ([batch, ...]), weighted:
    sum(values * weights) / number of valid positions (Keras's
    "sum_over_batch_size" with a mask)."""
    if weights is None and mask is None:
        return ops.mean(values)
    if weights is not None:
        values = values * weights
    if mask is None:
        return ops.sum(values) / ops.cast(ops.size(values), values.dtype)
    return ops.divide_no_nan(ops.sum(values), ops.sum(ops.cast(mask, values.dtype)))


def agreement(a, b, mask=None):
    """Fraction of (valid) positions where the two logits' argmax agree."""
    same = ops.cast(ops.argmax(a, -1) == ops.argmax(b, -1), "float32")
    return position_mean(same, mask=mask)

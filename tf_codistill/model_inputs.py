"""What `CodistillModel` checks and splits of its inputs, as functions: the
members' output shapes, a step's data per member (the data modes), labels
against the logits and the class count. Every mistake is one line, raised at
construction or when the first step is traced."""

from __future__ import annotations

import keras
import tensorflow as tf

from tf_codistill import positions, task

__all__ = ["check_output_shapes", "split_data", "check_fit", "label_checks"]


def _require_one_shape(shapes) -> None:
    """Members' logit shapes per example (None: unknown) must agree."""
    if len({s for s in shapes if s is not None}) > 1:
        listing = ", ".join(f"member {i}: {s}" for i, s in enumerate(shapes))
        raise ValueError(
            "All members must produce logits of the same shape; got "
            f"{listing}. Build every member for the same number of classes."
        )


def check_output_shapes(members) -> None:
    """Members must agree on their logits' shape, with a class axis."""
    shapes = []
    for m in members:
        try:
            shapes.append(tuple(m.outputs[0].shape[1:]) if m.outputs else None)
        except (AttributeError, ValueError):
            shapes.append(None)
    _require_one_shape(shapes)
    for i, s in enumerate(shapes):
        if s is not None and len(s) < 1:
            raise ValueError(
                f"Member {i} outputs shape {s} per example; CodistillModel needs logits of shape "
                "[batch, classes] or [batch, ..., classes] (e.g. [batch, time, vocabulary])."
            )


def split_data(x, y, sample_weight, n: int, data_mode: str, split_plain: bool):
    """(xs, ys, sample weights), one of each per local member: the whole
    batch for each ("shared"), nested per-member batches as given, or a plain
    batch split in n slices (`split_plain`: data_mode "auto" or "split")."""
    nested = isinstance(x, (tuple, list)) and len(x) == n and isinstance(y, (tuple, list))
    if data_mode == "shared" or n == 1 and not nested:
        return [x] * n, [y] * n, [sample_weight] * n
    if nested:
        sws = list(sample_weight) if isinstance(sample_weight, (tuple, list)) else [sample_weight] * n
        return list(x), list(y), sws
    if split_plain:
        split = positions.split_batch
        return split(x, n), split(y, n), split(sample_weight, n)
    raise ValueError(
        f"data_mode='independent' expects every element of the training data to be "
        f"((x_0, ..., x_{n - 1}), (y_0, ..., y_{n - 1})), one batch per member; got x of "
        f"type {type(x).__name__}. Build the dataset with "
        "tf_codistill.data.independent_batches(...), pass data_mode='auto' (the default) to split "
        "each (x, y) batch across the members, or data_mode='shared' to give every member the "
        "whole batch."
    )


def check_fit(task_loss, ys, logits) -> None:
    """One clear line when the members' outputs disagree in shape or the
    labels do not fit the logits (checked on static shapes, at trace)."""
    _require_one_shape([tuple(z.shape[1:]) for z in logits])
    z, y = logits[0], ys[0]
    if not isinstance(task_loss, task.LABEL_LOSSES) or y is None or y.shape.rank is None:
        return
    z_shape = tuple(z.shape)
    y_shape = tuple(y.shape)
    sparse = isinstance(task_loss, keras.losses.SparseCategoricalCrossentropy)
    want = z_shape[:-1] if sparse else z_shape
    got = y_shape[:-1] if sparse and len(y_shape) == len(z_shape) and y_shape[-1] == 1 else y_shape
    fits = len(got) == len(want) and all(a is None or b is None or a == b for a, b in zip(got, want))
    if not fits:
        kind = "integer labels of shape" if sparse else "one-hot labels of shape"
        raise ValueError(
            f"labels of shape {y_shape} do not fit logits of shape {z_shape}: "
            f"{type(task_loss).__name__} needs {kind} {want} (batch first)."
        )


def label_checks(y, num_classes: int | None) -> list:
    """Assertions that integer labels lie in [0, num_classes) (none without a class count)."""
    if num_classes is None or y.dtype.is_floating:
        return []
    return [
        tf.debugging.assert_non_negative(y, message="labels must be >= 0"),
        tf.debugging.assert_less(
            y,
            tf.cast(num_classes, y.dtype),
            message=f"labels out of range: every label must be in [0, {num_classes})",
        ),
    ]

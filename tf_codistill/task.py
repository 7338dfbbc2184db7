"""The task side of `CodistillModel`: the task loss and metrics a user
passes to `compile`, resolved to Keras objects that read logits.

A lambda, a function, a loss object or a name all work as the task loss; a
loss that expects probabilities is refused with the fix in one line.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import keras
from keras import ops

__all__ = [
    "LABEL_LOSSES",
    "FunctionLoss",
    "resolve_loss",
    "softmax_output",
    "float32",
    "metric_factory",
]

# Loss names Keras resolves to a probability loss: CodistillModel's members emit logits.
LOGIT_LOSSES = {
    "sparse_categorical_crossentropy": keras.losses.SparseCategoricalCrossentropy,
    "categorical_crossentropy": keras.losses.CategoricalCrossentropy,
}

# Keras loss functions that expect probabilities unless told otherwise.
PROBABILITY_FUNCTIONS = {
    keras.losses.sparse_categorical_crossentropy: "SparseCategoricalCrossentropy",
    keras.losses.categorical_crossentropy: "CategoricalCrossentropy",
    keras.losses.binary_crossentropy: "BinaryCrossentropy",
    keras.losses.categorical_focal_crossentropy: "CategoricalFocalCrossentropy",
    keras.losses.binary_focal_crossentropy: "BinaryFocalCrossentropy",
}


#: Task losses whose labels are checked against the logits' shape at the first step.
LABEL_LOSSES = (keras.losses.SparseCategoricalCrossentropy, keras.losses.CategoricalCrossentropy)


class FunctionLoss(keras.losses.Loss):
    """A function `(y_true, y_pred) -> per-example loss` as a `keras.losses.Loss`
    (sample weights and the batch mean are applied by `Loss.__call__`)."""

    def __init__(self, fn, name=None):
        # Keras opens a name scope with the loss's name: "<lambda>" or "_private" is not a valid one.
        name = (name or getattr(fn, "__name__", "")).lstrip("_")
        super().__init__(name=name if re.fullmatch(r"[A-Za-z0-9.][\w.>/-]*", name) else "loss")
        self.fn = fn

    def call(self, y_true, y_pred):
        return self.fn(y_true, y_pred)


def resolve_loss(loss) -> keras.losses.Loss:
    """The task loss as a `keras.losses.Loss` on logits.

    Raises:
        ValueError: a loss that expects probabilities (`from_logits=False`).
    """
    if loss is None:
        return keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    if isinstance(loss, str) and loss in LOGIT_LOSSES:
        return LOGIT_LOSSES[loss](from_logits=True)
    resolved = keras.losses.get(loss)
    if resolved is None or not (isinstance(resolved, keras.losses.Loss) or callable(resolved)):
        raise ValueError(
            f"compile(loss={loss!r}): not a loss. Pass a keras.losses.Loss, the name of one, or a "
            "function (y_true, logits) -> per-example loss."
        )
    if isinstance(resolved, keras.losses.Loss):
        if getattr(resolved, "get_config", None) and resolved.get_config().get("from_logits") is False:
            raise ValueError(
                f"compile(loss={type(resolved).__name__}(from_logits=False)): CodistillModel's members "
                "return logits, so this loss would read them as probabilities. Pass "
                f"keras.losses.{type(resolved).__name__}(from_logits=True)."
            )
        return resolved
    if resolved in PROBABILITY_FUNCTIONS:
        name = PROBABILITY_FUNCTIONS[resolved]
        raise ValueError(
            f"compile(loss={loss!r}): keras.losses.{resolved.__name__} expects probabilities by default "
            f"but CodistillModel's members return logits. Pass keras.losses.{name}(from_logits=True)."
        )
    return FunctionLoss(resolved)


def softmax_output(member: keras.Model) -> bool:
    """True when the member's output layer is a softmax (probabilities, not logits)."""
    layers = getattr(member, "layers", None)
    if not layers:
        return False
    last = layers[-1]
    if isinstance(last, keras.layers.Softmax):
        return True
    activation = getattr(last, "activation", None)
    return activation is keras.activations.softmax or getattr(activation, "__name__", "") == "softmax"


def float32(x):
    """Logits as float32: under a mixed precision policy members emit
    float16/bfloat16, and every loss here is computed in float32."""
    return ops.cast(x, "float32") if x is not None else None


def metric_factory(spec, sparse: bool) -> Callable[[str | None], keras.metrics.Metric]:
    """Returns make(prefix) that builds a fresh copy of one metric spec."""
    if isinstance(spec, str) and spec in ("accuracy", "acc"):
        cls = keras.metrics.SparseCategoricalAccuracy if sparse else keras.metrics.CategoricalAccuracy
        return lambda prefix: cls(name=f"{prefix}accuracy")
    if isinstance(spec, keras.metrics.Metric):
        config = spec.get_config()
        return lambda prefix: type(spec).from_config({**config, "name": prefix + config["name"]})
    resolved = keras.metrics.get(spec)
    if isinstance(resolved, keras.metrics.Metric):
        return metric_factory(resolved, sparse)
    name = spec if isinstance(spec, str) else getattr(resolved, "__name__", "metric")
    return lambda prefix: keras.metrics.MeanMetricWrapper(resolved, name=prefix + name)

"""Distances between a member's logits and its peers' (the teacher signal).

Each distance follows the `keras.distillation.DistillationLoss` interface:
`compute_loss(teacher_outputs, student_outputs)` returns the batch mean.
`CodistillModel` needs the per-example values as well (to apply sample
weights and to scale for a distribution strategy itself), so every distance
also has `per_example(teacher_outputs, student_outputs)`.

Any other `keras.distillation.DistillationLoss` (for example
`keras.distillation.LogitsDistillation`) works too: `get_distance` wraps it in
`KerasDistillationDistance`, which takes its per-example values row by row.

Every distance is registered with Keras serialisation, so a saved
`CodistillModel` keeps its distance.

Distances available by name through `get_distance`:

* ``"mse"``: mean squared error between logits (Anil et al., 2018).
* ``"kl"``: KL(teacher || student) of the tempered softmaxes, times T^2
  (Hinton et al., 2015; Zhang et al., 2018).
* ``"reverse_kl"``: KL(student || teacher), times T^2 (the reverse KL used by
  the SC20 online-codistillation code).
"""

from __future__ import annotations

import math
import warnings

import keras
from keras import ops

__all__ = [
    "CodistillDistance",
    "LogitMSE",
    "KLDivergence",
    "ReverseKLDivergence",
    "KerasDistillationDistance",
    "get_distance",
    "DISTANCES",
]


_register = keras.saving.register_keras_serializable(package="tf_codistill")


class CodistillDistance(keras.distillation.DistillationLoss):
    """Base class: a distance D(student logits, teacher logits) per example."""

    name = "distance"

    def per_example(self, teacher_outputs, student_outputs):
        """Returns a float tensor of shape `[batch]`.

        Args:
            teacher_outputs: peer logits, `[batch, classes]`.
            student_outputs: the member's own logits, `[batch, classes]`.
        """
        raise NotImplementedError

    def compute_loss(self, teacher_outputs, student_outputs, **kwargs):
        """Batch mean of `per_example` (the `DistillationLoss` interface)."""
        return ops.mean(self.per_example(teacher_outputs, student_outputs))

    def validate_outputs(self, teacher_outputs, student_outputs):
        """Raises `ValueError` unless both are `[batch, classes]` alike
        (`CodistillModel` passes sequence logits as one row per position)."""
        t_shape = tuple(teacher_outputs.shape)
        s_shape = tuple(student_outputs.shape)
        if len(t_shape) != 2 or len(s_shape) != 2 or t_shape[-1] != s_shape[-1]:
            raise ValueError(
                f"{type(self).__name__} needs logits of shape [batch, classes] "
                f"from every group; got teacher {t_shape} and student {s_shape}. "
                "All members must have the same number of output classes."
            )

    def get_config(self) -> dict:
        return {}

    @classmethod
    def from_config(cls, config):
        return cls(**config)


@_register
class LogitMSE(CodistillDistance):
    """Mean squared difference of the logits, averaged over classes."""

    name = "mse"

    def per_example(self, teacher_outputs, student_outputs):
        diff = ops.subtract(student_outputs, teacher_outputs)
        return ops.mean(ops.square(diff), axis=-1)


class _TemperedDistance(CodistillDistance):
    def __init__(self, temperature: float = 1.0):
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
            raise ValueError(f"temperature must be a number, got {temperature!r}.")
        if not math.isfinite(temperature):
            raise ValueError(f"temperature must be a finite number, got {temperature}.")
        if not temperature > 0:
            raise ValueError(
                f"temperature must be > 0, got {temperature}. Use 1.0 for the "
                "plain softmax; larger values soften both distributions."
            )
        self.temperature = float(temperature)

    def _log_probs(self, logits):
        return ops.log_softmax(ops.divide(logits, self.temperature), axis=-1)

    def get_config(self) -> dict:
        return {"temperature": self.temperature}


@_register
class KLDivergence(_TemperedDistance):
    """KL(teacher || student) of softmax(logits / T), multiplied by T^2."""

    name = "kl"

    def per_example(self, teacher_outputs, student_outputs):
        log_p = self._log_probs(teacher_outputs)
        log_q = self._log_probs(student_outputs)
        kl = ops.sum(ops.exp(log_p) * (log_p - log_q), axis=-1)
        return kl * (self.temperature**2)


@_register
class ReverseKLDivergence(_TemperedDistance):
    """KL(student || teacher) of softmax(logits / T), multiplied by T^2."""

    name = "reverse_kl"

    def per_example(self, teacher_outputs, student_outputs):
        log_p = self._log_probs(teacher_outputs)
        log_q = self._log_probs(student_outputs)
        kl = ops.sum(ops.exp(log_q) * (log_q - log_p), axis=-1)
        return kl * (self.temperature**2)


@_register
class KerasDistillationDistance(CodistillDistance):
    """Any `keras.distillation.DistillationLoss` as a codistillation distance.

    The teacher is the peers' mean logits, the student the member's own
    logits: `loss.compute_loss(teacher, student)`. Its batch value is used
    as is; with sample weights the per-example values are taken by calling
    `compute_loss` on each row (`ops.vectorized_map`), so the loss must
    reduce by a mean over the batch, as Keras's own distillation losses do.

    Args:
        loss: a `keras.distillation.DistillationLoss` instance.
    """

    name = "keras_distillation"

    def __init__(self, loss: keras.distillation.DistillationLoss):
        if not isinstance(loss, keras.distillation.DistillationLoss):
            raise TypeError(f"loss must be a keras.distillation.DistillationLoss, got {type(loss).__name__}.")
        self.loss = loss

    def compute_loss(self, teacher_outputs, student_outputs, **kwargs):
        return self.loss.compute_loss(teacher_outputs, student_outputs, **kwargs)

    def per_example(self, teacher_outputs, student_outputs):
        def one_row(pair):
            teacher, student = pair
            return self.loss.compute_loss(teacher[None], student[None])

        return ops.vectorized_map(one_row, (teacher_outputs, student_outputs))

    def validate_outputs(self, teacher_outputs, student_outputs):
        super().validate_outputs(teacher_outputs, student_outputs)
        self.loss.validate_outputs(teacher_outputs, student_outputs)

    def get_config(self) -> dict:
        return {"loss": keras.saving.serialize_keras_object(self.loss)}

    @classmethod
    def from_config(cls, config):
        return cls(keras.saving.deserialize_keras_object(config["loss"]))


def _warn_if_kl_of_logits(loss) -> None:
    """Keras's LogitsDistillation applies the softmax only for a
    `keras.losses.KLDivergence` instance; its default `loss="kl_divergence"`
    resolves to a function and compares tempered logits as if they were
    probabilities (clipped to [1e-7, 1]). Legal, but rarely what is meant."""
    if not isinstance(loss, keras.distillation.LogitsDistillation):
        return
    if any(fn is keras.losses.kl_divergence for fn in keras.tree.flatten(loss.loss)):
        warnings.warn(
            "keras.distillation.LogitsDistillation(loss='kl_divergence') compares the tempered logits "
            "as if they were probabilities (Keras applies the softmax only for a "
            "keras.losses.KLDivergence() instance). For the KL of the softmaxes pass "
            "loss=keras.losses.KLDivergence(), or distance='kl'.",
            stacklevel=3,
        )


#: The distances by name (their names are `tf_codistill.choices.DISTANCES`, in this order).
DISTANCES = {cls.name: cls for cls in (LogitMSE, KLDivergence, ReverseKLDivergence)}


def get_distance(
    distance: str | keras.distillation.DistillationLoss, temperature: float = 1.0
) -> CodistillDistance:
    """Resolves a distance by name, or returns a `CodistillDistance` as is.

    Any other `keras.distillation.DistillationLoss` instance is wrapped in
    `KerasDistillationDistance` (it keeps its own temperature).

    Args:
        distance: one of `DISTANCES`, a `CodistillDistance`, or a
            `keras.distillation.DistillationLoss` instance.
        temperature: softmax temperature for the KL distances (ignored by
            ``"mse"`` but still validated, so a typo never passes silently).

    Raises:
        ValueError: unknown name or bad temperature.
    """
    if isinstance(distance, CodistillDistance):
        return distance
    if isinstance(distance, keras.distillation.DistillationLoss):
        _warn_if_kl_of_logits(distance)
        return KerasDistillationDistance(distance)
    if not isinstance(distance, str) or distance not in DISTANCES:
        raise ValueError(
            f"Unknown distance {distance!r}. Choose one of {sorted(DISTANCES)} "
            "or pass a keras.distillation.DistillationLoss instance (e.g. "
            "keras.distillation.LogitsDistillation(temperature=2.0))."
        )
    cls = DISTANCES[distance]
    if cls is LogitMSE:
        _TemperedDistance(temperature)  # validates only
        return cls()
    return cls(temperature)

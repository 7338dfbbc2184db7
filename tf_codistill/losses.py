"""Distances between a member's logits and its peers' (the teacher signal).

Each distance follows the `keras.distillation.DistillationLoss` interface:
`compute_loss(teacher_outputs, student_outputs)` returns the batch mean.
`CodistillModel` needs the per-example values as well (to apply sample
weights and to scale for a distribution strategy itself), so every distance
also has `per_example(teacher_outputs, student_outputs)`.

Distances available by name through `get_distance`:

* ``"mse"``: mean squared error between logits (Anil et al., 2018).
* ``"kl"``: KL(teacher || student) of the tempered softmaxes, times T^2
  (Hinton et al., 2015; Zhang et al., 2018).
* ``"reverse_kl"``: KL(student || teacher), times T^2 (the reverse KL used by
  the SC20 online-codistillation code).
"""

from __future__ import annotations

import math

import keras
from keras import ops

__all__ = [
    "CodistillDistance",
    "LogitMSE",
    "KLDivergence",
    "ReverseKLDivergence",
    "get_distance",
    "DISTANCES",
]


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
        """Raises `ValueError` unless both are `[batch, classes]` alike."""
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


class KLDivergence(_TemperedDistance):
    """KL(teacher || student) of softmax(logits / T), multiplied by T^2."""

    name = "kl"

    def per_example(self, teacher_outputs, student_outputs):
        log_p = self._log_probs(teacher_outputs)
        log_q = self._log_probs(student_outputs)
        kl = ops.sum(ops.exp(log_p) * (log_p - log_q), axis=-1)
        return kl * (self.temperature**2)


class ReverseKLDivergence(_TemperedDistance):
    """KL(student || teacher) of softmax(logits / T), multiplied by T^2."""

    name = "reverse_kl"

    def per_example(self, teacher_outputs, student_outputs):
        log_p = self._log_probs(teacher_outputs)
        log_q = self._log_probs(student_outputs)
        kl = ops.sum(ops.exp(log_q) * (log_q - log_p), axis=-1)
        return kl * (self.temperature**2)


DISTANCES = {
    "mse": LogitMSE,
    "kl": KLDivergence,
    "reverse_kl": ReverseKLDivergence,
}


def get_distance(distance: str | CodistillDistance, temperature: float = 1.0) -> CodistillDistance:
    """Resolves a distance by name, or returns a `CodistillDistance` as is.

    Args:
        distance: one of `DISTANCES` or a `CodistillDistance` instance.
        temperature: softmax temperature for the KL distances (ignored by
            ``"mse"`` but still validated, so a typo never passes silently).

    Raises:
        ValueError: unknown name or bad temperature.
    """
    if isinstance(distance, CodistillDistance):
        return distance
    if not isinstance(distance, str) or distance not in DISTANCES:
        raise ValueError(
            f"Unknown distance {distance!r}. Choose one of {sorted(DISTANCES)} "
            "or pass a tf_codistill.losses.CodistillDistance instance."
        )
    cls = DISTANCES[distance]
    if cls is LogitMSE:
        _TemperedDistance(temperature)  # validates only
        return cls()
    return cls(temperature)

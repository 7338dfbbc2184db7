"""Step-indexed schedules: learning rate, weight decay and alpha.

All are `keras.optimizers.schedules.LearningRateSchedule` objects (a callable
of the optimizer's step counter), so they are traced into the train step, are
serialisable, and continue where they were when a run resumes from a
checkpoint (the step counter is part of the optimizer's state).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import keras
from keras import ops

from tf_codistill.checks import check_int, check_number, is_number
from tf_codistill.config import MILESTONE_PRESETS  # re-exported: milestone fractions by preset name

__all__ = [
    "AlphaSchedule",
    "WarmupPiecewiseDecay",
    "WarmupCosineDecay",
    "PiecewiseConstant",
    "paper_weight_decay",
    "goyal_learning_rate",
    "milestone_steps",
    "MILESTONE_PRESETS",
]

Schedule = keras.optimizers.schedules.LearningRateSchedule

# Registered, so that a saved model or optimizer that uses them loads by name.
_register = keras.saving.register_keras_serializable(package="tf_codistill")


def _check_boundaries(boundaries) -> list[int]:
    steps = [check_int(f"boundaries[{i}]", b, 0) for i, b in enumerate(boundaries)]
    if steps != sorted(steps):
        raise ValueError(f"boundaries must not decrease; got {steps}.")
    return steps


def goyal_learning_rate(base_lr: float, batch_size: int) -> float:
    """Linear scaling rule of Goyal et al. (2017): base_lr * batch / 256."""
    return base_lr * batch_size / 256.0


def milestone_steps(fractions: Sequence[float], total_steps: int) -> list[int]:
    """Turns milestones given as fractions of the run into step numbers."""
    check_int("total_steps", total_steps, 1)
    for f in fractions:
        if not 0.0 < f < 1.0:
            raise ValueError(
                f"learning-rate milestones are fractions of the run in (0, 1); got {list(fractions)}."
            )
    if list(fractions) != sorted(fractions):
        raise ValueError(f"learning-rate milestones must increase; got {list(fractions)}.")
    return [max(1, int(round(f * total_steps))) for f in fractions]


@_register
class PiecewiseConstant(Schedule):
    """values[i] while step < boundaries[i]; values[-1] after the last one."""

    def __init__(self, boundaries: Sequence[int], values: Sequence[float]):
        if len(values) != len(boundaries) + 1:
            raise ValueError(
                f"need len(values) == len(boundaries) + 1; got {len(values)} values "
                f"and {len(boundaries)} boundaries."
            )
        self.boundaries = _check_boundaries(boundaries)
        self.values = [check_number(f"values[{i}]", v) for i, v in enumerate(values)]

    def __call__(self, step):
        step = ops.cast(step, "float32")
        value = ops.convert_to_tensor(self.values[0], "float32")
        for boundary, v in zip(self.boundaries, self.values[1:]):
            value = ops.where(step >= boundary, ops.cast(v, "float32"), value)
        return value

    def get_config(self):
        return {"boundaries": self.boundaries, "values": self.values}


@_register
class WarmupPiecewiseDecay(Schedule):
    """Linear warmup from 0 to `peak_lr`, then x`decay_factor` at each boundary.

    The step schedule of Goyal et al. (2017).
    """

    def __init__(
        self,
        peak_lr: float,
        boundaries: Sequence[int],
        decay_factor: float = 0.1,
        warmup_steps: int = 0,
    ):
        if check_number("peak_lr", peak_lr) <= 0:
            raise ValueError(f"learning rate must be > 0, got {peak_lr}.")
        if check_number("decay_factor", decay_factor) <= 0:
            raise ValueError(f"decay_factor must be > 0 (0.1: divide by 10), got {decay_factor}.")
        self.peak_lr = float(peak_lr)
        self.boundaries = _check_boundaries(boundaries)
        self.decay_factor = float(decay_factor)
        self.warmup_steps = check_int("warmup_steps", warmup_steps, 0)
        self._piecewise = PiecewiseConstant(
            self.boundaries,
            [self.peak_lr * self.decay_factor**i for i in range(len(self.boundaries) + 1)],
        )

    def __call__(self, step):
        lr = self._piecewise(step)
        if self.warmup_steps:
            frac = ops.minimum(ops.cast(step + 1, "float32") / self.warmup_steps, 1.0)
            lr = lr * frac
        return lr

    def get_config(self):
        return {
            "peak_lr": self.peak_lr,
            "boundaries": self.boundaries,
            "decay_factor": self.decay_factor,
            "warmup_steps": self.warmup_steps,
        }


@_register
class WarmupCosineDecay(Schedule):
    """Linear warmup to `peak_lr`, then half a cosine down to
    `final_fraction * peak_lr` (default 0) at `total_steps`."""

    def __init__(self, peak_lr: float, total_steps: int, warmup_steps: int = 0, final_fraction: float = 0.0):
        if check_number("peak_lr", peak_lr) <= 0:
            raise ValueError(f"learning rate must be > 0, got {peak_lr}.")
        check_int("total_steps", total_steps, 1)
        check_int("warmup_steps", warmup_steps, 0)
        if not 0 <= warmup_steps < total_steps:
            raise ValueError(f"need 0 <= warmup_steps < total_steps; got {warmup_steps} and {total_steps}.")
        if not 0.0 <= check_number("final_fraction", final_fraction) <= 1.0:
            raise ValueError(f"final_fraction must be in [0, 1], got {final_fraction}.")
        self.peak_lr = float(peak_lr)
        self.total_steps = int(total_steps)
        self.warmup_steps = int(warmup_steps)
        self.final_fraction = float(final_fraction)

    def __call__(self, step):
        step = ops.cast(step, "float32")
        decay_len = float(self.total_steps - self.warmup_steps)
        progress = ops.clip((step - self.warmup_steps) / decay_len, 0.0, 1.0)
        floor = self.final_fraction * self.peak_lr
        lr = floor + 0.5 * (self.peak_lr - floor) * (1.0 + ops.cos(3.141592653589793 * progress))
        if self.warmup_steps:
            warm = self.peak_lr * ops.minimum((step + 1.0) / self.warmup_steps, 1.0)
            lr = ops.where(step < self.warmup_steps, warm, lr)
        return lr

    def get_config(self):
        return {
            "peak_lr": self.peak_lr,
            "total_steps": self.total_steps,
            "warmup_steps": self.warmup_steps,
            **({"final_fraction": self.final_fraction} if self.final_fraction else {}),
        }


def paper_weight_decay(
    lr_boundaries: Sequence[int], values: Sequence[float] = (1e-4, 1e-5, 0.0)
) -> PiecewiseConstant:
    """The paper's decreasing weight decay: 1e-4, 1e-5 after the first lr
    decay, 0 after the second.

    Args:
        lr_boundaries: the learning-rate decay steps (at least two).
        values: the three weight-decay values.
    """
    if len(lr_boundaries) < 2:
        raise ValueError(
            "the paper's weight-decay schedule follows the first two learning-rate "
            f"decays; got {len(lr_boundaries)} lr milestones. Use a step lr schedule "
            "with at least two milestones."
        )
    if len(values) != 3:
        raise ValueError(
            f"values must be three weight decays (start, after the first and second decay); got {list(values)}."
        )
    for i, v in enumerate(values):
        if check_number(f"values[{i}]", v) < 0:
            raise ValueError(f"weight decay values must be >= 0, got {list(values)}.")
    return PiecewiseConstant(list(lr_boundaries[:2]), list(values))


@_register
class AlphaSchedule(Schedule):
    """Weight of the distillation term per step.

    alpha = 0 for the first `burn_in_steps`; then a linear ramp from 0 to
    `alpha` over `ramp_steps`; then constant. `burn_in_steps=0, ramp_steps=0`
    is a constant alpha.
    """

    def __init__(self, alpha: float = 1.0, burn_in_steps: int = 0, ramp_steps: int = 0):
        if not is_number(alpha):
            raise ValueError(f"alpha must be a number, got {alpha!r}.")
        if not math.isfinite(alpha):
            raise ValueError(f"alpha must be a finite number, got {alpha}.")
        if alpha < 0:
            raise ValueError(
                f"alpha must be >= 0, got {alpha}. alpha weighs the distillation "
                "term; 0 turns codistillation off."
            )
        check_int("burn_in_steps", burn_in_steps)
        check_int("ramp_steps", ramp_steps)
        if burn_in_steps < 0 or ramp_steps < 0:
            raise ValueError(
                f"burn_in_steps and ramp_steps must be >= 0; got {burn_in_steps} and {ramp_steps}."
            )
        self.alpha = float(alpha)
        self.burn_in_steps = int(burn_in_steps)
        self.ramp_steps = int(ramp_steps)

    def __call__(self, step):
        step = ops.cast(step, "float32")
        alpha = ops.convert_to_tensor(self.alpha, "float32")
        if self.ramp_steps:
            frac = ops.clip((step - self.burn_in_steps + 1.0) / self.ramp_steps, 0.0, 1.0)
            alpha = alpha * frac
        if self.burn_in_steps:
            alpha = ops.where(step < self.burn_in_steps, 0.0, alpha)
        return alpha

    def get_config(self):
        return {
            "alpha": self.alpha,
            "burn_in_steps": self.burn_in_steps,
            "ramp_steps": self.ramp_steps,
        }

"""Model builders, chosen by name. Every builder has the same signature:

    build(input_shape: tuple[int, ...], num_classes: int) -> keras.Model

and returns a functional model that maps inputs to logits (no softmax). The
models know nothing about distribution or codistillation.
"""

from __future__ import annotations

from collections.abc import Callable

import keras

from models import cnn1d, mlp, resnet

__all__ = ["MODELS", "build_model", "count_params"]

MODELS: dict[str, Callable[..., keras.Model]] = {
    "cnn1d": cnn1d.build,
    "mlp": mlp.build,
    "resnet20": resnet.build_resnet20,
    "resnet50": resnet.build_resnet50,
}


def build_model(
    name: str, input_shape: tuple[int, ...], num_classes: int, seed: int | None = None
) -> keras.Model:
    """Builds model `name`; with `seed`, its initial weights are reproducible.

    Raises:
        ValueError: unknown name or bad shapes.
    """
    if name not in MODELS:
        raise ValueError(f"Unknown model {name!r}. Choose one of {sorted(MODELS)}.")
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}.")
    if seed is not None:
        keras.utils.set_random_seed(seed)
    return MODELS[name](tuple(input_shape), num_classes)


def count_params(model: keras.Model) -> int:
    return int(sum(int(v.numpy().size) for v in model.trainable_variables))

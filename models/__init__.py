"""Model builders, chosen by name. Every builder has the same signature:

    build(input_shape: tuple[int, ...], num_classes: int, **options) -> keras.Model

and returns a functional model that maps inputs to logits (no softmax): one row
per example, or one per position for `transformer` (a language model whose
`num_classes` is the vocabulary). `options` are the builder's own keyword
arguments (the Transformer's layers, heads, width, dropout). The models know
nothing about distribution or codistillation.
"""

from __future__ import annotations

import inspect
import numbers
from collections.abc import Callable

import keras

from models import cnn1d, cnn1d_norm, mlp, resnet, transformer

__all__ = ["MODELS", "build_model", "count_params"]

MODELS: dict[str, Callable[..., keras.Model]] = {
    "cnn1d": cnn1d.build,
    "cnn1d_norm": cnn1d_norm.build,
    "mlp": mlp.build,
    "resnet20": resnet.build_resnet20,
    "resnet50": resnet.build_resnet50,
    "transformer": transformer.build,
}


def build_model(
    name: str, input_shape: tuple[int, ...], num_classes: int, seed: int | None = None, **options
) -> keras.Model:
    """Builds model `name`; with `seed`, its initial weights are reproducible.

    Raises:
        ValueError: unknown name, bad shapes, or an option the builder does not take.
    """
    if not isinstance(name, str) or name not in MODELS:
        raise ValueError(f"Unknown model {name!r}. Choose one of {sorted(MODELS)}.")
    if isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral):
        raise TypeError(f"num_classes must be an integer, got {num_classes!r}.")
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}.")
    try:
        dims = tuple(input_shape)
    except TypeError:
        raise TypeError(f"input_shape must be a tuple of sizes, e.g. (40,), got {input_shape!r}.") from None
    if not dims or any(isinstance(d, bool) or not isinstance(d, numbers.Integral) or d < 1 for d in dims):
        raise ValueError(
            f"input_shape must be a non-empty tuple of positive integers (no batch dimension), got {input_shape!r}."
        )
    if seed is not None and (
        isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed < 2**32
    ):
        raise ValueError(f"seed must be an integer in [0, 2**32) or None, got {seed!r}.")
    takes = set(list(inspect.signature(MODELS[name]).parameters)[2:])
    unknown = sorted(set(options) - takes)
    if unknown:
        raise ValueError(
            f"Model {name!r} takes no option {', '.join(unknown)}; it takes {sorted(takes) or 'none'}."
        )
    if seed is not None:
        keras.utils.set_random_seed(seed)
    return MODELS[name](tuple(input_shape), num_classes, **options)


def count_params(model: keras.Model) -> int:
    return int(sum(int(v.numpy().size) for v in model.trainable_variables))

"""A decoder-only Transformer language model (GPT-style, pre-LayerNorm).

Tokens `[batch, context]` -> next-token logits `[batch, context, vocabulary]`:
learned token and position embeddings, `layers` blocks of causal self-attention
(`keras.layers.MultiHeadAttention` with `use_causal_mask=True`) and a GELU MLP
four times as wide, each behind a LayerNorm and added back to the residual
stream, then a final LayerNorm and a linear head. Initialisation follows GPT-2
(normal, stddev 0.02; the residual projections scaled by 1/sqrt(2 x layers)).
The logits are float32 under a mixed-precision policy.

    build((64,), 65, layers=4, heads=4, width=128, dropout=0.0)  # ~0.8M parameters
"""

from __future__ import annotations

import math

import keras
from keras import layers as kl
from keras import ops


@keras.saving.register_keras_serializable(package="tf_codistill")
class LearnedPositions(kl.Layer):
    """Adds a learned vector per position to `[batch, time, width]` inputs."""

    def __init__(self, context: int, initializer="zeros", **kwargs):
        super().__init__(**kwargs)
        self.context = context
        self.initializer = keras.initializers.get(initializer)

    def build(self, input_shape):
        self.positions = self.add_weight(
            shape=(self.context, input_shape[-1]), initializer=self.initializer, name="positions"
        )

    def call(self, x):
        return x + ops.cast(self.positions[: ops.shape(x)[1]], x.dtype)

    def get_config(self):
        return {
            **super().get_config(),
            "context": self.context,
            "initializer": keras.initializers.serialize(self.initializer),
        }


def build(
    input_shape: tuple[int, ...],
    num_classes: int,
    layers: int = 4,
    heads: int = 4,
    width: int = 128,
    dropout: float = 0.0,
) -> keras.Model:
    """Builds the model for windows of `input_shape[0]` tokens over a
    vocabulary of `num_classes` symbols.

    Raises:
        ValueError: a window that is not one axis, or a width that the heads
            do not divide.
    """
    if len(input_shape) != 1:
        raise ValueError(f"transformer takes token windows of shape (context,), got {input_shape}.")
    for name, value in (("layers", layers), ("heads", heads), ("width", width)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"transformer: {name} must be a positive integer, got {value!r}.")
    if width % heads:
        raise ValueError(f"transformer: width {width} is not divisible by heads {heads}.")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"transformer: dropout must be in [0, 1), got {dropout}.")
    context = input_shape[0]
    init = keras.initializers.RandomNormal(stddev=0.02)
    residual_init = keras.initializers.RandomNormal(stddev=0.02 / math.sqrt(2 * layers))

    tokens = keras.Input(shape=(context,), dtype="int32", name="tokens")
    h = kl.Embedding(num_classes, width, embeddings_initializer=init, name="token_embedding")(tokens)
    h = LearnedPositions(context, initializer=init, name="positions")(h)
    h = kl.Dropout(dropout)(h)
    for i in range(layers):
        a = kl.LayerNormalization(epsilon=1e-5, name=f"block{i}_ln1")(h)
        a = kl.MultiHeadAttention(
            heads,
            width // heads,
            dropout=dropout,
            kernel_initializer=init,
            name=f"block{i}_attention",
        )(a, a, use_causal_mask=True)
        h = kl.Add()([h, kl.Dropout(dropout)(a)])
        m = kl.LayerNormalization(epsilon=1e-5, name=f"block{i}_ln2")(h)
        m = kl.Dense(4 * width, activation="gelu", kernel_initializer=init, name=f"block{i}_mlp_in")(m)
        m = kl.Dense(width, kernel_initializer=residual_init, name=f"block{i}_mlp_out")(m)
        h = kl.Add()([h, kl.Dropout(dropout)(m)])
    h = kl.LayerNormalization(epsilon=1e-5, name="final_ln")(h)
    logits = kl.Dense(num_classes, kernel_initializer=init, dtype="float32", name="logits")(h)
    return keras.Model(tokens, logits, name="transformer")

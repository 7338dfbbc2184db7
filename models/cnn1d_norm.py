"""The 1-D CNN of `cnn1d` with GroupNorm after each convolution, for large
learning rates (`--model=cnn1d_norm`).

Why GroupNorm and not BatchNorm: BatchNorm normalises with statistics of the
batch, so its noise and its regularisation change with the batch size, the
very variable a batch-size study varies; it couples the examples of a batch
(under a strategy, of each worker's slice); and it behaves differently in
training and inference (moving averages), and across codistilled groups that
read different batches. GroupNorm normalises each example on its own (over
its positions and a group of channels): the same function at every batch
size, in every group, in training and at evaluation. LayerNorm would do as
well; GroupNorm keeps per-channel-group statistics, closer to BatchNorm's.
"""

import keras
from keras import layers


def build(input_shape, num_classes, channels: int = 32, norm_groups: int = 8):
    inputs = keras.Input(shape=input_shape, name="signal")
    x = inputs
    if len(input_shape) == 1:
        x = layers.Reshape((input_shape[0], 1))(x)
    elif len(input_shape) != 2:
        raise ValueError(
            f"cnn1d_norm takes inputs of shape (length,) or (length, channels); got {input_shape}."
        )
    for kernel in (5, 3, 3):
        # No bias: GroupNorm's offset replaces it.
        x = layers.Conv1D(channels, kernel, strides=2, padding="same", use_bias=False)(x)
        x = layers.GroupNormalization(groups=norm_groups)(x)
        x = layers.ReLU()(x)
    x = layers.Flatten()(x)
    outputs = layers.Dense(num_classes, name="logits")(x)
    return keras.Model(inputs, outputs, name="cnn1d_norm")

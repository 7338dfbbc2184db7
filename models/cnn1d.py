"""A small 1-D CNN for MNIST-1D (three strided convolutions, then a linear
layer), after the convolutional baseline of the MNIST-1D paper (about 94%
test accuracy on the standard 4,000/1,000 split)."""

import keras
from keras import layers


def build(input_shape, num_classes, channels: int = 32):
    inputs = keras.Input(shape=input_shape, name="signal")
    x = inputs
    if len(input_shape) == 1:
        x = layers.Reshape((input_shape[0], 1))(x)
    elif len(input_shape) != 2:
        raise ValueError(f"cnn1d takes inputs of shape (length,) or (length, channels); got {input_shape}.")
    x = layers.Conv1D(channels, 5, strides=2, padding="same", activation="relu")(x)
    x = layers.Conv1D(channels, 3, strides=2, padding="same", activation="relu")(x)
    x = layers.Conv1D(channels, 3, strides=2, padding="same", activation="relu")(x)
    x = layers.Flatten()(x)
    outputs = layers.Dense(num_classes, name="logits")(x)
    return keras.Model(inputs, outputs, name="cnn1d")

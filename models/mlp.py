"""A multilayer perceptron: flatten, two ReLU hidden layers, linear logits."""

import keras
from keras import layers


def build(input_shape, num_classes, hidden: int = 100):
    inputs = keras.Input(shape=input_shape)
    x = layers.Flatten()(inputs)
    x = layers.Dense(hidden, activation="relu")(x)
    x = layers.Dense(hidden, activation="relu")(x)
    outputs = layers.Dense(num_classes, name="logits")(x)
    return keras.Model(inputs, outputs, name="mlp")

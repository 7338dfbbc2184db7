"""ResNets: the CIFAR-style ResNet-20 of He et al. (2016, section 4.2) and
ResNet-50 for ImageNet-sized images (from `keras.applications`)."""

import keras
from keras import layers


def _basic_block(x, filters, stride):
    shortcut = x
    y = layers.Conv2D(filters, 3, strides=stride, padding="same", use_bias=False)(x)
    y = layers.BatchNormalization()(y)
    y = layers.ReLU()(y)
    y = layers.Conv2D(filters, 3, padding="same", use_bias=False)(y)
    y = layers.BatchNormalization()(y)
    if stride != 1 or shortcut.shape[-1] != filters:
        shortcut = layers.Conv2D(filters, 1, strides=stride, use_bias=False)(shortcut)
        shortcut = layers.BatchNormalization()(shortcut)
    return layers.ReLU()(layers.Add()([y, shortcut]))


def build_resnet20(input_shape, num_classes, blocks_per_stage: int = 3):
    if len(input_shape) == 2:
        input_shape = (*input_shape, 1)
    if len(input_shape) != 3:
        raise ValueError(f"resnet20 takes images (height, width[, channels]); got {input_shape}.")
    inputs = keras.Input(shape=input_shape)
    x = layers.Conv2D(16, 3, padding="same", use_bias=False)(inputs)
    x = layers.ReLU()(layers.BatchNormalization()(x))
    for stage, filters in enumerate((16, 32, 64)):
        for block in range(blocks_per_stage):
            stride = 2 if stage > 0 and block == 0 else 1
            x = _basic_block(x, filters, stride)
    x = layers.GlobalAveragePooling2D()(x)
    outputs = layers.Dense(num_classes, name="logits")(x)
    return keras.Model(inputs, outputs, name="resnet20")


def build_resnet50(input_shape, num_classes):
    if len(input_shape) != 3 or min(input_shape[:2]) < 32:
        raise ValueError(
            f"resnet50 takes images (height, width, channels) of at least 32x32; got {input_shape}."
        )
    return keras.applications.ResNet50(
        weights=None,
        input_shape=input_shape,
        classes=num_classes,
        classifier_activation=None,
    )

"""ResNet for CIFAR (3x3 stem, no max-pool) with split BN and a width multiplier."""

import keras
import tensorflow as tf

from arat_tf.layers.torch_defaults import torch_default_dense
from arat_tf.models.branched_classifier import BranchedClassifier
from arat_tf.models.residual_block import (
    ResidualBlock,
    run_residual_blocks,
    tapped_block_names,
)

RESNET_STAGE_BLOCKS = {10: (1, 1, 1, 1), 18: (2, 2, 2, 2), 34: (3, 4, 6, 3)}


def scaled_width(base, width):
    """Channels of a layer whose full-width count is `base`, under a width multiplier."""
    return max(1, int(round(base * width)))


def resnet_stage_plan(depth, width):
    """`[(block_name, filters, strides)]` of a CIFAR ResNet's four stages (64-128-256-512 x width).

    Raises:
        ValueError: unknown depth or non-positive width.
    """
    if depth not in RESNET_STAGE_BLOCKS:
        raise ValueError(f"depth must be one of {sorted(RESNET_STAGE_BLOCKS)}, received depth={depth}.")
    if not width > 0:
        raise ValueError(f"width must be > 0, received width={width}.")
    return [
        (f"block{stage}.{index}", scaled_width(64 * 2 ** (stage - 1), width),
         2 if stage > 1 and index == 0 else 1)
        for stage, num_blocks in enumerate(RESNET_STAGE_BLOCKS[depth], start=1)
        for index in range(num_blocks)
    ]


@keras.saving.register_keras_serializable(package="arat_tf")
class BasicBlock(ResidualBlock):
    """conv-BN-ReLU-conv-BN + shortcut, ReLU: the block of the CIFAR ResNet-18 (Kuang Liu's layout).

    Returns `(output, (bn1, bn2))` where bn1/bn2 are the two BN outputs, bn2 taken before the
    residual add: ARAT's taps on the last stage.
    """

    activation_names = ("bn1", "bn2")

    def __init__(self, filters, strides=1, **kwargs):
        super().__init__(filters, strides, **kwargs)
        self.conv1 = self.conv(filters, 3, strides, "conv1")
        self.bn1 = self.norm("bn1")
        self.conv2 = self.conv(filters, 3, 1, "conv2")
        self.bn2 = self.norm("bn2")

    def build(self, input_shape):
        if self.needs_projection(input_shape):
            self.shortcut_conv = self.conv(self.filters, 1, self.strides, "shortcut_conv")
            self.shortcut_bn = self.norm("shortcut_bn")

    def call(self, inputs, training=None, branch="adv"):
        bn1 = self.bn1(self.conv1(inputs), training=training, branch=branch)
        bn2 = self.bn2(self.conv2(tf.nn.relu(bn1)), training=training, branch=branch)
        shortcut = inputs
        if self.shortcut_conv is not None:
            shortcut = self.shortcut_bn(self.shortcut_conv(inputs), training=training, branch=branch)
        return tf.nn.relu(bn2 + shortcut), (bn1, bn2)


@keras.saving.register_keras_serializable(package="arat_tf")
class ResNet(BranchedClassifier):
    """CIFAR ResNet (BasicBlocks, 3x3 stem, no max-pool): ResNet-18 by default.

    ARAT's taps for ResNet-18 are the four BN outputs of the last stage (block4.0.bn1, block4.0.bn2,
    block4.1.bn1, block4.1.bn2), each pooled after a ReLU. `width` scales every stage's channels
    (1.0 = 64-128-256-512; 0.25 fits this project's CPU machine) and `depth` picks 10/18/34.

    Args:
        num_classes: number of classes.
        image_shape: `(H, W, C)` of the inputs.
        depth: 10, 18 or 34.
        width: channel multiplier (> 0).
        bn_mode: normalisation variant at every BN site.
        synchronized_bn: synchronise BN statistics across replicas.
        **kwargs: base `keras.Model` arguments.

    Example:

    >>> model = ResNet(num_classes=10, image_shape=(32, 32, 3), width=0.25)
    >>> logits, taps = model(keras.ops.zeros((2, 32, 32, 3)), branch="clean", return_taps=True)
    >>> list(taps)
    ['block4.0.bn1', 'block4.0.bn2', 'block4.1.bn1', 'block4.1.bn2']
    """

    def __init__(self, num_classes=10, image_shape=(32, 32, 3), depth=18, width=1.0, **kwargs):
        super().__init__(num_classes, image_shape, **kwargs)
        plan = resnet_stage_plan(depth, width)
        self.depth = int(depth)
        self.width = float(width)
        self.stem_conv = self.conv(scaled_width(64, width), 3, 1, "stem_conv")
        self.stem_bn = self.norm("stem_bn")
        self.blocks = [
            BasicBlock(filters, strides, name=name, **self.block_arguments())
            for name, filters, strides in plan
        ]
        self.classifier = torch_default_dense(num_classes, plan[-1][1], "classifier")
        self._last_stage = f"block{len(RESNET_STAGE_BLOCKS[depth])}."

    @property
    def tap_names(self):
        return tapped_block_names(self.blocks, self._last_stage)

    def forward(self, images, training, branch):
        x = tf.nn.relu(self.stem_bn(self.stem_conv(images), training=training, branch=branch))
        x, taps = run_residual_blocks(self.blocks, x, self._last_stage, training, branch)
        logits = self.classifier(tf.reduce_mean(x, axis=[1, 2]))
        return logits, taps

    def get_config(self):
        config = super().get_config()
        config.update(depth=self.depth, width=self.width)
        return config

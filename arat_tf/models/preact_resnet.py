"""Pre-activation ResNet for CIFAR with split BN and a width multiplier."""

import keras
import tensorflow as tf

from arat_tf.layers.torch_defaults import torch_default_dense
from arat_tf.models.branched_classifier import BranchedClassifier, pooled_tap
from arat_tf.models.residual_block import (
    ResidualBlock,
    run_residual_blocks,
    tapped_block_names,
)
from arat_tf.models.resnet import RESNET_STAGE_BLOCKS, resnet_stage_plan, scaled_width


@keras.saving.register_keras_serializable(package="arat_tf")
class PreActBlock(ResidualBlock):
    """BN-ReLU-conv-BN-ReLU-conv + shortcut (taken from the first pre-activation when it projects).

    Returns `(output, (bn1, bn2))`, the two BN outputs before their ReLU.
    """

    activation_names = ("bn1", "bn2")

    def __init__(self, filters, strides=1, **kwargs):
        super().__init__(filters, strides, **kwargs)
        self.bn1 = self.norm("bn1")
        self.conv1 = self.conv(filters, 3, strides, "conv1")
        self.bn2 = self.norm("bn2")
        self.conv2 = self.conv(filters, 3, 1, "conv2")

    def build(self, input_shape):
        if self.needs_projection(input_shape):
            self.shortcut_conv = self.conv(self.filters, 1, self.strides, "shortcut_conv")

    def call(self, inputs, training=None, branch="adv"):
        bn1 = self.bn1(inputs, training=training, branch=branch)
        pre = tf.nn.relu(bn1)
        shortcut = inputs if self.shortcut_conv is None else self.shortcut_conv(pre)
        bn2 = self.bn2(self.conv1(pre), training=training, branch=branch)
        return self.conv2(tf.nn.relu(bn2)) + shortcut, (bn1, bn2)


@keras.saving.register_keras_serializable(package="arat_tf")
class PreActResNet(BranchedClassifier):
    """Pre-activation ResNet-18 (He et al. 2016) for CIFAR: PreActResNet-18 by default.

    Taps: the ReLU'd outputs of both BNs of every last-stage block (as WideResNet's relu1/relu2)
    plus the penultimate pooled feature.

    Args:
        num_classes: number of classes.
        image_shape: `(H, W, C)` of the inputs.
        depth: 10, 18 or 34.
        width: channel multiplier (> 0).
        **kwargs: `BranchedClassifier` arguments (`bn_mode`, `synchronized_bn`, `name`).

    Example:

    >>> model = PreActResNet(num_classes=10, width=0.25)
    >>> model(keras.ops.zeros((2, 32, 32, 3))).shape
    (2, 10)
    """

    def __init__(self, num_classes=10, image_shape=(32, 32, 3), depth=18, width=1.0, **kwargs):
        super().__init__(num_classes, image_shape, **kwargs)
        plan = resnet_stage_plan(depth, width)
        self.depth = int(depth)
        self.width = float(width)
        self.stem_conv = self.conv(scaled_width(64, width), 3, 1, "stem_conv")
        self.blocks = [
            PreActBlock(filters, strides, name=name, **self.block_arguments())
            for name, filters, strides in plan
        ]
        self.final_bn = self.norm("final_bn")
        self.classifier = torch_default_dense(num_classes, plan[-1][1], "classifier")
        self._last_stage = f"block{len(RESNET_STAGE_BLOCKS[depth])}."

    @property
    def tap_names(self):
        return tapped_block_names(self.blocks, self._last_stage) + ["penultimate"]

    def forward(self, images, training, branch):
        x, taps = run_residual_blocks(
            self.blocks, self.stem_conv(images), self._last_stage, training, branch
        )
        features = pooled_tap(self.final_bn(x, training=training, branch=branch))
        taps["penultimate"] = features
        return self.classifier(features), taps

    def get_config(self):
        config = super().get_config()
        config.update(depth=self.depth, width=self.width)
        return config

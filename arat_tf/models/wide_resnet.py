"""WideResNet (Zagoruyko & Komodakis; the TRADES/ARAT layout) with split BN."""

import keras
import tensorflow as tf

from arat_tf.layers.torch_defaults import torch_default_kernel_init
from arat_tf.models.branched_classifier import BranchedClassifier, pooled_tap
from arat_tf.models.residual_block import (
    ResidualBlock,
    run_residual_blocks,
    tapped_block_names,
)


def wrn_kernel_init():
    """The TRADES/ARAT WideResNet's conv initialisation: He-normal over fan_out (a new initializer
    per layer, see `torch_default_kernel_init`)."""
    return keras.initializers.VarianceScaling(2.0, "fan_out", "untruncated_normal")


@keras.saving.register_keras_serializable(package="arat_tf")
class WideBasicBlock(ResidualBlock):
    """BN-ReLU-conv-BN-ReLU-conv with a projecting shortcut when the width or stride changes.

    Returns `(output, (relu1, relu2))`: the activations ARAT taps in WRN-34-10. As in the reference
    implementation, a projecting block applies its shortcut to relu1, an identity block to the input.
    """

    activation_names = ("relu1", "relu2")

    def __init__(self, filters, strides=1, **kwargs):
        super().__init__(filters, strides, **kwargs)
        self.bn1 = self.norm("bn1")
        self.conv1 = self.conv(filters, 3, strides, "conv1")
        self.bn2 = self.norm("bn2")
        self.conv2 = self.conv(filters, 3, 1, "conv2")

    def conv_kernel_initializer(self):
        return wrn_kernel_init()

    def build(self, input_shape):
        if self.needs_projection(input_shape):
            self.shortcut_conv = self.conv(self.filters, 1, self.strides, "shortcut_conv")

    def call(self, inputs, training=None, branch="adv"):
        relu1 = tf.nn.relu(self.bn1(inputs, training=training, branch=branch))
        relu2 = tf.nn.relu(self.bn2(self.conv1(relu1), training=training, branch=branch))
        shortcut = inputs if self.shortcut_conv is None else self.shortcut_conv(relu1)
        return self.conv2(relu2) + shortcut, (relu1, relu2)


@keras.saving.register_keras_serializable(package="arat_tf")
class WideResNet(BranchedClassifier):
    """WideResNet-depth-widen_factor: WRN-34-10 for the paper, e.g. WRN-10-1 on a CPU.

    ARAT's taps: relu1 and relu2 of every block of the last group (for WRN-34-10: 5 blocks, the
    first relu1 is 320-d) plus the penultimate pooled feature: 11 taps.

    Args:
        num_classes: number of classes.
        image_shape: `(H, W, C)` of the inputs.
        depth: total depth, `6 * n + 4` (n blocks per group): 34 for the paper, 10 for a small run.
        widen_factor: channel multiplier of the three groups (16 * k, 32 * k, 64 * k).
        **kwargs: `BranchedClassifier` arguments (`bn_mode`, `synchronized_bn`, `name`).

    Example:

    >>> model = WideResNet(num_classes=10, depth=10, widen_factor=1)
    >>> len(model.tap_names)
    3
    """

    def __init__(self, num_classes=10, image_shape=(32, 32, 3), depth=34, widen_factor=10, **kwargs):
        super().__init__(num_classes, image_shape, **kwargs)
        if depth < 10 or (depth - 4) % 6:
            raise ValueError(f"depth must be 6 * n + 4 with n >= 1, received depth={depth}.")
        if not widen_factor > 0:
            raise ValueError(f"widen_factor must be > 0, received widen_factor={widen_factor}.")
        self.depth = int(depth)
        self.widen_factor = widen_factor
        blocks_per_group = (depth - 4) // 6
        widths = [max(1, int(round(c * widen_factor))) for c in (16, 32, 64)]
        self.stem_conv = self.conv(16, 3, 1, "stem_conv", kernel_initializer=wrn_kernel_init())
        self.blocks = []
        for group, filters in enumerate(widths, start=1):
            for index in range(blocks_per_group):
                self.blocks.append(
                    WideBasicBlock(
                        filters, 2 if group > 1 and index == 0 else 1,
                        name=f"group{group}.{index}", **self.block_arguments(),
                    )
                )
        self.final_bn = self.norm("final_bn")
        # The TRADES/ARAT WideResNet zeroes the classifier bias and keeps PyTorch's default kernel.
        self.classifier = keras.layers.Dense(
            num_classes, kernel_initializer=torch_default_kernel_init(), bias_initializer="zeros",
            name="classifier",
        )

    @property
    def tap_names(self):
        return tapped_block_names(self.blocks, "group3.") + ["penultimate"]

    def forward(self, images, training, branch):
        x, taps = run_residual_blocks(
            self.blocks, self.stem_conv(images), "group3.", training, branch
        )
        features = pooled_tap(self.final_bn(x, training=training, branch=branch))
        taps["penultimate"] = features
        return self.classifier(features), taps

    def get_config(self):
        config = super().get_config()
        config.update(depth=self.depth, widen_factor=self.widen_factor)
        return config

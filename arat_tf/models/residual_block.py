"""ResidualBlock: what every residual block of arat_tf's models shares."""

import keras

from arat_tf.layers import make_normalization
from arat_tf.layers.torch_defaults import torch_default_kernel_init
from arat_tf.models.branched_classifier import make_conv, pooled_tap


class ResidualBlock(keras.layers.Layer):
    """Base of BasicBlock, PreActBlock and WideBasicBlock: filters, stride, the BN variant, config.

    A block is called as `block(x, training=..., branch=...)` and returns `(output, activations)`,
    the intermediate activations its model may tap for ARAT, named by `activation_names`.

    Args:
        filters: output channels.
        strides: stride of the first convolution (and of a projecting shortcut).
        bn_mode: normalisation variant (`arat_tf.layers.BN_MODES`).
        synchronized_bn: synchronise BN statistics across replicas.
        conv_padding: "torch" or "tf_same" (see `BranchedClassifier`).
        **kwargs: base `keras.layers.Layer` arguments.
    """

    def __init__(self, filters, strides=1, bn_mode="dual", synchronized_bn=False,
                 conv_padding="torch", **kwargs):
        super().__init__(**kwargs)
        self.filters = int(filters)
        self.strides = int(strides)
        self.bn_mode = bn_mode
        self.synchronized_bn = bool(synchronized_bn)
        self.conv_padding = conv_padding
        self.shortcut_conv = None

    activation_names = ()

    def conv_kernel_initializer(self):
        """The initializer of this block's convolutions (PyTorch's default unless overridden)."""
        return torch_default_kernel_init()

    def conv(self, filters, kernel_size, strides, name):
        """A bias-free convolution padded as this block's `conv_padding` says."""
        return make_conv(filters, kernel_size, strides, name, self.conv_padding,
                         self.conv_kernel_initializer())

    def tap_names(self):
        """`"<block name>.<activation name>"` for each activation the block returns."""
        return [f"{self.name}.{activation}" for activation in self.activation_names]

    def norm(self, name):
        """A normalisation layer of this block's `bn_mode`."""
        return make_normalization(self.bn_mode, synchronized=self.synchronized_bn, name=name)

    def needs_projection(self, input_shape):
        """Whether the shortcut must change the width or resolution."""
        return self.strides != 1 or input_shape[-1] != self.filters

    def get_config(self):
        config = super().get_config()
        config.update(
            filters=self.filters, strides=self.strides, bn_mode=self.bn_mode,
            synchronized_bn=self.synchronized_bn, conv_padding=self.conv_padding,
        )
        return config


def tapped_block_names(blocks, tapped_prefix):
    """The tap names of the blocks whose name starts with `tapped_prefix` (e.g. "block4.")."""
    return [name for block in blocks if block.name.startswith(tapped_prefix)
            for name in block.tap_names()]


def run_residual_blocks(blocks, inputs, tapped_prefix, training, branch):
    """Runs `blocks` in order; returns `(output, taps)` with the pooled activations of the blocks
    whose name starts with `tapped_prefix`, keyed as `tapped_block_names` lists them."""
    x, taps = inputs, {}
    for block in blocks:
        x, activations = block(x, training=training, branch=branch)
        if block.name.startswith(tapped_prefix):
            for name, activation in zip(block.tap_names(), activations):
                taps[name] = pooled_tap(activation)
    return x, taps

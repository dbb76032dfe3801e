"""ResidualBlock: what every residual block of arat_tf's models shares."""

import keras

from arat_tf.layers import make_normalization


class ResidualBlock(keras.layers.Layer):
    """Base of BasicBlock, PreActBlock and WideBasicBlock: filters, stride, the BN variant, config.

    A block is called as `block(x, training=..., branch=...)` and returns `(output, (a, b))`, the
    two intermediate activations its model may tap for ARAT.

    Args:
        filters: output channels.
        strides: stride of the first convolution (and of a projecting shortcut).
        bn_mode: normalisation variant (`arat_tf.layers.BN_MODES`).
        synchronized_bn: synchronise BN statistics across replicas.
        **kwargs: base `keras.layers.Layer` arguments.
    """

    def __init__(self, filters, strides=1, bn_mode="dual", synchronized_bn=False, **kwargs):
        super().__init__(**kwargs)
        self.filters = int(filters)
        self.strides = int(strides)
        self.bn_mode = bn_mode
        self.synchronized_bn = bool(synchronized_bn)
        self.shortcut_conv = None

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
            synchronized_bn=self.synchronized_bn,
        )
        return config

"""PaddedConv2D: a Conv2D that can pad as PyTorch's `Conv2d(padding=kernel_size // 2)` does."""

import keras
import tensorflow as tf

PADDINGS = ("symmetric", "same", "valid")


@keras.saving.register_keras_serializable(package="arat_tf")
class PaddedConv2D(keras.layers.Conv2D):
    """`keras.layers.Conv2D` with a third padding, "symmetric": `kernel_size // 2` zeros on every
    side, then a "valid" convolution, which is what PyTorch's `Conv2d(padding=k // 2)` computes.

    Why it exists: TensorFlow's `padding="same"` puts the odd padding pixel at the bottom/right.
    For a stride-2 3x3 convolution on an even input it pads 0 rows on top and 1 below, where
    PyTorch (and every PyTorch CIFAR ResNet, the papers' networks among them) pads 1 and 1: the
    strided convolution then samples the input one pixel off, misaligned with the strided 1x1
    shortcut, and the same weights give different logits. "symmetric" reproduces PyTorch's
    network exactly. At stride 1 with an odd kernel the two paddings are the same, and the layer
    runs TensorFlow's own "same" convolution (no extra pad op).

    Args:
        filters: output channels.
        kernel_size: an int or a pair.
        padding: "symmetric" (PyTorch's), "same" (TensorFlow's) or "valid".
        **kwargs: `keras.layers.Conv2D` arguments (`strides`, `use_bias`, initializers, ...).

    Example:

    >>> conv = PaddedConv2D(8, 3, strides=2, padding="symmetric")
    >>> conv(keras.ops.zeros((1, 32, 32, 3))).shape
    (1, 16, 16, 8)
    """

    def __init__(self, filters, kernel_size, padding="symmetric", **kwargs):
        if padding not in PADDINGS:
            raise ValueError(f"padding must be one of {PADDINGS}, received padding={padding!r}.")
        self.symmetric_padding = padding == "symmetric"
        super().__init__(filters, kernel_size, padding="valid" if self.symmetric_padding else padding,
                         **kwargs)
        same_as_tf = all(s == 1 for s in self.strides) and all(k % 2 for k in self.kernel_size)
        if self.symmetric_padding and same_as_tf:
            self.padding = "same"
        self._pad = (self.symmetric_padding and not same_as_tf
                     and any(k > 1 for k in self.kernel_size))

    def _spatial_axes(self):
        return (1, 2) if self.data_format == "channels_last" else (2, 3)

    def _paddings(self):
        paddings = [[0, 0]] * 4
        for axis, k in zip(self._spatial_axes(), self.kernel_size):
            paddings[axis] = [k // 2, k // 2]
        return paddings

    def call(self, inputs):
        if self._pad:
            inputs = tf.pad(inputs, self._paddings())
        return super().call(inputs)

    def compute_output_shape(self, input_shape):
        if self._pad:
            input_shape = list(input_shape)
            for axis, k in zip(self._spatial_axes(), self.kernel_size):
                if input_shape[axis] is not None:
                    input_shape[axis] += 2 * (k // 2)
        return super().compute_output_shape(tuple(input_shape))

    def get_config(self):
        config = super().get_config()
        if self.symmetric_padding:
            config["padding"] = "symmetric"
        return config

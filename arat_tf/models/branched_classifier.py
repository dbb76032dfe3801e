"""BranchedClassifier: the contract every arat_tf model follows."""

import warnings

import keras
import tensorflow as tf

from arat_tf.layers import BN_MODES, make_normalization
from arat_tf.layers.padded_conv2d import PaddedConv2D
from arat_tf.layers.torch_defaults import torch_default_kernel_init

# How strided convolutions pad: "torch" (PyTorch's symmetric `padding=k // 2`, the papers'
# networks) or "tf_same" (TensorFlow's "same": what arat_tf 0.1 models were trained with).
CONV_PADDINGS = ("torch", "tf_same")
LEGACY_CONV_PADDING = "tf_same"


def make_conv(filters, kernel_size, strides, name, conv_padding, kernel_initializer):
    """A bias-free convolution that pads as `conv_padding` says (one of `CONV_PADDINGS`).

    Only a strided convolution with a kernel wider than 1 pads differently under the two
    paddings; it is a `PaddedConv2D` under "torch". Every other convolution is Keras' own
    `Conv2D(padding="same")`, which is already symmetric there, so that a "tf_same" model is
    built exactly as arat_tf 0.1 built it and loads its `.keras` files.
    """
    common = dict(strides=strides, use_bias=False, kernel_initializer=kernel_initializer, name=name)
    if conv_padding == "torch" and strides > 1 and kernel_size > 1:
        return PaddedConv2D(filters, kernel_size, padding="symmetric", **common)
    return keras.layers.Conv2D(filters, kernel_size, padding="same", **common)


def pooled_tap(activation):
    """ARAT's feature tap: global-average-pool(ReLU(activation)) -> float32 `[batch, channels]`."""
    return tf.reduce_mean(tf.nn.relu(tf.cast(activation, "float32")), axis=[1, 2])


class BranchedClassifier(keras.Model):
    """Base class of arat_tf's image classifiers: logits, a BN branch per call, named feature taps.

    Every model takes images in [0, 1] (NHWC) and is called as
    `model(images, training=..., branch="adv" | "clean" | "mixed", return_taps=False)`.
    The branch selects the BN branch at every normalisation site (see `SplitBatchNormalization`);
    with `return_taps=True` the model returns `(logits, taps)` where `taps` is a dict from tap name
    (e.g. "block4.0.bn1") to a pooled `[batch, d]` representation: the layers ARAT regularises.
    Subclasses build their layers in `__init__` and implement `forward(images, training, branch)`
    returning `(logits, taps)`.

    Args:
        num_classes: number of output logits.
        image_shape: `(height, width, channels)` of the inputs; calls with another shape fail early
            with a message naming both shapes.
        bn_mode: normalisation variant at every BN site, one of `arat_tf.layers.BN_MODES`.
        synchronized_bn: synchronise BN batch statistics across replicas.
        conv_padding: how strided convolutions pad, one of `CONV_PADDINGS`: "torch" (PyTorch's
            symmetric padding, so the authors' weights give the authors' logits) or "tf_same"
            (TensorFlow's "same", which pads a stride-2 3x3 convolution of an even input 0/1
            instead of 1/1). A saved model whose config has no `conv_padding` was written by
            arat_tf 0.1 with "tf_same" and loads with it (`from_config`).
        **kwargs: base `keras.Model` arguments (`name`, ...); `dtype` is always float32 (the
            layers follow the dtype policy in force when the model is built).
    """

    def __init__(self, num_classes, image_shape, bn_mode="dual", synchronized_bn=False,
                 conv_padding="torch", **kwargs):
        # The model itself (its float32 image input) stays float32 under a mixed policy; its
        # layers take the policy they are created under (arat_tf.precision.dtype_policy).
        kwargs["dtype"] = "float32"
        super().__init__(**kwargs)
        if int(num_classes) < 2:
            raise ValueError(f"num_classes must be >= 2, received num_classes={num_classes}.")
        if len(image_shape) != 3 or any(int(d) < 1 for d in image_shape):
            raise ValueError(
                f"image_shape must be (height, width, channels), received image_shape={image_shape}."
            )
        if bn_mode not in BN_MODES:
            raise ValueError(f"bn_mode must be one of {BN_MODES}, received bn_mode={bn_mode!r}.")
        if conv_padding not in CONV_PADDINGS:
            raise ValueError(
                f"conv_padding must be one of {CONV_PADDINGS}, received conv_padding={conv_padding!r}."
            )
        self.conv_padding = conv_padding
        self.num_classes = int(num_classes)
        self.image_shape = tuple(int(d) for d in image_shape)
        self.bn_mode = bn_mode
        self.synchronized_bn = bool(synchronized_bn)

    def conv(self, filters, kernel_size, strides, name, kernel_initializer=None):
        """A bias-free convolution padded as this model's `conv_padding` says."""
        return make_conv(filters, kernel_size, strides, name, self.conv_padding,
                         kernel_initializer or torch_default_kernel_init())

    def block_arguments(self):
        """The keyword arguments every residual block of this model takes from it."""
        return dict(bn_mode=self.bn_mode, synchronized_bn=self.synchronized_bn,
                    conv_padding=self.conv_padding)

    def norm(self, name):
        """A normalisation layer of this model's `bn_mode`."""
        return make_normalization(self.bn_mode, synchronized=self.synchronized_bn, name=name)

    @property
    def tap_names(self):
        """Names of the feature taps, in network order."""
        raise NotImplementedError("BranchedClassifier subclasses define tap_names.")

    def forward(self, images, training, branch):
        """Returns `(logits, taps)`; implemented by each architecture."""
        raise NotImplementedError("BranchedClassifier subclasses implement forward().")

    def _check_images(self, images):
        shape = tuple(images.shape[1:])
        if len(shape) != 3 or any(
            got is not None and got != want for got, want in zip(shape, self.image_shape)
        ):
            raise ValueError(
                f"{self.name} expects images of shape (batch, {', '.join(map(str, self.image_shape))}),"
                f" received shape {tuple(images.shape)}."
            )

    def call(self, inputs, training=None, branch="adv", return_taps=False):
        self._check_images(inputs)
        logits, taps = self.forward(tf.cast(inputs, "float32"), bool(training), branch)
        logits = tf.cast(logits, "float32")  # under a mixed policy: float32 out (arat_tf.precision)
        if not return_taps:
            return logits
        return logits, {name: tf.cast(tap, "float32") for name, tap in taps.items()}

    def build(self, input_shape):
        """Creates every variable (both BN branches) by running one inference call on zeros."""
        self.call(tf.zeros((1,) + tuple(input_shape[1:])), training=False)
        self.built = True

    def get_config(self):
        config = super().get_config()
        config.update(
            num_classes=self.num_classes,
            image_shape=self.image_shape,
            bn_mode=self.bn_mode,
            synchronized_bn=self.synchronized_bn,
            conv_padding=self.conv_padding,
        )
        return config

    @classmethod
    def from_config(cls, config):
        if "conv_padding" not in config:
            warnings.warn(
                f"{cls.__name__} config without 'conv_padding': the model was saved by arat_tf 0.1, "
                f"whose strided convolutions pad as TensorFlow's 'same'; it is loaded with that "
                f"padding ({LEGACY_CONV_PADDING!r}), as it was trained. New models pad as PyTorch "
                f"('torch').",
                stacklevel=2,
            )
            config = dict(config, conv_padding=LEGACY_CONV_PADDING)
        return super().from_config(config)

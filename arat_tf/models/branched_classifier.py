"""BranchedClassifier: the contract every arat_tf model follows."""

import keras
import tensorflow as tf

from arat_tf.layers import BN_MODES, make_normalization

def torch_default_kernel_init():
    """PyTorch's default init for conv and dense kernels (kaiming_uniform with a=sqrt(5)), which the
    reference ResNets of the ARAT/TRADES/MART code bases rely on.

    A new initializer per layer: a Keras initializer object fixes its seed when constructed, so one
    shared object would give every same-shaped layer the same initial weights and ignore
    `keras.utils.set_random_seed`.
    """
    return keras.initializers.VarianceScaling(1.0 / 3.0, "fan_in", "uniform")


def pooled_tap(activation):
    """ARAT's feature tap: global-average-pool(ReLU(activation)) -> `[batch, channels]`."""
    return tf.reduce_mean(tf.nn.relu(activation), axis=[1, 2])


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
        **kwargs: base `keras.Model` arguments (`name`, ...).
    """

    def __init__(self, num_classes, image_shape, bn_mode="dual", synchronized_bn=False, **kwargs):
        super().__init__(**kwargs)
        if int(num_classes) < 2:
            raise ValueError(f"num_classes must be >= 2, received num_classes={num_classes}.")
        if len(image_shape) != 3 or any(int(d) < 1 for d in image_shape):
            raise ValueError(
                f"image_shape must be (height, width, channels), received image_shape={image_shape}."
            )
        if bn_mode not in BN_MODES:
            raise ValueError(f"bn_mode must be one of {BN_MODES}, received bn_mode={bn_mode!r}.")
        self.num_classes = int(num_classes)
        self.image_shape = tuple(int(d) for d in image_shape)
        self.bn_mode = bn_mode
        self.synchronized_bn = bool(synchronized_bn)

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
        return (logits, taps) if return_taps else logits

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
        )
        return config

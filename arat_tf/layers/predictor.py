"""Predictor: the SimSiam-style head that ARAT puts on the adversarial representation."""

import keras

from arat_tf.layers.split_batch_normalization import SplitBatchNormalization
from arat_tf.layers.torch_defaults import torch_default_dense


@keras.saving.register_keras_serializable(package="arat_tf")
class Predictor(keras.layers.Layer):
    """`Dense(d * hidden_ratio, no bias) -> BatchNorm -> ReLU -> Dense(d)`.

    ARAT's asymmetric invariance loss compares `h(z_adv)` with `stop_gradient(z_clean)`: the
    predictor `h` gives the adversarial side a trainable map towards the clean representation, so
    the invariance gradient need not pull the shared weights against the classification gradient
    (the paper's "gradient conflict"). It is a training-only head: never used at inference and not
    exported. It only ever sees adversarial representations, and it computes in float32 under
    any dtype policy.

    It is the authors' head exactly (their `AlignLoss` predictor): the hidden width is
    `int(d * hidden_ratio)`, both Dense layers start from PyTorch's default initialisation, and
    its BatchNorm keeps PyTorch-style moving statistics (momentum 0.1, epsilon 1e-5, moving
    variance updated with the unbiased batch variance: for a batch of 32 that is a factor 32/31
    over the biased one Keras' own BatchNormalization would use).

    Args:
        hidden_ratio: hidden width as a fraction of the input width `d` (ARAT: 1/4).
        synchronized: synchronise its BN statistics across replicas (as the classifier's BN).
        **kwargs: base `keras.layers.Layer` arguments.

    Example:

    >>> head = Predictor()
    >>> z = keras.random.normal((8, 512))
    >>> head(z, training=True).shape
    (8, 512)
    """

    def __init__(self, hidden_ratio=0.25, synchronized=False, **kwargs):
        kwargs["dtype"] = "float32"  # the invariance loss is float32 under any policy
        super().__init__(**kwargs)
        if not 0.0 < hidden_ratio:
            raise ValueError(f"hidden_ratio must be > 0, received hidden_ratio={hidden_ratio}.")
        self.hidden_ratio = float(hidden_ratio)
        self.synchronized = bool(synchronized)

    def build(self, input_shape):
        width = input_shape[-1]
        hidden = max(1, int(width * self.hidden_ratio))
        self.hidden_dense = torch_default_dense(hidden, width, "hidden_dense", use_bias=False,
                                                dtype="float32")
        self.hidden_norm = SplitBatchNormalization(
            split_statistics=False, split_affine=False, synchronized=self.synchronized,
            name="hidden_norm", dtype="float32",
        )
        self.output_dense = torch_default_dense(width, hidden, "output_dense", dtype="float32")
        self.hidden_dense.build(input_shape)
        self.hidden_norm.build((*input_shape[:-1], hidden))
        self.output_dense.build((*input_shape[:-1], hidden))

    def call(self, inputs, training=None):
        hidden = self.hidden_dense(inputs)
        hidden = keras.ops.relu(self.hidden_norm(hidden, training=training))
        return self.output_dense(hidden)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update(hidden_ratio=self.hidden_ratio, synchronized=self.synchronized)
        return config

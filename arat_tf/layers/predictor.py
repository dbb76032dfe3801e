"""Predictor: the SimSiam-style head that ARAT puts on the adversarial representation."""

import keras


@keras.saving.register_keras_serializable(package="arat_tf")
class Predictor(keras.layers.Layer):
    """`Dense(d * hidden_ratio, no bias) -> BatchNorm -> ReLU -> Dense(d)`.

    ARAT's asymmetric invariance loss compares `h(z_adv)` with `stop_gradient(z_clean)`: the
    predictor `h` gives the adversarial side a trainable map towards the clean representation, so
    the invariance gradient need not pull the shared weights against the classification gradient
    (the paper's "gradient conflict"). It is a training-only head: never used at inference and not
    exported. Its BN is an ordinary one with PyTorch's defaults; it only ever sees adversarial
    representations.

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
        super().__init__(**kwargs)
        if not 0.0 < hidden_ratio:
            raise ValueError(f"hidden_ratio must be > 0, received hidden_ratio={hidden_ratio}.")
        self.hidden_ratio = float(hidden_ratio)
        self.synchronized = bool(synchronized)

    def build(self, input_shape):
        width = input_shape[-1]
        hidden = max(1, int(round(width * self.hidden_ratio)))
        self.hidden_dense = keras.layers.Dense(hidden, use_bias=False, name="hidden_dense")
        self.hidden_norm = keras.layers.BatchNormalization(
            momentum=0.9, epsilon=1e-5, synchronized=self.synchronized, name="hidden_norm"
        )
        self.output_dense = keras.layers.Dense(width, name="output_dense")
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

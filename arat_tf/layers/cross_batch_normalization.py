"""CrossBatchNormalization: normalise a mixed batch with the statistics of one of its halves."""

import keras
import tensorflow as tf

from arat_tf.layers import batch_statistics as bs


@keras.saving.register_keras_serializable(package="arat_tf")
class CrossBatchNormalization(keras.layers.Layer):
    """One BN (one set of statistics and affine parameters) for Cross-AT.

    The Dual-BN paper's cross normalisation tests whether adversarial examples really need their own
    statistics: in training, the whole mixed batch `[adv; clean]` is normalised with the batch
    statistics of ONLY its clean half (`statistics_from="clean"`) or only its adversarial half
    (`statistics_from="adv"`), and the moving statistics track that half. A single-branch call
    ("clean" or "adv") behaves as an ordinary BN; inference always uses the moving statistics.

    Args:
        statistics_from: "clean" or "adv": the half whose batch statistics normalise a mixed batch.
        momentum: moving-average momentum, Keras convention (PyTorch's 0.1 is 0.9 here).
        epsilon: added to the variance before the square root.
        synchronized: compute batch statistics over all replicas of a `tf.distribute` strategy.
        **kwargs: base `keras.layers.Layer` arguments.

    Example:

    >>> bn = CrossBatchNormalization(statistics_from="clean")
    >>> mixed = keras.random.normal((8, 4, 4, 16))  # 4 adversarial, then 4 clean examples
    >>> y = bn(mixed, training=True, branch="mixed")
    """

    def __init__(
        self, statistics_from="clean", momentum=0.9, epsilon=1e-5, synchronized=False, **kwargs
    ):
        super().__init__(**kwargs)
        if statistics_from not in bs.BRANCHES:
            raise ValueError(
                f"statistics_from must be one of {bs.BRANCHES}, received {statistics_from!r}."
            )
        bs.check_momentum_and_epsilon(momentum, epsilon)
        self.statistics_from = statistics_from
        self.momentum = float(momentum)
        self.epsilon = float(epsilon)
        self.synchronized = bool(synchronized)

    def build(self, input_shape):
        shape = (input_shape[-1],)
        self.moving_mean = bs.add_moving_statistic(self, "moving_mean", shape, "zeros")
        self.moving_variance = bs.add_moving_statistic(self, "moving_variance", shape, "ones")
        self.gamma = self.add_weight(shape=shape, initializer="ones", autocast=False, name="gamma")
        self.beta = self.add_weight(shape=shape, initializer="zeros", autocast=False, name="beta")

    def call(self, inputs, training=None, branch="adv"):
        bs.check_branch(branch)
        inputs = tf.cast(inputs, "float32")
        if bool(training) and self.trainable:
            source = inputs
            if branch == bs.MIXED:
                adv, clean = bs.split_mixed_batch(inputs)
                source = clean if self.statistics_from == "clean" else adv
            mean, variance, count = bs.batch_moments(source, self.synchronized)
            bs.update_moving_statistics(
                self.moving_mean, self.moving_variance, mean, bs.unbiased(variance, count),
                self.momentum,
            )
        else:
            mean, variance = self.moving_mean, self.moving_variance
        outputs = bs.normalize(inputs, mean, variance, self.gamma, self.beta, self.epsilon)
        return tf.cast(outputs, self.compute_dtype)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update(
            statistics_from=self.statistics_from,
            momentum=self.momentum,
            epsilon=self.epsilon,
            synchronized=self.synchronized,
        )
        return config

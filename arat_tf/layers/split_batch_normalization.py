"""SplitBatchNormalization: one BN site with a clean and an adversarial branch."""

import keras
import tensorflow as tf

from arat_tf.layers import batch_statistics as bs


@keras.saving.register_keras_serializable(package="arat_tf")
class SplitBatchNormalization(keras.layers.Layer):
    """Batch normalisation with separate clean and adversarial branches, chosen per call.

    ARAT's split BN (and the Dual-BN paper's "dual BN") gives every BN site two full sets of
    normalisation statistics (moving mean/variance) and affine parameters (gamma/beta): clean inputs
    and adversarial inputs come from different distributions, and estimating one set of statistics
    for their mixture hurts both. The Dual-BN paper separates the two halves of that claim, so each
    can be shared independently:

    | split_statistics | split_affine | variant                                      |
    |---|---|---|
    | True  | True  | dual BN (ARAT's split BN; the default)              |
    | False | True  | shared statistics, dual affine                     |
    | True  | False | dual statistics, shared affine                     |
    | False | False | single, ordinary BN (baselines, "no split BN")     |

    The branch is chosen per call with `branch="clean"`, `"adv"` or `"mixed"`. A mixed call
    carries `[adv; clean]` halves of equal size: shared statistics are then computed over the
    whole concatenated batch (hybrid AT), while split statistics normalise each half on its own.
    A training-mode call on one branch never changes the other branch's variables.

    Defaults match PyTorch's `BatchNorm2d` (momentum 0.1 in PyTorch terms, epsilon 1e-5), which the
    papers' numbers were produced with.

    Args:
        split_statistics: whether clean and adversarial inputs keep separate moving statistics and
            are normalised with their own batch statistics.
        split_affine: whether clean and adversarial inputs get separate gamma/beta.
        momentum: moving-average momentum, Keras convention (`new = m * old + (1 - m) * batch`).
        epsilon: added to the variance before the square root.
        synchronized: compute batch statistics over all replicas of a `tf.distribute` strategy.
        **kwargs: base `keras.layers.Layer` arguments (`name`, `dtype`, ...).

    Example:

    >>> bn = SplitBatchNormalization()
    >>> x = keras.random.normal((4, 8, 8, 16))
    >>> y_adv = bn(x, training=True, branch="adv")  # updates only the adv moving statistics
    >>> y_clean = bn(x, training=False, branch="clean")
    """

    def __init__(
        self,
        split_statistics=True,
        split_affine=True,
        momentum=0.9,
        epsilon=1e-5,
        synchronized=False,
        **kwargs,
    ):
        super().__init__(**kwargs)
        bs.check_momentum_and_epsilon(momentum, epsilon)
        self.split_statistics = bool(split_statistics)
        self.split_affine = bool(split_affine)
        self.momentum = float(momentum)
        self.epsilon = float(epsilon)
        self.synchronized = bool(synchronized)

    def _statistics_key(self, branch):
        return branch if self.split_statistics else "shared"

    def _affine_key(self, branch):
        return branch if self.split_affine else "shared"

    def build(self, input_shape):
        channels = input_shape[-1]
        if channels is None:
            raise ValueError(
                f"The channel (last) dimension of the input must be known, received shape {input_shape}."
            )
        shape = (channels,)
        for key in sorted({self._statistics_key(b) for b in bs.BRANCHES}):
            setattr(self, f"{key}_moving_mean",
                    bs.add_moving_statistic(self, f"{key}_moving_mean", shape, "zeros"))
            setattr(self, f"{key}_moving_variance",
                    bs.add_moving_statistic(self, f"{key}_moving_variance", shape, "ones"))
        for key in sorted({self._affine_key(b) for b in bs.BRANCHES}):
            setattr(self, f"{key}_gamma", self.add_weight(
                shape=shape, initializer="ones", autocast=False, name=f"{key}_gamma"))
            setattr(self, f"{key}_beta", self.add_weight(
                shape=shape, initializer="zeros", autocast=False, name=f"{key}_beta"))

    def moving_statistics(self, branch):
        """The `(moving_mean, moving_variance)` variables used by `branch` ("clean" or "adv")."""
        key = self._statistics_key(branch)
        return getattr(self, f"{key}_moving_mean"), getattr(self, f"{key}_moving_variance")

    def affine_parameters(self, branch):
        """The `(gamma, beta)` variables used by `branch` ("clean" or "adv")."""
        key = self._affine_key(branch)
        return getattr(self, f"{key}_gamma"), getattr(self, f"{key}_beta")

    def _normalize_branch(self, inputs, branch, training):
        """One branch's batch, with its own batch statistics (training) or moving statistics."""
        gamma, beta = self.affine_parameters(branch)
        moving_mean, moving_variance = self.moving_statistics(branch)
        if not training:
            return bs.normalize(inputs, moving_mean, moving_variance, gamma, beta, self.epsilon)
        outputs, mean, variance = bs.normalize_in_training(
            inputs, gamma, beta, self.epsilon, self.synchronized
        )
        bs.update_moving_statistics(moving_mean, moving_variance, mean, variance, self.momentum)
        return outputs

    def _normalize_mixed_with_shared_statistics(self, inputs):
        """A training-mode mixed batch normalised with the statistics of the whole batch, each
        half then scaled by its own branch's affine parameters."""
        channels = inputs.shape[-1]
        normalized, mean, variance = bs.normalize_in_training(
            inputs, tf.ones([channels]), tf.zeros([channels]), self.epsilon, self.synchronized
        )
        bs.update_moving_statistics(*self.moving_statistics("adv"), mean, variance, self.momentum)
        halves = bs.split_mixed_batch(normalized)
        return tf.concat(
            [half * gamma + beta
             for half, (gamma, beta) in zip(halves, map(self.affine_parameters, ("adv", "clean")))],
            axis=0,
        )

    def call(self, inputs, training=None, branch="adv"):
        bs.check_branch(branch)
        training = bool(training) and self.trainable
        inputs = tf.cast(inputs, "float32")
        if branch != bs.MIXED:
            outputs = self._normalize_branch(inputs, branch, training)
        elif training and not self.split_statistics:
            outputs = self._normalize_mixed_with_shared_statistics(inputs)
        else:
            adv, clean = bs.split_mixed_batch(inputs)
            outputs = tf.concat(
                [self._normalize_branch(adv, "adv", training),
                 self._normalize_branch(clean, "clean", training)],
                axis=0,
            )
        return tf.cast(outputs, self.compute_dtype)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update(
            split_statistics=self.split_statistics,
            split_affine=self.split_affine,
            momentum=self.momentum,
            epsilon=self.epsilon,
            synchronized=self.synchronized,
        )
        return config

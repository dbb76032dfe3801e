"""Batch moments and moving-average updates shared by the branch-aware normalisation layers.

Both `SplitBatchNormalization` and `CrossBatchNormalization` normalise with batch statistics in
training and moving statistics in inference, exactly like PyTorch's `BatchNorm2d` (the ARAT and Dual-BN
authors' framework): the moving variance is updated with the *unbiased* batch variance
(n / (n - 1) correction) while the batch itself is normalised with the biased one.
"""

import contextlib
import functools
import threading

import keras
import tensorflow as tf

BRANCHES = ("clean", "adv")
MIXED = "mixed"
CALL_BRANCHES = BRANCHES + (MIXED,)


_TRAINING_ATTACK = threading.local()


@contextlib.contextmanager
def training_attack():
    """Marks (at trace time) the BN calls of a training attack, whose only output is the sign of
    an input gradient. Inside:

    * synchronised BN layers use per-replica batch statistics. A training-mode attack (the ARAT
      authors' protocol) runs BN inside the PGD `tf.while_loop`, and
      `tf.distribute.MirroredStrategy` cannot all-reduce inside control flow (on CPU, and on GPU
      without XLA, every cross-replica reduction is a `merge_call`). The attack therefore
      normalises with each replica's own batch statistics, which is also what the authors'
      PyTorch `DataParallel` does; the training forward pass outside the loop stays synchronised.
    * on a CPU-only host, training-mode BN is differentiated by TensorFlow's fused gradient kernel
      (given the accurate statistics), which is faster than the closed form but sums in a single
      float32 level: good enough for the direction of a sign step, not for the weight update
      (see `_normalize_with_own_statistics`).
    """
    previous = getattr(_TRAINING_ATTACK, "active", False)
    _TRAINING_ATTACK.active = True
    try:
        yield
    finally:
        _TRAINING_ATTACK.active = previous


def _in_training_attack():
    return getattr(_TRAINING_ATTACK, "active", False)


def add_moving_statistic(layer, name, shape, initializer):
    """A non-trainable moving-statistic variable that is safe to update inside a replica's graph loop.

    `synchronization="on_read"` (tf.keras' choice for BN statistics): each replica updates its own
    copy with no cross-replica synchronisation point, which TensorFlow forbids inside control flow
    such as the PGD `tf.while_loop` of an attack run in training mode; reads outside the replicas
    (checkpoints, saving, evaluation) see the mean over replicas. `Layer.add_weight` cannot set the
    synchronisation, hence this helper, which otherwise does what `add_weight` does.
    """
    with keras.name_scope(layer.name, caller=layer):
        variable = keras.Variable(
            initializer=keras.initializers.get(initializer), shape=shape, dtype="float32",
            trainable=False, autocast=False, aggregation="mean", synchronization="on_read",
            name=name,
        )
    layer._track_variable(variable)
    return variable


def check_momentum_and_epsilon(momentum, epsilon):
    """Raises a ValueError echoing the value unless 0 <= momentum < 1 and epsilon > 0."""
    if not 0.0 <= momentum < 1.0:
        raise ValueError(f"momentum must be in [0, 1), received momentum={momentum}.")
    if epsilon <= 0.0:
        raise ValueError(f"epsilon must be > 0, received epsilon={epsilon}.")


def check_branch(branch):
    """Raises a ValueError naming `branch` unless it is "clean", "adv" or "mixed"."""
    if branch not in CALL_BRANCHES:
        raise ValueError(
            f"branch must be one of {CALL_BRANCHES}, received branch={branch!r}."
        )


def split_mixed_batch(inputs):
    """Splits a mixed batch `[adv; clean]` into its two equal halves.

    A "mixed" call carries the adversarial examples first and their clean counterparts second,
    so that normalisation variants that pool statistics over both (shared statistics, cross
    normalisation) see the whole concatenated batch, as in the Dual-BN paper's hybrid AT.
    """
    # tf.split, not slicing: each slice's gradient would be a zero-padded copy of the whole batch.
    adv, clean = tf.split(inputs, 2, axis=0)
    return adv, clean


def _reduces_across_replicas(synchronized):
    context = tf.distribute.get_replica_context()
    return (
        synchronized
        and not _in_training_attack()
        and context is not None
        and context.num_replicas_in_sync > 1
    )


def channel_sum(inputs):
    """Per-channel sum over every axis but the last, accumulated in two levels.

    A 4-D batch is summed over each example's pixels first, then over the examples: float32
    round-off then grows with H*W + N instead of N*H*W (32,768 at batch 32 on CIFAR's first
    stage). It matters: a single-level float32 sum over that many elements, as TensorFlow's
    fused batch-norm kernel does on CPU (oneDNN), gets batch means and variances wrong by up to
    ~1e-3 relative; through twenty training-mode BNs the input gradient of a PGD step was off by
    2e-3 (relative L2 against float64) and the update's BN-bias gradients by 5e-3, where PyTorch's
    own float32 stays within 1e-5 of its float64. With two levels, arat_tf's step reproduces the
    ARAT authors' float64 numbers as closely as their float32 code does
    (tests/test_reference_fidelity.py).
    """
    if inputs.shape.rank == 4:
        return tf.reduce_sum(tf.reduce_sum(inputs, axis=[1, 2]), axis=0)
    return tf.reduce_sum(inputs, axis=list(range(inputs.shape.rank - 1)))


def element_count(inputs):
    """Elements per channel of a channels-last batch, as a float scalar."""
    return tf.cast(tf.size(inputs) // tf.shape(inputs)[-1], inputs.dtype)


def batch_moments(inputs, synchronized=False):
    """Mean, biased variance and element count per channel of a channels-last batch.

    Two passes (the mean, then the mean squared deviation from it), each summed with
    `channel_sum`. With `synchronized=True` inside a `tf.distribute` replica context with more
    than one replica, the sums are all-reduced so every replica normalises with the statistics of
    the global batch (except inside `training_attack()`); the variance is then
    E[x^2] - E[x]^2 of the global batch (one all-reduce instead of two).

    Args:
        inputs: float tensor `[batch, ..., channels]`.
        synchronized: whether to reduce the statistics across replicas.

    Returns:
        `(mean, variance, count)`: two `[channels]` tensors and a float scalar.
    """
    count = element_count(inputs)
    if _reduces_across_replicas(synchronized):
        context = tf.distribute.get_replica_context()
        total_sum, total_square_sum, count = context.all_reduce(
            tf.distribute.ReduceOp.SUM, [channel_sum(inputs), channel_sum(tf.square(inputs)), count]
        )
        mean = total_sum / count
        variance = tf.maximum(total_square_sum / count - tf.square(mean), 0.0)
        return mean, variance, count
    mean = channel_sum(inputs) / count
    variance = channel_sum(tf.square(inputs - tf.stop_gradient(mean))) / count
    return mean, variance, count


def unbiased(variance, count):
    """The biased batch variance with Bessel's correction, `n / (n - 1)`."""
    return variance * count / tf.maximum(count - 1.0, 1.0)


@functools.lru_cache(maxsize=None)
def _cpu_only():
    """Whether this process sees no GPU (then every op runs on the CPU)."""
    return not tf.config.list_physical_devices("GPU")


def _fused_gradient_applies(inputs):
    """Whether this BN call may be differentiated by TensorFlow's fused NHWC gradient kernel.

    Only inside a training attack (`training_attack()`), and only in a process without a GPU:
    `FusedBatchNormGradV3` in training mode takes the batch mean and the saved variance of the
    forward pass, the variance itself on CPU (TensorFlow's and oneDNN's kernels, and XLA on CPU)
    but the inverse standard deviation that cuDNN saves on GPU, so its meaning is certain only
    there. It sums in a single float32 level: measured on a batch of 128 its weight gradients are
    4x further from float64 than PyTorch's, which is why the weight update never uses it.
    """
    return inputs.shape.rank == 4 and _in_training_attack() and _cpu_only()


def _normalize_with_own_statistics(inputs, gamma, beta, epsilon):
    """Training-mode BN of an unsynchronised batch, with accurate statistics and a matching
    backward pass.

    Returns `(outputs, mean, biased_variance)`. The batch mean and variance are `channel_sum`s.
    The backward pass is the closed form of batch-norm's gradient,
    `dx = gamma / sigma * (dy - mean(dy) - xhat * mean(dy * xhat))`, with both means taken by
    `channel_sum` (autodiff of the forward would sum again over the broadcast axes in a single
    level). Inside a training attack on a CPU-only host (`_fused_gradient_applies`), a 4-D batch
    is instead normalised by TensorFlow's fused kernel in inference mode with those statistics
    and differentiated by its training-mode gradient kernel given the same statistics: one op
    each way, as fast as the fused training kernel (whose own statistics were the inaccurate
    part). The statistics outputs carry no gradient (they only feed the moving averages).
    """
    gamma = tf.convert_to_tensor(gamma)
    beta = tf.convert_to_tensor(beta)
    count = element_count(inputs)
    fused = _fused_gradient_applies(inputs)

    @tf.custom_gradient
    def normalize_batch(x, scale, offset):
        mean = channel_sum(x) / count
        if fused:
            # One op for (x - mean)^2 (the same float32 numbers as a subtraction and a square).
            variance = channel_sum(tf.math.squared_difference(x, mean)) / count
            outputs = tf.raw_ops.FusedBatchNormV3(
                x=x, scale=scale, offset=offset, mean=mean, variance=variance, epsilon=epsilon,
                is_training=False, data_format="NHWC")[0]

            def gradient(upstream, unused_mean_upstream, unused_variance_upstream):
                input_gradient, scale_gradient, offset_gradient, _, _ = (
                    tf.raw_ops.FusedBatchNormGradV3(
                        y_backprop=upstream, x=x, scale=scale, reserve_space_1=mean,
                        reserve_space_2=variance, reserve_space_3=tf.zeros([0]),
                        epsilon=epsilon, data_format="NHWC", is_training=True))
                return input_gradient, scale_gradient, offset_gradient

            return (outputs, tf.identity(mean), tf.identity(variance)), gradient

        centered = x - mean
        variance = channel_sum(tf.square(centered)) / count
        inverse_std = tf.math.rsqrt(variance + epsilon)
        normalized = centered * inverse_std
        outputs = normalized * scale + offset

        def closed_form_gradient(upstream, unused_mean_upstream, unused_variance_upstream):
            offset_gradient = channel_sum(upstream)
            scale_gradient = channel_sum(upstream * normalized)
            input_gradient = (scale * inverse_std) * (
                upstream - (offset_gradient + normalized * scale_gradient) / count
            )
            return input_gradient, scale_gradient, offset_gradient

        return (outputs, tf.identity(mean), tf.identity(variance)), closed_form_gradient

    outputs, mean, variance = normalize_batch(inputs, gamma, beta)
    return outputs, tf.stop_gradient(mean), tf.stop_gradient(variance)


def normalize_in_training(inputs, gamma, beta, epsilon, synchronized=False):
    """Normalises with the batch's own statistics (biased variance, as PyTorch).

    Unsynchronised batches go through `_normalize_with_own_statistics` (accurate two-level sums
    and a closed-form backward pass: ARAT's training-mode attack runs this at every BN site for
    every PGD step, so both its accuracy and its op count matter). Synchronised BN uses
    `batch_moments` and autodiff, which differentiates through the all-reduce.

    Args:
        inputs: float tensor `[batch, ..., channels]`.
        gamma: scale `[channels]`.
        beta: offset `[channels]`.
        epsilon: added to the variance.
        synchronized: reduce the statistics across replicas (see `batch_moments`).

    Returns:
        `(outputs, batch_mean, unbiased_batch_variance)`.
    """
    if _reduces_across_replicas(synchronized):
        mean, variance, count = batch_moments(inputs, synchronized)
        outputs = normalize(inputs, mean, variance, gamma, beta, epsilon)
        return outputs, mean, unbiased(variance, count)
    outputs, mean, variance = _normalize_with_own_statistics(inputs, gamma, beta, epsilon)
    return outputs, mean, unbiased(variance, element_count(inputs))


def update_moving_statistics(moving_mean, moving_variance, mean, unbiased_variance, momentum):
    """Exponential moving average update, PyTorch-style (with the unbiased batch variance).

    Args:
        moving_mean: variable `[channels]`.
        moving_variance: variable `[channels]`.
        mean: batch mean `[channels]`.
        unbiased_variance: batch variance with Bessel's correction `[channels]`.
        momentum: Keras convention: `new = momentum * old + (1 - momentum) * batch`
            (PyTorch's momentum 0.1 is Keras' 0.9).
    """
    moving_mean.assign(moving_mean * momentum + mean * (1.0 - momentum))
    moving_variance.assign(moving_variance * momentum + unbiased_variance * (1.0 - momentum))


def normalize(inputs, mean, variance, gamma, beta, epsilon):
    """`gamma * (inputs - mean) / sqrt(variance + epsilon) + beta`."""
    return tf.nn.batch_normalization(inputs, mean, variance, beta, gamma, epsilon)

"""Batch moments and moving-average updates shared by the branch-aware normalisation layers.

Both `SplitBatchNormalization` and `CrossBatchNormalization` normalise with batch statistics in
training and moving statistics in inference, exactly like PyTorch's `BatchNorm2d` (the ARAT and Dual-BN
authors' framework): the moving variance is updated with the *unbiased* batch variance
(n / (n - 1) correction) while the batch itself is normalised with the biased one.
"""

import contextlib
import threading

import keras
import tensorflow as tf

BRANCHES = ("clean", "adv")
MIXED = "mixed"
CALL_BRANCHES = BRANCHES + (MIXED,)


_REPLICA_LOCAL = threading.local()


@contextlib.contextmanager
def replica_local_statistics():
    """Within this context (at trace time), synchronised BN layers use per-replica batch statistics.

    A training-mode attack (the ARAT authors' protocol) runs BN inside the PGD `tf.while_loop`, and
    `tf.distribute.MirroredStrategy` cannot all-reduce inside control flow (on CPU, and on GPU without
    XLA, every cross-replica reduction is a `merge_call`). The attack therefore normalises with each
    replica's own batch statistics, which is also what the authors' PyTorch `DataParallel` does;
    the training forward pass outside the loop stays synchronised.
    """
    previous = getattr(_REPLICA_LOCAL, "active", False)
    _REPLICA_LOCAL.active = True
    try:
        yield
    finally:
        _REPLICA_LOCAL.active = previous


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
        and not getattr(_REPLICA_LOCAL, "active", False)
        and context is not None
        and context.num_replicas_in_sync > 1
    )


def batch_moments(inputs, synchronized=False):
    """Mean, biased variance and element count per channel of a channels-last batch.

    With `synchronized=True` inside a `tf.distribute` replica context with more than one replica,
    the sums are all-reduced so every replica normalises with the statistics of the global batch
    (except inside `replica_local_statistics()`).

    Args:
        inputs: float tensor `[batch, ..., channels]`.
        synchronized: whether to reduce the statistics across replicas.

    Returns:
        `(mean, variance, count)`: two `[channels]` tensors and a float scalar.
    """
    axes = list(range(len(inputs.shape) - 1))
    count = tf.cast(tf.size(inputs) // tf.shape(inputs)[-1], inputs.dtype)
    if _reduces_across_replicas(synchronized):
        context = tf.distribute.get_replica_context()
        local_sum = tf.reduce_sum(inputs, axis=axes)
        local_square_sum = tf.reduce_sum(tf.square(inputs), axis=axes)
        total_sum, total_square_sum, count = context.all_reduce(
            tf.distribute.ReduceOp.SUM, [local_sum, local_square_sum, count]
        )
        mean = total_sum / count
        variance = tf.maximum(total_square_sum / count - tf.square(mean), 0.0)
        return mean, variance, count
    mean, variance = tf.nn.moments(inputs, axes=axes)
    return mean, variance, count


def unbiased(variance, count):
    """The biased batch variance with Bessel's correction, `n / (n - 1)`."""
    return variance * count / tf.maximum(count - 1.0, 1.0)


def normalize_in_training(inputs, gamma, beta, epsilon, synchronized=False):
    """Normalises with the batch's own statistics.

    Unsynchronised NHWC batches use TensorFlow's fused kernel: one op forward and one backward
    instead of a dozen element-wise ones, which matters because ARAT's training-mode attack runs
    this at every BN site for every PGD step. Other inputs (dense features, synchronised BN) use
    `batch_moments`. Both normalise with the biased variance and return the unbiased one.

    Args:
        inputs: float tensor `[batch, ..., channels]`.
        gamma: scale `[channels]`.
        beta: offset `[channels]`.
        epsilon: added to the variance.
        synchronized: reduce the statistics across replicas (see `batch_moments`).

    Returns:
        `(outputs, batch_mean, unbiased_batch_variance)`.
    """
    if inputs.shape.rank == 4 and not _reduces_across_replicas(synchronized):
        return tf.compat.v1.nn.fused_batch_norm(
            inputs, gamma, beta, epsilon=epsilon, data_format="NHWC", is_training=True
        )
    mean, variance, count = batch_moments(inputs, synchronized)
    outputs = normalize(inputs, mean, variance, gamma, beta, epsilon)
    return outputs, mean, unbiased(variance, count)


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

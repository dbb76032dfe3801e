"""Per-example attack losses: `loss_fn(logits, target) -> [B]`.

Every loss returns one value per example rather than a batch mean. The attack loop sums them
(see `iterative_attack`), and training and evaluation code can reduce them however they need.
Logits are cast to float32 so the losses are stable under mixed precision.
"""

import tensorflow as tf


def _logits_and_labels(logits, labels):
    logits = tf.cast(logits, tf.float32)
    labels = tf.reshape(tf.cast(labels, tf.int32), tf.shape(logits)[:-1])
    return logits, labels


def cross_entropy(logits, labels):
    """Sparse softmax cross-entropy from logits, one value per example.

    Args:
      logits: float tensor [B, C].
      labels: integer class ids, shape [B] (a trailing [B, 1] is accepted too).

    Returns:
      float32 tensor [B].

    Example:
      >>> cross_entropy([[0.0, 0.0]], [1]).numpy()  # log(2)
      array([0.6931472], dtype=float32)
    """
    logits, labels = _logits_and_labels(logits, labels)
    return tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits)


def cw_margin(logits, labels):
    """The Carlini-Wagner margin `max_{j != y} z_j - z_y`, one value per example.

    It is positive exactly when the example is misclassified, so maximising it drives the
    prediction away from the label. Unlike cross-entropy it does not saturate once the true
    class is confidently predicted, which is why it is the usual second attack in evaluations.

    Args:
      logits: float tensor [B, C] with C >= 2.
      labels: integer class ids, shape [B] (a trailing [B, 1] is accepted too).

    Returns:
      float32 tensor [B].

    Example:
      >>> cw_margin([[1.0, 3.0, 2.0]], [1]).numpy()
      array([-1.], dtype=float32)
    """
    logits, labels = _logits_and_labels(logits, labels)
    is_true = tf.one_hot(labels, tf.shape(logits)[-1], on_value=True, off_value=False, dtype=tf.bool)
    true_logit = tf.reduce_sum(tf.where(is_true, logits, tf.zeros_like(logits)), axis=-1)
    best_other = tf.reduce_max(tf.where(is_true, tf.fill(tf.shape(logits), logits.dtype.min), logits), axis=-1)
    return best_other - true_logit


def kl_divergence(logits, reference_logits):
    """`KL(softmax(reference) || softmax(logits))` summed over classes, one value per example.

    This is the TRADES attack loss with the clean logits as reference. The reference is wrapped in
    `tf.stop_gradient`: the attack only moves the adversarial input, and the TRADES training loss
    decides for itself whether gradients flow into the clean branch.

    Args:
      logits: float tensor [B, C], the logits on the perturbed input.
      reference_logits: float tensor [B, C], typically the logits on the clean input.

    Returns:
      float32 tensor [B], zero where the two distributions agree.

    Example:
      >>> z = [[1.0, 2.0, 3.0]]
      >>> kl_divergence(z, z).numpy()
      array([0.], dtype=float32)
    """
    logits = tf.cast(logits, tf.float32)
    reference = tf.stop_gradient(tf.cast(reference_logits, tf.float32))
    log_p = tf.nn.log_softmax(reference, axis=-1)
    log_q = tf.nn.log_softmax(logits, axis=-1)
    return tf.reduce_sum(tf.exp(log_p) * (log_p - log_q), axis=-1)


ATTACK_LOSSES = {"ce": cross_entropy, "cw": cw_margin, "kl": kl_divergence}

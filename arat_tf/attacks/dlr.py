"""The Difference of Logits Ratio (DLR) losses of Croce & Hein (ICML 2020), one value per example.

DLR is a margin loss divided by the spread of the top logits. Dividing makes it invariant to
shifting and rescaling the logits, so an attack using it cannot be fooled by a model that simply
blows up or squashes its logits (which makes cross-entropy gradients vanish or saturate).

* `dlr_loss`: `-(z_y - max_{i != y} z_i) / (z_pi1 - z_pi3 + 1e-12)`, untargeted (>= 3 classes).
* `targeted_dlr_loss`: `-(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2 + 1e-12)`, targeted at
  class t (>= 4 classes).

Here `pi` orders the logits of each example descending, so `z_pi1` is the largest logit and
`z_pi3` the third largest. Both losses are to be MAXIMISED by an attack: the untargeted one is
positive exactly when the example is misclassified.
"""

import tensorflow as tf

_DENOMINATOR_FLOOR = 1e-12


def _prepare(logits, labels, min_classes, name):
    logits = tf.cast(logits, tf.float32)
    num_classes = logits.shape[-1]
    if num_classes is not None and num_classes < min_classes:
        raise ValueError(f"{name} needs at least {min_classes} classes, got logits with {num_classes}")
    labels = tf.reshape(tf.cast(labels, tf.int32), tf.shape(logits)[:-1])
    return logits, labels


def _class_logit(logits, labels):
    """`logits[i, labels[i]]` for every example i."""
    return tf.gather(logits, labels, axis=-1, batch_dims=1)


def dlr_loss(logits, labels):
    """The untargeted DLR loss `-(z_y - max_{i != y} z_i) / (z_pi1 - z_pi3 + 1e-12)`.

    Args:
      logits: float tensor [B, C] with C >= 3.
      labels: integer class ids, shape [B] (a trailing [B, 1] is accepted too).

    Returns:
      float32 tensor [B]; positive exactly where the example is misclassified.

    Raises:
      ValueError: if the logits have fewer than 3 classes.

    Example:
      >>> dlr_loss([[1.0, 3.0, 2.0]], [1]).numpy()  # -(3 - 2) / (3 - 1)
      array([-0.5], dtype=float32)
    """
    logits, labels = _prepare(logits, labels, 3, "dlr_loss")
    is_true = tf.one_hot(labels, tf.shape(logits)[-1], on_value=True, off_value=False, dtype=tf.bool)
    true_logit = _class_logit(logits, labels)
    best_other = tf.reduce_max(tf.where(is_true, tf.fill(tf.shape(logits), logits.dtype.min), logits), axis=-1)
    top = tf.math.top_k(logits, k=3, sorted=True).values
    return -(true_logit - best_other) / (top[..., 0] - top[..., 2] + _DENOMINATOR_FLOOR)


def targeted_dlr_loss(logits, labels, target_labels):
    """The targeted DLR loss `-(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2 + 1e-12)`.

    Maximising it pushes the target logit `z_t` above the true logit `z_y`.

    Args:
      logits: float tensor [B, C] with C >= 4.
      labels: true integer class ids y, shape [B] (or [B, 1]).
      target_labels: target integer class ids t, shape [B] (or [B, 1]).

    Returns:
      float32 tensor [B].

    Raises:
      ValueError: if the logits have fewer than 4 classes.

    Example:
      >>> targeted_dlr_loss([[4.0, 1.0, 3.0, 0.0]], [0], [2]).numpy()  # -(4 - 3) / (4 - (1 + 0) / 2)
      array([-0.2857143], dtype=float32)
    """
    logits, labels = _prepare(logits, labels, 4, "targeted_dlr_loss")
    target_labels = tf.reshape(tf.cast(target_labels, tf.int32), tf.shape(logits)[:-1])
    top = tf.math.top_k(logits, k=4, sorted=True).values
    denominator = top[..., 0] - 0.5 * (top[..., 2] + top[..., 3]) + _DENOMINATOR_FLOOR
    return -(_class_logit(logits, labels) - _class_logit(logits, target_labels)) / denominator

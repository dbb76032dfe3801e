"""Gradient conflict between the classification loss and the invariance loss (ARAT, section 1).

ARAT's first diagnosis: with a symmetric invariance loss, its gradient on the shared weights
points against the classification loss' gradient. Two numbers measure it, over the conv/dense
kernels, per layer and overall (the flattened concatenation of all kernels):

- cosine similarity of the two gradients (negative = the losses pull the weights apart);
- conflict ratio: the fraction of weight entries whose two gradient components have strictly
  opposite signs. Entries where either gradient is exactly zero have no direction to conflict
  with and are left out of the fraction (they appear in `entries` but not in
  `entries_compared`): a layer the invariance loss does not reach (e.g. the last dense layer,
  after ARAT's taps) would otherwise dilute the overall ratio towards 0.

Both are `None` (JSON null) where undefined: a zero gradient has no cosine, and a layer with no
entry where both gradients are non-zero has no conflict ratio.
"""

import keras
import numpy as np
import tensorflow as tf

from arat_tf.analysis.loss_parts import split_objective
from arat_tf.analysis.model_state import preserved_state
from arat_tf.analysis.training_attack import TrainingAdversary


KERNEL_LAYERS = (keras.layers.Conv1D, keras.layers.Conv2D, keras.layers.Conv3D,
                 keras.layers.DepthwiseConv2D, keras.layers.Dense)


def _flat(gradients):
    """One float64 vector from an array, a sequence of arrays or a dict of arrays (in order)."""
    if isinstance(gradients, dict):
        gradients = list(gradients.values())
    if isinstance(gradients, (list, tuple)):
        if not gradients:
            return np.zeros([0])
        return np.concatenate([np.asarray(g, dtype=np.float64).reshape(-1) for g in gradients])
    return np.asarray(gradients, dtype=np.float64).reshape(-1)


def _flat_pair(gradients_a, gradients_b):
    a, b = _flat(gradients_a), _flat(gradients_b)
    if a.shape != b.shape:
        raise ValueError(
            f"The two gradients must have the same number of entries, received {a.size} and {b.size}."
        )
    return a, b


def cosine_similarity(gradients_a, gradients_b):
    """`a.b / (|a| |b|)` over all entries (flattened and concatenated); None if either is zero.

    Args:
        gradients_a, gradients_b: arrays, or matching sequences/dicts of arrays.
    """
    a, b = _flat_pair(gradients_a, gradients_b)
    norms = np.linalg.norm(a) * np.linalg.norm(b)
    if norms == 0.0:
        return None
    return float(np.dot(a, b) / norms)


def conflict_ratio(gradients_a, gradients_b):
    """Fraction of entries with strictly opposite signs among entries where both are non-zero.

    Args:
        gradients_a, gradients_b: arrays, or matching sequences/dicts of arrays.

    Returns:
        A float in [0, 1], or None when no entry has both gradients non-zero.
    """
    a, b = _flat_pair(gradients_a, gradients_b)
    compared = np.count_nonzero((a != 0.0) & (b != 0.0))
    if compared == 0:
        return None
    return float(np.count_nonzero(a * b < 0.0) / compared)


def _comparison(classification, invariance):
    a, b = _flat_pair(classification, invariance)
    return {
        "cosine": cosine_similarity(a, b),
        "conflict_ratio": conflict_ratio(a, b),
        "classification_norm": float(np.linalg.norm(a)),
        "invariance_norm": float(np.linalg.norm(b)),
        "entries": int(a.size),
        "entries_compared": int(np.count_nonzero((a != 0.0) & (b != 0.0))),
    }


def compare_gradients(classification_gradients, invariance_gradients):
    """Cosine, conflict ratio and norms of two gradients, per layer and overall.

    Args:
        classification_gradients, invariance_gradients: dicts `{layer name: array}` with the same
            keys (in the same order) and shapes.

    Returns:
        `{"overall": {...}, "per_layer": {name: {...}}}`, each with `cosine`, `conflict_ratio`,
        `classification_norm`, `invariance_norm`, `entries`, `entries_compared`.
    """
    if list(classification_gradients) != list(invariance_gradients):
        raise ValueError(
            f"The two gradients must cover the same layers, received {list(classification_gradients)}"
            f" and {list(invariance_gradients)}."
        )
    return {
        "overall": _comparison(classification_gradients, invariance_gradients),
        "per_layer": {
            name: _comparison(classification_gradients[name], invariance_gradients[name])
            for name in classification_gradients
        },
    }


def conv_dense_kernels(classifier):
    """`{layer name: kernel variable}` of every Conv2D/Dense layer of `classifier`, in network order.

    Only the kernels: they are the "conv/dense weights" the paper measures, the weights both branches
    share and both losses train. BN gamma/beta (per branch, so the invariance gradient reaches
    only the adversarial branch's under the asymmetric loss) and the predictor heads (trained only
    by the invariance loss) would add entries where one gradient is zero by construction; biases
    are a negligible fraction of the entries. Names are the kernel paths without the model prefix
    and the "/kernel" suffix, e.g. "block4.0/conv1".
    """
    kernel_ids = {
        id(layer.kernel)
        for layer in classifier._flatten_layers(include_self=False)  # pylint: disable=protected-access
        if isinstance(layer, KERNEL_LAYERS)
    }
    kernels = {}
    prefix = f"{classifier.name}/"
    for variable in classifier.trainable_variables:
        if id(variable) in kernel_ids:
            name = variable.path
            name = name[len(prefix):] if name.startswith(prefix) else name
            name = name[: -len("/kernel")] if name.endswith("/kernel") else name
            kernels[name] = variable
    return kernels


def mean_over_batches(comparisons):
    """Averages `compare_gradients` results of several batches, field by field (None skipped).

    The analysis averages per-batch values rather than comparing gradients summed over batches:
    training takes one step per mini-batch, so the conflict it experiences is the per-batch one.
    """
    if not comparisons:
        raise ValueError("mean_over_batches needs at least one comparison.")

    def mean_fields(records):
        merged = {}
        for key in records[0]:
            values = [r[key] for r in records if r[key] is not None]
            if key in ("entries", "entries_compared"):
                merged[key] = records[0][key] if key == "entries" else int(np.mean(values))
            else:
                merged[key] = float(np.mean(values)) if values else None
        return merged

    merged = {
        "overall": mean_fields([c["overall"] for c in comparisons]),
        "per_layer": {
            name: mean_fields([c["per_layer"][name] for c in comparisons])
            for name in comparisons[0]["per_layer"]
        },
    }
    if all("losses" in c for c in comparisons):
        merged["losses"] = mean_fields([c["losses"] for c in comparisons])
    return merged


class GradientConflictProbe:
    """Gradients of the classification and invariance parts of a trainer's objective, compared.

    One probe per trainer: the gradient function is compiled once (`tf.function`; TF 2.20's
    oneDNN can crash in eager gradient loops) and reused for every batch and, as a callback,
    every N training steps. The forward pass is the training one (`trainer.compute_losses`, BN in
    training mode, both branches as the method routes them) on the method's own training attack,
    so the gradients are the two parts of the very update `train_step` applies. Model state
    (BN moving statistics) is restored afterwards (`preserved_state`).

    Args:
        trainer: an `AdversarialTrainer` whose method has an invariance term (`split_objective`).

    Raises:
        NoInvarianceTermError: PGD-AT, hybrid AT, Cross-AT.

    Example:

    >>> probe = GradientConflictProbe(trainer)
    >>> probe(images, labels)["overall"]["cosine"]
    """

    def __init__(self, trainer):
        split_objective(trainer, {name: 0.0 for name in trainer.loss_term_names})  # fails early
        self.trainer = trainer
        self.kernels = conv_dense_kernels(trainer.classifier)
        self.adversary = TrainingAdversary(trainer)
        self._gradients = tf.function(self._part_gradients, reduce_retracing=True)

    def _part_gradients(self, images, adversarial_images, labels):
        variables = list(self.kernels.values())
        with tf.GradientTape(persistent=True) as tape:
            _, terms, _, _ = self.trainer.compute_losses(images, adversarial_images, labels)
            classification, invariance = split_objective(self.trainer, terms)
        # A kernel a loss does not reach (e.g. the last dense layer for ARAT's invariance) gets
        # None; it is a zero gradient (Keras variables break `unconnected_gradients=ZERO`).
        classification_gradients, invariance_gradients = (
            [tf.zeros(v.shape, "float32") if g is None else g
             for v, g in zip(variables, tape.gradient(loss, variables))]
            for loss in (classification, invariance)
        )
        del tape
        return classification, invariance, classification_gradients, invariance_gradients

    def __call__(self, images, labels, adversarial_images=None):
        """Compares the two gradients on one batch.

        Args:
            images: clean images in [0, 1].
            labels: integer labels.
            adversarial_images: training adversarial examples of `images`; crafted with the
                trainer's training attack when None.

        Returns:
            `compare_gradients(...)` plus `"losses": {"classification": ..., "invariance": ...}`.
        """
        images = tf.convert_to_tensor(images, tf.float32)
        labels = tf.cast(labels, tf.int32)
        if adversarial_images is None:
            adversarial_images = self.adversary(images, labels)
        with preserved_state(self.trainer):
            classification, invariance, classification_gradients, invariance_gradients = (
                self._gradients(images, tf.convert_to_tensor(adversarial_images, tf.float32), labels)
            )
        names = list(self.kernels)
        result = compare_gradients(
            {n: g.numpy() for n, g in zip(names, classification_gradients)},
            {n: g.numpy() for n, g in zip(names, invariance_gradients)},
        )
        result["losses"] = {"classification": float(classification), "invariance": float(invariance)}
        return result


def gradient_conflict(trainer, images, labels, adversarial_images=None):
    """`GradientConflictProbe(trainer)(images, labels, adversarial_images)`: one-off convenience
    (compiles the gradient function on every call: reuse a probe for several batches)."""
    return GradientConflictProbe(trainer)(images, labels, adversarial_images)

"""The Dual-BN study: accuracy with every combination of normalisation statistics and affine
parameters taken from the clean or the adversarial branch (the Dual-BN paper's test-time analysis,
docs/method.md section 2: do the statistics (NS) or the affine parameters (AP) carry robustness?).

| statistics \\ affine | clean | adv |
|---|---|---|
| clean | the clean branch | clean NS, adversarial AP |
| adv   | adversarial NS, clean AP | the adversarial branch (ARAT's reported model) |

A combination with statistics from branch S and affine parameters from branch A is the model
called with `branch=S`, with the affine parameters swapped in place when A != S
(`swap_branch_parameters`), then swapped back, even on error.
"""

import contextlib

import numpy as np
import tensorflow as tf

from arat_tf.evaluation import evaluate_robustness
from arat_tf.evaluation.branches import split_layers, swap_branch_parameters

BRANCHES = ("clean", "adv")


class NoSplitBatchNormError(ValueError):
    """The model has no BN site with separate clean and adversarial parameters."""


@contextlib.contextmanager
def swapped_branch_parameters(classifier, kind):
    """Within the block, the clean and adversarial branches' `kind` ("affine" or "statistics")
    parameters are exchanged; they are swapped back on exit, even on error (swapping twice
    restores the model exactly). Yields the number of BN layers swapped."""
    count = swap_branch_parameters(classifier, kind)
    try:
        yield count
    finally:
        swap_branch_parameters(classifier, kind)


def _accuracy(forward, dataset):
    correct = total = 0
    for images, labels in dataset:
        predictions = tf.argmax(forward(tf.convert_to_tensor(images, tf.float32)), axis=-1,
                                output_type=tf.int32)
        correct += int(tf.reduce_sum(tf.cast(predictions == tf.cast(labels, tf.int32), tf.int32)))
        total += int(labels.shape[0])
    return correct / max(total, 1)


def dual_bn_study(classifier, dataset, attacks=(), *, eps=8 / 255, norm="linf", seed=0):
    """Accuracy of the four statistics x affine combinations.

    Args:
        classifier: a `BranchedClassifier` with split BN (dual, shared_stats or shared_affine:
            with one kind shared, the combinations differing only in it coincide).
        dataset: batched `(images in [0, 1], labels)`.
        attacks: `EvaluationAttack`s (`resolve_attacks(["pgd10"], ...)`); empty: clean accuracy only.
            Each combination is attacked white-box, as the model it is.
        eps, norm, seed: threat model and seed of the attacks.

    Returns:
        `{"combinations": [{"statistics", "affine", "clean_accuracy"[, "robust_accuracy"]}, ...],
        "split_statistics": bool, "split_affine": bool, "attacks": [names]}`.

    Raises:
        NoSplitBatchNormError: the model has a single, shared BN (or cross normalisation).
    """
    split_statistics = bool(split_layers(classifier, "statistics"))
    split_affine = bool(split_layers(classifier, "affine"))
    if not (split_statistics or split_affine):
        raise NoSplitBatchNormError(
            f"{classifier.name} (bn_mode={getattr(classifier, 'bn_mode', '?')}) has no BN site with "
            "separate clean and adversarial parameters: the Dual-BN study needs bn_mode dual, "
            "shared_stats or shared_affine."
        )
    forwards = {
        branch: tf.function(lambda images, branch=branch: classifier(images, training=False,
                                                                     branch=branch))
        for branch in BRANCHES
    }
    combinations = []
    for statistics in BRANCHES:
        for affine in BRANCHES:
            with contextlib.ExitStack() as stack:
                if affine != statistics:
                    stack.enter_context(swapped_branch_parameters(classifier, "affine"))
                forward = forwards[statistics]
                record = {"statistics": statistics, "affine": affine}
                if attacks:
                    report = evaluate_robustness(forward, dataset, list(attacks), eps=eps, norm=norm,
                                                 seed=seed, progress=False)
                    record["clean_accuracy"] = report["clean_accuracy"]
                    record["robust_accuracy"] = report["robust_accuracy"]
                else:
                    record["clean_accuracy"] = _accuracy(forward, dataset)
                combinations.append(record)
    return {
        "combinations": combinations,
        "split_statistics": split_statistics,
        "split_affine": split_affine,
        "attacks": [attack.name for attack in attacks],
        "eps": float(eps) if attacks else None,
    }


def combination_grid(study, metric):
    """The study's `metric` as a 2x2 array: rows = statistics (clean, adv), columns = affine."""
    grid = np.full((2, 2), np.nan)
    for record in study["combinations"]:
        if record.get(metric) is not None:
            grid[BRANCHES.index(record["statistics"]), BRANCHES.index(record["affine"])] = record[metric]
    return grid

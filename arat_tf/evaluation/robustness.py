"""`evaluate_robustness`: clean accuracy, then each attack on the examples still unbroken."""

import time

import keras
import numpy as np
import tensorflow as tf

from arat_tf.evaluation import sanity


def _check_inside_ball(x_adv, x, eps, norm, attack_name):
    """The threat model is part of the result: an attack that leaves the ball or [0, 1] is a bug."""
    delta = (x_adv - x).numpy().reshape(len(x), -1)
    size = np.abs(delta).max(axis=1) if norm == "linf" else np.linalg.norm(delta, axis=1)
    tolerance = 1e-5 if norm == "linf" else 1e-4
    x_adv = x_adv.numpy()
    if (size > eps + tolerance).any() or x_adv.min() < -1e-6 or x_adv.max() > 1 + 1e-6:
        raise RuntimeError(
            f"{attack_name} returned points outside the {norm} ball of radius {eps} or [0, 1] "
            f"(max perturbation {size.max():.6g}); refusing to report its result."
        )


def evaluate_robustness(forward, dataset, attacks, *, eps, norm="linf", seed=0, progress=True):
    """Robust accuracy as the per-example worst case over `attacks`, run in order.

    Each attack only sees the examples that are correctly classified and unbroken by every earlier
    attack (AutoAttack's protocol), so robust accuracy never exceeds clean accuracy and never
    increases from one attack to the next. Success is re-checked on the returned points, and points
    outside the threat model are refused.

    Args:
        forward: `images -> logits`, the model in inference mode (reuse one function: attacks
            cache their compiled graphs per `forward`).
        dataset: batched `(images in [0, 1], labels)`.
        attacks: `EvaluationAttack`s (see `attack_suite.resolve_attacks`).
        eps: perturbation budget.
        norm: "linf" or "l2".
        seed: base random seed (each batch and attack gets its own, reproducibly).
        progress: show a Keras progress bar over batches.

    Returns:
        A dict: `n_examples`, `clean_accuracy`, `robust_accuracy`, `attacks` (per attack: name,
        robust accuracy after it, examples attacked, examples broken, seconds, white_box) and
        `warnings` (sanity checks).
    """
    # By position, not by name: the same attack may be listed twice (e.g. apgd-ce,autoattack).
    totals = [{"examples_attacked": 0, "examples_broken": 0, "seconds": 0.0} for _ in attacks]
    robust_after = [0 for _ in attacks]
    n_examples = n_clean = 0
    warnings = []
    cardinality = int(dataset.cardinality())
    progress_bar = keras.utils.Progbar(cardinality if cardinality > 0 else None,
                                       verbose=1 if progress else 0, unit_name="batch")
    for batch_index, (images, labels) in enumerate(dataset):
        images = tf.convert_to_tensor(images, tf.float32)
        labels = tf.cast(labels, tf.int32)
        logits = forward(images)
        if batch_index == 0:
            warnings += sanity.check_outputs_are_logits(logits)
            warnings += sanity.check_input_gradients(forward, images, labels)
            warnings += sanity.check_deterministic(forward, images)
        robust = (tf.argmax(logits, axis=-1, output_type=tf.int32) == labels).numpy()
        n_examples += len(robust)
        n_clean += int(robust.sum())
        for attack_index, attack in enumerate(attacks):
            indices = np.flatnonzero(robust)
            if len(indices):
                x, y = tf.gather(images, indices), tf.gather(labels, indices)
                start = time.perf_counter()
                x_adv, _ = attack.run(forward, x, y, eps, norm, seed + 1000 * batch_index + attack_index)
                x_adv = tf.convert_to_tensor(x_adv, tf.float32)
                totals[attack_index]["seconds"] += time.perf_counter() - start
                _check_inside_ball(x_adv, x, eps, norm, attack.name)
                broken = (tf.argmax(forward(x_adv), axis=-1, output_type=tf.int32) != y).numpy()
                robust[indices[broken]] = False
                totals[attack_index]["examples_attacked"] += len(indices)
                totals[attack_index]["examples_broken"] += int(broken.sum())
            robust_after[attack_index] += int(robust.sum())
        progress_bar.add(1, values=[("clean", n_clean / n_examples),
                                    ("robust", robust_after[-1] / n_examples)])
    results = [
        {"name": attack.name, "robust_accuracy": robust_after[index] / max(n_examples, 1),
         "white_box": attack.white_box, **totals[index]}
        for index, attack in enumerate(attacks)
    ]
    warnings += sanity.check_black_box_not_stronger(results)
    return {
        "n_examples": n_examples,
        "clean_accuracy": n_clean / max(n_examples, 1),
        "robust_accuracy": robust_after[-1] / max(n_examples, 1),
        "attacks": results,
        "warnings": warnings,
    }


def format_report(report):
    """The report as a plain-text table for stdout."""
    header = f"{report.get('variant', report.get('branch', ''))}  ({report.get('suite', '')}, " \
             f"{report['norm']} eps={report['eps']:.5g}, {report['n_examples']} examples)"
    lines = [header, f"{'attack':<16}{'robust acc':>12}{'attacked':>10}{'broken':>8}{'seconds':>10}"]
    lines.append(f"{'clean':<16}{report['clean_accuracy']:>12.2%}{report['n_examples']:>10}"
                 f"{'':>8}{'':>10}")
    for result in report["attacks"]:
        lines.append(f"{result['name']:<16}{result['robust_accuracy']:>12.2%}"
                     f"{result['examples_attacked']:>10}{result['examples_broken']:>8}"
                     f"{result['seconds']:>10.1f}")
    lines.append(f"{'robust (worst)':<16}{report['robust_accuracy']:>12.2%}")
    for warning in report["warnings"]:
        lines.append(f"WARNING: {warning}")
    return "\n".join(lines)

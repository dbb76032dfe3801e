"""Checks that catch evaluations which only look robust (Carlini et al.'s and AutoAttack's lists).

Each check returns a list of warning strings (empty when the check passes); the evaluator prints
them in its report and stores them in the JSON.
"""

import numpy as np
import tensorflow as tf


def check_outputs_are_logits(outputs):
    """Warns when every row is non-negative and sums to 1: the model returns probabilities, and
    attacks on probabilities suffer vanishing gradients (robustness would be overestimated)."""
    outputs = np.asarray(outputs, dtype=np.float64)
    sums_to_one = np.allclose(outputs.sum(axis=-1), 1.0, atol=1e-4)
    if sums_to_one and (outputs >= 0).all():
        return ["Model outputs are non-negative and sum to 1 per example: they look like "
                "probabilities. Attacks must run on logits; remove the final softmax."]
    return []


def check_input_gradients(forward, images, labels):
    """Warns about zero or non-finite cross-entropy gradients w.r.t. the input (gradient masking:
    stop_gradient, quantisation, non-differentiable preprocessing)."""
    @tf.function  # as a graph: see arat_tf.attacks.graph_mode on eager gradient loops
    def input_gradient(images, labels):
        with tf.GradientTape() as tape:
            tape.watch(images)
            loss = tf.reduce_sum(tf.nn.sparse_softmax_cross_entropy_with_logits(
                labels=tf.cast(labels, tf.int32), logits=forward(images)))
        return tape.gradient(loss, images)

    gradient = input_gradient(tf.convert_to_tensor(images, tf.float32), labels)
    if gradient is None:
        return ["The loss has no gradient w.r.t. the input at all: white-box attacks cannot work "
                "(non-differentiable model or stop_gradient); robust accuracy is not trustworthy."]
    gradient = gradient.numpy()
    warnings = []
    if not np.isfinite(gradient).all():
        warnings.append("Non-finite input gradients (NaN/inf): white-box attacks are unreliable.")
    per_example = np.abs(gradient).reshape(len(gradient), -1).max(axis=1)
    zero_fraction = float(np.mean(per_example == 0.0))
    if zero_fraction > 0:
        warnings.append(
            f"{zero_fraction:.0%} of examples have an exactly zero input gradient (gradient "
            f"masking, e.g. saturated softmax or quantised inputs): white-box attacks see nothing."
        )
    return warnings


def check_deterministic(forward, images):
    """Warns when two calls on the same input give different logits (randomised defences need
    EOT attacks; a single-sample evaluation overestimates them)."""
    first = np.asarray(forward(images))
    second = np.asarray(forward(images))
    difference = float(np.max(np.abs(first - second)))
    if difference > 1e-5:
        return [f"Logits differ between two calls on the same input (max |diff| = "
                f"{difference:.3g}): the model is randomised; use an EOT evaluation."]
    return []


def check_black_box_not_stronger(attack_results):
    """Warns when a query-only attack breaks examples that every earlier white-box attack failed on."""
    seen_white_box = False
    warnings = []
    for result in attack_results:
        if result["white_box"]:
            seen_white_box = True
        elif seen_white_box and result["examples_broken"] > 0:
            warnings.append(
                f"The black-box attack {result['name']} broke {result['examples_broken']} examples "
                f"that the white-box attacks could not: a sign of gradient masking."
            )
    return warnings

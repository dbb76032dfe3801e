"""Argmax decisions compared so that the comparison holds whatever the float32 rounding.

Two evaluations of the same model on the same input give logits that differ by round-off when they
run different kernels: another batch shape, eager vs `tf.function` (grappler fuses ops there), a
SavedModel in another process, another CPU (oneDNN picks kernels per ISA and per shape). Measured
on the test models: at most 1.5e-6 on logits of magnitude <= 5 (the prototype MLP, retrained under
ONEDNN_MAX_CPU_ISA=AVX2 and SSE41) and 1.2e-7 on logits of magnitude <= 0.6 (ResNet-10: eager vs
graph, SSE41 and TF_ENABLE_ONEDNN_OPTS=0), i.e. <= 3e-7 relative. An example whose label logit is
that close to the best other logit may be classified either way by a correct implementation, and
attacks such as FAB return points exactly there (one at a margin of 6e-6 in test_evaluation).

So a decision is "clear" when the label's margin exceeds `tolerance(logits)` = NEAR_TIE times the
logits' magnitude (at least 1): >= 300 times the relative round-off above, yet below every clean
margin the tests rely on (the ResNets' clean examples are decided by >= 1e-2 at magnitude < 1,
the prototype MLP's by >= 1.3). Clear decisions must agree exactly; only near-ties may go either
way, and they must stay a small minority (at most max(2, 10%)) so the comparison keeps its meaning.
The comparisons assert nothing weaker than exact equality when there is no near-tie.
"""

import numpy as np

NEAR_TIE = 1e-4


def tolerance(logits):
    """The margin below which a decision on `logits` may depend on the rounding."""
    return NEAR_TIE * max(1.0, float(np.max(np.abs(logits))))


def label_margins(logits, labels):
    """`z_label - max_{j != label} z_j` per example: > 0 correctly classified, < 0 wrong."""
    logits = np.asarray(logits, np.float64)
    labels = np.asarray(labels).astype(np.int64).reshape(-1)
    assert labels.shape == logits.shape[:1], (labels.shape, logits.shape)
    rows = np.arange(len(labels))
    others = logits.copy()
    others[rows, labels] = -np.inf
    return logits[rows, labels] - others.max(axis=-1)


def correct_count_range(logits, labels):
    """`(fewest, most)` correctly classified examples any float32 evaluation of `logits` can give:
    equal unless some example is within `tolerance` of a tie."""
    margins = label_margins(logits, labels)
    limit = tolerance(logits)
    fewest, most = int(np.sum(margins >= limit)), int(np.sum(margins > -limit))
    _few(most - fewest, len(margins), "examples")
    return fewest, most


def _few(count, total, what):
    assert count <= max(2, total // 10), (
        f"{count} of {total} {what} are within round-off of a tie: the comparison means little")


def assert_misclassified_flags(flags, logits, labels):
    """`flags` (True = misclassified) equal `argmax(logits) != labels` on every clear decision."""
    margins = label_margins(logits, labels)
    clear = np.abs(margins) >= tolerance(logits)
    flags = np.asarray(flags).reshape(-1)
    np.testing.assert_array_equal(flags[clear], (margins < 0)[clear],
                                  err_msg=f"margins {margins[clear]}")
    _few(int(np.sum(~clear)), len(margins), "examples")


def assert_predicted_classes(predicted, logits):
    """Each `predicted` class is the argmax of its row of `logits`, or within `tolerance` of it."""
    logits = np.asarray(logits, np.float64)
    predicted = np.asarray(predicted).astype(np.int64).reshape(-1)
    assert predicted.shape == logits.shape[:1], (predicted.shape, logits.shape)
    rows = np.arange(len(predicted))
    gap = logits.max(axis=-1) - logits[rows, predicted]
    limit = tolerance(logits)
    assert np.all(gap < limit), (predicted.tolist(), np.argmax(logits, -1).tolist(), gap)
    sorted_logits = np.sort(logits, axis=-1)
    _few(int(np.sum(sorted_logits[:, -1] - sorted_logits[:, -2] < limit)), len(rows), "rows")

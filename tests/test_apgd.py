"""Tests for APGD / APGD-T (arat_tf.attacks.apgd) and the DLR losses (arat_tf.attacks.dlr)."""

import fractions
import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from arat_tf.attacks import make_forward, pgd_linf
from arat_tf.attacks.apgd import _halve_step, apgd, apgd_checkpoints, apgd_targeted
from arat_tf.attacks.dlr import dlr_loss, targeted_dlr_loss
from near_ties import assert_misclassified_flags

SHAPE = (8, 8, 1)
NUM_CLASSES = 10


# A small trained model on a synthetic 10-class problem: noisy copies of 10 random prototypes.


def _sample(rng, prototypes, n):
    y = rng.integers(0, NUM_CLASSES, n)
    x = np.clip(prototypes[y] + rng.normal(0.0, 0.15, size=(n,) + SHAPE), 0.0, 1.0)
    return x.astype("float32"), y.astype("int32")


@pytest.fixture(scope="module")
def trained():
    """(model, forward, x_test, y_test): an MLP with clean test accuracy ~1, trained in ~1-2 s."""
    keras.utils.set_random_seed(1)
    rng = np.random.default_rng(0)
    prototypes = rng.uniform(0.2, 0.8, size=(NUM_CLASSES,) + SHAPE)
    x_train, y_train = _sample(rng, prototypes, 4000)
    x_test, y_test = _sample(rng, prototypes, 200)
    model = keras.Sequential([
        keras.Input(SHAPE),
        keras.layers.Flatten(),
        keras.layers.Dense(64, activation="relu"),
        keras.layers.Dense(NUM_CLASSES),
    ])
    model.compile(keras.optimizers.Adam(1e-2), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x_train, y_train, batch_size=128, epochs=5, verbose=0)
    forward = make_forward(model)
    assert _accuracy(forward, x_test, y_test) >= 0.97
    return model, forward, tf.constant(x_test), tf.constant(y_test)


def _predictions(forward, x):
    return np.argmax(np.asarray(forward(x)), axis=-1)


def _accuracy(forward, x, y):
    return float(np.mean(_predictions(forward, x) == np.asarray(y)))


def _assert_valid(forward, x_adv, success, x, y, eps, norm):
    x_adv, x = np.asarray(x_adv), np.asarray(x)
    assert x_adv.shape == x.shape and x_adv.dtype == np.float32
    assert x_adv.min() >= 0.0 and x_adv.max() <= 1.0
    delta = (x_adv - x).reshape(len(x), -1)
    if norm == "linf":
        assert np.abs(delta).max() <= eps + 1e-6
    else:
        assert np.linalg.norm(delta, axis=1).max() <= eps + 1e-5
    success = np.asarray(success)
    assert success.dtype == bool and success.shape == (len(x),)
    # `success` is APGD's re-check in its compiled graph, this one runs `forward` eagerly: they
    # agree wherever the point is not within round-off of the decision boundary.
    assert_misclassified_flags(success, np.asarray(forward(x_adv)), y)


# DLR losses.


def test_dlr_loss_values_on_hand_made_logits():
    # [1, 3, 2]: sorted 3, 2, 1. y=1: -(3 - 2) / (3 - 1) = -0.5. y=0: -(1 - 3) / (3 - 1) = 1.
    np.testing.assert_allclose(dlr_loss([[1.0, 3.0, 2.0], [1.0, 3.0, 2.0]], [1, 0]), [-0.5, 1.0], rtol=1e-6)
    # [2, 0, 5, 1], y=0: best other 5, pi1 = 5, pi3 = 1: -(2 - 5) / (5 - 1) = 0.75.
    np.testing.assert_allclose(dlr_loss([[2.0, 0.0, 5.0, 1.0]], [[0]]), [0.75], rtol=1e-6)
    # Invariant to shifting and (positive) scaling of the logits.
    z = tf.constant([[0.3, -1.2, 2.5, 0.9], [1.0, 4.0, -2.0, 0.5]])
    np.testing.assert_allclose(dlr_loss(3.0 * z + 7.0, [1, 1]), dlr_loss(z, [1, 1]), rtol=1e-5)


def test_targeted_dlr_loss_values_on_hand_made_logits():
    # [4, 1, 3, 0], y=0, t=2: sorted 4, 3, 1, 0: -(4 - 3) / (4 - (1 + 0) / 2) = -1 / 3.5.
    # [1, 6, 2, 0, 3], y=0, t=1: sorted 6, 3, 2, 1, 0: -(1 - 6) / (6 - (2 + 1) / 2) = 5 / 4.5.
    np.testing.assert_allclose(targeted_dlr_loss([[4.0, 1.0, 3.0, 0.0]], [0], [2]), [-1.0 / 3.5], rtol=1e-6)
    np.testing.assert_allclose(targeted_dlr_loss([[1.0, 6.0, 2.0, 0.0, 3.0]], [0], [1]), [5.0 / 4.5], rtol=1e-6)
    # The gradient is finite even when all logits are equal (the 1e-12 floor).
    z = tf.zeros([1, 5])
    with tf.GradientTape() as tape:
        tape.watch(z)
        loss = tf.reduce_sum(targeted_dlr_loss(z, [0], [1]) + dlr_loss(z, [0]))
    assert np.all(np.isfinite(tape.gradient(loss, z)))


def test_dlr_losses_need_enough_classes():
    with pytest.raises(ValueError, match="3 classes"):
        dlr_loss([[1.0, 2.0]], [0])
    with pytest.raises(ValueError, match="4 classes"):
        targeted_dlr_loss([[1.0, 2.0, 3.0]], [0], [1])
    model = keras.Sequential([keras.Input(SHAPE), keras.layers.Flatten(), keras.layers.Dense(3)])
    x = tf.fill((2,) + SHAPE, 0.5)
    with pytest.raises(ValueError, match="4 classes"):
        apgd_targeted(make_forward(model), x, [0, 1], eps=0.1, steps=2)


# The checkpoint schedule.


def _checkpoints_from_recurrence(steps):
    """w_j = ceil(p_j * steps), p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06), p_j <= 1."""
    p = [fractions.Fraction(0), fractions.Fraction(22, 100)]
    while True:
        nxt = p[-1] + max(p[-1] - p[-2] - fractions.Fraction(3, 100), fractions.Fraction(6, 100))
        if nxt > 1:
            break
        p.append(nxt)
    w = [math.ceil(pj * steps) for pj in p]
    return sorted(set(w))


def test_checkpoint_schedule():
    # By hand: p = 0, 0.22, 0.41 (= 0.22 + max(0.22 - 0 - 0.03, 0.06)), 0.57 (+0.16), 0.70 (+0.13),
    # 0.80 (+0.10), 0.87 (+0.07), 0.93 (+max(0.04, 0.06)), 0.99 (+0.06); 1.05 > 1 ends it.
    assert apgd_checkpoints(100)[:3] == [0, 22, 41]
    assert apgd_checkpoints(100) == [0, 22, 41, 57, 70, 80, 87, 93, 99]
    assert _checkpoints_from_recurrence(100) == [0, 22, 41, 57, 70, 80, 87, 93, 99]
    # ceil of 0.41 * 50 = 20.5, 0.57 * 50 = 28.5, ... and 0.99 * 50 = 49.5 -> 50.
    assert apgd_checkpoints(50) == [0, 11, 21, 29, 35, 40, 44, 47, 50]
    for steps in (1, 5, 10, 37, 250, 1000):
        assert apgd_checkpoints(steps) == _checkpoints_from_recurrence(steps), steps
    with pytest.raises(ValueError, match="steps"):
        apgd_checkpoints(0)


# APGD follows Algorithm 1 step by step: the checkpoint rule by hand, then the whole run against a
# plain NumPy transcription.


def test_checkpoint_rule_by_hand():
    # window 19, rho 0.75: condition 1 holds with fewer than 14.25 increases.
    # Example 0: 14 increases, best loss improved -> keep. 1: 13 increases -> halve (condition 1).
    # 2: 19 increases but no improvement and no halving last time -> halve (condition 2).
    # 3: like 2 but the step was halved last time -> keep.
    halve = _halve_step(
        increases=tf.constant([15, 13, 19, 19]), window=tf.constant(19), rho=0.75,
        loss_best=tf.constant([2.0, 2.0, 1.0, 1.0]), loss_best_at_check=tf.constant([1.0, 1.0, 1.0, 1.0]),
        reduced_at_check=tf.constant([False, False, False, True]))
    np.testing.assert_array_equal(halve, [False, True, True, False])


def _sin_mlp_reference_apgd(w1, b1, w2, b2, x, y, x_start, eps, steps, rho=0.75, alpha=0.75):
    """Algorithm 1 of Croce & Hein (2020): CE on `sin(x W1 + b1) W2 + b2`, linf, one example."""
    checkpoints = _checkpoints_from_recurrence(steps)

    def f(x_k):  # loss, gradient, misclassified
        pre = x_k.reshape(-1) @ w1 + b1
        z = np.sin(pre) @ w2 + b2
        p = np.exp(z - z.max())
        p /= p.sum()
        loss = np.log(np.sum(np.exp(z - z.max()))) + z.max() - z[y]
        grad = w1 @ ((w2 @ (p - np.eye(len(z), dtype=np.float32)[y])) * np.cos(pre))
        return np.float32(loss), grad.reshape(x_k.shape), np.argmax(z) != y

    def project(v):
        return np.clip(np.clip(v, x - eps, x + eps), 0.0, 1.0)

    eta = np.float32(2 * eps)
    x_cur = x_prev = x_start
    f_cur, g_cur, wrong = f(x_cur)
    x_max, f_max, g_max = x_cur, f_cur, g_cur
    x_found = x_cur if wrong else None
    increases, f_max_at_check, reduced_at_check, last_check = 0, f_max, False, 0
    for k in range(steps):  # computes x^(k+1)
        a = 1.0 if k == 0 else alpha
        z = project(x_cur + eta * np.sign(g_cur))
        x_new = project(x_cur + a * (z - x_cur) + (1 - a) * (x_cur - x_prev))
        f_new, g_new, wrong = f(x_new)
        if wrong and x_found is None:
            x_found = x_new
        increases += f_new > f_cur
        if f_new > f_max:
            x_max, f_max, g_max = x_new, f_new, g_new
        x_prev, x_cur, f_cur, g_cur = x_cur, x_new, f_new, g_new
        if k + 1 in checkpoints[1:]:
            condition_1 = increases < rho * (k + 1 - last_check)
            condition_2 = not reduced_at_check and f_max <= f_max_at_check
            reduced_at_check = condition_1 or condition_2
            if reduced_at_check:
                eta = eta / 2
                x_cur, f_cur, g_cur = x_max, f_max, g_max  # x_prev stays x^(k)
            increases, f_max_at_check, last_check = 0, f_max, k + 1
    return x_max if x_found is None else x_found


def test_apgd_matches_numpy_transcription_of_algorithm_1():
    # A high-frequency sin layer makes the loss oscillate inside the ball, so step-size halvings and
    # restarts from x_max actually happen; a large bias on class 0 leaves about half the examples
    # unbroken, so x_max (not only the first adversarial point) is compared. Checked while writing
    # this test: dropping momentum, restarts, condition 1, eta0 = 2 eps or shifting the checkpoints
    # each changes >= 15 of the 16 results.
    keras.utils.set_random_seed(3)
    model = keras.Sequential([
        keras.Input(SHAPE),
        keras.layers.Flatten(),
        keras.layers.Dense(16, activation=keras.ops.sin),
        keras.layers.Dense(NUM_CLASSES),
    ])
    w1, b1, w2, b2 = model.get_weights()
    b2 = b2.copy()
    b2[0] += 4.5
    model.set_weights([10.0 * w1, b1, w2, b2])
    forward = make_forward(model)
    rng = np.random.default_rng(3)
    x = rng.uniform(0.0, 1.0, size=(16,) + SHAPE).astype("float32")
    y = _predictions(forward, x)  # every example starts correctly classified, so all are attacked
    eps, steps, seed = 0.05, 40, 7
    x_adv, success = apgd(forward, x, y, eps=eps, steps=steps, seed=seed)

    # The same start: seed index 0 of the first restart, drawn as documented.
    t = np.asarray(tf.random.stateless_uniform(x.shape, seed=[seed, 0], minval=-1.0, maxval=1.0))
    t = t / np.abs(t).reshape(len(x), -1).max(axis=1).reshape(-1, 1, 1, 1)
    x_start = np.clip(np.clip(x + eps * t, x - eps, x + eps), 0.0, 1.0)
    weights = [np.asarray(w) for w in model.get_weights()]
    expected = np.stack([
        _sin_mlp_reference_apgd(*weights, x[i], y[i], x_start[i], eps, steps) for i in range(len(x))])
    assert 4 <= np.sum(success) <= 12  # both outcomes are exercised
    # Float rounding (TF vs NumPy kernels) can flip a near-tie comparison and send an example on a
    # different trajectory; on this machine all 16 agree, allow one such flip elsewhere.
    matches = np.all(np.isclose(np.asarray(x_adv), expected, atol=1e-5).reshape(len(x), -1), axis=1)
    assert np.sum(matches) >= len(x) - 1, np.flatnonzero(~matches)


# Strength and validity on the trained model.


def test_large_eps_breaks_the_model_and_stays_in_the_ball(trained):
    _, forward, x, y = trained
    eps = 0.3
    for loss in ("ce", "dlr"):
        x_adv, success = apgd(forward, x, y, eps=eps, loss=loss, steps=20, seed=0)
        _assert_valid(forward, x_adv, success, x, y, eps, "linf")
        assert np.mean(success) >= 0.98, loss
    x_adv, success = apgd_targeted(forward, x, y, eps=eps, steps=20, num_target_classes=3, seed=0)
    _assert_valid(forward, x_adv, success, x, y, eps, "linf")
    assert np.mean(success) >= 0.98


def test_l2_stays_in_the_ball_and_lowers_accuracy(trained):
    _, forward, x, y = trained
    eps = 2.0
    x_adv, success = apgd(forward, x, y, eps=eps, norm="l2", steps=30, seed=0)
    _assert_valid(forward, x_adv, success, x, y, eps, "l2")
    assert np.mean(success) >= 0.9
    x_adv, success = apgd_targeted(forward, x, y, eps=eps, norm="l2", steps=30, num_target_classes=2, seed=0)
    _assert_valid(forward, x_adv, success, x, y, eps, "l2")
    assert np.mean(success) >= 0.9
    # A smaller ball: some examples survive (x_max is returned for them), some do not.
    x_adv, success = apgd(forward, x, y, eps=0.7, norm="l2", steps=30, seed=0)
    _assert_valid(forward, x_adv, success, x, y, 0.7, "l2")
    assert 0.1 < np.mean(success) < 0.9


def test_targeted_dlr_loss_reaches_the_target(trained):
    _, forward, x, y = trained
    targets = (np.asarray(y) + 1) % NUM_CLASSES
    x_adv, success = apgd(forward, x, y, eps=0.3, loss="dlr_targeted", target_labels=targets, steps=30, seed=0)
    _assert_valid(forward, x_adv, success, x, y, 0.3, "linf")
    # The first misclassified point is returned, which need not be the target yet; most are.
    assert np.mean(success) >= 0.98
    assert np.mean(_predictions(forward, x_adv) == targets) >= 0.5


@pytest.mark.parametrize("eps", [0.1, 0.12])
def test_apgd_at_least_as_strong_as_pgd(trained, eps):
    _, forward, x, y = trained
    steps = 100
    _, success = apgd(forward, x, y, eps=eps, steps=steps, seed=0)
    x_pgd = pgd_linf(forward, x, y, eps=eps, step_size=2.5 * eps / steps, steps=steps)
    apgd_accuracy = 1.0 - float(np.mean(success))
    pgd_accuracy = _accuracy(forward, x_pgd, y)
    assert 0.1 < pgd_accuracy < 0.95  # a moderate eps: the comparison means something
    assert apgd_accuracy <= pgd_accuracy
    _, success_t = apgd_targeted(forward, x, y, eps=eps, steps=steps, seed=0)
    assert 1.0 - float(np.mean(success_t)) <= pgd_accuracy


def test_restarts_only_add_successes(trained):
    _, forward, x, y = trained
    eps = 0.1
    x_one, success_one = apgd(forward, x, y, eps=eps, steps=30, restarts=1, seed=5)
    x_three, success_three = apgd(forward, x, y, eps=eps, steps=30, restarts=3, seed=5)
    success_one, success_three = np.asarray(success_one), np.asarray(success_three)
    # The first restart is the same run; later ones only touch the examples it did not break.
    assert np.all(success_three[success_one])
    np.testing.assert_array_equal(np.asarray(x_three)[success_one], np.asarray(x_one)[success_one])
    assert np.sum(success_three) > np.sum(success_one)
    _assert_valid(forward, x_three, success_three, x, y, eps, "linf")


def test_clean_misclassified_examples_are_returned_unchanged(trained):
    _, forward, x, y = trained
    wrong_labels = (np.asarray(y[:8]) + 3) % NUM_CLASSES
    x_adv, success = apgd(forward, x[:8], wrong_labels, eps=0.1, steps=5, seed=0)
    assert np.all(np.asarray(success))
    np.testing.assert_array_equal(x_adv, x[:8])


# The loop is a graph loop: compiled once, not unrolled, reused across calls.


def test_graph_loop_is_traced_once_and_not_unrolled(trained):
    model, _, x, y = trained
    python_calls = []

    def forward(inputs):
        python_calls.append(1)  # runs only while TensorFlow traces
        return model(inputs, training=False)

    apgd(forward, x[:32], y[:32], eps=0.1, steps=100, seed=0)
    traced = len(python_calls)
    assert traced <= 6  # clean/final logits + x^(0) + the loop body (+ gradient), not ~100
    apgd(forward, x[:32], y[:32], eps=0.1, steps=100, seed=1)
    apgd(forward, x[:32], y[:32], eps=0.1, steps=10, seed=0)
    assert len(python_calls) == traced  # same shapes, other seed / step count: no retrace
    # Another batch size (and restarts on sub-batches) retrace at most once more, with a relaxed
    # batch dimension, after which any size is served.
    apgd(forward, x[:7], y[:7], eps=0.1, steps=20, restarts=2, seed=0)
    retraced = len(python_calls)
    assert retraced <= 2 * traced
    apgd(forward, x[:5], y[:5], eps=0.1, steps=20, restarts=2, seed=0)
    x_adv, success = apgd(forward, x[:1], y[:1], eps=0.1, steps=20, seed=0)
    assert len(python_calls) == retraced
    assert x_adv.shape == (1,) + SHAPE and success.shape == (1,)


def test_apgd_inside_tf_function(trained):
    _, forward, x, y = trained

    @tf.function
    def attack(inputs, labels):
        return apgd(forward, inputs, labels, eps=0.3, steps=10, restarts=2, seed=0)

    x_adv, success = attack(x[:16], y[:16])
    _assert_valid(forward, x_adv, success, x[:16], y[:16], 0.3, "linf")
    assert np.mean(success) >= 0.9


def test_invalid_arguments(trained):
    _, forward, x, y = trained
    x, y = x[:2], y[:2]
    with pytest.raises(ValueError, match="norm"):
        apgd(forward, x, y, eps=0.1, norm="l1")
    with pytest.raises(ValueError, match="loss"):
        apgd(forward, x, y, eps=0.1, loss="cw")
    with pytest.raises(ValueError, match="target_labels"):
        apgd(forward, x, y, eps=0.1, loss="dlr_targeted")
    with pytest.raises(ValueError, match="steps"):
        apgd(forward, x, y, eps=0.1, steps=0)
    with pytest.raises(ValueError, match="restarts"):
        apgd(forward, x, y, eps=0.1, restarts=0)
    with pytest.raises(ValueError, match="eps"):
        apgd(forward, x, y, eps=-0.1)
    with pytest.raises(ValueError, match="rho"):
        apgd(forward, x, y, eps=0.1, rho=1.5)
    with pytest.raises(ValueError, match="num_target_classes"):
        apgd_targeted(forward, x, y, eps=0.1, num_target_classes=0)

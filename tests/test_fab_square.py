"""Tests for the FAB-T and Square attacks: the L-inf hyperplane projection, attack behaviour on a
small trained model, the black-box property of Square, and reproducibility."""

import numpy as np
import pytest
import tensorflow as tf

from arat_tf.attacks.fab import fab_targeted, project_linf_hyperplane_box
from arat_tf.attacks.square import square_linf, square_p_schedule
from near_ties import assert_misclassified_flags

SHAPE = (8, 8, 3)
NUM_CLASSES = 10
BATCH = 32


# ---------------------------------------------------------------------------------------------
# The L-inf box-constrained hyperplane projection.


def _project(x, w, b, dtype=tf.float64):
    x = np.asarray(x, np.float64)
    z = project_linf_hyperplane_box(
        tf.constant(x[None], dtype), tf.constant(np.asarray(w, np.float64)[None], dtype),
        tf.constant(np.asarray([b], np.float64), dtype))
    return z.numpy()[0]


@pytest.mark.parametrize("x, w, b, expected", [
    ([0.5, 0.5], [1.0, 1.0], -1.5, [0.75, 0.75]),  # symmetric, box inactive
    ([0.9, 0.1], [1.0, 1.0], -1.6, [1.0, 0.6]),  # first coordinate stops at the box, the other moves 0.5
    ([0.2, 0.7], [2.0, 0.0], -1.0, [0.5, 0.7]),  # zero weight: that coordinate does not move
    ([0.5, 0.5, 0.5], [1.0, -1.0, 2.0], 0.0, [0.25, 0.75, 0.25]),  # w.x + b = 1 > 0: r = 1 / ||w||_1
    ([0.3, 0.6], [1.0, 1.0], -0.9, [0.3, 0.6]),  # already on the hyperplane
    ([0.5, 0.5], [1.0, 1.0], -3.0, [1.0, 1.0]),  # infeasible: the closest box corner
])
def test_projection_hand_made_cases(x, w, b, expected):
    z = _project(x, w, b)
    np.testing.assert_allclose(z, expected, atol=1e-12)
    assert np.all(z >= 0.0) and np.all(z <= 1.0)


def test_projection_float32_and_image_shapes():
    rng = np.random.default_rng(1)
    x = rng.uniform(0.2, 0.8, size=(4,) + SHAPE).astype("float32")
    w = rng.normal(size=(4,) + SHAPE).astype("float32")
    b = (-np.sum(w * x, axis=(1, 2, 3)) + rng.normal(0, 0.5, size=4)).astype("float32")
    z = project_linf_hyperplane_box(tf.constant(x), tf.constant(w), tf.constant(b)).numpy()
    assert z.shape == x.shape and z.dtype == np.float32
    residual = np.sum(w.astype(np.float64) * z, axis=(1, 2, 3)) + b
    np.testing.assert_allclose(residual, 0.0, atol=1e-5)
    assert np.all(z >= 0.0) and np.all(z <= 1.0)


def test_projection_matches_linear_program():
    optimize = pytest.importorskip("scipy.optimize")
    rng = np.random.default_rng(0)
    feasible = 0
    for _ in range(120):
        d = int(rng.integers(1, 7))
        x = rng.uniform(size=d)
        x[rng.uniform(size=d) < 0.2] = rng.choice([0.0, 1.0])
        w = rng.normal(size=d)
        w[rng.uniform(size=d) < 0.2] = 0.0
        b = float(rng.normal())
        z = _project(x, w, b)
        assert np.all(z >= 0.0) and np.all(z <= 1.0)
        # min t  s.t.  |z - x|_inf <= t,  w.z + b = 0,  0 <= z <= 1;  variables (z, t).
        eye = np.eye(d)
        res = optimize.linprog(
            np.r_[np.zeros(d), 1.0],
            A_ub=np.block([[eye, -np.ones((d, 1))], [-eye, -np.ones((d, 1))]]), b_ub=np.r_[x, -x],
            A_eq=np.r_[w, 0.0][None], b_eq=[-b], bounds=[(0.0, 1.0)] * d + [(0.0, None)], method="highs")
        if res.status == 0:
            feasible += 1
            assert abs(w @ z + b) < 1e-9
            assert np.abs(z - x).max() <= res.x[-1] + 1e-9
        else:  # infeasible: as close to the hyperplane as the box allows
            corners = [np.where(w > 0, 1.0, 0.0), np.where(w > 0, 0.0, 1.0)]
            assert abs(w @ z + b) == pytest.approx(min(abs(w @ c + b) for c in corners), abs=1e-9)
    assert feasible > 30


# ---------------------------------------------------------------------------------------------
# A small trained model.


@pytest.fixture(scope="module")
def trained(prototype_mlp):
    """A tiny MLP trained on 10 noisy prototypes of 8x8x3 images; near-perfect clean accuracy."""
    model, x_test, y_test = prototype_mlp(BATCH, SHAPE, NUM_CLASSES)
    # One example with a wrong label, so clean-misclassified handling is exercised.
    y_test[0] = (y_test[0] + 1) % NUM_CLASSES
    forward = lambda x: model(x, training=False)  # noqa: E731
    clean_correct = np.argmax(forward(x_test).numpy(), -1) == y_test
    assert clean_correct.mean() >= 0.9
    return model, forward, tf.constant(x_test), tf.constant(y_test), clean_correct


def _check_outputs(forward, x, y, x_adv, success, eps, clean_correct):
    x, y, x_adv, success = x.numpy(), y.numpy(), x_adv.numpy(), success.numpy()
    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype and success.dtype == bool
    assert np.abs(x_adv - x).max() <= eps + 1e-6
    assert x_adv.min() >= 0.0 and x_adv.max() <= 1.0
    # `success` is the attack's own re-check in its compiled graph; this one runs eagerly. FAB's
    # points sit at the decision boundary, where the two may round apart: compare the clear ones.
    assert_misclassified_flags(success, forward(tf.constant(x_adv)).numpy(), y)
    assert np.all(success[~clean_correct])  # clean-misclassified count as broken
    robust_accuracy = 1.0 - success.mean()
    assert robust_accuracy <= clean_correct.mean()
    return robust_accuracy


def test_fab_large_eps_breaks_the_model(trained):
    _, forward, x, y, clean_correct = trained
    x_adv, success = fab_targeted(forward, x, y, eps=0.3)
    robust = _check_outputs(forward, x, y, x_adv, success, 0.3, clean_correct)
    assert robust <= 0.05
    # Minimum-norm: the points found are much closer than the allowed radius.
    distances = np.abs(x_adv.numpy() - x.numpy()).max(axis=(1, 2, 3))
    assert np.median(distances[clean_correct]) < 0.2
    np.testing.assert_array_equal(x_adv.numpy()[~clean_correct], x.numpy()[~clean_correct])


def test_fab_small_eps_returns_clean_inputs_for_unbroken(trained):
    _, forward, x, y, clean_correct = trained
    x_adv, success = fab_targeted(forward, x, y, eps=0.005, steps=20, num_target_classes=2)
    robust = _check_outputs(forward, x, y, x_adv, success, 0.005, clean_correct)
    assert robust == pytest.approx(clean_correct.mean())
    np.testing.assert_array_equal(x_adv.numpy(), x.numpy())


def test_fab_finds_the_minimal_distance_of_a_linear_classifier():
    optimize = pytest.importorskip("scipy.optimize")
    rng = np.random.default_rng(3)
    d = int(np.prod(SHAPE))
    weights = rng.normal(size=(d, 2)).astype("float32")
    bias = rng.normal(size=2).astype("float32")
    x = rng.uniform(0.3, 0.7, size=(8,) + SHAPE).astype("float32")
    logits = x.reshape(8, -1) @ weights + bias
    y = np.argmax(logits, -1).astype("int32")  # all correctly classified

    def forward(inputs):
        return tf.matmul(tf.reshape(inputs, [-1, d]), weights) + bias

    x_adv, success = fab_targeted(forward, tf.constant(x), tf.constant(y), eps=1.0)
    assert np.all(success.numpy())
    found = np.abs(x_adv.numpy() - x).reshape(8, -1).max(axis=1)
    for i in range(8):
        # Exact minimal L-inf distance to the boundary {(w_t - w_y).z + (b_t - b_y) = 0} in the box.
        w = (weights[:, 1 - y[i]] - weights[:, y[i]]).astype(np.float64)
        b = float(bias[1 - y[i]] - bias[y[i]])
        xi = x[i].reshape(-1).astype(np.float64)
        res = optimize.linprog(
            np.r_[np.zeros(d), 1.0],
            A_ub=np.block([[np.eye(d), -np.ones((d, 1))], [-np.eye(d), -np.ones((d, 1))]]), b_ub=np.r_[xi, -xi],
            A_eq=np.r_[w, 0.0][None], b_eq=[-b], bounds=[(0.0, 1.0)] * d + [(0.0, None)], method="highs")
        assert res.status == 0
        # eta = 1.05 overshoot plus backtracking: FAB converges to ~1.005x the exact distance.
        assert res.x[-1] - 1e-5 <= found[i] <= 1.01 * res.x[-1] + 1e-5


def test_fab_random_restarts_are_reproducible(trained):
    _, forward, x, y, _ = trained
    kwargs = dict(eps=0.3, steps=10, num_target_classes=1, restarts=2)
    first = fab_targeted(forward, x, y, seed=7, **kwargs)
    second = fab_targeted(forward, x, y, seed=7, **kwargs)
    np.testing.assert_array_equal(first[0].numpy(), second[0].numpy())
    np.testing.assert_array_equal(first[1].numpy(), second[1].numpy())


def test_square_large_eps_breaks_the_model(trained):
    _, forward, x, y, clean_correct = trained
    x_adv, success, queries = square_linf(forward, x, y, eps=0.3, n_queries=500, seed=0, return_queries=True)
    robust = _check_outputs(forward, x, y, x_adv, success, 0.3, clean_correct)
    assert robust <= 0.05
    queries = queries.numpy()
    assert queries.dtype == np.int32
    assert np.all(queries[~clean_correct] == 0)  # not attacked
    assert np.all((queries[clean_correct] >= 1) & (queries[clean_correct] <= 500))
    np.testing.assert_array_equal(x_adv.numpy()[~clean_correct], x.numpy()[~clean_correct])


def test_square_small_eps_uses_the_whole_budget_and_stays_in_the_ball(trained):
    _, forward, x, y, clean_correct = trained
    x_adv, success, queries = square_linf(forward, x, y, eps=0.005, n_queries=100, seed=1, return_queries=True)
    robust = _check_outputs(forward, x, y, x_adv, success, 0.005, clean_correct)
    assert robust == pytest.approx(clean_correct.mean())
    np.testing.assert_array_equal(queries.numpy()[clean_correct], 100)
    # Every coordinate of an attacked example sits on the eps sphere (or the box boundary).
    delta = np.abs(x_adv.numpy() - x.numpy())[clean_correct]
    at_box = np.isin(x_adv.numpy()[clean_correct], [0.0, 1.0])
    assert np.all((np.abs(delta - 0.005) < 1e-6) | at_box)


def test_square_uses_no_gradients(trained):
    model, _, x, y, clean_correct = trained

    @tf.custom_gradient
    def forward(inputs):
        # Non-differentiable (quantised inputs, stopped output) and it fails if anyone asks for a gradient.
        logits = tf.stop_gradient(model(tf.round(inputs * 255.0) / 255.0, training=False))

        def grad(upstream, variables=None):
            raise AssertionError("the attack asked for a gradient")

        return logits, grad

    x_adv, success = square_linf(forward, x, y, eps=0.3, n_queries=300, seed=0)
    assert _check_outputs(forward, x, y, x_adv, success, 0.3, clean_correct) <= 0.05
    # The same forward does detect a gradient-based attack.
    with pytest.raises(Exception, match="asked for a gradient"):
        fab_targeted(forward, x, y, eps=0.3, steps=1, num_target_classes=1)


def test_square_is_reproducible_eagerly_and_in_graphs(trained):
    _, forward, x, y, _ = trained
    first = square_linf(forward, x, y, eps=0.05, n_queries=60, seed=3, return_queries=True)
    second = square_linf(forward, x, y, eps=0.05, n_queries=60, seed=3, return_queries=True)
    graph = tf.function(lambda a, b: square_linf(forward, a, b, eps=0.05, n_queries=60, seed=3,
                                                 return_queries=True))(x, y)
    other = square_linf(forward, x, y, eps=0.05, n_queries=60, seed=4)
    for a, b, c in zip(first, second, graph):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
        np.testing.assert_array_equal(a.numpy(), c.numpy())
    assert not np.array_equal(first[0].numpy(), other[0].numpy())


def test_square_p_schedule_follows_the_paper():
    def reference(it, n_queries, p_init=0.8):
        it = int(it / n_queries * 10000)
        halvings = sum(it > point for point in (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000))
        return p_init / 2**halvings

    for n_queries in (10000, 5000, 1000, 37):
        for it in sorted({0, 1, 5, 10, 11, 50, 51, 100, 101, 400, 2500, n_queries - 1} & set(range(n_queries))):
            assert float(square_p_schedule(it, n_queries, 0.8)) == pytest.approx(reference(it, n_queries))
    assert float(square_p_schedule(10, 10000)) == pytest.approx(0.8)
    assert float(square_p_schedule(11, 10000)) == pytest.approx(0.4)
    assert float(square_p_schedule(9999, 10000)) == pytest.approx(0.8 / 512)


def test_invalid_arguments_raise(trained):
    _, forward, x, y, _ = trained
    with pytest.raises(ValueError):
        square_linf(forward, x, y, eps=-0.1)
    with pytest.raises(ValueError):
        square_linf(forward, x, y, eps=0.1, n_queries=0)
    with pytest.raises(ValueError):
        square_linf(forward, x, y, eps=0.1, p_init=0.0)
    with pytest.raises(ValueError):
        square_linf(forward, tf.reshape(x, [BATCH, -1]), y, eps=0.1)
    with pytest.raises(ValueError):
        fab_targeted(forward, x, y, eps=-0.1)
    with pytest.raises(ValueError):
        fab_targeted(forward, x, y, eps=0.1, alpha_max=1.5)
    with pytest.raises(ValueError):
        fab_targeted(forward, x, y, eps=0.1, restarts=0)


def test_a_batch_of_one_example_works(trained):
    """The evaluator hands each attack only the examples still unbroken: often exactly one.
    (Square once failed there: a loop variable's static batch size 1 became None.)"""
    _, forward, x, y, clean_correct = trained
    index = int(np.flatnonzero(clean_correct)[0])
    x_one, y_one = x[index:index + 1], y[index:index + 1]
    for attack in (
        lambda: square_linf(forward, x_one, y_one, eps=0.3, n_queries=50, seed=0),
        lambda: fab_targeted(forward, x_one, y_one, eps=0.3, steps=10),
    ):
        x_adv, success = attack()
        assert x_adv.shape == x_one.shape and success.shape == (1,)
        _check_outputs(forward, x_one, y_one, x_adv, success, 0.3, clean_correct[index:index + 1])

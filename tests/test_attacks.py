"""Behavioural tests for arat_tf.attacks: losses, parts, the loop, the builders and make_forward."""

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from arat_tf.attacks import (
    ATTACK_LOSSES,
    AttackConfig,
    cross_entropy,
    cw_margin,
    fgsm,
    gaussian_start,
    iterative_attack,
    kl_divergence,
    l2_normalized_step,
    make_forward,
    pgd_l2,
    pgd_linf,
    project_l2,
    project_linf,
    sign_step,
    trades_attack,
    uniform_start,
    zero_start,
)

SHAPE = (8, 8, 3)
NUM_CLASSES = 4
EPS_LINF = 8 / 255


def _linear_model():
    return keras.Sequential([keras.Input(SHAPE), keras.layers.Flatten(), keras.layers.Dense(NUM_CLASSES)])


def _bn_model():
    return keras.Sequential([
        keras.Input(SHAPE),
        keras.layers.Flatten(),
        keras.layers.Dense(16),
        keras.layers.BatchNormalization(),
        keras.layers.ReLU(),
        keras.layers.Dense(NUM_CLASSES),
    ])


class _BranchModel(keras.Model):
    """A two-head model whose call takes `branch`, recording each call's (branch, training)."""

    def __init__(self):
        super().__init__()
        self.flatten = keras.layers.Flatten()
        self.clean_head = keras.layers.Dense(NUM_CLASSES)
        self.adv_head = keras.layers.Dense(NUM_CLASSES)
        self.seen = []

    def build(self, input_shape):
        features = math.prod(input_shape[1:])
        self.clean_head.build((None, features))
        self.adv_head.build((None, features))

    def call(self, x, training=None, branch="adv"):
        self.seen.append((branch, training))
        h = self.flatten(x)
        return self.clean_head(h) if branch == "clean" else self.adv_head(h)


def _data(batch=6):
    """Inputs in [0, 1] with some coordinates exactly at 0 and at 1, and integer labels."""
    rng = np.random.default_rng(0)
    x = rng.uniform(size=(batch,) + SHAPE).astype("float32")
    x[:, 0, :, :] = 0.0
    x[:, -1, :, :] = 1.0
    y = rng.integers(0, NUM_CLASSES, size=(batch,)).astype("int32")
    return tf.constant(x), tf.constant(y)


def _mean(loss_fn, forward, x, target):
    return float(tf.reduce_mean(loss_fn(forward(x), target)))


def _assert_linf_ball(x_adv, x, eps):
    x_adv, x = np.asarray(x_adv), np.asarray(x)
    assert x_adv.shape == x.shape
    assert np.max(np.abs(x_adv - x)) <= eps + 1e-6
    assert x_adv.min() >= 0.0 and x_adv.max() <= 1.0


def _assert_l2_ball(x_adv, x, eps):
    x_adv, x = np.asarray(x_adv), np.asarray(x)
    assert x_adv.shape == x.shape
    norms = np.sqrt(np.sum((x_adv - x).reshape(len(x), -1) ** 2, axis=1))
    assert np.all(norms <= eps + 1e-5)
    assert x_adv.min() >= 0.0 and x_adv.max() <= 1.0


# Losses.


def test_loss_values_on_hand_made_logits():
    np.testing.assert_allclose(cross_entropy([[0.0, 0.0]], [1]), [math.log(2.0)], rtol=1e-6)
    np.testing.assert_allclose(cw_margin([[1.0, 3.0, 2.0]], [1]), [-1.0])
    np.testing.assert_allclose(cw_margin([[5.0, 3.0, 2.0], [0.0, 0.0, 4.0]], [1, 0]), [2.0, 4.0])
    z = tf.constant([[1.0, 2.0, 3.0], [-1.0, 0.5, 0.0]])
    np.testing.assert_array_equal(kl_divergence(z, z), [0.0, 0.0])
    p, q = np.array([0.5, 0.5]), np.array([0.25, 0.75])
    expected = np.sum(p * np.log(p / q))
    np.testing.assert_allclose(kl_divergence(np.log([q]), np.log([p])), [expected], rtol=1e-5)
    assert set(ATTACK_LOSSES) == {"ce", "cw", "kl"}


def test_losses_accept_column_labels_and_kl_stops_reference_gradient():
    logits = tf.constant([[1.0, 3.0, 2.0], [0.0, 1.0, 0.0]])
    np.testing.assert_allclose(cw_margin(logits, [[1], [2]]), cw_margin(logits, [1, 2]))
    np.testing.assert_allclose(cross_entropy(logits, [[1], [2]]), cross_entropy(logits, [1, 2]))
    reference = tf.Variable([[0.0, 1.0, 2.0], [2.0, 0.0, 0.0]])
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(kl_divergence(logits, reference))
    assert tape.gradient(loss, reference) is None


# Parts.


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_uniform_start_lies_in_the_ball(norm):
    x = tf.zeros((64,) + SHAPE)
    delta = uniform_start(norm)(x, 0.5).numpy().reshape(64, -1)
    if norm == "linf":
        assert np.abs(delta).max() <= 0.5 and np.abs(delta).max() > 0.4
    else:
        norms = np.linalg.norm(delta, axis=1)
        assert np.all(norms <= 0.5 + 1e-5) and norms.min() > 0.4  # in high dims mass sits near the sphere


def test_other_starts_and_bad_norm():
    x = tf.fill((2,) + SHAPE, 0.5)
    np.testing.assert_array_equal(zero_start()(x, 0.1), x)
    noise = gaussian_start(0.001)(x, 0.1) - x
    assert 0.0 < np.std(noise) < 0.01
    with pytest.raises(ValueError, match="l1"):
        uniform_start("l1")


def test_step_rules():
    g = tf.constant([[3.0, -4.0], [0.0, 0.0]])
    np.testing.assert_array_equal(sign_step(g), [[1.0, -1.0], [0.0, 0.0]])
    step = l2_normalized_step(g).numpy()
    np.testing.assert_allclose(step, [[0.6, -0.8], [0.0, 0.0]], rtol=1e-6)
    assert np.all(np.isfinite(step))


def test_projections():
    x = tf.constant([[0.0, 0.5, 1.0]])
    np.testing.assert_allclose(project_linf(x + [[-0.3, 0.3, 0.05]], x, 0.1), [[0.0, 0.6, 1.0]], rtol=1e-6)
    x = tf.constant([[0.5, 0.5]])
    np.testing.assert_allclose(project_l2(x + [[0.3, 0.4]], x, 0.1), [[0.56, 0.58]], rtol=1e-6)
    np.testing.assert_allclose(project_l2(x + [[0.03, 0.04]], x, 0.1), [[0.53, 0.54]], rtol=1e-6)


# The attacks stay in the threat model.


def test_linf_attacks_stay_in_ball_and_box():
    x, y = _data()
    forward = make_forward(_linear_model())
    _assert_linf_ball(pgd_linf(forward, x, y), x, EPS_LINF)
    _assert_linf_ball(pgd_linf(forward, x, y, loss="cw", eps=0.1, step_size=0.05), x, 0.1)
    _assert_linf_ball(fgsm(forward, x, y), x, EPS_LINF)
    _assert_linf_ball(trades_attack(forward, x, forward(x)), x, EPS_LINF)


def test_l2_attack_stays_in_ball_and_box():
    x, y = _data()
    forward = make_forward(_linear_model())
    _assert_l2_ball(pgd_l2(forward, x, y), x, 0.5)
    _assert_l2_ball(pgd_l2(forward, x, y, eps=2.0, step_size=1.0, loss="cw"), x, 2.0)


def test_fgsm_moves_every_free_coordinate_by_eps():
    x = tf.fill((2,) + SHAPE, 0.5)
    y = tf.constant([0, 1])
    x_adv = fgsm(make_forward(_linear_model()), x, y, eps=0.1)
    np.testing.assert_allclose(np.abs(x_adv - x), 0.1, rtol=1e-5)


# The attacks raise their loss.


@pytest.mark.parametrize("attack", [pgd_linf, pgd_l2])
def test_pgd_raises_ce(attack):
    x, y = _data()
    forward = make_forward(_linear_model())
    x_adv = attack(forward, x, y)
    assert _mean(cross_entropy, forward, x_adv, y) > _mean(cross_entropy, forward, x, y) + 1e-3


def test_pgd_cw_raises_margin():
    x, y = _data()
    forward = make_forward(_linear_model())
    x_adv = pgd_linf(forward, x, y, loss="cw")
    assert _mean(cw_margin, forward, x_adv, y) > _mean(cw_margin, forward, x, y) + 1e-3


def test_trades_attack_raises_kl_above_its_start():
    x, _ = _data()
    forward = make_forward(_linear_model())
    reference = forward(x)
    tf.random.set_seed(1)
    x_start = trades_attack(forward, x, reference, steps=0)
    tf.random.set_seed(1)
    x_adv = trades_attack(forward, x, reference, steps=10)
    kl_start = _mean(kl_divergence, forward, x_start, reference)
    kl_adv = _mean(kl_divergence, forward, x_adv, reference)
    assert kl_adv > kl_start + 1e-3


@pytest.mark.parametrize("loss_name", ["ce", "cw"])
def test_more_steps_do_not_lower_the_loss(loss_name):
    x, y = _data()
    forward = make_forward(_linear_model())
    loss_fn = ATTACK_LOSSES[loss_name]
    losses = [
        _mean(loss_fn, forward, pgd_linf(forward, x, y, steps=k, step_size=EPS_LINF / 4, random_start=False,
                                         loss=loss_name), y)
        for k in (0, 1, 10)
    ]
    assert losses[0] <= losses[1] + 1e-6 <= losses[2] + 2e-6
    assert losses[2] > losses[0]


# The loop.


def test_zero_steps_returns_the_projected_start():
    x, y = _data()
    forward = make_forward(_linear_model())
    np.testing.assert_array_equal(pgd_linf(forward, x, y, steps=0, random_start=False), x)
    _assert_linf_ball(pgd_linf(forward, x, y, steps=0), x, EPS_LINF)


def test_result_has_input_dtype_and_no_gradient():
    x, y = _data()
    forward = make_forward(_linear_model())
    with tf.GradientTape() as tape:
        tape.watch(x)
        x_adv = pgd_linf(forward, x, y, steps=2)
        total = tf.reduce_sum(x_adv)
    assert x_adv.dtype == x.dtype and x_adv.shape == x.shape
    assert tape.gradient(total, x) is None


def test_eager_and_tf_function_agree_with_zero_start():
    x, y = _data()
    forward = make_forward(_linear_model())
    eager = pgd_linf(forward, x, y, steps=5, random_start=False)
    graph = tf.function(lambda a, b: pgd_linf(forward, a, b, steps=5, random_start=False))(x, y)
    np.testing.assert_array_equal(eager, graph)
    eager = pgd_l2(forward, x, y, steps=5, random_start=False)
    graph = tf.function(lambda a, b: pgd_l2(forward, a, b, steps=5, random_start=False))(x, y)
    np.testing.assert_array_equal(eager, graph)


def test_step_does_not_depend_on_batch_size():
    x, y = _data()
    forward = make_forward(_linear_model())
    batch = pgd_l2(forward, x, y, steps=3, random_start=False)
    single = pgd_l2(forward, x[:1], y[:1], steps=3, random_start=False)
    np.testing.assert_allclose(batch[:1], single, atol=1e-6)


def test_loop_is_a_graph_loop():
    forward = make_forward(_linear_model())
    specs = (tf.TensorSpec((None,) + SHAPE, tf.float32), tf.TensorSpec((None,), tf.int32))

    def ops(steps):
        fn = tf.function(lambda x, y: pgd_linf(forward, x, y, steps=steps))
        return fn.get_concrete_function(*specs).graph.get_operations()

    few, many = ops(2), ops(20)
    assert abs(len(few) - len(many)) <= 2
    assert {"While", "StatelessWhile"} & {op.type for op in many}


def test_runs_under_xla():
    x, y = _data()
    forward = make_forward(_bn_model(), bn_mode="train")
    x_adv = tf.function(lambda a, b: pgd_linf(forward, a, b, steps=3), jit_compile=True)(x, y)
    _assert_linf_ball(x_adv, x, EPS_LINF)


@pytest.mark.parametrize(
    "kwargs, bad",
    [({"eps": -0.1}, "-0.1"), ({"step_size": -1.0}, "-1.0"), ({"steps": -1}, "-1"), ({"steps": 2.5}, "2.5"),
     ({"eps": float("nan")}, "nan")],
)
def test_iterative_attack_validates_arguments(kwargs, bad):
    x, y = _data(2)
    args = dict(loss_fn=cross_entropy, start_fn=zero_start(), step_fn=sign_step, project_fn=project_linf,
                eps=0.1, step_size=0.01, steps=1)
    args.update(kwargs)
    with pytest.raises(ValueError, match=bad):
        iterative_attack(make_forward(_linear_model()), x, y, **args)


def test_unknown_loss_name_is_rejected():
    x, y = _data(2)
    with pytest.raises(ValueError, match="hinge"):
        pgd_linf(make_forward(_linear_model()), x, y, loss="hinge")


# AttackConfig.


def test_attack_config_matches_the_builders():
    x, y = _data()
    forward = make_forward(_linear_model())
    np.testing.assert_allclose(
        AttackConfig(start="zero", steps=4).run(forward, x, y),
        pgd_linf(forward, x, y, steps=4, random_start=False), atol=1e-6)
    np.testing.assert_allclose(
        AttackConfig(norm="l2", eps=0.5, step_size=0.1, start="zero", loss="cw").run(forward, x, y),
        pgd_l2(forward, x, y, random_start=False, loss="cw"), atol=1e-6)
    reference = forward(x)
    tf.random.set_seed(3)
    from_config = AttackConfig(loss="kl", start="gaussian").run(forward, x, reference)
    tf.random.set_seed(3)
    np.testing.assert_allclose(from_config, trades_attack(forward, x, reference), atol=1e-6)


@pytest.mark.parametrize(
    "kwargs",
    [{"norm": "l1"}, {"start": "normal"}, {"loss": "hinge"}, {"eps": -0.1}, {"step_size": -1e-3},
     {"steps": -1}, {"steps": 1.5}, {"steps": True}, {"eps": "8/255"}],
)
def test_attack_config_rejects_bad_values(kwargs):
    with pytest.raises(ValueError):
        AttackConfig(**kwargs)


def test_attack_config_is_frozen():
    config = AttackConfig()
    with pytest.raises(Exception):
        config.eps = 0.1


# make_forward.


def _bn_stats(model):
    bn = next(layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization))
    return bn.moving_mean.numpy().copy(), bn.moving_variance.numpy().copy()


def test_inference_mode_leaves_bn_statistics_unchanged():
    x, y = _data()
    model = _bn_model()
    before = _bn_stats(model)
    forward = make_forward(model, bn_mode="inference")
    pgd_linf(forward, x, y, steps=3)
    tf.function(lambda a, b: pgd_linf(forward, a, b, steps=3))(x, y)
    after = _bn_stats(model)
    np.testing.assert_array_equal(before[0], after[0])
    np.testing.assert_array_equal(before[1], after[1])


@pytest.mark.parametrize("compiled", [False, True])
def test_train_mode_updates_bn_statistics(compiled):
    x, y = _data()
    model = _bn_model()
    before = _bn_stats(model)
    forward = make_forward(model, bn_mode="train")
    attack = lambda a, b: pgd_linf(forward, a, b, steps=3)  # noqa: E731
    (tf.function(attack) if compiled else attack)(x, y)
    after = _bn_stats(model)
    assert not np.allclose(before[0], after[0])
    assert not np.allclose(before[1], after[1])


def test_make_forward_passes_branch_and_training():
    x, _ = _data(2)
    model = _BranchModel()
    model.build(x.shape)

    np.testing.assert_allclose(make_forward(model, branch="clean")(x), model.clean_head(model.flatten(x)))
    np.testing.assert_allclose(make_forward(model, branch="adv", bn_mode="train")(x), model.adv_head(model.flatten(x)))
    assert model.seen == [("clean", False), ("adv", True)]


def test_make_forward_without_branch_calls_plain_models():
    x, y = _data(2)
    model = _linear_model()
    np.testing.assert_allclose(make_forward(model)(x), model(x, training=False))
    _assert_linf_ball(pgd_linf(make_forward(model, bn_mode="train"), x, y, steps=1), x, EPS_LINF)


def test_make_forward_rejects_bad_bn_mode():
    with pytest.raises(ValueError, match="eval"):
        make_forward(_linear_model(), bn_mode="eval")

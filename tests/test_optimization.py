"""Tests for arat_tf.optimizers (PyTorch-style coupled-decay SGD) and arat_tf.schedules."""

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from arat_tf.optimizers import CoupledWeightDecaySGD
from arat_tf.schedules import (
    LEARNING_RATE_SCHEDULES,
    CosineSchedule,
    EpochPiecewiseSchedule,
    arat_boundaries,
    dual_bn_boundaries,
    make_learning_rate_schedule,
)

MOMENTUM = 0.9
WEIGHT_DECAY = 5e-4
# The learning rate changes at every one of the 5 steps (steps_per_epoch=1), which is what separates
# PyTorch's momentum form from Keras'.
STEP_LRS = [0.02, 0.1, 0.05, 0.01, 0.2]


def _changing_lr_schedule():
    return EpochPiecewiseSchedule([1, 2, 3, 4], STEP_LRS, steps_per_epoch=1)


# ---------------------------------------------------------------------------------------------
# NumPy reference of torch.optim.SGD (dampening=0), written from PyTorch's documented algorithm.
# ---------------------------------------------------------------------------------------------
class TorchSGDReference:
    def __init__(self, weights, momentum, weight_decay, nesterov):
        self.weights = [np.asarray(w, np.float64).copy() for w in weights]
        self.bufs = [None] * len(weights)
        self.momentum, self.weight_decay, self.nesterov = momentum, weight_decay, nesterov

    def step(self, grads, lr):
        for i, (w, g) in enumerate(zip(self.weights, grads)):
            d_p = np.asarray(g, np.float64) + self.weight_decay * w
            if self.momentum != 0:
                if self.bufs[i] is None:
                    self.bufs[i] = d_p.copy()  # torch.clone(d_p): first step buf = g
                else:
                    self.bufs[i] = self.momentum * self.bufs[i] + d_p
                d_p = d_p + self.momentum * self.bufs[i] if self.nesterov else self.bufs[i]
            self.weights[i] = w - lr * d_p


def _make_model():
    """Dense -> BatchNormalization -> Dense: kernels, biases, BN gamma/beta are all trainable."""
    inputs = keras.Input((4,))
    x = keras.layers.Dense(3, name="dense")(inputs)
    x = keras.layers.BatchNormalization(name="bn")(x)
    outputs = keras.layers.Dense(2, name="head")(x)
    return keras.Model(inputs, outputs)


def _data():
    rng = np.random.default_rng(1)
    return rng.normal(size=(8, 4)).astype("float32"), rng.normal(size=(8, 2)).astype("float32")


def _run(optimizer, initial_weights, *, assign_lrs=False, use_tf_function=False, steps=5):
    """Trains `steps` steps; returns per-step (grads, weights-after) as NumPy."""
    model = _make_model()
    model.set_weights(initial_weights)
    x, y = _data()
    variables = model.trainable_variables

    def train_step():
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.square(model(x, training=True) - y))
        grads = tape.gradient(loss, variables)
        optimizer.apply_gradients(zip(grads, variables))
        return grads

    if use_tf_function:
        train_step = tf.function(train_step)
    history = []
    for step in range(steps):
        if assign_lrs:
            optimizer.learning_rate = STEP_LRS[step]
        grads = train_step()
        history.append(([g.numpy() for g in grads], [v.numpy() for v in variables]))
    return model, history


@pytest.fixture
def initial_weights():
    return _make_model().get_weights()


def _trainable_initial(initial_weights):
    model = _make_model()
    model.set_weights(initial_weights)
    return [v.numpy() for v in model.trainable_variables], [v.path for v in model.trainable_variables]


@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize("lr_mode", ["schedule", "assign"])
@pytest.mark.parametrize("use_tf_function", [False, True])
def test_matches_torch_sgd_reference_with_changing_lr(initial_weights, nesterov, lr_mode, use_tf_function):
    start, paths = _trainable_initial(initial_weights)
    assert any(p.endswith("bn/gamma") for p in paths) and any(p.endswith("dense/kernel") for p in paths)
    lr = _changing_lr_schedule() if lr_mode == "schedule" else 0.5  # 0.5 is overwritten each step
    optimizer = CoupledWeightDecaySGD(lr, momentum=MOMENTUM, coupled_weight_decay=WEIGHT_DECAY, nesterov=nesterov)
    _, history = _run(optimizer, initial_weights, assign_lrs=lr_mode == "assign", use_tf_function=use_tf_function)

    reference = TorchSGDReference(start, MOMENTUM, WEIGHT_DECAY, nesterov)
    for step, (grads, weights) in enumerate(history):
        reference.step(grads, STEP_LRS[step])
        for path, got, want in zip(paths, weights, reference.weights):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, err_msg=f"step {step}, {path}")
    assert int(optimizer.iterations.numpy()) == len(STEP_LRS)
    # The decay reaches BN gamma (initialised to 1): without decay it would follow the gradients only.
    gamma_index = next(i for i, p in enumerate(paths) if p.endswith("bn/gamma"))
    no_decay = TorchSGDReference(start, MOMENTUM, 0.0, nesterov)
    for step, (grads, _) in enumerate(history):
        no_decay.step(grads, STEP_LRS[step])
    assert np.max(np.abs(reference.weights[gamma_index] - no_decay.weights[gamma_index])) > 1e-5


def test_momentum_buffer_is_pytorch_form(initial_weights):
    """After one step the slot holds g + wd * w (not -lr * g as in Keras' SGD)."""
    start, _ = _trainable_initial(initial_weights)
    optimizer = CoupledWeightDecaySGD(0.1, momentum=MOMENTUM, coupled_weight_decay=WEIGHT_DECAY)
    _, history = _run(optimizer, initial_weights, steps=1)
    grads, _ = history[0]
    for slot, g, w in zip(optimizer.momentums, grads, start):
        np.testing.assert_allclose(slot.numpy(), g + WEIGHT_DECAY * w, rtol=1e-6, atol=1e-8)
    assert len(optimizer.variables) == 2 + len(start)  # iterations, learning_rate, one slot each


@pytest.mark.parametrize("lr_mode", ["constant", "changing"])
def test_differs_from_keras_decoupled_sgd(initial_weights, lr_mode):
    """Keras' SGD(weight_decay=5e-4, momentum=0.9) is a different optimiser from torch's SGD.

    With a constant LR the two momentum forms coincide, so the gap is purely coupled vs
    decoupled decay; with a changing LR the momentum form adds to it.
    """
    start, _ = _trainable_initial(initial_weights)
    make_lr = _changing_lr_schedule if lr_mode == "changing" else (lambda: 0.1)
    lrs = STEP_LRS if lr_mode == "changing" else [0.1] * len(STEP_LRS)
    ours = CoupledWeightDecaySGD(make_lr(), momentum=MOMENTUM, coupled_weight_decay=WEIGHT_DECAY)
    keras_sgd = keras.optimizers.SGD(make_lr(), momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    _, ours_history = _run(ours, initial_weights)
    _, keras_history = _run(keras_sgd, initial_weights)

    reference = TorchSGDReference(start, MOMENTUM, WEIGHT_DECAY, False)
    for step, (grads, _) in enumerate(ours_history):
        reference.step(grads, lrs[step])
    ours_error = max(np.max(np.abs(a - b)) for a, b in zip(ours_history[-1][1], reference.weights))
    keras_error = max(np.max(np.abs(a - b)) for a, b in zip(keras_history[-1][1], reference.weights))
    assert ours_error < 1e-6
    assert keras_error > 20 * max(ours_error, 1e-7), (ours_error, keras_error)


def test_momentum_form_matters_only_when_lr_changes(initial_weights):
    """Without decay, Keras' momentum form equals PyTorch's at a constant LR but not across LR changes."""
    constant_ours = CoupledWeightDecaySGD(0.05, momentum=MOMENTUM, coupled_weight_decay=0.0)
    constant_keras = keras.optimizers.SGD(0.05, momentum=MOMENTUM)
    _, a = _run(constant_ours, initial_weights)
    _, b = _run(constant_keras, initial_weights)
    for x, y in zip(a[-1][1], b[-1][1]):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)

    changing_ours = CoupledWeightDecaySGD(_changing_lr_schedule(), momentum=MOMENTUM, coupled_weight_decay=0.0)
    changing_keras = keras.optimizers.SGD(_changing_lr_schedule(), momentum=MOMENTUM)
    _, a = _run(changing_ours, initial_weights)
    _, b = _run(changing_keras, initial_weights)
    assert max(np.max(np.abs(x - y)) for x, y in zip(a[-1][1], b[-1][1])) > 1e-3


def test_sparse_gradients_are_decayed_densely():
    embedding = keras.layers.Embedding(5, 2)
    embedding.build((None,))
    start = embedding.embeddings.numpy()
    optimizer = CoupledWeightDecaySGD(0.1, momentum=MOMENTUM, coupled_weight_decay=0.1)
    ids = tf.constant([0, 2, 2])
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(embedding(ids))
    grad = tape.gradient(loss, embedding.embeddings)
    assert isinstance(grad, tf.IndexedSlices)
    optimizer.apply_gradients([(grad, embedding.embeddings)])
    dense = tf.convert_to_tensor(grad).numpy()
    np.testing.assert_allclose(embedding.embeddings.numpy(), start - 0.1 * (dense + 0.1 * start), rtol=1e-6)


def test_mirrored_strategy_matches_single_device(initial_weights):
    x, y = _data()

    def fit(strategy):
        with strategy.scope():
            model = _make_model()
            model.set_weights(initial_weights)
            model.compile(optimizer=CoupledWeightDecaySGD(_changing_lr_schedule()), loss="mse")
        model.fit(x, y, batch_size=4, epochs=1, shuffle=False, verbose=0)
        return model

    single = fit(tf.distribute.get_strategy())
    mirrored = fit(tf.distribute.MirroredStrategy(["/cpu:0"]))
    assert int(mirrored.optimizer.iterations.numpy()) == 2
    for a, b in zip(single.get_weights(), mirrored.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Optimizer config / serialisation
# ---------------------------------------------------------------------------------------------
def test_default_constructor_and_config():
    optimizer = CoupledWeightDecaySGD()
    config = optimizer.get_config()
    assert config["learning_rate"] == pytest.approx(0.1)
    assert (config["momentum"], config["coupled_weight_decay"], config["nesterov"]) == (0.9, 5e-4, False)
    assert config["name"] == "coupled_weight_decay_sgd"
    assert config["weight_decay"] is None  # no Keras decoupled decay


def test_config_round_trips():
    schedule = make_learning_rate_schedule("arat", base_learning_rate=0.1, epochs=100, steps_per_epoch=10)
    optimizer = CoupledWeightDecaySGD(schedule, momentum=0.8, coupled_weight_decay=1e-3, nesterov=True, clipnorm=5.0)
    config = optimizer.get_config()
    assert (config["momentum"], config["coupled_weight_decay"], config["nesterov"]) == (0.8, 1e-3, True)

    restored = CoupledWeightDecaySGD.from_config(dict(config))
    assert restored.get_config() == config
    assert isinstance(restored._learning_rate, EpochPiecewiseSchedule)

    deserialized = keras.optimizers.deserialize(keras.optimizers.serialize(optimizer))
    assert type(deserialized) is CoupledWeightDecaySGD
    assert deserialized.get_config() == config

    float_optimizer = CoupledWeightDecaySGD(0.05, coupled_weight_decay=0.0)
    assert keras.optimizers.deserialize(keras.optimizers.serialize(float_optimizer)).get_config() == (
        float_optimizer.get_config()
    )


def test_saved_model_keeps_optimizer(tmp_path):
    schedule = make_learning_rate_schedule("arat", base_learning_rate=0.1, epochs=3, steps_per_epoch=1)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2), keras.layers.BatchNormalization()])
    model.compile(optimizer=CoupledWeightDecaySGD(schedule, nesterov=True), loss="mse")
    x, y = _data()
    model.fit(x[:, :3], y, batch_size=8, epochs=1, verbose=0)
    path = tmp_path / "model.keras"
    model.save(path)

    loaded = keras.models.load_model(path)
    assert type(loaded.optimizer) is CoupledWeightDecaySGD
    assert loaded.optimizer.get_config() == model.optimizer.get_config()
    assert int(loaded.optimizer.iterations.numpy()) == 1
    for a, b in zip(loaded.optimizer.momentums, model.optimizer.momentums):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"momentum": 1.0}, "momentum=1.0"),
        ({"momentum": -0.1}, "momentum=-0.1"),
        ({"momentum": "0.9"}, "momentum='0.9'"),
        ({"coupled_weight_decay": -1e-4}, "coupled_weight_decay=-0.0001"),
        ({"weight_decay": 5e-4}, "weight_decay=0.0005"),
        ({"momentum": 0.0, "nesterov": True}, "nesterov=True"),
    ],
)
def test_optimizer_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CoupledWeightDecaySGD(**kwargs)


def test_zero_momentum_is_plain_sgd_with_coupled_decay():
    variable = keras.Variable(np.array([1.0, -2.0], "float32"))
    optimizer = CoupledWeightDecaySGD(0.1, momentum=0, coupled_weight_decay=0.01)
    for _ in range(2):
        before = variable.numpy()
        optimizer.apply_gradients([(tf.constant([0.5, 0.5]), variable)])
        np.testing.assert_allclose(variable.numpy(), before - 0.1 * (0.5 + 0.01 * before), rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# Schedules
# ---------------------------------------------------------------------------------------------
def _lr(schedule, step):
    return float(schedule(tf.constant(step, tf.int64)))


def test_arat_schedule_values():
    schedule = make_learning_rate_schedule("arat", base_learning_rate=0.1, epochs=100, steps_per_epoch=10)
    assert schedule.boundaries == [1, 76, 91]
    expected = {
        0: 0.02, 9: 0.02, 10: 0.1, 750: 0.1, 759: 0.1, 760: 0.01, 909: 0.01, 910: 0.001, 999: 0.001, 5000: 0.001,
    }
    for step, value in expected.items():
        assert _lr(schedule, step) == pytest.approx(value, rel=1e-6), step
    # Also evaluated inside a tf.function, as the optimizer does.
    assert float(tf.function(schedule)(tf.constant(760, tf.int64))) == pytest.approx(0.01, rel=1e-6)


@pytest.mark.parametrize("epochs", [1, 2, 3, 4, 5, 10, 13, 50, 99, 100, 101, 200])
def test_scaled_boundaries_are_strictly_increasing(epochs):
    for boundaries in (arat_boundaries(epochs), dual_bn_boundaries(epochs)):
        assert boundaries[0] >= 1
        assert all(b1 > b0 for b0, b1 in zip(boundaries, boundaries[1:])), boundaries
    assert arat_boundaries(epochs)[0] == 1  # the warm-up is always exactly one epoch
    for name in ("arat", "dual_bn"):
        make_learning_rate_schedule(name, base_learning_rate=0.1, epochs=epochs, steps_per_epoch=3)


def test_scaled_boundaries_values():
    assert arat_boundaries(100) == [1, 76, 91]
    assert arat_boundaries(10) == [1, 8, 9]
    assert arat_boundaries(2) == [1, 2, 3]
    assert arat_boundaries(200) == [1, 152, 182]
    assert dual_bn_boundaries(110) == [100, 105]
    assert dual_bn_boundaries(220) == [200, 210]


def test_dual_bn_schedule_values():
    schedule = make_learning_rate_schedule("dual_bn", base_learning_rate=0.1, epochs=110, steps_per_epoch=10)
    assert schedule.boundaries == [100, 105]
    for epoch, value in {0: 0.1, 99: 0.1, 100: 0.01, 104: 0.01, 105: 0.001, 109: 0.001}.items():
        assert _lr(schedule, epoch * 10) == pytest.approx(value, rel=1e-6), epoch
        assert _lr(schedule, epoch * 10 + 9) == pytest.approx(value, rel=1e-6), epoch


def test_cosine_and_constant_schedules():
    schedule = make_learning_rate_schedule("cosine", base_learning_rate=0.1, epochs=10, steps_per_epoch=10)
    assert isinstance(schedule, CosineSchedule) and schedule.total_steps == 100
    assert _lr(schedule, 0) == pytest.approx(0.1, rel=1e-6)
    assert _lr(schedule, 50) == pytest.approx(0.05, rel=1e-6)
    assert _lr(schedule, 25) == pytest.approx(0.05 * (1 + math.cos(math.pi / 4)), rel=1e-6)
    assert _lr(schedule, 100) == pytest.approx(0.0, abs=1e-9)
    assert _lr(schedule, 1000) == pytest.approx(0.0, abs=1e-9)

    constant = make_learning_rate_schedule("constant", base_learning_rate=0.05, epochs=10, steps_per_epoch=10)
    assert [_lr(constant, s) for s in (0, 55, 10_000)] == pytest.approx([0.05] * 3, rel=1e-6)


def test_schedule_config_round_trips():
    for name in LEARNING_RATE_SCHEDULES:
        schedule = make_learning_rate_schedule(name, base_learning_rate=0.1, epochs=20, steps_per_epoch=7)
        restored = keras.optimizers.schedules.deserialize(keras.optimizers.schedules.serialize(schedule))
        assert type(restored) is type(schedule)
        assert restored.get_config() == schedule.get_config()
        assert type(schedule).from_config(schedule.get_config()).get_config() == schedule.get_config()
        for step in (0, 7, 69, 139):
            assert _lr(restored, step) == _lr(schedule, step)
    assert EpochPiecewiseSchedule([2, 5], [0.1, 0.01, 0.001], 3).get_config() == {
        "boundaries": [2, 5], "values": [0.1, 0.01, 0.001], "steps_per_epoch": 3,
    }
    assert CosineSchedule(0.1, 30).get_config() == {"base_learning_rate": 0.1, "total_steps": 30}


def test_schedule_names():
    assert LEARNING_RATE_SCHEDULES == ("arat", "dual_bn", "cosine", "constant")
    with pytest.raises(ValueError, match="arat, dual_bn, cosine, constant"):
        make_learning_rate_schedule("step", base_learning_rate=0.1, epochs=10, steps_per_epoch=1)


@pytest.mark.parametrize(
    "build, match",
    [
        (lambda: EpochPiecewiseSchedule([5, 2], [1.0, 2.0, 3.0], 1), r"boundaries=\[5, 2\]"),
        (lambda: EpochPiecewiseSchedule([2, 2], [1.0, 2.0, 3.0], 1), r"boundaries=\[2, 2\]"),
        (lambda: EpochPiecewiseSchedule([-1], [1.0, 2.0], 1), r"boundaries=\[-1\]"),
        (lambda: EpochPiecewiseSchedule([1.5], [1.0, 2.0], 1), r"boundaries=\[1.5\]"),
        (lambda: EpochPiecewiseSchedule([2, 5], [1.0, 2.0], 1), r"values=\[1.0, 2.0\] \(length 2\)"),
        (lambda: EpochPiecewiseSchedule([2], [1.0, "x"], 1), r"values=\[1.0, 'x'\]"),
        (lambda: EpochPiecewiseSchedule([2], [1.0, 2.0], 0), "steps_per_epoch=0"),
        (lambda: CosineSchedule(-0.1, 10), "base_learning_rate=-0.1"),
        (lambda: CosineSchedule(0.1, 0), "total_steps=0"),
        (lambda: make_learning_rate_schedule("arat", base_learning_rate=0.1, epochs=0, steps_per_epoch=1),
         "epochs=0"),
        (lambda: make_learning_rate_schedule("arat", base_learning_rate=0.1, epochs=10, steps_per_epoch=0),
         "steps_per_epoch=0"),
        (lambda: make_learning_rate_schedule("arat", base_learning_rate=0.0, epochs=10, steps_per_epoch=1),
         "base_learning_rate=0.0"),
    ],
)
def test_schedules_reject_bad_arguments(build, match):
    with pytest.raises(ValueError, match=match):
        build()

"""Tests for arat_tf.layers: branch-aware batch normalisation, cross normalisation, the predictor.

Numerical checks use a NumPy (float64) reference of PyTorch's `BatchNorm2d` semantics: training
normalises with the biased batch variance over (N, H, W); the moving variance tracks the unbiased one;
momentum 0.9 in Keras' convention is PyTorch's 0.1.
"""

import contextlib
import json
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf

from arat_tf.layers import (
    BN_MODES,
    CrossBatchNormalization,
    Predictor,
    SplitBatchNormalization,
    make_normalization,
)
from arat_tf.layers.batch_statistics import training_attack

EPS = 1e-5
MOMENTUM = 0.9
SHAPE = (6, 3, 3, 4)  # N, H, W, C; N even so a "mixed" batch splits into equal halves
ATOL = 1e-5
RTOL = 1e-5

SPLIT_MODES = ("dual", "shared_stats", "shared_affine", "single")
EXPECTED_VARIABLES = {
    "dual": {
        "adv_moving_mean", "adv_moving_variance", "clean_moving_mean", "clean_moving_variance",
        "adv_gamma", "adv_beta", "clean_gamma", "clean_beta",
    },
    "shared_stats": {
        "shared_moving_mean", "shared_moving_variance",
        "adv_gamma", "adv_beta", "clean_gamma", "clean_beta",
    },
    "shared_affine": {
        "adv_moving_mean", "adv_moving_variance", "clean_moving_mean", "clean_moving_variance",
        "shared_gamma", "shared_beta",
    },
    "single": {"shared_moving_mean", "shared_moving_variance", "shared_gamma", "shared_beta"},
    "cross_clean": {"moving_mean", "moving_variance", "gamma", "beta"},
    "cross_adv": {"moving_mean", "moving_variance", "gamma", "beta"},
}


# --------------------------------------------------------------------------------------------------
# helpers


def _batch(seed, shape=SHAPE, loc=0.0, scale=1.0):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=shape) * scale + loc).astype("float32")


def _np_moments(x):
    x = np.asarray(x, np.float64)
    axes = tuple(range(x.ndim - 1))
    n = x.size // x.shape[-1]
    mean = x.mean(axis=axes)
    var = x.var(axis=axes)
    return mean, var, var * n / (n - 1)


def _np_normalize(x, mean, var, gamma, beta):
    x = np.asarray(x, np.float64)
    return (x - mean) / np.sqrt(var + EPS) * gamma + beta


def _np_ema(old, new):
    return MOMENTUM * old + (1.0 - MOMENTUM) * new


def _built(layer, shape=SHAPE):
    layer.build(shape)
    return layer


def _variables_by_name(layer):
    return {v.name: v for v in layer.weights}


def _snapshot(layer):
    return {v.name: np.array(v.numpy(), copy=True) for v in layer.weights}


def _randomize_affine(layer, seed=123):
    """Gives every gamma/beta a distinct non-default value so branch mix-ups show in outputs."""
    rng = np.random.default_rng(seed)
    for v in layer.trainable_weights:
        if v.name.endswith("gamma"):
            v.assign(rng.uniform(0.5, 2.0, size=v.shape).astype("float32"))
        else:
            v.assign(rng.normal(size=v.shape).astype("float32"))


def _clone(layer):
    """A fresh layer with the same config and (copied) weights."""
    other = layer.__class__.from_config(layer.get_config())
    other.build(SHAPE)
    other.set_weights(layer.get_weights())
    return other


def _close(actual, expected, atol=ATOL, rtol=RTOL):
    np.testing.assert_allclose(np.asarray(actual, np.float64), expected, atol=atol, rtol=rtol)


# --------------------------------------------------------------------------------------------------
# make_normalization / variables


@pytest.mark.parametrize("bn_mode", BN_MODES)
def test_make_normalization_variables(bn_mode):
    layer = make_normalization(bn_mode, name=f"bn_{bn_mode}")
    assert layer.name == f"bn_{bn_mode}"
    expected_class = CrossBatchNormalization if bn_mode.startswith("cross") else SplitBatchNormalization
    assert isinstance(layer, expected_class)
    _built(layer)
    names = [v.name for v in layer.weights]
    assert len(names) == len(EXPECTED_VARIABLES[bn_mode])
    assert set(names) == EXPECTED_VARIABLES[bn_mode]
    for v in layer.weights:
        assert tuple(v.shape) == (SHAPE[-1],)
        assert v.trainable == (v.name.endswith("gamma") or v.name.endswith("beta"))
    assert len(layer.trainable_weights) == sum(
        n.endswith(("gamma", "beta")) for n in EXPECTED_VARIABLES[bn_mode]
    )


def test_bn_modes_complete():
    assert set(BN_MODES) == set(EXPECTED_VARIABLES)


def test_make_normalization_variant_flags():
    expected = {
        "dual": (True, True),
        "shared_stats": (False, True),
        "shared_affine": (True, False),
        "single": (False, False),
    }
    for mode, (split_statistics, split_affine) in expected.items():
        layer = make_normalization(mode, synchronized=True)
        assert (layer.split_statistics, layer.split_affine) == (split_statistics, split_affine)
        assert layer.synchronized is True
        assert layer.momentum == MOMENTUM and layer.epsilon == EPS
    assert make_normalization("cross_clean").statistics_from == "clean"
    assert make_normalization("cross_adv").statistics_from == "adv"
    assert make_normalization("cross_adv", synchronized=True).synchronized is True


def test_make_normalization_unknown_name():
    with pytest.raises(ValueError, match="batchnorm_xyz") as err:
        make_normalization("batchnorm_xyz")
    for mode in BN_MODES:
        assert mode in str(err.value)


# --------------------------------------------------------------------------------------------------
# constructor / call validation


@pytest.mark.parametrize("cls", [SplitBatchNormalization, CrossBatchNormalization])
@pytest.mark.parametrize("momentum", [1.0, 1.5, -0.1])
def test_bad_momentum(cls, momentum):
    with pytest.raises(ValueError, match="momentum") as err:
        cls(momentum=momentum)
    assert str(momentum) in str(err.value)


@pytest.mark.parametrize("cls", [SplitBatchNormalization, CrossBatchNormalization])
@pytest.mark.parametrize("epsilon", [0.0, -0.001])
def test_bad_epsilon(cls, epsilon):
    with pytest.raises(ValueError, match="epsilon") as err:
        cls(epsilon=epsilon)
    assert str(epsilon) in str(err.value)


def test_bad_statistics_from():
    with pytest.raises(ValueError, match="statistics_from") as err:
        CrossBatchNormalization(statistics_from="mixed")
    assert "'mixed'" in str(err.value)
    with pytest.raises(ValueError, match="both"):
        CrossBatchNormalization(statistics_from="both")


@pytest.mark.parametrize("bn_mode", BN_MODES)
@pytest.mark.parametrize("training", [True, False])
def test_bad_branch(bn_mode, training):
    layer = _built(make_normalization(bn_mode))
    before = _snapshot(layer)
    with pytest.raises(ValueError, match="sideways"):
        layer(_batch(0), training=training, branch="sideways")
    after = _snapshot(layer)
    for name in before:
        np.testing.assert_array_equal(after[name], before[name])


def test_valid_boundary_arguments():
    SplitBatchNormalization(momentum=0.0, epsilon=1e-12)
    CrossBatchNormalization(momentum=0.0, epsilon=1e-12)


# --------------------------------------------------------------------------------------------------
# branch isolation


@pytest.mark.parametrize("bn_mode", ["dual", "shared_affine"])
@pytest.mark.parametrize("branch", ["adv", "clean"])
def test_training_call_isolates_other_branch(bn_mode, branch):
    other = "clean" if branch == "adv" else "adv"
    layer = _built(make_normalization(bn_mode))
    _randomize_affine(layer)
    # Give the other branch non-default statistics so "bit-identical" is a real check.
    layer(_batch(1, loc=3.0, scale=2.0), training=True, branch=other)
    before = _snapshot(layer)
    layer(_batch(2, loc=-1.0, scale=0.5), training=True, branch=branch)
    after = _snapshot(layer)
    for name in before:
        if name.startswith(other):
            np.testing.assert_array_equal(after[name], before[name], err_msg=name)
    assert not np.array_equal(after[f"{branch}_moving_mean"], before[f"{branch}_moving_mean"])
    assert not np.array_equal(
        after[f"{branch}_moving_variance"], before[f"{branch}_moving_variance"]
    )
    # No trainable variable is changed by a forward pass.
    for v in layer.trainable_weights:
        np.testing.assert_array_equal(after[v.name], before[v.name])


@pytest.mark.parametrize("bn_mode", ["dual", "shared_stats"])
@pytest.mark.parametrize("branch", ["adv", "clean"])
@pytest.mark.parametrize("training", [True, False])
def test_gradient_does_not_reach_other_branch_affine(bn_mode, branch, training):
    other = "clean" if branch == "adv" else "adv"
    layer = _built(make_normalization(bn_mode))
    _randomize_affine(layer)
    x = tf.constant(_batch(3))
    with tf.GradientTape() as tape:
        y = layer(x, training=training, branch=branch)
        loss = tf.reduce_sum(tf.square(y) * tf.range(1.0, SHAPE[-1] + 1.0))
    names = _variables_by_name(layer)
    own = [names[f"{branch}_gamma"], names[f"{branch}_beta"]]
    others = [names[f"{other}_gamma"], names[f"{other}_beta"]]
    grads = tape.gradient(loss, own + others)
    for g in grads[:2]:
        assert g is not None and np.any(np.asarray(g) != 0.0)
    for g in grads[2:]:
        assert g is None or not np.any(np.asarray(g))


@pytest.mark.parametrize("bn_mode", ["dual", "shared_stats"])
def test_gradient_of_mixed_halves_stays_in_own_affine(bn_mode):
    layer = _built(make_normalization(bn_mode))
    _randomize_affine(layer)
    x = tf.constant(_batch(4))
    half = SHAPE[0] // 2
    names = _variables_by_name(layer)
    for idx, branch, other in [(slice(0, half), "adv", "clean"), (slice(half, None), "clean", "adv")]:
        with tf.GradientTape() as tape:
            y = layer(x, training=True, branch="mixed")
            loss = tf.reduce_sum(tf.square(y[idx]) * tf.range(1.0, SHAPE[-1] + 1.0))
        grads = tape.gradient(loss, [names[f"{other}_gamma"], names[f"{other}_beta"],
                                     names[f"{branch}_gamma"], names[f"{branch}_beta"]])
        for g in grads[:2]:
            assert g is None or not np.any(np.asarray(g)), (branch, other)
        for g in grads[2:]:
            assert g is not None and np.any(np.asarray(g) != 0.0)


@pytest.mark.parametrize("bn_mode", BN_MODES)
@pytest.mark.parametrize("branch", ["adv", "clean", "mixed"])
@pytest.mark.parametrize("training", [False, None])
def test_inference_call_changes_nothing(bn_mode, branch, training):
    layer = _built(make_normalization(bn_mode))
    _randomize_affine(layer)
    layer(_batch(5, loc=2.0), training=True, branch="mixed")  # non-default stats everywhere
    before = _snapshot(layer)
    layer(_batch(6, loc=-3.0, scale=4.0), training=training, branch=branch)
    after = _snapshot(layer)
    for name in before:
        np.testing.assert_array_equal(after[name], before[name], err_msg=name)


def test_non_trainable_layer_uses_moving_statistics():
    layer = _built(SplitBatchNormalization())
    layer(_batch(7, loc=1.0), training=True, branch="adv")
    layer.trainable = False
    before = _snapshot(layer)
    x = _batch(8, loc=-2.0)
    y = layer(x, training=True, branch="adv")
    after = _snapshot(layer)
    for name in before:
        np.testing.assert_array_equal(after[name], before[name])
    _close(y, _np_normalize(x, before["adv_moving_mean"], before["adv_moving_variance"],
                            before["adv_gamma"], before["adv_beta"]))


# --------------------------------------------------------------------------------------------------
# values against the NumPy / PyTorch reference


@pytest.mark.parametrize("bn_mode", SPLIT_MODES + ("cross_clean", "cross_adv"))
@pytest.mark.parametrize("branch", ["adv", "clean"])
def test_single_branch_matches_pytorch_reference(bn_mode, branch):
    layer = _built(make_normalization(bn_mode))
    _randomize_affine(layer)
    weights = _snapshot(layer)
    if isinstance(layer, CrossBatchNormalization):
        mean_key, var_key, gamma_key, beta_key = "moving_mean", "moving_variance", "gamma", "beta"
    else:
        stats = branch if layer.split_statistics else "shared"
        affine = branch if layer.split_affine else "shared"
        mean_key, var_key = f"{stats}_moving_mean", f"{stats}_moving_variance"
        gamma_key, beta_key = f"{affine}_gamma", f"{affine}_beta"
    gamma, beta = weights[gamma_key], weights[beta_key]
    moving_mean = np.zeros(SHAPE[-1])
    moving_var = np.ones(SHAPE[-1])

    for seed, loc, scale in [(10, 1.5, 2.0), (11, -0.5, 0.3)]:
        x = _batch(seed, loc=loc, scale=scale)
        y = layer(x, training=True, branch=branch)
        mean, var, var_unbiased = _np_moments(x)
        _close(y, _np_normalize(x, mean, var, gamma, beta))
        moving_mean = _np_ema(moving_mean, mean)
        moving_var = _np_ema(moving_var, var_unbiased)
        now = _snapshot(layer)
        _close(now[mean_key], moving_mean)
        _close(now[var_key], moving_var)

    x = _batch(12, loc=0.7)
    y = layer(x, training=False, branch=branch)
    _close(y, _np_normalize(x, moving_mean, moving_var, gamma, beta))


def test_default_arguments_match_pytorch():
    layer = SplitBatchNormalization()
    assert layer.split_statistics and layer.split_affine
    assert layer.momentum == MOMENTUM and layer.epsilon == EPS and layer.synchronized is False
    cross = CrossBatchNormalization()
    assert cross.statistics_from == "clean"
    assert cross.momentum == MOMENTUM and cross.epsilon == EPS and cross.synchronized is False


def test_fresh_layer_initial_values_and_default_branch():
    layer = _built(SplitBatchNormalization())
    for name, value in _snapshot(layer).items():
        expected = 1.0 if name.endswith(("gamma", "moving_variance")) else 0.0
        np.testing.assert_array_equal(value, np.full(SHAPE[-1], expected, np.float32))
    before = _snapshot(layer)
    layer(_batch(13, loc=1.0), training=True)  # default branch is "adv"
    after = _snapshot(layer)
    assert not np.array_equal(after["adv_moving_mean"], before["adv_moving_mean"])
    np.testing.assert_array_equal(after["clean_moving_mean"], before["clean_moving_mean"])


def test_rank2_inputs():
    layer = SplitBatchNormalization()
    x = _batch(14, shape=(8, 5), loc=2.0)
    y = layer(x, training=True, branch="clean")
    mean, var, var_unbiased = _np_moments(x)
    _close(y, _np_normalize(x, mean, var, 1.0, 0.0))
    _close(layer.clean_moving_variance.numpy(), _np_ema(np.ones(5), var_unbiased))


# --------------------------------------------------------------------------------------------------
# "mixed" calls


@pytest.mark.parametrize("bn_mode", ["dual", "shared_affine"])
def test_mixed_with_split_statistics_equals_per_branch_calls(bn_mode):
    mixed_layer = _built(make_normalization(bn_mode))
    _randomize_affine(mixed_layer)
    split_layer = _clone(mixed_layer)
    half = SHAPE[0] // 2
    for seed in (20, 21):
        adv = _batch(seed, shape=(half, *SHAPE[1:]), loc=2.0, scale=3.0)
        clean = _batch(seed + 100, shape=(half, *SHAPE[1:]), loc=-1.0, scale=0.5)
        y_mixed = mixed_layer(np.concatenate([adv, clean]), training=True, branch="mixed")
        y_adv = split_layer(adv, training=True, branch="adv")
        y_clean = split_layer(clean, training=True, branch="clean")
        _close(y_mixed, np.concatenate([y_adv, y_clean]), atol=1e-6)
        # Also against the NumPy reference, half by half.
        for part, out, branch in [(adv, y_mixed[:half], "adv"), (clean, y_mixed[half:], "clean")]:
            mean, var, _ = _np_moments(part)
            gamma, beta = (v.numpy() for v in mixed_layer.affine_parameters(branch))
            _close(out, _np_normalize(part, mean, var, gamma, beta))
        got, want = _snapshot(mixed_layer), _snapshot(split_layer)
        for name in want:
            np.testing.assert_allclose(got[name], want[name], atol=1e-6, rtol=1e-6, err_msg=name)
    # Each half drove only its own statistics: adv stats track the adv halves (mean ~ +2).
    assert np.all(mixed_layer.adv_moving_mean.numpy() > 0.1)
    assert np.all(mixed_layer.clean_moving_mean.numpy() < 0.0)
    # Inference on a mixed batch uses each branch's moving statistics.
    x = _batch(22)
    y = mixed_layer(x, training=False, branch="mixed")
    _close(y, np.concatenate([split_layer(x[:half], training=False, branch="adv"),
                              split_layer(x[half:], training=False, branch="clean")]), atol=1e-6)


def test_mixed_with_split_statistics_reference_moving_stats():
    layer = _built(make_normalization("dual"))
    half = SHAPE[0] // 2
    x = _batch(23, loc=1.0, scale=2.0)
    layer(x, training=True, branch="mixed")
    for part, branch in [(x[:half], "adv"), (x[half:], "clean")]:
        mean, _, var_unbiased = _np_moments(part)
        moving_mean, moving_var = layer.moving_statistics(branch)
        _close(moving_mean.numpy(), _np_ema(0.0, mean))
        _close(moving_var.numpy(), _np_ema(1.0, var_unbiased))


@pytest.mark.parametrize("bn_mode", ["shared_stats", "single"])
def test_mixed_with_shared_statistics_uses_whole_batch(bn_mode):
    layer = _built(make_normalization(bn_mode))
    _randomize_affine(layer)
    if bn_mode == "shared_stats":
        adv_gamma, adv_beta = (v.numpy() for v in layer.affine_parameters("adv"))
        clean_gamma, clean_beta = (v.numpy() for v in layer.affine_parameters("clean"))
        assert not np.allclose(adv_gamma, clean_gamma) and not np.allclose(adv_beta, clean_beta)
    half = SHAPE[0] // 2
    moving_mean, moving_var = np.zeros(SHAPE[-1]), np.ones(SHAPE[-1])
    for seed in (30, 31):
        adv = _batch(seed, shape=(half, *SHAPE[1:]), loc=2.0, scale=3.0)
        clean = _batch(seed + 100, shape=(half, *SHAPE[1:]), loc=-1.0, scale=0.5)
        x = np.concatenate([adv, clean])
        y = np.asarray(layer(x, training=True, branch="mixed"))
        mean, var, var_unbiased = _np_moments(x)
        adv_gamma, adv_beta = (v.numpy() for v in layer.affine_parameters("adv"))
        clean_gamma, clean_beta = (v.numpy() for v in layer.affine_parameters("clean"))
        _close(y[:half], _np_normalize(adv, mean, var, adv_gamma, adv_beta))
        _close(y[half:], _np_normalize(clean, mean, var, clean_gamma, clean_beta))
        moving_mean, moving_var = _np_ema(moving_mean, mean), _np_ema(moving_var, var_unbiased)
        layer_mean, layer_var = layer.moving_statistics("adv")
        assert layer.moving_statistics("clean")[0] is layer_mean
        _close(layer_mean.numpy(), moving_mean)
        _close(layer_var.numpy(), moving_var)
    x = _batch(32)
    y = np.asarray(layer(x, training=False, branch="mixed"))
    _close(y[:half], _np_normalize(x[:half], moving_mean, moving_var, adv_gamma, adv_beta))
    _close(y[half:], _np_normalize(x[half:], moving_mean, moving_var, clean_gamma, clean_beta))


# --------------------------------------------------------------------------------------------------
# CrossBatchNormalization


@pytest.mark.parametrize("statistics_from", ["clean", "adv"])
def test_cross_mixed_uses_named_half_statistics(statistics_from):
    layer = _built(CrossBatchNormalization(statistics_from=statistics_from))
    _randomize_affine(layer)
    gamma, beta = layer.gamma.numpy(), layer.beta.numpy()
    half = SHAPE[0] // 2
    moving_mean, moving_var = np.zeros(SHAPE[-1]), np.ones(SHAPE[-1])
    for seed in (40, 41):
        adv = _batch(seed, shape=(half, *SHAPE[1:]), loc=2.0, scale=3.0)
        clean = _batch(seed + 100, shape=(half, *SHAPE[1:]), loc=-1.0, scale=0.5)
        x = np.concatenate([adv, clean])
        y = layer(x, training=True, branch="mixed")
        source = clean if statistics_from == "clean" else adv
        mean, var, var_unbiased = _np_moments(source)
        _close(y, _np_normalize(x, mean, var, gamma, beta), atol=1e-4)
        moving_mean, moving_var = _np_ema(moving_mean, mean), _np_ema(moving_var, var_unbiased)
        _close(layer.moving_mean.numpy(), moving_mean)
        _close(layer.moving_variance.numpy(), moving_var)
    x = _batch(42, loc=0.3)
    for branch in ("mixed", "adv", "clean"):
        y = layer(x, training=False, branch=branch)
        _close(y, _np_normalize(x, moving_mean, moving_var, gamma, beta))


@pytest.mark.parametrize("statistics_from", ["clean", "adv"])
def test_cross_single_branch_is_ordinary_bn(statistics_from):
    layer = _built(CrossBatchNormalization(statistics_from=statistics_from))
    reference = _built(keras.layers.BatchNormalization(momentum=MOMENTUM, epsilon=EPS))
    x = _batch(43, loc=1.0, scale=2.0)
    for branch in ("adv", "clean"):
        y = layer(x, training=True, branch=branch)
        y_ref = reference(x, training=True)
        _close(y, np.asarray(y_ref))
    mean, _, var_unbiased = _np_moments(x)
    _close(layer.moving_mean.numpy(), _np_ema(_np_ema(0.0, mean), mean))
    _close(layer.moving_variance.numpy(), _np_ema(_np_ema(1.0, var_unbiased), var_unbiased))


# --------------------------------------------------------------------------------------------------
# Keras conventions: config, serialisation, tf.function


@pytest.mark.parametrize(
    "layer",
    [
        SplitBatchNormalization(name="sbn"),
        SplitBatchNormalization(
            split_statistics=False, split_affine=True, momentum=0.5, epsilon=1e-3,
            synchronized=True, name="sbn2"),
        SplitBatchNormalization(split_statistics=True, split_affine=False),
        CrossBatchNormalization(statistics_from="adv", momentum=0.8, epsilon=1e-4, synchronized=True),
        CrossBatchNormalization(),
        Predictor(hidden_ratio=0.5, name="pred"),
    ],
    ids=lambda layer: layer.name,
)
def test_config_round_trip(layer):
    config = layer.get_config()
    json.dumps(config)
    restored = layer.__class__.from_config(config)
    assert restored.get_config() == config
    for key in ("split_statistics", "split_affine", "statistics_from", "momentum", "epsilon",
                "synchronized", "hidden_ratio"):
        if hasattr(layer, key):
            assert getattr(restored, key) == getattr(layer, key)
    # Generic Keras serialisation finds the registered class.
    again = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(layer))
    assert type(again) is type(layer) and again.get_config() == config


@keras.saving.register_keras_serializable(package="arat_tf_tests")
class _TinyDualModel(keras.Model):
    def __init__(self, bn_mode="dual", **kwargs):
        super().__init__(**kwargs)
        self.bn_mode = bn_mode
        self.conv = keras.layers.Conv2D(4, 3, padding="same", use_bias=False, name="conv")
        self.norm = make_normalization(bn_mode, name="norm")
        self.pool = keras.layers.GlobalAveragePooling2D()
        self.head = keras.layers.Dense(3, name="head")

    def build(self, input_shape):
        self.conv.build(input_shape)
        feature_shape = (*input_shape[:-1], 4)
        self.norm.build(feature_shape)
        self.pool.build(feature_shape)
        self.head.build((input_shape[0], 4))
        self.built = True

    def call(self, x, training=None, branch="adv"):
        h = self.norm(self.conv(x), training=training, branch=branch)
        return self.head(self.pool(keras.ops.relu(h)))

    def get_config(self):
        config = super().get_config()
        config.update(bn_mode=self.bn_mode)
        return config


@pytest.mark.parametrize("bn_mode", ["dual", "cross_adv"])
def test_saved_model_reloads_with_identical_outputs(tmp_path, bn_mode):
    model = _TinyDualModel(bn_mode=bn_mode)
    x = _batch(50, shape=(4, 5, 5, 3))
    model(x, training=False)
    _randomize_affine(model.norm)
    model(_batch(51, shape=(4, 5, 5, 3), loc=1.0, scale=2.0), training=True, branch="adv")
    model(_batch(52, shape=(4, 5, 5, 3), loc=-1.0, scale=0.5), training=True, branch="clean")
    path = tmp_path / "tiny.keras"
    model.save(path)
    restored = keras.models.load_model(path)
    assert isinstance(restored, _TinyDualModel)
    assert isinstance(restored.norm, type(model.norm))
    assert [v.name for v in restored.weights] == [v.name for v in model.weights]
    for a, b in zip(restored.weights, model.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.path)
    outputs = {}
    for branch in ("adv", "clean", "mixed"):
        y = model(x, training=False, branch=branch).numpy()
        y_restored = restored(x, training=False, branch=branch).numpy()
        np.testing.assert_array_equal(y_restored, y)
        outputs[branch] = y
    if bn_mode == "dual":
        # Both branches really differ, so the comparison above covered two distinct paths.
        assert not np.allclose(outputs["adv"], outputs["clean"])


@pytest.mark.parametrize("bn_mode", BN_MODES)
def test_tf_function_matches_eager(bn_mode):
    eager = _built(make_normalization(bn_mode))
    _randomize_affine(eager)
    graph = _clone(eager)

    @tf.function
    def run(x, branch, training):
        return graph(x, training=training, branch=branch)

    for i, (branch, training) in enumerate(
        [("adv", True), ("clean", True), ("mixed", True), ("adv", True),
         ("adv", False), ("clean", False), ("mixed", False)]
    ):
        x = _batch(60 + i, loc=float(i) - 2.0, scale=1.0 + i)
        y_eager = eager(x, training=training, branch=branch)
        y_graph = run(tf.constant(x), branch, training)
        _close(y_graph, np.asarray(y_eager), atol=1e-5)
        got, want = _snapshot(graph), _snapshot(eager)
        for name in want:
            np.testing.assert_allclose(got[name], want[name], atol=1e-6, rtol=1e-6, err_msg=name)


def test_tf_function_with_unknown_batch_size():
    layer = _built(SplitBatchNormalization(split_statistics=False))

    @tf.function(input_signature=[tf.TensorSpec((None, *SHAPE[1:]), tf.float32)])
    def run(x):
        return layer(x, training=True, branch="mixed")

    x = _batch(70, loc=1.0)
    y = run(tf.constant(x))
    mean, var, var_unbiased = _np_moments(x)
    _close(y, _np_normalize(x, mean, var, 1.0, 0.0))
    _close(layer.shared_moving_variance.numpy(), _np_ema(1.0, var_unbiased))


# --------------------------------------------------------------------------------------------------
# Predictor


def test_predictor_shapes():
    head = Predictor(hidden_ratio=0.25)
    z = _batch(80, shape=(4, 512))
    out = head(z, training=True)
    assert tuple(out.shape) == (4, 512)
    assert head.compute_output_shape((None, 512)) == (None, 512)
    assert tuple(head.hidden_dense.kernel.shape) == (512, 128)
    assert head.hidden_dense.use_bias is False and head.hidden_dense.bias is None
    gamma, _ = head.hidden_norm.affine_parameters("adv")
    moving_mean, _ = head.hidden_norm.moving_statistics("adv")
    assert tuple(gamma.shape) == (128,) and tuple(moving_mean.shape) == (128,)
    assert head.hidden_norm.momentum == MOMENTUM and head.hidden_norm.epsilon == EPS
    assert tuple(head.output_dense.kernel.shape) == (128, 512)
    assert tuple(head.output_dense.bias.shape) == (512,)
    assert len(head.weights) == 7 and len(head.trainable_weights) == 5
    assert tuple(head(z, training=False).shape) == (4, 512)


def test_predictor_hidden_width_is_the_authors_floor():
    """`int(d * ratio)`, as the authors' `hidden_dim = int(feat_dim * pred_dim_ratio)`."""
    head = Predictor(hidden_ratio=0.3)
    head.build((None, 50))
    assert tuple(head.hidden_dense.kernel.shape) == (50, 15)


def test_predictor_bn_keeps_pytorch_style_moving_statistics():
    """The head's BN updates its moving variance with the UNBIASED batch variance, as PyTorch's
    BatchNorm1d in the authors' head (for a batch of 8 a factor 8/7 over Keras' biased one)."""
    head = Predictor()
    z = _batch(81, shape=(8, 16), loc=1.0)
    head(z, training=False)
    moving_mean, moving_variance = (v.numpy().copy() for v in head.hidden_norm.moving_statistics("adv"))
    head(z, training=True)
    hidden = head.hidden_dense(z).numpy().astype("float64")
    _close(head.hidden_norm.moving_statistics("adv")[0].numpy(),
           MOMENTUM * moving_mean + (1 - MOMENTUM) * hidden.mean(0))
    _close(head.hidden_norm.moving_statistics("adv")[1].numpy(),
           MOMENTUM * moving_variance + (1 - MOMENTUM) * hidden.var(0, ddof=1))
    assert tuple(head.hidden_dense.kernel.shape) == (16, 4)


def test_predictor_starts_from_pytorch_default_initialisation():
    """Kernels and the output bias U(-1/sqrt(fan_in), 1/sqrt(fan_in)), as `nn.Linear`."""
    keras.utils.set_random_seed(3)
    head = Predictor()
    head.build((None, 1024))
    for weights, fan_in in ((head.hidden_dense.kernel, 1024), (head.output_dense.kernel, 256),
                            (head.output_dense.bias, 256)):
        values = np.asarray(weights)
        bound = 1.0 / np.sqrt(fan_in)
        assert np.abs(values).max() <= bound
        assert np.abs(values).max() > 0.95 * bound and abs(values.mean()) < 0.05 * bound
        np.testing.assert_allclose(values.std(), bound / np.sqrt(3.0), rtol=0.1)


def test_predictor_config_round_trip():
    head = Predictor(hidden_ratio=0.5)
    restored = Predictor.from_config(head.get_config())
    assert restored.hidden_ratio == 0.5
    z = _batch(82, shape=(2, 8))
    head(z)
    restored(z)
    restored.set_weights(head.get_weights())
    np.testing.assert_array_equal(restored(z, training=False).numpy(), head(z, training=False).numpy())


@pytest.mark.parametrize("ratio", [0.0, -0.25])
def test_predictor_bad_ratio(ratio):
    with pytest.raises(ValueError, match="hidden_ratio") as err:
        Predictor(hidden_ratio=ratio)
    assert str(ratio) in str(err.value)


# --------------------------------------------------------------------------------------------------
# synchronized=True under MirroredStrategy (subprocess: the logical devices must be set before TF runs)

_SYNC_SCRIPT = textwrap.dedent(
    """
    import json, os
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import numpy as np
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration(), tf.config.LogicalDeviceConfiguration()])
    import keras
    from arat_tf.layers import make_normalization

    rng = np.random.default_rng(0)
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    result = {"replicas": strategy.num_replicas_in_sync, "cases": []}
    for bn_mode in ["dual", "single", "cross_clean"]:
        for use_function in [True, False]:
            try:
                reference = make_normalization(bn_mode)
                reference.build((8, 3, 3, 4))
                with strategy.scope():
                    layer = make_normalization(bn_mode, synchronized=True)
                    layer.build((8, 3, 3, 4))
                layer.set_weights(reference.get_weights())
                diffs = {"output": 0.0}
                for step in range(2):
                    # Replicas see very different data, so local statistics would be wrong.
                    x = np.concatenate([
                        rng.normal(size=(4, 3, 3, 4)) * 3.0 + 2.0,
                        rng.normal(size=(4, 3, 3, 4)) * 0.5 - 1.0,
                    ]).astype("float32")
                    y_ref = reference(x, training=True, branch="adv").numpy()
                    dist = strategy.experimental_distribute_values_from_function(
                        lambda ctx: tf.constant(x[ctx.replica_id_in_sync_group * 4:
                                                  (ctx.replica_id_in_sync_group + 1) * 4]))
                    def replica_fn(batch):
                        return layer(batch, training=True, branch="adv")
                    fn = tf.function(replica_fn) if use_function else replica_fn
                    out = strategy.run(fn, args=(dist,))
                    y = np.concatenate(
                        [t.numpy() for t in strategy.experimental_local_results(out)])
                    diffs["output"] = max(diffs["output"], float(np.abs(y - y_ref).max()))
                for a, b in zip(layer.weights, reference.weights):
                    values = [v.numpy() for v in strategy.experimental_local_results(a.value)] \
                        if hasattr(a, "value") and hasattr(a.value, "values") else [a.numpy()]
                    diffs[a.name] = max(float(np.abs(v - b.numpy()).max()) for v in values)
                result["cases"].append(
                    {"bn_mode": bn_mode, "function": use_function, "diffs": diffs})
            except Exception as exc:  # reported to the test, which prints it
                result["cases"].append({"bn_mode": bn_mode, "function": use_function,
                                        "error": f"{type(exc).__name__}: {exc}"[:2000]})
    # Negative control: without synchronisation each replica normalises with its local statistics.
    local = make_normalization("single", synchronized=False)
    with strategy.scope():
        local.build((8, 3, 3, 4))
    x = np.concatenate([rng.normal(size=(4, 3, 3, 4)) * 3.0 + 2.0,
                        rng.normal(size=(4, 3, 3, 4)) * 0.5 - 1.0]).astype("float32")
    reference = make_normalization("single")
    y_ref = reference(x, training=True, branch="adv").numpy()
    dist = strategy.experimental_distribute_values_from_function(
        lambda ctx: tf.constant(x[ctx.replica_id_in_sync_group * 4:
                                  (ctx.replica_id_in_sync_group + 1) * 4]))
    out = strategy.run(lambda b: local(b, training=True, branch="adv"), args=(dist,))
    y = np.concatenate([t.numpy() for t in strategy.experimental_local_results(out)])
    result["unsynchronized_output_diff"] = float(np.abs(y - y_ref).max())
    print("RESULT " + json.dumps(result))
    """
)


def test_synchronized_mirrored_strategy_matches_global_batch():
    proc = subprocess.run(
        [sys.executable, "-c", _SYNC_SCRIPT], capture_output=True, text=True, timeout=300
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-4000:]
    result = json.loads(lines[-1][len("RESULT "):])
    assert result["replicas"] == 2
    assert len(result["cases"]) == 6
    assert result["unsynchronized_output_diff"] > 0.1  # the check can tell local from global stats
    failures = []
    for case in result["cases"]:
        if "error" in case:
            failures.append(case)
            continue
        for name, diff in case["diffs"].items():
            if not diff <= 1e-5:
                failures.append({**case, "bad": name})
    assert not failures, json.dumps(failures, indent=1)


# --------------------------------------------------------------------------------------------------
# Accuracy of training-mode BN (the statistics and the backward pass)


def _np_batch_norm_gradients(x, gamma, upstream):
    """float64 closed form: (dx, dgamma, dbeta) of training-mode BN for an upstream gradient."""
    x, upstream = np.asarray(x, np.float64), np.asarray(upstream, np.float64)
    axes = tuple(range(x.ndim - 1))
    mean, var, _ = _np_moments(x)
    xhat = (x - mean) / np.sqrt(var + EPS)
    dbeta, dgamma = upstream.sum(axes), (upstream * xhat).sum(axes)
    n = x.size // x.shape[-1]
    dx = gamma / np.sqrt(var + EPS) * (upstream - (dbeta + xhat * dgamma) / n)
    return dx, dgamma, dbeta


@pytest.mark.parametrize("in_attack", [False, True], ids=["update", "training_attack"])
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "tf.function"])
def test_training_bn_is_accurate_on_an_offset_batch(compiled, in_attack):
    """Batch statistics and gradients in float32 stay close to float64 on a CIFAR-sized batch
    (32 x 32 x 32 pixels per channel) whose mean is 3 standard deviations from zero, as after a
    convolution.

    A one-level float32 sum over 32,768 elements (TensorFlow's fused CPU kernel) gets the mean
    wrong by ~3e-6 relative here, the outputs by 2.4e-5 and the input gradient by 2.2e-6 (all
    above the bounds below; two-level sums: 2e-7, 1.6e-6 and 1.6e-7). ARAT's attack
    differentiates through twenty such BNs at every PGD step, so this is what decides whether
    its trajectory follows the authors' float64 one (tests/test_reference_fidelity.py). Inside a
    training attack a CPU-only host differentiates with TensorFlow's fused gradient kernel, given
    the same accurate statistics: the same bounds hold."""
    layer = _built(SplitBatchNormalization(), shape=(32, 32, 32, 4))
    gamma, beta = layer.affine_parameters("adv")
    gamma.assign([0.5, 1.0, 1.5, 2.0])
    x = _batch(90, shape=(32, 32, 32, 4), loc=3.0)
    upstream = _batch(91, shape=(32, 32, 32, 4), loc=0.3)

    def forward_and_gradients(images):
        with tf.GradientTape() as tape:
            tape.watch(images)
            outputs = layer(images, training=True, branch="adv")
            loss = tf.reduce_sum(outputs * upstream)
        return (outputs, *tape.gradient(loss, [images, gamma, beta]))

    run = tf.function(forward_and_gradients) if compiled else forward_and_gradients
    with training_attack() if in_attack else contextlib.nullcontext():
        outputs, dx, dgamma, dbeta = run(tf.constant(x))
    mean, var, var_unbiased = _np_moments(x)
    np.testing.assert_allclose(outputs, _np_normalize(x, mean, var, gamma.numpy(), 0.0),
                               rtol=0, atol=1e-5)
    expected = _np_batch_norm_gradients(x, gamma.numpy(), upstream)
    # dgamma and dbeta are sums over the 32,768 values of a channel, whichever kernel computes
    # them (measured: 2e-5 and 1e-7 with oneDNN, 1.7e-6 for dbeta with TF's own Eigen kernel).
    for name, actual, reference, bound in zip(("dx", "dgamma", "dbeta"), (dx, dgamma, dbeta),
                                              expected, (1e-6, 1e-4, 1e-5)):
        relative = np.linalg.norm(np.asarray(actual, np.float64) - reference) / np.linalg.norm(reference)
        assert relative < bound, (name, relative)
    moving_mean, moving_variance = layer.moving_statistics("adv")
    _close(moving_mean.numpy(), _np_ema(0.0, mean), rtol=1e-6, atol=0)
    _close(moving_variance.numpy(), _np_ema(1.0, var_unbiased), rtol=1e-5, atol=0)

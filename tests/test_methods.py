"""Behaviour tests for arat_tf.methods: the invariants (docs/method.md) of every training method."""

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf

import arat_tf  # noqa: F401
from arat_tf.attacks import AttackConfig
from arat_tf.callbacks import CeWeightAutoBalance
from arat_tf.layers import Predictor
from arat_tf.methods import (
    METHOD_DEFAULTS,
    AratTrainer,
    HybridTrainer,
    MartTrainer,
    PgdAtTrainer,
    TradesTrainer,
)
from arat_tf.methods.arat import cosine_similarity, invariance_distance
from arat_tf.methods.trades import kl_batchmean
from arat_tf.models import build_model
from near_ties import correct_count_range

IMAGE_SHAPE = (28, 28, 1)
NUM_CLASSES = 10
EPS = 8 / 255
# eps = 0 and a zero start: the "attack" returns x exactly, so a train step is deterministic.
NO_ATTACK = AttackConfig(steps=1, eps=0.0, step_size=0.0, start="zero")
ZERO_START_PGD = AttackConfig(steps=2, eps=EPS, step_size=2 / 255, start="zero")
SPLIT_BN_MODES = ("dual", "shared_stats", "shared_affine")


def small_cnn(bn_mode="dual", num_classes=NUM_CLASSES):
    return build_model(
        "small_cnn", num_classes=num_classes, image_shape=IMAGE_SHAPE, bn_mode=bn_mode, width=0.25
    )


def tiny_resnet(bn_mode="dual"):
    return build_model(
        "resnet", num_classes=NUM_CLASSES, image_shape=(32, 32, 3), bn_mode=bn_mode, depth=10,
        width=0.125,
    )


def random_batch(batch=8, shape=IMAGE_SHAPE, seed=0, num_classes=NUM_CLASSES):
    rng = np.random.RandomState(seed)
    images = rng.rand(batch, *shape).astype("float32")
    labels = rng.randint(0, num_classes, batch).astype("int32")
    return tf.constant(images), tf.constant(labels)


def make_trainer(method, classifier=None, **kwargs):
    """The method's trainer with its protocol defaults (bn_mode, attack BN mode, attack start)."""
    defaults = METHOD_DEFAULTS[method]
    if classifier is None:
        classifier = small_cnn(defaults.bn_mode)
    kwargs.setdefault("train_attack", AttackConfig(steps=2, start=defaults.attack_start))
    kwargs.setdefault("eval_attack", AttackConfig(steps=2))
    kwargs.setdefault("attack_bn_mode", defaults.attack_bn_mode)
    return defaults.trainer_class(classifier, **kwargs)


def snapshot(variables):
    return {v.path: np.array(v.numpy()) for v in variables}


def nonzero(gradient):
    return gradient is not None and float(tf.reduce_max(tf.abs(gradient))) > 0.0


def np_softmax(logits):
    shifted = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(shifted)
    return e / e.sum(axis=-1, keepdims=True)


def np_log_softmax(logits):
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def np_cross_entropy(logits, labels):
    return float(-np.mean(np_log_softmax(logits)[np.arange(len(labels)), labels]))


# ---------------------------------------------------------------------------------------------
# ARAT: stop-gradient, predictor, invariance, loss composition
# ---------------------------------------------------------------------------------------------
def _invariance_gradients(asymmetric, use_predictor=True):
    model = tiny_resnet("dual")
    trainer = AratTrainer(
        model, asymmetric=asymmetric, use_predictor=use_predictor, attack_bn_mode="train",
        train_attack=AttackConfig(steps=1),
    )
    images, labels = random_batch(8, shape=(32, 32, 3))
    adversarial = trainer.generate_adversarial(images, labels)
    variables = trainer.trainable_variables
    with tf.GradientTape(persistent=True) as tape:
        _, terms, _, _ = trainer.compute_losses(images, adversarial, labels)
    invariance_grads = dict(zip([v.path for v in variables], tape.gradient(terms["invariance"], variables)))
    ce_clean_grads = dict(zip([v.path for v in variables], tape.gradient(terms["ce_clean"], variables)))
    assert float(terms["invariance"]) > 0.0
    return variables, invariance_grads, ce_clean_grads


def test_asymmetric_invariance_gradient_never_reaches_the_clean_branch():
    variables, grads, ce_clean_grads = _invariance_gradients(asymmetric=True)
    clean_paths = [v.path for v in variables if "clean_" in v.path]
    assert clean_paths, "a dual-BN model has trainable clean-branch variables"
    for path in clean_paths:
        g = grads[path]
        assert g is None or not np.any(g.numpy()), f"invariance gradient reaches {path}"
    # The clean branch is trainable at all: the clean CE reaches it (so the check above is not vacuous).
    assert any(nonzero(ce_clean_grads[p]) for p in clean_paths)

    adv_affine = [p for p in grads if "adv_gamma" in p or "adv_beta" in p]
    kernels = [p for p in grads if p.endswith("kernel") and "predictor" not in p]
    predictor = [p for p in grads if "predictor" in p]
    assert adv_affine and kernels and predictor
    assert any(nonzero(grads[p]) for p in adv_affine), "no invariance gradient on adv gamma/beta"
    assert any(nonzero(grads[p]) for p in kernels), "no invariance gradient on conv kernels"
    assert any(nonzero(grads[p]) for p in predictor), "no invariance gradient on the predictor"


def test_symmetric_ablation_sends_invariance_gradient_to_the_clean_branch():
    variables, grads, _ = _invariance_gradients(asymmetric=False)
    clean_paths = [v.path for v in variables if "clean_" in v.path]
    assert any(nonzero(grads[p]) for p in clean_paths)


def test_without_predictor_there_are_no_predictor_variables():
    trainer = AratTrainer(tiny_resnet("dual"), use_predictor=False)
    assert not trainer.predictors
    assert not [v for v in trainer.trainable_variables if "predictor" in v.path]
    assert not [v for v in trainer.variables if "predictor" in v.path]
    classifier_count = len(trainer.classifier.trainable_variables)
    assert len(trainer.trainable_variables) == classifier_count


@pytest.mark.parametrize("name", ["resnet", "preact_resnet", "small_cnn"])
def test_one_predictor_per_tap_with_quarter_hidden_width(name):
    if name == "small_cnn":
        model = small_cnn("dual")
        shape = IMAGE_SHAPE
    else:
        model = build_model(name, num_classes=10, image_shape=(32, 32, 3), depth=10, width=0.125)
        shape = (32, 32, 3)
    trainer = AratTrainer(model, use_predictor=True)
    assert list(trainer.predictors) == list(model.tap_names)
    _, taps = model(tf.zeros((2,) + shape), return_taps=True)
    for tap_name, predictor in trainer.predictors.items():
        assert isinstance(predictor, Predictor)
        d = int(taps[tap_name].shape[-1])
        assert tuple(predictor.hidden_dense.kernel.shape) == (d, round(d * 0.25)), tap_name
        assert tuple(predictor.output_dense.kernel.shape) == (round(d * 0.25), d), tap_name
        assert tuple(predictor(taps[tap_name], training=False).shape) == (2, d)
    predictor_variables = [v for v in trainer.trainable_variables if "predictor" in v.path]
    # hidden kernel, BN gamma/beta, output kernel/bias per tap.
    assert len(predictor_variables) == 5 * len(model.tap_names)


@pytest.mark.parametrize("distance", ["cos", "mse"])
@pytest.mark.parametrize("factory", [small_cnn, tiny_resnet], ids=["small_cnn", "resnet"])
def test_invariance_is_zero_when_adversarial_equals_clean(factory, distance):
    model = factory("dual")
    trainer = AratTrainer(model, use_predictor=False, distance=distance)
    images, labels = random_batch(8, shape=model.image_shape)
    _, terms, clean_logits, adv_logits = trainer.compute_losses(images, images, labels)
    assert abs(float(terms["invariance"])) < 1e-5
    np.testing.assert_allclose(clean_logits.numpy(), adv_logits.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(float(terms["ce_adv"]), float(terms["ce_clean"]), rtol=1e-6)


def test_cosine_similarity_and_invariance_distance_known_values():
    a = tf.constant([[1.0, 0.0], [3.0, 4.0], [1.0, 1.0]])
    b = tf.constant([[0.0, 2.0], [3.0, 4.0], [-2.0, -2.0]])
    np.testing.assert_allclose(cosine_similarity(a, b).numpy(), [0.0, 1.0, -1.0], atol=1e-6)

    orthogonal_a = tf.constant([[1.0, 0.0, 0.0], [0.0, 0.0, 5.0]])
    orthogonal_b = tf.constant([[0.0, 7.0, 0.0], [2.0, 0.0, 0.0]])
    np.testing.assert_allclose(
        float(invariance_distance(orthogonal_a, orthogonal_b, "cos")), 1.0, atol=1e-6
    )
    np.testing.assert_allclose(float(invariance_distance(a, a, "cos")), 0.0, atol=1e-6)
    # Mean over the batch: cos = 0, 1, -1 -> 1 - 0 = 1.
    np.testing.assert_allclose(float(invariance_distance(a, b, "cos")), 1.0, atol=1e-6)
    # 45 degrees.
    np.testing.assert_allclose(
        float(invariance_distance(tf.constant([[1.0, 0.0]]), tf.constant([[1.0, 1.0]]), "cos")),
        1.0 - np.sqrt(0.5), atol=1e-6,
    )
    # PyTorch's epsilon: a zero vector has cosine 0, not NaN.
    zero = cosine_similarity(tf.zeros((1, 3)), tf.ones((1, 3))).numpy()
    np.testing.assert_allclose(zero, [0.0])

    # mse: mean over batch and features of the squared difference.
    p = tf.constant([[1.0, 2.0], [0.0, 0.0]])
    t = tf.constant([[3.0, 0.0], [1.0, -1.0]])
    np.testing.assert_allclose(float(invariance_distance(p, t, "mse")), (4 + 4 + 1 + 1) / 4, rtol=1e-6)
    np.testing.assert_allclose(float(invariance_distance(p, p, "mse")), 0.0)


def test_arat_total_loss_composition_and_ce_weight_variables():
    trainer = AratTrainer(
        small_cnn("dual"), invariance_weight=7.0, adv_ce_weight=0.3, clean_ce_weight=0.7,
        train_attack=ZERO_START_PGD, attack_bn_mode="inference",
    )
    images, labels = random_batch(8)
    adversarial = trainer.generate_adversarial(images, labels)
    total, terms, clean_logits, adv_logits = trainer.compute_losses(images, adversarial, labels)
    assert set(terms) == set(AratTrainer.loss_term_names)
    expected = 0.3 * terms["ce_adv"] + 0.7 * terms["ce_clean"] + 7.0 * terms["invariance"]
    np.testing.assert_allclose(float(total), float(expected), rtol=1e-6)
    np.testing.assert_allclose(
        float(terms["ce_adv"]), np_cross_entropy(adv_logits.numpy(), labels.numpy()), rtol=1e-5
    )
    np.testing.assert_allclose(
        float(terms["ce_clean"]), np_cross_entropy(clean_logits.numpy(), labels.numpy()), rtol=1e-5
    )

    trainer.adv_ce_weight.assign(2.0)
    trainer.clean_ce_weight.assign(0.0)
    total2, terms2, _, _ = trainer.compute_losses(images, adversarial, labels)
    for name in terms:  # training-mode outputs use batch statistics: same terms again
        np.testing.assert_allclose(float(terms2[name]), float(terms[name]), rtol=1e-5)
    expected2 = 2.0 * terms2["ce_adv"] + 7.0 * terms2["invariance"]
    np.testing.assert_allclose(float(total2), float(expected2), rtol=1e-6)
    assert abs(float(total2) - float(total)) > 1e-3


# ---------------------------------------------------------------------------------------------
# TRADES, MART, hybrid: the formulas
# ---------------------------------------------------------------------------------------------
def test_kl_batchmean_matches_numpy():
    rng = np.random.RandomState(3)
    p = rng.randn(6, 5).astype("float32") * 3
    q = rng.randn(6, 5).astype("float32") * 3
    log_p, log_q = np_log_softmax(p.astype(np.float64)), np_log_softmax(q.astype(np.float64))
    expected = np.mean(np.sum(np.exp(log_p) * (log_p - log_q), axis=-1))
    np.testing.assert_allclose(float(kl_batchmean(tf.constant(p), tf.constant(q))), expected, rtol=1e-5)
    assert float(kl_batchmean(tf.constant(p), tf.constant(p))) == pytest.approx(0.0, abs=1e-6)


def test_trades_total_is_ce_clean_plus_beta_kl():
    trainer = TradesTrainer(small_cnn("single"), beta=4.0, train_attack=AttackConfig(steps=2))
    images, labels = random_batch(8)
    adversarial = trainer.generate_adversarial(images, labels)
    total, terms, clean_logits, adv_logits = trainer.compute_losses(images, adversarial, labels)
    np.testing.assert_allclose(float(total), float(terms["ce_clean"] + 4.0 * terms["kl"]), rtol=1e-6)
    np.testing.assert_allclose(
        float(terms["ce_clean"]), np_cross_entropy(clean_logits.numpy(), labels.numpy()), rtol=1e-5
    )
    c, a = clean_logits.numpy().astype(np.float64), adv_logits.numpy().astype(np.float64)
    log_c, log_a = np_log_softmax(c), np_log_softmax(a)
    expected_kl = np.mean(np.sum(np.exp(log_c) * (log_c - log_a), axis=-1))
    np.testing.assert_allclose(float(terms["kl"]), expected_kl, rtol=1e-4, atol=1e-7)
    assert float(terms["kl"]) > 0.0


def mart_reference(logits, logits_adv, y, beta):
    """NumPy transcription of the original MART PyTorch loss."""
    logits, logits_adv = logits.astype(np.float64), logits_adv.astype(np.float64)
    batch = len(y)
    adv_probs = np_softmax(logits_adv)
    tmp1 = np.argsort(adv_probs, axis=1)[:, -2:]
    new_y = np.where(tmp1[:, -1] == y, tmp1[:, -2], tmp1[:, -1])
    ce = -np.mean(np_log_softmax(logits_adv)[np.arange(batch), y])
    nll = -np.mean(np.log(1.0001 - adv_probs + 1e-12)[np.arange(batch), new_y])
    loss_adv = ce + nll
    nat_probs = np_softmax(logits)
    true_probs = nat_probs[np.arange(batch), y]
    kl = np.sum(nat_probs * (np.log(nat_probs + 1e-12) - np.log(adv_probs + 1e-12)), axis=1)
    loss_robust = np.sum(kl * (1.0000001 - true_probs)) / batch
    return loss_adv + beta * loss_robust, loss_adv, loss_robust


def test_mart_loss_matches_reference_on_fixed_logits(monkeypatch):
    trainer = MartTrainer(small_cnn("single"), beta=5.0)
    rng = np.random.RandomState(7)
    clean_logits = (rng.randn(12, 6) * 2).astype("float32")
    adv_logits = (rng.randn(12, 6) * 2).astype("float32")
    labels = rng.randint(0, 6, 12).astype("int32")
    # Make the adversarial prediction correct for some examples (new_y is then the runner-up).
    adv_logits[:4, :] -= 5.0
    adv_logits[np.arange(4), labels[:4]] += 20.0
    assert np.any(adv_logits.argmax(1) == labels) and np.any(adv_logits.argmax(1) != labels)

    # The "images" are the logits themselves: the stub classifier is the identity.
    monkeypatch.setattr(trainer, "classifier", lambda x, training=None, branch=None: x)
    total, terms, returned_clean, returned_adv = trainer.compute_losses(
        tf.constant(clean_logits), tf.constant(adv_logits), tf.constant(labels)
    )
    expected_total, expected_adv, expected_robust = mart_reference(clean_logits, adv_logits, labels, 5.0)
    np.testing.assert_allclose(float(terms["bce_adv"]), expected_adv, rtol=1e-5)
    np.testing.assert_allclose(float(terms["kl_weighted"]), expected_robust, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(float(total), expected_total, rtol=1e-5)
    np.testing.assert_array_equal(returned_clean.numpy(), clean_logits)
    np.testing.assert_array_equal(returned_adv.numpy(), adv_logits)


def test_mart_loss_on_a_real_model_matches_reference():
    trainer = MartTrainer(small_cnn("single"), beta=6.0, train_attack=AttackConfig(steps=2))
    images, labels = random_batch(8)
    adversarial = trainer.generate_adversarial(images, labels)
    total, terms, clean_logits, adv_logits = trainer.compute_losses(images, adversarial, labels)
    expected_total, expected_adv, expected_robust = mart_reference(
        clean_logits.numpy(), adv_logits.numpy(), labels.numpy(), 6.0
    )
    np.testing.assert_allclose(float(terms["bce_adv"]), expected_adv, rtol=1e-5)
    np.testing.assert_allclose(float(terms["kl_weighted"]), expected_robust, rtol=1e-3, atol=1e-7)
    np.testing.assert_allclose(float(total), expected_total, rtol=1e-5)


def test_hybrid_total_is_weighted_mean_of_ces():
    trainer = HybridTrainer(small_cnn("dual"), clean_weight=0.25, train_attack=ZERO_START_PGD)
    images, labels = random_batch(8)
    adversarial = trainer.generate_adversarial(images, labels)
    total, terms, clean_logits, adv_logits = trainer.compute_losses(images, adversarial, labels)
    np.testing.assert_allclose(
        float(total), float(0.25 * terms["ce_clean"] + 0.75 * terms["ce_adv"]), rtol=1e-6
    )
    np.testing.assert_allclose(
        float(terms["ce_adv"]), np_cross_entropy(adv_logits.numpy(), labels.numpy()), rtol=1e-5
    )


# ---------------------------------------------------------------------------------------------
# fit(): every method trains and logs exactly the expected metrics
# ---------------------------------------------------------------------------------------------
def expected_history_keys(trainer, eval_branch="adv", eval_steps=2):
    other = "clean" if eval_branch == "adv" else "adv"
    keys = {"loss", *trainer.loss_term_names, "clean_acc", "adv_acc",
            f"val_clean_acc_{eval_branch}bn", f"val_pgd{eval_steps}_acc_{eval_branch}bn"}
    if trainer.classifier.bn_mode in SPLIT_BN_MODES:
        keys.add(f"val_clean_acc_{other}bn")
    return keys


@pytest.mark.parametrize("method", list(METHOD_DEFAULTS))
def test_every_method_fits_and_logs_expected_metrics(method):
    images, labels = random_batch(32, seed=1)
    trainer = make_trainer(method)
    trainer.compile(optimizer=keras.optimizers.SGD(learning_rate=0.01))
    history = trainer.fit(
        images, labels, batch_size=16, epochs=2, validation_data=(images[:16], labels[:16]),
        verbose=0,
    ).history
    assert set(history) == expected_history_keys(trainer)
    for name, values in history.items():
        assert len(values) == 2, name
        assert all(np.isfinite(values)), name
    assert all(value != 0.0 for value in history["loss"])
    for name in ("clean_acc", "adv_acc") + tuple(k for k in history if k.startswith("val_")):
        assert all(0.0 <= v <= 1.0 for v in history[name]), name
    if method == "pgd_at":
        np.testing.assert_allclose(history["loss"], history["ce_adv"], rtol=1e-6)


def test_eval_branch_clean_names_the_metrics_by_branch():
    trainer = make_trainer("hybrid", eval_branch="clean", eval_attack=AttackConfig(steps=3))
    names = {metric.name for metric in trainer.metrics}
    expected = {name[len("val_"):] if name.startswith("val_") else name
                for name in expected_history_keys(trainer, eval_branch="clean", eval_steps=3)}
    assert names == expected
    single = make_trainer("pgd_at", eval_branch="clean")
    assert {m.name for m in single.metrics} == {
        "loss", "ce_adv", "clean_acc", "adv_acc", "clean_acc_cleanbn", "pgd2_acc_cleanbn"
    }


def test_pgd_at_loss_decreases_on_separable_data():
    rng = np.random.RandomState(0)
    labels = np.repeat([0, 1], 32).astype("int32")
    base = np.where(labels == 0, 0.2, 0.8).astype("float32")[:, None, None, None]
    images = np.clip(base + 0.1 * rng.randn(64, *IMAGE_SHAPE), 0.0, 1.0).astype("float32")
    order = rng.permutation(64)
    images, labels = images[order], labels[order]

    trainer = PgdAtTrainer(
        small_cnn("single", num_classes=2), train_attack=AttackConfig(steps=2), eval_attack=AttackConfig(steps=1)
    )
    trainer.compile(optimizer=keras.optimizers.SGD(learning_rate=0.05, momentum=0.9))
    history = trainer.fit(images, labels, batch_size=16, epochs=10, shuffle=False, verbose=0).history
    losses = history["loss"]
    assert losses[-1] < losses[0], losses
    assert losses[-1] < 0.5 * losses[0], losses


# ---------------------------------------------------------------------------------------------
# The training attack: BN mode, branches, threat model
# ---------------------------------------------------------------------------------------------
def assert_in_threat_model(adversarial, images, eps):
    adversarial, images = adversarial.numpy(), images.numpy()
    assert adversarial.shape == images.shape
    assert np.all(adversarial >= 0.0) and np.all(adversarial <= 1.0)
    assert np.max(np.abs(adversarial - images)) <= eps + 1e-6


@pytest.mark.parametrize("method", ["arat", "pgd_at", "trades", "mart", "hybrid"])
def test_inference_mode_attack_leaves_every_bn_statistic_unchanged(method):
    trainer = make_trainer(method, attack_bn_mode="inference")
    images, labels = random_batch(8)
    before = snapshot(trainer.variables)
    adversarial = tf.function(trainer.generate_adversarial)(images, labels)
    after = snapshot(trainer.variables)
    assert any("moving" in path for path in before)
    for path in before:
        np.testing.assert_array_equal(after[path], before[path], err_msg=path)
    assert_in_threat_model(adversarial, images, EPS)
    assert np.max(np.abs(adversarial.numpy() - images.numpy())) > 0.0


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "tf_function"])
def test_train_mode_attack_updates_only_the_adv_statistics(compiled):
    trainer = make_trainer("arat")
    assert trainer.attack_bn_mode == "train"  # ARAT's protocol default
    images, labels = random_batch(8)
    before = snapshot(trainer.classifier.weights)
    generate = tf.function(trainer.generate_adversarial) if compiled else trainer.generate_adversarial
    adversarial = generate(images, labels)
    after = snapshot(trainer.classifier.weights)

    clean_paths = [p for p in before if "clean_" in p]
    adv_stat_paths = [p for p in before if "adv_moving_" in p]
    assert clean_paths and adv_stat_paths
    for path in clean_paths:
        np.testing.assert_array_equal(after[path], before[path], err_msg=path)
    for path in adv_stat_paths:
        assert not np.array_equal(after[path], before[path]), f"{path} was not updated"
    for v in trainer.classifier.trainable_weights:
        np.testing.assert_array_equal(after[v.path], before[v.path], err_msg=v.path)
    assert_in_threat_model(adversarial, images, EPS)


def test_trades_attack_stays_in_threat_model():
    trainer = make_trainer("trades", train_attack=AttackConfig(eps=4 / 255, step_size=1 / 255, steps=3))
    images, labels = random_batch(8)
    adversarial = trainer.generate_adversarial(images, labels)
    assert_in_threat_model(adversarial, images, 4 / 255)


def test_trainer_argument_validation():
    model = small_cnn("dual")
    with pytest.raises(ValueError, match="eval_branch"):
        PgdAtTrainer(model, eval_branch="mixed")
    with pytest.raises(ValueError, match="attack_bn_mode"):
        PgdAtTrainer(model, attack_bn_mode="training")
    with pytest.raises(ValueError, match="-1"):
        TradesTrainer(model, beta=-1.0)
    with pytest.raises(ValueError, match="-2"):
        MartTrainer(model, beta=-2.0)
    with pytest.raises(ValueError, match="1.5"):
        HybridTrainer(model, clean_weight=1.5)
    with pytest.raises(ValueError, match="l1"):
        AratTrainer(model, distance="l1")
    with pytest.raises(ValueError, match="-3"):
        AratTrainer(model, invariance_weight=-3.0)


# ---------------------------------------------------------------------------------------------
# train_step: the applied update is -lr * d(total)/d(w) (divided by the number of replicas)
# ---------------------------------------------------------------------------------------------
def manual_sgd_expectation(trainer, images, labels, learning_rate):
    variables = trainer.trainable_variables
    before = [np.array(v.numpy()) for v in variables]
    with tf.GradientTape() as tape:
        total, _, _, _ = trainer.compute_losses(images, images, labels)
    gradients = tape.gradient(total, variables)
    expected = [
        b if g is None else b - learning_rate * g.numpy() for b, g in zip(before, gradients)
    ]
    return before, expected, float(total)


def assert_update(trainer, before, expected):
    after = [v.numpy() for v in trainer.trainable_variables]
    moved = max(float(np.max(np.abs(a - b))) for a, b in zip(after, before))
    assert moved > 1e-4, "the train step did not move the weights"
    for variable, a, b, e in zip(trainer.trainable_variables, after, before, expected):
        # Compare the applied update with -lr * gradient, relative to the update's size (float32
        # round-off of the two gradient computations is ~1e-6 absolute on big ARAT gradients).
        actual_update, expected_update = a - b, e - b
        error = float(np.linalg.norm(actual_update - expected_update))
        assert error <= 1e-3 * float(np.linalg.norm(expected_update)) + 1e-6, (variable.path, error)


@pytest.mark.parametrize("method", ["arat", "pgd_at"])
def test_train_step_applies_the_gradient_of_the_total_loss(method):
    learning_rate = 0.1
    trainer = make_trainer(method, train_attack=NO_ATTACK)
    trainer.compile(optimizer=keras.optimizers.SGD(learning_rate=learning_rate))
    trainer.optimizer.build(trainer.trainable_variables)
    images, labels = random_batch(8, seed=2)
    assert tf.distribute.get_strategy().num_replicas_in_sync == 1
    before, expected, total = manual_sgd_expectation(trainer, images, labels, learning_rate)
    logs = tf.function(trainer.train_step)((images, labels))
    np.testing.assert_allclose(float(logs["loss"]), total, rtol=1e-5)
    assert_update(trainer, before, expected)


def test_fit_one_step_under_one_device_strategy_matches_manual_update():
    learning_rate = 0.1
    strategy = tf.distribute.OneDeviceStrategy("/cpu:0")
    with strategy.scope():
        trainer = make_trainer("arat", train_attack=NO_ATTACK)
        trainer.compile(optimizer=keras.optimizers.SGD(learning_rate=learning_rate))
    images, labels = random_batch(8, seed=2)
    before, expected, total = manual_sgd_expectation(trainer, images, labels, learning_rate)
    history = trainer.fit(images, labels, batch_size=8, epochs=1, verbose=0).history
    np.testing.assert_allclose(history["loss"][0], total, rtol=1e-5)
    assert_update(trainer, before, expected)


MIRRORED_SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    import keras
    import numpy as np
    import arat_tf
    from arat_tf.attacks import AttackConfig
    from arat_tf.methods import METHOD_DEFAULTS
    from arat_tf.models import build_model

    method = sys.argv[1]
    defaults = METHOD_DEFAULTS[method]
    keras.utils.set_random_seed(0)
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    no_attack = AttackConfig(steps=1, eps=0.0, step_size=0.0, start="zero")
    rng = np.random.RandomState(0)
    x = rng.rand(16, 28, 28, 1).astype("float32")
    y = rng.randint(0, 10, 16).astype("int32")
    lr = 0.1
    with strategy.scope():
        model = build_model("small_cnn", num_classes=10, image_shape=(28, 28, 1),
                            bn_mode=defaults.bn_mode, width=0.25)
        trainer = defaults.trainer_class(model, train_attack=no_attack,
                                         attack_bn_mode=defaults.attack_bn_mode)
        trainer.compile(optimizer=keras.optimizers.SGD(lr))
    variables = trainer.trainable_variables
    before = [v.numpy() for v in variables]
    # Each replica sees one contiguous half and averages its own loss; the optimizer sums the
    # replicas' gradients, so the right update is -lr * mean over replicas of their gradients.
    summed = [np.zeros(v.shape, np.float32) for v in variables]
    for half in (slice(0, 8), slice(8, 16)):
        with tf.GradientTape() as tape:
            total = trainer.compute_losses(tf.constant(x[half]), tf.constant(x[half]),
                                           tf.constant(y[half]))[0]
        for i, g in enumerate(tape.gradient(total, variables)):
            if g is not None:
                summed[i] += g.numpy()
    trainer.fit(tf.data.Dataset.from_tensor_slices((x, y)).batch(16), epochs=1, verbose=0)
    after = [v.numpy() for v in variables]
    error = max(float(np.max(np.abs(a - (b - lr * s / 2.0)))) for a, b, s in zip(after, before, summed))
    unscaled = max(float(np.max(np.abs(a - (b - lr * s)))) for a, b, s in zip(after, before, summed))
    moved = max(float(np.max(np.abs(a - b))) for a, b in zip(after, before))
    print("RESULT " + json.dumps({"replicas": strategy.num_replicas_in_sync, "error": error,
                                  "unscaled_error": unscaled, "moved": moved}))
    """
)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["arat", "hybrid"])
def test_train_step_divides_by_replicas_under_mirrored_strategy(method, tmp_path):
    """Two logical CPU replicas (needs a fresh process: devices are fixed at TF start-up).

    Slow (a TensorFlow start-up per case): run with `pytest -m slow`. The default run checks the
    same update rule with one replica (default strategy and OneDeviceStrategy) above.
    """
    script = tmp_path / "mirrored.py"
    script.write_text(MIRRORED_SCRIPT)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="")
    completed = subprocess.run(
        [sys.executable, str(script), method], capture_output=True, text=True, timeout=300,
        env=env, cwd=str(pathlib.Path(__file__).resolve().parents[1]),
    )
    lines = [line for line in completed.stdout.splitlines() if line.startswith("RESULT ")]
    assert completed.returncode == 0 and lines, completed.stderr[-3000:]
    result = json.loads(lines[-1][len("RESULT "):])
    assert result["replicas"] == 2
    assert result["moved"] > 1e-3
    assert result["error"] < 1e-4, result
    assert result["unscaled_error"] > 10 * result["error"], result


# ---------------------------------------------------------------------------------------------
# CeWeightAutoBalance
# ---------------------------------------------------------------------------------------------
def test_ce_weight_auto_balance_uses_clean_branch_accuracy():
    model = small_cnn("dual")
    trainer = AratTrainer(model)
    # Give both branches different random affine parameters so their predictions differ (a fresh
    # model's logits are all near zero and both branches would predict one class everywhere).
    rng = np.random.RandomState(0)
    for v in model.weights:
        if v.path.endswith(("adv_gamma", "adv_beta", "clean_gamma", "clean_beta")) or (
            v.path.endswith("classifier/kernel")
        ):
            v.assign(2.0 * rng.randn(*v.shape).astype("float32"))
    images, _ = random_batch(30, seed=4)
    clean_logits = model(images, training=False, branch="clean").numpy()
    clean_predictions = np.argmax(clean_logits, axis=1)
    adv_predictions = np.argmax(model(images, training=False, branch="adv").numpy(), axis=1)
    disagree = np.flatnonzero(adv_predictions != clean_predictions)
    assert disagree.size, "test set-up: the branches must disagree somewhere"
    # The clean branch is right on 12 examples, one of them one where the adversarial branch
    # disagrees; every other label differs from both branches' predictions. So the clean-branch
    # accuracy is 12/30 and the adversarial-branch accuracy is strictly lower.
    correct = np.zeros(30, bool)
    correct[disagree[0]] = True
    correct[[i for i in range(30) if i != disagree[0]][:11]] = True
    labels = clean_predictions.copy()
    for i in np.flatnonzero(~correct):
        labels[i] = next(k for k in range(NUM_CLASSES)
                         if k not in (clean_predictions[i], adv_predictions[i]))
    expected = 12 / 30
    assert float(np.mean(clean_predictions == labels)) == pytest.approx(expected)
    # The callback predicts in batches of 8, as a graph: 12 of 30 whatever the rounding only if no
    # example is within round-off of a tie (true of these seeded weights).
    assert correct_count_range(clean_logits, labels) == (12, 12)
    assert float(np.mean(adv_predictions == labels)) < expected - 1e-6

    probe = tf.data.Dataset.from_tensor_slices((images, labels.astype("int32"))).batch(8)  # 8,8,8,6
    callback = CeWeightAutoBalance(trainer, probe)
    callback.on_epoch_begin(0)
    np.testing.assert_allclose(float(trainer.adv_ce_weight.numpy()), expected, rtol=1e-6)
    np.testing.assert_allclose(float(trainer.clean_ce_weight.numpy()), 1.0 - expected, rtol=1e-6)
    logs = {}
    callback.on_epoch_end(0, logs)
    assert logs["w_adv"] == pytest.approx(expected)

    # The weights feed the loss.
    x, y = random_batch(8)
    total, terms, _, _ = trainer.compute_losses(x, x, y)
    np.testing.assert_allclose(
        float(total),
        float(expected * terms["ce_adv"] + (1 - expected) * terms["ce_clean"]
              + trainer.invariance_weight * terms["invariance"]),
        rtol=1e-5,
    )


def test_ce_weight_auto_balance_runs_inside_fit():
    model = small_cnn("dual")
    trainer = make_trainer("arat", classifier=model, train_attack=AttackConfig(steps=1))
    images, labels = random_batch(16, seed=5)
    probe = tf.data.Dataset.from_tensor_slices((images, labels)).batch(16)
    seen = []

    class Record(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            seen.append((float(trainer.adv_ce_weight.numpy()), float(trainer.clean_ce_weight.numpy())))

    trainer.compile(optimizer=keras.optimizers.SGD(learning_rate=0.01))
    auto = CeWeightAutoBalance(trainer, probe)
    history = trainer.fit(
        images, labels, batch_size=16, epochs=1, verbose=0, callbacks=[auto, Record()]
    ).history
    assert len(seen) == 1
    for w_adv, w_clean in seen:
        assert 0.0 <= w_adv <= 1.0
        assert w_adv + w_clean == pytest.approx(1.0)
    assert history["w_adv"][-1] == pytest.approx(seen[-1][0])
    # At the end, it reflects the clean-branch probe accuracy of the model at the last epoch start.
    # (The callback runs as a graph, this eagerly: an example within round-off of a tie may go
    # either way; otherwise the count is exact.)
    lowest, highest = correct_count_range(
        model(images, training=False, branch="clean").numpy(), labels.numpy())
    assert lowest <= round(auto.clean_branch_accuracy() * 16) <= highest


# ---------------------------------------------------------------------------------------------
# Eager vs tf.function
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", list(METHOD_DEFAULTS))
def test_compute_losses_eager_equals_tf_function(method):
    trainer = make_trainer(method, train_attack=ZERO_START_PGD)
    images, labels = random_batch(8, seed=6)
    adversarial = trainer.generate_adversarial(images, labels)
    # The attack itself (deterministic from a zero start) in both modes: train-mode BN (ARAT) and
    # inference-mode BN; TRADES always starts from a random gaussian point.
    if method in ("arat", "pgd_at"):
        adversarial_graph = tf.function(trainer.generate_adversarial)(images, labels)
        np.testing.assert_allclose(adversarial_graph.numpy(), adversarial.numpy(), atol=1e-6)

    eager = trainer.compute_losses(images, adversarial, labels)
    graph = tf.function(trainer.compute_losses)(images, adversarial, labels)
    np.testing.assert_allclose(float(graph[0]), float(eager[0]), rtol=1e-5, atol=1e-6)
    assert set(graph[1]) == set(eager[1]) == set(trainer.loss_term_names)
    for name in eager[1]:
        np.testing.assert_allclose(
            float(graph[1][name]), float(eager[1][name]), rtol=1e-5, atol=1e-6, err_msg=name
        )
    for eager_logits, graph_logits in zip(eager[2:], graph[2:]):
        if eager_logits is None:
            assert graph_logits is None
        else:
            np.testing.assert_allclose(graph_logits.numpy(), eager_logits.numpy(), rtol=1e-5, atol=1e-5)

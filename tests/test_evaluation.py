"""Tests of the robustness evaluation (`arat_tf.evaluation`) and its CLI (`python -m arat_tf.evaluate`).

Behaviour, not just "it ran": every evaluation attack breaks a small trained model at a large eps
and stays inside the threat model; robust accuracy never exceeds clean accuracy and never grows
along the attack list, with exact per-attack bookkeeping; attacks leaving the ball are refused;
the sanity checks fire on models built to trigger them and stay silent on a normal model; attack
and suite names resolve as documented; the Dual-BN affine/statistics swap is exact and reversible;
and the CLI writes a consistent report and fails clearly on bad input.

The in-process tests share one MLP trained in ~1 s on a synthetic 10-class problem (8x8x3 noisy
prototypes). The CLI tests save a narrow ResNet-10 and evaluate 32 CIFAR-10 test images in a
subprocess (they skip without the shared TFDS data dir).
"""

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

import arat_tf  # noqa: F401  (registers the custom objects for keras.models.load_model)
from arat_tf.evaluation import (
    SUITES,
    EvaluationAttack,
    evaluate_robustness,
    format_report,
    resolve_attacks,
    swap_branch_parameters,
)
from arat_tf.evaluation import attack_suite, sanity
from arat_tf.evaluation.attack_suite import square_attack
from arat_tf.layers import SplitBatchNormalization
from arat_tf.models import build_model
from near_ties import assert_misclassified_flags, correct_count_range

REPO = Path(__file__).resolve().parents[1]
SHAPE = (8, 8, 3)
NUM_CLASSES = 10
N_TEST = 80  # a batch of 48 and a remainder of 32
BATCH = 48
N_BATCHES = 2


# ---------------------------------------------------------------------------------------------
# A small trained model and helpers.


@dataclasses.dataclass
class Trained:
    model: keras.Model
    forward: object
    x: np.ndarray
    y: np.ndarray

    def dataset(self, x=None, y=None, batch_size=BATCH):
        x = self.x if x is None else x
        y = self.y if y is None else y
        return tf.data.Dataset.from_tensor_slices((x, y)).batch(batch_size)


@pytest.fixture(scope="module")
def trained(prototype_mlp):
    """An MLP on 10 noisy prototypes of 8x8x3 images in [0, 1]: logits, clean accuracy ~1."""
    model, x_test, y_test = prototype_mlp(N_TEST, SHAPE, NUM_CLASSES)
    forward = lambda images: model(images, training=False)  # noqa: E731  (one forward, reused)
    assert _accuracy(forward, x_test, y_test) >= 0.95
    return Trained(model, forward, x_test, y_test)


def _predictions(forward, x):
    return np.argmax(np.asarray(forward(tf.constant(x))), axis=-1)


def _accuracy(forward, x, y):
    return float(np.mean(_predictions(forward, x) == np.asarray(y)))


def _batched_predictions(forward, x, batch_size=BATCH):
    """Predictions computed batch by batch as `Trained.dataset` batches them, i.e. with the very
    shapes `evaluate_robustness` sees (another batch shape may round differently)."""
    return np.concatenate([_predictions(forward, x[start:start + batch_size])
                           for start in range(0, len(x), batch_size)])


def _recording(attack, calls):
    """`attack` with its run wrapped to record `(x, labels, x_adv, success)` of every call."""

    def run(forward, x, labels, eps, norm, seed):
        x_adv, success = attack.run(forward, x, labels, eps, norm, seed)
        calls.append((np.asarray(x), np.asarray(labels), np.asarray(x_adv), np.asarray(success)))
        return x_adv, success

    return dataclasses.replace(attack, run=run)


def _fixed_attack(name, make_adv, white_box=True):
    """An `EvaluationAttack` returning `make_adv(x, eps)` (numpy) and no successes."""

    def run(forward, x, labels, eps, norm, seed):
        x_adv = make_adv(np.asarray(x), eps)
        return tf.constant(x_adv, tf.float32), tf.zeros([len(x_adv)], tf.bool)

    return EvaluationAttack(name, run, white_box=white_box)


# ---------------------------------------------------------------------------------------------
# 1. Every evaluation attack breaks the model at a large eps and stays in the threat model.

LARGE_EPS = 0.3
ALL_ATTACKS = ["pgd20", "cw20", "apgd-ce", "apgd-t", "fab-t", "square"]


def _single_attack(name):
    if name == "square":
        return square_attack(n_queries=300)
    (attack,) = resolve_attacks([name], NUM_CLASSES, "linf")
    return attack


@pytest.mark.parametrize("name", ALL_ATTACKS)
def test_attack_breaks_trained_model_at_large_eps_inside_the_ball(trained, name):
    calls = []
    attack = _recording(_single_attack(name), calls)
    report = evaluate_robustness(trained.forward, trained.dataset(), [attack], eps=LARGE_EPS,
                                 progress=False)

    clean_correct = _batched_predictions(trained.forward, trained.x) == trained.y
    assert report["n_examples"] == N_TEST
    assert report["clean_accuracy"] == pytest.approx(clean_correct.mean())
    assert report["robust_accuracy"] <= 0.05
    (result,) = report["attacks"]
    assert result["name"] == attack.name
    assert result["robust_accuracy"] == report["robust_accuracy"]
    assert result["white_box"] == (name != "square")
    # A normal model triggers no sanity warning.
    assert report["warnings"] == []

    # One call per batch, on exactly the clean-correct examples of that batch.
    assert len(calls) == N_BATCHES
    attacked = np.concatenate([c[0] for c in calls])
    np.testing.assert_array_equal(attacked, trained.x[clean_correct])
    np.testing.assert_array_equal(np.concatenate([c[1] for c in calls]), trained.y[clean_correct])
    assert result["examples_attacked"] == int(clean_correct.sum())
    broken = 0
    for x, labels, x_adv, success in calls:
        assert x_adv.shape == x.shape
        assert np.abs(x_adv - x).max() <= LARGE_EPS + 1e-6
        assert x_adv.min() >= 0.0 and x_adv.max() <= 1.0
        # The attack's success flags are honest. They come from its compiled graph, while the
        # evaluator (and `wrong`) runs `forward` eagerly: FAB's minimum-norm points sit at the
        # decision boundary (one at a margin of 6e-6 here), where those two may round apart.
        logits = np.asarray(trained.forward(tf.constant(x_adv)))
        assert_misclassified_flags(success, logits, labels)
        wrong = np.argmax(logits, axis=-1) != labels  # the evaluator's very computation
        broken += int(wrong.sum())
    assert result["examples_broken"] == broken
    assert report["robust_accuracy"] == pytest.approx((clean_correct.sum() - broken) / N_TEST)


# ---------------------------------------------------------------------------------------------
# 2. Worst case over a suite: robust <= clean, non-increasing, exact bookkeeping.


def test_suite_at_moderate_eps_bookkeeping(trained):
    # Two wrong labels, so clean accuracy < 1 and clean-misclassified examples are never attacked.
    y = trained.y.copy()
    y[[3, 40]] = (y[[3, 40]] + 1) % NUM_CLASSES
    attacks = resolve_attacks(["pgd5", "apgd-ce"], NUM_CLASSES, "linf") + [square_attack(200)]
    calls = {a.name: [] for a in attacks}
    attacks = [_recording(a, calls[a.name]) for a in attacks]
    report = evaluate_robustness(trained.forward, trained.dataset(y=y), attacks, eps=0.08,
                                 progress=False)

    n = report["n_examples"]
    assert n == N_TEST
    clean_correct = _batched_predictions(trained.forward, trained.x) == y
    n_clean = int(clean_correct.sum())
    assert report["clean_accuracy"] == pytest.approx(n_clean / n) and n_clean <= N_TEST - 2
    results = report["attacks"]
    assert [r["name"] for r in results] == ["pgd5", "apgd-ce", "square"]
    robust = [r["robust_accuracy"] for r in results]
    assert report["robust_accuracy"] == robust[-1]
    assert report["robust_accuracy"] <= report["clean_accuracy"]
    assert all(later <= earlier for earlier, later in zip(robust, robust[1:]))
    # At this eps the suite breaks some examples but not all (the test is not vacuous).
    assert 0.0 < report["robust_accuracy"] < report["clean_accuracy"]

    still_robust = n_clean
    for result in results:
        assert result["examples_attacked"] == still_robust
        assert result["examples_broken"] == still_robust - round(result["robust_accuracy"] * n)
        assert len(calls[result["name"]]) == N_BATCHES or still_robust == 0
        still_robust = round(result["robust_accuracy"] * n)
        assert result["seconds"] >= 0.0

    # The worst case is per example: each attack sees exactly the examples the previous one left
    # unbroken, batch by batch.
    assert len(calls["pgd5"]) == len(calls["apgd-ce"]) == N_BATCHES
    for previous, following in zip(calls["pgd5"], calls["apgd-ce"]):
        x, labels, x_adv, _ = previous
        unbroken = _predictions(trained.forward, x_adv) == labels
        np.testing.assert_array_equal(following[0], x[unbroken])
        np.testing.assert_array_equal(following[1], labels[unbroken])

    text = format_report(dict(report, norm="linf", eps=0.08, suite="test", branch="adv"))
    assert "robust (worst)" in text and "pgd5" in text and "square" in text


@pytest.mark.parametrize("name", ["pgd3", "apgd-ce"])
def test_evaluation_is_reproducible_for_a_fixed_seed(trained, name):
    """Same `seed`, same adversarial points, whatever the global TF seed (a fresh process, as each
    CLI run is): the docstring's promise ("each batch and attack gets its own [seed],
    reproducibly") and the CLI's --seed ("Random seed of the attacks")."""
    outputs = []
    for global_seed in (1, 2):
        keras.utils.set_random_seed(global_seed)
        # A fresh forward, so nothing compiled for the first run is reused by the second.
        forward = lambda images: trained.model(images, training=False)  # noqa: E731
        calls = []
        (attack,) = resolve_attacks([name], NUM_CLASSES, "linf")
        evaluate_robustness(forward, trained.dataset(), [_recording(attack, calls)], eps=0.12,
                            seed=5, progress=False)
        outputs.append(calls)
    # Not vacuous: some examples are broken (unbroken ones are returned unchanged).
    assert sum(int(c[3].sum()) for c in outputs[0]) > 0
    for first, second in zip(*outputs):
        np.testing.assert_array_equal(first[2], second[2], err_msg=f"{name} is not reproducible")


def test_duplicate_attack_names_do_not_corrupt_the_report(trained):
    """`--attacks apgd-ce,autoattack` runs APGD-CE twice: either refuse the list, or keep the
    report a valid worst case (per-attack numbers are keyed by name in evaluate_robustness)."""
    try:
        attacks = resolve_attacks(["pgd1", "pgd1"], NUM_CLASSES, "linf")
    except ValueError as error:
        assert "pgd1" in str(error)
        return
    report = evaluate_robustness(trained.forward, trained.dataset(), attacks, eps=0.0,
                                 progress=False)
    assert report["robust_accuracy"] <= report["clean_accuracy"]
    for result in report["attacks"]:
        assert 0.0 <= result["robust_accuracy"] <= report["clean_accuracy"]


# ---------------------------------------------------------------------------------------------
# 3. Points outside the threat model are refused.


def _edge_data(trained):
    """The test images with a 0 pixel, a 1 pixel and a mid-range pixel (4, 4, :) = 0.5."""
    x = trained.x.copy()
    x[:, 0, 0, 0] = 0.0
    x[:, 0, 0, 1] = 1.0
    x[:, 4, 4, :] = 0.5
    return x


def _l2_perturbation(x, size):
    """A perturbation of l2 norm `size` per example on the mid-range pixel, so [0, 1] is kept."""
    delta = np.zeros_like(x)
    delta[:, 4, 4, :] = size / np.sqrt(3.0)
    return delta


@pytest.mark.parametrize("norm, eps, make_adv", [
    ("linf", 0.1, lambda x, eps: np.clip(x + 2 * eps, 0.0, 1.0)),  # outside the ball
    ("linf", 0.1, lambda x, eps: x + 0.5 * eps),  # inside the ball, above 1 at the 1 pixel
    ("linf", 0.1, lambda x, eps: x - 0.5 * eps),  # inside the ball, below 0 at the 0 pixel
    ("l2", 0.5, lambda x, eps: x + _l2_perturbation(x, 1.5 * eps)),  # outside the l2 ball
    ("l2", 0.5, lambda x, eps: x - 0.01),  # l2 norm 0.14 < eps, but below 0 at the 0 pixel
], ids=["linf-ball", "linf-above-1", "linf-below-0", "l2-ball", "l2-below-0"])
def test_points_outside_the_threat_model_are_refused(trained, norm, eps, make_adv):
    attack = _fixed_attack("bad-attack", make_adv)
    with pytest.raises(RuntimeError, match="bad-attack"):
        evaluate_robustness(trained.forward, trained.dataset(x=_edge_data(trained)), [attack],
                            eps=eps, norm=norm, progress=False)


@pytest.mark.parametrize("norm, eps", [("linf", 0.1), ("l2", 0.5)])
def test_points_on_the_boundary_are_accepted(trained, norm, eps):
    if norm == "linf":  # every pixel moved by exactly eps, towards the middle of [0, 1]
        make_adv = lambda x, eps: np.where(x > 0.5, x - eps, x + eps)  # noqa: E731
    else:
        make_adv = lambda x, eps: x + _l2_perturbation(x, eps)  # noqa: E731
    attack = _fixed_attack("boundary", make_adv)
    report = evaluate_robustness(trained.forward, trained.dataset(x=_edge_data(trained)), [attack],
                                 eps=eps, norm=norm, progress=False)
    assert report["attacks"][0]["examples_attacked"] > 0


# ---------------------------------------------------------------------------------------------
# 4. Sanity checks.


def _warnings_of(forward, trained, attacks=None, eps=0.05):
    attacks = attacks or resolve_attacks(["pgd2"], NUM_CLASSES, "linf")
    x, y = trained.x[:BATCH], trained.y[:BATCH]
    return evaluate_robustness(forward, trained.dataset(x=x, y=y), attacks, eps=eps,
                               progress=False)["warnings"]


def test_normal_model_passes_every_sanity_check(trained):
    x, y = tf.constant(trained.x[:BATCH]), tf.constant(trained.y[:BATCH])
    assert sanity.check_outputs_are_logits(trained.forward(x)) == []
    assert sanity.check_input_gradients(trained.forward, x, y) == []
    assert sanity.check_deterministic(trained.forward, x) == []
    attacks = resolve_attacks(["pgd20"], NUM_CLASSES, "linf") + [square_attack(100)]
    assert _warnings_of(trained.forward, trained, attacks, eps=LARGE_EPS) == []


def test_softmax_outputs_trigger_the_probabilities_warning(trained):
    forward = lambda images: tf.nn.softmax(trained.model(images, training=False))  # noqa: E731
    warnings = _warnings_of(forward, trained)
    assert any("probabilities" in w for w in warnings), warnings
    # Hand-made outputs: only non-negative rows summing to 1 count as probabilities.
    assert sanity.check_outputs_are_logits(np.array([[0.2, 0.8], [0.5, 0.5]])) != []
    assert sanity.check_outputs_are_logits(np.array([[1.5, -0.5], [0.5, 0.5]])) == []
    assert sanity.check_outputs_are_logits(np.array([[0.2, 0.3], [0.5, 0.5]])) == []
    assert sanity.check_outputs_are_logits(np.array([[3.0, -1.0], [0.1, 2.0]])) == []


def test_stop_gradient_quantised_input_triggers_the_gradient_warning(trained):
    def forward(images):  # quantised input, no gradient path back to `images`
        return trained.model(tf.stop_gradient(tf.round(images * 255) / 255), training=False)

    warnings = _warnings_of(forward, trained)
    assert any("no gradient w.r.t. the input" in w for w in warnings), warnings
    assert not any("probabilities" in w or "randomised" in w for w in warnings)


def test_exactly_zero_input_gradient_triggers_the_gradient_masking_warning(trained):
    def forward(images):  # connected to `images`, but with an exactly zero gradient
        quantised = tf.stop_gradient(tf.round(images * 255) / 255)
        return trained.model(0.0 * images + quantised, training=False)

    warnings = _warnings_of(forward, trained)
    assert any("100% of examples have an exactly zero input gradient" in w for w in warnings), warnings


def test_randomised_model_triggers_the_randomness_warning(trained):
    def forward(images):
        noise = tf.random.normal(tf.shape(images), stddev=0.05)
        return trained.model(images + noise, training=False)

    warnings = _warnings_of(forward, trained)
    assert any("randomised" in w for w in warnings), warnings
    assert not any("probabilities" in w or "gradient" in w for w in warnings)


def _result(name, white_box, broken):
    return {"name": name, "white_box": white_box, "examples_broken": broken}


def test_black_box_not_stronger_on_hand_made_results():
    check = sanity.check_black_box_not_stronger
    (warning,) = check([_result("apgd-ce", True, 10), _result("square", False, 3)])
    assert "square" in warning and "3" in warning
    assert check([_result("apgd-ce", True, 10), _result("square", False, 0)]) == []
    assert check([_result("square", False, 5)]) == []  # no white-box attack ran before it
    assert check([_result("square", False, 5), _result("pgd20", True, 1)]) == []
    assert len(check([_result("pgd20", True, 0), _result("sq1", False, 1),
                      _result("apgd-t", True, 0), _result("sq2", False, 2)])) == 2
    assert check([]) == []


def test_black_box_breaking_what_white_box_could_not_is_reported(trained):
    no_op = _fixed_attack("no-op", lambda x, eps: x)  # a "white-box attack" that finds nothing
    warnings = _warnings_of(trained.forward, trained, [no_op, square_attack(300)], eps=LARGE_EPS)
    assert len(warnings) == 1 and "black-box attack square" in warnings[0], warnings


# ---------------------------------------------------------------------------------------------
# 5. Attack and suite names.


def _names(names, norm="linf", num_classes=NUM_CLASSES):
    return [a.name for a in resolve_attacks(names, num_classes, norm)]


def test_suites_expand_in_order():
    assert _names(["autoattack"]) == ["apgd-ce", "apgd-t", "fab-t", "square"]
    assert _names(["autoattack-fast"]) == ["apgd-ce", "apgd-t", "fab-t", "square"]
    assert _names(["autoattack"], "l2") == ["apgd-ce", "apgd-t"]
    assert _names(["autoattack-fast"], "l2") == ["apgd-ce", "apgd-t"]
    assert _names(["pgd20", "autoattack"]) == ["pgd20", "apgd-ce", "apgd-t", "fab-t", "square"]
    assert set(SUITES) == {"autoattack", "autoattack-fast"}
    attacks = resolve_attacks(["autoattack"], NUM_CLASSES, "linf")
    assert [a.white_box for a in attacks] == [True, True, True, False]
    assert all(isinstance(a, EvaluationAttack) for a in attacks)


def test_single_attack_names():
    assert _names(["pgd20"]) == ["pgd20"]
    assert _names(["pgd20x3"]) == ["pgd20x3"]
    (cw,) = _names(["cw30"])
    assert "cw" in cw and "30" in cw
    assert _names(["apgd-ce", "apgd-t", "fab-t", "square"]) == ["apgd-ce", "apgd-t", "fab-t", "square"]
    assert _names(["pgd10", "apgd-ce"], "l2") == ["pgd10", "apgd-ce"]


@pytest.mark.parametrize("names, norm, message", [
    (["foo"], "linf", "foo"),
    (["pgd"], "linf", "Unknown attack"),
    (["pgd20x"], "linf", "Unknown attack"),
    (["PGD20"], "linf", "Unknown attack"),
    (["apgd"], "linf", "Unknown attack"),
    (["pgd20", "autoattack", "bogus"], "linf", "bogus"),
    (["pgd0"], "linf", "pgd0"),
    (["pgd5x0"], "linf", "pgd5x0"),
    (["fab-t"], "l2", "fab-t"),
    (["square"], "l2", "square"),
    ([], "linf", "No attack"),
])
def test_invalid_attack_names_are_rejected(names, norm, message):
    with pytest.raises(ValueError, match=message):
        resolve_attacks(names, NUM_CLASSES, norm)


def _fake_pgd(calls, outputs=None):
    def attack(forward, x, labels, **kwargs):
        calls.append(kwargs)
        return tf.constant(outputs[len(calls) - 1]) if outputs is not None else x

    return attack


@pytest.mark.parametrize("name, norm, steps, restarts, loss", [
    ("pgd20x3", "linf", 20, 3, "ce"),
    ("pgd7", "linf", 7, 1, "ce"),
    ("cw30", "linf", 30, 1, "cw"),
    ("cw10x2", "l2", 10, 2, "cw"),
])
def test_pgd_names_set_steps_restarts_and_loss(monkeypatch, name, norm, steps, restarts, loss):
    linf_calls, l2_calls = [], []
    monkeypatch.setattr(attack_suite, "pgd_linf", _fake_pgd(linf_calls))
    monkeypatch.setattr(attack_suite, "pgd_l2", _fake_pgd(l2_calls))
    (attack,) = resolve_attacks([name], NUM_CLASSES, norm)
    x = tf.fill([2, 2, 2, 1], 0.5)
    forward = lambda images: tf.tile([[1.0, 0.0]], [tf.shape(images)[0], 1])  # noqa: E731
    attack.run(forward, x, tf.zeros([2], tf.int32), 0.2, norm, 0)
    calls = linf_calls if norm == "linf" else l2_calls
    assert (linf_calls if norm == "l2" else l2_calls) == []
    assert len(calls) == restarts
    for kwargs in calls:
        assert kwargs["steps"] == steps and kwargs["loss"] == loss
        assert kwargs["eps"] == pytest.approx(0.2) and kwargs["step_size"] == pytest.approx(0.05)


def test_pgd_restarts_keep_the_first_success_per_example(monkeypatch):
    # forward predicts class 1 iff pixel 0 > 0.5; labels are 0, so "broken" means pixel 0 > 0.5.
    def forward(images):
        s = tf.reshape(images, [tf.shape(images)[0], -1])[:, 0]
        return tf.stack([0.5 * tf.ones_like(s), s], axis=1)

    def batch(a, b, c):
        return np.array([a, b, c], np.float32).reshape(3, 1, 1, 1)

    outputs = [batch(0.6, 0.4, 0.1),   # restart 1: breaks example 0
               batch(0.7, 0.8, 0.2),   # restart 2: breaks 0 again (ignored) and 1
               batch(0.1, 0.9, 0.3)]   # restart 3: breaks nothing new
    calls = []
    monkeypatch.setattr(attack_suite, "pgd_linf", _fake_pgd(calls, outputs))
    (attack,) = resolve_attacks(["pgd4x3"], 2, "linf")
    x = tf.constant(batch(0.3, 0.3, 0.3))
    best, success = attack.run(forward, x, tf.zeros([3], tf.int32), 0.5, "linf", 0)
    np.testing.assert_allclose(np.asarray(best).ravel(), [0.6, 0.8, 0.3])
    np.testing.assert_array_equal(np.asarray(success), [True, True, False])


# ---------------------------------------------------------------------------------------------
# 6. The Dual-BN branch parameter swap.


def _split_bn_layers(model):
    return [layer for layer in model._flatten_layers(include_self=False)
            if isinstance(layer, SplitBatchNormalization)]


def _small_dual_bn_model(bn_mode="dual"):
    return build_model("resnet", num_classes=NUM_CLASSES, image_shape=SHAPE, depth=10, width=0.125,
                       bn_mode=bn_mode)


def _randomise_branches(model, seed=0):
    """Gives every BN variable (each branch's gamma, beta, mean, variance) a different value."""
    rng = np.random.default_rng(seed)
    for layer in _split_bn_layers(model):
        for branch in ("adv", "clean"):
            gamma, beta = layer.affine_parameters(branch)
            mean, variance = layer.moving_statistics(branch)
            gamma.assign(rng.uniform(0.5, 1.5, gamma.shape).astype("float32"))
            beta.assign(rng.normal(0.0, 0.3, beta.shape).astype("float32"))
            mean.assign(rng.normal(0.0, 0.3, mean.shape).astype("float32"))
            variance.assign(rng.uniform(0.5, 2.0, variance.shape).astype("float32"))


def _outputs(model, x):
    return {branch: model(x, training=False, branch=branch).numpy() for branch in ("adv", "clean")}


def _copy_with(model, bn_mode, edit):
    """A copy of `model` whose BN layers are then changed by `edit(copy_layer, original_layer)`."""
    copy = _small_dual_bn_model(bn_mode)
    copy.set_weights(model.get_weights())
    for copy_layer, layer in zip(_split_bn_layers(copy), _split_bn_layers(model)):
        edit(copy_layer, layer)
    return copy


@pytest.mark.parametrize("kind", ["affine", "statistics"])
def test_swap_branch_parameters_matches_a_hand_built_model_and_is_an_involution(kind):
    model = _small_dual_bn_model()
    _randomise_branches(model)
    x = tf.constant(np.random.default_rng(1).uniform(size=(6,) + SHAPE).astype("float32"))
    original = _outputs(model, x)
    assert np.abs(original["adv"] - original["clean"]).max() > 1e-3  # the branches differ

    def params(layer, branch):
        getter = layer.affine_parameters if kind == "affine" else layer.moving_statistics
        return getter(branch)

    def give_adv_the_clean_ones(copy_layer, layer):
        for variable, value in zip(params(copy_layer, "adv"), params(layer, "clean")):
            variable.assign(value.numpy())

    def give_clean_the_adv_ones(copy_layer, layer):
        for variable, value in zip(params(copy_layer, "clean"), params(layer, "adv")):
            variable.assign(value.numpy())

    expected_adv = _copy_with(model, "dual", give_adv_the_clean_ones)(x, training=False, branch="adv")
    expected_clean = _copy_with(model, "dual", give_clean_the_adv_ones)(x, training=False,
                                                                         branch="clean")
    before = [v.numpy().copy() for v in model.weights]
    n_layers = len(_split_bn_layers(model))
    assert n_layers > 0

    assert swap_branch_parameters(model, kind) == n_layers
    swapped = _outputs(model, x)
    np.testing.assert_allclose(swapped["adv"], expected_adv.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(swapped["clean"], expected_clean.numpy(), rtol=1e-5, atol=1e-6)
    assert np.abs(swapped["adv"] - original["adv"]).max() > 1e-3
    assert swap_branch_parameters(model, kind) == n_layers
    restored = _outputs(model, x)
    np.testing.assert_array_equal(restored["adv"], original["adv"])
    np.testing.assert_array_equal(restored["clean"], original["clean"])
    for value, variable in zip(before, model.weights):
        np.testing.assert_array_equal(variable.numpy(), value)


def test_swap_only_touches_the_requested_kind():
    model = _small_dual_bn_model()
    _randomise_branches(model)
    layer = _split_bn_layers(model)[0]
    statistics = [v.numpy().copy() for b in ("adv", "clean") for v in layer.moving_statistics(b)]
    clean_gamma = layer.affine_parameters("clean")[0].numpy().copy()
    swap_branch_parameters(model, "affine")
    np.testing.assert_array_equal(layer.affine_parameters("adv")[0].numpy(), clean_gamma)
    for value, variable in zip(statistics, [v for b in ("adv", "clean")
                                            for v in layer.moving_statistics(b)]):
        np.testing.assert_array_equal(variable.numpy(), value)


def test_swap_on_models_without_the_split():
    x = tf.constant(np.random.default_rng(2).uniform(size=(4,) + SHAPE).astype("float32"))
    single = _small_dual_bn_model("single")
    _randomise_branches(single)
    before = _outputs(single, x)
    assert swap_branch_parameters(single, "affine") == 0
    assert swap_branch_parameters(single, "statistics") == 0
    after = _outputs(single, x)
    np.testing.assert_array_equal(after["adv"], before["adv"])

    shared_stats = _small_dual_bn_model("shared_stats")  # split affine only
    n_layers = len(_split_bn_layers(shared_stats))
    assert swap_branch_parameters(shared_stats, "statistics") == 0
    assert swap_branch_parameters(shared_stats, "affine") == n_layers > 0
    with pytest.raises(ValueError, match="kind"):
        swap_branch_parameters(shared_stats, "gamma")


# ---------------------------------------------------------------------------------------------
# 7. The CLI.

CLI_EPS = 0.0313725


def _command(*args):
    return [sys.executable, "-m", "arat_tf.evaluate", *map(str, args)]


def run_evaluate(*args, timeout=300):
    return subprocess.run(_command(*args), cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


def run_evaluate_concurrently(*arg_lists, timeout=300):
    """Runs several CLI invocations at once; returns `(returncode, stdout, stderr)` for each."""
    processes = [subprocess.Popen(_command(*args), cwd=REPO, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for args in arg_lists]
    results = []
    try:
        for process in processes:
            stdout, stderr = process.communicate(timeout=timeout)
            results.append((process.returncode, stdout, stderr))
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    return results


@pytest.fixture(scope="module")
def cifar_model_file(tmp_path_factory):
    """A tiny dual-BN ResNet-10 for 32x32x3 inputs, with different clean/adv BN parameters."""
    keras.utils.set_random_seed(0)
    model = build_model("resnet", num_classes=10, image_shape=(32, 32, 3), depth=10, width=0.125)
    _randomise_branches(model, seed=3)
    path = tmp_path_factory.mktemp("model") / "model.keras"
    model.save(path)
    return path


def _make_run_dir(tmp_path, model_file, data_dir, **config):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    if model_file is not None:
        (run_dir / "model.keras").write_bytes(model_file.read_bytes())
    config = {"dataset": "cifar10", "eps": CLI_EPS, "data_dir": data_dir, **config}
    (run_dir / "config.json").write_text(json.dumps(config))
    return run_dir


def _clean_accuracy_range(model, images, labels, branch):
    """The clean accuracy of `branch`, as `(lowest, highest)`: the CLI computes it in another
    process, as a graph, so an example within round-off of a tie may go either way."""
    fewest, most = correct_count_range(model(images, training=False, branch=branch).numpy(),
                                       labels)
    return fewest / len(labels), most / len(labels)


def test_cli_end_to_end(tmp_path, cifar_model_file, shared_tfds_dir):
    run_dir = _make_run_dir(tmp_path, cifar_model_file, shared_tfds_dir)
    result = run_evaluate("--run_dir", run_dir, "--n_examples", 32, "--attacks", "pgd5,apgd-ce",
                          "--batch_size", 32, "--branch", "all", "--affine_swap")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "robust (worst)" in result.stdout
    assert result.stdout.count("robust (worst)") == 4

    report = json.loads((run_dir / "evaluation.json").read_text())
    assert report["branch"] == "adv"
    assert report["n_examples"] == 32
    assert report["eps"] == pytest.approx(CLI_EPS)
    assert report["dataset"] == "cifar10" and report["norm"] == "linf"
    assert [a["name"] for a in report["attacks"]] == ["pgd5", "apgd-ce"]
    assert report["clean_accuracy"] >= report["robust_accuracy"]
    variants = report["variants"]
    assert [v["variant"] for v in variants] == [
        "branch=adv", "branch=clean", "statistics=adv,affine=clean", "statistics=clean,affine=adv"]
    for variant in variants:
        assert variant["n_examples"] == 32
        assert variant["clean_accuracy"] >= variant["robust_accuracy"]
        robust = [a["robust_accuracy"] for a in variant["attacks"]]
        assert robust[0] >= robust[1] == variant["robust_accuracy"]

    # Each variant's clean accuracy is that of the model it names, rebuilt here by hand.
    from arat_tf.data import make_eval_dataset

    images, labels = next(iter(make_eval_dataset("cifar10", batch_size=32, data_dir=shared_tfds_dir,
                                                 subset=32)))
    labels = labels.numpy()
    model = keras.models.load_model(run_dir / "model.keras")
    expected = [_clean_accuracy_range(model, images, labels, "adv"),
                _clean_accuracy_range(model, images, labels, "clean")]
    originals = {b: [v.numpy() for layer in _split_bn_layers(model) for v in layer.affine_parameters(b)]
                 for b in ("adv", "clean")}
    for branch, other in (("adv", "clean"), ("clean", "adv")):
        variables = [v for layer in _split_bn_layers(model) for v in layer.affine_parameters(branch)]
        for variable, value in zip(variables, originals[other]):
            variable.assign(value)
        expected.append(_clean_accuracy_range(model, images, labels, branch))
        for variable, value in zip(variables, originals[branch]):
            variable.assign(value)
    # Exact unless an example is within round-off of a tie (then either way).
    for variant, (lowest, highest) in zip(variants, expected):
        assert lowest - 1e-9 <= variant["clean_accuracy"] <= highest + 1e-9, (variant, expected)


@pytest.mark.slow
def test_cli_default_branch(tmp_path, cifar_model_file, shared_tfds_dir):
    run_dir = _make_run_dir(tmp_path, cifar_model_file, shared_tfds_dir)
    result = run_evaluate("--run_dir", run_dir, "--n_examples", 32, "--attacks", "pgd5,apgd-ce",
                          "--batch_size", 32)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("robust (worst)") == 1
    report = json.loads((run_dir / "evaluation.json").read_text())
    assert report["branch"] == "adv" and report["n_examples"] == 32
    assert [a["name"] for a in report["attacks"]] == ["pgd5", "apgd-ce"]
    assert report["clean_accuracy"] >= report["robust_accuracy"]
    assert len(report["variants"]) == 1


def test_cli_bad_input_fails_clearly(tmp_path, cifar_model_file, shared_tfds_dir):
    run_dir = _make_run_dir(tmp_path, cifar_model_file, shared_tfds_dir)
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    (empty_dir / "config.json").write_text(json.dumps({"dataset": "cifar10",
                                                       "data_dir": shared_tfds_dir}))
    bad_attack, missing, wrong_shape = run_evaluate_concurrently(
        ["--run_dir", run_dir, "--n_examples", 8, "--attacks", "pgd5,foo"],
        ["--run_dir", empty_dir, "--n_examples", 8, "--attacks", "pgd5"],
        ["--run_dir", run_dir, "--dataset", "mnist", "--n_examples", 8, "--attacks", "pgd5"],
    )
    returncode, _, stderr = bad_attack
    assert returncode != 0 and "Unknown attack 'foo'" in stderr, stderr[-2000:]

    returncode, _, stderr = missing
    assert returncode != 0 and str(empty_dir / "model.keras") in stderr, stderr[-2000:]

    returncode, _, stderr = wrong_shape
    assert returncode != 0, stderr[-2000:]
    assert "(32, 32, 3)" in stderr and "(28, 28, 1)" in stderr and "mnist" in stderr, stderr[-2000:]
    assert "Traceback" not in stderr  # a clear message, not a crash
    assert not (run_dir / "evaluation.json").exists()

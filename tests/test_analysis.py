"""Tests of arat_tf.analysis and the `python -m arat_tf.analyze` CLI.

Known answers for the pure functions (cosine, conflict ratio, Gaussian distances), invariants
that can fail for the model-level analyses (a probe leaves the model unchanged; identical inputs
through identical statistics have distance 0 and stop having it when only one branch changes;
swapping twice restores the logits exactly; the study's diagonal is the plain branch), and one
tiny real run (MNIST, SmallCNN, 4 steps, the analysis callback on) for the callback and the CLI.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

import arat_tf  # noqa: F401
from arat_tf.analysis import (
    NoInvarianceTermError,
    compare_gradients,
    conflict_ratio,
    conv_dense_kernels,
    cosine_similarity,
    gaussian_distances,
    gradient_conflict,
    preserved_state,
    split_objective,
    swapped_branch_parameters,
)
from arat_tf.analysis.callback import step_file_name
from arat_tf.analysis.dual_bn_study import NoSplitBatchNormError, dual_bn_study
from arat_tf.analysis.feature_statistics import (
    ChannelMoments,
    FeatureStatisticsProbe,
    bn_moving_statistics_distances,
)
from arat_tf.analysis.gradient_conflict import GradientConflictProbe, mean_over_batches
from arat_tf.analysis.suite import unavailable_analyses
from arat_tf.attacks import AttackConfig
from arat_tf.evaluation.branches import split_layers
from arat_tf.methods import AratTrainer, HybridTrainer, PgdAtTrainer, TradesTrainer
from arat_tf.models import build_model
from near_ties import correct_count_range

# The package exports the function `dual_bn_study`, which hides the module of the same name.
dual_bn_module = sys.modules["arat_tf.analysis.dual_bn_study"]

REPO = Path(__file__).resolve().parents[1]
TFDS_DIR = REPO.parent / "shared" / "datasets" / "tfds"
IMAGE_SHAPE = (28, 28, 1)
SMALL_ATTACK = AttackConfig(steps=2, eps=0.1, step_size=0.05)
SMALL_CNN_KERNELS = ["conv1", "conv2", "conv3", "conv4", "fc1", "fc2", "classifier"]


def small_cnn(bn_mode="dual"):
    return build_model("small_cnn", num_classes=10, image_shape=IMAGE_SHAPE, bn_mode=bn_mode,
                       width=0.25)


def random_batch(batch=16, seed=0):
    rng = np.random.RandomState(seed)
    return (tf.constant(rng.rand(batch, *IMAGE_SHAPE).astype("float32")),
            tf.constant(rng.randint(0, 10, batch).astype("int32")))


def arat(classifier=None, **kwargs):
    kwargs.setdefault("train_attack", SMALL_ATTACK)
    kwargs.setdefault("attack_bn_mode", "train")
    return AratTrainer(classifier or small_cnn(), **kwargs)


def values(variables):
    return [np.array(v.numpy()) for v in variables]


def diverge_branches(classifier, seed=1):
    """Gives the clean branch its own random statistics and affine parameters."""
    rng = np.random.RandomState(seed)
    for layer in split_layers(classifier, "statistics"):
        mean, variance = layer.moving_statistics("clean")
        mean.assign(rng.normal(0, 0.3, mean.shape).astype("float32"))
        variance.assign(rng.uniform(0.5, 2.0, variance.shape).astype("float32"))
    for layer in split_layers(classifier, "affine"):
        gamma, beta = layer.affine_parameters("clean")
        gamma.assign(rng.uniform(0.5, 1.5, gamma.shape).astype("float32"))
        beta.assign(rng.normal(0, 0.3, beta.shape).astype("float32"))


# --- Cosine and conflict ratio: known answers -------------------------------------------------


def test_identical_gradients_have_cosine_one_and_no_conflict():
    a = np.array([0.5, -2.0, 3.0, 1e-3])
    assert cosine_similarity(a, a) == pytest.approx(1.0)
    assert conflict_ratio(a, a) == 0.0


def test_negated_gradients_have_cosine_minus_one_and_full_conflict():
    a = np.array([0.5, -2.0, 3.0, 1e-3])
    assert cosine_similarity(a, -a) == pytest.approx(-1.0)
    assert conflict_ratio(a, -a) == 1.0


def test_orthogonal_gradients():
    assert cosine_similarity([1.0, 1.0], [1.0, -1.0]) == pytest.approx(0.0)
    assert conflict_ratio([1.0, 1.0], [1.0, -1.0]) == 0.5
    # Disjoint supports: orthogonal, and no entry where both move, so no ratio at all.
    assert cosine_similarity([1.0, 0.0], [0.0, 1.0]) == pytest.approx(0.0)
    assert conflict_ratio([1.0, 0.0], [0.0, 1.0]) is None


def test_partial_sign_conflict_has_the_known_fraction_and_cosine():
    a = np.array([1.0, 2.0, 3.0, 4.0])
    b = np.array([1.0, -2.0, 3.0, -4.0])
    assert conflict_ratio(a, b) == 0.5
    assert cosine_similarity(a, b) == pytest.approx((1 - 4 + 9 - 16) / 30)
    assert conflict_ratio([1.0, 2.0, 3.0], [-1.0, 2.0, 3.0]) == pytest.approx(1 / 3)


def test_zero_entries_are_left_out_of_the_conflict_ratio():
    a, b = np.array([1.0, 0.0, -1.0, 2.0]), np.array([2.0, 5.0, 0.0, -1.0])
    assert conflict_ratio(a, b) == 0.5  # entries 0 and 3 compared, entry 3 conflicts
    assert cosine_similarity(a, b) == pytest.approx(0.0)


def test_a_zero_gradient_has_no_cosine():
    assert cosine_similarity(np.zeros(3), np.ones(3)) is None
    assert conflict_ratio(np.zeros(3), np.ones(3)) is None


def test_overall_is_over_the_concatenation_not_the_mean_of_layers():
    big, small = np.array([3.0, 4.0]), np.array([1.0, 0.0, 0.0])  # |big|^2 = 25, |small|^2 = 1
    result = compare_gradients({"big": big, "small": small}, {"big": big, "small": -small})
    assert result["per_layer"]["big"]["cosine"] == pytest.approx(1.0)
    assert result["per_layer"]["small"]["cosine"] == pytest.approx(-1.0)
    assert result["overall"]["cosine"] == pytest.approx((25 - 1) / (25 + 1))
    assert result["per_layer"]["small"]["conflict_ratio"] == 1.0
    assert result["overall"]["conflict_ratio"] == pytest.approx(1 / 3)  # 1 of 3 non-zero pairs
    assert result["overall"]["entries"] == 5 and result["overall"]["entries_compared"] == 3
    assert cosine_similarity([big, small], [big, -small]) == result["overall"]["cosine"]


def test_mismatched_gradients_are_refused():
    with pytest.raises(ValueError, match="same number of entries"):
        cosine_similarity(np.ones(3), np.ones(4))
    with pytest.raises(ValueError, match="same layers"):
        compare_gradients({"a": np.ones(2)}, {"b": np.ones(2)})


def test_mean_over_batches_skips_undefined_values():
    first = compare_gradients({"l": np.array([1.0, 1.0])}, {"l": np.array([1.0, 1.0])})
    second = compare_gradients({"l": np.array([1.0, 1.0])}, {"l": np.array([-1.0, 1.0])})
    third = compare_gradients({"l": np.array([1.0, 1.0])}, {"l": np.zeros(2)})
    merged = mean_over_batches([first, second, third])
    assert merged["overall"]["cosine"] == pytest.approx(0.5)  # mean of 1 and 0; None skipped
    assert merged["overall"]["conflict_ratio"] == pytest.approx(0.25)


# --- Gaussian distances -------------------------------------------------------------------------


def test_gaussian_distances_known_answers():
    same = gaussian_distances([1.0, 2.0], [1.0, 4.0], [1.0, 2.0], [1.0, 4.0])
    assert all(value == pytest.approx(0.0) for value in same.values())
    shifted = gaussian_distances([0.0, 0.0], [1.0, 1.0], [3.0, 4.0], [1.0, 1.0])
    assert shifted["mean_l2"] == pytest.approx(5.0)
    assert shifted["wasserstein2"] == pytest.approx(5.0)
    assert shifted["variance_l2"] == 0.0
    scaled = gaussian_distances([0.0], [1.0], [0.0], [4.0], variance_floor=0.0)
    assert scaled["wasserstein2"] == pytest.approx(1.0)  # |sigma 1 - sigma 2|
    assert scaled["symmetric_kl"] == pytest.approx(0.25 * (0.25 + 4.0 - 2.0))


def test_channel_moments_match_numpy_over_batches():
    rng = np.random.RandomState(0)
    first, second = rng.rand(5, 3), rng.rand(7, 3)
    moments = ChannelMoments()
    moments.update(first)
    moments.update(second)
    mean, variance = moments.mean_and_variance()
    both = np.concatenate([first, second])
    np.testing.assert_allclose(mean, both.mean(axis=0))
    np.testing.assert_allclose(variance, both.var(axis=0), atol=1e-12)


# --- Gradient conflict on tiny trainers ---------------------------------------------------------


def test_split_objective_parts_sum_to_the_total_loss():
    trainer = arat(invariance_weight=7.0, adv_ce_weight=0.3, clean_ce_weight=0.7)
    images, labels = random_batch()
    total, terms, _, _ = trainer.compute_losses(images, images, labels)
    classification, invariance = split_objective(trainer, terms)
    assert float(classification + invariance) == pytest.approx(float(total), rel=1e-5)
    with pytest.raises(NoInvarianceTermError, match="no invariance term"):
        split_objective(PgdAtTrainer(small_cnn("single")), {"ce_adv": 1.0})


def test_gradient_conflict_of_arat_is_finite_per_kernel_and_leaves_the_model_unchanged():
    trainer = arat()
    images, labels = random_batch()
    before = values(trainer.variables)
    result = gradient_conflict(trainer, images, labels)
    assert list(result["per_layer"]) == SMALL_CNN_KERNELS
    assert list(conv_dense_kernels(trainer.classifier)) == SMALL_CNN_KERNELS
    overall = result["overall"]
    assert -1.0 <= overall["cosine"] <= 1.0 and 0.0 <= overall["conflict_ratio"] <= 1.0
    assert np.isfinite([overall["classification_norm"], overall["invariance_norm"]]).all()
    # The taps (fc1, fc2) come before the last dense layer: the invariance loss cannot reach it.
    classifier_layer = result["per_layer"]["classifier"]
    assert classifier_layer["invariance_norm"] == 0.0
    assert classifier_layer["cosine"] is None and classifier_layer["conflict_ratio"] is None
    assert result["per_layer"]["conv1"]["invariance_norm"] > 0.0
    # The training attack (BN in train mode) and the training-mode forward pass updated the BN
    # statistics; the analysis must have put them back.
    for old, new in zip(before, values(trainer.variables)):
        np.testing.assert_array_equal(old, new)


def test_symmetric_ablation_changes_only_the_invariance_gradient():
    classifier = small_cnn()
    asymmetric = arat(classifier, use_predictor=False, asymmetric=True)
    symmetric = arat(classifier, use_predictor=False, asymmetric=False)
    images, labels = random_batch()
    adversarial_images = asymmetric.generate_adversarial(images, labels)
    with preserved_state(asymmetric):
        first = gradient_conflict(asymmetric, images, labels, adversarial_images)
        second = gradient_conflict(symmetric, images, labels, adversarial_images)
    for name in SMALL_CNN_KERNELS:
        assert first["per_layer"][name]["classification_norm"] == pytest.approx(
            second["per_layer"][name]["classification_norm"], rel=1e-5)
    # Without stop-gradient the clean side also receives the invariance gradient.
    assert first["overall"]["invariance_norm"] != pytest.approx(
        second["overall"]["invariance_norm"], rel=1e-3)
    assert first["losses"]["invariance"] == pytest.approx(second["losses"]["invariance"], rel=1e-5)


def test_gradient_conflict_of_trades_and_refusal_for_methods_without_invariance():
    trades = TradesTrainer(small_cnn("single"), train_attack=AttackConfig(steps=1, start="gaussian"))
    images, labels = random_batch()
    probe = GradientConflictProbe(trades)
    result = probe(images, labels)
    assert result["overall"]["invariance_norm"] > 0.0
    # The KL term reaches the last dense layer too: every layer has a cosine.
    assert all(r["cosine"] is not None for r in result["per_layer"].values())
    assert probe(*random_batch(seed=1))["overall"]["cosine"] is not None  # reuses the compiled fn
    for trainer in (PgdAtTrainer(small_cnn("single")), HybridTrainer(small_cnn())):
        with pytest.raises(NoInvarianceTermError):
            GradientConflictProbe(trainer)
        assert "gradient_conflict" in unavailable_analyses(trainer, ["gradient_conflict"])


# --- Mixture distribution -----------------------------------------------------------------------


def test_identical_inputs_have_distance_zero_until_one_branch_changes():
    trainer = arat()
    images, _ = random_batch(batch=32)
    probe = FeatureStatisticsProbe(trainer)
    probe.update(images, images)
    fresh = probe.result()
    for routing in ("deployed", "branches", "training"):  # both branches initialised alike
        for tap in ("fc1", "fc2"):
            assert fresh[routing][tap]["wasserstein2"] == pytest.approx(0.0, abs=1e-6)
    assert all(d["wasserstein2"] == 0.0 for d in bn_moving_statistics_distances(trainer.classifier).values())

    trainer.classifier(random_batch(seed=3)[0], training=True, branch="adv")  # adv statistics only
    probe = FeatureStatisticsProbe(trainer)
    probe.update(images, images)
    changed = probe.result()
    for tap in ("fc1", "fc2"):
        assert changed["deployed"][tap]["wasserstein2"] == 0.0  # same branch for both inputs
        assert changed["training"][tap]["wasserstein2"] == pytest.approx(0.0, abs=1e-6)  # batch stats
        assert changed["branches"][tap]["wasserstein2"] > 1e-4  # different moving statistics
    distances = bn_moving_statistics_distances(trainer.classifier)
    assert len(distances) == 6 and all(d["wasserstein2"] > 0.0 for d in distances.values())
    assert bn_moving_statistics_distances(small_cnn("single")) == {}


# --- Dual-BN study ------------------------------------------------------------------------------


def test_swapping_twice_restores_the_logits_exactly_and_once_exchanges_the_branches():
    classifier = small_cnn()
    diverge_branches(classifier)
    images, _ = random_batch()
    adv = classifier(images, training=False, branch="adv").numpy()
    clean = classifier(images, training=False, branch="clean").numpy()
    assert not np.allclose(adv, clean)
    for kind in ("statistics", "affine"):
        with swapped_branch_parameters(classifier, kind) as swapped:
            assert swapped == 6
            assert not np.allclose(classifier(images, training=False, branch="adv").numpy(), adv)
        np.testing.assert_array_equal(classifier(images, training=False, branch="adv").numpy(), adv)
        np.testing.assert_array_equal(classifier(images, training=False, branch="clean").numpy(), clean)
    with swapped_branch_parameters(classifier, "statistics"), \
            swapped_branch_parameters(classifier, "affine"):
        np.testing.assert_array_equal(classifier(images, training=False, branch="adv").numpy(), clean)


def branch_accuracy_range(classifier, dataset, branch):
    """The plain branch's accuracy as `(lowest, highest)`, run eagerly: the study runs it as a
    `tf.function`, whose fused kernels round differently, so an example within round-off of a
    tie may go either way (the range is one number otherwise)."""
    fewest = most = total = 0
    for images, labels in dataset:
        low, high = correct_count_range(classifier(images, training=False, branch=branch).numpy(),
                                        labels.numpy())
        fewest, most, total = fewest + low, most + high, total + len(labels)
    return fewest / total, most / total


def test_dual_bn_study_diagonal_is_the_plain_branches_and_restores_the_model():
    classifier = small_cnn()
    diverge_branches(classifier)
    images, labels = random_batch(batch=48)
    dataset = tf.data.Dataset.from_tensor_slices((images, labels)).batch(16)
    before = values(classifier.variables)
    study = dual_bn_study(classifier, dataset)
    accuracy = {(r["statistics"], r["affine"]): r["clean_accuracy"] for r in study["combinations"]}
    assert set(accuracy) == {(s, a) for s in ("clean", "adv") for a in ("clean", "adv")}
    for branch in ("adv", "clean"):
        lowest, highest = branch_accuracy_range(classifier, dataset, branch)
        assert lowest <= accuracy[(branch, branch)] <= highest, (branch, accuracy, lowest, highest)
    for old, new in zip(before, values(classifier.variables)):
        np.testing.assert_array_equal(old, new)


def test_dual_bn_study_restores_the_model_on_error(monkeypatch):
    classifier = small_cnn()
    diverge_branches(classifier)
    dataset = tf.data.Dataset.from_tensor_slices(random_batch()).batch(8)
    before = values(classifier.variables)
    calls = []

    def failing_accuracy(forward, data):
        calls.append(1)
        if len(calls) == 2:  # the (statistics=clean, affine=adv) combination: affine swapped
            raise RuntimeError("interrupted")
        return 0.0

    monkeypatch.setattr(dual_bn_module, "_accuracy", failing_accuracy)
    with pytest.raises(RuntimeError, match="interrupted"):
        dual_bn_study(classifier, dataset)
    for old, new in zip(before, values(classifier.variables)):
        np.testing.assert_array_equal(old, new)


def test_dual_bn_study_needs_split_bn():
    dataset = tf.data.Dataset.from_tensor_slices(random_batch()).batch(8)
    with pytest.raises(NoSplitBatchNormError, match="no BN site"):
        dual_bn_study(small_cnn("single"), dataset)


# --- A tiny real run: the training callback and the CLI -----------------------------------------


@pytest.fixture(scope="module")
def analysed_run(tmp_path_factory):
    """ARAT on 128 MNIST images, 4 steps, the analysis callback every 2 steps (~10 s)."""
    if not (TFDS_DIR / "mnist").is_dir():
        pytest.skip(f"shared TFDS data dir with mnist not found at {TFDS_DIR}")
    from arat_tf import training
    from arat_tf.config import TrainConfig

    run_dir = str(tmp_path_factory.mktemp("analysis_run") / "run")
    config = TrainConfig(
        dataset="mnist", data_dir=str(TFDS_DIR), model="small_cnn", width=0.25, method="arat",
        train_subset=128, val_subset=32, batch_size=32, eval_batch_size=32, epochs=1,
        attack_steps=2, val_attack_steps=1, auto_balance_examples=32, lr_schedule="constant",
        learning_rate=0.01, analyze_every_steps=2, run_dir=run_dir, verbose=0,
    )
    training.train(config)
    return run_dir


def test_the_callback_writes_a_file_every_n_steps(analysed_run):
    directory = os.path.join(analysed_run, "analysis")
    assert sorted(os.listdir(directory)) == [step_file_name(2), step_file_name(4)]
    with open(os.path.join(directory, step_file_name(4))) as stream:
        record = json.load(stream)
    assert record["step"] == 4 and record["epoch"] == 1
    assert list(record["gradient_conflict"]["per_layer"]) == SMALL_CNN_KERNELS
    assert np.isfinite(record["gradient_conflict"]["overall"]["cosine"])
    assert set(record["mixture"]["taps"]) == {"deployed", "branches", "training"}
    assert "clean_mean" not in record["mixture"]["taps"]["deployed"]["fc1"]  # no per-channel lists


def run_analyze(*args):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    return subprocess.run([sys.executable, "-m", "arat_tf.analyze", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


def test_cli_writes_analysis_json_and_plots(analysed_run, tmp_path):
    output_dir = tmp_path / "out"
    result = run_analyze(f"--run_dir={analysed_run}", "--n_examples=48", "--batch_size=24",
                         "--dual_bn_attacks=pgd2", f"--output_dir={output_dir}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Gradient conflict (48 examples, 2 batches)" in result.stdout
    report = json.loads((output_dir / "analysis.json").read_text())
    assert {"gradient_conflict", "mixture", "dual_bn", "notes", "skipped"} <= set(report)
    assert report["notes"] == [] and report["skipped"] == {}
    assert list(report["gradient_conflict"]["per_layer"]) == SMALL_CNN_KERNELS
    assert len(report["mixture"]["taps"]["deployed"]["fc1"]["clean_mean"]) == 50  # 200 * 0.25
    assert len(report["mixture"]["bn_moving_statistics"]) == 6
    combinations = report["dual_bn"]["combinations"]
    assert len(combinations) == 4 and report["dual_bn"]["attacks"] == ["pgd2"]
    assert all(c["robust_accuracy"] <= c["clean_accuracy"] for c in combinations)
    for name in ("gradient_conflict", "mixture", "dual_bn", "training_series"):
        assert (output_dir / f"{name}.png").stat().st_size > 1000


@pytest.mark.slow  # ~11 s of subprocesses; the CLI's main path is in the default run
def test_cli_skips_or_refuses_what_does_not_apply(analysed_run, tmp_path):
    hybrid_run = tmp_path / "hybrid"
    shutil.copytree(analysed_run, hybrid_run, ignore=shutil.ignore_patterns("checkpoints", "analysis"))
    config = json.loads((hybrid_run / "config.json").read_text())
    config["method"] = "hybrid"  # same dual-BN model, no invariance term
    (hybrid_run / "config.json").write_text(json.dumps(config))

    only = run_analyze(f"--run_dir={hybrid_run}", "--analyses=gradient_conflict")
    assert only.returncode != 0
    assert "error: cannot run gradient_conflict" in only.stderr + only.stdout
    assert "no invariance term" in only.stderr + only.stdout

    mixed = run_analyze(f"--run_dir={hybrid_run}", "--analyses=gradient_conflict,dual_bn",
                        "--dual_bn_attacks=", "--n_examples=32")
    assert mixed.returncode == 0, mixed.stderr[-3000:]
    assert "Skipping gradient_conflict" in mixed.stdout
    report = json.loads((hybrid_run / "analysis" / "analysis.json").read_text())
    assert "gradient_conflict" in report["skipped"] and "dual_bn" in report
    assert "gradient_conflict" not in report



def test_a_broken_run_directory_ends_with_a_clear_error(analysed_run, tmp_path):
    from arat_tf.analysis.run_trainer import load_run_trainer

    with pytest.raises(SystemExit, match="error: run directory not found"):
        load_run_trainer(str(tmp_path / "nope"))
    with pytest.raises(SystemExit, match="config.json not found"):
        load_run_trainer(str(tmp_path))
    no_model = tmp_path / "no_model"
    shutil.copytree(analysed_run, no_model, ignore=shutil.ignore_patterns("model.keras"))
    with pytest.raises(SystemExit, match="error: model file not found"):
        load_run_trainer(str(no_model))


def test_a_run_trainer_holds_the_reported_model_and_the_trained_predictors(analysed_run):
    from arat_tf.analysis.run_trainer import load_run_trainer
    from arat_tf.run_files import load_classifier

    trainer, config, notes = load_run_trainer(analysed_run)
    assert notes == [] and config.method == "arat"
    reported = load_classifier(os.path.join(analysed_run, "model.keras"))
    images, _ = random_batch()
    np.testing.assert_array_equal(trainer.classifier(images, training=False).numpy(),
                                  reported(images, training=False).numpy())
    # The predictors come from the checkpoint, not a fresh initialisation.
    fresh = AratTrainer(small_cnn())
    assert not all(np.array_equal(a, b) for a, b in zip(
        values(trainer.predictors["fc1"].variables), values(fresh.predictors["fc1"].variables)))

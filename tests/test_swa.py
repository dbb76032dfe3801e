"""SWA: the running average is an equal average, and the BN refresh re-estimates only the adv branch."""

import numpy as np
import tensorflow as tf

from arat_tf.attacks import AttackConfig
from arat_tf.layers import SplitBatchNormalization
from arat_tf.models import build_model
from arat_tf.swa import WeightAverage, adversarial_statistics, refresh_adversarial_statistics


def test_weight_average_is_the_equal_mean_of_the_snapshots():
    variable = tf.Variable([0.0, 0.0])
    average = WeightAverage([variable])
    snapshots = [np.array([1.0, 2.0]), np.array([3.0, -2.0]), np.array([5.0, 6.0])]
    for snapshot in snapshots:
        variable.assign(snapshot)
        average.update()
    variable.assign([100.0, 100.0])
    assert average.copy_to_model()
    np.testing.assert_allclose(variable.numpy(), np.mean(snapshots, axis=0), rtol=1e-6)
    assert int(average.count.numpy()) == 3


def test_copy_without_any_average_leaves_the_model_unchanged():
    variable = tf.Variable([7.0])
    assert not WeightAverage([variable]).copy_to_model()
    assert variable.numpy()[0] == 7.0


def test_refresh_sets_adv_statistics_to_the_equal_average_and_leaves_clean_untouched():
    model = build_model("small_cnn", num_classes=10, image_shape=(28, 28, 1), width=0.25)
    rng = np.random.default_rng(0)
    batches = [
        (rng.random((8, 28, 28, 1), dtype=np.float32) * (k + 1) / 3, rng.integers(0, 10, 8))
        for k in range(3)
    ]
    dataset = tf.data.Dataset.from_tensor_slices(
        (np.concatenate([b[0] for b in batches]), np.concatenate([b[1] for b in batches]))
    ).batch(8)
    model(batches[0][0], training=True, branch="clean")  # give the clean branch non-default stats
    clean_before = {w.path: w.numpy().copy() for w in model.weights if "clean_" in w.path}
    no_attack = AttackConfig(eps=0.0, step_size=0.0, steps=1, start="zero")

    used = refresh_adversarial_statistics(model, dataset, no_attack)

    assert used == 3
    first_bn = model.conv_norms[0]
    assert isinstance(first_bn, SplitBatchNormalization)
    features = [model.convs[0](tf.constant(images)) for images, _ in batches]
    expected_mean = np.mean([tf.reduce_mean(f, axis=[0, 1, 2]).numpy() for f in features], axis=0)
    moving_mean, _ = first_bn.moving_statistics("adv")
    np.testing.assert_allclose(moving_mean.numpy(), expected_mean, rtol=1e-4, atol=1e-6)
    for weight in model.weights:
        if "clean_" in weight.path:
            np.testing.assert_array_equal(weight.numpy(), clean_before[weight.path])
    assert first_bn.momentum == 0.9
    assert len(adversarial_statistics(model)) == 6

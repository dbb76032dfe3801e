"""Behaviour tests for arat_tf.models: logits, taps, BN branches, serialisation, argument checks."""

from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

import arat_tf  # noqa: F401  (registers the custom classes for keras.models.load_model)
from arat_tf.layers import BN_MODES
from arat_tf.models import (
    MODELS,
    PreActResNet,
    ResNet,
    SmallCNN,
    WideResNet,
    build_model,
)

# Tiny configurations of every registered model (a 2-core CPU machine runs these tests).
TINY = {
    "resnet": dict(depth=10, width=0.125, image_shape=(32, 32, 3)),
    "preact_resnet": dict(depth=10, width=0.125, image_shape=(32, 32, 3)),
    "wide_resnet": dict(depth=10, width=1, image_shape=(32, 32, 3)),
    "small_cnn": dict(width=0.25, image_shape=(28, 28, 1)),
}
BATCH = 4


def test_tiny_table_covers_every_registered_model():
    assert set(TINY) == set(MODELS)


def tiny_model(name, bn_mode="dual", num_classes=10):
    return build_model(name, num_classes=num_classes, bn_mode=bn_mode, **TINY[name])


def images_for(name, batch=BATCH, seed=0):
    shape = TINY[name]["image_shape"]
    return tf.random.stateless_uniform((batch,) + shape, seed=(seed, 1))


def snapshot(model):
    return {w.path: np.array(w.numpy()) for w in model.weights}


def weights_named(model, fragment):
    return [w for w in model.weights if fragment in w.path.split("/")[-1]]


# ---------------------------------------------------------------------------------------------
# Logits and taps
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", MODELS)
def test_logits_shape_and_taps_keyed_by_tap_names(name):
    model = tiny_model(name, num_classes=7)
    x = images_for(name)
    assert len(model.tap_names) == len(set(model.tap_names)) >= 1
    for training in (False, True):
        for branch in ("adv", "clean"):
            context = f"training={training}, branch={branch}"
            logits = model(x, training=training, branch=branch)
            assert tuple(logits.shape) == (BATCH, 7), context
            assert np.all(np.isfinite(logits.numpy())), context

            logits_with_taps, taps = model(x, training=training, branch=branch, return_taps=True)
            assert tuple(logits_with_taps.shape) == (BATCH, 7), context
            assert isinstance(taps, dict), context
            assert list(taps) == list(model.tap_names), context
            for tap_name, tap in taps.items():
                assert len(tap.shape) == 2, (context, tap_name)
                assert tap.shape[0] == BATCH, (context, tap_name)
                assert tap.shape[1] >= 1, (context, tap_name)
                assert np.all(np.isfinite(tap.numpy())), (context, tap_name)


@pytest.mark.parametrize("name", MODELS)
def test_mixed_branch_logits_shape(name):
    model = tiny_model(name)
    logits, taps = model(images_for(name), training=True, branch="mixed", return_taps=True)
    assert tuple(logits.shape) == (BATCH, 10)
    assert all(t.shape[0] == BATCH for t in taps.values())


def test_resnet18_full_width_taps():
    model = build_model("resnet", num_classes=10, image_shape=(32, 32, 3), depth=18, width=1.0)
    expected = ["block4.0.bn1", "block4.0.bn2", "block4.1.bn1", "block4.1.bn2"]
    assert list(model.tap_names) == expected
    _, taps = model(tf.zeros((2, 32, 32, 3)), training=False, return_taps=True)
    assert list(taps) == expected
    for tap in taps.values():
        assert tuple(tap.shape) == (2, 512)


def test_resnet_default_depth_is_18():
    model = ResNet(num_classes=10, width=0.125)
    assert model.depth == 18
    assert len(model.tap_names) == 4


def test_wrn_34_10_taps():
    """The paper's WideResNet-34-10: 11 taps, the first (group3.0.relu1) 320-d, the others 640-d."""
    model = build_model("wide_resnet", num_classes=10, image_shape=(32, 32, 3), depth=34, width=10)
    assert len(model.tap_names) == 11
    assert model.tap_names[-1] == "penultimate"
    _, taps = model(tf.zeros((1, 32, 32, 3)), training=False, return_taps=True)
    dims = [int(taps[name].shape[-1]) for name in model.tap_names]
    assert dims[0] == 320
    assert dims[1:] == [640] * 10


@pytest.mark.parametrize("depth,widen_factor", [(10, 1), (16, 2)])
def test_wrn_tap_count_and_dims_follow_formula(depth, widen_factor):
    """WRN-d-k: n = (d - 4) / 6 blocks in group 3, 2n + 1 taps; the first relu1 sees group 2's
    32k channels, every later tap is 64k wide."""
    model = WideResNet(num_classes=10, depth=depth, widen_factor=widen_factor)
    n = (depth - 4) // 6
    assert len(model.tap_names) == 2 * n + 1
    _, taps = model(tf.zeros((1, 32, 32, 3)), training=False, return_taps=True)
    assert list(taps) == list(model.tap_names)
    dims = [int(taps[name].shape[-1]) for name in model.tap_names]
    assert dims == [32 * widen_factor] + [64 * widen_factor] * (2 * n)


def test_small_cnn_taps_are_hidden_dense_features():
    model = SmallCNN(num_classes=10, width=0.25)
    _, taps = model(tf.zeros((3, 28, 28, 1)), return_taps=True)
    assert list(taps) == ["fc1", "fc2"]
    assert [tuple(t.shape) for t in taps.values()] == [(3, 50), (3, 50)]


# ---------------------------------------------------------------------------------------------
# BN branches
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", MODELS)
def test_dual_bn_branch_selects_clean_affine_parameters(name):
    model = tiny_model(name, bn_mode="dual")
    x = images_for(name)
    # Fresh model: both branches have identical variables, so they agree exactly.
    np.testing.assert_array_equal(
        model(x, training=False, branch="adv").numpy(),
        model(x, training=False, branch="clean").numpy(),
    )
    clean_gammas = weights_named(model, "clean_gamma")
    assert clean_gammas, "a dual-BN model has clean-branch gammas"
    for gamma in clean_gammas:
        gamma.assign(np.full(gamma.shape, 2.5, np.float32))
    adv = model(x, training=False, branch="adv").numpy()
    clean = model(x, training=False, branch="clean").numpy()
    assert np.max(np.abs(adv - clean)) > 1e-4


@pytest.mark.parametrize("name", MODELS)
def test_single_bn_branches_are_identical(name):
    model = tiny_model(name, bn_mode="single")
    assert not weights_named(model, "clean_"), "single BN has no clean-branch variables"
    assert not weights_named(model, "adv_"), "single BN has no adv-branch variables"
    # Change the (shared) affine parameters and train the statistics on both branches.
    for gamma in weights_named(model, "gamma"):
        gamma.assign(np.full(gamma.shape, 2.5, np.float32))
    model(images_for(name, seed=1), training=True, branch="adv")
    model(images_for(name, seed=2) * 0.5, training=True, branch="clean")
    x = images_for(name)
    np.testing.assert_array_equal(
        model(x, training=False, branch="adv").numpy(),
        model(x, training=False, branch="clean").numpy(),
    )
    np.testing.assert_array_equal(
        model(x, training=True, branch="adv").numpy(),
        model(x, training=True, branch="clean").numpy(),
    )


@pytest.mark.parametrize("name", MODELS)
def test_adv_training_call_leaves_clean_branch_untouched(name):
    model = tiny_model(name, bn_mode="dual")
    before = snapshot(model)
    model(images_for(name), training=True, branch="adv")
    after = snapshot(model)

    clean_paths = [p for p in before if "clean_" in p]
    assert clean_paths
    for path in clean_paths:
        np.testing.assert_array_equal(after[path], before[path], err_msg=path)

    adv_stat_paths = [p for p in before if "adv_moving_" in p]
    assert adv_stat_paths
    for path in adv_stat_paths:
        assert not np.array_equal(after[path], before[path]), f"{path} was not updated"

    # A forward call never changes trainable parameters.
    for w in model.trainable_weights:
        np.testing.assert_array_equal(after[w.path], before[w.path], err_msg=w.path)


@pytest.mark.parametrize("name", MODELS)
def test_clean_training_call_leaves_adv_branch_untouched(name):
    model = tiny_model(name, bn_mode="dual")
    before = snapshot(model)
    model(images_for(name), training=True, branch="clean")
    after = snapshot(model)
    for path in before:
        if "adv_" in path:
            np.testing.assert_array_equal(after[path], before[path], err_msg=path)
        if "clean_moving_" in path:
            assert not np.array_equal(after[path], before[path]), f"{path} was not updated"


@pytest.mark.parametrize("name", MODELS)
def test_inference_call_changes_nothing(name):
    model = tiny_model(name, bn_mode="dual")
    before = snapshot(model)
    model(images_for(name), training=False, branch="adv")
    model(images_for(name), training=False, branch="clean")
    after = snapshot(model)
    for path in before:
        np.testing.assert_array_equal(after[path], before[path], err_msg=path)


@pytest.mark.parametrize("name", MODELS)
def test_mixed_call_equals_separate_branch_calls_with_dual_bn(name):
    first = tiny_model(name, bn_mode="dual")
    second = tiny_model(name, bn_mode="dual")
    # Make the branches genuinely different before comparing.
    for gamma in weights_named(first, "clean_gamma"):
        gamma.assign(np.full(gamma.shape, 1.5, np.float32))
    for beta in weights_named(first, "adv_beta"):
        beta.assign(np.full(beta.shape, 0.1, np.float32))
    second.set_weights(first.get_weights())

    x_adv = images_for(name, seed=3)
    x_clean = images_for(name, seed=4) * 0.7
    mixed_logits, mixed_taps = first(
        tf.concat([x_adv, x_clean], axis=0), training=True, branch="mixed", return_taps=True
    )
    adv_logits, adv_taps = second(x_adv, training=True, branch="adv", return_taps=True)
    clean_logits, clean_taps = second(x_clean, training=True, branch="clean", return_taps=True)

    np.testing.assert_allclose(
        mixed_logits.numpy(), np.concatenate([adv_logits.numpy(), clean_logits.numpy()]),
        rtol=1e-4, atol=1e-4,
    )
    for tap in first.tap_names:
        np.testing.assert_allclose(
            mixed_taps[tap].numpy(),
            np.concatenate([adv_taps[tap].numpy(), clean_taps[tap].numpy()]),
            rtol=1e-4, atol=1e-4, err_msg=tap,
        )
    # The moving statistics of both branches were updated identically.
    for w_first, w_second in zip(first.weights, second.weights):
        np.testing.assert_allclose(
            w_first.numpy(), w_second.numpy(), rtol=1e-4, atol=1e-5, err_msg=w_first.path
        )


# ---------------------------------------------------------------------------------------------
# Serialisation
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", MODELS)
def test_keras_save_load_round_trip(name, tmp_path):
    model = tiny_model(name, bn_mode="dual")
    # Make the two branches' statistics and affine parameters differ from their initial values.
    model(images_for(name, seed=5), training=True, branch="adv")
    model(images_for(name, seed=6) * 0.5, training=True, branch="clean")
    for gamma in weights_named(model, "clean_gamma"):
        gamma.assign(np.full(gamma.shape, 1.3, np.float32))

    path = tmp_path / f"{name}.keras"
    model.save(path)
    loaded = keras.models.load_model(path)

    assert type(loaded) is type(model)
    assert loaded.bn_mode == "dual"
    assert list(loaded.tap_names) == list(model.tap_names)
    assert len(loaded.weights) == len(model.weights)
    x = images_for(name)
    for branch in ("adv", "clean"):
        np.testing.assert_array_equal(
            loaded(x, training=False, branch=branch).numpy(),
            model(x, training=False, branch=branch).numpy(),
            err_msg=branch,
        )


@pytest.mark.parametrize("bn_mode", ["single", "shared_stats", "cross_clean"])
def test_keras_save_load_round_trip_other_bn_modes(bn_mode, tmp_path):
    model = tiny_model("small_cnn", bn_mode=bn_mode)
    model(images_for("small_cnn", seed=5), training=True, branch="adv")
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    assert loaded.bn_mode == bn_mode
    x = images_for("small_cnn")
    for branch in ("adv", "clean"):
        np.testing.assert_array_equal(
            loaded(x, training=False, branch=branch).numpy(),
            model(x, training=False, branch=branch).numpy(),
        )


@pytest.mark.parametrize("name", MODELS)
def test_get_config_from_config_round_trip(name):
    model = tiny_model(name, bn_mode="shared_affine", num_classes=5)
    config = model.get_config()
    assert config["num_classes"] == 5
    assert config["bn_mode"] == "shared_affine"
    assert tuple(config["image_shape"]) == TINY[name]["image_shape"]
    rebuilt = type(model).from_config(config)
    rebuilt.build((None,) + TINY[name]["image_shape"])
    assert rebuilt.count_params() == model.count_params()
    assert len(rebuilt.weights) == len(model.weights)
    assert [w.shape for w in rebuilt.weights] == [w.shape for w in model.weights]
    assert list(rebuilt.tap_names) == list(model.tap_names)
    assert tuple(rebuilt(images_for(name)).shape) == (BATCH, 5)


# ---------------------------------------------------------------------------------------------
# Argument validation
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", MODELS)
def test_wrong_image_shape_names_expected_shape(name):
    model = tiny_model(name)
    height, width, channels = TINY[name]["image_shape"]
    expected = f"{height}, {width}, {channels}"
    with pytest.raises(ValueError, match=expected):
        model(tf.zeros((2, height + 4, width + 4, channels)))
    with pytest.raises(ValueError, match=expected):
        model(tf.zeros((2, height, width, channels + 1)))
    with pytest.raises(ValueError, match=expected):
        model(tf.zeros((2, height, width)))


@pytest.mark.parametrize("name", MODELS)
def test_unknown_branch_raises(name):
    model = tiny_model(name)
    with pytest.raises(ValueError, match="sideways"):
        model(images_for(name), branch="sideways")


@pytest.mark.parametrize(
    "factory,kwargs,message",
    [
        (ResNet, dict(depth=12), "depth=12"),
        (ResNet, dict(width=0), "width=0"),
        (ResNet, dict(width=-0.5), "width=-0.5"),
        (PreActResNet, dict(depth=50), "depth=50"),
        (PreActResNet, dict(width=0.0), "width=0.0"),
        (WideResNet, dict(depth=12), "depth=12"),
        (WideResNet, dict(depth=4), "depth=4"),
        (WideResNet, dict(widen_factor=0), "widen_factor=0"),
        (SmallCNN, dict(width=-1), "width=-1"),
        (ResNet, dict(bn_mode="triple"), "triple"),
        (WideResNet, dict(bn_mode="batch"), "batch"),
        (SmallCNN, dict(bn_mode="none"), "none"),
        (ResNet, dict(num_classes=1), "num_classes=1"),
        (SmallCNN, dict(num_classes=0), "num_classes=0"),
        (PreActResNet, dict(num_classes=1), "num_classes=1"),
    ],
)
def test_bad_constructor_arguments_raise_with_the_value(factory, kwargs, message):
    with pytest.raises(ValueError, match=message):
        factory(**kwargs)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(name="vgg"), "vgg"),
        (dict(name="resnet", depth=20), "depth=20"),
        (dict(name="resnet", width=0), "width=0"),
        (dict(name="small_cnn", bn_mode="dualbn"), "dualbn"),
        (dict(name="wide_resnet", depth=11), "depth=11"),
        (dict(name="preact_resnet", num_classes=1), "num_classes=1"),
    ],
)
def test_build_model_bad_arguments_raise_with_the_value(kwargs, message):
    kwargs.setdefault("num_classes", 10)
    with pytest.raises(ValueError, match=message):
        build_model(image_shape=(32, 32, 3), **kwargs)


@pytest.mark.parametrize("bn_mode", BN_MODES)
def test_every_bn_mode_builds_and_runs(bn_mode):
    model = tiny_model("small_cnn", bn_mode=bn_mode)
    x = images_for("small_cnn")
    for branch in ("adv", "clean", "mixed"):
        assert tuple(model(x, training=True, branch=branch).shape) == (BATCH, 10)
    assert tuple(model(x, training=False, branch="clean").shape) == (BATCH, 10)


# ---------------------------------------------------------------------------------------------
# Initialisation
# ---------------------------------------------------------------------------------------------
DEEPER = {
    "resnet": dict(depth=18, width=0.125, image_shape=(32, 32, 3)),
    "preact_resnet": dict(depth=18, width=0.125, image_shape=(32, 32, 3)),
    "wide_resnet": dict(depth=16, width=1, image_shape=(32, 32, 3)),
}


@pytest.mark.parametrize("name", sorted(DEEPER))
def test_layers_of_the_same_shape_are_initialised_independently(name):
    """Two convolutions with the same kernel shape must not start from identical weights."""
    model = build_model(name, num_classes=10, **DEEPER[name])
    kernels = [w for w in model.weights if w.path.endswith("kernel")]
    identical = [
        (a.path, b.path)
        for i, a in enumerate(kernels) for b in kernels[i + 1:]
        if a.shape == b.shape and np.array_equal(a.numpy(), b.numpy())
    ]
    assert not identical, f"{len(identical)} pairs of identical initial kernels, e.g. {identical[:3]}"


@pytest.mark.parametrize("name", MODELS)
def test_initialisation_follows_the_keras_seed(name):
    """`keras.utils.set_random_seed` (the CLI's --seed) decides the initial weights."""
    def initial_weights(seed):
        keras.utils.set_random_seed(seed)
        return [w.numpy() for w in tiny_model(name).trainable_weights]

    first, again, other = initial_weights(1), initial_weights(1), initial_weights(2)
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a, b)
    kernels_differ = [
        not np.array_equal(a, b) for a, b in zip(first, other) if a.ndim >= 2
    ]
    assert all(kernels_differ), (
        f"{kernels_differ.count(False)} of {len(kernels_differ)} kernels ignore the seed"
    )


LEGACY_DIR = Path(__file__).resolve().parent / "data" / "arat_tf_0_1"


def test_a_model_saved_by_arat_tf_0_1_loads_with_its_own_padding_and_logits():
    """0.1 models padded strided convolutions as TensorFlow's "same"; their config has no
    conv_padding. They load with that padding (and say so), never silently as PyTorch's."""
    recorded = np.load(LEGACY_DIR / "resnet10_w0125_arat_tf_0_1_logits.npz")
    with pytest.warns(UserWarning, match="arat_tf 0.1.*'tf_same'"):
        model = keras.models.load_model(LEGACY_DIR / "resnet10_w0125_arat_tf_0_1.keras")
    assert model.conv_padding == "tf_same" and model.get_config()["conv_padding"] == "tf_same"
    for branch in ("adv", "clean"):
        np.testing.assert_allclose(model(recorded["images"], branch=branch),
                                   recorded[f"logits_{branch}"], rtol=1e-5, atol=1e-5)
    # The same weights with PyTorch's padding are another network: the padding is not cosmetic.
    torch_padded = ResNet.from_config(dict(model.get_config(), conv_padding="torch"))
    torch_padded.build((None, 32, 32, 3))
    torch_padded.set_weights(model.get_weights())
    moved = np.abs(torch_padded(recorded["images"], branch="adv") - recorded["logits_adv"])
    assert moved.max() > 1e-3


def test_strided_convolutions_pad_symmetrically_as_pytorch():
    """A stride-2 3x3 convolution with PyTorch's padding=1 sees the input shifted by one pixel
    against TensorFlow's "same" (which pads 0 top/left, 1 bottom/right): on an image whose only
    non-zero pixel is at (0, 0), the torch-padded output at (0, 0) uses the kernel's centre."""
    from arat_tf.layers.padded_conv2d import PaddedConv2D

    image = np.zeros((1, 8, 8, 1), "float32")
    image[0, 0, 0, 0] = 1.0
    kernel = np.arange(9, dtype="float32").reshape(3, 3, 1, 1)
    outputs = {}
    for padding in ("symmetric", "same"):
        conv = PaddedConv2D(1, 3, strides=2, padding=padding, use_bias=False)
        conv.build((None, 8, 8, 1))
        conv.kernel.assign(kernel)
        outputs[padding] = np.asarray(conv(image))[0, :, :, 0]
        assert outputs[padding].shape == (4, 4)
    assert outputs["symmetric"][0, 0] == kernel[1, 1, 0, 0]  # centre tap on pixel (0, 0)
    assert outputs["same"][0, 0] == kernel[0, 0, 0, 0]       # TF: top-left tap on pixel (0, 0)
    # At stride 1 both paddings are the same convolution.
    same_stride_one = PaddedConv2D(1, 3, padding="symmetric")
    assert same_stride_one.padding == "same"
    restored = PaddedConv2D.from_config(PaddedConv2D(2, 3, strides=2).get_config())
    assert restored.get_config()["padding"] == "symmetric"

"""Importing the ARAT authors' PyTorch checkpoints: key layout, conversion, refusals, the CLI.

The authors' key layout of both released full-width models is in
`tests/data/arat_official/manifest_full_width.json` (read back from files their
`save_checkpoint` wrote); smaller checkpoints are written here with `torch_zip_writer` from
arat_tf's own weights in the authors' layout.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import keras

import arat_tf  # noqa: F401
from arat_tf.interop.official_arat import (
    CheckpointLayoutError,
    classifier_from_state_dict,
    infer_architecture,
    load_official_predictors,
    load_official_weights,
    model_entries,
    official_state_dict,
    official_tap_names,
    predictor_entries,
)
from arat_tf.methods.arat import build_predictors
from arat_tf.models import build_model
from torch_zip_writer import hostile_pickle, write_raw_torch_zip, write_torch_zip

REPO = Path(__file__).resolve().parents[1]
DATA = Path(__file__).resolve().parent / "data" / "arat_official"
MANIFEST_MODELS = {
    "cifar_resnet18_split_bn": dict(name="resnet", depth=18, width=1.0),
    "cifar_wrn_34_10_split_bn": dict(name="wide_resnet", depth=34, width=10),
}


def _manifest(model):
    with open(DATA / "manifest_full_width.json") as stream:
        return json.load(stream)["models"][model]


def _torch_shapes(entries):
    return {key: list(to_torch(np.zeros(variable.shape)).shape)
            for key, (variable, _, to_torch) in entries.items()}


@pytest.mark.parametrize("official_model", sorted(MANIFEST_MODELS))
def test_full_width_models_have_exactly_the_authors_keys_and_shapes(official_model):
    manifest = _manifest(official_model)
    spec = MANIFEST_MODELS[official_model]
    keras.utils.set_random_seed(0)
    classifier = build_model(spec["name"], num_classes=10, image_shape=(32, 32, 3),
                             depth=spec["depth"], width=spec["width"])
    expected = {entry["key"]: entry["shape"] for entry in manifest["state_dict"]
                if not entry["key"].endswith("num_batches_tracked")}
    assert _torch_shapes(model_entries(classifier)) == expected
    assert sum(int(np.prod(v.shape)) for v in classifier.trainable_weights) == (
        manifest["n_model_parameters"])
    taps = official_tap_names(classifier)
    assert list(taps) == manifest["align_layers"]
    predictors = build_predictors(classifier)
    expected_heads = {entry["key"]: entry["shape"] for entry in manifest["predictor_state_dict"]
                      if not entry["key"].endswith("num_batches_tracked")}
    assert _torch_shapes(predictor_entries(predictors, taps)) == expected_heads
    architecture = infer_architecture({entry["key"]: np.zeros(entry["shape"], "float32")
                                       for entry in manifest["state_dict"]})
    assert architecture == {"model": spec["name"], "depth": spec["depth"],
                            "width": float(spec["width"]), "num_classes": 10}


def _small_model(name="resnet", **kwargs):
    keras.utils.set_random_seed(1)
    model = build_model(name, num_classes=10, image_shape=(32, 32, 3), **kwargs)
    # Non-trivial statistics, so that a mixed-up running_mean/var would change the logits.
    for variable in model.non_trainable_variables:
        variable.assign(np.random.default_rng(0).uniform(0.5, 1.5, variable.shape))
    return model


@pytest.mark.parametrize("name,kwargs", [("resnet", dict(depth=10, width=0.125)),
                                          ("wide_resnet", dict(depth=10, width=1))])
def test_a_checkpoint_in_the_authors_layout_converts_to_the_same_network(tmp_path, name, kwargs):
    source = _small_model(name, **kwargs)
    path = tmp_path / "model.pt"
    # As saved from DataParallel around the authors' feature-extractor wrapper.
    write_torch_zip(path, {f"module.model.{k}": v for k, v in official_state_dict(source).items()})
    from arat_tf.interop.torch_checkpoint import read_state_dict

    converted, architecture = classifier_from_state_dict(read_state_dict(path))
    assert architecture["model"] == name and architecture["depth"] == 10
    images = np.random.default_rng(0).uniform(size=(4, 32, 32, 3)).astype("float32")
    for branch in ("adv", "clean"):
        np.testing.assert_allclose(converted(images, branch=branch), source(images, branch=branch),
                                   rtol=1e-5, atol=1e-5)


def test_refuses_unknown_missing_misshapen_and_unsplit_checkpoints():
    source = _small_model(depth=10, width=0.125)
    target = _small_model(depth=10, width=0.125)
    state = official_state_dict(source)
    before = [np.array(v) for v in target.weights]

    with pytest.raises(CheckpointLayoutError, match=r"unknown key.*'layer9\.0\.conv1\.weight'"):
        load_official_weights(target, {**state, "layer9.0.conv1.weight": np.zeros((1,))})
    with pytest.raises(CheckpointLayoutError, match=r"missing key.*'linear\.bias'"):
        load_official_weights(target, {k: v for k, v in state.items() if k != "linear.bias"})
    wrong = dict(state, **{"layer2.0.conv1.weight": np.zeros((16, 8, 5, 5), "float32")})
    with pytest.raises(CheckpointLayoutError, match=r"'layer2\.0\.conv1\.weight' has shape "
                                                    r"\[16, 8, 5, 5\].*\[16, 8, 3, 3\]"):
        load_official_weights(target, wrong)
    unsplit = {k.replace(".adv.", ".").replace(".clean.", "."): v for k, v in state.items()}
    with pytest.raises(CheckpointLayoutError, match=r"Not a split-BN checkpoint.*'bn1\.running_mean'"):
        load_official_weights(target, unsplit)
    single = _small_model(depth=10, width=0.125, bn_mode="single")
    with pytest.raises(CheckpointLayoutError, match="bn_mode='dual'"):
        load_official_weights(single, state)
    # Nothing was assigned by any refused load.
    for variable, value in zip(target.weights, before):
        np.testing.assert_array_equal(np.asarray(variable), value)


def test_predictor_heads_convert_and_refuse_a_foreign_head():
    classifier = _small_model(depth=10, width=0.125)
    source = build_predictors(classifier)
    state = official_state_dict(classifier, source)
    heads = {k: v for k, v in state.items() if ".predictor_x." in k}
    target = build_predictors(classifier)
    load_official_predictors(target, classifier, heads)
    z = np.random.default_rng(0).normal(size=(8, 64)).astype("float32")
    for tap in source:
        np.testing.assert_allclose(target[tap](z, training=False), source[tap](z, training=False),
                                   rtol=1e-6)
    with pytest.raises(CheckpointLayoutError, match="missing key"):
        load_official_predictors(target, classifier, dict(list(heads.items())[1:]))


def _run_import(*args):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    return subprocess.run([sys.executable, "-m", "arat_tf.import_torch", *map(str, args)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def test_cli_converts_the_authors_checkpoint_into_a_run_directory(tmp_path):
    output = tmp_path / "authors"
    result = _run_import("--checkpoint", DATA / "r18_w0125_init_state_dict.pt",
                         "--predictors", DATA / "r18_w0125_predictors_state_dict.pt",
                         "--output_dir", output)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "ResNet-18 width 0.125" in result.stdout
    assert sorted(os.listdir(output)) == ["config.json", "flags.txt", "import.json", "model.keras",
                                          "predictor_heads.npz"]
    config = json.loads((output / "config.json").read_text())
    assert (config["model"], config["depth"], config["width"], config["bn_mode"],
            config["conv_padding"], config["dataset"]) == ("resnet", 18, 0.125, "dual", "torch",
                                                           "cifar10")
    provenance = json.loads((output / "import.json").read_text())
    assert provenance["keys"] == 222 and len(provenance["sha256"]) == 64
    model = keras.models.load_model(output / "model.keras")
    from reference_step import imported_model, load_reference

    batch = load_reference()[0]
    images = batch["x_uint8_nhwc"].astype("float32") / 255.0
    expected, _ = imported_model()
    np.testing.assert_allclose(model(images, branch="adv"), expected(images, branch="adv"),
                               rtol=1e-6, atol=1e-6)

    again = _run_import("--checkpoint", DATA / "r18_w0125_init_state_dict.pt",
                        "--output_dir", output)
    assert again.returncode != 0 and "already exists" in again.stderr


def test_cli_refuses_a_pickle_that_would_run_code_and_writes_nothing(tmp_path):
    marker = tmp_path / "pwned"
    hostile = tmp_path / "hostile.pt"
    write_raw_torch_zip(hostile, hostile_pickle("system", marker))
    output = tmp_path / "out"
    result = _run_import("--checkpoint", hostile, "--output_dir", output)
    assert result.returncode != 0
    assert "system" in result.stderr and "refused" in result.stderr, result.stderr[-2000:]
    assert not marker.exists() and not output.exists()


@pytest.mark.slow  # ~13 s of subprocesses; test_torch_checkpoint refuses the same files in-process
def test_cli_names_the_problem_of_a_file_that_is_no_checkpoint(tmp_path):
    not_a_zip = tmp_path / "notes.pt"
    not_a_zip.write_text("hello")
    result = _run_import("--checkpoint", not_a_zip, "--output_dir", tmp_path / "out")
    assert result.returncode != 0 and "not a torch.save zip archive" in result.stderr
    missing = _run_import("--checkpoint", tmp_path / "nope.pt", "--output_dir", tmp_path / "out")
    assert missing.returncode != 0 and "not found" in missing.stderr
    usage = _run_import("--output_dir", tmp_path / "out")
    assert usage.returncode != 0 and "--checkpoint and --output_dir are required" in usage.stderr
    assert "--helpfull" in usage.stderr and len(usage.stderr.splitlines()) <= 3

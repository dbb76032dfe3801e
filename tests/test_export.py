"""Tests of the SavedModel export (`arat_tf.serving`) and its CLI (`python -m arat_tf.export`).

One tiny dual-BN ResNet-10 whose adv and clean BN branches hold different statistics and affine
parameters (so the two branches give different logits) is saved as a `.keras` file and exported
once per branch; the tests check those exports the way TF Serving would use them: `saved_model_cli`,
a reload in a Python process that cannot import arat_tf, the checkpoint's variable names, the
versions layout, atomicity, and the model card the CLI writes. The CLI runs in subprocesses (its
absl flags would clash with the training flags other tests define in this process).
"""

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

import arat_tf  # noqa: F401  (registers the custom objects for keras.models.load_model)
from arat_tf import serving
from arat_tf.config import TrainConfig
from arat_tf.flags import config_as_dict
from arat_tf.models import build_model
from near_ties import assert_predicted_classes

REPO = Path(__file__).resolve().parents[1]
IMAGE_SHAPE = (32, 32, 3)
NUM_CLASSES = 10
ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="")

EVALUATION = {
    "model": "model.keras", "dataset": "cifar10", "split": "test", "n_examples": 1000,
    "branch": "adv", "norm": "linf", "eps": 0.0313, "suite": "autoattack-standard",
    "clean_accuracy": 0.81, "robust_accuracy": 0.45,
    "attacks": [{"name": "apgd-ce", "robust_accuracy": 0.47, "examples_attacked": 810,
                 "seconds": 12.3}],
    "warnings": [], "seed": 0, "created": "2026-11-21T07:50:00Z",
}


def _randomize_branches(model, rng):
    """Gives every BN branch its own statistics and affine parameters."""
    for variable in model.variables:
        name = variable.path.split("/")[-1]
        shape = tuple(variable.shape)
        if name.endswith("gamma") or name.endswith("moving_variance"):
            variable.assign(rng.uniform(0.5, 1.5, shape).astype("float32"))
        elif name.endswith("beta") or name.endswith("moving_mean"):
            variable.assign(rng.normal(0.0, 0.2, shape).astype("float32"))


def _saved_model_cli():
    binary = Path(sys.executable).with_name("saved_model_cli")
    if binary.is_file():
        return [str(binary)]
    if shutil.which("saved_model_cli"):
        return [shutil.which("saved_model_cli")]
    return [sys.executable, "-m", "tensorflow.python.tools.saved_model_cli"]


def _checkpoint_keys(version_dir):
    return [name for name, _ in tf.train.list_variables(
        os.path.join(version_dir, "variables", "variables"))]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A saved tiny dual-BN model, example images, its keras logits and one export per branch."""
    root = tmp_path_factory.mktemp("export")
    rng = np.random.default_rng(0)
    keras.utils.set_random_seed(0)
    model = build_model("resnet", num_classes=NUM_CLASSES, image_shape=IMAGE_SHAPE, depth=10,
                        width=0.125)
    _randomize_branches(model, rng)
    model_path = root / "run" / "model.keras"
    model_path.parent.mkdir()
    model.save(model_path)
    model = keras.models.load_model(model_path)  # what the CLI exports: the reloaded model

    images_uint8 = rng.integers(0, 256, (6,) + IMAGE_SHAPE, dtype=np.uint8)
    images = images_uint8.astype(np.float32) / 255.0
    np.save(root / "images.npy", images)
    np.save(root / "images_uint8.npy", images_uint8)
    logits = {branch: model(images, training=False, branch=branch).numpy()
              for branch in ("adv", "clean")}
    assert not np.allclose(logits["adv"], logits["clean"], atol=1e-3)  # the branches differ

    base = root / "serving"
    adv_dir = serving.export_saved_model(model, str(base), branch="adv")
    clean_dir = serving.export_saved_model(model, str(base), branch="clean")
    return dict(root=root, model=model, model_path=model_path, images=images,
                images_uint8=images_uint8, logits=logits, base=base, adv=adv_dir, clean=clean_dir)


def test_versions_layout_and_model_card(exported):
    base = exported["base"]
    assert exported["adv"] == str(base / "versions" / "1")
    assert exported["clean"] == str(base / "versions" / "2")
    assert sorted(os.listdir(base / "versions")) == ["1", "2"]  # no temporary dir left behind
    assert serving.existing_versions(str(base)) == [1, 2]
    for version_dir, branch in ((exported["adv"], "adv"), (exported["clean"], "clean")):
        assert {"saved_model.pb", "variables", "model_card.json"} <= set(os.listdir(version_dir))
        card = json.loads(Path(version_dir, "model_card.json").read_text())
        assert card["branch"] == branch and card["bn_mode"] == "dual"
        assert card["version"] == int(os.path.basename(version_dir))
        assert card["model"]["image_shape"] == list(IMAGE_SHAPE)


def test_only_the_exported_branch_variables_are_saved(exported):
    adv_keys = _checkpoint_keys(exported["adv"])
    clean_keys = _checkpoint_keys(exported["clean"])
    for keys, kept, dropped in ((adv_keys, "adv_", "clean_"), (clean_keys, "clean_", "adv_")):
        variables = [key for key in keys if key.endswith("VARIABLE_VALUE")]
        assert not [key for key in variables if dropped in key]
        assert any(f"{kept}gamma" in key for key in variables)
        assert any(f"{kept}moving_variance" in key for key in variables)
        assert any("classifier/kernel" in key for key in variables)
        assert not any("optimizer" in key or "predictor" in key for key in variables)
    model_variables = exported["model"].variables
    shared = [v for v in model_variables if "clean_" not in v.path and "adv_" not in v.path]
    per_branch = [v for v in model_variables if "adv_" in v.path]
    expected = len(shared) + len(per_branch)
    assert len([k for k in adv_keys if k.endswith("VARIABLE_VALUE")]) == expected


def test_saved_model_cli_shows_both_signatures(exported):
    result = subprocess.run(
        _saved_model_cli() + ["show", "--dir", exported["adv"], "--all"],
        capture_output=True, text=True, env=ENV, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    out = result.stdout
    signatures = {}
    for block in re.split(r"\n(?=signature_def\[)", out):
        match = re.match(r"signature_def\['([^']+)'\]", block)
        if match:
            signatures[match.group(1)] = block
    assert {"serving_default", "serving_uint8"} <= set(signatures)
    for name, dtype in (("serving_default", "DT_FLOAT"), ("serving_uint8", "DT_UINT8")):
        block = signatures[name]
        assert re.search(r"inputs\['image'\] tensor_info:\s+dtype: " + dtype
                         + r"\s+shape: \(-1, 32, 32, 3\)", block), block
        assert re.search(r"outputs\['logits'\] tensor_info:\s+dtype: DT_FLOAT\s+shape: \(-1, 10\)",
                         block), block
        assert re.search(r"outputs\['probabilities'\] tensor_info:\s+dtype: DT_FLOAT", block)
        assert re.search(r"outputs\['class_id'\] tensor_info:\s+dtype: DT_INT64\s+shape: \(-1\)",
                         block), block
        assert "tensorflow/serving/predict" in block


def test_saved_model_cli_run_predicts_the_keras_class(exported):
    result = subprocess.run(
        _saved_model_cli() + [
            "run", "--dir", exported["adv"], "--tag_set", "serve",
            "--signature_def", "serving_default",
            "--inputs", f"image={exported['root'] / 'images.npy'}",
        ],
        capture_output=True, text=True, env=ENV, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    match = re.search(r"Result for output key class_id:\s*\[([0-9\s]+)\]", result.stdout)
    assert match, result.stdout
    class_ids = [int(c) for c in match.group(1).split()]
    # The served graph (another process, fused kernels) rounds differently from eager Keras: the
    # class must be Keras' argmax, or tie with it within round-off.
    assert_predicted_classes(class_ids, exported["logits"]["adv"])


RELOAD_SCRIPT = textwrap.dedent("""
    import importlib.abc, json, sys

    class BlockArat(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name == "arat_tf" or name.startswith("arat_tf."):
                raise ImportError(f"arat_tf must not be needed to load the export ({name})")
            return None

    sys.meta_path.insert(0, BlockArat())
    import numpy as np
    import tensorflow as tf

    adv_dir, clean_dir, images_path, uint8_path, out_path = sys.argv[1:]
    images, images_uint8 = np.load(images_path), np.load(uint8_path)
    results = {}
    for branch, directory in (("adv", adv_dir), ("clean", clean_dir)):
        loaded = tf.saved_model.load(directory)
        outputs = loaded.signatures["serving_default"](image=tf.constant(images))
        outputs_uint8 = loaded.signatures["serving_uint8"](image=tf.constant(images_uint8))
        for key, value in outputs.items():
            results[f"{branch}_{key}"] = value.numpy()
        for key, value in outputs_uint8.items():
            results[f"{branch}_uint8_{key}"] = value.numpy()
    np.savez(out_path, **results)
    assert "arat_tf" not in sys.modules
    print("ARAT_TF_LOADED", "arat_tf" in sys.modules)
""")


def test_reload_without_arat_tf_matches_keras_inference(exported, tmp_path):
    script = tmp_path / "reload.py"
    script.write_text(RELOAD_SCRIPT)
    out = tmp_path / "outputs.npz"
    root = exported["root"]
    result = subprocess.run(
        [sys.executable, str(script), exported["adv"], exported["clean"],
         str(root / "images.npy"), str(root / "images_uint8.npy"), str(out)],
        capture_output=True, text=True, env=ENV, cwd=tmp_path, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "ARAT_TF_LOADED False" in result.stdout
    outputs = np.load(out)
    for branch in ("adv", "clean"):
        expected = exported["logits"][branch]
        logits = outputs[f"{branch}_logits"]
        assert logits.dtype == np.float32 and logits.shape == (6, NUM_CLASSES)
        np.testing.assert_allclose(logits, expected, atol=1e-5, rtol=0)
        np.testing.assert_allclose(
            outputs[f"{branch}_probabilities"], tf.nn.softmax(expected).numpy(), atol=1e-6
        )
        assert outputs[f"{branch}_class_id"].dtype == np.int64
        # Keras' argmax, up to ties within round-off (another process and graph, other kernels).
        assert_predicted_classes(outputs[f"{branch}_class_id"], expected)
        # The uint8 signature is the float one on uint8 / 255 (up to float rounding: the graph
        # optimiser may fold the scaling into the first convolution).
        for key in ("logits", "probabilities"):
            np.testing.assert_allclose(outputs[f"{branch}_uint8_{key}"],
                                       outputs[f"{branch}_{key}"], atol=1e-6, rtol=0)
        assert_predicted_classes(outputs[f"{branch}_uint8_class_id"], outputs[f"{branch}_logits"])
    # The exports differ exactly where the keras branches do.
    assert not np.allclose(outputs["adv_logits"], outputs["clean_logits"], atol=1e-3)


def test_wrong_shape_or_dtype_is_rejected_with_a_clear_message(exported):
    signature = tf.saved_model.load(exported["adv"]).signatures["serving_default"]
    for bad_shape in ((2, 28, 28, 3), (2, 32, 32, 1), (32, 32, 3)):
        with pytest.raises(tf.errors.InvalidArgumentError) as error:
            signature(image=tf.zeros(bad_shape))
        message = str(error.value)
        assert f"[{','.join(map(str, bad_shape))}]" in message
        assert "[?,32,32,3]" in message
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"float.*double"):
        signature(image=tf.zeros((2,) + IMAGE_SHAPE, tf.float64))
    uint8_signature = tf.saved_model.load(exported["adv"]).signatures["serving_uint8"]
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"uint8.*float"):
        uint8_signature(image=tf.zeros((2,) + IMAGE_SHAPE, tf.float32))


def test_bad_arguments_are_rejected_before_anything_is_written(exported, tmp_path):
    model = exported["model"]
    base = tmp_path / "serving"
    with pytest.raises(ValueError, match="branch must be one of"):
        serving.export_saved_model(model, str(base), branch="mixed")
    with pytest.raises(TypeError, match="BranchedClassifier"):
        serving.export_saved_model(keras.Sequential([keras.layers.Dense(2)]), str(base))
    for version in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="version must be an integer >= 1"):
            serving.export_saved_model(model, str(base), version=version)
    with pytest.raises(TypeError, match="JSON"):
        serving.export_saved_model(model, str(base), model_card={"bad": object()})
    assert not base.exists()


def test_explicit_versions_never_overwrite(exported, tmp_path):
    model, base = exported["model"], tmp_path / "serving"
    assert serving.export_saved_model(model, str(base), version=5) == str(base / "versions" / "5")
    assert serving.next_version(str(base)) == 6
    before = (base / "versions" / "5" / "saved_model.pb").stat().st_mtime_ns
    with pytest.raises(serving.VersionExistsError, match="version 5 already exists"):
        serving.export_saved_model(model, str(base), version=5, branch="clean")
    assert (base / "versions" / "5" / "saved_model.pb").stat().st_mtime_ns == before
    card = json.loads((base / "versions" / "5" / "model_card.json").read_text())
    assert card["branch"] == "adv"
    assert sorted(os.listdir(base / "versions")) == ["5"]


def test_a_failure_mid_export_leaves_no_version(exported, tmp_path, monkeypatch):
    model, base = exported["model"], tmp_path / "serving"
    serving.export_saved_model(model, str(base))
    real_save = tf.saved_model.save

    def save_then_crash(obj, export_dir, *args, **kwargs):
        real_save(obj, export_dir, *args, **kwargs)  # a half-finished version on disk
        assert os.listdir(export_dir)
        raise RuntimeError("simulated crash while exporting")

    monkeypatch.setattr(serving.tf.saved_model, "save", save_then_crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        serving.export_saved_model(model, str(base))
    assert sorted(os.listdir(base / "versions")) == ["1"]
    monkeypatch.undo()
    # The next export takes version 2, as if the failed one never happened.
    assert serving.export_saved_model(model, str(base)) == str(base / "versions" / "2")


def test_model_card_without_evaluation_or_for_another_branch(exported):
    model = exported["model"]
    card = serving.build_model_card(model, branch="adv", model_path="model.keras")
    assert card["clean_accuracy"] is None and card["robust_accuracy"] is None
    assert card["attack_suite"] is None and card["evaluation"] is None
    assert any("No evaluation was run" in note for note in card["notes"])
    json.dumps(card)

    clean_evaluation = dict(EVALUATION, branch="clean")
    card = serving.build_model_card(model, branch="adv", evaluation=clean_evaluation)
    assert card["robust_accuracy"] is None
    assert card["evaluation"]["robust_accuracy"] == 0.45
    assert any("clean branch, not the exported adv branch" in n for n in card["notes"])

    # `--branch all` of the evaluator: the adv report on top, every report under "variants".
    adv_report = dict(EVALUATION, variant="branch=adv")
    clean_report = dict(EVALUATION, branch="clean", variant="branch=clean", clean_accuracy=0.9,
                        robust_accuracy=0.1)
    swapped = dict(EVALUATION, branch="clean", variant="statistics=clean,affine=adv",
                   robust_accuracy=0.2)
    both = dict(adv_report, variants=[adv_report, clean_report, swapped])
    card = serving.build_model_card(model, branch="clean", evaluation=both)
    assert (card["clean_accuracy"], card["robust_accuracy"]) == (0.9, 0.1)
    assert card["evaluation"]["branch"] == "clean"
    assert [v["variant"] for v in card["evaluation"]["variants"]] == [
        "branch=adv", "branch=clean", "statistics=clean,affine=adv"]
    card = serving.build_model_card(model, branch="adv", evaluation=both)
    assert (card["clean_accuracy"], card["robust_accuracy"]) == (0.81, 0.45)
    json.dumps(card)


def run_export_clis(*arg_lists):
    """Runs `python -m arat_tf.export` once per argument list, concurrently (most of each run is
    importing TensorFlow); returns the CompletedProcesses in order."""
    processes = [
        subprocess.Popen([sys.executable, "-m", "arat_tf.export", *args], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=ENV, cwd=REPO)
        for args in arg_lists
    ]
    results = []
    for args, process in zip(arg_lists, processes):
        stdout, stderr = process.communicate(timeout=300)
        results.append(
            subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
        )
    return results


def test_cli_exports_a_run_with_its_evaluation(exported, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    shutil.copy(exported["model_path"], run_dir / "model.keras")
    config = config_as_dict(TrainConfig(
        dataset="cifar10", method="arat", bn_mode="dual", model="resnet", depth=10, width=0.125,
        run_dir=str(run_dir),
    ))
    (run_dir / "config.json").write_text(json.dumps(config))
    (run_dir / "evaluation.json").write_text(json.dumps(dict(
        EVALUATION, model=str(run_dir / "model.keras"))))

    other = tmp_path / "serving"
    result, clean_result = run_export_clis(
        [f"--run_dir={run_dir}"],
        # --branch clean --version 7 into another export dir.
        [f"--run_dir={run_dir}", f"--export_dir={other}", "--branch=clean", "--version=7"],
    )
    assert result.returncode == 0, result.stderr[-3000:]
    version_dir = run_dir / "export" / "versions" / "1"  # the default --export_dir
    assert str(version_dir) in result.stdout
    assert f"saved_model_cli show --dir {version_dir}" in result.stdout
    card = json.loads((version_dir / "model_card.json").read_text())
    assert card["dataset"] == "cifar10" and card["method"] == "arat"
    assert card["branch"] == "adv" and card["bn_mode"] == "dual"
    assert card["clean_accuracy"] == 0.81 and card["robust_accuracy"] == 0.45
    assert card["attack_suite"] == "autoattack-standard"
    assert card["evaluation"]["attacks"][0]["name"] == "apgd-ce"
    assert card["eps"] == pytest.approx(8 / 255)
    assert card["flags"]["method"] == "arat" and card["flags"]["depth"] == 10
    assert card["source_model"] == str(run_dir / "model.keras")
    assert re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$", card["exported_at"])
    assert card["notes"] == []
    assert not [k for k in _checkpoint_keys(str(version_dir)) if "clean_" in k]

    # The clean export's card keeps the adv evaluation apart.
    assert clean_result.returncode == 0, clean_result.stderr[-3000:]
    assert os.listdir(other / "versions") == ["7"]
    card = json.loads((other / "versions" / "7" / "model_card.json").read_text())
    assert card["branch"] == "clean" and card["robust_accuracy"] is None
    assert card["evaluation"]["robust_accuracy"] == 0.45
    assert "note: evaluation.json evaluated the adv branch" in clean_result.stdout
    assert not [k for k in _checkpoint_keys(str(other / "versions" / "7")) if "adv_" in k]


def test_cli_errors_exit_cleanly_without_writing(exported, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    corrupt = tmp_path / "corrupt.keras"
    corrupt.write_bytes(b"not a zip file")
    existing = tmp_path / "existing"
    (existing / "versions" / "3").mkdir(parents=True)
    (existing / "versions" / "3" / "saved_model.pb").write_bytes(b"served")
    missing_result, result, overwrite_result = run_export_clis(
        [f"--run_dir={run_dir}"],
        [f"--run_dir={run_dir}", f"--model={corrupt}"],
        [f"--model={exported['model_path']}", f"--export_dir={existing}", "--version=3"],
    )
    assert overwrite_result.returncode != 0
    assert "error: version 3 already exists" in overwrite_result.stderr
    assert (existing / "versions" / "3" / "saved_model.pb").read_bytes() == b"served"
    assert os.listdir(existing / "versions") == ["3"]

    assert missing_result.returncode != 0
    assert f"error: model file not found: {run_dir / 'model.keras'}" in missing_result.stderr
    assert "Traceback" not in missing_result.stderr

    assert result.returncode != 0
    assert f"error: cannot load the model {corrupt}" in result.stderr
    assert "Traceback" not in result.stderr
    assert os.listdir(run_dir) == []  # nothing written

"""Tests of the pipeline components' own rules: ExampleGen's TFRecord splits (read back by
arat_tf's "tfrecord:" splits), the blessing rules, the Evaluator's baseline choice and the
Pusher's refusals."""

import json
import os

import numpy as np
import pytest

from pipeline.artifacts import EXAMPLES, MODEL, MODEL_BLESSING, MODEL_EVALUATION, PUSHED_MODEL
from pipeline.artifacts import Artifact
from pipeline.components import ExampleGen, OutputLocation, OutputRef, Pusher
from pipeline.components.blessing import BlessingError, decide_blessing, read_blessing
from pipeline.components.evaluator import latest_pushed_baseline
from pipeline.components.example_gen import tfrecord_split
from pipeline.fingerprints import directory_fingerprint
from pipeline.metadata import MetadataStore


def materialise_mnist(tmp_path, data_dir, subsets):
    """ExampleGen run on MNIST into tmp_path/examples: `(component, properties, Examples artifact)`."""
    out = tmp_path / "examples"
    out.mkdir()
    component = ExampleGen(dataset="mnist",
                           splits={"train": "train[:90%]", "val": "train[90%:]", "test": "test"},
                           subsets=subsets, data_dir=data_dir)
    properties = component.execute({}, {"examples": OutputLocation(str(out), str(out))})
    examples = Artifact(EXAMPLES, str(out), properties["examples"], directory_fingerprint(str(out)))
    return component, properties, examples


def test_example_gen_materialises_splits_that_arat_tf_reads_back(tmp_path, shared_tfds_dir):
    from arat_tf.data import load_split, make_eval_dataset, make_train_dataset

    component, properties, examples = materialise_mnist(
        tmp_path, shared_tfds_dir, {"train": 96, "val": 40, "test": 30})
    out = tmp_path / "examples"
    stats = json.loads((out / "stats.json").read_text())
    assert properties["examples"]["counts"] == {"train": 96, "val": 40, "test": 30}
    assert sum(stats["splits"]["train"]["label_histogram"]) == 96
    assert len(stats["splits"]["test"]["label_histogram"]) == 10
    assert stats["tfds_version"] == properties["examples"]["tfds_version"]

    # Same images and labels as TFDS, in the same order, as float32 in [0, 1].
    test = make_eval_dataset("mnist", batch_size=16, split=tfrecord_split(examples, "test"))
    images, labels = map(np.concatenate, zip(*[(x.numpy(), y.numpy()) for x, y in test]))
    reference = list(load_split("mnist", "test", data_dir=shared_tfds_dir, subset=30))
    np.testing.assert_array_equal(images, np.stack([x.numpy() for x, _ in reference]))
    np.testing.assert_array_equal(labels, [int(y) for _, y in reference])
    # The training pipeline knows its size (steps per epoch) as with a TFDS split.
    train = make_train_dataset("mnist", batch_size=32, split=tfrecord_split(examples, "train"))
    assert int(train.cardinality()) == 3
    # The cache key covers the prepared source data, not the data dir's path.
    assert component.cache_parameters()["source"]


def test_serialize_example_accepts_only_uint8_images():
    from arat_tf.data import serialize_example

    assert serialize_example(np.zeros((2, 2, 1), np.uint8), 3)
    with pytest.raises(ValueError, match="expects a uint8 \\(H, W, C\\) image, received float32"):
        serialize_example(np.zeros((2, 2, 1), np.float32), 3)


def test_example_gen_rejects_an_incomplete_split_set():
    with pytest.raises(ValueError, match="needs a source and a subset for each of"):
        ExampleGen(dataset="mnist", splits={"train": "train"}, subsets={"train": 0})


def test_blessing_rules():
    thresholds = dict(min_clean_accuracy=0.5, min_robust_accuracy=0.2, tolerance=0.01)
    blessed, reasons = decide_blessing(0.6, 0.3, **thresholds)
    assert blessed and "no model is pushed yet" in reasons[-1]
    blessed, reasons = decide_blessing(0.4, 0.3, **thresholds)
    assert not blessed and reasons == ["clean accuracy 0.4000 < the threshold 0.5000"]
    baseline = {"clean": 0.62, "robust": 0.305, "version": 3}
    assert decide_blessing(0.615, 0.3, baseline=baseline, **thresholds)[0]  # within tolerance
    blessed, reasons = decide_blessing(0.6, 0.3, baseline=baseline, **thresholds)
    assert not blessed and "worse: clean accuracy 0.6000 vs 0.6200 of the pushed version 3" \
        in reasons[0]


def _artifact(tmp_path, name, type_name, files, properties=None):
    directory = tmp_path / name
    directory.mkdir()
    for file_name, text in files.items():
        (directory / file_name).write_text(text)
    return Artifact(type_name, str(directory), properties or {},
                    directory_fingerprint(str(directory)), id=1)


def _model_and_evaluation(tmp_path):
    model = _artifact(tmp_path, "model", MODEL, {"model.keras": "not really a model"})
    evaluation = _artifact(tmp_path, "evaluation", MODEL_EVALUATION, {"evaluation.json": "{}"},
                           {"clean_accuracy": 0.2, "robust_accuracy": 0.1,
                            "evaluation_key": "k"})
    return model, evaluation


def _blessing(tmp_path, model, blessed, name="blessing"):
    record = {"blessed": blessed, "reasons": ["because"], "model_fingerprint": model.fingerprint,
              "evaluation_key": "k"}
    marker = "BLESSED" if blessed else "NOT_BLESSED"
    return _artifact(tmp_path, name, MODEL_BLESSING,
                     {"blessing.json": json.dumps(record), marker: ""})


def _push(tmp_path, model, blessing, evaluation):
    serving = tmp_path / "serving"
    pusher = Pusher(model=OutputRef("Trainer", "model"), blessing=OutputRef("Evaluator", "blessing"),
                    evaluation=OutputRef("Evaluator", "evaluation"), branch="adv",
                    serving_dir=str(serving))
    out = tmp_path / "push"
    out.mkdir(exist_ok=True)
    properties = pusher.execute({"model": model, "blessing": blessing, "evaluation": evaluation},
                                {"pushed_model": OutputLocation(str(out), str(out))})
    return properties["pushed_model"], serving


def test_pusher_does_not_push_an_unblessed_model(tmp_path):
    model, evaluation = _model_and_evaluation(tmp_path)
    record, serving = _push(tmp_path, model, _blessing(tmp_path, model, False), evaluation)
    assert record["pushed"] is False and record["reason"] == "not blessed: because"
    assert not serving.exists()


def test_pusher_refuses_a_missing_blessing_of_a_failed_evaluation(tmp_path):
    model, evaluation = _model_and_evaluation(tmp_path)
    # A failed Evaluator leaves no blessing behind: its temporary directory was deleted.
    gone = Artifact(MODEL_BLESSING, str(tmp_path / "Evaluator" / "blessing" / ".tmp-7"), {}, "0",
                    id=2)
    with pytest.raises(BlessingError, match="Cannot read the blessing"):
        _push(tmp_path, model, gone, evaluation)
    assert not (tmp_path / "serving").exists()


def test_pusher_refuses_a_blessing_of_another_model_or_without_marker(tmp_path):
    model, evaluation = _model_and_evaluation(tmp_path)
    other = _artifact(tmp_path, "other_model", MODEL, {"model.keras": "another model"})
    with pytest.raises(BlessingError, match="is for the model with fingerprint"):
        _push(tmp_path, model, _blessing(tmp_path, other, True), evaluation)
    blessing = _blessing(tmp_path, model, True, name="edited")
    os.remove(blessing.path("BLESSED"))
    with pytest.raises(BlessingError, match="BLESSED is missing"):
        read_blessing(blessing, model)
    assert not (tmp_path / "serving").exists()


def test_baseline_is_the_latest_push_of_another_model(tmp_path):
    store = MetadataStore(str(tmp_path / "metadata.sqlite"))
    serving = tmp_path / "serving"
    run_id = store.start_run("p", str(tmp_path))

    def push(version, fingerprint, pushed=True, serving_dir=serving):
        path = serving_dir / "versions" / str(version)
        path.mkdir(parents=True, exist_ok=True)
        execution = store.start_execution(run_id, "Pusher", {}, f"key{version}{fingerprint}", {})
        properties = {"pushed": pushed, "serving_dir": str(serving_dir), "version": version,
                      "serving_path": str(path), "model_fingerprint": fingerprint}
        return store.complete_execution(execution, {"pushed_model": Artifact(
            PUSHED_MODEL, str(tmp_path / f"push{version}{fingerprint}"), properties, "f")})[
            "pushed_model"]

    assert latest_pushed_baseline(store, str(serving), "candidate") is None
    first = push(1, "model-a")
    push(2, "candidate")
    push(3, "model-b", pushed=False)
    push(4, "model-c", serving_dir=tmp_path / "elsewhere")
    assert latest_pushed_baseline(store, str(serving), "candidate") == first
    store.close()


def test_trainer_resumes_a_crashed_run_from_its_work_directory(tmp_path, shared_tfds_dir):
    """A Trainer execution whose work dir holds a 1-epoch checkpoint trains only epoch 2."""
    from arat_tf.config import TrainConfig
    from arat_tf.training import train
    from pipeline.components import Trainer
    from pipeline.components.training_config import config_on_examples, training_parameters

    _, _, examples = materialise_mnist(tmp_path, shared_tfds_dir, {"train": 64, "val": 32, "test": 8})
    config = TrainConfig(dataset="mnist", method="pgd_at", model="small_cnn", width=0.25, epochs=2,
                         batch_size=32, attack_steps=1, val_attack_steps=1, verbose=0).resolve()
    parameters = training_parameters(config)
    work = tmp_path / "work"
    # The crashed attempt: epoch 1 of the same run, checkpointed in the work dir.
    train(config_on_examples(dict(parameters, epochs=1), examples, run_dir=str(work), verbose=0))
    assert (work / "checkpoints" / "checkpoint").exists()
    trainer = Trainer(examples=OutputRef("ExampleGen", "examples"), training=parameters, verbose=0)
    trainer.execute({"examples": examples},
                    {"model": OutputLocation(str(work), str(tmp_path / "final"))})
    records = json.loads((work / "metrics.json").read_text())
    assert [record["epoch"] for record in records] == [1, 2]

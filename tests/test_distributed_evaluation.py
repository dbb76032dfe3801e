"""Robustness evaluation under tf.distribute.MirroredStrategy with 2 logical CPU devices (in a
subprocess: logical devices must be configured before TensorFlow initialises)."""

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import pytest

from near_ties import correct_count_range

REPO = pathlib.Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent(
    """
    import json
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    import keras
    import numpy as np
    from arat_tf.evaluation import resolve_attacks
    from arat_tf.evaluation import robustness
    from arat_tf.models import build_model

    strategy = tf.distribute.MirroredStrategy(["CPU:0", "CPU:1"])
    keras.utils.set_random_seed(0)
    with strategy.scope():
        model = build_model("resnet", num_classes=10, image_shape=(32, 32, 3), depth=10,
                            width=0.125)
    rng = np.random.default_rng(0)
    x = rng.random((17, 32, 32, 3), dtype=np.float32)
    # Labels = the model's own predictions on 12 of 17 examples, so the attacks have work to do,
    # including the last one: the last batch (3) has shards of 2 and 1, and APGD must run on a
    # one-example shard in replica context (its loop shapes once broke there).
    logits = model(x, training=False).numpy()
    predicted = np.argmax(logits, -1)
    wrong = np.isin(np.arange(17), [1, 4, 6, 9, 11])
    y = np.where(wrong, (predicted + 1) % 10, predicted).astype("int32")
    data = tf.data.Dataset.from_tensor_slices((x, y)).batch(7)
    forward = tf.function(lambda images: model(images, training=False, branch="adv"))
    attacks = resolve_attacks(["pgd5", "apgd-ce"], 10, "linf")
    eps = 0.03

    distributed = robustness.evaluate_robustness(forward, data, attacks, eps=eps, seed=5,
                                                 progress=False, strategy=strategy)
    # The same shards attacked one after the other, outside the strategy, with the seeds the
    # replicas must have used.
    expected = None
    for batch_index, (images, labels) in enumerate(data):
        for replica, index in enumerate(np.array_split(np.arange(len(labels)), 2)):
            counts = robustness._attack_examples(
                forward, tf.gather(images, index), tf.gather(labels, index), attacks, eps=eps,
                norm="linf",
                seed=5 + 1000 * batch_index + robustness.REPLICA_SEED_STRIDE * replica)
            if expected is None:
                expected = counts
            else:
                robustness._add_counts(expected, counts)
    print(json.dumps({"distributed": distributed, "expected": expected,
                      "replicas": strategy.num_replicas_in_sync, "logits": logits.tolist(),
                      "labels": y.tolist()}))
    """
)


def test_two_replicas_attack_their_shards_with_their_own_seeds():
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=600,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    distributed, expected = report["distributed"], report["expected"]
    assert report["replicas"] == distributed["replicas"] == 2
    assert distributed["n_examples"] == expected["n_examples"] == 17
    assert distributed["clean_accuracy"] == pytest.approx(expected["n_clean"] / 17)
    # The labels come from one eager batch of 17, the evaluation runs shards of 4 and 3 (2 and 1
    # in the last batch) as graphs: "12 of 17 correct" holds on any CPU only because no example
    # is within round-off of a tie (true of these seeded weights: the smallest margin is 0.017).
    assert correct_count_range(report["logits"], report["labels"]) == (12, 12)
    assert distributed["clean_accuracy"] == pytest.approx(12 / 17)
    # Exact: `expected` ran the very shards (same shapes, same compiled attacks) in this process.
    assert [a["examples_attacked"] for a in distributed["attacks"]] == expected["examples_attacked"]
    assert [a["examples_broken"] for a in distributed["attacks"]] == expected["examples_broken"]
    assert [a["robust_accuracy"] * 17 for a in distributed["attacks"]] == pytest.approx(
        expected["robust_after"])
    # Every correctly classified example was attacked once by the first attack.
    assert distributed["attacks"][0]["examples_attacked"] == 12


def _correct_count_range(model, data_dir, n_examples):
    """`correct_count_range` of `model` (adv branch) on the first `n_examples` CIFAR-10 test
    images, the ones the CLI evaluates: the CLI runs them in batches of another shape (and per
    replica or worker), as a graph, in another process, so only clear decisions must agree."""
    from arat_tf.data import make_eval_dataset

    images, labels = next(iter(make_eval_dataset("cifar10", batch_size=n_examples,
                                                 data_dir=data_dir, subset=n_examples)))
    return correct_count_range(model(images, training=False, branch="adv").numpy(), labels)


def _assert_clean_counts(report, count_range):
    """The report's clean count is within `count_range`, and its first attack attacked exactly
    the clean-correct examples."""
    n_clean = round(report["n_examples"] * report["clean_accuracy"])
    assert count_range[0] <= n_clean <= count_range[1], (report["clean_accuracy"], count_range)
    assert report["attacks"][0]["examples_attacked"] == n_clean


def test_cli_on_two_cpu_replicas_matches_one_device_on_clean_accuracy(tmp_path, shared_tfds_dir):
    import keras

    from arat_tf.models import build_model

    keras.utils.set_random_seed(0)
    model = build_model("resnet", num_classes=10, image_shape=(32, 32, 3), depth=10, width=0.125)
    model_path = tmp_path / "model.keras"
    model.save(model_path)
    reports = {}
    for name, extra in (("one", []), ("two", ["--strategy=mirrored", "--cpu_replicas=2"])):
        output = tmp_path / f"{name}.json"
        result = subprocess.run(
            [sys.executable, "-m", "arat_tf.evaluate", f"--model={model_path}", "--dataset=cifar10",
             f"--data_dir={shared_tfds_dir}", "--n_examples=24", "--batch_size=12",
             "--attacks=pgd3", f"--output={output}", *extra],
            cwd=REPO, capture_output=True, text=True, timeout=600,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        reports[name] = json.loads(output.read_text())
    assert "Evaluating on 2 replicas" in result.stdout
    assert reports["one"]["replicas"] == 1 and reports["two"]["replicas"] == 2
    assert reports["two"]["n_examples"] == reports["one"]["n_examples"] == 24
    # Batches of 12 on one device, shards of 6 on two replicas: the same clean count (the range
    # is one number unless an example lies within round-off of a tie).
    count_range = _correct_count_range(model, shared_tfds_dir, 24)
    for report in reports.values():
        _assert_clean_counts(report, count_range)


def test_cli_rejects_cpu_replicas_without_mirrored(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "arat_tf.evaluate", f"--model={tmp_path / 'm.keras'}",
         "--dataset=cifar10", "--cpu_replicas=2"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode != 0
    assert "cpu_replicas only applies to strategy 'mirrored'" in result.stderr


@pytest.mark.slow  # ~15 s; multi-worker training on localhost stays in the default run
def test_two_workers_on_localhost_sum_their_shards_and_only_the_chief_writes(
        tmp_path, shared_tfds_dir, run_worker_cluster):
    import keras

    from arat_tf.models import build_model

    keras.utils.set_random_seed(0)
    model = build_model("resnet", num_classes=10, image_shape=(32, 32, 3), depth=10, width=0.125)
    model_path = tmp_path / "model.keras"
    model.save(model_path)
    common = [sys.executable, "-m", "arat_tf.evaluate", f"--model={model_path}",
              "--dataset=cifar10", f"--data_dir={shared_tfds_dir}", "--n_examples=20",
              "--batch_size=10", "--attacks=pgd3"]
    single = subprocess.run(common + [f"--output={tmp_path / 'single.json'}"], cwd=REPO,
                            capture_output=True, text=True, timeout=600)
    assert single.returncode == 0, single.stderr[-3000:]
    results = run_worker_cluster(
        lambda index: common + ["--strategy=multi_worker",
                                f"--output={tmp_path / f'worker{index}.json'}"],
        cwd=REPO, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": ""})
    for returncode, _, stderr in results:
        assert returncode == 0, stderr[-4000:]
    assert not (tmp_path / "worker1.json").exists()
    one, two = (json.loads((tmp_path / name).read_text()) for name in ("single.json", "worker0.json"))
    assert two["replicas"] == 2
    # Each worker attacked its half of every batch; the chief's report sums both halves. Batches
    # of 10 in one process, halves of 5 in two: the same clean count, up to near-ties.
    assert two["n_examples"] == one["n_examples"] == 20
    count_range = _correct_count_range(model, shared_tfds_dir, 20)
    for report in (one, two):
        _assert_clean_counts(report, count_range)

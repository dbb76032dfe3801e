"""Tests of the training CLI (`python -m arat_tf.train`) and of `arat_tf.training.train`.

Behaviour, not just "it ran": flag validation and its messages, the run directory and what is in
it, replaying flags.txt, refusing to overwrite a run, resuming after a SIGKILL, corrupt
checkpoints and the NaN guard. CLI behaviour is checked in subprocesses (the real entry point);
the rest calls `train()` in-process, which is faster.

One real CIFAR-10 run (a narrow ResNet-10, 256 images, 3 epochs: ~10 s) is shared by the tests
of the run directory; the in-process tests use a small CNN on 128-256 MNIST images.
"""

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from absl import flags as absl_flags

import keras

import arat_tf  # noqa: F401  (registers the custom objects for keras.models.load_model)
from arat_tf import callbacks as run_callbacks
from arat_tf import training
from arat_tf.callbacks import CheckpointError, NonFiniteLossError
from arat_tf.config import TrainConfig
from arat_tf.data import make_eval_dataset
from arat_tf.flags import config_from_flags, config_to_flagfile, define_train_flags
from near_ties import correct_count_range

REPO = Path(__file__).resolve().parents[1]
SMOKE_FLAGS = REPO / "configs" / "smoke.flags"
# Same location as conftest.SHARED_TFDS_DIR; module-scoped fixtures cannot use `shared_tfds_dir`.
TFDS_DIR = REPO.parent / "shared" / "datasets" / "tfds"

# The shared CIFAR-10 run: a narrow ResNet-10 on 256 images, 4 steps per epoch. With a constant
# lr of 0.05 the PGD-AT loss drops by >= 0.09 from epoch 1 to 3 for every seed tried (0-7).
CIFAR_RUN_FLAGS = [
    "--dataset=cifar10", "--method=pgd_at", "--model=resnet", "--depth=10", "--width=0.125",
    "--train_subset=256", "--val_subset=64", "--batch_size=64", "--eval_batch_size=32",
    "--attack_steps=2", "--val_attack_steps=2", "--eps=8/255", "--epochs=3",
    "--learning_rate=0.05", "--lr_schedule=constant", "--seed=0", "--verbose=0",
]


def _require_data():
    if not (TFDS_DIR / "cifar10").is_dir() or not (TFDS_DIR / "mnist").is_dir():
        pytest.skip(f"shared TFDS data dir with cifar10 and mnist not found at {TFDS_DIR}")
    return str(TFDS_DIR)


def run_cli(*args, timeout=600):
    """Runs `python -m arat_tf.train *args` from the repo root; returns the CompletedProcess."""
    return subprocess.run(
        [sys.executable, "-m", "arat_tf.train", *map(str, args)], cwd=REPO, env=_cli_env(),
        capture_output=True, text=True, timeout=timeout,
    )


def _cli_env():
    env = dict(os.environ)
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    return env


def _describe(result):
    return f"exit {result.returncode}\n--- stdout ---\n{result.stdout}\n--- stderr ---\n{result.stderr}"


def tiny_config(data_dir, run_dir, **changes):
    """A few-second in-process run: small CNN, 128 MNIST images, 2 steps per epoch."""
    values = dict(
        dataset="mnist", data_dir=data_dir, method="pgd_at", model="small_cnn", width=0.25,
        train_subset=128, val_subset=64, batch_size=64, eval_batch_size=64, attack_steps=2,
        val_attack_steps=2, auto_balance_examples=64, epochs=2, learning_rate=0.05,
        lr_schedule="constant", seed=0, verbose=0, run_dir=str(run_dir),
    )
    values.update(changes)
    return TrainConfig(**values)


def read_metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.json")) as stream:
        return json.load(stream)


def count_correct(model, config, branch="adv"):
    """(correct, total) of `model` in inference mode on a run config's validation subset."""
    validation = make_eval_dataset(
        config["dataset"], batch_size=config["eval_batch_size"], data_dir=config["data_dir"],
        split=config["val_split"], subset=config["val_subset"],
    )
    correct = total = 0
    for images, labels in validation:
        logits = model(images, training=False, branch=branch)
        correct += int(np.sum(np.argmax(logits, axis=-1) == labels.numpy()))
        total += int(labels.shape[0])
    return correct, total


def correct_range(model, config, branch="adv"):
    """`(fewest, most, total)`: `count_correct` up to near-ties. The logged accuracy was computed
    in the training process, as a graph: an example within round-off of a tie may go either way
    there (see near_ties), every other one is counted alike."""
    validation = make_eval_dataset(
        config["dataset"], batch_size=config["eval_batch_size"], data_dir=config["data_dir"],
        split=config["val_split"], subset=config["val_subset"],
    )
    fewest = most = total = 0
    for images, labels in validation:
        low, high = correct_count_range(model(images, training=False, branch=branch).numpy(),
                                        labels.numpy())
        fewest, most, total = fewest + low, most + high, total + int(labels.shape[0])
    return fewest, most, total


# For a fresh interpreter: `import arat_tf` alone must register everything model.keras needs.
LOAD_AND_EVALUATE = """
import json, sys
import keras
import arat_tf
model = keras.models.load_model(sys.argv[1])
sys.path.insert(0, "tests")
from test_train_cli import count_correct
correct, total = count_correct(model, json.loads(sys.argv[2]))
print(json.dumps({"class": type(model).__name__, "correct": correct, "total": total}))
"""


def latest_checkpoint_number(checkpoint_dir):
    """The epoch number the `checkpoint` index names, or None (read as text: no TF needed)."""
    try:
        text = Path(checkpoint_dir, "checkpoint").read_text()
    except FileNotFoundError:
        return None
    match = re.search(r'^model_checkpoint_path: "ckpt-(\d+)"', text, re.MULTILINE)
    return int(match.group(1)) if match else None


def snapshot_files(directory):
    """{relative path: (size, mtime_ns, sha256)} of every file under `directory`."""
    result = {}
    for path in sorted(Path(directory).rglob("*")):
        if path.is_file():
            stat = path.stat()
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            result[str(path.relative_to(directory))] = (stat.st_size, stat.st_mtime_ns, digest)
    return result


def parse_flags(argv):
    """Parses `argv` (without the program name) on a fresh FlagValues; returns the TrainConfig."""
    flag_values = absl_flags.FlagValues()
    define_train_flags(flag_values)
    flag_values(["train", *argv])
    return config_from_flags(flag_values)


class SpyCheckpoint(run_callbacks.EpochCheckpoint):
    """EpochCheckpoint that records its instances and the state right after `restore()`."""

    instances = []

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.restored_epochs = None
        self.restored_state = None
        SpyCheckpoint.instances.append(self)

    def state(self):
        trainer, optimizer = self.trainer, self.trainer.optimizer
        return {
            "weights": [np.array(v) for v in trainer.weights],
            "optimizer": [np.array(v) for v in optimizer.variables],
        }

    def restore(self):
        self.restored_epochs = super().restore()
        self.restored_state = self.state()
        return self.restored_epochs


@pytest.fixture
def spy_checkpoint(monkeypatch):
    SpyCheckpoint.instances = []
    monkeypatch.setattr(run_callbacks, "EpochCheckpoint", SpyCheckpoint)
    return SpyCheckpoint


# ------------------------------------------------------------------------------------------------
# 1. Flag validation through the real CLI: non-zero exit, the flag named, nothing written.

# (extra flags, texts stderr must contain). All go through the real CLI. Each costs a TensorFlow
# import (4-10 s on the shared 2-core machine), so the default run keeps one case per error path:
# TrainConfig validation (which reports every bad value at once, cross-flag rules included), an
# absl enum and the absl number parser; the single-flag cases are slow-marked, and every case is
# also checked in-process by `test_bad_flags_rejected_in_process`.
BAD_FLAGS = {
    "several_invalid_values": (
        ["--eps=-1", "--attack_steps=0", "--batch_size=0", "--method=pgd_at", "--bn_mode=dual"],
        ["--eps", "--attack_steps", "--batch_size", "--bn_mode", "pgd_at"]),
    "unknown_dataset": (["--dataset=imagenet"], ["--dataset", "imagenet"]),
    "non_numeric_eps": (["--eps=abc"], ["--eps", "abc"]),
    "negative_eps": (["--eps=-1"], ["--eps"]),
    "zero_attack_steps": (["--attack_steps=0"], ["--attack_steps"]),
    "unknown_method": (["--method=foo"], ["--method", "foo"]),
    "unknown_model": (["--model=foo"], ["--model", "foo"]),
    "zero_batch_size": (["--batch_size=0"], ["--batch_size"]),
    "pgd_at_with_dual_bn": (["--method=pgd_at", "--bn_mode=dual"], ["--bn_mode", "pgd_at"]),
    "cross_at_with_dual_bn": (["--method=cross_at", "--bn_mode=dual"], ["--bn_mode", "cross_at"]),
    "unexpected_positional_argument": (["stray_argument"], ["stray_argument"]),
}
FAST_BAD_FLAGS = ("several_invalid_values", "unknown_dataset", "non_numeric_eps")


@pytest.mark.parametrize("case", [
    name if name in FAST_BAD_FLAGS else pytest.param(name, marks=pytest.mark.slow)
    for name in BAD_FLAGS
])
def test_cli_rejects_bad_flags(tmp_path, case):
    extra, named = BAD_FLAGS[case]
    run_dir = tmp_path / "run"
    result = run_cli(f"--flagfile={SMOKE_FLAGS}", f"--data_dir={TFDS_DIR}", f"--run_dir={run_dir}",
                     *extra, timeout=180)
    assert result.returncode != 0, _describe(result)
    for text in named:
        assert text in result.stderr, _describe(result)
    assert "Traceback" not in result.stderr, _describe(result)  # a message, not a crash
    # The error and a pointer to --helpfull, not the whole help (absl lists flags as "  --name: ").
    assert "--helpfull" in result.stderr, _describe(result)
    assert not re.search(r"^\s+--\w+: ", result.stderr, re.MULTILINE), _describe(result)
    assert not run_dir.exists(), "a rejected command must not create its run directory"
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("case", [name for name in BAD_FLAGS if name != "unexpected_positional_argument"])
def test_bad_flags_rejected_in_process(case):
    extra, named = BAD_FLAGS[case]
    with pytest.raises((absl_flags.Error, ValueError)) as error:
        parse_flags(extra)
    for text in named:
        assert text in str(error.value)


@pytest.mark.parametrize("argv, message", [
    (["--eps=1/0"], "--eps"),
    (["--eps=nan"], "--eps"),
    (["--learning_rate=0"], "--learning_rate"),
    (["--learning_rate=inf"], "--learning_rate"),
    (["--momentum=1"], "--momentum"),
    (["--verbose=3"], "--verbose"),
    (["--val_subset=-1"], "--val_subset"),
    (["--method=hybrid", "--bn_mode=cross_clean"], "--bn_mode"),
    (["--eps=0.1", "--attack_step_size=0"], "--attack_step_size"),
    (["--run_dir="], "--run_dir"),
])
def test_flag_parsing_rejects_in_process(argv, message):
    with pytest.raises((absl_flags.Error, ValueError), match=re.escape(message)):
        parse_flags(argv)


def test_fractions_are_accepted_exactly():
    config = parse_flags(["--eps=8/255", "--attack_step_size=2/255", "--val_attack_step_size= 1/255"])
    assert config.eps == 8 / 255
    assert config.attack_step_size == 2 / 255
    assert config.val_attack_step_size == 1 / 255
    assert parse_flags(["--eps=0.5"]).eps == 0.5
    assert parse_flags([]) == TrainConfig()  # flag defaults are the config defaults


def test_smoke_flagfile_parses():
    config = parse_flags([f"--flagfile={SMOKE_FLAGS}"])
    assert config.dataset == "cifar10" and config.method == "arat"
    assert config.resolve().bn_mode == "dual"


# ------------------------------------------------------------------------------------------------
# 2. Help.

def test_helpfull_lists_the_training_flags():
    result = run_cli("--helpfull", timeout=120)  # absl exits with status 1 after any help
    for flag, help_words in [("--invariance_weight", "ARAT gamma"), ("--attack_bn_mode", "train"),
                             ("--eps", "8/255"), ("--method", "arat|pgd_at")]:
        assert flag in result.stdout, flag
        assert help_words in result.stdout, help_words


@pytest.mark.slow
def test_help_lists_the_training_flags():
    result = run_cli("--help", timeout=120)
    assert "--invariance_weight" in result.stdout and "--attack_bn_mode" in result.stdout


# ------------------------------------------------------------------------------------------------
# 3. Missing dataset.

def test_cli_missing_dataset_names_dataset_and_data_dir(tmp_path):
    data_dir = _require_data()
    if (TFDS_DIR / "cifar100").exists():
        pytest.skip("cifar100 is prepared in the shared data dir")
    result = run_cli(*CIFAR_RUN_FLAGS, "--dataset=cifar100", f"--data_dir={data_dir}",
                     f"--run_dir={tmp_path / 'run'}", timeout=180)
    assert result.returncode != 0, _describe(result)
    assert "cifar100" in result.stderr and data_dir in result.stderr, _describe(result)
    assert "Traceback" not in result.stderr, _describe(result)
    assert not (tmp_path / "run" / "checkpoints").exists()


# ------------------------------------------------------------------------------------------------
# 4. One real short CIFAR-10 run through the CLI, shared by the run-directory tests.

@pytest.fixture(scope="module")
def cifar_run(tmp_path_factory):
    """`(run_dir, CompletedProcess)` of the shared 3-epoch CIFAR-10 CLI run."""
    data_dir = _require_data()
    run_dir = tmp_path_factory.mktemp("cifar_run") / "run"
    flagfile = run_dir.parent / "tiny.flags"
    flagfile.write_text("# written by tests/test_train_cli.py\n" + "\n".join(CIFAR_RUN_FLAGS) + "\n")
    result = run_cli(f"--flagfile={flagfile}", f"--data_dir={data_dir}", f"--run_dir={run_dir}")
    assert result.returncode == 0, _describe(result)
    return run_dir, result


def test_cli_run_writes_the_run_directory(cifar_run):
    run_dir, result = cifar_run
    assert "epochs 1..3" in result.stdout
    assert f"Run directory: {run_dir}" in result.stdout
    assert re.search(r"Finished epoch 3: .*val_clean_acc_advbn=", result.stdout), result.stdout

    for name in ("flags.txt", "config.json", "metrics.json", "metrics.csv", "model.keras"):
        assert (run_dir / name).is_file(), name
    assert not list(run_dir.glob(".tmp-*")), "temporary files left behind"

    config = json.loads((run_dir / "config.json").read_text())
    assert config["eps"] == 8 / 255  # `--eps=8/255` was accepted as the fraction
    assert config["method"] == "pgd_at" and config["bn_mode"] == "single"  # "auto" resolved
    assert config["attack_bn_mode"] == "inference" and config["lr_schedule"] == "constant"
    assert config["run_dir"] == str(run_dir) and config["resume"] is False

    records = read_metrics(run_dir)
    assert [r["epoch"] for r in records] == [1, 2, 3]
    for record in records:
        for key in ("loss", "clean_acc", "adv_acc", "val_clean_acc_advbn", "val_pgd2_acc_advbn",
                    "learning_rate", "seconds"):
            assert key in record and np.isfinite(record[key]), (key, record)
        assert 0 <= record["val_clean_acc_advbn"] <= 1
        assert record["learning_rate"] == pytest.approx(0.05)
    assert not any("cleanbn" in key for key in records[0]), "single-BN runs have one branch"

    csv_lines = (run_dir / "metrics.csv").read_text().strip().splitlines()
    header = csv_lines[0].split(",")
    assert "val_clean_acc_advbn" in header and "loss" in header
    assert [line.split(",")[header.index("epoch")] for line in csv_lines[1:]] == ["1", "2", "3"]

    events = list((run_dir / "tensorboard").rglob("events.out.tfevents.*"))
    assert events and all(path.stat().st_size > 0 for path in events)

    assert latest_checkpoint_number(run_dir / "checkpoints") == 3
    assert list((run_dir / "checkpoints").glob("ckpt-3.data-*"))
    assert not list((run_dir / "checkpoints").glob("ckpt-1.*")), "max_to_keep=2"


def test_cli_run_loss_decreases(cifar_run):
    records = read_metrics(cifar_run[0])
    assert records[2]["loss"] < records[0]["loss"] - 0.05, [r["loss"] for r in records]


# Run in a fresh interpreter: `import arat_tf` alone must register everything model.keras needs.
LOAD_AND_EVALUATE = """
import json, sys
import numpy as np
import keras
import arat_tf
model = keras.models.load_model(sys.argv[1])
from arat_tf.data import make_eval_dataset
config = json.loads(sys.argv[2])
validation = make_eval_dataset(config["dataset"], batch_size=config["eval_batch_size"],
                               data_dir=config["data_dir"], split=config["val_split"],
                               subset=config["val_subset"])
correct = total = 0
all_logits, all_labels = [], []
for images, labels in validation:
    logits = model(images, training=False, branch="adv")
    correct += int(np.sum(np.argmax(logits, axis=-1) == labels.numpy()))
    total += int(labels.shape[0])
    all_logits += np.asarray(logits).tolist()
    all_labels += labels.numpy().tolist()
print(json.dumps({"class": type(model).__name__, "bn_mode": model.bn_mode,
                  "correct": correct, "total": total, "logits": all_logits,
                  "labels": all_labels}))
"""


def test_saved_model_reproduces_the_logged_validation_accuracy(cifar_run):
    """model.keras gives the logged clean accuracy (adv branch) on the same validation subset.

    (In-process; `test_cli_resume_after_sigkill` loads a model.keras in a fresh interpreter.)
    """
    run_dir = cifar_run[0]
    model = keras.models.load_model(run_dir / "model.keras")
    assert type(model).__name__ == "ResNet" and model.bn_mode == "single"
    config = json.loads((run_dir / "config.json").read_text())
    fewest, most, total = correct_range(model, config)
    assert total == 64
    logged = read_metrics(run_dir)[-1]["val_clean_acc_advbn"]
    assert fewest <= round(logged * total) <= most, (logged, fewest, most)
    assert logged * total == pytest.approx(round(logged * total), abs=1e-4)  # a count of 64


# ------------------------------------------------------------------------------------------------
# 5. flags.txt replays to the same configuration.

def test_flags_txt_replays_to_the_same_config(cifar_run, tmp_path):
    run_dir = cifar_run[0]
    saved = TrainConfig(**json.loads((run_dir / "config.json").read_text()))
    new_dir = str(tmp_path / "replay")
    replayed = parse_flags([f"--flagfile={run_dir / 'flags.txt'}", f"--run_dir={new_dir}"])
    assert replayed == saved.replace(run_dir=new_dir)
    assert replayed.resolve() == replayed  # flags.txt holds the resolved config
    # Every field is in flags.txt: replaying it over other defaults changes nothing.
    over_smoke = parse_flags([f"--flagfile={SMOKE_FLAGS}", f"--flagfile={run_dir / 'flags.txt'}"])
    assert over_smoke == saved


def test_flags_txt_round_trips_awkward_values(tmp_path):
    config = TrainConfig(
        eps=8 / 255, attack_step_size=1 / 3, learning_rate=1e-7, width=0.125, train_split="train[:45000]",
        val_split="train[45000:]", data_dir="/some dir/with spaces", use_predictor=False, resume=True,
        run_dir=str(tmp_path / "a b"),
    )
    flagfile = tmp_path / "flags.txt"
    flagfile.write_text(config_to_flagfile(config))
    assert parse_flags([f"--flagfile={flagfile}"]) == config


# ------------------------------------------------------------------------------------------------
# 6. An existing run is never overwritten without --resume.

def test_cli_refuses_existing_run_without_resume(cifar_run):
    run_dir = cifar_run[0]
    before = snapshot_files(run_dir)
    # flags.txt names the run's own --run_dir (and --noresume).
    result = run_cli(f"--flagfile={run_dir / 'flags.txt'}", timeout=180)
    assert result.returncode != 0, _describe(result)
    assert "already holds a run" in result.stderr and "--resume" in result.stderr, _describe(result)
    assert str(run_dir) in result.stderr
    assert "Traceback" not in result.stderr, _describe(result)
    assert snapshot_files(run_dir) == before, "files of the existing run changed"


# ------------------------------------------------------------------------------------------------
# 7. Resume after a crash.

@pytest.fixture(scope="module")
def arat_run(tmp_path_factory):
    """A finished 2-epoch in-process ARAT run (dual BN, predictors, auto-balance) on MNIST.

    Returns a dict: config, records, the trainer/optimizer state at the end (== the epoch-2
    checkpoint, nothing changes after it is written) and the classifier's inference logits on
    16 validation images for both branches. Tests resume copies of it (`copy_run`).
    """
    data_dir = _require_data()
    config = tiny_config(data_dir, tmp_path_factory.mktemp("arat_run") / "run", method="arat")
    with pytest.MonkeyPatch.context() as patch:
        SpyCheckpoint.instances = []
        patch.setattr(run_callbacks, "EpochCheckpoint", SpyCheckpoint)
        classifier, records = training.train(config)
        spy = SpyCheckpoint.instances[-1]
    images = probe_images(data_dir)
    return dict(
        config=config, records=records, state=spy.state(), trainable=trainable_mask(spy),
        iterations=int(spy.trainer.optimizer.iterations.numpy()),
        logits={branch: np.array(classifier(images, training=False, branch=branch))
                for branch in ("adv", "clean")},
    )


def probe_images(data_dir):
    return next(iter(make_eval_dataset("mnist", batch_size=16, data_dir=data_dir, subset=16)))[0]


def trainable_mask(spy):
    return [bool(v.trainable) for v in spy.trainer.weights]


def copy_run(arat_run, tmp_path, **changes):
    """Copies the finished run to tmp_path/run; returns its config with `changes` applied."""
    source = arat_run["config"].run_dir
    shutil.copytree(source, tmp_path / "run")
    return arat_run["config"].replace(run_dir=str(tmp_path / "run"), **changes)


def test_arat_run_saves_both_branches_in_model_keras(arat_run):
    run_dir = Path(arat_run["config"].run_dir)
    assert [r["epoch"] for r in arat_run["records"]] == [1, 2]
    assert "w_adv" in arat_run["records"][0] and "val_clean_acc_cleanbn" in arat_run["records"][0]
    loaded = keras.models.load_model(run_dir / "model.keras")
    images = probe_images(arat_run["config"].data_dir)
    for branch, want in arat_run["logits"].items():
        np.testing.assert_allclose(loaded(images, training=False, branch=branch), want,
                                   rtol=1e-5, atol=1e-5)
    assert not np.allclose(arat_run["logits"]["adv"], arat_run["logits"]["clean"])


def test_resume_continues_at_the_next_epoch_with_the_saved_weights(arat_run, tmp_path, capsys,
                                                                      spy_checkpoint):
    """In-process variant of the crash test: 2 epochs done, resume to 3."""
    config = copy_run(arat_run, tmp_path, epochs=3, resume=True)
    steps_per_epoch = 2
    assert arat_run["iterations"] == 2 * steps_per_epoch

    _, records = training.train(config)
    assert "epochs 3..3" in capsys.readouterr().out
    spy = spy_checkpoint.instances[-1]
    assert spy.restored_epochs == 2
    restored, saved = spy.restored_state, arat_run["state"]
    assert trainable_mask(spy) == arat_run["trainable"]
    # Trainable weights and optimizer state (momentum buffers, iteration count) come back exactly.
    # (Non-trainable state: see test_resume_restores_batch_norm_statistics.)
    for got, want, trainable in zip(restored["weights"], saved["weights"], arat_run["trainable"]):
        if trainable:
            np.testing.assert_array_equal(got, want)
    assert len(restored["optimizer"]) == len(saved["optimizer"])
    for got, want in zip(restored["optimizer"], saved["optimizer"]):
        np.testing.assert_array_equal(got, want)
    assert int(spy.trainer.optimizer.iterations.numpy()) == 3 * steps_per_epoch

    on_disk = read_metrics(config.run_dir)
    assert [r["epoch"] for r in on_disk] == [1, 2, 3]
    assert on_disk[:2] == arat_run["records"], "records of the restored epochs must be kept"
    assert records == on_disk
    assert latest_checkpoint_number(Path(config.run_dir) / "checkpoints") == 3
    config_json = json.loads(Path(config.run_dir, "config.json").read_text())
    assert config_json["epochs"] == 3 and config_json["resume"] is True

    # Resuming a finished run trains nothing and keeps the records.
    _, again = training.train(config)
    assert "epochs 4..3" in capsys.readouterr().out
    assert again == on_disk == read_metrics(config.run_dir)
    assert latest_checkpoint_number(Path(config.run_dir) / "checkpoints") == 3


def test_resume_restores_batch_norm_statistics(arat_run, tmp_path, spy_checkpoint):
    config = copy_run(arat_run, tmp_path, epochs=3, resume=True)
    training.train(config)
    spy = spy_checkpoint.instances[-1]
    non_trainable = [(got, want) for got, want, trainable in zip(
        spy.restored_state["weights"], arat_run["state"]["weights"], arat_run["trainable"])
        if not trainable]
    assert len(non_trainable) >= 24  # 6 split-BN layers x 2 branches x 2 + predictor BN + CE weights
    for got, want in non_trainable:
        np.testing.assert_array_equal(got, want)


def test_resume_of_a_finished_run_keeps_model_keras(arat_run, tmp_path):
    config = copy_run(arat_run, tmp_path, resume=True)  # epochs=2: nothing left to train
    training.train(config)
    loaded = keras.models.load_model(Path(config.run_dir) / "model.keras")
    images = probe_images(config.data_dir)
    for branch, want in arat_run["logits"].items():
        np.testing.assert_allclose(loaded(images, training=False, branch=branch), want,
                                   rtol=1e-5, atol=1e-5)


def test_resume_after_crash_between_logs_and_checkpoint_keeps_csv_consistent(two_epoch_run):
    config = two_epoch_run
    run_dir = Path(config.run_dir)
    # Simulate a kill after epoch 2's logs were written but before its checkpoint was saved.
    checkpoint_dir = run_dir / "checkpoints"
    for path in checkpoint_dir.glob("ckpt-2.*"):
        path.unlink()
    tf.compat.v1.train.update_checkpoint_state(str(checkpoint_dir), "ckpt-1",
                                               all_model_checkpoint_paths=["ckpt-1"])

    training.train(config.replace(epochs=3, resume=True))
    assert [r["epoch"] for r in read_metrics(run_dir)] == [1, 2, 3]
    lines = (run_dir / "metrics.csv").read_text().strip().splitlines()
    epoch_column = lines[0].split(",").index("epoch")
    assert [line.split(",")[epoch_column] for line in lines[1:]] == ["1", "2", "3"]


@pytest.mark.slow  # 23-30 s alone; the in-process variant above runs by default
def test_cli_resume_after_sigkill(tmp_path):
    """A real crash: SIGKILL during epoch 2+ of 4, then `--flagfile <run>/flags.txt --resume`."""
    data_dir = _require_data()
    run_dir = tmp_path / "run"
    checkpoint_dir = run_dir / "checkpoints"
    args = ["--dataset=mnist", "--method=arat", "--model=small_cnn", "--width=0.25",
            "--train_subset=256", "--val_subset=64", "--batch_size=32", "--eval_batch_size=64",
            "--attack_steps=2", "--val_attack_steps=2", "--auto_balance_examples=64", "--epochs=4",
            "--learning_rate=0.05", "--lr_schedule=constant", "--verbose=0",
            f"--data_dir={data_dir}", f"--run_dir={run_dir}"]
    process = subprocess.Popen([sys.executable, "-m", "arat_tf.train", *args], cwd=REPO,
                               env=_cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    try:
        deadline = time.time() + 300
        while (latest_checkpoint_number(checkpoint_dir) or 0) < 1:
            assert process.poll() is None, f"run ended early: {process.communicate()}"
            assert time.time() < deadline, "no checkpoint after 300 s"
            time.sleep(0.05)
        time.sleep(0.3)  # into the next epoch
        assert process.poll() is None, "the run finished before it could be killed"
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=60)
    finally:
        if process.poll() is None:
            os.kill(process.pid, signal.SIGKILL)
            process.wait()
    assert process.returncode == -signal.SIGKILL
    completed = latest_checkpoint_number(checkpoint_dir)
    print(f"killed after {completed} completed epoch(s)")
    assert 1 <= completed < 4
    before = [r for r in read_metrics(run_dir) if r["epoch"] <= completed]
    assert [r["epoch"] for r in before] == list(range(1, completed + 1))

    result = run_cli(f"--flagfile={run_dir / 'flags.txt'}", "--resume")
    assert result.returncode == 0, _describe(result)
    assert f"epochs {completed + 1}..4" in result.stdout, result.stdout
    records = read_metrics(run_dir)
    assert [r["epoch"] for r in records] == [1, 2, 3, 4]
    assert records[:completed] == before
    assert latest_checkpoint_number(checkpoint_dir) == 4
    assert sorted(p.name.split(".")[0] for p in checkpoint_dir.glob("ckpt-*.index")) == ["ckpt-3", "ckpt-4"]

    # The final model.keras loads in a fresh interpreter and gives the logged accuracy.
    loaded = subprocess.run(
        [sys.executable, "-c", LOAD_AND_EVALUATE, str(run_dir / "model.keras"),
         (run_dir / "config.json").read_text()],
        cwd=REPO, env=_cli_env(), capture_output=True, text=True, timeout=300,
    )
    assert loaded.returncode == 0, _describe(loaded)
    evaluated = json.loads(loaded.stdout.strip().splitlines()[-1])
    assert evaluated["class"] == "SmallCNN" and evaluated["total"] == 64
    # The same count as logged by the training process (a graph there, eager here), up to
    # examples within round-off of a tie.
    fewest, most = correct_count_range(evaluated["logits"], evaluated["labels"])
    logged = records[-1]["val_clean_acc_advbn"]
    assert fewest <= round(logged * 64) <= most, (logged, fewest, most)


# ------------------------------------------------------------------------------------------------
# 8. A corrupt checkpoint stops --resume with a clear message and keeps the files.

def test_cli_resume_from_corrupt_checkpoint_fails_clearly(cifar_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(cifar_run[0], run_dir)
    # The copy's flags.txt/config.json still name the original dir; --run_dir below overrides it.
    data_file = sorted((run_dir / "checkpoints").glob("ckpt-3.data-*"))[0]
    data_file.write_bytes(os.urandom(data_file.stat().st_size))
    before = snapshot_files(run_dir)

    result = run_cli(f"--flagfile={run_dir / 'flags.txt'}", f"--run_dir={run_dir}", "--resume",
                     "--epochs=4", timeout=300)
    assert result.returncode != 0, _describe(result)
    assert "Cannot restore checkpoint" in result.stderr, _describe(result)
    assert str(run_dir / "checkpoints" / "ckpt-3") in result.stderr, _describe(result)
    assert "Traceback" not in result.stderr, _describe(result)
    after = snapshot_files(run_dir)
    checkpoint_files = {k: v for k, v in before.items() if k.startswith("checkpoints")}
    assert {k: v for k, v in after.items() if k.startswith("checkpoints")} == checkpoint_files
    assert after["metrics.json"] == before["metrics.json"]
    assert after["model.keras"] == before["model.keras"]


@pytest.fixture(scope="module")
def finished_tiny_run(tmp_path_factory):
    """A finished 2-epoch in-process PGD-AT run (small CNN, 128 MNIST images); do not modify."""
    config = tiny_config(_require_data(), tmp_path_factory.mktemp("tiny_run") / "run")
    training.train(config)
    return config


@pytest.fixture
def two_epoch_run(finished_tiny_run, tmp_path):
    """A private copy of `finished_tiny_run` in tmp_path/run; returns its config."""
    shutil.copytree(finished_tiny_run.run_dir, tmp_path / "run")
    return finished_tiny_run.replace(run_dir=str(tmp_path / "run"))


@pytest.mark.parametrize("damage", [
    "missing",
    "truncated",
    "empty",
    "garbage_index",
])
def test_resume_from_damaged_checkpoint_raises_checkpoint_error(two_epoch_run, damage):
    checkpoint_dir = Path(two_epoch_run.run_dir) / "checkpoints"
    data_file = sorted(checkpoint_dir.glob("ckpt-2.data-*"))[0]
    if damage == "missing":
        data_file.unlink()
    elif damage == "truncated":
        with open(data_file, "r+b") as stream:
            stream.truncate(data_file.stat().st_size // 2)
    elif damage == "empty":
        data_file.write_bytes(b"")
    elif damage == "garbage_index":
        index = checkpoint_dir / "ckpt-2.index"
        index.write_bytes(os.urandom(index.stat().st_size))
    before = snapshot_files(checkpoint_dir)
    with pytest.raises(CheckpointError, match=re.escape(f"Cannot restore checkpoint {checkpoint_dir}/ckpt-2")):
        training.train(two_epoch_run.replace(epochs=3, resume=True))
    assert snapshot_files(checkpoint_dir) == before


def test_resume_with_another_architecture_raises_checkpoint_error(two_epoch_run):
    with pytest.raises(CheckpointError, match="Cannot restore checkpoint"):
        training.train(two_epoch_run.replace(epochs=3, resume=True, width=0.5))


# ------------------------------------------------------------------------------------------------
# 9. A non-finite loss stops training; the last good checkpoint stays the newest and loads.

def test_non_finite_loss_stops_training_and_keeps_last_good_checkpoint(two_epoch_run, capsys,
                                                                       monkeypatch):
    from arat_tf.methods import AdversarialTrainer

    run_dir = Path(two_epoch_run.run_dir)
    checkpoint_dir = run_dir / "checkpoints"
    checkpoints_before = snapshot_files(checkpoint_dir)
    model_before = snapshot_files(run_dir)["model.keras"]
    metrics_before = read_metrics(run_dir)

    # A huge learning rate does not reliably produce NaN (BN's scale invariance can keep the loss
    # finite), so the NaN is injected into the loss itself, for this one resumed run only.
    original = AdversarialTrainer.train_step

    def nan_train_step(self, data):
        logs = original(self, data)
        return {**logs, "loss": logs["loss"] * float("nan")}

    with monkeypatch.context() as patch:
        patch.setattr(AdversarialTrainer, "train_step", nan_train_step)
        with pytest.raises(NonFiniteLossError,
                           match=r"Training loss became (nan|inf|-inf) in epoch 3") as error:
            training.train(two_epoch_run.replace(epochs=3, resume=True))
    message = str(error.value)
    assert str(checkpoint_dir) in message and "--learning_rate" in message

    assert latest_checkpoint_number(checkpoint_dir) == 2
    assert snapshot_files(checkpoint_dir) == checkpoints_before
    assert read_metrics(run_dir) == metrics_before
    assert snapshot_files(run_dir)["model.keras"] == model_before, "a diverged model was saved"

    # The last good checkpoint loads: resuming with a sane learning rate continues at epoch 3.
    capsys.readouterr()
    _, records = training.train(two_epoch_run.replace(epochs=3, resume=True))
    assert "epochs 3..3" in capsys.readouterr().out
    assert [r["epoch"] for r in records] == [1, 2, 3]
    assert all(np.isfinite(r["loss"]) for r in records)


def test_non_finite_loss_in_first_epoch_via_injected_nan(tmp_path, monkeypatch):
    """The guard reacts to the loss itself (NaN injected into compute_losses), not to lr."""
    data_dir = _require_data()
    from arat_tf.methods import PgdAtTrainer

    original = PgdAtTrainer.compute_losses

    def nan_losses(self, *args, **kwargs):
        total, terms, clean_logits, adv_logits = original(self, *args, **kwargs)
        return total * float("nan"), terms, clean_logits, adv_logits

    monkeypatch.setattr(PgdAtTrainer, "compute_losses", nan_losses)
    config = tiny_config(data_dir, tmp_path / "run", epochs=1)
    with pytest.raises(NonFiniteLossError, match=r"Training loss became nan in epoch 1, batch 1\."):
        training.train(config)
    assert latest_checkpoint_number(tmp_path / "run" / "checkpoints") is None
    assert not (tmp_path / "run" / "model.keras").exists()
    assert not (tmp_path / "run" / "metrics.json").exists()


# ------------------------------------------------------------------------------------------------
# Warm start (--init_from), runs of arat_tf 0.1, the auto-balance sample.


def test_init_from_a_run_starts_from_its_classifier_and_predictor_heads(arat_run, tmp_path, capsys):
    from arat_tf.warm_start import PREDICTOR_HEADS_FILE

    source = Path(arat_run["config"].run_dir)
    assert (source / PREDICTOR_HEADS_FILE).is_file()  # ARAT runs keep their heads beside the model
    heads = dict(np.load(source / PREDICTOR_HEADS_FILE))
    # A learning rate of ~0 keeps the weights where the warm start put them.
    config = arat_run["config"].replace(run_dir=str(tmp_path / "warm"), init_from=str(source),
                                        epochs=1, learning_rate=1e-12, weight_decay=0.0)
    classifier, _ = training.train(config)
    output = capsys.readouterr().out
    assert "--init_from: initialised from" in output and "predictor heads from" in output
    loaded = keras.models.load_model(source / "model.keras")
    for variable, expected in zip(classifier.trainable_weights, loaded.trainable_weights):
        np.testing.assert_allclose(variable, expected, atol=1e-6, err_msg=variable.path)
    np.testing.assert_allclose(np.load(tmp_path / "warm" / PREDICTOR_HEADS_FILE)[next(iter(heads))],
                               heads[next(iter(heads))], atol=1e-6)


def test_init_from_another_architecture_is_refused_naming_the_difference(arat_run, tmp_path):
    from arat_tf.warm_start import WarmStartError

    config = arat_run["config"].replace(run_dir=str(tmp_path / "warm"), width=0.5, epochs=1,
                                        init_from=str(Path(arat_run["config"].run_dir)))
    with pytest.raises(WarmStartError, match=r"width=0\.25.*width=0\.5"):
        training.train(config)
    missing = config.replace(width=0.25, init_from=str(tmp_path / "nowhere"))
    with pytest.raises(WarmStartError, match="no model file"):
        training.train(missing)


def test_resuming_a_run_of_arat_tf_0_1_is_refused_and_changes_nothing(arat_run, tmp_path):
    config = copy_run(arat_run, tmp_path, epochs=3, resume=True)
    config_path = Path(config.run_dir) / "config.json"
    old = json.loads(config_path.read_text())
    del old["conv_padding"]  # what a 0.1 run directory holds
    config_path.write_text(json.dumps(old))
    before = snapshot_files(config.run_dir)
    with pytest.raises(CheckpointError, match=r"arat_tf 0\.1.*--init_from=.*--conv_padding=tf_same"):
        training.train(config)
    assert snapshot_files(config.run_dir) == before


def test_auto_balance_sample_fresh_is_a_new_augmented_draw_each_epoch_and_fixed_is_not():
    data_dir = _require_data()
    from arat_tf.data import dataset_spec

    base = TrainConfig(dataset="cifar10", data_dir=data_dir, train_subset=512, val_subset=64,
                       batch_size=64, auto_balance_examples=150, seed=0)
    spec = dataset_spec("cifar10")

    def two_epochs(sample):
        _, _, probe, _ = training.build_datasets(base.replace(auto_balance_sample=sample).resolve(),
                                                 spec)
        return [np.concatenate([images.numpy() for images, _ in probe]) for _ in range(2)]

    first, second = two_epochs("fresh")
    assert first.shape == second.shape == (192, 32, 32, 3)  # ceil(150 / 64) = 3 whole batches
    assert not np.array_equal(first, second)
    fixed_first, fixed_second = two_epochs("fixed")
    assert fixed_first.shape == (150, 32, 32, 3)
    np.testing.assert_array_equal(fixed_first, fixed_second)
    unaugmented = make_eval_dataset("cifar10", batch_size=150, data_dir=data_dir, split="train",
                                    subset=150)
    np.testing.assert_array_equal(fixed_first, next(iter(unaugmented))[0].numpy())

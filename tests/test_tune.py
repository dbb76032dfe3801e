"""Tests of the hyperparameter search (`arat_tf.tuning`, `python -m arat_tf.tune`).

The search space per method and its ranges, the held-out split check, and one tiny real search on
CIFAR-10 (a narrow ResNet-10 on 128 images, 1 epoch, PGD-1: a few seconds per trial) that is first
run with max_trials=1 and then resumed with max_trials=2, shared by the output tests.
"""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import keras_tuner as kt
import pytest
from absl import flags as absl_flags

from arat_tf.config import TrainConfig
from arat_tf.flags import config_from_flags, define_train_flags
from arat_tf.tuning import (
    AdversarialHyperModel, SearchSpace, TestSplitError, check_tuning_splits, define_search_space,
    run_search,
)

REPO = Path(__file__).resolve().parents[1]
TFDS_DIR = REPO.parent / "shared" / "datasets" / "tfds"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

TINY = dict(
    dataset="cifar10", method="arat", model="resnet", depth=10, width=0.125,
    train_split="train[:90%]", val_split="train[90%:]", train_subset=128, val_subset=64,
    batch_size=64, eval_batch_size=64, epochs=1, attack_steps=1, val_attack_steps=1,
    auto_balance_examples=64, learning_rate=0.05, lr_schedule="constant", verbose=0,
)


def _space(hp_method, **ranges):
    hp = kt.HyperParameters()
    define_search_space(hp, hp_method, SearchSpace(**ranges))
    return {p.name: p for p in hp.space}


def test_arat_search_space_has_its_hyperparameters_and_respects_ranges():
    space = _space("arat", gamma_min=5.0, gamma_max=50.0, adv_ce_weight_min=0.2,
                   adv_ce_weight_max=0.8, predictor_hidden_ratio_min=0.25,
                   predictor_hidden_ratio_max=0.5)
    assert set(space) == {"invariance_weight", "ce_weights", "adv_ce_weight", "clean_ce_weight",
                          "predictor_hidden_ratio"}
    gamma = space["invariance_weight"]
    assert (gamma.min_value, gamma.max_value, gamma.sampling) == (5.0, 50.0, "log")
    assert list(space["ce_weights"].values) == ["auto", "fixed"]
    adv = space["adv_ce_weight"]
    assert (adv.min_value, adv.max_value) == (0.2, 0.8)
    # The fixed weights only exist when ce_weights == "fixed".
    assert [c.values for c in adv.conditions] == [["fixed"]]
    assert space["predictor_hidden_ratio"].min_value == 0.25
    assert "trades_beta" not in space and "learning_rate" not in space


def test_baseline_search_spaces():
    trades = _space("trades", trades_beta_min=2.0, trades_beta_max=8.0)
    assert set(trades) == {"trades_beta"}
    assert (trades["trades_beta"].min_value, trades["trades_beta"].max_value) == (2.0, 8.0)
    trades_lr = _space("trades", tune_learning_rate=True, learning_rate_min=0.02,
                       learning_rate_max=0.1)
    assert set(trades_lr) == {"trades_beta", "learning_rate"}
    assert trades_lr["learning_rate"].sampling == "log"
    assert (trades_lr["learning_rate"].min_value, trades_lr["learning_rate"].max_value) == (0.02, 0.1)
    assert set(_space("mart")) == {"mart_beta"}
    assert set(_space("pgd_at", tune_learning_rate=True)) == {"learning_rate"}
    with pytest.raises(ValueError, match="--tune_learning_rate"):
        _space("pgd_at")
    with pytest.raises(ValueError, match="gamma"):
        SearchSpace(gamma_min=10.0, gamma_max=1.0)


def test_trial_values_apply_to_the_config():
    hypermodel = AdversarialHyperModel(TrainConfig(**TINY), SearchSpace())
    hp = kt.HyperParameters()
    hypermodel.declare(hp)
    hp.values.update(invariance_weight=12.5, ce_weights="fixed", adv_ce_weight=0.3,
                     clean_ce_weight=0.7)
    config = hypermodel.trial_config(hp)
    assert (config.invariance_weight, config.ce_weights, config.adv_ce_weight,
            config.clean_ce_weight) == (12.5, "fixed", 0.3, 0.7)
    assert config.bn_mode == "dual"  # resolved


@pytest.mark.parametrize("split", ["test", "test[:50%]", "train[:10%]+test"])
def test_test_split_is_rejected_as_validation(split):
    config = TrainConfig(**dict(TINY, val_split=split))
    with pytest.raises(TestSplitError, match="held-out part of the training set"):
        check_tuning_splits(config)
    with pytest.raises(TestSplitError):
        AdversarialHyperModel(config, SearchSpace())


def test_cli_rejects_test_split(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "arat_tf.tune", "--val_split=test", f"--search_dir={tmp_path}"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode != 0
    assert "--val_split='test' uses the test split" in result.stderr
    assert not any(tmp_path.iterdir())  # nothing started


@pytest.fixture(scope="module")
def tiny_search(tmp_path_factory):
    """A 2-trial random search run as 1 trial, then resumed to 2; counts HyperModel.fit calls."""
    if not (TFDS_DIR / "cifar10").is_dir():
        pytest.skip(f"shared TFDS data dir not found at {TFDS_DIR}")
    search_dir = tmp_path_factory.mktemp("search")
    config = TrainConfig(**dict(TINY, data_dir=str(TFDS_DIR)))
    calls = []
    original_fit = AdversarialHyperModel.fit

    def counting_fit(self, hp, model, *args, **kwargs):
        calls.append(dict(hp.values))
        return original_fit(self, hp, model, *args, **kwargs)

    AdversarialHyperModel.fit = counting_fit
    try:
        common = dict(objective="sum", tuner="random", search_dir=str(search_dir),
                      project_name="tiny", seed=3, best_run_dir=str(search_dir / "best_run"))
        run_search(config, SearchSpace(), max_trials=1, **common)
        calls_first = len(calls)
        tuner, records, best = run_search(config, SearchSpace(), max_trials=2, **common)
    finally:
        AdversarialHyperModel.fit = original_fit
    return dict(config=config, dir=Path(tuner.project_dir), calls_first=calls_first,
                calls_total=len(calls), records=records, best=best)


def test_resume_does_not_repeat_finished_trials(tiny_search):
    assert tiny_search["calls_first"] == 1
    assert tiny_search["calls_total"] == 2  # the resumed run trained one new trial only
    assert [r["trial_id"] for r in tiny_search["records"]] == ["0", "1"]
    first, second = (r["hyperparameters"] for r in tiny_search["records"])
    assert first != second


def test_search_writes_trials_with_sum_objective(tiny_search):
    import csv

    with open(tiny_search["dir"] / "trials.csv") as stream:
        rows = list(csv.DictReader(stream))
    assert len(rows) == 2
    for row in rows:
        assert row["status"] == "COMPLETED"
        clean, robust, objective = (float(row[k]) for k in ("clean", "robust", "objective"))
        assert 0 <= clean <= 1 and 0 <= robust <= 1
        assert objective == pytest.approx(clean + robust)
        assert float(row["invariance_weight"]) > 0
    data = json.loads((tiny_search["dir"] / "trials.json").read_text())
    assert len(data["trials"]) == 2
    assert data["best_trial_id"] == tiny_search["best"]["trial_id"]
    best_objective = max(float(r["objective"]) for r in rows)
    assert tiny_search["best"]["objective"] == pytest.approx(best_objective)


def test_tradeoff_plot_is_a_png(tiny_search):
    path = tiny_search["dir"] / "tradeoff.png"
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    assert path.stat().st_size > 1000


def test_best_flags_replay_with_the_training_flags(tiny_search, tmp_path):
    best = tiny_search["best"]
    values = absl_flags.FlagValues()
    define_train_flags(values)
    values([sys.argv[0], f"--flagfile={tiny_search['dir'] / 'best.flags'}"])
    config = config_from_flags(values)
    assert best["hyperparameters"]
    for name, value in best["hyperparameters"].items():
        expected = pytest.approx(value) if isinstance(value, float) else value
        assert getattr(config, name) == expected, name
    base = tiny_search["config"]
    assert config.replace(**{k: getattr(base, k) for k in best["hyperparameters"]},
                          run_dir=base.run_dir) == base
    assert config.run_dir == str(tiny_search["dir"].parent / "best_run")

    from arat_tf import training

    _, records = training.train(config.replace(run_dir=str(tmp_path / "run"), epochs=1))
    assert len(records) == 1
    assert (tmp_path / "run" / "model.keras").is_file()


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_distributed_search_on_localhost(tmp_path):
    """keras-tuner chief + 2 workers on localhost share one search (3 trials in total)."""
    if not (TFDS_DIR / "cifar10").is_dir():
        pytest.skip(f"shared TFDS data dir not found at {TFDS_DIR}")
    args = [sys.executable, "-m", "arat_tf.tune", "--flagfile=configs/tune_smoke.flags",
            f"--data_dir={TFDS_DIR}", f"--search_dir={tmp_path}", "--project_name=dist",
            "--epochs=1", "--train_subset=128", "--val_subset=64", "--attack_steps=1",
            "--val_attack_steps=1", "--max_trials=3"]
    env = dict(os.environ, KERASTUNER_ORACLE_IP="127.0.0.1",
               KERASTUNER_ORACLE_PORT=str(_free_port()), TF_CPP_MIN_LOG_LEVEL="2")
    chief = subprocess.Popen(args, cwd=REPO, env=dict(env, KERASTUNER_TUNER_ID="chief"),
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    time.sleep(5)
    workers = [subprocess.Popen(args, cwd=REPO, env=dict(env, KERASTUNER_TUNER_ID=f"tuner{i}"),
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
               for i in range(2)]
    try:
        outputs = [w.communicate(timeout=600)[0] for w in workers]
        chief_output = chief.communicate(timeout=300)[0]
    finally:
        for process in [chief, *workers]:
            if process.poll() is None:
                process.kill()
    assert all(w.returncode == 0 for w in workers), outputs
    assert chief.returncode == 0, chief_output
    data = json.loads((tmp_path / "dist" / "trials.json").read_text())
    assert len(data["trials"]) == 3
    assert all(t["status"] == "COMPLETED" for t in data["trials"])
    assert (tmp_path / "dist" / "best.flags").is_file()


@pytest.mark.slow
def test_cli_search_with_mirrored_strategy_and_best_flags(tmp_path):
    """The CLI end to end under --strategy=mirrored --cpu_replicas=2 (keras-tuner builds each
    trial under the strategy); best.flags keeps the strategy flags."""
    if not (TFDS_DIR / "cifar10").is_dir():
        pytest.skip(f"shared TFDS data dir not found at {TFDS_DIR}")
    result = subprocess.run(
        [sys.executable, "-m", "arat_tf.tune", "--flagfile=configs/tune_smoke.flags",
         f"--data_dir={TFDS_DIR}", f"--search_dir={tmp_path}", "--project_name=mirrored",
         "--max_trials=1", "--epochs=1", "--train_subset=128", "--val_subset=64",
         "--eval_batch_size=64", "--strategy=mirrored", "--cpu_replicas=2"],
        cwd=REPO, capture_output=True, text=True, timeout=600,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"),
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 trial(s) in total, 1 trained by this run" in result.stdout
    best_flags = (tmp_path / "mirrored" / "best.flags").read_text()
    assert "--strategy=mirrored" in best_flags and "--cpu_replicas=2" in best_flags


@pytest.mark.slow
def test_hyperband_search(tmp_path):
    """Hyperband (which continues trials from keras-tuner's saved weights) completes."""
    if not (TFDS_DIR / "cifar10").is_dir():
        pytest.skip(f"shared TFDS data dir not found at {TFDS_DIR}")
    config = TrainConfig(**dict(TINY, data_dir=str(TFDS_DIR), epochs=3, method="trades"))
    _, records, best = run_search(config, SearchSpace(), objective="robust", tuner="hyperband",
                                  search_dir=str(tmp_path), project_name="hb", seed=0,
                                  hyperband_factor=3)
    assert len(records) >= 2 and best is not None
    assert all(r["status"] == "COMPLETED" for r in records)
    assert set(best["hyperparameters"]) == {"trades_beta"}
    assert best["objective"] == pytest.approx(best["robust"])

"""End to end: `python -m pipeline.run` on real CIFAR-10 in a subprocess, twice: the second run
must be served entirely from the cache (nothing retrained, nothing pushed again). Plus the CLI's
messages for bad input.

The default test shrinks configs/pipeline_smoke.flags (1 tuner trial, 1 epoch, 256 images) to
about a minute; the slow one runs the flagfile unmodified (a few minutes)."""

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SMOKE_FLAGS = REPO / "configs" / "pipeline_smoke.flags"
TFDS_DIR = REPO.parent / "shared" / "datasets" / "tfds"
COMPONENTS = ["ExampleGen", "Tuner", "Trainer", "Evaluator", "Pusher"]
QUICK = ["--max_trials=1", "--epochs=1", "--train_subset=256", "--val_subset=128",
         "--test_subset=100", "--auto_balance_examples=128", "--eval_attacks=pgd5",
         "--min_clean_accuracy=0", "--verbose=0"]


def run_cli(module, *args, timeout=900):
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))


def run_pipeline(root, *args, data_dir=TFDS_DIR):
    return run_cli("pipeline.run", f"--flagfile={SMOKE_FLAGS}", f"--data_dir={data_dir}",
                   f"--pipeline_root={root}", *args)


def executions(root):
    """`{run id: {component: status}}` and `{run id: code version}` from the metadata store."""
    with sqlite3.connect(root / "metadata.sqlite") as connection:
        runs = dict(connection.execute("SELECT id, code_version FROM pipeline_runs"))
        statuses = {}
        for run_id, component, status in connection.execute(
                "SELECT run_id, component, status FROM executions ORDER BY id"):
            statuses.setdefault(run_id, {})[component] = status
    return statuses, runs


def check_run_twice_is_cached(root, *args):
    if not (TFDS_DIR / "cifar10").is_dir():
        pytest.skip(f"shared TFDS data dir with cifar10 not found at {TFDS_DIR}")
    first = run_pipeline(root, *args)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    statuses, _ = executions(root)
    assert statuses[1] == {name: "complete" for name in COMPONENTS}
    [model_dir] = (root / "Trainer" / "model").iterdir()
    model_mtime = (model_dir / "model.keras").stat().st_mtime
    versions = sorted(os.listdir(root / "serving" / "versions")) if (root / "serving").exists() \
        else []
    assert (root / "report" / "index.html").exists()

    # Others may edit arat_tf while this runs (a shared working tree): a changed code version
    # rightly invalidates the cache, so rerun until two runs saw the same code.
    for _ in range(3):
        second = run_pipeline(root, *args)
        assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
        statuses, code_versions = executions(root)
        last = max(statuses)
        if code_versions[last] == code_versions[last - 1]:
            break
    assert statuses[last] == {name: "cached" for name in COMPONENTS}, second.stdout[-3000:]
    if last == 2:
        assert (model_dir / "model.keras").stat().st_mtime == model_mtime  # not retrained
        now = sorted(os.listdir(root / "serving" / "versions")) if versions else []
        assert now == versions  # not pushed again
    assert "Trainer: cached" in second.stdout and "Epoch 1/" not in second.stdout
    return first, second


def test_pipeline_runs_then_reruns_from_cache(tmp_path):
    root = tmp_path / "pipeline"
    first, _ = check_run_twice_is_cached(root, *QUICK)
    assert "Push: version 1" in first.stdout
    lineage = run_cli("pipeline.lineage", f"--metadata_db={root / 'metadata.sqlite'}")
    assert lineage.returncode == 0, lineage.stderr
    text = lineage.stdout
    assert text.startswith("PushedModel #") and "pushed version 1" in text
    for expected in ("<- Trainer execution", "examples: Examples #", "of cifar10",
                     "hyperparameters: HyperParameters #", "<- ExampleGen execution", " code ",
                     " git "):
        assert expected in text, text


@pytest.mark.slow
def test_unmodified_smoke_pipeline_runs_then_reruns_from_cache(tmp_path):
    check_run_twice_is_cached(tmp_path / "pipeline")


def test_unknown_dataset_is_rejected(tmp_path):
    result = run_pipeline(tmp_path / "p", "--dataset=imagenet")
    assert result.returncode != 0
    assert "imagenet" in result.stderr and "cifar10" in result.stderr
    assert not (tmp_path / "p").exists()


def test_missing_data_dir_and_test_split_for_validation_are_explained(tmp_path):
    result = run_pipeline(tmp_path / "p", "--val_split=test[:50%]",
                          data_dir=tmp_path / "no_such_dir")
    assert result.returncode != 0
    assert "The test split is the Evaluator's" in result.stderr
    result = run_pipeline(tmp_path / "p", data_dir=tmp_path / "no_such_dir")
    assert result.returncode != 0
    assert f"--data_dir={tmp_path / 'no_such_dir'} does not exist" in result.stderr
    assert not (tmp_path / "p").exists()


@pytest.mark.slow  # ~9 s; test_pipeline_runner checks the corrupt store in-process
def test_corrupt_metadata_db_is_explained(tmp_path):
    if not (TFDS_DIR / "cifar10").is_dir():
        pytest.skip(f"shared TFDS data dir not found at {TFDS_DIR}")
    corrupt = tmp_path / "metadata.sqlite"
    corrupt.write_bytes(b"garbage, not sqlite " * 200)
    result = run_pipeline(tmp_path / "p", f"--metadata_db={corrupt}")
    assert result.returncode == 1
    assert f"Cannot use {corrupt} as the metadata store" in result.stderr
    lineage = run_cli("pipeline.lineage", f"--metadata_db={corrupt}")
    assert lineage.returncode != 0 and "corrupt" in lineage.stderr


def test_paper_scale_flagfile_is_valid(tmp_path):
    if not (TFDS_DIR / "cifar10").is_dir():
        pytest.skip(f"shared TFDS data dir not found at {TFDS_DIR}")
    result = run_cli("pipeline.run", f"--flagfile={REPO / 'configs' / 'pipeline_cifar10.flags'}",
                     f"--data_dir={TFDS_DIR}", f"--pipeline_root={tmp_path / 'p'}", "--dry_run")
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert [line.split(":")[0] for line in lines] == ["ExampleGen", "Trainer", "Evaluator",
                                                       "Pusher"]
    assert "'depth': 18" in lines[1] and "'autoattack'" in lines[2]
    assert not (tmp_path / "p").exists()


@pytest.mark.slow
def test_pipeline_on_two_cpu_replicas(tmp_path):
    """Tuner, Trainer and Evaluator under MirroredStrategy, with a validation set whose last
    batch is short."""
    if not (TFDS_DIR / "cifar10").is_dir():
        pytest.skip(f"shared TFDS data dir with cifar10 not found at {TFDS_DIR}")
    root = tmp_path / "pipeline"
    result = run_pipeline(root, *QUICK, "--val_subset=100", "--eval_batch_size=64",
                          "--strategy=mirrored", "--cpu_replicas=2")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "split over 2 replicas" in result.stdout
    statuses, _ = executions(root)
    assert statuses[1] == {name: "complete" for name in COMPONENTS}
    [evaluation_dir] = (root / "Evaluator" / "evaluation").iterdir()
    report = json.loads((evaluation_dir / "evaluation.json").read_text())
    assert report["replicas"] == 2 and report["n_examples"] == 100

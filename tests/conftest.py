"""Shared pytest setup: quiet TensorFlow, deterministic seeds, the shared data dir."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import json
import pathlib
import socket
import subprocess

import keras
import numpy as np
import pytest

SHARED_TFDS_DIR = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "datasets" / "tfds"


@pytest.fixture(autouse=True)
def _seed_everything():
    keras.utils.set_random_seed(0)
    yield


@pytest.fixture
def shared_tfds_dir():
    """The prepared TFDS data dir beside the checkout; tests that need real data skip without it."""
    if not (SHARED_TFDS_DIR / "cifar10").is_dir():
        pytest.skip(f"shared TFDS data dir not found at {SHARED_TFDS_DIR}")
    return str(SHARED_TFDS_DIR)


@pytest.fixture
def free_ports():
    """`free_ports(n)`: n TCP ports on 127.0.0.1 free right now (for localhost clusters)."""

    def allocate(count):
        sockets = [socket.socket() for _ in range(count)]
        try:
            for sock in sockets:
                sock.bind(("127.0.0.1", 0))
            return [sock.getsockname()[1] for sock in sockets]
        finally:
            for sock in sockets:
                sock.close()

    return allocate


@pytest.fixture
def run_worker_cluster(free_ports):
    """`run_worker_cluster(command, cwd, env, count=2)`: starts `count` processes, worker i running
    `command(i)` with a TF_CONFIG for a localhost cluster of `count` workers, and returns their
    `(returncode, stdout, stderr)` once all have ended (10 minutes at most)."""

    def run(command, cwd, env, count=2):
        workers = [f"127.0.0.1:{port}" for port in free_ports(count)]
        processes = []
        for index in range(count):
            tf_config = json.dumps({"cluster": {"worker": workers},
                                    "task": {"type": "worker", "index": index}})
            processes.append(subprocess.Popen(
                command(index), cwd=cwd, env={**env, "TF_CONFIG": tf_config},
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        try:
            outputs = [process.communicate(timeout=600) for process in processes]
        finally:
            for process in processes:
                if process.poll() is None:
                    process.kill()
        return [(process.returncode, stdout, stderr)
                for process, (stdout, stderr) in zip(processes, outputs)]

    return run


def train_prototype_mlp(n_test, shape=(8, 8, 3), num_classes=10):
    """A tiny MLP trained on `num_classes` noisy prototypes of `shape` images in [0, 1]: a model
    with real logits and near-perfect clean accuracy in seconds, for the attack tests.

    Returns:
        `(model, x_test, y_test)` with `n_test` fresh test examples (float32, int32).
    """
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    prototypes = rng.uniform(0.2, 0.8, size=(num_classes,) + shape).astype("float32")

    def sample(n):
        y = rng.integers(0, num_classes, n)
        x = np.clip(prototypes[y] + rng.normal(0.0, 0.1, (n,) + shape), 0.0, 1.0).astype("float32")
        return x, y.astype("int32")

    x_train, y_train = sample(2000)
    x_test, y_test = sample(n_test)
    model = keras.Sequential([
        keras.Input(shape), keras.layers.Flatten(), keras.layers.Dense(32, activation="relu"),
        keras.layers.Dense(num_classes)])
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x_train, y_train, epochs=5, batch_size=64, verbose=0)
    return model, x_test, y_test


@pytest.fixture(scope="session")
def prototype_mlp():
    """`prototype_mlp(n_test, shape, num_classes)`: see `train_prototype_mlp`."""
    return train_prototype_mlp

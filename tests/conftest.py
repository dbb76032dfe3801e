"""Shared pytest setup: quiet TensorFlow, deterministic seeds, the shared data dir."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pathlib
import socket

import keras
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

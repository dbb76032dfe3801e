"""Atomic file writes: a crash or kill leaves either the old file or the new one, never half of one."""

import json
import os
import tempfile


def atomic_write_text(path, text):
    """Writes `text` to `path` via a temporary file in the same directory and `os.replace`."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_bytes(path, data):
    """Writes `data` (bytes) to `path` via a temporary file in the same directory and `os.replace`."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=os.path.basename(path))
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise


def atomic_write_json(path, value):
    """`atomic_write_text` of `value` as indented JSON."""
    atomic_write_text(path, json.dumps(value, indent=2, sort_keys=False) + "\n")


def atomic_save_model(model, path):
    """`model.save(path)` (a `.keras` file) through a temporary file and `os.replace`."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    temporary = os.path.join(directory, f".tmp-{os.getpid()}-{os.path.basename(path)}")
    try:
        model.save(temporary)
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise


def atomic_save_figure(figure, path, **savefig_kwargs):
    """`figure.savefig(path, **savefig_kwargs)` (a PNG) through a temporary file and `os.replace`.
    The caller closes the figure."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=".png")
    os.close(handle)
    try:
        figure.savefig(temporary, format="png", **savefig_kwargs)
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise

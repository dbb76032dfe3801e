"""Content fingerprints, the code version and cache keys.

A cache key is the hash of everything that determines a component's outputs: its name, its
parameters, the fingerprints of its input artifacts and the code version (a hash of the source of
`arat_tf` and `pipeline`). Equal keys mean "the outputs would be the same", so the cached ones are
reused.
"""

import hashlib
import json
import os
import subprocess

_PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CODE_PACKAGES = ("arat_tf", "pipeline")


def _sha256():
    return hashlib.sha256()


def file_fingerprint(path, digest=None):
    """SHA-256 of a file's bytes (fed into `digest` if given)."""
    digest = digest or _sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def directory_fingerprint(directory):
    """SHA-256 over the relative paths and bytes of every file under `directory`, in sorted order.

    Names and contents only: copying or moving the directory keeps its fingerprint, touching a
    file without changing it too.
    """
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"Cannot fingerprint {directory}: not a directory.")
    digest = _sha256()
    for root, dirs, files in os.walk(directory):
        dirs.sort()
        for name in sorted(files):
            path = os.path.join(root, name)
            digest.update(os.path.relpath(path, directory).encode() + b"\0")
            file_fingerprint(path, digest)
            digest.update(b"\0")
    return digest.hexdigest()


def code_version():
    """Hash of every `.py` file of the `arat_tf` and `pipeline` packages (names and contents).

    A change anywhere in the code therefore invalidates every cached execution: coarse, but it
    never reuses an output the current code would compute differently.
    """
    digest = _sha256()
    for package in CODE_PACKAGES:
        base = os.path.join(_PACKAGE_ROOT, package)
        for root, dirs, files in os.walk(base):
            dirs[:] = sorted(d for d in dirs if d != "__pycache__")
            for name in sorted(files):
                if name.endswith(".py"):
                    path = os.path.join(root, name)
                    digest.update(os.path.relpath(path, _PACKAGE_ROOT).encode() + b"\0")
                    file_fingerprint(path, digest)
    return digest.hexdigest()


def git_commit():
    """`<commit>` or `<commit>+dirty` of the checkout holding the code; None outside git.

    Recorded for lineage only: the cache key uses `code_version`, which also covers uncommitted
    edits.
    """
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=_PACKAGE_ROOT, text=True,
                                capture_output=True, timeout=10, check=True).stdout.strip()
        status = subprocess.run(["git", "status", "--porcelain", "--", *CODE_PACKAGES],
                                cwd=_PACKAGE_ROOT, text=True, capture_output=True, timeout=10,
                                check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("+dirty" if status else "")


def canonical_json(value):
    """The JSON text hashed for parameters: sorted keys, no whitespace differences."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


def cache_key(component, parameters, input_fingerprints, code):
    """The cache key of one component execution (see the module docstring)."""
    payload = canonical_json({
        "component": component, "parameters": parameters,
        "inputs": dict(sorted(input_fingerprints.items())), "code": code,
    })
    return hashlib.sha256(payload.encode()).hexdigest()

"""Starting a training run from saved weights (`--init_from`), and ARAT's predictor-head file.

A warm start copies the weights of a `.keras` classifier (e.g. one converted from the ARAT
authors' checkpoint by `arat_tf.import_torch`, or another run's `model.keras`) into the run's
freshly built classifier, and, for ARAT, the predictor heads from `predictor_heads.npz` beside it
when it is there. The optimizer, the epoch counter and the schedule start fresh: the source holds
no optimizer state (the authors' checkpoints do not either). To continue one of arat_tf's own
runs exactly, use `--resume` instead.
"""

import io
import os

import numpy as np

from arat_tf.io_utils import atomic_write_bytes

MODEL_FILE = "model.keras"
PREDICTOR_HEADS_FILE = "predictor_heads.npz"
# Config entries that may differ between the source and the run (they do not change the weights).
_IGNORED_CONFIG_KEYS = ("name", "trainable", "dtype", "synchronized_bn")


class WarmStartError(ValueError):
    """The `--init_from` source is missing, unreadable, or holds a different architecture."""


def predictor_head_arrays(predictors):
    """`{"<tap>/<variable path within its head>": numpy array}` of every predictor head variable."""
    return {f"{tap}/{_relative_path(variable)}": np.asarray(variable)
            for tap, head in predictors.items() for variable in head.weights}


def save_predictor_heads(predictors, path):
    """Writes ARAT's predictor heads (`{tap: Predictor}`) to an `.npz` file, atomically."""
    buffer = io.BytesIO()
    np.savez(buffer, **predictor_head_arrays(predictors))
    atomic_write_bytes(path, buffer.getvalue())


def load_predictor_heads(predictors, path):
    """Sets ARAT's predictor heads from a file of `save_predictor_heads`.

    Raises:
        WarmStartError: the file is unreadable or its heads do not fit (names the first key).
    """
    try:
        with np.load(path) as stored:
            arrays = {key: stored[key] for key in stored.files}
    except (OSError, ValueError) as error:
        raise WarmStartError(f"cannot read the predictor heads {path}: {error}") from None
    targets = {f"{tap}/{_relative_path(variable)}": variable
               for tap, head in predictors.items() for variable in head.weights}
    if set(arrays) != set(targets):
        different = sorted(set(arrays) ^ set(targets))
        raise WarmStartError(
            f"the predictor heads in {path} do not fit this model's taps "
            f"({len(different)} key(s) differ, first {different[0]!r})."
        )
    for key, variable in targets.items():
        if tuple(arrays[key].shape) != tuple(variable.shape):
            raise WarmStartError(
                f"{path}: {key!r} has shape {arrays[key].shape}, the head expects "
                f"{tuple(variable.shape)}."
            )
    for key, variable in targets.items():
        variable.assign(arrays[key])


def _comparable_config(model):
    config = dict(model.get_config())
    for key in _IGNORED_CONFIG_KEYS:
        config.pop(key, None)
    return config


def _relative_path(variable):
    """A variable's path below its model (the model's own name differs between instances)."""
    return variable.path.split("/", 1)[-1]


def source_model_path(init_from):
    """The `.keras` file `init_from` names: the path itself, or `<dir>/model.keras`."""
    return os.path.join(init_from, MODEL_FILE) if os.path.isdir(init_from) else init_from


def warm_start(classifier, init_from, predictors=None):
    """Copies the weights saved at `init_from` into `classifier` (and `predictors`).

    Args:
        classifier: the run's built `BranchedClassifier`.
        init_from: a `.keras` file, or a directory holding `model.keras` (and, optionally,
            `predictor_heads.npz`).
        predictors: an `AratTrainer`'s `{tap: Predictor}` to fill from `predictor_heads.npz`, or
            None.

    Returns:
        A list of notes for the user (e.g. "predictor heads start from scratch").

    Raises:
        WarmStartError: missing or unreadable source, or another architecture (the message names
            the first differing config entry).
    """
    from arat_tf.run_files import ModelFileError, read_classifier

    model_path = source_model_path(init_from)
    if not os.path.isfile(model_path):
        raise WarmStartError(f"--init_from: no model file at {model_path}.")
    try:
        source = read_classifier(model_path)
    except ModelFileError as error:
        raise WarmStartError(f"--init_from: {error}") from None
    wanted, found = _comparable_config(classifier), _comparable_config(source)
    if type(source) is not type(classifier) or wanted != found:
        key = next((k for k in sorted(set(wanted) | set(found)) if wanted.get(k) != found.get(k)),
                   "class")
        raise WarmStartError(
            f"--init_from: {model_path} holds a {type(source).__name__} with {key}="
            f"{found.get(key)!r}; this run builds a {type(classifier).__name__} with {key}="
            f"{wanted.get(key)!r}. Pass the flags that build the saved architecture."
        )
    if [_relative_path(v) for v in classifier.weights] != [_relative_path(v) for v in source.weights]:
        raise WarmStartError(f"--init_from: the variables of {model_path} do not match this "
                             f"run's classifier one for one.")
    for target, value in zip(classifier.weights, source.weights):
        target.assign(np.asarray(value))
    notes = [f"initialised from {model_path}"]
    if predictors:
        heads = os.path.join(os.path.dirname(os.path.abspath(model_path)), PREDICTOR_HEADS_FILE)
        if os.path.isfile(heads):
            load_predictor_heads(predictors, heads)
            notes.append(f"predictor heads from {heads}")
        else:
            notes.append(f"no {PREDICTOR_HEADS_FILE} beside it: the predictor heads start from "
                         f"scratch")
    return notes

"""Reading a run directory's files in the command-line tools (`evaluate`, `export`).

One way to load them and one set of messages: a missing, corrupt or foreign file ends the command
with `error: ...` (a `SystemExit`), never a traceback, and nothing has been written yet.
"""

import json
import os


def read_json_object(path, what):
    """The JSON object at `path`; None if there is no such file; a clean exit if it is corrupt.

    Args:
        path: the file (e.g. `run_dir/config.json`).
        what: how the message names it ("run config", "evaluation").
    """
    if not os.path.exists(path):
        return None
    try:
        with open(path) as stream:
            value = json.load(stream)
    except (OSError, ValueError) as error:
        raise SystemExit(f"error: cannot read the {what} {path}: {error}") from None
    if not isinstance(value, dict):
        raise SystemExit(f"error: the {what} {path} is not a JSON object.")
    return value


class ModelFileError(ValueError):
    """A model file is missing, unreadable, or not an arat_tf classifier."""


def read_classifier(model_path):
    """The `BranchedClassifier` saved at `model_path` (a `.keras` file of `arat_tf.train`).

    Raises:
        ModelFileError: the file is missing, corrupt or holds another kind of model.
    """
    if not os.path.isfile(model_path):
        raise ModelFileError(f"model file not found: {model_path}")
    import keras

    import arat_tf  # noqa: F401  (registers the custom objects for keras.models.load_model)
    from arat_tf.models import BranchedClassifier

    try:
        model = keras.models.load_model(model_path, compile=False)
    except Exception as error:  # Keras raises many types for corrupt/foreign files.
        message = str(error).strip().splitlines()
        raise ModelFileError(
            f"cannot load the model {model_path}: {type(error).__name__}: "
            f"{message[0] if message else ''}"
        ) from None
    if not isinstance(model, BranchedClassifier):
        raise ModelFileError(
            f"{model_path} holds a {type(model).__name__}, not an arat_tf classifier "
            "(a model.keras written by arat_tf.train)."
        )
    return model


def load_classifier(model_path):
    """`read_classifier` for the command-line tools: a bad file ends the command cleanly."""
    try:
        return read_classifier(model_path)
    except ModelFileError as error:
        raise SystemExit(f"error: {error}") from None

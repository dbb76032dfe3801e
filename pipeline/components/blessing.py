"""The blessing rules: may a model be pushed? Pure functions, shared by the Evaluator (which
decides) and the Pusher (which re-checks the written blessing before it pushes anything).

A model is blessed when all of these hold:

1. clean accuracy >= `min_clean_accuracy` and robust accuracy >= `min_robust_accuracy`;
2. if a model is currently pushed (the baseline), neither accuracy is more than `tolerance` below
   the baseline's, measured on the same test examples with the same attacks.
"""

import json
import os

BLESSING_FILE = "blessing.json"
BLESSED_MARKER = "BLESSED"
NOT_BLESSED_MARKER = "NOT_BLESSED"


class BlessingError(RuntimeError):
    """A blessing is missing, unreadable, negative, or about another model: nothing is pushed."""


def decide_blessing(clean, robust, *, min_clean_accuracy, min_robust_accuracy, tolerance,
                    baseline=None):
    """Returns `(blessed, reasons)`; `baseline` is None or `{"clean", "robust", "version"}`."""
    failures, passes = [], []
    for name, value, minimum in (("clean", clean, min_clean_accuracy),
                                 ("robust", robust, min_robust_accuracy)):
        text = f"{name} accuracy {value:.4f} {{}} the threshold {minimum:.4f}"
        (passes if value >= minimum else failures).append(
            text.format(">=" if value >= minimum else "<"))
    if baseline is None:
        passes.append("no model is pushed yet: nothing to compare with")
    else:
        for name, value in (("clean", clean), ("robust", robust)):
            reference = baseline[name]
            text = (f"{name} accuracy {value:.4f} vs {reference:.4f} of the pushed version "
                    f"{baseline.get('version')} (tolerance {tolerance:.4f})")
            (passes if value >= reference - tolerance else failures).append(
                ("not worse: " if value >= reference - tolerance else "worse: ") + text)
    return not failures, failures or passes


def read_blessing(blessing_artifact, model_artifact):
    """The blessing.json of `blessing_artifact`, checked to bless `model_artifact`.

    Raises:
        BlessingError: the file is missing or corrupt, its marker file disagrees, or it was written
            for another model (fingerprint).
    """
    path = blessing_artifact.path(BLESSING_FILE)
    try:
        with open(path) as stream:
            blessing = json.load(stream)
    except (OSError, ValueError) as error:
        raise BlessingError(f"Cannot read the blessing {path}: {error}. Not pushing.") from None
    marker = BLESSED_MARKER if blessing.get("blessed") is True else NOT_BLESSED_MARKER
    if not os.path.exists(blessing_artifact.path(marker)):
        raise BlessingError(f"The blessing {path} says blessed={blessing.get('blessed')!r} but "
                            f"{marker} is missing beside it. Not pushing.")
    if blessing.get("model_fingerprint") != model_artifact.fingerprint:
        raise BlessingError(
            f"The blessing {path} is for the model with fingerprint "
            f"{str(blessing.get('model_fingerprint'))[:12]}, not {model_artifact.describe()}. "
            f"Not pushing.")
    return blessing

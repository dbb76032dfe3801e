"""Typed artifacts: what one pipeline component hands to the next.

An artifact is a directory (`uri`) written once by one component execution and never changed,
plus a few `properties` (small JSON values later components and the report read without opening
the directory) and a content `fingerprint` (see `pipeline.fingerprints`). Downstream cache keys
are built from fingerprints, so a component reruns exactly when the CONTENT of its inputs changes,
not when a path or a timestamp does.
"""

import dataclasses
import os

EXAMPLES = "Examples"
HYPERPARAMETERS = "HyperParameters"
MODEL = "Model"
MODEL_EVALUATION = "ModelEvaluation"
MODEL_BLESSING = "ModelBlessing"
PUSHED_MODEL = "PushedModel"

ARTIFACT_TYPES = {
    EXAMPLES: "TFRecord splits train/val/test of one dataset, with counts and label histograms "
              "(stats.json).",
    HYPERPARAMETERS: "The best trial of a keras-tuner search (best_hyperparameters.json).",
    MODEL: "An arat_tf training run directory (model.keras, config.json, metrics.csv, ...).",
    MODEL_EVALUATION: "Clean and robust accuracy on the test split (evaluation.json).",
    MODEL_BLESSING: "Whether a model may be pushed, and why (blessing.json, BLESSED or "
                    "NOT_BLESSED).",
    PUSHED_MODEL: "The record of a push (push.json): the serving version written, or why none was.",
}


@dataclasses.dataclass(frozen=True)
class Artifact:
    """One artifact as recorded in the metadata store.

    Attributes:
        type_name: one of `ARTIFACT_TYPES`.
        uri: the directory holding the artifact's files.
        properties: JSON-serialisable facts about it (counts, accuracies, the blessing, ...).
        fingerprint: content hash of the directory.
        id: the metadata store's id (None before it is recorded).
    """

    type_name: str
    uri: str
    properties: dict
    fingerprint: str
    id: int = None

    def __post_init__(self):
        if self.type_name not in ARTIFACT_TYPES:
            raise ValueError(f"Unknown artifact type {self.type_name!r}; expected one of "
                             f"{', '.join(ARTIFACT_TYPES)}.")

    def path(self, *parts):
        """A file inside the artifact directory."""
        return os.path.join(self.uri, *parts)

    def describe(self):
        """`Model #5 (fingerprint 1a2b3c4d) at <uri>` for logs and lineage."""
        number = f" #{self.id}" if self.id is not None else ""
        return f"{self.type_name}{number} (fingerprint {self.fingerprint[:12]}) at {self.uri}"

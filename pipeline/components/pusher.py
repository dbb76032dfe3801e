"""`Pusher`: exports a blessed model as a new TF Serving version, and never anything else.

The Pusher reads the blessing file itself (`blessing.read_blessing`) rather than trusting that the
runner only calls it after a successful Evaluator: the blessing must exist, be positive and name
this very model (fingerprint). A negative blessing is a normal outcome (the output records
`pushed: false` and why); a missing, corrupt or mismatched one is an error.

The export is `arat_tf.serving.export_saved_model`: `<serving_dir>/versions/<N>/` (the next free
version), written to a temporary directory and renamed, with a model card that carries the
evaluation and the pipeline lineage.

Output `pushed_model` (type PushedModel): push.json (pushed, version, serving_path, the model's
fingerprint and evaluation), the record later Evaluators use as their baseline.
"""

import json
import os

from arat_tf.io_utils import atomic_write_json
from pipeline.artifacts import MODEL, MODEL_BLESSING, MODEL_EVALUATION, PUSHED_MODEL
from pipeline.components.base import Component, InputSpec
from pipeline.components.blessing import read_blessing


class Pusher(Component):
    """Pushes the model when blessed.

    Args:
        model, blessing, evaluation: `OutputRef`s to the Trainer's model and the Evaluator's
            outputs.
        branch: the BN branch baked into the export (the evaluated one).
        serving_dir: the serving base directory (runtime).
    """

    INPUTS = {"model": InputSpec(MODEL), "blessing": InputSpec(MODEL_BLESSING),
              "evaluation": InputSpec(MODEL_EVALUATION)}
    OUTPUTS = {"pushed_model": PUSHED_MODEL}

    def __init__(self, *, model, blessing, evaluation, branch, serving_dir, name=None):
        super().__init__({"branch": branch, "serving_dir": os.path.abspath(serving_dir)},
                         inputs={"model": model, "blessing": blessing, "evaluation": evaluation},
                         name=name)

    def output_still_valid(self, artifact):
        """A push whose version directory was deleted is pushed again."""
        return not artifact.properties.get("pushed") or os.path.isdir(
            artifact.properties.get("serving_path", ""))

    def execute(self, inputs, outputs):
        model, evaluation = inputs["model"], inputs["evaluation"]
        blessing = read_blessing(inputs["blessing"], model)
        record = {
            "pushed": False, "serving_dir": self.parameters["serving_dir"],
            "model_fingerprint": model.fingerprint, "source_model": model.path("model.keras"),
            "branch": self.parameters["branch"],
            "clean_accuracy": evaluation.properties["clean_accuracy"],
            "robust_accuracy": evaluation.properties["robust_accuracy"],
            "evaluation_key": evaluation.properties["evaluation_key"],
            "blessing_reasons": blessing["reasons"],
        }
        if blessing["evaluation_key"] != record["evaluation_key"]:
            raise RuntimeError("The blessing and the evaluation given to the Pusher come from "
                               "different evaluations. Not pushing.")
        if not blessing["blessed"]:
            record["reason"] = "not blessed: " + "; ".join(blessing["reasons"])
            print(f"    not pushing: {record['reason']}")
        else:
            record.update(self._push(model, evaluation))
        atomic_write_json(os.path.join(outputs["pushed_model"].path, "push.json"), record)
        return {"pushed_model": record}

    def _push(self, model, evaluation):
        from arat_tf import serving
        from arat_tf.run_files import load_classifier, read_json_object

        classifier = load_classifier(model.path("model.keras"))
        with open(evaluation.path("evaluation.json")) as stream:
            report = json.load(stream)
        card = serving.build_model_card(
            classifier, branch=self.parameters["branch"], model_path=model.path("model.keras"),
            config=read_json_object(model.path("config.json"), "run config"), evaluation=report,
            run_dir=model.uri)
        card["pipeline"] = {"model_artifact_id": model.id, "model_fingerprint": model.fingerprint,
                            "evaluation_artifact_id": evaluation.id,
                            "evaluation_key": evaluation.properties["evaluation_key"]}
        path = serving.export_saved_model(classifier, self.parameters["serving_dir"],
                                          branch=self.parameters["branch"], model_card=card)
        version = int(os.path.basename(path))
        print(f"    pushed version {version} to {path}")
        return {"pushed": True, "version": version, "serving_path": os.path.abspath(path)}

"""`Evaluator`: clean and robust accuracy on the test split, and the blessing.

Robust accuracy is `arat_tf.evaluation.evaluate_robustness` with the chosen attacks run in order
(AutoAttack's protocol: per-example worst case) on the model's `eval_branch`, at the training eps
and threat model. The blessing (see `blessing.py`) compares it with thresholds and with the
currently pushed model: the latest PushedModel in the serving dir that came from ANOTHER model.
Excluding the candidate itself keeps the baseline stable when the same model is evaluated again,
so an unchanged pipeline stays fully cached after its model was pushed.

Baseline numbers: when the pushed model was evaluated with identical settings (same test examples
fingerprint, attacks, eps, norm, branch, seed and batch size: the "evaluation key"), its recorded
accuracies are used; otherwise its source model.keras is evaluated again here, on the same examples
and attacks. If neither is possible the model is not blessed, and the reason says so.

Outputs: `evaluation` (ModelEvaluation: evaluation.json) and `blessing` (ModelBlessing:
blessing.json plus an empty BLESSED or NOT_BLESSED file, as TFX writes).
"""

import hashlib
import json
import os

from arat_tf.io_utils import atomic_write_json, atomic_write_text
from pipeline.artifacts import EXAMPLES, MODEL, MODEL_BLESSING, MODEL_EVALUATION, PUSHED_MODEL
from pipeline.components.base import Component, InputSpec
from pipeline.components.blessing import (
    BLESSED_MARKER, BLESSING_FILE, NOT_BLESSED_MARKER, decide_blessing,
)
from pipeline.components.example_gen import tfrecord_split


def evaluation_key(examples_fingerprint, settings):
    """Identifies an evaluation protocol: equal keys give comparable accuracies."""
    payload = json.dumps({"examples": examples_fingerprint, **settings}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


def latest_pushed_baseline(store, serving_dir, candidate_fingerprint):
    """The latest push to `serving_dir` of a model other than the candidate, still on disk."""
    serving_dir = os.path.abspath(serving_dir)
    for artifact in reversed(store.artifacts(PUSHED_MODEL)):
        properties = artifact.properties
        if (properties.get("pushed") and properties.get("serving_dir") == serving_dir
                and properties.get("model_fingerprint") != candidate_fingerprint
                and os.path.isdir(properties.get("serving_path", ""))):
            return artifact
    return None


class Evaluator(Component):
    """Evaluates the trained model and decides the blessing.

    Args:
        examples, model: `OutputRef`s to ExampleGen's examples and the Trainer's model.
        attacks: attack and suite names (`arat_tf.evaluation.resolve_attacks`).
        eps, norm, branch: threat model and BN branch (the training ones).
        seed, batch_size: of the attacks.
        mixed_precision: the dtype policy the model runs under (`arat_tf.precision`).
        min_clean_accuracy, min_robust_accuracy, tolerance: the blessing thresholds.
        serving_dir: where the Pusher pushes; its latest push is the baseline (runtime, resolved
            from the metadata store).
        strategy: a prebuilt `tf.distribute.Strategy` whose replicas share every batch's attacks
            (runtime: the numbers do not depend on it beyond the replicas' random starts), or None.
    """

    INPUTS = {"examples": InputSpec(EXAMPLES), "model": InputSpec(MODEL),
              "baseline": InputSpec(PUSHED_MODEL, optional=True)}
    OUTPUTS = {"evaluation": MODEL_EVALUATION, "blessing": MODEL_BLESSING}

    def __init__(self, *, examples, model, attacks, eps, norm, branch, seed, batch_size,
                 min_clean_accuracy, min_robust_accuracy, tolerance, serving_dir, strategy=None,
                 mixed_precision="off", name=None):
        super().__init__(
            {"attacks": list(attacks), "eps": eps, "norm": norm, "branch": branch, "seed": seed,
             "batch_size": batch_size, "mixed_precision": mixed_precision,
             "min_clean_accuracy": min_clean_accuracy,
             "min_robust_accuracy": min_robust_accuracy, "tolerance": tolerance},
            runtime={"serving_dir": os.path.abspath(serving_dir)},
            inputs={"examples": examples, "model": model}, name=name)
        self.strategy = strategy

    def resolved_input(self, key):
        return key == "baseline"

    def resolve_inputs(self, store, inputs):
        baseline = latest_pushed_baseline(store, self.runtime["serving_dir"],
                                          inputs["model"].fingerprint)
        return {"baseline": baseline} if baseline is not None else {}

    def _settings(self):
        return {key: self.parameters[key]
                for key in ("attacks", "eps", "norm", "branch", "seed", "batch_size",
                            "mixed_precision")}

    def _evaluate(self, model_path, examples):
        import tensorflow as tf

        from arat_tf import precision
        from arat_tf.attacks import make_forward
        from arat_tf.data import dataset_spec, make_eval_dataset
        from arat_tf.evaluation import evaluate_robustness, format_report, resolve_attacks
        from arat_tf.run_files import load_classifier

        dataset = examples.properties["dataset"]
        spec = dataset_spec(dataset)
        attacks = resolve_attacks(self.parameters["attacks"], spec.num_classes,
                                  self.parameters["norm"])
        strategy = self.strategy or tf.distribute.get_strategy()
        with strategy.scope(), precision.dtype_policy(self.parameters["mixed_precision"]):
            classifier = load_classifier(model_path)
        data = make_eval_dataset(dataset, batch_size=self.parameters["batch_size"],
                                 split=tfrecord_split(examples, "test"))
        forward = tf.function(make_forward(classifier, branch=self.parameters["branch"]))
        report = evaluate_robustness(forward, data, attacks, eps=self.parameters["eps"],
                                     norm=self.parameters["norm"], seed=self.parameters["seed"],
                                     progress=False, strategy=strategy)
        # The per-attack results already sit under "attacks": the names go in "suite".
        report.update({key: value for key, value in self._settings().items() if key != "attacks"},
                      model=os.path.abspath(model_path), dataset=dataset, split="test",
                      suite="+".join(self.parameters["attacks"]))
        print(format_report(report))
        return report

    def _baseline_accuracies(self, baseline, examples, key):
        """`({"clean", "robust", "version", "how"}, None)` or `(None, why not)`."""
        if baseline is None:
            return None, None
        properties = baseline.properties
        version = properties.get("version")
        if properties.get("evaluation_key") == key:
            return {"clean": properties["clean_accuracy"], "robust": properties["robust_accuracy"],
                    "version": version, "how": "recorded evaluation (identical settings)"}, None
        source = properties.get("source_model")
        if not source or not os.path.isfile(source):
            return None, (f"the pushed version {version} was evaluated with other settings and its "
                          f"source model {source} is gone: cannot compare, so not blessing")
        print(f"    re-evaluating the pushed version {version} ({source}) on the same examples")
        report = self._evaluate(source, examples)
        return {"clean": report["clean_accuracy"], "robust": report["robust_accuracy"],
                "version": version, "how": "re-evaluated on the same examples and attacks"}, None

    def execute(self, inputs, outputs):
        examples, model = inputs["examples"], inputs["model"]
        key = evaluation_key(examples.fingerprint, self._settings())
        report = self._evaluate(model.path("model.keras"), examples)
        report["evaluation_key"] = key
        baseline, no_comparison = self._baseline_accuracies(inputs.get("baseline"), examples, key)
        clean, robust = report["clean_accuracy"], report["robust_accuracy"]
        blessed, reasons = decide_blessing(
            clean, robust, min_clean_accuracy=self.parameters["min_clean_accuracy"],
            min_robust_accuracy=self.parameters["min_robust_accuracy"],
            tolerance=self.parameters["tolerance"], baseline=baseline)
        if no_comparison:
            blessed, reasons = False, [no_comparison]
        blessing = {
            "blessed": blessed, "reasons": reasons, "model_fingerprint": model.fingerprint,
            "model_uri": model.uri, "evaluation_key": key, "clean_accuracy": clean,
            "robust_accuracy": robust, "baseline": baseline,
            "thresholds": {name: self.parameters[name] for name in
                           ("min_clean_accuracy", "min_robust_accuracy", "tolerance")},
        }
        atomic_write_json(os.path.join(outputs["evaluation"].path, "evaluation.json"), report)
        blessing_dir = outputs["blessing"].path
        atomic_write_json(os.path.join(blessing_dir, BLESSING_FILE), blessing)
        atomic_write_text(os.path.join(blessing_dir,
                                       BLESSED_MARKER if blessed else NOT_BLESSED_MARKER), "")
        print(f"    {'BLESSED' if blessed else 'NOT BLESSED'}: {'; '.join(reasons)}")
        return {
            "evaluation": {
                "dataset": report["dataset"], "clean_accuracy": clean, "robust_accuracy": robust,
                "n_examples": report["n_examples"], "suite": report["suite"],
                "eps": report["eps"], "norm": report["norm"], "branch": report["branch"],
                "per_attack": [{"name": attack["name"],
                                "robust_accuracy": attack["robust_accuracy"]}
                               for attack in report["attacks"]],
                "evaluation_key": key, "warnings": report["warnings"],
            },
            "blessing": {"blessed": blessed, "reasons": reasons, "baseline": baseline},
        }

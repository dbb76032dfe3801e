"""The pipeline's components as they run inside a Kubeflow Pipelines (KFP v2) container.

`pipeline.kubeflow` compiles the DAG into a KFP pipeline spec whose steps are small Python
functions; each one imports this module in its container and calls one `run_*` function here,
which runs the SAME component class as the local runner (`pipeline.components`) on KFP's
artifacts. What differs from the local runner is only the bookkeeping around it:

* artifacts: a KFP input artifact's local `path` is the directory a component reads; its
  `properties` and content `fingerprint` travel in the artifact's metadata (the properties as a
  JSON string, so integers stay integers), and are written back on every output;
* no SQLite store and no cache of our own: KFP's metadata store, lineage and step cache take
  their place; an Evaluator's baseline is the newest version in the serving directory (its model
  card records the accuracies, the evaluation settings and the model's fingerprint);
* the blessing is also returned as a boolean, which the spec's `dsl.If` gates the Pusher on.

This module does not import kfp: it only reads the artifacts' `path` and `metadata`.
"""

import dataclasses
import json
import os

from pipeline.artifacts import (
    EXAMPLES, HYPERPARAMETERS, MODEL, MODEL_BLESSING, MODEL_EVALUATION, PUSHED_MODEL, Artifact,
)
from pipeline.components import Evaluator, ExampleGen, OutputLocation, OutputRef, Pusher, Trainer
from pipeline.components import Tuner
from pipeline.fingerprints import directory_fingerprint, file_fingerprint

PROPERTIES_KEY = "arat_properties"
FINGERPRINT_KEY = "fingerprint"
TYPE_KEY = "arat_type"
# A placeholder for wired inputs: the KFP spec does the wiring, the component only needs to know
# that the input is there.
_WIRED = OutputRef("kfp", "input")


def from_kfp(kfp_artifact, type_name):
    """Our `Artifact` for a KFP input artifact (its directory, properties and fingerprint)."""
    metadata = dict(kfp_artifact.metadata or {})
    properties = metadata.get(PROPERTIES_KEY)
    properties = json.loads(properties) if isinstance(properties, str) else {}
    fingerprint = metadata.get(FINGERPRINT_KEY) or directory_fingerprint(kfp_artifact.path)
    return Artifact(type_name=type_name, uri=kfp_artifact.path, properties=properties,
                    fingerprint=fingerprint)


def _execute(component, inputs, outputs, output_types):
    """Runs `component` on our artifacts; returns its output properties by name."""
    locations = {}
    for name, kfp_artifact in outputs.items():
        os.makedirs(kfp_artifact.path, exist_ok=True)
        locations[name] = OutputLocation(path=kfp_artifact.path, final_uri=kfp_artifact.path)
    properties = component.execute(inputs, locations)
    for name, kfp_artifact in outputs.items():
        kfp_artifact.metadata[TYPE_KEY] = output_types[name]
        kfp_artifact.metadata[PROPERTIES_KEY] = json.dumps(properties.get(name, {}))
        kfp_artifact.metadata[FINGERPRINT_KEY] = directory_fingerprint(kfp_artifact.path)
    return properties


def _typed(values, dataclass):
    """`values` with the integer fields of `dataclass` made integers again: KFP passes dict
    parameters as protobuf Structs, whose numbers are all floats."""
    integers = {field.name for field in dataclasses.fields(dataclass) if field.type in (int, "int")}
    return {key: int(value) if key in integers and isinstance(value, float) else value
            for key, value in values.items()}


def _training(training):
    from arat_tf.config import TrainConfig

    return _typed(training, TrainConfig)


def run_example_gen(*, dataset, splits, subsets, data_dir, download, examples):
    subsets = {split: int(float(count)) for split, count in subsets.items()}  # "2048.0" (a Struct)
    component = ExampleGen(dataset=dataset, splits=splits, subsets=subsets, data_dir=data_dir,
                           download=download)
    _execute(component, {}, {"examples": examples}, {"examples": EXAMPLES})


def _strategy(name, cpu_replicas):
    """The `tf.distribute` strategy `name`, built before TensorFlow runs its first op."""
    from arat_tf.distribution import make_strategy

    return None if name == "default" else make_strategy(name, cpu_replicas)


def run_tuner(*, training, strategy, cpu_replicas, verbose, algorithm, max_trials, objective, seed,
              search_space, examples, best_hyperparameters):
    from arat_tf.tuning import SearchSpace

    component = Tuner(examples=_WIRED, training=_training(training), algorithm=algorithm,
                      max_trials=max_trials, objective=objective, seed=seed,
                      search_space=_typed(search_space, SearchSpace), verbose=verbose,
                      distribution_strategy=_strategy(strategy, cpu_replicas))
    _execute(component, {"examples": from_kfp(examples, EXAMPLES)},
             {"best_hyperparameters": best_hyperparameters},
             {"best_hyperparameters": HYPERPARAMETERS})


def run_trainer(*, training, strategy, cpu_replicas, verbose, examples, hyperparameters, model):
    """Trains; under MultiWorkerMirroredStrategy every worker runs this, the chief writes."""
    built = _strategy(strategy, cpu_replicas)
    inputs = {"examples": from_kfp(examples, EXAMPLES)}
    if hyperparameters is not None:
        inputs["hyperparameters"] = from_kfp(hyperparameters, HYPERPARAMETERS)
    component = Trainer(examples=_WIRED, hyperparameters=_WIRED if hyperparameters else None,
                        training=_training(training), verbose=verbose, strategy_name=strategy,
                        cpu_replicas=cpu_replicas, strategy=built)
    _execute(component, inputs, {"model": model}, {"model": MODEL})


def latest_serving_baseline(serving_dir, candidate_fingerprint):
    """The newest version in `serving_dir` pushed from another model, as a PushedModel artifact
    built from its model card (None if there is none)."""
    from arat_tf import serving

    for version in reversed(serving.existing_versions(serving_dir)):
        path = os.path.join(serving.versions_dir(serving_dir), str(version))
        card_path = os.path.join(path, serving.MODEL_CARD_FILE)
        try:
            with open(card_path) as stream:
                card = json.load(stream)
        except (OSError, ValueError):
            continue
        pipeline_info = card.get("pipeline") or {}
        if pipeline_info.get("model_fingerprint") == candidate_fingerprint:
            continue
        properties = {
            "pushed": True, "version": version, "serving_path": path,
            "serving_dir": os.path.abspath(serving_dir),
            "model_fingerprint": pipeline_info.get("model_fingerprint"),
            "source_model": card.get("source_model"),
            "clean_accuracy": card.get("clean_accuracy"),
            "robust_accuracy": card.get("robust_accuracy"),
            "evaluation_key": pipeline_info.get("evaluation_key"),
        }
        return Artifact(type_name=PUSHED_MODEL, uri=path, properties=properties,
                        fingerprint=file_fingerprint(card_path))
    return None


def run_evaluator(*, attacks, eps, norm, branch, seed, batch_size, mixed_precision,
                  min_clean_accuracy, min_robust_accuracy, tolerance, serving_dir, examples, model,
                  evaluation, blessing, metrics=None):
    """Evaluates and blesses; returns whether the model is blessed (the Pusher's gate)."""
    component = Evaluator(examples=_WIRED, model=_WIRED, attacks=attacks, eps=eps, norm=norm,
                          branch=branch, seed=seed, batch_size=batch_size,
                          mixed_precision=mixed_precision, min_clean_accuracy=min_clean_accuracy,
                          min_robust_accuracy=min_robust_accuracy, tolerance=tolerance,
                          serving_dir=serving_dir)
    candidate = from_kfp(model, MODEL)
    inputs = {"examples": from_kfp(examples, EXAMPLES), "model": candidate}
    baseline = latest_serving_baseline(serving_dir, candidate.fingerprint)
    if baseline is not None:
        inputs["baseline"] = baseline
    properties = _execute(component, inputs, {"evaluation": evaluation, "blessing": blessing},
                          {"evaluation": MODEL_EVALUATION, "blessing": MODEL_BLESSING})
    if metrics is not None:  # KFP's own Metrics artifact, for its UI
        for name in ("clean_accuracy", "robust_accuracy"):
            metrics.log_metric(name, float(properties["evaluation"][name]))
    return bool(properties["blessing"]["blessed"])


def run_pusher(*, branch, serving_dir, model, blessing, evaluation, pushed_model):
    component = Pusher(model=_WIRED, blessing=_WIRED, evaluation=_WIRED, branch=branch,
                       serving_dir=serving_dir)
    _execute(component, {"model": from_kfp(model, MODEL),
                         "blessing": from_kfp(blessing, MODEL_BLESSING),
                         "evaluation": from_kfp(evaluation, MODEL_EVALUATION)},
             {"pushed_model": pushed_model}, {"pushed_model": PUSHED_MODEL})

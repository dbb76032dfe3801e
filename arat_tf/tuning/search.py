"""Running a search: the keras-tuner tuner of `--tuner`, resumable, writing the outputs.

Outputs go to `<search_dir>/<project_name>/` beside keras-tuner's own state (oracle.json,
trial_*/): trials.csv, trials.json, tradeoff.png and best.flags (see `arat_tf.tuning.results`).
"""

import os

import keras_tuner as kt

from arat_tf.tuning.hypermodel import OBJECTIVE_NAME, AdversarialHyperModel
from arat_tf.tuning.results import write_outputs

TUNERS = ("random", "bayesian", "hyperband")


class _DeclaredSpaceMixin:
    """Declares the search space without building models.

    keras-tuner's default builds the hypermodel once per conditional scope to discover the space;
    for us that would load the data and build e.g. two ResNet-18s before the first trial. The
    space is fully declared by `AdversarialHyperModel.declare` (conditional scopes included).
    """

    def _populate_initial_space(self):
        hp = self.oracle.get_space()
        self.hypermodel.declare(hp)
        self.oracle.update_space(hp)


_TUNER_CLASSES = {}


def tuner_class(name):
    base = {"random": kt.RandomSearch, "bayesian": kt.BayesianOptimization,
            "hyperband": kt.Hyperband}[name]
    if name not in _TUNER_CLASSES:
        _TUNER_CLASSES[name] = type(f"Arat{base.__name__}", (_DeclaredSpaceMixin, base), {})
    return _TUNER_CLASSES[name]


def make_tuner(hypermodel, *, tuner="random", max_trials=10, executions_per_trial=1,
               search_dir="runs/tuning", project_name="search", seed=None, overwrite=False,
               distribution_strategy=None, hyperband_factor=3, max_consecutive_failed_trials=3):
    """The keras-tuner tuner; `overwrite=False` reloads a previous search in the same directory.

    Hyperband has no `max_trials`: its budget is `max_epochs` (the base config's `--epochs`) and
    `hyperband_factor`.
    """
    if tuner not in TUNERS:
        raise ValueError(f"--tuner must be one of {', '.join(TUNERS)}, got {tuner!r}")
    if max_trials < 1 or executions_per_trial < 1:
        raise ValueError("--max_trials and --executions_per_trial must be >= 1")
    common = dict(
        hypermodel=hypermodel, objective=kt.Objective(OBJECTIVE_NAME, direction="max"),
        executions_per_trial=executions_per_trial, directory=search_dir,
        project_name=project_name, seed=seed, overwrite=overwrite,
        distribution_strategy=distribution_strategy,
        max_consecutive_failed_trials=max_consecutive_failed_trials,
    )
    hypermodel.keep_checkpoints = tuner == "hyperband"
    if tuner == "hyperband":
        return tuner_class(tuner)(max_epochs=hypermodel.base_config.epochs,
                                  factor=hyperband_factor, **common)
    return tuner_class(tuner)(max_trials=max_trials, **common)


def is_search_writer():
    """True unless this process is a keras-tuner worker (the chief/single process writes outputs)."""
    tuner_id = os.environ.get("KERASTUNER_TUNER_ID")
    return "KERASTUNER_ORACLE_IP" not in os.environ or tuner_id == "chief"


def run_search(base_config, space, *, objective="sum", best_run_dir=None, **tuner_kwargs):
    """Runs (or continues) a search and writes its outputs.

    `best.flags` gets `run_dir=best_run_dir` (default: runs/tuned_<project_name>, a new path).
    Returns `(tuner, records, best)`; on a distributed worker `records` and `best` are None (the
    chief writes the outputs once every worker is done).
    """
    hypermodel = AdversarialHyperModel(base_config, space, objective=objective)
    tuner = make_tuner(hypermodel, **tuner_kwargs)
    tuner.search()
    if not is_search_writer():
        return tuner, None, None
    records, best = write_outputs(
        tuner.oracle, base_config, tuner.project_dir,
        best_run_dir=best_run_dir or os.path.join("runs", f"tuned_{tuner.project_name}"),
        title=f"{base_config.method} on {base_config.dataset}: objective={objective}",
    )
    return tuner, records, best

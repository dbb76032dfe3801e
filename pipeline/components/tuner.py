"""`Tuner` (optional): arat_tf's keras-tuner search on ExampleGen's train / val splits.

Each trial trains on the train split and is scored (clean, PGD, or their sum; see
`arat_tf.tuning`) on the val split, a held-out part of the TRAINING data: the test split is never
seen before the Evaluator.

Output `best_hyperparameters` (type HyperParameters): best_hyperparameters.json (the best trial's
values, objective, clean and robust accuracy) and the search's own outputs under search/ (trials.csv,
tradeoff.png, best.flags, keras-tuner state).
"""

import os

from arat_tf.io_utils import atomic_write_json
from pipeline.artifacts import EXAMPLES, HYPERPARAMETERS
from pipeline.components.base import Component, InputSpec
from pipeline.components.training_config import config_on_examples


class Tuner(Component):
    """Runs the search and emits its best hyperparameters.

    Args:
        examples: `OutputRef` to ExampleGen's examples.
        training: the base training parameters (`training_parameters(config)`).
        algorithm: "random", "bayesian" or "hyperband".
        max_trials, objective, seed: as in `python -m arat_tf.tune`.
        search_space: the `arat_tf.tuning.SearchSpace` fields as a dict.
        verbose, distribution_strategy: runtime settings.
    """

    INPUTS = {"examples": InputSpec(EXAMPLES)}
    OUTPUTS = {"best_hyperparameters": HYPERPARAMETERS}

    def __init__(self, *, examples, training, algorithm, max_trials, objective, seed,
                 search_space, verbose=0, distribution_strategy=None, name=None):
        super().__init__(
            {"training": dict(training), "algorithm": algorithm, "max_trials": max_trials,
             "objective": objective, "seed": seed, "search_space": dict(search_space)},
            runtime={"verbose": verbose}, inputs={"examples": examples}, name=name)
        self.distribution_strategy = distribution_strategy

    def execute(self, inputs, outputs):
        from arat_tf.tuning import SearchSpace, run_search

        location = outputs["best_hyperparameters"]
        base = config_on_examples(self.parameters["training"], inputs["examples"],
                                  run_dir=os.path.join(location.final_uri, "best_run"),
                                  verbose=self.runtime["verbose"])
        _, records, best = run_search(
            base, SearchSpace(**self.parameters["search_space"]),
            objective=self.parameters["objective"], tuner=self.parameters["algorithm"],
            max_trials=self.parameters["max_trials"], search_dir=location.path,
            project_name="search", seed=self.parameters["seed"], overwrite=True,
            best_run_dir=os.path.join(location.final_uri, "best_run"),
            distribution_strategy=self.distribution_strategy,
        )
        if best is None:
            raise RuntimeError(f"No trial of the search completed ({len(records)} trial(s)); see "
                               f"the trial errors above.")
        summary = {
            "values": best["hyperparameters"], "trial_id": best["trial_id"],
            "objective_name": self.parameters["objective"], "objective": best["objective"],
            "clean": best["clean"], "robust": best["robust"], "trials": len(records),
        }
        atomic_write_json(os.path.join(location.path, "best_hyperparameters.json"), summary)
        print(f"    best trial {best['trial_id']} of {len(records)}: {best['hyperparameters']}")
        return {"best_hyperparameters": summary}

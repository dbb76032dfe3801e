"""`Trainer`: `arat_tf.training.train` on ExampleGen's splits, with the Tuner's best values.

Trains on the train split and validates every epoch on the val split (the test split is the
Evaluator's). Output `model` (type Model) is the whole arat_tf run directory: model.keras,
config.json, flags.txt (replayable with `python -m arat_tf.train --flagfile`), metrics.json/csv,
checkpoints, TensorBoard logs.

The Trainer is RESUMABLE: it trains in a work directory that outlives a crash (see
`pipeline.runner`), and the next execution with the same inputs and parameters resumes the run
from its last epoch checkpoint instead of starting again.
"""

import os
import shutil

from arat_tf.flags import config_as_dict, config_to_flagfile
from arat_tf.io_utils import atomic_write_json, atomic_write_text
from pipeline.artifacts import EXAMPLES, HYPERPARAMETERS, MODEL
from pipeline.components.base import Component, InputSpec
from pipeline.components.training_config import config_on_examples


class Trainer(Component):
    """Trains one model.

    Args:
        examples: `OutputRef` to ExampleGen's examples.
        hyperparameters: `OutputRef` to the Tuner's best hyperparameters, or None (no Tuner).
        training: the training parameters (`training_parameters(config)`).
        verbose, strategy_name, cpu_replicas: runtime settings (see `arat_tf.training.train`).
        strategy: a prebuilt `tf.distribute.Strategy` (it must be built before TensorFlow runs
            its first op, i.e. before ExampleGen), or None for the default one.
    """

    INPUTS = {"examples": InputSpec(EXAMPLES), "hyperparameters": InputSpec(HYPERPARAMETERS, True)}
    OUTPUTS = {"model": MODEL}
    RESUMABLE = True

    def __init__(self, *, examples, hyperparameters=None, training, verbose=2,
                 strategy_name="default", cpu_replicas=0, strategy=None, name=None):
        super().__init__({"training": dict(training)},
                         runtime={"verbose": verbose, "strategy": strategy_name,
                                  "cpu_replicas": cpu_replicas},
                         inputs={"examples": examples, "hyperparameters": hyperparameters},
                         name=name)
        self.strategy = strategy

    def execute(self, inputs, outputs):
        from arat_tf.training import train
        from arat_tf.tuning import apply_trial

        location = outputs["model"]
        resume = os.path.exists(os.path.join(location.path, "checkpoints", "checkpoint"))
        if resume:
            print(f"    resuming the interrupted training in {location.path}")
        else:  # nothing worth keeping (killed before its first checkpoint): start clean
            for name in os.listdir(location.path):
                path = os.path.join(location.path, name)
                if os.path.isdir(path):
                    shutil.rmtree(path)
                else:
                    os.remove(path)
        config = config_on_examples(
            self.parameters["training"], inputs["examples"], run_dir=location.path,
            verbose=self.runtime["verbose"], strategy=self.runtime["strategy"],
            cpu_replicas=self.runtime["cpu_replicas"], resume=resume)
        tuned = {}
        if "hyperparameters" in inputs:
            tuned = inputs["hyperparameters"].properties["values"]
            config = apply_trial(config, tuned)
            print(f"    with the tuned hyperparameters {tuned}")
        _, records = train(config, strategy=self.strategy)
        # The run directory is renamed into place after this returns: record where it will be.
        final = config.replace(run_dir=location.final_uri).resolve()
        atomic_write_text(os.path.join(location.path, "flags.txt"), config_to_flagfile(final))
        atomic_write_json(os.path.join(location.path, "config.json"), config_as_dict(final))
        last = records[-1] if records else {}
        return {"model": {
            "dataset": config.dataset, "method": config.method, "model": config.model,
            "depth": config.depth, "width": config.width, "epochs": config.epochs,
            "eval_branch": config.eval_branch, "eps": config.eps, "tuned": tuned,
            "final_epoch_metrics": {key: value for key, value in last.items()
                                    if isinstance(value, (int, float))},
        }}

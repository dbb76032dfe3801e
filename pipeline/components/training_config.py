"""The `TrainConfig` the Tuner and the Trainer run: the user's flags on ExampleGen's splits.

The data settings of the flags (splits, subsets, data dir) were ExampleGen's job; here they are
replaced by the materialised train / val splits, read whole. What is left of the flags (model,
method, attacks, optimisation, seed, ...) is the components' parameters and cache key.
"""

import dataclasses

from arat_tf.config import TrainConfig, config_fields
from pipeline.components.example_gen import tfrecord_split

# Decided by ExampleGen, or with no effect on the outputs (where they go, how verbose).
NOT_TRAINING_PARAMETERS = ("data_dir", "download", "train_split", "val_split", "train_subset",
                           "val_subset", "run_dir", "resume", "verbose", "strategy", "cpu_replicas")


def training_parameters(config):
    """The fields of `config` (a `TrainConfig`) that determine a trained model."""
    return {field.name: getattr(config, field.name) for field in config_fields()
            if field.name not in NOT_TRAINING_PARAMETERS}


def config_on_examples(parameters, examples, *, run_dir, verbose=2, strategy="default",
                       cpu_replicas=0, resume=False):
    """A validated `TrainConfig`: `parameters` + ExampleGen's train / val splits."""
    return TrainConfig(
        **parameters, train_split=tfrecord_split(examples, "train"),
        val_split=tfrecord_split(examples, "val"), train_subset=0, val_subset=0, data_dir="",
        download=False, run_dir=run_dir, resume=resume, verbose=verbose, strategy=strategy,
        cpu_replicas=cpu_replicas,
    )


def as_train_config(parameters):
    """`parameters` as a TrainConfig (with placeholder data fields), for validation up front."""
    defaults = {field.name: field.default for field in dataclasses.fields(TrainConfig)}
    return TrainConfig(**dict(defaults, **parameters))

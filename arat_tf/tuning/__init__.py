"""Hyperparameter search for the training methods (keras-tuner); CLI: `python -m arat_tf.tune`."""

from arat_tf.tuning.hypermodel import (
    OBJECTIVES, AdversarialHyperModel, TestSplitError, check_tuning_splits, objective_value,
)
from arat_tf.tuning.results import collect_trials, plot_tradeoff, write_outputs
from arat_tf.tuning.search import TUNERS, make_tuner, run_search
from arat_tf.tuning.search_space import SearchSpace, apply_trial, define_search_space, trial_values

__all__ = [
    "OBJECTIVES", "TUNERS", "AdversarialHyperModel", "SearchSpace", "TestSplitError",
    "apply_trial", "check_tuning_splits", "collect_trials", "define_search_space", "make_tuner",
    "objective_value", "plot_tradeoff", "run_search", "trial_values", "write_outputs",
]

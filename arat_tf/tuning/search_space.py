"""The hyperparameter search space of each training method, and applying a trial to a `TrainConfig`.

Every hyperparameter is named after the `TrainConfig` field it sets (`invariance_weight`,
`trades_beta`, ...), so a trial's values apply with `config.replace(**values)` and the best trial
becomes an ordinary training flagfile.

    method   tuned                                                         optional (both flags)
    arat     invariance_weight (gamma, log), ce_weights auto|fixed and,    learning_rate (log)
             when fixed, adv_ce_weight / clean_ce_weight,
             predictor_hidden_ratio (log)
    trades   trades_beta
    mart     mart_beta
    pgd_at, hybrid, cross_at: only the optional ones.

The eps schedule is not tuned: `TrainConfig` has no eps-schedule field to set (only `--eps`).
"""

import dataclasses
import math

from arat_tf.config import config_fields

TUNABLE_FIELDS = frozenset(field.name for field in config_fields())


@dataclasses.dataclass(frozen=True)
class SearchSpace:
    """Ranges of the search (inclusive bounds); which ones apply depends on the method.

    Attributes:
        gamma_min, gamma_max: ARAT invariance weight, sampled on a log scale.
        tune_ce_weights: ARAT: choose ce_weights between "auto" and "fixed".
        adv_ce_weight_min/max, clean_ce_weight_min/max: ARAT fixed CE weights (linear).
        predictor_hidden_ratio_min/max: ARAT predictor hidden width ratio (log).
        trades_beta_min/max, mart_beta_min/max: the baselines' beta (linear).
        tune_learning_rate, learning_rate_min/max: optional base learning rate (log), any method.
    """

    gamma_min: float = 3.0
    gamma_max: float = 100.0
    tune_ce_weights: bool = True
    adv_ce_weight_min: float = 0.1
    adv_ce_weight_max: float = 1.0
    clean_ce_weight_min: float = 0.1
    clean_ce_weight_max: float = 1.0
    predictor_hidden_ratio_min: float = 0.125
    predictor_hidden_ratio_max: float = 1.0
    trades_beta_min: float = 1.0
    trades_beta_max: float = 10.0
    mart_beta_min: float = 1.0
    mart_beta_max: float = 10.0
    tune_learning_rate: bool = False
    learning_rate_min: float = 0.01
    learning_rate_max: float = 0.2

    def __post_init__(self):
        errors = []
        for name in ("gamma", "adv_ce_weight", "clean_ce_weight", "predictor_hidden_ratio",
                     "trades_beta", "mart_beta", "learning_rate"):
            low, high = getattr(self, f"{name}_min"), getattr(self, f"{name}_max")
            if not (math.isfinite(low) and math.isfinite(high) and 0 <= low <= high):
                errors.append(f"--{name}_min={low} / --{name}_max={high} must satisfy "
                              f"0 <= min <= max")
        for name in ("gamma", "predictor_hidden_ratio", "learning_rate"):  # log-scale ranges
            if getattr(self, f"{name}_min") <= 0:
                errors.append(f"--{name}_min must be > 0 (log-scale range)")
        if errors:
            raise ValueError("Invalid search space: " + "; ".join(errors) + ".")


def _float(hp, name, low, high, log=False):
    if low == high:  # keras-tuner rejects an empty interval; a fixed value is still recorded.
        return hp.Fixed(name, float(low))
    return hp.Float(name, float(low), float(high), sampling="log" if log else "linear")


def define_search_space(hp, method, space):
    """Declares the method's hyperparameters on `hp` (a `keras_tuner.HyperParameters`).

    Returns the names declared (active or not). Raises ValueError if the method has nothing to tune.
    """
    if method == "arat":
        _float(hp, "invariance_weight", space.gamma_min, space.gamma_max, log=True)
        if space.tune_ce_weights:
            hp.Choice("ce_weights", ["auto", "fixed"])
            with hp.conditional_scope("ce_weights", ["fixed"]):
                _float(hp, "adv_ce_weight", space.adv_ce_weight_min, space.adv_ce_weight_max)
                _float(hp, "clean_ce_weight", space.clean_ce_weight_min, space.clean_ce_weight_max)
        _float(hp, "predictor_hidden_ratio", space.predictor_hidden_ratio_min,
               space.predictor_hidden_ratio_max, log=True)
    elif method == "trades":
        _float(hp, "trades_beta", space.trades_beta_min, space.trades_beta_max)
    elif method == "mart":
        _float(hp, "mart_beta", space.mart_beta_min, space.mart_beta_max)
    if space.tune_learning_rate:
        _float(hp, "learning_rate", space.learning_rate_min, space.learning_rate_max, log=True)
    names = [parameter.name for parameter in hp.space]
    if not names:
        raise ValueError(
            f"--method={method} has no method-specific hyperparameters to tune; pass "
            f"--tune_learning_rate to search the learning rate."
        )
    return names


def trial_values(hp):
    """The active values of `hp` that are `TrainConfig` fields (drops e.g. Hyperband's tuner/*)."""
    return {name: value for name, value in hp.values.items() if name in TUNABLE_FIELDS}


def apply_trial(config, hp_values):
    """`config` with the trial's values applied (validated by `TrainConfig`)."""
    values = {name: value for name, value in hp_values.items() if name in TUNABLE_FIELDS}
    return config.replace(**values)

"""`AdversarialHyperModel`: a keras-tuner HyperModel that trains one `TrainConfig` per trial.

`build(hp)` returns the compiled `AdversarialTrainer` of the base config with the trial's values
applied; `fit(hp, model, ...)` trains it on `--train_split` (with ARAT's CE auto-balance when
`ce_weights=auto`), then evaluates clean and PGD accuracy ONCE on the held-out `--val_split` and
returns `{"objective", "clean", "robust"}` (final-epoch values, so objective == clean + robust for
"sum"). The model is built from the same functions `arat_tf.training.train` uses.
"""

import re

import keras
import keras_tuner as kt

from arat_tf.tuning.search_space import apply_trial, define_search_space, trial_values

OBJECTIVES = ("clean", "robust", "sum")
OBJECTIVE_NAME = "objective"

_DATA_FIELDS = ("dataset", "data_dir", "download", "train_split", "val_split", "train_subset",
                "val_subset", "batch_size", "eval_batch_size", "augmentation", "seed",
                "auto_balance_examples")


class TestSplitError(ValueError):
    """The tuning objective would be measured on a test split."""

    __test__ = False  # Not a pytest class, despite the name.


def _split_names(split):
    """TFDS split names in a split string: 'train[:90%]+test' -> ['train', 'test']."""
    return [re.sub(r"\[.*", "", part).strip().lower() for part in split.split("+")]


def check_tuning_splits(config):
    """Refuses to tune on a test split: the objective must come from held-out TRAINING data."""
    for flag in ("val_split", "train_split"):
        split = getattr(config, flag)
        if any(name == "test" or name.startswith("test") for name in _split_names(split)):
            raise TestSplitError(
                f"--{flag}={split!r} uses the test split. Hyperparameters must be selected on a "
                f"held-out part of the training set (e.g. --train_split='train[:90%]' "
                f"--val_split='train[90%:]'); the test split is kept for the final evaluation."
            )
    if config.val_split == config.train_split:
        raise ValueError(
            f"--val_split equals --train_split ({config.val_split!r}): the objective would be "
            f"measured on training images. Use disjoint slices, e.g. 'train[:90%]' / 'train[90%:]'."
        )


def objective_value(objective, clean, robust):
    if objective == "clean":
        return clean
    if objective == "robust":
        return robust
    if objective == "sum":
        return clean + robust
    raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")


class AdversarialHyperModel(kt.HyperModel):
    """Builds and trains the base config with a trial's hyperparameters.

    Args:
        base_config: the `TrainConfig` every trial starts from (not resolved; "auto" allowed).
        space: a `SearchSpace`.
        objective: "clean", "robust" or "sum" (all maximised).
    """

    def __init__(self, base_config, space, objective="sum", **kwargs):
        super().__init__(**kwargs)
        if objective not in OBJECTIVES:
            raise ValueError(f"--objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}")
        check_tuning_splits(base_config)
        self.base_config = base_config
        self.space = space
        self.objective = objective
        self._data = None
        self._data_key = None
        self.keep_checkpoints = False  # Set by `make_tuner` for Hyperband.
        self.fit_calls = 0  # Trials (executions) trained by this process.
        # Fails early (before any trial) if the method has nothing to tune.
        define_search_space(kt.HyperParameters(), base_config.method, space)

    def declare(self, hp):
        """Declares the search space on `hp` (also what `build` does first)."""
        return define_search_space(hp, self.base_config.method, self.space)

    def trial_config(self, hp):
        """The resolved `TrainConfig` of a trial."""
        return apply_trial(self.base_config, trial_values(hp)).resolve()

    def datasets(self, config):
        """`(train, validation, probe, steps_per_epoch)`, built once: the data is never tuned.

        First called from `build`, inside keras-tuner's `distribution_strategy` scope: under
        several replicas validation keeps full batches only, as in `arat_tf.training`.
        """
        import tensorflow as tf

        from arat_tf.training import build_datasets
        from arat_tf.data import dataset_spec

        key = tuple(getattr(config, name) for name in _DATA_FIELDS)
        if self._data is None or self._data_key != key:
            replicas = tf.distribute.get_strategy().num_replicas_in_sync
            self._data = build_datasets(config, dataset_spec(config.dataset), replicas)
            self._data_key = key
        return self._data

    def build(self, hp):
        from arat_tf.data import dataset_spec
        from arat_tf.training import build_classifier, build_trainer, compile_trainer

        self.declare(hp)
        config = self.trial_config(hp)
        _, _, _, steps_per_epoch = self.datasets(config)
        keras.utils.set_random_seed(config.seed)  # Same initialisation for every trial.
        classifier = build_classifier(config, dataset_spec(config.dataset))
        trainer = build_trainer(config, classifier)
        compile_trainer(trainer, config, steps_per_epoch)
        # Every variable exists now (the trainer builds its predictors and the optimizer); Keras
        # only needs the flag for `save_weights`, which Hyperband's checkpoints use.
        trainer.built = True
        return trainer

    def fit(self, hp, model, *args, **kwargs):
        """Trains `model` (from `build`) and returns `{"objective", "clean", "robust"}`.

        keras-tuner passes `callbacks` (its checkpoint and trial callbacks) and, for Hyperband,
        `epochs` / `initial_epoch`; positional data arguments are not used (the data comes from
        the config).
        """
        from arat_tf.callbacks import CeWeightAutoBalance, NonFiniteLossGuard
        from arat_tf.methods import AratTrainer
        from keras_tuner.src.engine.tuner_utils import SaveBestEpoch

        self.fit_calls += 1
        config = self.trial_config(hp)
        train_data, validation_data, probe_data, _ = self.datasets(config)
        callbacks = []
        if isinstance(model, AratTrainer) and config.ce_weights == "auto":
            callbacks.append(CeWeightAutoBalance(model, probe_data))
        callbacks.append(NonFiniteLossGuard("(tuning trials keep no checkpoints)"))
        for callback in kwargs.pop("callbacks", None) or []:
            # keras-tuner's per-epoch weight checkpoint is only read back by Hyperband (to continue
            # a trial in the next bracket); other tuners would write a model per trial for nothing.
            if isinstance(callback, SaveBestEpoch) and not self.keep_checkpoints:
                continue
            callbacks.append(callback)
        epochs = kwargs.pop("epochs", config.epochs)
        initial_epoch = kwargs.pop("initial_epoch", 0)
        model.fit(
            train_data, epochs=epochs, initial_epoch=initial_epoch, callbacks=callbacks,
            verbose=kwargs.pop("verbose", config.verbose), shuffle=False,
        )
        results = model.evaluate(validation_data, verbose=0, return_dict=True)
        suffix = f"{config.eval_branch}bn"
        clean = float(results[f"clean_acc_{suffix}"])
        robust = float(results[f"pgd{config.val_attack_steps}_acc_{suffix}"])
        return {
            OBJECTIVE_NAME: objective_value(self.objective, clean, robust),
            "clean": clean,
            "robust": robust,
        }

"""`train(config)`: data -> model -> method -> fit -> checkpoints -> final `.keras` model.

The CLI (`arat_tf.train`) and the tuner call this one function; it owns the run directory:

    run_dir/
      flags.txt        resolved configuration, replayable with --flagfile
      config.json      the same, as JSON
      metrics.json     one record per epoch (all logged metrics, learning rate, seconds)
      metrics.csv      the same, as CSV
      tensorboard/     TensorBoard logs
      checkpoints/     trainer + optimizer state after every epoch (for --resume)
      model.keras      the trained classifier (both BN branches; no predictor heads)
"""

import dataclasses
import os

import keras
import tensorflow as tf
from absl import logging

from arat_tf import callbacks as run_callbacks
from arat_tf.attacks import AttackConfig
from arat_tf.data import dataset_spec, make_eval_dataset, make_train_dataset
from arat_tf.flags import config_as_dict, config_to_flagfile
from arat_tf.io_utils import atomic_save_model, atomic_write_json, atomic_write_text
from arat_tf.methods import METHOD_DEFAULTS, AratTrainer, HybridTrainer, MartTrainer, TradesTrainer
from arat_tf.models import build_model
from arat_tf.optimizers import CoupledWeightDecaySGD
from arat_tf.schedules import make_learning_rate_schedule
from arat_tf.swa import StochasticWeightAveraging, WeightAverage, finalize_weight_average


class RunDirectoryError(RuntimeError):
    """The run directory holds a previous run and --resume was not given (or vice versa)."""


def build_classifier(config, spec):
    """The `BranchedClassifier` a resolved config describes."""
    return build_model(
        config.model, num_classes=spec.num_classes, image_shape=spec.image_shape,
        bn_mode=config.bn_mode, synchronized_bn=config.synchronized_bn,
        depth=config.depth or None, width=config.width,
    )


def build_trainer(config, classifier):
    """The method's `AdversarialTrainer` around `classifier` for a resolved config (not compiled)."""
    train_attack = AttackConfig(
        norm=config.attack_norm, eps=config.eps, step_size=config.attack_step_size,
        steps=config.attack_steps, loss=config.attack_loss, start=config.attack_start,
    )
    eval_attack = AttackConfig(
        norm=config.attack_norm, eps=config.eps, step_size=config.val_attack_step_size,
        steps=config.val_attack_steps, loss="ce", start="uniform",
    )
    common = dict(
        train_attack=train_attack, attack_bn_mode=config.attack_bn_mode,
        eval_attack=eval_attack, eval_branch=config.eval_branch,
    )
    trainer_class = METHOD_DEFAULTS[config.method].trainer_class
    if trainer_class is AratTrainer:
        return AratTrainer(
            classifier, invariance_weight=config.invariance_weight,
            asymmetric=config.invariance == "asymmetric", use_predictor=config.use_predictor,
            predictor_hidden_ratio=config.predictor_hidden_ratio,
            distance=config.invariance_distance, adv_ce_weight=config.adv_ce_weight,
            clean_ce_weight=config.clean_ce_weight, **common,
        )
    if trainer_class is TradesTrainer:
        return TradesTrainer(classifier, beta=config.trades_beta, **common)
    if trainer_class is MartTrainer:
        return MartTrainer(classifier, beta=config.mart_beta, **common)
    if trainer_class is HybridTrainer:
        return HybridTrainer(classifier, clean_weight=config.hybrid_clean_weight, **common)
    return trainer_class(classifier, **common)


def build_datasets(config, spec):
    """`(train, validation, auto-balance probe, steps_per_epoch)` datasets of a resolved config."""
    data_dir = config.data_dir or None
    train = make_train_dataset(
        config.dataset, batch_size=config.batch_size, data_dir=data_dir, split=config.train_split,
        subset=config.train_subset or None, augmentation=config.augmentation, seed=config.seed,
        download=config.download,
    )
    steps_per_epoch = int(train.cardinality())
    if steps_per_epoch < 1:
        raise ValueError(
            f"--train_split={config.train_split} with --train_subset={config.train_subset} has fewer "
            f"examples than one batch of --batch_size={config.batch_size}."
        )
    validation = make_eval_dataset(
        config.dataset, batch_size=config.eval_batch_size, data_dir=data_dir,
        split=config.val_split, subset=config.val_subset or None, download=config.download,
    )
    probe = make_eval_dataset(
        config.dataset, batch_size=config.eval_batch_size, data_dir=data_dir,
        split=config.train_split, subset=config.auto_balance_examples, download=config.download,
    )
    return train, validation, probe, steps_per_epoch


def compile_trainer(trainer, config, steps_per_epoch):
    """Compiles with the PyTorch-style SGD and the config's schedule, and builds the optimizer."""
    schedule = make_learning_rate_schedule(
        config.lr_schedule, base_learning_rate=config.learning_rate, epochs=config.epochs,
        steps_per_epoch=steps_per_epoch,
    )
    optimizer = CoupledWeightDecaySGD(
        learning_rate=schedule, momentum=config.momentum, coupled_weight_decay=config.weight_decay
    )
    trainer.compile(optimizer=optimizer, jit_compile=config.jit_compile)
    optimizer.build(trainer.trainable_variables)


def _check_run_dir(config, checkpoint_dir):
    """Refuses to overwrite a previous run, and to resume one whose checkpoint index is gone."""
    leftovers = os.path.isdir(checkpoint_dir) and bool(os.listdir(checkpoint_dir))
    leftovers = leftovers or os.path.exists(os.path.join(config.run_dir, "metrics.json"))
    has_checkpoint = tf.train.latest_checkpoint(checkpoint_dir) is not None
    if leftovers and not config.resume:
        raise RunDirectoryError(
            f"{config.run_dir} already holds a run. Pass --resume to continue it, or choose another "
            f"--run_dir; nothing was overwritten."
        )
    if leftovers and config.resume and not has_checkpoint:
        raise run_callbacks.CheckpointError(
            f"--resume: {config.run_dir} holds a previous run but {checkpoint_dir} has no readable "
            f"checkpoint index (the 'checkpoint' file is missing or corrupt). Nothing was changed."
        )


def train(config, strategy=None):
    """Trains `config` (a `TrainConfig`) and writes its run directory.

    Args:
        config: a `TrainConfig`; "auto" values are resolved here.
        strategy: a `tf.distribute.Strategy` (default: the current/default one).

    Returns:
        `(classifier, history_records)`: the trained `BranchedClassifier` and the per-epoch records.
    """
    config = config.resolve()
    strategy = strategy or tf.distribute.get_strategy()
    keras.utils.set_random_seed(config.seed)
    spec = dataset_spec(config.dataset)
    run_dir = config.run_dir
    checkpoint_dir = os.path.join(run_dir, "checkpoints")
    _check_run_dir(config, checkpoint_dir)

    train_data, validation_data, probe_data, steps_per_epoch = build_datasets(config, spec)
    os.makedirs(run_dir, exist_ok=True)
    with strategy.scope():
        classifier = build_classifier(config, spec)
        trainer = build_trainer(config, classifier)
        compile_trainer(trainer, config, steps_per_epoch)
        extra_state = {}
        if config.swa:
            extra_state["weight_average"] = WeightAverage(classifier.trainable_variables)

    checkpoint = run_callbacks.EpochCheckpoint(checkpoint_dir, trainer, **extra_state)
    first_epoch = checkpoint.restore() if config.resume else 0
    if first_epoch >= config.epochs:
        logging.info("All %d epochs already trained in %s.", config.epochs, run_dir)
    atomic_write_text(os.path.join(run_dir, "flags.txt"), config_to_flagfile(config))
    atomic_write_json(os.path.join(run_dir, "config.json"), config_as_dict(config))
    print(
        f"Training {config.method} / {config.model} (bn_mode={config.bn_mode}) on {config.dataset}: "
        f"{steps_per_epoch} steps per epoch, global batch {config.batch_size} = "
        f"{config.batch_size // strategy.num_replicas_in_sync} per replica x "
        f"{strategy.num_replicas_in_sync} replica(s); epochs {first_epoch + 1}..{config.epochs}."
    )

    callbacks = []
    if isinstance(trainer, AratTrainer) and config.ce_weights == "auto":
        callbacks.append(run_callbacks.CeWeightAutoBalance(trainer, probe_data))
    metrics_writer = run_callbacks.EpochMetricsWriter(
        os.path.join(run_dir, "metrics.json"), first_epoch
    )
    if config.swa:
        callbacks.append(StochasticWeightAveraging(
            extra_state["weight_average"], config.swa_start_epoch - 1, config.swa_every
        ))
    callbacks += [
        run_callbacks.NonFiniteLossGuard(checkpoint_dir),
        metrics_writer,
        keras.callbacks.TensorBoard(os.path.join(run_dir, "tensorboard"), update_freq="epoch"),
        checkpoint,
    ]
    if first_epoch < config.epochs:
        trainer.fit(
            train_data, epochs=config.epochs, initial_epoch=first_epoch,
            validation_data=validation_data, callbacks=callbacks, verbose=config.verbose,
            shuffle=False,  # The tf.data pipeline shuffles; Keras would only warn.
        )
    if config.swa:
        averaged = finalize_weight_average(
            classifier, extra_state["weight_average"], train_data, trainer.train_attack
        )
        print("SWA: averaged weights, adversarial BN statistics refreshed." if averaged else
              "SWA: no averaging step was reached (--swa_start_epoch/--swa_every); kept the "
              "trained weights.")
    atomic_save_model(classifier, os.path.join(run_dir, "model.keras"))
    return classifier, metrics_writer.records

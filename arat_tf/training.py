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
      analysis/        step_<k>.json every --analyze_every_steps steps (arat_tf.analysis)

Under `--strategy=multi_worker` only the chief writes the run directory; every other worker
restores from its checkpoints (for --resume, the run directory must be on a shared file system)
but saves its checkpoints and model (saving takes part in collective ops) to a private temporary
directory, deleted at the end.
"""

import json
import math
import os
import shutil
import tempfile

import keras
import tensorflow as tf
from absl import logging

from arat_tf import callbacks as run_callbacks
from arat_tf import precision
from arat_tf.analysis.callback import AnalysisCallback
from arat_tf.attacks import AttackConfig
from arat_tf.distribution import DistributionError, is_chief, make_strategy
from arat_tf.data import count_examples, dataset_spec, make_eval_dataset, make_train_dataset
from arat_tf.flags import config_as_dict, config_to_flagfile
from arat_tf.io_utils import atomic_save_model, atomic_write_json, atomic_write_text
from arat_tf.methods import METHOD_DEFAULTS, AratTrainer, HybridTrainer, MartTrainer, TradesTrainer
from arat_tf.models import build_model
from arat_tf.optimizers import CoupledWeightDecaySGD
from arat_tf.schedules import make_learning_rate_schedule
from arat_tf.swa import StochasticWeightAveraging, WeightAverage, finalize_weight_average
from arat_tf.warm_start import PREDICTOR_HEADS_FILE, save_predictor_heads, warm_start


class RunDirectoryError(RuntimeError):
    """The run directory holds a previous run and --resume was not given (or vice versa)."""


def build_classifier(config, spec):
    """The `BranchedClassifier` a resolved config describes, its layers under the config's
    `--mixed_precision` policy (see `arat_tf.precision`)."""
    with precision.dtype_policy(config.mixed_precision):
        return build_model(
            config.model, num_classes=spec.num_classes, image_shape=spec.image_shape,
            bn_mode=config.bn_mode, synchronized_bn=config.synchronized_bn,
            depth=config.depth or None, width=config.width, conv_padding=config.conv_padding,
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


def fixed_training_probe(config):
    """The first `--auto_balance_examples` images of the training split, unaugmented, batched."""
    return make_eval_dataset(
        config.dataset, batch_size=config.eval_batch_size, data_dir=config.data_dir or None,
        split=config.train_split, subset=config.auto_balance_examples, download=config.download,
    )


def build_datasets(config, spec, replicas=1):
    """`(train, validation, auto-balance probe, steps_per_epoch)` datasets of a resolved config.

    The probe is what ARAT's CE auto-balance measures each epoch (`--auto_balance_sample`):
    "fresh" takes the first ceil(N / batch) batches of the training pipeline, which reshuffles
    and re-augments on every pass (the authors' code iterates its training loader until N images,
    1,024 at batch 128); "fixed" is `fixed_training_probe`. With several `replicas`, validation
    keeps full batches only (`full_batches_for_replicas`).
    """
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
    if config.auto_balance_sample == "fresh":
        probe = train.take(math.ceil(config.auto_balance_examples / config.batch_size))
    else:
        probe = fixed_training_probe(config)
    if replicas > 1:
        validation, kept = full_batches_for_replicas(validation, config.eval_batch_size, replicas)
        print(f"Validation on {kept} examples (full batches, split over {replicas} replicas).")
    return train, validation, probe, steps_per_epoch


def compile_trainer(trainer, config, steps_per_epoch):
    """Compiles with the PyTorch-style SGD and the config's schedule (under mixed_float16 inside
    Keras' dynamic `LossScaleOptimizer`), and builds the optimizer."""
    schedule = make_learning_rate_schedule(
        config.lr_schedule, base_learning_rate=config.learning_rate, epochs=config.epochs,
        steps_per_epoch=steps_per_epoch,
    )
    optimizer = precision.wrap_optimizer(CoupledWeightDecaySGD(
        learning_rate=schedule, momentum=config.momentum, coupled_weight_decay=config.weight_decay
    ), config.mixed_precision)
    trainer.compile(optimizer=optimizer, jit_compile=config.jit_compile)
    optimizer.build(trainer.trainable_variables)


def full_batches_for_replicas(dataset, batch_size, replicas):
    """Validation batches every replica gets a share of.

    tf.distribute fills replicas in order, so a short last batch can leave a replica with no
    examples, which a PGD step cannot run on. Under several replicas validation therefore uses
    full batches only (of at most `batch_size`, divisible by `replicas`).

    Returns:
        `(dataset, number of examples kept)`.
    """
    count = count_examples(dataset)
    batch = min(batch_size, count) // replicas * replicas
    if batch < replicas:
        raise ValueError(
            f"The validation set has {count} examples: too few for {replicas} replicas."
        )
    batches = count // batch
    rebatched = dataset.unbatch().batch(batch, drop_remainder=True)
    return rebatched.apply(tf.data.experimental.assert_cardinality(batches)), batches * batch


def _shard_by_data(dataset):
    """Multi-worker input: every worker reads the whole (in-memory, one-"file") pipeline and keeps
    its replicas' share of each global batch (tf.data's FILE sharding needs >= 1 file per worker)."""
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return dataset.with_options(options)


def _work_around_keras_multi_worker(trainer):
    """Makes Keras 3's `fit` usable with MultiWorkerMirroredStrategy (broken upstream, see
    keras-team/keras#20585), on this trainer instance only.

    Before training, Keras' TF trainer reduces the first distributed batch with
    `strategy.reduce("MEAN", ...)` only to learn its shapes, which MultiWorkerMirroredStrategy
    cannot do eagerly; shapes and dtypes are all it needs, so the first local replica's batch is
    used instead."""
    strategy = trainer.distribute_strategy

    def local_value(value):
        if isinstance(value, tf.distribute.DistributedValues):
            return strategy.experimental_local_results(value)[0]
        return value

    def maybe_symbolic_build(iterator=None, data_batch=None):
        if iterator is not None:
            for _, _, batches in iterator:
                data_batch = tf.nest.map_structure(local_value, next(batches))
                break
        with strategy.scope():
            trainer._symbolic_build(data_batch=data_batch)  # pylint: disable=protected-access

    trainer._maybe_symbolic_build = maybe_symbolic_build  # pylint: disable=protected-access
    # Same Keras code path: it reduces every step's logs across workers with
    # `strategy.reduce("MEAN", v, axis=0)`, which fails on scalars. Each replica's scalar log is
    # returned as a 1-vector instead, so that reduction is the mean over replicas (a scalar).
    for name in ("train_step", "test_step"):
        step = getattr(trainer, name)

        def vector_logs(data, step=step):
            return tf.nest.map_structure(
                lambda value: tf.reshape(value, [1]) if value.shape.rank == 0 else value, step(data)
            )

        setattr(trainer, name, vector_logs)


def _check_run_dir(config, checkpoint_dir):
    """Refuses to overwrite a previous run, to resume one whose checkpoint index is gone, and to
    resume one written by arat_tf 0.1 (whose networks pad and normalise differently)."""
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
    previous = _read_previous_config(config.run_dir) if leftovers else {}
    if previous and "conv_padding" not in previous:
        raise run_callbacks.CheckpointError(
            f"--resume: {config.run_dir} was trained by arat_tf 0.1, whose strided convolutions "
            f"padded as TensorFlow's 'same' and whose predictor heads kept Keras' BatchNorm; its "
            f"checkpoints do not fit this version's trainer. Nothing was changed: start a new run "
            f"from its weights with --init_from={os.path.join(config.run_dir, 'model.keras')} "
            f"--conv_padding=tf_same, or finish it with arat_tf 0.1."
        )


def _read_previous_config(run_dir):
    """The `config.json` of a previous run in `run_dir` ({} if there is none or it is unreadable)."""
    path = os.path.join(run_dir, "config.json")
    try:
        with open(path) as stream:
            value = json.load(stream)
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def train(config, strategy=None):
    """Trains `config` (a `TrainConfig`) and writes its run directory.

    Args:
        config: a `TrainConfig`; "auto" values are resolved here.
        strategy: a `tf.distribute.Strategy` (default: `config.strategy`, built by
            `arat_tf.distribution.make_strategy`; "default" is the current/default strategy).

    Returns:
        `(classifier, history_records)`: the trained `BranchedClassifier` and the per-epoch records.

    Raises:
        DistributionError: the strategy cannot be built, or --batch_size (the global batch) is not
            divisible by the number of replicas.
    """
    config = config.resolve()
    # First: logical devices and MultiWorkerMirroredStrategy need an uninitialised runtime.
    strategy = strategy or make_strategy(config.strategy, config.cpu_replicas)
    replicas = strategy.num_replicas_in_sync
    if config.batch_size % replicas:
        raise DistributionError(
            f"--batch_size={config.batch_size} is the global batch and must be divisible by the "
            f"{replicas} replicas of --strategy={config.strategy}."
        )
    chief = is_chief(strategy)
    private_dir = None if chief else tempfile.mkdtemp(prefix="arat-worker-")
    try:
        return _train(config, strategy, chief, private_dir)
    finally:
        if private_dir is not None:
            shutil.rmtree(private_dir, ignore_errors=True)


def _train(config, strategy, chief, private_dir):
    """`train` once the strategy is known; a non-chief worker writes only into `private_dir`."""
    keras.utils.set_random_seed(config.seed)
    spec = dataset_spec(config.dataset)
    run_dir = config.run_dir
    checkpoint_dir = os.path.join(run_dir, "checkpoints")
    _check_run_dir(config, checkpoint_dir)

    replicas = strategy.num_replicas_in_sync
    train_data, validation_data, probe_data, steps_per_epoch = build_datasets(config, spec,
                                                                              replicas)
    if strategy.extended._in_multi_worker_mode():  # pylint: disable=protected-access
        train_data, validation_data = (
            _shard_by_data(train_data), _shard_by_data(validation_data)
        )
    if chief:
        os.makedirs(run_dir, exist_ok=True)
    with strategy.scope():
        classifier = build_classifier(config, spec)
        trainer = build_trainer(config, classifier)
        compile_trainer(trainer, config, steps_per_epoch)
        if strategy.extended._in_multi_worker_mode():  # pylint: disable=protected-access
            _work_around_keras_multi_worker(trainer)
        extra_state = {}
        if config.swa:
            extra_state["weight_average"] = WeightAverage(classifier.trainable_variables)

    checkpoint = run_callbacks.EpochCheckpoint(
        checkpoint_dir, trainer,
        save_directory=None if chief else os.path.join(private_dir, "checkpoints"), **extra_state
    )
    first_epoch = checkpoint.restore() if config.resume else 0
    if config.init_from and first_epoch == 0:
        predictors = getattr(trainer, "predictors", None)
        for note in warm_start(classifier, config.init_from, predictors):
            print(f"--init_from: {note}.")
    elif config.init_from:
        print(f"--init_from ignored: resuming from the checkpoint of epoch {first_epoch}.")
    if first_epoch >= config.epochs:
        logging.info("All %d epochs already trained in %s.", config.epochs, run_dir)
    if chief:
        atomic_write_text(os.path.join(run_dir, "flags.txt"), config_to_flagfile(config))
        atomic_write_json(os.path.join(run_dir, "config.json"), config_as_dict(config))
    print(
        f"Training {config.method} / {config.model} (bn_mode={config.bn_mode}) on {config.dataset}: "
        f"{steps_per_epoch} steps per epoch, global batch {config.batch_size} = "
        f"{config.batch_size // replicas} per replica x {replicas} replica(s)"
        f"{'' if config.strategy == 'default' else f' (--strategy={config.strategy})'}; "
        f"epochs {first_epoch + 1}..{config.epochs}."
    )

    callbacks = []
    if isinstance(trainer, AratTrainer) and config.ce_weights == "auto":
        callbacks.append(run_callbacks.CeWeightAutoBalance(trainer, probe_data))
    metrics_writer = run_callbacks.EpochMetricsWriter(
        os.path.join(run_dir if chief else private_dir, "metrics.json"), first_epoch
    )
    if config.swa:
        callbacks.append(StochasticWeightAveraging(
            extra_state["weight_average"], config.swa_start_epoch - 1, config.swa_every
        ))
    callbacks += [run_callbacks.NonFiniteLossGuard(checkpoint_dir), metrics_writer]
    if chief:
        callbacks.append(
            keras.callbacks.TensorBoard(os.path.join(run_dir, "tensorboard"), update_freq="epoch")
        )
    if config.analyze_every_steps:
        callbacks.append(AnalysisCallback(
            trainer, next(iter(fixed_training_probe(config))), config.analyze_every_steps,
            os.path.join(run_dir, "analysis"), write=chief,
        ))
    callbacks.append(checkpoint)
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
    # Reading the on-read BN statistics is a collective op under MultiWorkerMirroredStrategy, so
    # every worker saves; only the chief's copy is kept.
    output_dir = run_dir if chief else private_dir
    atomic_save_model(classifier, os.path.join(output_dir, "model.keras"))
    if getattr(trainer, "predictors", None):
        save_predictor_heads(trainer.predictors, os.path.join(output_dir, PREDICTOR_HEADS_FILE))
    return classifier, metrics_writer.records

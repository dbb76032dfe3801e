"""`load_run_trainer`: a run directory's trained model inside its method's trainer, for the analyses.

The analyses need more than `model.keras`: gradient conflict differentiates the method's loss
terms, so it needs the trainer (the method, its weights, its training attack) and, for ARAT, the
trained predictor heads and CE weights, which live only in the training checkpoints (the exported
model drops them). So the trainer is rebuilt from `config.json` exactly as `arat_tf.train` built
it, the newest checkpoint restored into it (or, in a directory of `arat_tf.import_torch`, the
predictor heads of `predictor_heads.npz`), and then the classifier's weights set from
`model.keras`, which is the model that was reported (it differs from the last checkpoint after SWA).
Problems with the run directory end the command with `error: ...` (see `arat_tf.run_files`).
"""

import os

from arat_tf.models.branched_classifier import LEGACY_CONV_PADDING
from arat_tf.run_files import load_classifier, read_json_object


def _config_from_run(run_dir):
    from arat_tf.config import TrainConfig, config_fields

    path = os.path.join(run_dir, "config.json")
    values = read_json_object(path, "run config")
    if values is None:
        raise SystemExit(
            f"error: {path} not found: --run_dir must be a run directory written by arat_tf.train."
        )
    known = {field.name for field in config_fields()}
    if "conv_padding" not in values:  # a run of arat_tf 0.1: its model.keras pads as TF's "same"
        values = dict(values, conv_padding=LEGACY_CONV_PADDING)
    try:
        return TrainConfig(**{k: v for k, v in values.items() if k in known}).resolve()
    except (TypeError, ValueError) as error:
        raise SystemExit(f"error: the run config {path} is not valid: {error}") from None


def load_run_trainer(run_dir):
    """Rebuilds a run's trainer around its trained classifier.

    Args:
        run_dir: a run directory of `arat_tf.train` (config.json, model.keras, checkpoints/).

    Returns:
        `(trainer, config, notes)`: the `AdversarialTrainer` (compiled, not for further training),
        the resolved `TrainConfig`, and a list of notes on what could not be restored.
    """
    if not os.path.isdir(run_dir):
        raise SystemExit(f"error: run directory not found: {run_dir}")
    config = _config_from_run(run_dir)
    trained = load_classifier(os.path.join(run_dir, "model.keras"))

    from arat_tf.callbacks import CheckpointError, EpochCheckpoint
    from arat_tf.data import dataset_spec
    from arat_tf.training import build_classifier, build_trainer, compile_trainer
    from arat_tf.warm_start import PREDICTOR_HEADS_FILE, load_predictor_heads

    classifier = build_classifier(config, dataset_spec(config.dataset))
    trainer = build_trainer(config, classifier)
    compile_trainer(trainer, config, steps_per_epoch=1)
    notes = []
    checkpoint_dir = os.path.join(run_dir, "checkpoints")
    try:
        epochs = EpochCheckpoint(checkpoint_dir, trainer).restore()
    except CheckpointError as error:
        epochs = 0
        notes.append(f"checkpoint not restored ({error})")
    heads = os.path.join(run_dir, PREDICTOR_HEADS_FILE)
    if epochs == 0 and getattr(trainer, "predictors", None) and os.path.isfile(heads):
        load_predictor_heads(trainer.predictors, heads)
        notes.append(f"no training checkpoint: predictor heads from {PREDICTOR_HEADS_FILE}, CE "
                     f"weights the configured ones")
    elif epochs == 0:
        notes.append("no training checkpoint: predictor heads are untrained and the CE weights are "
                     "the configured ones; gradient conflict of ARAT with a predictor is not "
                     "the trained model's")
    try:
        classifier.set_weights(trained.get_weights())
    except ValueError as error:
        raise SystemExit(
            f"error: {os.path.join(run_dir, 'model.keras')} does not match the model described by "
            f"config.json: {error}"
        ) from None
    return trainer, config, notes

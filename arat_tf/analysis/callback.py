"""`AnalysisCallback`: the probe-set analyses every N training steps, during `fit`."""

import os

import keras
import tensorflow as tf

from arat_tf.analysis.suite import ProbeAnalyses, unavailable_analyses
from arat_tf.io_utils import atomic_write_json

DURING_TRAINING_ANALYSES = ("gradient_conflict", "mixture")


def step_file_name(step):
    """`step_0000120.json`: zero-padded, so a directory listing is in training order."""
    return f"step_{int(step):07d}.json"


class AnalysisCallback(keras.callbacks.Callback):
    """Every `every_steps` optimizer steps, runs gradient conflict and the mixture analysis on one
    fixed probe batch and writes `output_dir/step_<k>.json` (k = the global step, so a resumed run
    continues the series).

    The paper follows the gradient conflict over training; one fixed batch makes successive
    points comparable (only the model changes). The model is left exactly as found
    (`preserved_state` restores BN moving statistics); the analysis does draw random numbers for
    its attack's random start, so later training batches see a different random stream than a run
    without the callback. Per-channel feature lists are left out of these files (see the CLI).

    Args:
        trainer: the `AdversarialTrainer` being fit.
        probe_batch: `(images, labels)`, e.g. the first batch of training images.
        every_steps: run every N optimizer steps (>= 1).
        output_dir: where the step files go (`run_dir/analysis`).
        analyses: subset of ("gradient_conflict", "mixture"); those that do not apply to the method
            (gradient conflict without an invariance term) are dropped. Default: both.
        write: write the files (False on non-chief workers, which still compute in lockstep).
    """

    def __init__(self, trainer, probe_batch, every_steps, output_dir,
                 analyses=DURING_TRAINING_ANALYSES, write=True):
        super().__init__()
        if int(every_steps) < 1:
            raise ValueError(f"every_steps must be >= 1, received every_steps={every_steps}.")
        unknown = set(analyses) - set(DURING_TRAINING_ANALYSES)
        if unknown:
            raise ValueError(
                f"analyses must be a subset of {DURING_TRAINING_ANALYSES}, received {analyses!r}."
            )
        skipped = unavailable_analyses(trainer, analyses)
        self.analyses = [name for name in analyses if name not in skipped]
        self.trainer = trainer
        images, labels = probe_batch
        self.probe_batch = (tf.convert_to_tensor(images, tf.float32), tf.cast(labels, tf.int32))
        self.every_steps = int(every_steps)
        self.output_dir = output_dir
        self.write = bool(write)
        self.written = []
        self._epoch = 0
        self._probe = ProbeAnalyses(trainer, self.analyses) if self.analyses else None

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        if self._probe is None:
            return
        step = int(self.trainer.optimizer.iterations.numpy())
        if step % self.every_steps:
            return
        record = {"step": step, "epoch": self._epoch + 1}
        record.update(self._probe([self.probe_batch], include_channels=False))
        if self.write:
            path = os.path.join(self.output_dir, step_file_name(step))
            atomic_write_json(path, record)
            self.written.append(path)

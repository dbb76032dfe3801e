"""Keras callbacks of a training run: CE auto-balance, NaN guard, per-epoch metrics, checkpoints."""

import csv
import io
import json
import math
import os
import time

import keras
import tensorflow as tf

from arat_tf.io_utils import atomic_write_json, atomic_write_text


class CeWeightAutoBalance(keras.callbacks.Callback):
    """ARAT's auto-balance of its two cross-entropy weights (the authors' default).

    At the start of every epoch it measures the clean-branch accuracy (inference mode) on a probe
    of training images and sets `w_adv = accuracy`, `w_clean = 1 - accuracy`: early on, when the
    model is poor, the clean CE dominates; as it learns, weight shifts to the adversarial CE.
    The values are added to the epoch logs as `w_adv`. The probe is iterated anew every epoch, so
    a probe taken from the shuffled, augmented training pipeline is a fresh sample each time (the
    authors' code), and a fixed one the same images every time (`--auto_balance_sample`).

    Args:
        trainer: an `AratTrainer` (owns `adv_ce_weight` / `clean_ce_weight` variables).
        probe_dataset: batched `(images, labels)`, e.g. the first 8 batches of the training
            pipeline or the first 1,024 training images.
    """

    def __init__(self, trainer, probe_dataset):
        super().__init__()
        self.trainer = trainer
        self.probe_dataset = probe_dataset
        self._count_correct = tf.function(self._count_correct_batch)

    def _count_correct_batch(self, images, labels):
        logits = self.trainer.classifier(images, training=False, branch="clean")
        predictions = tf.argmax(logits, axis=-1, output_type=tf.int32)
        return tf.reduce_sum(tf.cast(predictions == tf.cast(labels, tf.int32), tf.float32))

    def clean_branch_accuracy(self):
        correct, total = 0.0, 0
        for images, labels in self.probe_dataset:
            correct += float(self._count_correct(images, labels))
            total += int(labels.shape[0])
        return correct / max(total, 1)

    def on_epoch_begin(self, epoch, logs=None):
        accuracy = self.clean_branch_accuracy()
        self.trainer.adv_ce_weight.assign(accuracy)
        self.trainer.clean_ce_weight.assign(1.0 - accuracy)

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            logs["w_adv"] = float(self.trainer.adv_ce_weight.numpy())


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite."""


class NonFiniteLossGuard(keras.callbacks.Callback):
    """Stops training with a clear error as soon as the loss is not finite.

    Raising (rather than Keras' TerminateOnNaN, which ends "successfully") keeps the last good
    checkpoint as the newest one and makes the command exit non-zero.

    Args:
        checkpoint_dir: named in the message, where the last good state is.
    """

    def __init__(self, checkpoint_dir):
        super().__init__()
        self.checkpoint_dir = checkpoint_dir
        self._epoch = 0

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(float(loss)):
            saved = (
                f"the last good checkpoint is in {self.checkpoint_dir}"
                if tf.train.latest_checkpoint(self.checkpoint_dir)
                else "no checkpoint had been written yet"
            )
            raise NonFiniteLossError(
                f"Training loss became {float(loss)} in epoch {self._epoch + 1}, batch {batch + 1}. "
                f"Nothing of this epoch was saved; {saved}. Lower --learning_rate or check the "
                f"input data."
            )


def records_as_csv(records):
    """Per-epoch records as CSV text (columns: the union of all keys, "epoch" first)."""
    columns = ["epoch"] + sorted({key for record in records for key in record} - {"epoch"})
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    writer.writerows(records)
    return buffer.getvalue()


class EpochMetricsWriter(keras.callbacks.Callback):
    """Writes `metrics.json` and `metrics.csv`: one record per epoch (all logs, learning rate, wall
    time), both rewritten atomically from the same records.

    On resume the existing records up to the restored epoch are kept and later ones dropped: a crash
    between the metrics write and the checkpoint write leaves no duplicate epoch behind.

    Args:
        json_path: the JSON file; the CSV file sits beside it with a `.csv` suffix.
        first_epoch: 0-based epoch the run starts (or resumes) at.
    """

    def __init__(self, json_path, first_epoch=0):
        super().__init__()
        self.json_path = json_path
        self.csv_path = os.path.splitext(json_path)[0] + ".csv"
        self.records = []
        if first_epoch > 0 and os.path.exists(json_path):
            with open(json_path) as stream:
                self.records = [r for r in json.load(stream) if r["epoch"] <= first_epoch]
        self._start = None

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.time()

    def on_epoch_end(self, epoch, logs=None):
        record = {"epoch": epoch + 1}
        record.update({key: float(value) for key, value in (logs or {}).items()})
        optimizer = getattr(self.model.optimizer, "inner_optimizer", self.model.optimizer)
        record["learning_rate"] = float(
            optimizer.learning_rate if not callable(optimizer._learning_rate)
            else optimizer._learning_rate(optimizer.iterations - 1)
        )
        record["seconds"] = time.time() - self._start
        self.records.append(record)
        atomic_write_json(self.json_path, self.records)
        atomic_write_text(self.csv_path, records_as_csv(self.records))


class CheckpointError(RuntimeError):
    """A checkpoint could not be read (missing files, corrupt data, or another model's)."""


class EpochCheckpoint(keras.callbacks.Callback):
    """Saves trainer + optimizer state at the end of every epoch; `restore()` resumes from it.

    TensorFlow writes the checkpoint files first and then, atomically, the `checkpoint` index that
    names the newest one, so a kill at any moment leaves the previous epoch's checkpoint intact:
    a crash loses at most the epoch in progress.

    Every variable is saved through explicit lists (`trainer.variables`, `optimizer.variables`):
    Keras 3 keeps sublayers in plain Python lists, which `tf.train.Checkpoint`'s object graph does
    not follow, so a checkpoint of the trainer object alone would silently miss every BN moving
    statistic. Restoring asserts that every saved value and every variable was matched.

    Multi-worker runs: every worker must take part in saving (MultiWorkerMirroredStrategy), but
    only the chief may write the run directory, so a non-chief worker passes a private
    `save_directory` (deleted by the caller after the run) and still restores from `directory`.

    Args:
        directory: checkpoint directory (restored from; saved to unless `save_directory`).
        trainer: the compiled `AdversarialTrainer` (its optimizer must be built).
        max_to_keep: how many epoch checkpoints to keep.
        save_directory: where to save instead of `directory` (non-chief workers).
        **extra_state: further trackables saved with it (e.g. SWA's `WeightAverage`).
    """

    def __init__(self, directory, trainer, max_to_keep=2, save_directory=None, **extra_state):
        super().__init__()
        self.directory = directory
        self.save_directory = save_directory or directory
        self.trainer = trainer
        self.completed_epochs = tf.Variable(0, dtype=tf.int64, trainable=False)
        self.checkpoint = tf.train.Checkpoint(
            model_variables=list(trainer.variables),
            optimizer_variables=list(trainer.optimizer.variables),
            completed_epochs=self.completed_epochs,
            **extra_state,
        )
        self.manager = tf.train.CheckpointManager(
            self.checkpoint, self.save_directory, max_to_keep=max_to_keep
        )

    @property
    def latest(self):
        return tf.train.latest_checkpoint(self.directory)

    def restore(self):
        """Restores the newest checkpoint; returns the number of completed epochs (0 if none)."""
        path = self.latest
        if path is None:
            return 0
        try:
            self.checkpoint.restore(path).assert_consumed()
        except (tf.errors.OpError, AssertionError, ValueError, IndexError, KeyError) as error:
            raise CheckpointError(
                f"Cannot restore checkpoint {path}: {type(error).__name__}: "
                f"{str(error).splitlines()[0] if str(error) else ''}. The file is missing, corrupt, "
                f"or was written by a different model/method configuration. Nothing was changed; "
                f"use another --run_dir or remove {self.directory} to start over."
            ) from None
        return int(self.completed_epochs.numpy())

    def on_epoch_end(self, epoch, logs=None):
        self.completed_epochs.assign(epoch + 1)
        self.manager.save(checkpoint_number=epoch + 1)

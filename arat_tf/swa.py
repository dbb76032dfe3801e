"""ARAT+SWA: stochastic weight averaging with the adversarial-BN-statistics refresh."""

import keras
import tensorflow as tf

from arat_tf.attacks import make_forward
from arat_tf.layers import SplitBatchNormalization
from arat_tf.layers.cross_batch_normalization import CrossBatchNormalization


class WeightAverage(tf.Module):
    """Equal running average of a model's trainable variables (`torch.optim.swa_utils.AveragedModel`).

    A `tf.Module`, so the average and its count are saved in the run's checkpoints and survive
    `--resume`.
    """

    def __init__(self, variables):
        super().__init__(name="weight_average")
        self.tracked = list(variables)
        self.averages = [
            tf.Variable(tf.zeros_like(v), trainable=False, name=f"average_{i}")
            for i, v in enumerate(self.tracked)
        ]
        self.count = tf.Variable(0, dtype=tf.int64, trainable=False, name="count")

    @tf.function
    def update(self):
        """`average += (weights - average) / (count + 1)`."""
        weight = 1.0 / tf.cast(self.count + 1, tf.float32)
        for average, variable in zip(self.averages, self.tracked):
            average.assign_add((tf.convert_to_tensor(variable) - average) * weight)
        self.count.assign_add(1)

    def copy_to_model(self):
        """Overwrites the model's trainable variables with their average (if any was taken)."""
        if int(self.count.numpy()) == 0:
            return False
        for average, variable in zip(self.averages, self.tracked):
            variable.assign(average)
        return True


def adversarial_statistics(classifier):
    """`[(layer, moving_mean, moving_variance)]` of the statistics the adversarial branch uses."""
    found = []
    for layer in classifier._flatten_layers(include_self=False):
        if isinstance(layer, SplitBatchNormalization):
            found.append((layer, *layer.moving_statistics("adv")))
        elif isinstance(layer, CrossBatchNormalization):
            found.append((layer, layer.moving_mean, layer.moving_variance))
    return found


def refresh_adversarial_statistics(classifier, dataset, attack, max_batches=None):
    """Recomputes the adversarial branch's BN statistics on PGD examples of the averaged weights.

    Averaged weights do not match any BN statistics seen in training, so (as `update_bn` in
    PyTorch's SWA) the statistics are re-estimated as an equal average over one pass of the training
    data, here of adversarial examples, since the adversarial branch is the one used at inference.
    The examples are crafted on the averaged weights with BN in inference mode using the adversarial
    statistics of the last training step (the best estimate available before the refresh); the
    clean branch is left as it is.

    Args:
        classifier: the `BranchedClassifier`, holding the averaged weights.
        dataset: batched `(images, labels)`.
        attack: `AttackConfig` used to craft the examples.
        max_batches: stop after this many batches (None: the whole dataset).

    Returns:
        Number of batches used.
    """
    statistics = adversarial_statistics(classifier)
    forward = make_forward(classifier, branch="adv", bn_mode="inference")
    crafted = []
    for index, (images, labels) in enumerate(dataset):
        if max_batches is not None and index >= max_batches:
            break
        crafted.append(attack.run(forward, images, labels))
    original_momenta = [layer.momentum for layer, _, _ in statistics]
    for _, mean, variance in statistics:
        mean.assign(tf.zeros_like(mean))
        variance.assign(tf.ones_like(variance))
    try:
        for count, images in enumerate(crafted):
            # momentum k/(k+1) turns the moving average into an equal (cumulative) average.
            for layer, _, _ in statistics:
                layer.momentum = count / (count + 1.0)
            classifier(images, training=True, branch="adv")
    finally:
        for (layer, _, _), momentum in zip(statistics, original_momenta):
            layer.momentum = momentum
    return len(crafted)


def finalize_weight_average(classifier, weight_average, dataset, attack):
    """Copies the average into `classifier` and refreshes its adversarial BN statistics.

    Returns:
        Whether an average existed (no averaging step: the classifier is left unchanged).
    """
    if not weight_average.copy_to_model():
        return False
    refresh_adversarial_statistics(classifier, dataset, attack)
    return True


class StochasticWeightAveraging(keras.callbacks.Callback):
    """Averages the classifier's weights every `every_steps` iterations from `start_epoch` on (the
    paper's "ARAT+SWA": from epoch 76 of 100, every 500 iterations). The averaged weights replace the
    trained ones only at the end (`finalize_weight_average`), so checkpoints keep training resumable.

    Args:
        weight_average: the run's `WeightAverage` (also saved in the checkpoints).
        start_epoch: first 0-based epoch that averages.
        every_steps: averaging period in optimizer iterations.
    """

    def __init__(self, weight_average, start_epoch, every_steps):
        super().__init__()
        self.weight_average = weight_average
        self.start_epoch = start_epoch
        self.every_steps = every_steps
        self._epoch = 0

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        iterations = int(self.model.optimizer.iterations.numpy())
        if self._epoch >= self.start_epoch and iterations % self.every_steps == 0:
            self.weight_average.update()

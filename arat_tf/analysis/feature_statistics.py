"""The mixture-distribution analysis: how differently clean and adversarial inputs are distributed
where BN normalises them (ARAT section 1; the Dual-BN paper's NS question).

Two measurements:

- `FeatureStatisticsProbe`: per-channel mean and variance, over examples, of the clean and the
  adversarial features at every tap (the pooled representations ARAT's invariance loss
  regularises), and the distances between them (`gaussian_distances`). Three routings:
    - "deployed": both inputs through the evaluation branch (`trainer.eval_branch`, adv for ARAT),
      BN in inference mode: the features of the model that is reported and exported;
    - "branches": each input through its own branch (clean -> clean, adversarial -> adv), BN in
      inference mode (moving statistics);
    - "training": as the training loss sees them (`forward_adversarial_and_clean`: BN in training
      mode with batch statistics, the mixed batch for shared-statistics variants). Model state is
      restored afterwards.
  With a single (shared) BN, "branches" equals "deployed".
- `bn_moving_statistics_distances`: at every BN site with split statistics, the distance between
  the clean and the adversarial branch's moving mean/variance: what each branch learned the
  input distribution of that layer to be. Large distances are the mixture problem a single BN
  would have averaged over.
"""

import numpy as np
import tensorflow as tf

from arat_tf.analysis.channel_distances import gaussian_distances
from arat_tf.analysis.model_state import preserved_state
from arat_tf.evaluation.branches import split_layers
from arat_tf.methods.adversarial_trainer import forward_adversarial_and_clean

ROUTINGS = ("deployed", "branches", "training")


class ChannelMoments:
    """Running per-channel count, sum and sum of squares of `[batch, channels]` features (float64)."""

    def __init__(self):
        self.count = 0
        self.total = None
        self.total_squares = None

    def update(self, features):
        features = np.asarray(features, dtype=np.float64)
        features = features.reshape(-1, features.shape[-1])
        if self.total is None:
            self.total = np.zeros(features.shape[-1])
            self.total_squares = np.zeros(features.shape[-1])
        self.count += features.shape[0]
        self.total += features.sum(axis=0)
        self.total_squares += np.square(features).sum(axis=0)

    def mean_and_variance(self):
        """Per-channel mean and (population) variance of everything seen so far."""
        if not self.count:
            raise ValueError("ChannelMoments has seen no features.")
        mean = self.total / self.count
        return mean, np.maximum(self.total_squares / self.count - np.square(mean), 0.0)


class FeatureStatisticsProbe:
    """Accumulates clean/adversarial tap statistics over batches; `result()` summarises them.

    Args:
        trainer: an `AdversarialTrainer` (its classifier, `eval_branch` and BN routing).
        routings: a subset of `ROUTINGS`.

    Example:

    >>> probe = FeatureStatisticsProbe(trainer)
    >>> probe.update(images, adversarial_images)
    >>> probe.result()["deployed"]["fc1"]["wasserstein2"]
    """

    def __init__(self, trainer, routings=ROUTINGS):
        unknown = set(routings) - set(ROUTINGS)
        if unknown or not routings:
            raise ValueError(f"routings must be a non-empty subset of {ROUTINGS}, received {routings!r}.")
        self.trainer = trainer
        self.routings = tuple(routings)
        self.tap_names = list(trainer.classifier.tap_names)
        self._moments = {
            routing: {(tap, side): ChannelMoments() for tap in self.tap_names for side in ("clean", "adv")}
            for routing in self.routings
        }
        self._taps = {routing: tf.function(getattr(self, f"_{routing}_taps"), reduce_retracing=True)
                      for routing in self.routings}

    def _deployed_taps(self, images, adversarial_images):
        classifier, branch = self.trainer.classifier, self.trainer.eval_branch
        _, clean = classifier(images, training=False, branch=branch, return_taps=True)
        _, adv = classifier(adversarial_images, training=False, branch=branch, return_taps=True)
        return clean, adv

    def _branches_taps(self, images, adversarial_images):
        classifier = self.trainer.classifier
        _, clean = classifier(images, training=False, branch="clean", return_taps=True)
        _, adv = classifier(adversarial_images, training=False, branch="adv", return_taps=True)
        return clean, adv

    def _training_taps(self, images, adversarial_images):
        _, _, adv, clean = forward_adversarial_and_clean(
            self.trainer.classifier, adversarial_images, images, return_taps=True
        )
        return clean, adv

    def update(self, images, adversarial_images):
        """Adds one batch of clean images and their adversarial examples."""
        images = tf.convert_to_tensor(images, tf.float32)
        adversarial_images = tf.convert_to_tensor(adversarial_images, tf.float32)
        for routing in self.routings:
            with preserved_state(self.trainer):
                clean, adv = self._taps[routing](images, adversarial_images)
            for tap in self.tap_names:
                self._moments[routing][(tap, "clean")].update(clean[tap].numpy())
                self._moments[routing][(tap, "adv")].update(adv[tap].numpy())

    def result(self, include_channels=True):
        """`{routing: {tap: {the gaussian_distances between clean and adv, examples, and with
        `include_channels` the per-channel lists clean_mean, clean_variance, adv_mean,
        adv_variance}}}`."""
        summary = {}
        for routing in self.routings:
            per_tap = {}
            for tap in self.tap_names:
                clean_mean, clean_variance = self._moments[routing][(tap, "clean")].mean_and_variance()
                adv_mean, adv_variance = self._moments[routing][(tap, "adv")].mean_and_variance()
                per_tap[tap] = {
                    **gaussian_distances(clean_mean, clean_variance, adv_mean, adv_variance),
                    "examples": self._moments[routing][(tap, "clean")].count,
                }
                if include_channels:
                    per_tap[tap].update(
                        clean_mean=clean_mean.tolist(), clean_variance=clean_variance.tolist(),
                        adv_mean=adv_mean.tolist(), adv_variance=adv_variance.tolist(),
                    )
            summary[routing] = per_tap
        return summary


def tap_feature_statistics(trainer, batches, routings=ROUTINGS):
    """`FeatureStatisticsProbe(trainer, routings)` fed every `(images, adversarial_images)` of
    `batches`; returns its `result()`."""
    probe = FeatureStatisticsProbe(trainer, routings)
    for images, adversarial_images in batches:
        probe.update(images, adversarial_images)
    return probe.result()


def _site_name(layer):
    """A BN site's name relative to the model, e.g. "block4.0/bn1"."""
    path = layer.moving_statistics("adv")[0].path
    return path.split("/", 1)[-1].rsplit("/", 1)[0]


def bn_moving_statistics_distances(classifier):
    """`{BN site: gaussian_distances(clean moving mean/var, adv moving mean/var)}`, in network order,
    for every BN site with split statistics; `{}` for a model without (single or shared-statistics
    BN, where both branches share one set of statistics)."""
    order = {id(variable): index for index, variable in enumerate(classifier.non_trainable_variables)}
    layers = sorted(split_layers(classifier, "statistics"),
                    key=lambda layer: order.get(id(layer.moving_statistics("adv")[0]), 0))
    distances = {}
    for layer in layers:
        clean_mean, clean_variance = (v.numpy() for v in layer.moving_statistics("clean"))
        adv_mean, adv_variance = (v.numpy() for v in layer.moving_statistics("adv"))
        distances[_site_name(layer)] = gaussian_distances(
            clean_mean, clean_variance, adv_mean, adv_variance
        )
    return distances

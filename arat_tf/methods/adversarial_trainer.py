"""AdversarialTrainer: the `keras.Model` whose `train_step` every method shares."""

import keras
import tensorflow as tf

from arat_tf.attacks import AttackConfig, make_forward
from arat_tf.layers.batch_statistics import training_attack


def mean_cross_entropy(logits, labels):
    """Mean sparse cross-entropy from logits over the (per-replica) batch."""
    return tf.reduce_mean(
        tf.nn.sparse_softmax_cross_entropy_with_logits(labels=tf.cast(labels, tf.int32), logits=logits)
    )


def split_halves(tensor):
    """`[adv; clean]` -> `(adv, clean)` for the outputs of a mixed-batch call."""
    adv, clean = tf.split(tensor, 2, axis=0)  # not slicing: see batch_statistics.split_mixed_batch
    return adv, clean


def forward_adversarial_and_clean(classifier, adversarial_images, images, return_taps=False):
    """Training-mode outputs of both batches: `(adv_logits, clean_logits[, adv_taps, clean_taps])`.

    Normalisation variants that pool statistics over the two batches (shared statistics, single BN,
    cross normalisation) need one "mixed" call on the concatenated batch. With split statistics the
    mixed call equals two separate calls, which are cheaper: no split and concatenation of the
    activations at every BN site, forward and backward.
    """
    if getattr(classifier, "bn_mode", None) in ("dual", "shared_affine"):
        adv = classifier(adversarial_images, training=True, branch="adv", return_taps=return_taps)
        clean = classifier(images, training=True, branch="clean", return_taps=return_taps)
        if not return_taps:
            return adv, clean
        return adv[0], clean[0], adv[1], clean[1]
    mixed = tf.concat([adversarial_images, images], axis=0)
    outputs = classifier(mixed, training=True, branch="mixed", return_taps=return_taps)
    if not return_taps:
        return split_halves(outputs)
    logits, taps = outputs
    adv_logits, clean_logits = split_halves(logits)
    halves = {name: split_halves(tap) for name, tap in taps.items()}
    return (adv_logits, clean_logits, {n: h[0] for n, h in halves.items()},
            {n: h[1] for n, h in halves.items()})


class AdversarialTrainer(keras.Model):
    """Wraps a `BranchedClassifier` and trains it adversarially with `fit()`.

    `train_step` generates the training attack (a graph loop under `tf.GradientTape`), asks the
    method for its loss terms (`compute_losses`), and applies the gradient of the total loss
    divided by `num_replicas_in_sync`: every term here is a hand-written per-replica mean, which
    Keras does not rescale under `tf.distribute`, and the optimizer SUMS gradients over replicas.
    Logged values are the unscaled per-replica means, averaged over the epoch by Keras metrics.

    `test_step` reports clean accuracy and PGD accuracy (the evaluation attack, BN in inference
    mode) on the validation data, through `eval_branch`; the branch is part of the metric name
    (e.g. `val_pgd10_acc_advbn`). Models with split statistics or affine parameters also report
    clean accuracy through the clean branch, the paper's secondary number.

    Subclasses set `loss_term_names` and implement `compute_losses`.

    Args:
        classifier: a `arat_tf.models.BranchedClassifier`.
        train_attack: `AttackConfig` of the attack that crafts training examples.
        attack_bn_mode: "inference" (BN moving statistics, never updated: the community's protocol)
            or "train" (batch statistics; the adversarial branch's moving statistics are updated by
            every attack step: the ARAT authors' protocol). The clean branch is never touched.
            Under `tf.distribute`, a training-mode attack uses per-replica batch statistics even
            with synchronised BN (see `training_attack`).
        eval_attack: `AttackConfig` of the validation attack (run in inference mode).
        eval_branch: BN branch of every validation number and of `call()`.
        **kwargs: base `keras.Model` arguments.
    """

    loss_term_names = ()

    def __init__(
        self,
        classifier,
        *,
        train_attack=AttackConfig(),
        attack_bn_mode="inference",
        eval_attack=AttackConfig(),
        eval_branch="adv",
        **kwargs,
    ):
        super().__init__(**kwargs)
        if eval_branch not in ("adv", "clean"):
            raise ValueError(f"eval_branch must be 'adv' or 'clean', received {eval_branch!r}.")
        if attack_bn_mode not in ("inference", "train"):
            raise ValueError(
                f"attack_bn_mode must be 'inference' or 'train', received {attack_bn_mode!r}."
            )
        self.classifier = classifier
        self.train_attack = train_attack
        self.attack_bn_mode = attack_bn_mode
        self.eval_attack = eval_attack
        self.eval_branch = eval_branch
        self.loss_tracker = keras.metrics.Mean(name="loss")
        self.term_trackers = [keras.metrics.Mean(name=name) for name in self.loss_term_names]
        self.clean_accuracy = keras.metrics.SparseCategoricalAccuracy(name="clean_acc")
        self.adv_accuracy = keras.metrics.SparseCategoricalAccuracy(name="adv_acc")
        suffix = f"{eval_branch}bn"
        self.val_clean_accuracy = keras.metrics.SparseCategoricalAccuracy(name=f"clean_acc_{suffix}")
        self.val_robust_accuracy = keras.metrics.SparseCategoricalAccuracy(
            name=f"pgd{eval_attack.steps}_acc_{suffix}"
        )
        self.val_metrics = [self.val_clean_accuracy, self.val_robust_accuracy]
        self.has_branches = classifier.bn_mode in ("dual", "shared_stats", "shared_affine")
        other = "clean" if eval_branch == "adv" else "adv"
        if self.has_branches:
            self.val_other_branch_accuracy = keras.metrics.SparseCategoricalAccuracy(
                name=f"clean_acc_{other}bn"
            )
            self.val_metrics.append(self.val_other_branch_accuracy)
        self._other_branch = other

    @property
    def train_metrics(self):
        return [self.loss_tracker, *self.term_trackers, self.clean_accuracy, self.adv_accuracy]

    @property
    def metrics(self):
        return self.train_metrics + self.val_metrics

    def call(self, inputs, training=False):
        return self.classifier(inputs, training=training, branch=self.eval_branch)

    def attack_forward(self, branch="adv"):
        """The logits function the training attack differentiates (branch + BN mode)."""
        return make_forward(self.classifier, branch=branch, bn_mode=self.attack_bn_mode)

    def generate_adversarial(self, images, labels):
        """Training adversarial examples; PGD on the adversarial branch unless overridden."""
        return self.train_attack.run(self.attack_forward("adv"), images, labels)

    def compute_losses(self, images, adversarial_images, labels):
        """Returns `(total_loss, {term_name: value}, clean_logits, adv_logits)` in training mode.

        `clean_logits` may be None when the method never evaluates clean images with gradients.
        """
        raise NotImplementedError("AdversarialTrainer subclasses implement compute_losses().")

    def train_step(self, data):
        images, labels = data
        with training_attack():
            adversarial_images = tf.stop_gradient(self.generate_adversarial(images, labels))
        with tf.GradientTape() as tape:
            total_loss, terms, clean_logits, adv_logits = self.compute_losses(
                images, adversarial_images, labels
            )
            replicas = tf.distribute.get_strategy().num_replicas_in_sync
            # Divided by the replicas (the optimizer sums their gradients) and, under float16,
            # multiplied by the dynamic loss scale, which `apply` divides out again (and skips
            # the step on a non-finite gradient).
            scaled_loss = self.optimizer.scale_loss(total_loss / tf.cast(replicas, total_loss.dtype))
        variables = self.trainable_variables
        gradients = tape.gradient(scaled_loss, variables)
        self.optimizer.apply(gradients, variables)

        if clean_logits is None:
            clean_logits = self.classifier(images, training=False, branch="clean")
        self.loss_tracker.update_state(total_loss)
        for tracker in self.term_trackers:
            tracker.update_state(terms[tracker.name])
        self.clean_accuracy.update_state(labels, clean_logits)
        self.adv_accuracy.update_state(labels, adv_logits)
        return {metric.name: metric.result() for metric in self.train_metrics}

    def test_step(self, data):
        images, labels = data
        forward = make_forward(self.classifier, branch=self.eval_branch, bn_mode="inference")
        adversarial_images = self.eval_attack.run(forward, images, labels)
        self.val_clean_accuracy.update_state(labels, forward(images))
        self.val_robust_accuracy.update_state(labels, forward(adversarial_images))
        if self.has_branches:
            self.val_other_branch_accuracy.update_state(
                labels, self.classifier(images, training=False, branch=self._other_branch)
            )
        return {metric.name: metric.result() for metric in self.val_metrics}

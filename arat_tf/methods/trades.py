"""TRADES (Zhang et al. 2019)."""

import dataclasses

import tensorflow as tf

from arat_tf.attacks import make_forward
from arat_tf.methods.adversarial_trainer import AdversarialTrainer, mean_cross_entropy


def kl_batchmean(logits_p, logits_q):
    """KL(softmax(p) || softmax(q)) summed over classes, averaged over the batch (TRADES' form)."""
    log_p = tf.nn.log_softmax(logits_p)
    log_q = tf.nn.log_softmax(logits_q)
    return tf.reduce_mean(tf.reduce_sum(tf.exp(log_p) * (log_p - log_q), axis=-1))


class TradesTrainer(AdversarialTrainer):
    """`L = CE(f(x), y) + beta * KL(softmax f(x) || softmax f(x'))`.

    x' maximises the same KL, starting from `x + 0.001 * N(0, 1)` (the original code's start); the
    reference logits f(x) of the attack are computed with the attack's BN mode (inference in the
    original: `model.eval()` during the attack). The `train_attack`'s eps/step/steps are used; its
    loss and start are TRADES' own.

    Args:
        classifier: the model.
        beta: weight of the KL term (6 in the paper; its README allows 1..10).
        **kwargs: `AdversarialTrainer` arguments.
    """

    loss_term_names = ("ce_clean", "kl")

    def __init__(self, classifier, *, beta=6.0, **kwargs):
        super().__init__(classifier, **kwargs)
        if beta < 0:
            raise ValueError(f"beta must be >= 0, received beta={beta}.")
        self.beta = float(beta)

    def generate_adversarial(self, images, labels):
        forward = self.attack_forward("adv")
        reference_logits = tf.stop_gradient(
            make_forward(self.classifier, branch="adv", bn_mode="inference")(images)
        )
        kl_attack = dataclasses.replace(self.train_attack, loss="kl", start="gaussian")
        return kl_attack.run(forward, images, reference_logits)

    def compute_losses(self, images, adversarial_images, labels):
        clean_logits = self.classifier(images, training=True, branch="adv")
        adv_logits = self.classifier(adversarial_images, training=True, branch="adv")
        ce_clean = mean_cross_entropy(clean_logits, labels)
        kl = kl_batchmean(clean_logits, adv_logits)
        total = ce_clean + self.beta * kl
        return total, {"ce_clean": ce_clean, "kl": kl}, clean_logits, adv_logits

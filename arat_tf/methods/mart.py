"""MART (Wang et al. 2020): misclassification-aware adversarial training."""

import tensorflow as tf

from arat_tf.methods.adversarial_trainer import AdversarialTrainer, mean_cross_entropy


class MartTrainer(AdversarialTrainer):
    """`L = BCE(f(x'), y) + beta * mean[ KL(p(x) || p(x')) * (1 - p_y(x)) ]`, as the MART code.

    The boosted CE is `CE(f(x'), y) - log(1.0001 - max_{k != y} p_k(x'))`; the KL term is weighted
    per example by how badly the clean example is classified. The attack is PGD-CE (the original
    code starts from `x + 0.001 * N(0, 1)`, set with `--attack_start gaussian`).

    Args:
        classifier: the model.
        beta: weight of the misclassification-aware KL term (5 for ResNet-18, 6 for WRN).
        **kwargs: `AdversarialTrainer` arguments.
    """

    loss_term_names = ("bce_adv", "kl_weighted")

    def __init__(self, classifier, *, beta=5.0, **kwargs):
        super().__init__(classifier, **kwargs)
        if beta < 0:
            raise ValueError(f"beta must be >= 0, received beta={beta}.")
        self.beta = float(beta)

    def compute_losses(self, images, adversarial_images, labels):
        labels = tf.cast(labels, tf.int32)
        clean_logits = self.classifier(images, training=True, branch="adv")
        adv_logits = self.classifier(adversarial_images, training=True, branch="adv")
        adv_probs = tf.nn.softmax(adv_logits)
        clean_probs = tf.nn.softmax(clean_logits)
        true_class = tf.one_hot(labels, tf.shape(adv_logits)[-1], dtype=adv_probs.dtype)

        # The most likely wrong class of x' (MART's argsort over the top two).
        wrong_probs = adv_probs - true_class * 2.0
        other_class = tf.argmax(wrong_probs, axis=-1, output_type=tf.int32)
        other_prob = tf.gather(adv_probs, other_class, batch_dims=1)
        bce_adv = mean_cross_entropy(adv_logits, labels) - tf.reduce_mean(
            tf.math.log(1.0001 - other_prob + 1e-12)
        )

        kl = tf.reduce_sum(
            clean_probs * (tf.math.log(clean_probs + 1e-12) - tf.math.log(adv_probs + 1e-12)), axis=-1
        )
        true_prob = tf.reduce_sum(clean_probs * true_class, axis=-1)
        kl_weighted = tf.reduce_mean(kl * (1.0000001 - true_prob))
        total = bce_adv + self.beta * kl_weighted
        return total, {"bce_adv": bce_adv, "kl_weighted": kl_weighted}, clean_logits, adv_logits

"""PGD-AT (Madry et al. 2018): cross-entropy on adversarial examples only."""

from arat_tf.methods.adversarial_trainer import AdversarialTrainer, mean_cross_entropy


class PgdAtTrainer(AdversarialTrainer):
    """`L = CE(f(x'), y)` with x' the PGD example. Single BN (`bn_mode="single"`) in the paper's
    baseline; clean training accuracy is measured with one extra inference-mode forward pass.

    Example:

    >>> trainer = PgdAtTrainer(build_model("resnet", num_classes=10, image_shape=(32, 32, 3),
    ...                                    bn_mode="single", width=0.25))
    """

    loss_term_names = ("ce_adv",)

    def compute_losses(self, images, adversarial_images, labels):
        adv_logits = self.classifier(adversarial_images, training=True, branch="adv")
        ce_adv = mean_cross_entropy(adv_logits, labels)
        return ce_adv, {"ce_adv": ce_adv}, None, adv_logits

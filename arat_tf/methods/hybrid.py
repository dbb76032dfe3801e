"""Hybrid AT (the Dual-BN paper): half clean, half adversarial cross-entropy."""

from arat_tf.methods.adversarial_trainer import (
    AdversarialTrainer,
    forward_adversarial_and_clean,
    mean_cross_entropy,
)


class HybridTrainer(AdversarialTrainer):
    """`L = clean_weight * CE(f(x), y) + (1 - clean_weight) * CE(f(x'), y)`, default 0.5 / 0.5.

    Both batches are normalised as the classifier's `bn_mode` decides (one mixed-batch pass on
    `[x'; x]` where statistics are pooled, see `forward_adversarial_and_clean`) (dual BN, shared statistics + dual affine, dual statistics + shared affine,
    single BN, or Cross-AT's cross normalisation with one half's statistics). This is the Dual-BN
    paper's whole study with one trainer; `cross_at` is this trainer with a `cross_*` bn_mode.

    Args:
        classifier: the model.
        clean_weight: weight of the clean cross-entropy, in [0, 1].
        **kwargs: `AdversarialTrainer` arguments.
    """

    loss_term_names = ("ce_clean", "ce_adv")

    def __init__(self, classifier, *, clean_weight=0.5, **kwargs):
        super().__init__(classifier, **kwargs)
        if not 0.0 <= clean_weight <= 1.0:
            raise ValueError(f"clean_weight must be in [0, 1], received clean_weight={clean_weight}.")
        self.clean_weight = float(clean_weight)

    def compute_losses(self, images, adversarial_images, labels):
        adv_logits, clean_logits = forward_adversarial_and_clean(
            self.classifier, adversarial_images, images
        )
        ce_clean = mean_cross_entropy(clean_logits, labels)
        ce_adv = mean_cross_entropy(adv_logits, labels)
        total = self.clean_weight * ce_clean + (1.0 - self.clean_weight) * ce_adv
        return total, {"ce_clean": ce_clean, "ce_adv": ce_adv}, clean_logits, adv_logits

"""ARAT (Waseda et al., ICLR 2025): asymmetric representation-regularised adversarial training."""

import keras
import tensorflow as tf

from arat_tf.layers import Predictor
from arat_tf.methods.adversarial_trainer import (
    AdversarialTrainer,
    forward_adversarial_and_clean,
    mean_cross_entropy,
)

INVARIANCE_DISTANCES = ("cos", "mse")


def build_predictors(classifier, hidden_ratio=0.25):
    """One built `Predictor` per feature tap of `classifier`: `{tap name: Predictor}`.

    Each head is sized to its tap and named `predictor_<tap>`; its BN is synchronised across
    replicas when the classifier's is.
    """
    _, taps = classifier(tf.zeros((2,) + classifier.image_shape), training=False, return_taps=True)
    predictors = {}
    for name in classifier.tap_names:
        predictor = Predictor(hidden_ratio, synchronized=classifier.synchronized_bn,
                              name=f"predictor_{name.replace('.', '_')}")
        predictor.build((None, taps[name].shape[-1]))
        predictors[name] = predictor
    return predictors


def cosine_similarity(a, b, epsilon=1e-8):
    """PyTorch's `F.cosine_similarity`: `a.b / max(|a| |b|, epsilon)`, per row."""
    norms = tf.maximum(tf.norm(a, axis=-1) * tf.norm(b, axis=-1), epsilon)
    return tf.reduce_sum(a * b, axis=-1) / norms


def invariance_distance(prediction, target, distance):
    """`1 - mean cos` (ARAT) or the mean squared error (the "mse" ablation)."""
    if distance == "cos":
        return 1.0 - tf.reduce_mean(cosine_similarity(prediction, target))
    return tf.reduce_mean(tf.square(prediction - target))


class AratTrainer(AdversarialTrainer):
    """ARAT's objective, per batch (docs/method.md section 1):

        L = w_adv * CE(f_adv(x'), y) + w_clean * CE(f_clean(x), y)
            + gamma * mean_l [ 1 - mean_batch cos(h_l(z_l(x'; adv)), stop_gradient(z_l(x; clean))) ]

    The clean and adversarial batches are normalised as the classifier's `bn_mode` says: split BN
    by default; the "no split BN" ablation normalises the concatenated batch, so it really sees the
    mixture (see `forward_adversarial_and_clean`). `z_l` are the classifier's named feature taps; `h_l`
    one `Predictor` per tap, trained here and never exported.

    `w_adv`/`w_clean` live in non-trainable variables: fixed, or set every epoch by the
    `CeWeightAutoBalance` callback (the authors' default: w_adv = clean-branch accuracy).

    Args:
        classifier: the model (its `tap_names` are regularised).
        invariance_weight: gamma (30 for ResNet-18, 100 for WRN-34-10), split equally over taps.
        asymmetric: stop the gradient on the clean representation (ARAT). False is the
            "symmetric / no stop-gradient" ablation: both sides receive the invariance gradient.
        use_predictor: put a predictor head on the adversarial side (False: the ablation).
        predictor_hidden_ratio: hidden width of the predictor as a fraction of the tap width.
        distance: "cos" (ARAT) or "mse".
        adv_ce_weight: initial/fixed w_adv.
        clean_ce_weight: initial/fixed w_clean.
        **kwargs: `AdversarialTrainer` arguments.
    """

    loss_term_names = ("ce_adv", "ce_clean", "invariance")

    def __init__(
        self,
        classifier,
        *,
        invariance_weight=30.0,
        asymmetric=True,
        use_predictor=True,
        predictor_hidden_ratio=0.25,
        distance="cos",
        adv_ce_weight=1.0,
        clean_ce_weight=1.0,
        **kwargs,
    ):
        super().__init__(classifier, **kwargs)
        if invariance_weight < 0:
            raise ValueError(f"invariance_weight must be >= 0, received {invariance_weight}.")
        if distance not in INVARIANCE_DISTANCES:
            raise ValueError(
                f"distance must be one of {INVARIANCE_DISTANCES}, received distance={distance!r}."
            )
        self.invariance_weight = float(invariance_weight)
        self.asymmetric = bool(asymmetric)
        self.use_predictor = bool(use_predictor)
        self.distance = distance
        self.adv_ce_weight = keras.Variable(
            float(adv_ce_weight), trainable=False, name="adv_ce_weight", aggregation="only_first_replica"
        )
        self.clean_ce_weight = keras.Variable(
            float(clean_ce_weight), trainable=False, name="clean_ce_weight",
            aggregation="only_first_replica",
        )
        self.tap_names = list(classifier.tap_names)
        self.predictors = (build_predictors(classifier, predictor_hidden_ratio)
                           if self.use_predictor else {})

    def compute_losses(self, images, adversarial_images, labels):
        adv_logits, clean_logits, adv_taps, clean_taps = forward_adversarial_and_clean(
            self.classifier, adversarial_images, images, return_taps=True
        )
        ce_adv = mean_cross_entropy(adv_logits, labels)
        ce_clean = mean_cross_entropy(clean_logits, labels)

        distances = []
        for name in self.tap_names:
            adv_representation, clean_representation = adv_taps[name], clean_taps[name]
            if self.asymmetric:
                clean_representation = tf.stop_gradient(clean_representation)
            if self.use_predictor:
                adv_representation = self.predictors[name](adv_representation, training=True)
            distances.append(
                invariance_distance(adv_representation, clean_representation, self.distance)
            )
        invariance = tf.add_n(distances) / float(len(distances))

        total = (
            self.adv_ce_weight * ce_adv
            + self.clean_ce_weight * ce_clean
            + self.invariance_weight * invariance
        )
        terms = {"ce_adv": ce_adv, "ce_clean": ce_clean, "invariance": invariance}
        return total, terms, clean_logits, adv_logits

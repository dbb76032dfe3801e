"""`run_analyses`: the analyses by name, over a probe set and an evaluation set, as one JSON-ready dict.

Plug-ins chosen by name, so the CLI and the training callback share one path:

    gradient_conflict  classification vs invariance gradients (`GradientConflictProbe`)
    mixture            clean vs adversarial feature statistics and BN branch statistics
    dual_bn            accuracy of the statistics x affine combinations (`dual_bn_study`)

The first two run on a probe set of (training) images with the method's own training attack,
crafted once per batch and shared by both; the Dual-BN study measures accuracy on an evaluation set.
"""

from arat_tf.analysis.dual_bn_study import dual_bn_study
from arat_tf.analysis.feature_statistics import (
    ROUTINGS,
    FeatureStatisticsProbe,
    bn_moving_statistics_distances,
)
from arat_tf.analysis.gradient_conflict import GradientConflictProbe, mean_over_batches
from arat_tf.analysis.loss_parts import has_invariance_term
from arat_tf.analysis.training_attack import TrainingAdversary
from arat_tf.evaluation.branches import split_layers

ANALYSES = ("gradient_conflict", "mixture", "dual_bn")


def unavailable_analyses(trainer, analyses):
    """`{analysis: why it does not apply to this trainer/model}` for the `analyses` that cannot run."""
    reasons = {}
    unknown = [name for name in analyses if name not in ANALYSES]
    for name in unknown:
        reasons[name] = f"unknown analysis (choose from {', '.join(ANALYSES)})"
    if "gradient_conflict" in analyses and not has_invariance_term(trainer):
        reasons["gradient_conflict"] = (
            f"{type(trainer).__name__} has no invariance term (loss terms: "
            f"{', '.join(trainer.loss_term_names)}); gradient conflict applies to ARAT and its "
            "ablations, TRADES and MART"
        )
    classifier = trainer.classifier
    if "dual_bn" in analyses and not (split_layers(classifier, "statistics")
                                      or split_layers(classifier, "affine")):
        reasons["dual_bn"] = (
            f"the model has no split BN (bn_mode={classifier.bn_mode}); the Dual-BN study needs "
            "dual, shared_stats or shared_affine"
        )
    return reasons


class ProbeAnalyses:
    """The probe-set analyses (gradient conflict, mixture) of one trainer, compiled once.

    Args:
        trainer: an `AdversarialTrainer`.
        analyses: which of "gradient_conflict" and "mixture" to run.
        routings: feature routings of the mixture analysis (`feature_statistics.ROUTINGS`).
    """

    def __init__(self, trainer, analyses, routings=ROUTINGS):
        self.trainer = trainer
        self.analyses = [name for name in analyses if name in ("gradient_conflict", "mixture")]
        self.routings = routings
        self.adversary = TrainingAdversary(trainer)
        self.conflict_probe = (GradientConflictProbe(trainer)
                               if "gradient_conflict" in self.analyses else None)

    def __call__(self, batches, include_channels=True):
        """Runs on every `(images, labels)` of `batches`; returns `{analysis: result}`."""
        conflicts = []
        features = FeatureStatisticsProbe(self.trainer, self.routings) if "mixture" in self.analyses else None
        examples = 0
        for images, labels in batches:
            adversarial_images = self.adversary(images, labels)
            examples += int(labels.shape[0])
            if self.conflict_probe is not None:
                conflicts.append(self.conflict_probe(images, labels, adversarial_images))
            if features is not None:
                features.update(images, adversarial_images)
        if not examples:
            raise ValueError("The probe set is empty.")
        results = {}
        if self.conflict_probe is not None:
            results["gradient_conflict"] = {
                **mean_over_batches(conflicts),
                "batches": len(conflicts),
                "examples": examples,
                "per_batch": [{"cosine": c["overall"]["cosine"],
                               "conflict_ratio": c["overall"]["conflict_ratio"]} for c in conflicts],
            }
        if features is not None:
            results["mixture"] = {
                "examples": examples,
                "taps": features.result(include_channels=include_channels),
                "bn_moving_statistics": bn_moving_statistics_distances(self.trainer.classifier),
            }
        return results


def run_analyses(trainer, analyses, probe_batches=None, eval_dataset=None, attacks=(), *,
                 eps=8 / 255, norm="linf", seed=0, routings=ROUTINGS):
    """Runs `analyses` (names from `ANALYSES`) and returns `{analysis: result}`.

    Args:
        trainer: an `AdversarialTrainer` around the classifier to analyse.
        analyses: analysis names; check them first with `unavailable_analyses`.
        probe_batches: `(images, labels)` batches for gradient_conflict and mixture.
        eval_dataset: batched `(images, labels)` for dual_bn.
        attacks: `EvaluationAttack`s of the Dual-BN study (empty: clean accuracy only).
        eps, norm, seed: the Dual-BN study's threat model.
        routings: feature routings of the mixture analysis.

    Raises:
        ValueError: an analysis that does not apply (see `unavailable_analyses`) or missing data.
    """
    reasons = unavailable_analyses(trainer, analyses)
    if reasons:
        raise ValueError("; ".join(f"{name}: {reason}" for name, reason in reasons.items()))
    results = {}
    if {"gradient_conflict", "mixture"} & set(analyses):
        if probe_batches is None:
            raise ValueError("gradient_conflict and mixture need probe_batches.")
        results.update(ProbeAnalyses(trainer, analyses, routings)(probe_batches))
    if "dual_bn" in analyses:
        if eval_dataset is None:
            raise ValueError("dual_bn needs an eval_dataset.")
        results["dual_bn"] = dual_bn_study(trainer.classifier, eval_dataset, attacks, eps=eps,
                                           norm=norm, seed=seed)
    return results

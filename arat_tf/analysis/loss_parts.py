"""`split_objective`: a method's total loss as (classification part, invariance part).

The gradient-conflict analysis compares the gradients of these two parts. Each part carries the
weight it has in the objective, so that `classification + invariance == total` and the gradient
norms reported are the ones the optimiser actually adds (weights change neither the cosine nor
the signs).

| method | classification part | invariance part |
|---|---|---|
| ARAT (and its symmetric / no-predictor / mse ablations) | `w_adv * ce_adv + w_clean * ce_clean` | `gamma * invariance` |
| TRADES | `ce_clean` | `beta * kl` (KL between clean and adversarial predictions) |
| MART | `bce_adv` | `beta * kl_weighted` |

PGD-AT and hybrid AT have no invariance term: `NoInvarianceTermError`.
"""

from arat_tf.methods import AratTrainer, MartTrainer, TradesTrainer


class NoInvarianceTermError(ValueError):
    """The method's objective has no invariance term to compare the classification loss with."""


def has_invariance_term(trainer):
    """Whether `split_objective` supports `trainer`'s method."""
    return isinstance(trainer, (AratTrainer, TradesTrainer, MartTrainer))


def split_objective(trainer, terms):
    """`(classification, invariance)` losses from the `terms` of `trainer.compute_losses`.

    Args:
        trainer: an `AdversarialTrainer`.
        terms: the dict of named loss terms `compute_losses` returned.

    Raises:
        NoInvarianceTermError: the method (PGD-AT, hybrid AT, Cross-AT) has no invariance term.
    """
    if isinstance(trainer, AratTrainer):
        classification = (trainer.adv_ce_weight * terms["ce_adv"]
                          + trainer.clean_ce_weight * terms["ce_clean"])
        return classification, trainer.invariance_weight * terms["invariance"]
    if isinstance(trainer, TradesTrainer):
        return terms["ce_clean"], trainer.beta * terms["kl"]
    if isinstance(trainer, MartTrainer):
        return terms["bce_adv"], trainer.beta * terms["kl_weighted"]
    raise NoInvarianceTermError(
        f"{type(trainer).__name__} has no invariance term (its loss terms are "
        f"{', '.join(trainer.loss_term_names)}): gradient conflict applies to ARAT and its "
        "ablations, TRADES and MART."
    )

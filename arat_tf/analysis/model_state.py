"""`preserved_state`: analyses that run the model in training mode leave it exactly as they found it."""

import contextlib


@contextlib.contextmanager
def preserved_state(trainer):
    """Restores every non-trainable variable of `trainer` (BN moving statistics of both branches
    and of the predictor heads, the CE weights) when the block exits, even on error.

    Why: the gradient-conflict and mixture analyses reuse the training path (the training attack,
    `compute_losses`, training-mode forward passes), and a training-mode BN call updates the moving
    statistics; an ARAT training attack (`attack_bn_mode="train"`) updates them at every PGD step.
    An analysis must be an observation: run as a callback, it must not change what training does
    next; run on a finished model, it must not change the model it reports on. Trainable weights
    are never assigned by the analyses, so only the non-trainable state needs restoring.

    Args:
        trainer: an `AdversarialTrainer` (or any Keras model).
    """
    variables = list(trainer.non_trainable_variables)
    saved = [variable.numpy() for variable in variables]
    try:
        yield
    finally:
        for variable, value in zip(variables, saved):
            variable.assign(value)

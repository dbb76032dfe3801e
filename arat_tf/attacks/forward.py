"""`make_forward`: binds a model, its BN branch and its BN mode into the `x -> logits` an attack takes."""

BN_MODES = ("inference", "train")


def make_forward(model, *, branch=None, bn_mode="inference"):
    """Returns `forward(x) -> logits` for an attack on `model`.

    Attacks never see the model, only this callable, so the two choices that change what the
    attack "sees" are made here, explicitly, by the caller:

    * `branch`: which BN branch of a multi-branch (Dual-BN / ARAT) model to run; passed as the
      `branch=` keyword of the model's call. Leave it None for plain Keras models, whose call
      does not accept it.
    * `bn_mode`: how BatchNormalization behaves during the attack.
      - "inference" (default; the community's protocol, e.g. Madry et al., TRADES, RobustBench):
        the model is called with `training=False`, so BN normalises with its moving statistics
        and never changes them. The attack is then a pure function of the weights and leaves
        the model exactly as it found it.
      - "train" (the ARAT authors' protocol): the model is called with `training=True`, so BN
        normalises with the statistics of the current adversarial batch, and the moving
        statistics of the selected branch are updated at EVERY attack step. Use it only to
        reproduce that protocol; it also switches dropout on.
      Note Keras runs BN layers with `trainable=False` in inference mode regardless.

    Args:
      model: a built Keras model (or any callable taking `training=` and, if `branch` is set,
        `branch=` keywords) that returns logits.
      branch: the BN branch to run, or None to call the model without a `branch` keyword.
      bn_mode: "inference" or "train", see above.

    Returns:
      A callable `x -> logits`.

    Raises:
      ValueError: if `bn_mode` is not "inference" or "train".

    Example:
      >>> forward = make_forward(model, branch="adv", bn_mode="inference")
      >>> x_adv = pgd_linf(forward, x, y)
    """
    if bn_mode not in BN_MODES:
        raise ValueError(f"bn_mode must be one of {BN_MODES}, got {bn_mode!r}")
    training = bn_mode == "train"
    if branch is None:
        return lambda x: model(x, training=training)
    return lambda x: model(x, training=training, branch=branch)

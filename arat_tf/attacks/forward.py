"""`make_forward`: binds a model, its BN branch and its BN mode into the `x -> logits` an attack takes."""

from arat_tf import precision

BN_MODES = ("inference", "train")


def make_forward(model, *, branch=None, bn_mode="inference", gradient_scale=None):
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
    * `gradient_scale`: under a float16 policy the attack's input gradient would flush to zero
      wherever it is below 6e-8 inside the model's backward pass. The gradient entering the model
      is multiplied by this scale and divided by it again in float32 at the input
      (`arat_tf.precision`), which leaves every attack's step unchanged. None (default):
      `precision.ATTACK_GRADIENT_SCALE` if a layer of `model` computes in float16, else 1.

    Args:
      model: a built Keras model (or any callable taking `training=` and, if `branch` is set,
        `branch=` keywords) that returns logits.
      branch: the BN branch to run, or None to call the model without a `branch` keyword.
      bn_mode: "inference" or "train", see above.
      gradient_scale: see above; 1 disables the scaling.

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
    keywords = {} if branch is None else {"branch": branch}
    if gradient_scale is None:
        gradient_scale = (precision.ATTACK_GRADIENT_SCALE if precision.computes_in_float16(model)
                          else 1.0)
    if gradient_scale == 1.0:
        return lambda x: model(x, training=training, **keywords)

    def scaled_forward(x):
        logits = model(precision.scaled_input_gradient(x, gradient_scale), training=training,
                       **keywords)
        return precision.scaled_output_gradient(logits, gradient_scale)

    return scaled_forward

"""The Dual-BN analysis: swap normalisation parameters between the clean and adversarial branches."""

from arat_tf.layers import SplitBatchNormalization

PARAMETER_KINDS = ("affine", "statistics")


def split_layers(classifier, kind):
    """The `SplitBatchNormalization` layers of `classifier` whose `kind` of parameters is split."""
    layers = []
    for layer in classifier._flatten_layers(include_self=False):
        if isinstance(layer, SplitBatchNormalization):
            split = layer.split_affine if kind == "affine" else layer.split_statistics
            if split:
                layers.append(layer)
    return layers


def swap_branch_parameters(classifier, kind):
    """Exchanges, in place, the clean and adversarial branches' affine parameters or statistics.

    After an affine swap, `branch="adv"` normalises with the adversarial statistics and the clean
    gamma/beta (the Dual-BN paper's test-time analysis: which of NS and AP carries robustness?).
    Swapping twice restores the model exactly.

    Args:
        classifier: a `BranchedClassifier`.
        kind: "affine" or "statistics".

    Returns:
        The number of BN layers whose parameters were swapped (0 for a model without that split).
    """
    if kind not in PARAMETER_KINDS:
        raise ValueError(f"kind must be one of {PARAMETER_KINDS}, received {kind!r}.")
    layers = split_layers(classifier, kind)
    for layer in layers:
        getter = layer.affine_parameters if kind == "affine" else layer.moving_statistics
        for adv_variable, clean_variable in zip(getter("adv"), getter("clean")):
            adv_value = adv_variable.numpy()
            adv_variable.assign(clean_variable.numpy())
            clean_variable.assign(adv_value)
    return len(layers)

"""`bn_mode`: the one name that selects a model's normalisation variant everywhere."""

from arat_tf.layers.cross_batch_normalization import CrossBatchNormalization
from arat_tf.layers.split_batch_normalization import SplitBatchNormalization

_SPLIT_VARIANTS = {
    # bn_mode: (split_statistics, split_affine)
    "dual": (True, True),
    "shared_stats": (False, True),
    "shared_affine": (True, False),
    "single": (False, False),
}
_CROSS_VARIANTS = {"cross_clean": "clean", "cross_adv": "adv"}
BN_MODES = tuple(_SPLIT_VARIANTS) + tuple(_CROSS_VARIANTS)


def make_normalization(bn_mode, *, synchronized=False, name=None):
    """Builds the normalisation layer for one BN site.

    Args:
        bn_mode: "dual" (ARAT's split BN: separate statistics and affine), "shared_stats" (shared
            statistics, dual affine), "shared_affine" (dual statistics, shared affine), "single"
            (ordinary BN: the baselines and ARAT's "no split BN" ablation), "cross_clean" /
            "cross_adv" (Cross-AT: a mixed batch normalised with one half's statistics).
        synchronized: synchronise batch statistics across replicas.
        name: layer name.

    Returns:
        A `SplitBatchNormalization` or `CrossBatchNormalization` layer.
    """
    if bn_mode in _SPLIT_VARIANTS:
        split_statistics, split_affine = _SPLIT_VARIANTS[bn_mode]
        return SplitBatchNormalization(
            split_statistics=split_statistics,
            split_affine=split_affine,
            synchronized=synchronized,
            name=name,
        )
    if bn_mode in _CROSS_VARIANTS:
        return CrossBatchNormalization(
            statistics_from=_CROSS_VARIANTS[bn_mode], synchronized=synchronized, name=name
        )
    raise ValueError(f"bn_mode must be one of {BN_MODES}, received bn_mode={bn_mode!r}.")

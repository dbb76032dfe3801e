"""Distances between two sets of per-channel statistics (mean, variance), seen as diagonal Gaussians.

Used for clean vs adversarial features and for the two BN branches' moving statistics: BN
normalises every channel with a mean and a variance, so "how different are the two
distributions as BN sees them" is a distance between per-channel Gaussians.
"""

import numpy as np

VARIANCE_FLOOR = 1e-5  # BN's epsilon: channels with (near) zero variance (dead ReLUs) stay finite.


def gaussian_distances(mean_a, variance_a, mean_b, variance_b, variance_floor=VARIANCE_FLOOR):
    """Distances between `N(mean_a, variance_a)` and `N(mean_b, variance_b)`, per channel, summarised.

    Args:
        mean_a, variance_a, mean_b, variance_b: arrays `[channels]`.
        variance_floor: added to every variance in the KL (not in the other distances).

    Returns:
        A dict of floats:
        - `mean_l2`: `||mean_a - mean_b||_2` (how far BN's centring differs);
        - `variance_l2`: `||variance_a - variance_b||_2`;
        - `wasserstein2`: the 2-Wasserstein distance between the diagonal Gaussians,
          `sqrt(sum_c (mu_a - mu_b)^2 + (sigma_a - sigma_b)^2)`;
        - `symmetric_kl`: `(KL(a||b) + KL(b||a)) / 2` per channel, averaged over channels: scale
          free (a channel of tiny variance counts as much as a large one), unlike the others.
    """
    mean_a, variance_a, mean_b, variance_b = (
        np.asarray(x, dtype=np.float64).reshape(-1) for x in (mean_a, variance_a, mean_b, variance_b)
    )
    if not mean_a.shape == variance_a.shape == mean_b.shape == variance_b.shape:
        raise ValueError(
            "All statistics must have the same number of channels, received shapes "
            f"{mean_a.shape}, {variance_a.shape}, {mean_b.shape}, {variance_b.shape}."
        )
    variance_a = np.maximum(variance_a, 0.0)
    variance_b = np.maximum(variance_b, 0.0)
    mean_difference = mean_a - mean_b
    var_a, var_b = variance_a + variance_floor, variance_b + variance_floor
    # KL(a||b) + KL(b||a) for 1-D Gaussians; the log terms cancel.
    symmetric_kl = 0.25 * (var_a / var_b + var_b / var_a - 2.0
                           + mean_difference ** 2 * (1.0 / var_a + 1.0 / var_b))
    return {
        "mean_l2": float(np.linalg.norm(mean_difference)),
        "variance_l2": float(np.linalg.norm(variance_a - variance_b)),
        "wasserstein2": float(np.sqrt(np.sum(
            mean_difference ** 2 + (np.sqrt(variance_a) - np.sqrt(variance_b)) ** 2
        ))),
        "symmetric_kl": float(np.mean(symmetric_kl)) if symmetric_kl.size else 0.0,
    }

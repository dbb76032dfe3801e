"""PNG figures of the analyses, one per analysis, written atomically.

matplotlib is imported lazily with the non-interactive Agg backend: analyses run on headless
training machines, and importing pyplot with a GUI backend there can fail or hang.
"""

import os

import numpy as np

from arat_tf.analysis.dual_bn_study import BRANCHES, combination_grid
from arat_tf.io_utils import atomic_save_figure

MIXTURE_DISTANCE = "wasserstein2"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(figure, path):
    """Saves `figure` atomically (`io_utils.atomic_save_figure`), closes it, returns `path`."""
    try:
        atomic_save_figure(figure, path, dpi=120, bbox_inches="tight")
    finally:
        _pyplot().close(figure)
    return path


def _values(records, key):
    return [np.nan if r.get(key) is None else r[key] for r in records]


def plot_gradient_conflict(result, path):
    """Per-layer cosine and conflict ratio (bars), overall values in the titles."""
    plt = _pyplot()
    layers = list(result["per_layer"])
    records = [result["per_layer"][name] for name in layers]
    overall = result["overall"]
    figure, (top, bottom) = plt.subplots(2, 1, figsize=(max(6, 0.45 * len(layers) + 2), 7),
                                         sharex=True)
    positions = np.arange(len(layers))
    top.bar(positions, _values(records, "cosine"), color="tab:blue")
    top.axhline(0.0, color="black", linewidth=0.8)
    top.set_ylabel("cosine(classification, invariance)")
    top.set_title(f"Gradient conflict: overall cosine = {_format(overall['cosine'])}")
    bottom.bar(positions, _values(records, "conflict_ratio"), color="tab:red")
    bottom.axhline(0.5, color="gray", linestyle="--", linewidth=0.8)
    bottom.set_ylim(0, 1)
    bottom.set_ylabel("conflict ratio")
    bottom.set_title(f"Opposite-sign entries: overall = {_format(overall['conflict_ratio'])}")
    bottom.set_xticks(positions)
    bottom.set_xticklabels(layers, rotation=60, ha="right", fontsize=8)
    return save_figure(figure, path)


def plot_mixture(result, path, distance=MIXTURE_DISTANCE):
    """Clean-vs-adversarial tap distances per routing, and clean-vs-adv BN moving statistics."""
    plt = _pyplot()
    taps = result["taps"]
    bn = result["bn_moving_statistics"]
    figure, (left, right) = plt.subplots(1, 2, figsize=(13, 4.5),
                                         gridspec_kw={"width_ratios": [1, 2]})
    routings = list(taps)
    tap_names = list(next(iter(taps.values()))) if taps else []
    width = 0.8 / max(len(routings), 1)
    for index, routing in enumerate(routings):
        left.bar(np.arange(len(tap_names)) + index * width,
                 [taps[routing][tap][distance] for tap in tap_names], width, label=routing)
    left.set_xticks(np.arange(len(tap_names)) + width * (len(routings) - 1) / 2)
    left.set_xticklabels(tap_names, rotation=30, ha="right", fontsize=8)
    left.set_ylabel(f"{distance}(clean, adv)")
    left.set_title("Tap features: clean vs adversarial")
    left.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.22), ncol=3)
    if bn:
        sites = list(bn)
        right.plot(range(len(sites)), [bn[s][distance] for s in sites], marker="o", label=distance)
        right.set_xticks(range(len(sites)))
        right.set_xticklabels(sites, rotation=60, ha="right", fontsize=7)
        right.set_ylabel(f"{distance}(clean BN, adv BN)")
        right.set_title("BN moving statistics: clean vs adversarial branch")
    else:
        right.text(0.5, 0.5, "no split BN statistics", ha="center", va="center")
        right.set_axis_off()
    return save_figure(figure, path)


def plot_dual_bn(result, path):
    """2x2 heatmaps (statistics x affine) of clean and, if measured, robust accuracy."""
    plt = _pyplot()
    metrics = ["clean_accuracy"] + (["robust_accuracy"] if result.get("attacks") else [])
    figure, axes = plt.subplots(1, len(metrics), figsize=(5.5 * len(metrics), 4), squeeze=False)
    figure.subplots_adjust(wspace=0.6)
    for axis, metric in zip(axes[0], metrics):
        grid = combination_grid(result, metric)
        axis.imshow(grid, cmap="viridis", vmin=0.0, vmax=max(1e-6, float(np.nanmax(grid))))
        for row in range(2):
            for column in range(2):
                axis.text(column, row, _format(grid[row, column]), ha="center", va="center",
                          color="black", fontsize=12,
                          bbox={"facecolor": "white", "alpha": 0.7, "edgecolor": "none"})
        axis.set_xticks([0, 1])
        axis.set_xticklabels([f"affine={b}" for b in BRANCHES])
        axis.set_yticks([0, 1])
        axis.set_yticklabels([f"statistics={b}" for b in BRANCHES])
        label = metric if metric == "clean_accuracy" else f"{'+'.join(result['attacks'])} accuracy"
        axis.set_title(label)
    figure.suptitle("Dual-BN study")
    return save_figure(figure, path)


def plot_training_series(records, path):
    """Overall cosine and conflict ratio (and the mean tap distance) over training steps."""
    plt = _pyplot()
    steps = [r["step"] for r in records]
    panels = []
    if any("gradient_conflict" in r for r in records):
        panels += [("cosine", "overall cosine"), ("conflict_ratio", "overall conflict ratio")]
    if any("mixture" in r for r in records):
        panels.append(("mixture", f"mean tap {MIXTURE_DISTANCE}, deployed"))
    figure, axes = plt.subplots(len(panels), 1, figsize=(7, 2.6 * max(len(panels), 1)),
                                sharex=True, squeeze=False)
    for axis, (key, label) in zip(axes[:, 0], panels):
        if key == "mixture":
            values = [np.mean([t[MIXTURE_DISTANCE] for t in r["mixture"]["taps"]["deployed"].values()])
                      if "mixture" in r and "deployed" in r["mixture"]["taps"] else np.nan
                      for r in records]
        else:
            values = [np.nan if r.get("gradient_conflict", {}).get("overall", {}).get(key) is None
                      else r["gradient_conflict"]["overall"][key] for r in records]
        axis.plot(steps, values, marker="o")
        axis.set_ylabel(label, fontsize=8)
    axes[-1, 0].set_xlabel("training step")
    figure.suptitle("Analyses during training")
    return save_figure(figure, path)


def _format(value):
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return "n/a"
    return f"{value:.3f}"


PLOTTERS = {
    "gradient_conflict": plot_gradient_conflict,
    "mixture": plot_mixture,
    "dual_bn": plot_dual_bn,
}


def write_plots(results, output_dir):
    """One `<analysis>.png` per analysis in `results`; returns the paths written."""
    return [PLOTTERS[name](result, os.path.join(output_dir, f"{name}.png"))
            for name, result in results.items() if name in PLOTTERS]

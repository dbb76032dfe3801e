"""Search outputs: `trials.csv` / `trials.json`, `best.flags` and the `tradeoff.png` plot."""

import csv
import io
import math
import os

from arat_tf.flags import config_to_flagfile
from arat_tf.io_utils import atomic_save_figure, atomic_write_json, atomic_write_text
from arat_tf.tuning.search_space import apply_trial, trial_values

BASE_COLUMNS = ("trial_id", "status", "clean", "robust", "objective")


def _last(trial, name):
    if not trial.metrics.exists(name):
        return None
    value = trial.metrics.get_last_value(name)
    return None if value is None or not math.isfinite(float(value)) else float(value)


def collect_trials(oracle):
    """One record per trial of the oracle, in trial-id order.

    Each record: trial_id, status (COMPLETED, FAILED, RUNNING, ...), clean, robust, objective
    (None when the trial has no result) and `hyperparameters` (the trial's active values).
    """
    records = []
    for trial_id in sorted(oracle.trials, key=lambda t: (len(t), t)):
        trial = oracle.trials[trial_id]
        records.append({
            "trial_id": trial_id,
            "status": str(trial.status),
            "clean": _last(trial, "clean"),
            "robust": _last(trial, "robust"),
            "objective": _last(trial, "objective"),
            "hyperparameters": trial_values(trial.hyperparameters),
        })
    return records


def best_record(records):
    """The completed record with the highest objective (ties: the earliest trial), or None."""
    done = [r for r in records if r["objective"] is not None and r["status"] == "COMPLETED"]
    if not done:
        return None
    return max(done, key=lambda r: (r["objective"], -records.index(r)))


def trials_csv(records):
    names = sorted({name for r in records for name in r["hyperparameters"]})
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(list(BASE_COLUMNS) + names)
    for record in records:
        row = ["" if record[c] is None else record[c] for c in BASE_COLUMNS]
        row += [record["hyperparameters"].get(name, "") for name in names]
        writer.writerow(row)
    return buffer.getvalue()


def plot_tradeoff(records, path, best_id=None, title=None):
    """Clean vs robust validation accuracy per trial; the best trial highlighted."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    done = [r for r in records if r["clean"] is not None and r["robust"] is not None]
    figure, axes = plt.subplots(figsize=(5.5, 4.5), dpi=120)
    others = [r for r in done if r["trial_id"] != best_id]
    axes.scatter([r["clean"] for r in others], [r["robust"] for r in others], color="tab:blue",
                 label="trial", zorder=2)
    for record in done:
        axes.annotate(record["trial_id"], (record["clean"], record["robust"]), fontsize=7,
                      xytext=(3, 3), textcoords="offset points")
    best = [r for r in done if r["trial_id"] == best_id]
    if best:
        axes.scatter([best[0]["clean"]], [best[0]["robust"]], color="tab:red", marker="*", s=220,
                     label=f"best (trial {best_id})", zorder=3)
    axes.set_xlabel("validation clean accuracy")
    axes.set_ylabel("validation PGD accuracy")
    axes.set_title(title or "Robustness-accuracy trade-off per trial")
    axes.grid(alpha=0.3)
    if done:
        axes.legend(loc="best", fontsize=8)
    figure.tight_layout()
    atomic_save_figure(figure, path)
    plt.close(figure)


def write_outputs(oracle, base_config, output_dir, best_run_dir=None, title=None):
    """Writes trials.csv, trials.json, tradeoff.png and (if a trial completed) best.flags.

    Returns `(records, best_record_or_None)`.
    """
    os.makedirs(output_dir, exist_ok=True)
    records = collect_trials(oracle)
    best = best_record(records)
    atomic_write_text(os.path.join(output_dir, "trials.csv"), trials_csv(records))
    atomic_write_json(os.path.join(output_dir, "trials.json"), {
        "best_trial_id": best["trial_id"] if best else None, "trials": records,
    })
    plot_tradeoff(records, os.path.join(output_dir, "tradeoff.png"),
                  best_id=best["trial_id"] if best else None, title=title)
    if best is not None:
        best_config = apply_trial(base_config, best["hyperparameters"])
        best_config = best_config.replace(
            run_dir=best_run_dir or os.path.join(output_dir, "best_run"), resume=False
        )
        header = (
            f"# Best trial {best['trial_id']} of the search in {output_dir}: objective="
            f"{best['objective']:.4f} (clean {best['clean']:.4f}, robust {best['robust']:.4f}, "
            f"measured on --val_split={base_config.val_split}).\n"
            "# Tuned: " + ", ".join(f"{k}={v!r}" for k, v in best["hyperparameters"].items())
            + "\n# For the final run, train on the whole training set and validate on test, e.g.\n"
            "#   python -m arat_tf.train --flagfile=best.flags --train_split=train "
            "--val_split=test\n"
        )
        atomic_write_text(os.path.join(output_dir, "best.flags"),
                          header + config_to_flagfile(best_config))
    return records, best

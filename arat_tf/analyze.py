"""`python -m arat_tf.analyze --run_dir runs/smoke --data_dir ../shared/datasets/tfds`

The paper's analyses of a trained run (see docs/analysis.md):

    gradient_conflict  cosine and conflict ratio between the classification-loss and the
                       invariance-loss gradients over the conv/dense kernels, per layer and overall
    mixture            clean vs adversarial feature statistics at the taps, and the distance
                       between the two BN branches' moving statistics
    dual_bn            accuracy with statistics x affine parameters from the clean/adv branch

Gradient conflict and mixture run on the first --n_examples images of the run's training split
with the method's training attack; the Dual-BN study on the first --n_examples of --eval_split.
Writes analysis.json and one PNG per analysis to --output_dir (default run_dir/analysis), plus
training_series.png when the run wrote step files with --analyze_every_steps.
"""

import datetime
import glob
import json
import os

from absl import app, flags, logging

from arat_tf.analysis.suite import ANALYSES
from arat_tf.cli import usage_error
from arat_tf.flags import NumberOrFractionParser

flags.DEFINE_string("run_dir", None, "Run directory of arat_tf.train (config.json, model.keras, "
                    "checkpoints/).")
flags.DEFINE_string("data_dir", None, "TFDS data dir (default: the run's, else TFDS' default).")
flags.DEFINE_list("analyses", list(ANALYSES), f"Analyses to run, from {', '.join(ANALYSES)}.")
flags.DEFINE_integer("n_examples", 512, "Examples of the probe split and of the evaluation split.")
flags.DEFINE_integer("batch_size", 128, "Batch size (gradient conflict is averaged over batches).")
flags.DEFINE_string("probe_split", None, "TFDS split of gradient conflict and mixture (default: the "
                    "run's --train_split, unaugmented).")
flags.DEFINE_string("eval_split", "test", "TFDS split of the Dual-BN study.")
flags.DEFINE_list("dual_bn_attacks", ["pgd10"], "Attacks of the Dual-BN study (arat_tf.evaluate "
                  "names); empty (--dual_bn_attacks=) for clean accuracy only.")
flags.DEFINE(NumberOrFractionParser(), "eps", None, "Budget of the Dual-BN attacks (default: the "
             "run's).", flags.FLAGS, flags.ArgumentSerializer())
flags.DEFINE_integer("seed", 0, "Random seed (attacks).")
flags.DEFINE_string("output_dir", None, "Where analysis.json and the PNGs go (default: "
                    "run_dir/analysis).")
FLAGS = flags.FLAGS


def _check_flags(argv):
    if len(argv) > 1:
        raise usage_error(f"Unexpected arguments: {' '.join(argv[1:])}")
    if not FLAGS.run_dir:
        raise usage_error("--run_dir is required.")
    unknown = [name for name in FLAGS.analyses if name not in ANALYSES]
    if unknown or not FLAGS.analyses:
        raise usage_error(f"--analyses: unknown {', '.join(unknown) or '(none given)'}; "
                          f"choose from {', '.join(ANALYSES)}.")
    if FLAGS.n_examples < 1 or FLAGS.batch_size < 1:
        raise usage_error("--n_examples and --batch_size must be >= 1.")
    if FLAGS.eps is not None and FLAGS.eps < 0:
        raise usage_error(f"--eps must be >= 0, got {FLAGS.eps}.")


def _format(value):
    return "n/a" if value is None else f"{value:.4f}"


def summary_lines(results):
    """A few human-readable lines per analysis."""
    lines = []
    if "gradient_conflict" in results:
        conflict = results["gradient_conflict"]
        overall = conflict["overall"]
        layers = {n: r["cosine"] for n, r in conflict["per_layer"].items() if r["cosine"] is not None}
        worst = min(layers, key=layers.get) if layers else None
        lines.append(f"Gradient conflict ({conflict['examples']} examples, {conflict['batches']} "
                     f"batches): overall cosine {_format(overall['cosine'])}, conflict ratio "
                     f"{_format(overall['conflict_ratio'])}"
                     + (f"; most conflicting layer {worst} (cosine {layers[worst]:.4f})" if worst else ""))
    if "mixture" in results:
        mixture = results["mixture"]
        parts = [f"{routing} {sum(t['wasserstein2'] for t in taps.values()) / max(len(taps), 1):.4f}"
                 for routing, taps in mixture["taps"].items()]
        lines.append("Mixture: mean tap W2(clean, adv): " + ", ".join(parts))
        bn = mixture["bn_moving_statistics"]
        if bn:
            mean_w2 = sum(d["wasserstein2"] for d in bn.values()) / len(bn)
            lines.append(f"  BN moving statistics, clean vs adv branch: mean W2 {mean_w2:.4f} over "
                         f"{len(bn)} sites (largest: {max(bn, key=lambda s: bn[s]['wasserstein2'])})")
        else:
            lines.append("  BN moving statistics: not split (one set shared by both branches)")
    if "dual_bn" in results:
        study = results["dual_bn"]
        attacks = "+".join(study["attacks"])
        lines.append("Dual-BN study (statistics x affine): clean accuracy"
                     + (f" / {attacks} accuracy" if attacks else ""))
        for record in study["combinations"]:
            robust = f" / {record['robust_accuracy']:.4f}" if "robust_accuracy" in record else ""
            lines.append(f"  statistics={record['statistics']:5s} affine={record['affine']:5s} "
                         f"{record['clean_accuracy']:.4f}{robust}")
    return lines


def _training_series(run_dir, output_dir):
    """Plots the step files `--analyze_every_steps` wrote, if any; returns the PNG path or None."""
    from arat_tf.analysis.plots import plot_training_series

    records = []
    for path in sorted(glob.glob(os.path.join(run_dir, "analysis", "step_*.json"))):
        try:
            with open(path) as stream:
                records.append(json.load(stream))
        except (OSError, ValueError):
            logging.warning("Skipping unreadable %s", path)
    if not records:
        return None
    return plot_training_series(records, os.path.join(output_dir, "training_series.png"))


def main(argv):
    _check_flags(argv)
    logging.set_verbosity(logging.WARNING)

    import tensorflow as tf

    tf.get_logger().setLevel("ERROR")

    import keras

    from arat_tf.analysis.plots import write_plots
    from arat_tf.analysis.run_trainer import load_run_trainer
    from arat_tf.analysis.suite import run_analyses, unavailable_analyses
    from arat_tf.data import DatasetNotAvailableError, dataset_spec, make_eval_dataset
    from arat_tf.evaluation import resolve_attacks
    from arat_tf.io_utils import atomic_write_json

    run_dir = FLAGS.run_dir
    trainer, config, notes = load_run_trainer(run_dir)
    spec = dataset_spec(config.dataset)
    attack_names = [name for name in FLAGS.dual_bn_attacks if name]
    try:
        attacks = resolve_attacks(attack_names, spec.num_classes, config.attack_norm) if attack_names else []
    except ValueError as error:
        raise usage_error(f"--dual_bn_attacks: {error}") from None

    analyses = list(dict.fromkeys(FLAGS.analyses))
    skipped = unavailable_analyses(trainer, analyses)
    for name, reason in skipped.items():
        if len(analyses) == 1:
            raise SystemExit(f"error: cannot run {name} on {run_dir}: {reason}.")
        print(f"Skipping {name}: {reason}.")
    analyses = [name for name in analyses if name not in skipped]
    if not analyses:
        raise SystemExit("error: none of the requested analyses applies to this run.")

    keras.utils.set_random_seed(FLAGS.seed)
    data_dir = FLAGS.data_dir or config.data_dir or None
    eps = FLAGS.eps if FLAGS.eps is not None else config.eps
    probe_split = FLAGS.probe_split or config.train_split
    try:
        probe = (make_eval_dataset(config.dataset, batch_size=FLAGS.batch_size, data_dir=data_dir,
                                   split=probe_split, subset=FLAGS.n_examples)
                 if {"gradient_conflict", "mixture"} & set(analyses) else None)
        evaluation = (make_eval_dataset(config.dataset, batch_size=FLAGS.batch_size,
                                        data_dir=data_dir, split=FLAGS.eval_split,
                                        subset=FLAGS.n_examples)
                      if "dual_bn" in analyses else None)
    except DatasetNotAvailableError as error:
        raise SystemExit(f"error: {error}") from None

    results = run_analyses(trainer, analyses, probe_batches=probe, eval_dataset=evaluation,
                           attacks=attacks, eps=eps, norm=config.attack_norm, seed=FLAGS.seed)
    output_dir = FLAGS.output_dir or os.path.join(run_dir, "analysis")
    report = {
        "run_dir": os.path.abspath(run_dir),
        "method": config.method, "model": config.model, "bn_mode": config.bn_mode,
        "dataset": config.dataset, "probe_split": probe_split, "eval_split": FLAGS.eval_split,
        "n_examples": FLAGS.n_examples, "batch_size": FLAGS.batch_size, "seed": FLAGS.seed,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "notes": notes, "skipped": skipped,
        **results,
    }
    for note in notes:
        print(f"Note: {note}.")
    print("\n".join(summary_lines(results)))
    written = write_plots(results, output_dir)
    series = _training_series(run_dir, output_dir)
    if series:
        written.append(series)
    json_path = os.path.join(output_dir, "analysis.json")
    atomic_write_json(json_path, report)
    print(f"Wrote {json_path} and {', '.join(os.path.basename(p) for p in written)}.")


if __name__ == "__main__":
    app.run(main)

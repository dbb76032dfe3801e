"""`python -m arat_tf.evaluate --run_dir runs/smoke --data_dir ../shared/datasets/tfds`

Robust accuracy a defence can be judged by: the model's logits in inference mode, on inputs in
[0, 1], under PGD, CW and AutoAttack (standard, or the "fast" variant the ARAT authors scored with),
worst case per example. Prints a table and writes `evaluation.json` next to the model.
"""

import datetime
import os

from absl import app, flags, logging

from arat_tf.cli import usage_error
from arat_tf.flags import NumberOrFractionParser

flags.DEFINE_string("run_dir", None, "Run directory of arat_tf.train (uses its model.keras and config).")
flags.DEFINE_string("model", None, "A .keras model instead of --run_dir.")
flags.DEFINE_string("dataset", None, "TFDS dataset (default: the run's).")
flags.DEFINE_string("data_dir", None, "TFDS data dir (default: the run's, else TFDS' default).")
flags.DEFINE_bool("download", False, "Let TFDS download the dataset.")
flags.DEFINE_string("split", "test", "TFDS split to evaluate on.")
flags.DEFINE_integer("n_examples", 0, "Evaluate the first N examples of the split (0: all).")
flags.DEFINE_enum("branch", "adv", ["adv", "clean", "all"],
                  "BN branch (ARAT reports adv); 'all' evaluates both.")
flags.DEFINE_bool("affine_swap", False, "Also evaluate each branch with the other branch's affine "
                  "parameters (the Dual-BN paper's analysis).")
flags.DEFINE(NumberOrFractionParser(), "eps", None, "Perturbation budget (default: the run's, else "
             "8/255); fractions such as 8/255 are accepted.", flags.FLAGS, flags.ArgumentSerializer())
flags.DEFINE_enum("norm", "linf", ["linf", "l2"], "Threat model.")
flags.DEFINE_list("attacks", ["pgd20", "autoattack"], "Attacks and suites, run in order on the "
                  "examples still unbroken: autoattack, autoattack-fast, pgd<K>[x<R>], cw<K>, "
                  "apgd-ce, apgd-t, fab-t, square.")
flags.DEFINE_integer("batch_size", 256, "Global evaluation batch size: each batch is split evenly "
                     "over the replicas of --strategy.")
flags.DEFINE_enum("strategy", "default", ["default", "mirrored", "multi_worker"],
                  "Distribution strategy: default (one device), mirrored (all local GPUs, or "
                  "--cpu_replicas logical CPUs) or multi_worker (MultiWorkerMirroredStrategy from "
                  "TF_CONFIG; every worker runs the same command, the chief writes the report).")
flags.DEFINE_integer("cpu_replicas", 0, "With --strategy=mirrored: N >= 1 replicas on N logical "
                     "CPU devices (for testing); 0: all local GPUs.")
flags.DEFINE_integer("seed", 0, "Random seed of the attacks.")
flags.DEFINE_enum("mixed_precision", "off", ["off", "mixed_float16", "mixed_bfloat16"],
                  "Run the model's convolutions and dense layers in 16 bits (attacks, BN and the "
                  "robust-accuracy bookkeeping stay float32; float16 attacks scale their "
                  "gradients, see arat_tf.precision).")
flags.DEFINE_string("output", None, "JSON report path (default: evaluation.json beside the model).")
FLAGS = flags.FLAGS


def main(argv):
    if len(argv) > 1:
        raise usage_error(f"Unexpected arguments: {' '.join(argv[1:])}")
    if bool(FLAGS.run_dir) == bool(FLAGS.model):
        raise usage_error("Pass exactly one of --run_dir and --model.")
    if FLAGS.eps is not None and FLAGS.eps < 0:
        raise usage_error(f"--eps must be >= 0, got {FLAGS.eps}.")
    if FLAGS.n_examples < 0 or FLAGS.batch_size < 1:
        raise usage_error("--n_examples must be >= 0 and --batch_size >= 1.")
    logging.set_verbosity(logging.WARNING)

    import tensorflow as tf

    from arat_tf.distribution import DistributionError, is_chief, make_strategy

    try:  # first thing: logical devices and multi-worker runtimes must precede any TF op
        strategy = make_strategy(FLAGS.strategy, FLAGS.cpu_replicas)
    except DistributionError as error:
        raise usage_error(str(error)) from None
    tf.get_logger().setLevel("ERROR")  # one retrace per BN branch variant is expected here

    from arat_tf.data import DatasetNotAvailableError, dataset_spec, make_eval_dataset
    from arat_tf.evaluation import evaluate_robustness, format_report, resolve_attacks
    from arat_tf.evaluation import swap_branch_parameters
    from arat_tf.io_utils import atomic_write_json
    from arat_tf.run_files import load_classifier, read_json_object

    config = (FLAGS.run_dir and read_json_object(
        os.path.join(FLAGS.run_dir, "config.json"), "run config")) or {}
    model_path = FLAGS.model or os.path.join(FLAGS.run_dir, "model.keras")
    dataset = FLAGS.dataset or config.get("dataset")
    if not dataset:
        raise usage_error("--dataset is required when the run has no config.json.")
    eps = FLAGS.eps if FLAGS.eps is not None else config.get("eps", 8 / 255)
    data_dir = FLAGS.data_dir or config.get("data_dir") or None
    try:
        spec = dataset_spec(dataset)
        attacks = resolve_attacks(FLAGS.attacks, spec.num_classes, FLAGS.norm)
    except ValueError as error:
        raise usage_error(str(error)) from None
    from arat_tf import precision
    from arat_tf.attacks import make_forward

    # Mirrored variables (every replica reads its local copy); layers under the chosen policy.
    with strategy.scope(), precision.dtype_policy(FLAGS.mixed_precision):
        classifier = load_classifier(model_path)
    if tuple(classifier.image_shape) != tuple(spec.image_shape):
        raise SystemExit(f"error: {model_path} expects images of shape {classifier.image_shape}, "
                         f"{dataset} has {spec.image_shape}.")
    try:
        data = make_eval_dataset(dataset, batch_size=FLAGS.batch_size, data_dir=data_dir,
                                 split=FLAGS.split, subset=FLAGS.n_examples or None,
                                 download=FLAGS.download)
    except DatasetNotAvailableError as error:
        raise SystemExit(f"error: {error}") from None

    replicas = strategy.num_replicas_in_sync
    if replicas > 1:
        print(f"Evaluating on {replicas} replicas (--strategy={FLAGS.strategy}): global batch "
              f"{FLAGS.batch_size} = about {FLAGS.batch_size // replicas} per replica.")
    common = {
        "model": os.path.abspath(model_path), "dataset": dataset, "split": FLAGS.split,
        "norm": FLAGS.norm, "eps": eps, "suite": "+".join(FLAGS.attacks), "seed": FLAGS.seed,
        "mixed_precision": FLAGS.mixed_precision,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }

    def evaluate_variant(branch, label):
        forward = tf.function(make_forward(classifier, branch=branch, bn_mode="inference"))
        report = evaluate_robustness(forward, data, attacks, eps=eps, norm=FLAGS.norm,
                                     seed=FLAGS.seed, strategy=strategy)
        report.update(common, branch=branch, variant=label)
        print(format_report(report))
        return report

    branches = ["adv", "clean"] if FLAGS.branch == "all" else [FLAGS.branch]
    reports = [evaluate_variant(branch, f"branch={branch}") for branch in branches]
    if FLAGS.affine_swap:
        if swap_branch_parameters(classifier, "affine") == 0:
            print("--affine_swap: the model has no split affine parameters; nothing to swap.")
        else:
            try:
                for branch in branches:
                    other = "clean" if branch == "adv" else "adv"
                    reports.append(evaluate_variant(branch, f"statistics={branch},affine={other}"))
            finally:
                swap_branch_parameters(classifier, "affine")

    summary = dict(reports[0])
    summary["variants"] = reports
    output = FLAGS.output or os.path.join(os.path.dirname(os.path.abspath(model_path)),
                                          "evaluation.json")
    if is_chief(strategy):
        atomic_write_json(output, summary)
        print(f"Report: {output}")


if __name__ == "__main__":
    app.run(main)

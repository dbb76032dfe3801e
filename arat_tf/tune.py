"""`python -m arat_tf.tune --flagfile configs/tune_smoke.flags --data_dir ../shared/datasets/tfds`

Hyperparameter search (keras-tuner) for one training method. Every training flag of
`arat_tf.train` is accepted and forms the BASE config; each trial overrides the method's
hyperparameters (see `arat_tf.tuning.search_space`):

    arat    --gamma_min/--gamma_max (invariance_weight, log), ce_weights auto|fixed
            (--tune_ce_weights) with --adv_ce_weight_min/max and --clean_ce_weight_min/max when
            fixed, --predictor_hidden_ratio_min/max (log)
    trades  --trades_beta_min/max          mart  --mart_beta_min/max
    any     --tune_learning_rate with --learning_rate_min/max (log)

The objective (--objective clean | robust | sum, maximised; "sum" = clean + PGD accuracy, the
paper's trade-off) is the final-epoch accuracy on --val_split, a held-out part of the TRAINING set:
the defaults here are --train_split='train[:90%]' --val_split='train[90%:]', and a test split is
rejected.

Outputs in <search_dir>/<project_name>/, beside keras-tuner's state (oracle.json, trial_*/):
    best.flags    the base config with the best trial's values (run_dir: runs/tuned_<project>), a flagfile
                  `python -m arat_tf.train --flagfile=.../best.flags` replays
    trials.csv    trial_id, status, clean, robust, objective, one column per hyperparameter
    trials.json   the same, plus best_trial_id
    tradeoff.png  clean vs PGD accuracy per trial, the best trial highlighted

Resuming: rerun the same command (same --search_dir and --project_name). Finished trials are
reloaded, not retrained; --max_trials is the TOTAL number of trials (raise it to extend a search).
--overwrite starts from scratch.

Distributed search (keras-tuner's chief/worker mode; all processes run the SAME command and share
--search_dir on a common filesystem). The chief runs the oracle and writes the outputs when every
worker has finished; each worker trains trials:

    export KERASTUNER_ORACLE_IP=10.0.0.1 KERASTUNER_ORACLE_PORT=8000
    KERASTUNER_TUNER_ID=chief    python -m arat_tf.tune --flagfile=... &   # on 10.0.0.1
    KERASTUNER_TUNER_ID=tuner0   python -m arat_tf.tune --flagfile=... &   # one per GPU/host
    KERASTUNER_TUNER_ID=tuner1   python -m arat_tf.tune --flagfile=... &

(pin each worker to its device, e.g. CUDA_VISIBLE_DEVICES=0 / 1). On one machine use
KERASTUNER_ORACLE_IP=127.0.0.1. Hyperband continues trials from weights saved in trial_*/, so its
workers need the shared --search_dir.

Within one process, each trial can itself be data-parallel: the training flags --strategy and
--cpu_replicas (`arat_tf.distribution.make_strategy`) give keras-tuner its `distribution_strategy`,
under which every trial's model is built (e.g. --strategy=mirrored over all local GPUs).
"""

import os

from absl import app, flags, logging

from arat_tf import flags as arat_flags
from arat_tf.cli import usage_error
from arat_tf.flags import config_from_flags, define_train_flags

define_train_flags()
flags.adopt_module_key_flags(arat_flags)
FLAGS = flags.FLAGS
# Tuning selects on held-out training images, never on the test split.
FLAGS.set_default("train_split", "train[:90%]")
FLAGS.set_default("val_split", "train[90%:]")

flags.DEFINE_enum("tuner", "random", ["random", "bayesian", "hyperband"], "Search algorithm.")
flags.DEFINE_integer("max_trials", 10, "Total trials of the search (random, bayesian; Hyperband's "
                                       "budget is --epochs and --hyperband_factor).")
flags.DEFINE_integer("executions_per_trial", 1, "Trainings per trial (objective averaged).")
flags.DEFINE_integer("hyperband_factor", 3, "Hyperband reduction factor.")
flags.DEFINE_integer("max_consecutive_failed_trials", 3, "Stop after this many failed trials in a row.")
flags.DEFINE_string("search_dir", "runs/tuning", "keras-tuner directory (state and outputs).")
flags.DEFINE_string("project_name", "", "Project name inside --search_dir (default: "
                                        "<method>_<dataset>).")
flags.DEFINE_bool("overwrite", False, "Start over instead of continuing the search in the directory.")
flags.DEFINE_integer("tuner_seed", None, "Seed of the search algorithm (default: --seed).")
flags.DEFINE_enum("objective", "sum", ["clean", "robust", "sum"],
                  "Maximised on --val_split: clean accuracy, PGD accuracy, or their sum.")
# Search space.
flags.DEFINE_float("gamma_min", 3.0, "ARAT invariance_weight: lower bound (log scale).")
flags.DEFINE_float("gamma_max", 100.0, "ARAT invariance_weight: upper bound.")
flags.DEFINE_bool("tune_ce_weights", True, "ARAT: search ce_weights auto vs fixed.")
flags.DEFINE_float("adv_ce_weight_min", 0.1, "ARAT fixed adv_ce_weight: lower bound.")
flags.DEFINE_float("adv_ce_weight_max", 1.0, "ARAT fixed adv_ce_weight: upper bound.")
flags.DEFINE_float("clean_ce_weight_min", 0.1, "ARAT fixed clean_ce_weight: lower bound.")
flags.DEFINE_float("clean_ce_weight_max", 1.0, "ARAT fixed clean_ce_weight: upper bound.")
flags.DEFINE_float("predictor_hidden_ratio_min", 0.125, "ARAT predictor_hidden_ratio: lower bound (log).")
flags.DEFINE_float("predictor_hidden_ratio_max", 1.0, "ARAT predictor_hidden_ratio: upper bound.")
flags.DEFINE_float("trades_beta_min", 1.0, "TRADES beta: lower bound.")
flags.DEFINE_float("trades_beta_max", 10.0, "TRADES beta: upper bound.")
flags.DEFINE_float("mart_beta_min", 1.0, "MART beta: lower bound.")
flags.DEFINE_float("mart_beta_max", 10.0, "MART beta: upper bound.")
flags.DEFINE_bool("tune_learning_rate", False, "Also search the base learning rate (log scale).")
flags.DEFINE_float("learning_rate_min", 0.01, "Learning rate: lower bound.")
flags.DEFINE_float("learning_rate_max", 0.2, "Learning rate: upper bound.")
flags.DEFINE_bool("tune_eps_schedule", False, "Not available: TrainConfig has no eps schedule to tune "
                                              "(only --eps); passing it is an error.")

SPACE_FLAGS = (
    "gamma_min", "gamma_max", "tune_ce_weights", "adv_ce_weight_min", "adv_ce_weight_max",
    "clean_ce_weight_min", "clean_ce_weight_max", "predictor_hidden_ratio_min",
    "predictor_hidden_ratio_max", "trades_beta_min", "trades_beta_max", "mart_beta_min",
    "mart_beta_max", "tune_learning_rate", "learning_rate_min", "learning_rate_max",
)


def search_space_from_flags(flag_values=FLAGS):
    from arat_tf.tuning.search_space import SearchSpace

    return SearchSpace(**{name: flag_values[name].value for name in SPACE_FLAGS})


def _make_strategy(config):
    """The `tf.distribute.Strategy` of --strategy / --cpu_replicas (training flags, see
    `arat_tf.distribution`), built before TensorFlow runs any op; None for the default strategy.
    keras-tuner builds every trial's model under it (`distribution_strategy=`)."""
    name = getattr(config, "strategy", "default")
    cpu_replicas = getattr(config, "cpu_replicas", 0)
    if name == "default" and not cpu_replicas:
        return None
    from arat_tf.distribution import make_strategy

    return make_strategy(name, cpu_replicas)  # DistributionError is a ValueError


def main(argv):
    if len(argv) > 1:
        raise usage_error(f"Unexpected arguments: {' '.join(argv[1:])}")
    if FLAGS.tune_eps_schedule:
        raise usage_error("--tune_eps_schedule is not implemented: TrainConfig has no eps "
                          "schedule (only a constant --eps).")
    from arat_tf.tuning.hypermodel import check_tuning_splits

    try:
        config = config_from_flags(FLAGS)
        check_tuning_splits(config)
        space = search_space_from_flags(FLAGS)
    except ValueError as error:
        raise usage_error(str(error)) from None

    logging.set_verbosity(logging.WARNING)
    from arat_tf.data import DatasetNotAvailableError
    from arat_tf.tuning.search import is_search_writer, run_search

    project = FLAGS.project_name or f"{config.method}_{config.dataset}"
    try:
        strategy = _make_strategy(config)
        tuner, records, best = run_search(
            config, space, objective=FLAGS.objective, tuner=FLAGS.tuner,
            max_trials=FLAGS.max_trials, executions_per_trial=FLAGS.executions_per_trial,
            search_dir=FLAGS.search_dir, project_name=project,
            seed=FLAGS.tuner_seed if FLAGS.tuner_seed is not None else config.seed,
            overwrite=FLAGS.overwrite, hyperband_factor=FLAGS.hyperband_factor,
            max_consecutive_failed_trials=FLAGS.max_consecutive_failed_trials,
            best_run_dir=os.path.join("runs", f"tuned_{project}"), distribution_strategy=strategy,
        )
    except (ValueError, DatasetNotAvailableError) as error:
        raise SystemExit(f"error: {error}") from None
    if not is_search_writer():
        print(f"Worker {os.environ.get('KERASTUNER_TUNER_ID')} done; the chief writes the outputs.")
        return
    out = os.path.abspath(tuner.project_dir)
    trained = tuner.hypermodel.fit_calls
    print(f"Search {out}: {len(records)} trial(s) in total, {trained} trained by this run.")
    for record in records:
        scores = ("-" if record["objective"] is None else
                  f"objective={record['objective']:.4f} clean={record['clean']:.4f} "
                  f"robust={record['robust']:.4f}")
        print(f"  trial {record['trial_id']} {record['status']}: {scores} "
              f"{record['hyperparameters']}")
    if best is None:
        raise SystemExit(f"error: no trial completed; see the tracebacks above and {out}.")
    print(f"Best trial {best['trial_id']}: {best['hyperparameters']}")
    print(f"Train it: python -m arat_tf.train --flagfile={os.path.join(out, 'best.flags')}")


if __name__ == "__main__":
    app.run(main)

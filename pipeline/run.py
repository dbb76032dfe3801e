"""`python -m pipeline.run --flagfile configs/pipeline_smoke.flags --data_dir ../shared/datasets/tfds`

Runs the ARAT pipeline locally, in order: ExampleGen -> [Tuner] -> Trainer -> Evaluator -> Pusher,
then writes the report (<pipeline_root>/report/index.html). Every training flag of
`python -m arat_tf.train` and every search flag of `python -m arat_tf.tune` (--tuner,
--max_trials, --objective, the search space) is accepted; --train_split / --val_split /
--train_subset / --val_subset choose ExampleGen's train and val splits (defaults: train[:90%] and
train[90%:], as for tuning; the test split is the Evaluator's alone). --run_dir, --search_dir,
--project_name and --overwrite are ignored: the pipeline root holds every output.

Rerunning with the same inputs and flags reuses every output (status "cached"); after a failure
it resumes at the component that failed; --force reruns everything, --force_components=Trainer,...
the named components (their downstream reruns when its inputs change). See docs/pipeline.md.
"""

import dataclasses
import os
import sys
import time

from absl import app, flags, logging

import arat_tf.tune  # noqa: F401  (defines the training and search flags, with the tuning splits)
from arat_tf.cli import usage_error
from arat_tf.flags import config_from_flags

flags.DEFINE_string("pipeline_name", "arat", "Pipeline name (recorded with each run).")
flags.DEFINE_string("pipeline_root", "pipelines/arat", "Directory of every output, the report and "
                    "(by default) the metadata store and the serving dir.")
flags.DEFINE_string("metadata_db", "", "SQLite metadata store (default <pipeline_root>/"
                    "metadata.sqlite).")
flags.DEFINE_string("serving_dir", "", "Serving base directory the Pusher writes versions/<N>/ "
                    "into (default <pipeline_root>/serving).")
flags.DEFINE_bool("force", False, "Rerun every component, ignoring the cache.")
flags.DEFINE_list("force_components", [], "Rerun these components (e.g. Trainer,Evaluator).")
flags.DEFINE_bool("tune", False, "Run the Tuner (the keras-tuner search of --tuner, --max_trials,"
                  " --objective and the search-space flags) and train with its best values.")
flags.DEFINE_string("test_split", "test", "TFDS split ExampleGen materialises as the test split.")
flags.DEFINE_integer("test_subset", 0, "Keep the first N examples of --test_split (0: all).")
flags.DEFINE_list("eval_attacks", ["pgd20", "autoattack"], "The Evaluator's attacks and suites, "
                  "run in order (see python -m arat_tf.evaluate --helpfull).")
flags.DEFINE_integer("eval_seed", 0, "Random seed of the Evaluator's attacks.")
flags.DEFINE_float("min_clean_accuracy", 0.0, "Blessing: minimum clean test accuracy.")
flags.DEFINE_float("min_robust_accuracy", 0.0, "Blessing: minimum robust test accuracy.")
flags.DEFINE_float("baseline_tolerance", 0.01, "Blessing: how far below the pushed model's clean"
                   " or robust accuracy a new model may be.")
flags.DEFINE_bool("report", True, "Write the HTML report at the end.")
flags.DEFINE_bool("dry_run", False, "Check the flags, print the components and their parameters, "
                  "run nothing.")
FLAGS = flags.FLAGS


def _fail(message):
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(1)


def pipeline_options(config):
    """The `PipelineOptions` of the parsed flags (for `pipeline.run` and `pipeline.compile`)."""
    from arat_tf.tune import search_space_from_flags
    from pipeline.definition import PipelineOptions

    space = search_space_from_flags(FLAGS)
    return PipelineOptions(
        name=FLAGS.pipeline_name, root=os.path.abspath(FLAGS.pipeline_root),
        metadata_db=FLAGS.metadata_db, serving_dir=FLAGS.serving_dir,
        test_split=FLAGS.test_split, test_subset=FLAGS.test_subset, tune=FLAGS.tune,
        tuner_algorithm=FLAGS.tuner, tuner_max_trials=FLAGS.max_trials,
        tuner_objective=FLAGS.objective,
        tuner_seed=FLAGS.tuner_seed if FLAGS.tuner_seed is not None else config.seed,
        search_space=dataclasses.asdict(space), eval_attacks=tuple(FLAGS.eval_attacks),
        eval_seed=FLAGS.eval_seed, eval_batch_size=config.eval_batch_size,
        min_clean_accuracy=FLAGS.min_clean_accuracy, min_robust_accuracy=FLAGS.min_robust_accuracy,
        baseline_tolerance=FLAGS.baseline_tolerance)


def check_data_dir(config):
    """A clear message before anything runs when the data cannot be there."""
    if config.download:
        return
    if config.data_dir and not os.path.isdir(config.data_dir):
        _fail(f"--data_dir={config.data_dir} does not exist (a prepared TFDS data dir is expected, "
              f"e.g. ../shared/datasets/tfds; or pass --download).")
    if config.data_dir and not os.path.isdir(os.path.join(config.data_dir, config.dataset)):
        _fail(f"--data_dir={config.data_dir} has no prepared {config.dataset!r} (no "
              f"{os.path.join(config.data_dir, config.dataset)}); pass the TFDS dir that holds it, "
              f"or --download.")


def main(argv):
    if len(argv) > 1:
        raise usage_error(f"Unexpected arguments: {' '.join(argv[1:])}")
    from arat_tf.tuning.hypermodel import TestSplitError, check_tuning_splits

    try:
        config = config_from_flags(FLAGS)
        check_tuning_splits(config)
        options = pipeline_options(config)
    except TestSplitError as error:
        raise usage_error(f"The test split is the Evaluator's: {error}") from None
    except ValueError as error:
        raise usage_error(str(error)) from None
    check_data_dir(config)
    logging.set_verbosity(logging.WARNING)

    from arat_tf.data import dataset_spec
    from arat_tf.evaluation import resolve_attacks

    try:
        resolve_attacks(options.eval_attacks, dataset_spec(config.dataset).num_classes,
                        config.attack_norm)
    except ValueError as error:
        raise usage_error(f"--eval_attacks: {error}") from None

    from pipeline.definition import build_components
    from pipeline.metadata import MetadataStore, MetadataStoreError
    from pipeline.report import write_report
    from pipeline.runner import PipelineError, PipelineRunner

    strategy = None
    if config.strategy != "default":  # before ExampleGen runs the first TensorFlow op
        from arat_tf.distribution import make_strategy

        strategy = make_strategy(config.strategy, config.cpu_replicas)
    components = build_components(config, options, strategy=strategy)
    if FLAGS.dry_run:
        for component in components:
            wired = {key: f"{ref.component}.{ref.output_name}"
                     for key, ref in component.inputs.items()}
            print(f"{component.name}: inputs {wired}, parameters {component.cache_parameters()}")
        return
    try:
        store = MetadataStore(options.metadata_path)
    except MetadataStoreError as error:
        _fail(str(error))
    force = True if FLAGS.force else set(FLAGS.force_components)
    started = time.perf_counter()
    try:
        runner = PipelineRunner(options.name, options.root, components, store, force=force)
    except ValueError as error:
        raise usage_error(str(error)) from None
    try:
        result = runner.run(flags_text=FLAGS.flags_into_string())
    except PipelineError as error:
        _fail(f"{error}\nThe run is recorded as failed in {options.metadata_path}; rerun the same "
              f"command to resume at {error.component}.")
    outputs = result.outputs
    pushed = outputs["Pusher"]["pushed_model"].properties
    blessing = outputs["Evaluator"]["blessing"].properties
    print(f"Blessing: {'BLESSED' if blessing['blessed'] else 'NOT BLESSED'} "
          f"({'; '.join(blessing['reasons'])})")
    print(f"Push: version {pushed['version']} at {pushed['serving_path']}" if pushed["pushed"]
          else f"Push: none ({pushed.get('reason')})")
    if FLAGS.report:
        print(f"Report: {write_report(store, result.run_id, options.root)}")
    print(f"Lineage: python -m pipeline.lineage --metadata_db={options.metadata_path}")
    print(f"Pipeline run {result.run_id} finished in {time.perf_counter() - started:.0f} s.")


if __name__ == "__main__":
    app.run(main)

"""`python -m arat_tf.export --run_dir runs/x [--export_dir serving/x] [--branch adv] [--version N]`

Exports a trained run's classifier as a TensorFlow SavedModel for TF Serving (`arat_tf.serving`):
one BN branch baked in (default "adv", the branch ARAT reports), written atomically to
`<export_dir>/versions/<N>/` with a `model_card.json` built from the run's `config.json` and
`evaluation.json` (when the robust evaluation was run). Serve it with
`tensorflow_model_server --model_name=x --model_base_path=<abs export_dir>/versions`.
"""

import os

from absl import app, flags, logging

from arat_tf.cli import usage_error
from arat_tf.run_files import load_classifier, read_json_object

flags.DEFINE_string("run_dir", None, "Run directory of `python -m arat_tf.train` (model.keras, "
                    "config.json, evaluation.json).")
flags.DEFINE_string("model", None, "The .keras model to export (default: <run_dir>/model.keras).")
flags.DEFINE_string("export_dir", None, "Export base directory; versions go to "
                    "<export_dir>/versions/<N>/, the TF Serving model base path "
                    "(default: <run_dir>/export).")
flags.DEFINE_enum("branch", "adv", ["adv", "clean"], "BN branch baked into the export.")
flags.DEFINE_integer("version", None, "Version number (default: 1 + the largest existing one). "
                     "An existing version is never overwritten.", lower_bound=1)
FLAGS = flags.FLAGS


def main(argv):
    if len(argv) > 1:
        raise usage_error(f"Unexpected arguments: {' '.join(argv[1:])}")
    if not FLAGS.run_dir and not FLAGS.model:
        raise usage_error("Give --run_dir (or --model and --export_dir).")
    if not FLAGS.run_dir and not FLAGS.export_dir:
        raise usage_error("--export_dir is required without --run_dir.")
    run_dir = FLAGS.run_dir
    if run_dir and not os.path.isdir(run_dir):
        raise SystemExit(f"error: run directory not found: {run_dir}")
    model_path = FLAGS.model or os.path.join(run_dir, "model.keras")
    export_dir = FLAGS.export_dir or os.path.join(run_dir, "export")

    logging.set_verbosity(logging.WARNING)
    from arat_tf import serving

    if FLAGS.version is not None and FLAGS.version in serving.existing_versions(export_dir):
        raise SystemExit(
            f"error: version {FLAGS.version} already exists at "
            f"{os.path.join(serving.versions_dir(export_dir), str(FLAGS.version))}; refusing to "
            "overwrite a served model (omit --version to take the next free one)."
        )
    config = read_json_object(os.path.join(run_dir, "config.json"), "run config") if run_dir else None
    evaluation = (
        read_json_object(os.path.join(run_dir, "evaluation.json"), "evaluation") if run_dir else None
    )
    classifier = load_classifier(model_path)
    card = serving.build_model_card(
        classifier, branch=FLAGS.branch, model_path=model_path, config=config,
        evaluation=evaluation, run_dir=run_dir,
    )
    try:
        path = serving.export_saved_model(
            classifier, export_dir, branch=FLAGS.branch, version=FLAGS.version, model_card=card,
        )
    except (serving.ExportError, ValueError, TypeError, OSError) as error:
        raise SystemExit(f"error: {error}") from None

    for note in card["notes"]:
        print(f"note: {note}")
    print(f"Exported the {FLAGS.branch} branch of {model_path} to {path}")
    print(f"Inspect it:  saved_model_cli show --dir {path} --all")
    base_path = os.path.abspath(serving.versions_dir(export_dir))
    print(f"Serve it:    tensorflow_model_server --model_name=<name> --model_base_path={base_path}")


if __name__ == "__main__":
    app.run(main)

"""`python -m pipeline.compile --flagfile configs/pipeline_cifar10.flags --image <image> --output pipeline.yaml`

Writes the pipeline of `python -m pipeline.run` (the same flags, the same components) as a
Kubeflow Pipelines v2 pipeline spec, for a Kubeflow cluster or Vertex AI Pipelines (see
`pipeline.kubeflow` and docs/pipeline.md). The flags' values become the defaults of the
pipeline's parameters, which can be overridden when the run is submitted. Needs the kfp extra:
`pip install -e ".[kfp]"` (and `".[kfp,vertex]"` for `--trainer_workers > 1`).
"""

import os

from absl import app, flags, logging

import pipeline.run  # noqa: F401  (defines the pipeline, training and search flags)
from arat_tf.cli import usage_error
from arat_tf.flags import config_from_flags

flags.DEFINE_string("output", "pipeline.yaml", "Where to write the pipeline spec (YAML).")
flags.DEFINE_string("image", None, "Container image every step runs in: this project installed "
                    "with its kfp extra (see docs/pipeline.md for a Dockerfile).")
flags.DEFINE_enum("target", "kubeflow", ["kubeflow", "vertex"], "Where the spec will run: a "
                  "Kubeflow Pipelines cluster or Vertex AI Pipelines.")
flags.DEFINE_integer("trainer_workers", 1, "Trainer replicas; > 1 (with --target=vertex) runs "
                     "the Trainer as a Vertex AI CustomJob under MultiWorkerMirroredStrategy.",
                     lower_bound=1)
flags.DEFINE_integer("trainer_gpus", 0, "GPUs per Trainer replica (MirroredStrategy over them).",
                     lower_bound=0)
flags.DEFINE_string("trainer_machine_type", "n1-standard-8", "Vertex machine type of each "
                    "Trainer replica (--trainer_workers > 1).")
flags.DEFINE_string("trainer_accelerator_type", "", "Vertex accelerator of each Trainer replica, "
                    "e.g. NVIDIA_TESLA_A100 (--trainer_workers > 1).")
flags.DEFINE_string("container_data_dir", None, "The TFDS data dir as the containers see it "
                    "(default: --data_dir).")
FLAGS = flags.FLAGS


def main(argv):
    if len(argv) > 1:
        raise usage_error(f"Unexpected arguments: {' '.join(argv[1:])}")
    if not FLAGS.image:
        raise usage_error("--image is required: the container image the steps run in.")
    from arat_tf.tuning.hypermodel import TestSplitError, check_tuning_splits

    try:
        config = config_from_flags(FLAGS)
        check_tuning_splits(config)
        options = pipeline.run.pipeline_options(config)
    except TestSplitError as error:
        raise usage_error(f"The test split is the Evaluator's: {error}") from None
    except ValueError as error:
        raise usage_error(str(error)) from None
    logging.set_verbosity(logging.WARNING)
    try:
        from pipeline import kubeflow
    except ImportError as error:
        raise SystemExit(f"error: compiling needs Kubeflow Pipelines ({error}): "
                         f"pip install -e \".[kfp]\"") from None
    try:
        function = kubeflow.build_pipeline(
            config, options, image=FLAGS.image, target=FLAGS.target,
            trainer_workers=FLAGS.trainer_workers, trainer_gpus=FLAGS.trainer_gpus,
            machine_type=FLAGS.trainer_machine_type,
            accelerator_type=FLAGS.trainer_accelerator_type, data_dir=FLAGS.container_data_dir)
    except ValueError as error:
        raise usage_error(str(error)) from None
    kubeflow.compile_pipeline(function, FLAGS.output)
    print(f"Wrote the KFP v2 pipeline spec {os.path.abspath(FLAGS.output)} "
          f"(image {FLAGS.image}, target {FLAGS.target}).")


if __name__ == "__main__":
    app.run(main)

"""`python -m arat_tf.import_torch --checkpoint last.pt --output_dir runs/authors_r18`

Converts a checkpoint written by the ARAT authors' PyTorch code (github.com/futakw/AR-AT,
`save_checkpoint`: the `state_dict` of their split-BN CIFAR ResNet-18 or WRN-34-10, keys without
prefix or with DataParallel's `module.`) into an arat_tf run directory, without PyTorch and
without unpickling anything (`arat_tf.interop.torch_checkpoint`):

    <output_dir>/
      model.keras           the classifier with both BN branches (PyTorch padding)
      config.json           a run config describing it (method arat, the inferred architecture)
      flags.txt             the same as a flagfile
      predictor_heads.npz   ARAT's predictor heads, when --predictors is given
      import.json           where it came from: file, SHA-256, architecture, key count

The directory is what `arat_tf.evaluate --run_dir`, `arat_tf.export --run_dir` and
`arat_tf.train --init_from` take. The architecture (ResNet depth and width, WideResNet depth and
widen factor, number of classes) is read from the tensor shapes.
"""

import datetime
import hashlib
import os

from absl import app, flags, logging

from arat_tf.cli import usage_error

flags.DEFINE_string("checkpoint", None, "The authors' model checkpoint (.pt / .pth, torch.save zip).")
flags.DEFINE_string("predictors", None, "Optional: their predictor heads as one state_dict "
                    "(keys <aligned layer>.predictor_x.<i>.<name>).")
flags.DEFINE_string("output_dir", None, "Run directory to create (must not hold a model yet).")
flags.DEFINE_string("dataset", None, "Dataset the model was trained on (default: cifar10 for 10 "
                    "classes, cifar100 for 100).")
FLAGS = flags.FLAGS

_DEFAULT_DATASETS = {10: "cifar10", 100: "cifar100"}
# The authors' invariance weight (gamma) for each architecture, recorded in config.json.
_INVARIANCE_WEIGHTS = {"resnet": 30.0, "wide_resnet": 100.0}


def _sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def main(argv):
    if len(argv) > 1:
        raise usage_error(f"Unexpected arguments: {' '.join(argv[1:])}")
    if not FLAGS.checkpoint or not FLAGS.output_dir:
        raise usage_error("--checkpoint and --output_dir are required.")
    model_path = os.path.join(FLAGS.output_dir, "model.keras")
    if os.path.exists(model_path):
        raise SystemExit(f"error: {model_path} already exists; nothing was overwritten. Choose "
                         f"another --output_dir.")
    logging.set_verbosity(logging.WARNING)

    from arat_tf.config import TrainConfig
    from arat_tf.data import SUPPORTED_DATASETS, dataset_spec
    from arat_tf.flags import config_as_dict, config_to_flagfile
    from arat_tf.interop.official_arat import (
        CheckpointLayoutError,
        classifier_from_state_dict,
        infer_architecture,
        load_official_predictors,
    )
    from arat_tf.interop.torch_checkpoint import TorchCheckpointError, read_state_dict
    from arat_tf.io_utils import atomic_save_model, atomic_write_json, atomic_write_text
    from arat_tf.methods.arat import build_predictors
    from arat_tf.warm_start import PREDICTOR_HEADS_FILE, save_predictor_heads

    try:
        state_dict = read_state_dict(FLAGS.checkpoint)
        architecture = infer_architecture(state_dict)
        dataset = FLAGS.dataset or _DEFAULT_DATASETS.get(architecture["num_classes"])
        if dataset not in SUPPORTED_DATASETS:
            raise usage_error(
                f"--dataset={dataset!r}: pass one of {sorted(SUPPORTED_DATASETS)} (the checkpoint "
                f"has {architecture['num_classes']} classes).")
        spec = dataset_spec(dataset)
        if spec.num_classes != architecture["num_classes"]:
            raise usage_error(f"--dataset={dataset} has {spec.num_classes} classes, the "
                              f"checkpoint {architecture['num_classes']}.")
        classifier, architecture = classifier_from_state_dict(state_dict, spec.image_shape)
        predictors = None
        if FLAGS.predictors:
            predictors = build_predictors(classifier)
            load_official_predictors(predictors, classifier, read_state_dict(FLAGS.predictors))
    except (TorchCheckpointError, CheckpointLayoutError) as error:
        raise SystemExit(f"error: {error}") from None

    config = TrainConfig(
        dataset=dataset, model=architecture["model"], depth=architecture["depth"],
        width=architecture["width"], method="arat", bn_mode="dual",
        invariance_weight=_INVARIANCE_WEIGHTS[architecture["model"]], run_dir=FLAGS.output_dir,
    ).resolve()
    provenance = {
        "source": os.path.abspath(FLAGS.checkpoint),
        "sha256": _sha256(FLAGS.checkpoint),
        "keys": len(state_dict),
        "architecture": architecture,
        "predictors": os.path.abspath(FLAGS.predictors) if FLAGS.predictors else None,
        "converted": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "notes": ["BN num_batches_tracked counters are not converted (arat_tf's BN uses a fixed "
                  "momentum, as the authors' code)."],
    }
    os.makedirs(FLAGS.output_dir, exist_ok=True)
    if predictors is not None:
        save_predictor_heads(predictors, os.path.join(FLAGS.output_dir, PREDICTOR_HEADS_FILE))
    atomic_write_json(os.path.join(FLAGS.output_dir, "config.json"), config_as_dict(config))
    atomic_write_text(os.path.join(FLAGS.output_dir, "flags.txt"), config_to_flagfile(config))
    atomic_write_json(os.path.join(FLAGS.output_dir, "import.json"), provenance)
    atomic_save_model(classifier, model_path)  # last: its presence marks a finished import

    name = {"resnet": "ResNet", "wide_resnet": "WideResNet"}[architecture["model"]]
    print(f"Converted {FLAGS.checkpoint}: {name}-{architecture['depth']} width "
          f"{architecture['width']:g}, {architecture['num_classes']} classes, both BN branches"
          f"{', with predictor heads' if predictors else ''} -> {FLAGS.output_dir}")
    print(f"Evaluate it:  python -m arat_tf.evaluate --run_dir {FLAGS.output_dir} "
          f"--attacks autoattack")
    print(f"Export it:    python -m arat_tf.export --run_dir {FLAGS.output_dir}")
    print(f"Train on:     python -m arat_tf.train --flagfile {FLAGS.output_dir}/flags.txt "
          f"--init_from {FLAGS.output_dir} --run_dir <new run dir>")


if __name__ == "__main__":
    app.run(main)

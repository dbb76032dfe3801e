"""`python -m arat_tf.train --flagfile configs/smoke.flags --data_dir ../shared/datasets/tfds`

Trains one model with one adversarial-training method and writes a run directory (see
`arat_tf.training`). Every hyperparameter of docs/method.md is a flag with its default there; see
`--helpfull` or `configs/*.flags`.
"""

import os

from absl import app, flags, logging

from arat_tf import flags as arat_flags
from arat_tf.cli import usage_error
from arat_tf.flags import config_from_flags, define_train_flags

define_train_flags()
flags.adopt_module_key_flags(arat_flags)  # --help lists the training flags, not only --helpfull.
FLAGS = flags.FLAGS


def main(argv):
    if len(argv) > 1:
        raise usage_error(f"Unexpected arguments: {' '.join(argv[1:])}")
    try:
        config = config_from_flags(FLAGS)
    except ValueError as error:
        raise usage_error(str(error)) from None

    logging.set_verbosity(logging.WARNING)  # TF/TFDS info lines would break the progress bar.
    from arat_tf import training
    from arat_tf.callbacks import CheckpointError, NonFiniteLossError
    from arat_tf.data import DatasetNotAvailableError
    from arat_tf.distribution import DistributionError
    from arat_tf.warm_start import WarmStartError

    try:
        _, records = training.train(config)
    except (training.RunDirectoryError, CheckpointError, NonFiniteLossError,
            DatasetNotAvailableError, DistributionError, WarmStartError) as error:
        raise SystemExit(f"error: {error}") from None
    if records:
        last = records[-1]
        summary = ", ".join(f"{k}={v:.4f}" for k, v in last.items() if k.startswith("val_"))
        print(f"Finished epoch {last['epoch']}: {summary}")
    print(f"Run directory: {os.path.abspath(config.run_dir)}")


if __name__ == "__main__":
    app.run(main)

"""arat-tf: adversarial training with a better robustness-accuracy trade-off, for Keras 3 / TF.

Importing the package registers every custom layer, model, optimizer and schedule with Keras,
so `keras.models.load_model("run/model.keras")` works after `import arat_tf`.
"""

import os

# TensorFlow's C++ INFO/WARNING lines (oneDNN, rendezvous, CUDA probing) would interleave with the Keras
# progress bar; users who want them set TF_CPP_MIN_LOG_LEVEL themselves.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from arat_tf import layers, models, optimizers, schedules  # noqa: F401  (Keras registration)

__version__ = "0.2.0"

"""arat-tf: adversarial training with a better robustness-accuracy trade-off, for Keras 3 / TF.

Importing the package registers every custom layer, model, optimizer and schedule with Keras,
so `keras.models.load_model("run/model.keras")` works after `import arat_tf`.
"""

from arat_tf import layers, models, optimizers, schedules  # noqa: F401  (Keras registration)

__version__ = "0.1.0"

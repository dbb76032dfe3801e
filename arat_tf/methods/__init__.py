"""Adversarial training methods: one `keras.Model` trainer per method, sharing `train_step`."""

from arat_tf.methods.adversarial_trainer import AdversarialTrainer
from arat_tf.methods.arat import AratTrainer
from arat_tf.methods.hybrid import HybridTrainer
from arat_tf.methods.mart import MartTrainer
from arat_tf.methods.pgd_at import PgdAtTrainer
from arat_tf.methods.registry import METHOD_DEFAULTS, METHODS, MethodDefaults
from arat_tf.methods.trades import TradesTrainer

"""`TrainingAdversary`: the trainer's own training attack, for the analyses."""

import tensorflow as tf

from arat_tf.analysis.model_state import preserved_state
from arat_tf.layers.batch_statistics import training_attack


class TrainingAdversary:
    """Crafts adversarial examples exactly as `AdversarialTrainer.train_step` does.

    The analyses study the objective the model is trained with, so they use the method's own
    attack (`trainer.generate_adversarial`: PGD on the adversarial branch for ARAT, the KL attack
    for TRADES, with the configured BN mode), not a re-implementation or the evaluation attack.
    Compiled once (`tf.function`: TF 2.20's oneDNN can crash in eager gradient loops) and run under
    `preserved_state`, since a training-mode attack updates the adversarial BN statistics.

    Args:
        trainer: an `AdversarialTrainer`.

    Example:

    >>> adversary = TrainingAdversary(trainer)
    >>> adversarial_images = adversary(images, labels)
    """

    def __init__(self, trainer):
        self.trainer = trainer
        self._craft = tf.function(self._craft_batch, reduce_retracing=True)

    def _craft_batch(self, images, labels):
        with training_attack():
            return tf.stop_gradient(self.trainer.generate_adversarial(images, labels))

    def __call__(self, images, labels):
        with preserved_state(self.trainer):
            return self._craft(tf.convert_to_tensor(images, tf.float32), tf.cast(labels, tf.int32))

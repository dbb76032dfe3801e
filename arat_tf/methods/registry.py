"""Method names, as the `--method` flag spells them, with each method's protocol defaults."""

import dataclasses

from arat_tf.methods.arat import AratTrainer
from arat_tf.methods.hybrid import HybridTrainer
from arat_tf.methods.mart import MartTrainer
from arat_tf.methods.pgd_at import PgdAtTrainer
from arat_tf.methods.trades import TradesTrainer


@dataclasses.dataclass(frozen=True)
class MethodDefaults:
    """What "auto" resolves to for a method: the protocol its authors used.

    Attributes:
        trainer_class: the `AdversarialTrainer` subclass.
        bn_mode: normalisation variant (ARAT/hybrid: dual BN; baselines: a single ordinary BN).
        attack_bn_mode: BN mode of the training attack (ARAT's code: train; everyone else: inference).
        attack_start: start of the training attack (TRADES/MART's code: gaussian 0.001).
        lr_schedule: learning-rate schedule of the method's paper.
    """

    trainer_class: type
    bn_mode: str
    attack_bn_mode: str
    attack_start: str
    lr_schedule: str


METHOD_DEFAULTS = {
    "arat": MethodDefaults(AratTrainer, "dual", "train", "uniform", "arat"),
    "pgd_at": MethodDefaults(PgdAtTrainer, "single", "inference", "uniform", "arat"),
    "trades": MethodDefaults(TradesTrainer, "single", "inference", "gaussian", "arat"),
    "mart": MethodDefaults(MartTrainer, "single", "inference", "gaussian", "arat"),
    "hybrid": MethodDefaults(HybridTrainer, "dual", "inference", "uniform", "dual_bn"),
    "cross_at": MethodDefaults(HybridTrainer, "cross_clean", "inference", "uniform", "dual_bn"),
}
METHODS = tuple(METHOD_DEFAULTS)

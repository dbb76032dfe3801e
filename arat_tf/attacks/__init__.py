"""Adversarial attacks composed from small parts: a loss, a start, a step rule and a projection."""

from arat_tf.attacks.apgd import apgd, apgd_checkpoints, apgd_targeted
from arat_tf.attacks.dlr import dlr_loss, targeted_dlr_loss
from arat_tf.attacks.fab import fab_targeted, project_linf_hyperplane_box
from arat_tf.attacks.forward import BN_MODES, make_forward
from arat_tf.attacks.iterative import AttackConfig, fgsm, iterative_attack, pgd_l2, pgd_linf, trades_attack
from arat_tf.attacks.losses import ATTACK_LOSSES, cross_entropy, cw_margin, kl_divergence
from arat_tf.attacks.square import square_linf
from arat_tf.attacks.parts import (
    gaussian_start,
    l2_normalized_step,
    project_l2,
    project_linf,
    sign_step,
    uniform_start,
    zero_start,
)

__all__ = [
    "apgd",
    "apgd_checkpoints",
    "apgd_targeted",
    "dlr_loss",
    "fab_targeted",
    "project_linf_hyperplane_box",
    "square_linf",
    "targeted_dlr_loss",
    "ATTACK_LOSSES",
    "AttackConfig",
    "BN_MODES",
    "cross_entropy",
    "cw_margin",
    "fgsm",
    "gaussian_start",
    "iterative_attack",
    "kl_divergence",
    "l2_normalized_step",
    "make_forward",
    "pgd_l2",
    "pgd_linf",
    "project_l2",
    "project_linf",
    "sign_step",
    "trades_attack",
    "uniform_start",
    "zero_start",
]

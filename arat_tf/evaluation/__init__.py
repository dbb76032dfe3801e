"""Robustness evaluation: attack suites, worst-case accuracy, sanity checks, Dual-BN analysis."""

from arat_tf.evaluation.attack_suite import SUITES, EvaluationAttack, resolve_attacks
from arat_tf.evaluation.branches import swap_branch_parameters
from arat_tf.evaluation.robustness import evaluate_robustness, format_report

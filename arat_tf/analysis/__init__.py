"""The paper's analyses of a trained (or training) model: gradient conflict, mixture distribution,
Dual-BN study. `python -m arat_tf.analyze` runs them on a run directory; `AnalysisCallback` runs
them every N steps during training. See docs/analysis.md for how to read them."""

from arat_tf.analysis.callback import AnalysisCallback
from arat_tf.analysis.channel_distances import gaussian_distances
from arat_tf.analysis.dual_bn_study import dual_bn_study, swapped_branch_parameters
from arat_tf.analysis.feature_statistics import (
    ROUTINGS,
    bn_moving_statistics_distances,
    tap_feature_statistics,
)
from arat_tf.analysis.gradient_conflict import (
    GradientConflictProbe,
    compare_gradients,
    conflict_ratio,
    conv_dense_kernels,
    cosine_similarity,
    gradient_conflict,
)
from arat_tf.analysis.loss_parts import NoInvarianceTermError, has_invariance_term, split_objective
from arat_tf.analysis.model_state import preserved_state
from arat_tf.analysis.suite import ANALYSES, run_analyses

"""Custom Keras layers: branch-aware batch normalisation and ARAT's predictor head."""

from arat_tf.layers.batch_statistics import BRANCHES, CALL_BRANCHES, MIXED
from arat_tf.layers.cross_batch_normalization import CrossBatchNormalization
from arat_tf.layers.normalization import BN_MODES, make_normalization
from arat_tf.layers.predictor import Predictor
from arat_tf.layers.split_batch_normalization import SplitBatchNormalization

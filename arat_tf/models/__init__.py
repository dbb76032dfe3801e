"""Image classifiers with branch-aware BN and named ARAT feature taps."""

from arat_tf.models.branched_classifier import BranchedClassifier
from arat_tf.models.preact_resnet import PreActResNet
from arat_tf.models.registry import MODELS, build_model
from arat_tf.models.resnet import ResNet
from arat_tf.models.small_cnn import SmallCNN
from arat_tf.models.wide_resnet import WideResNet

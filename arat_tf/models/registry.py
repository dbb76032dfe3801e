"""Model names, as the `--model` flag spells them, and `build_model`."""

from arat_tf.models.preact_resnet import PreActResNet
from arat_tf.models.resnet import ResNet
from arat_tf.models.small_cnn import SmallCNN
from arat_tf.models.wide_resnet import WideResNet

MODELS = ("resnet", "preact_resnet", "wide_resnet", "small_cnn")


def build_model(name, *, num_classes, image_shape, bn_mode="dual", synchronized_bn=False,
                depth=None, width=1.0, conv_padding="torch"):
    """Builds and initialises (all variables created) a `BranchedClassifier` by name.

    Args:
        name: one of `MODELS`.
        num_classes: number of classes.
        image_shape: `(H, W, C)` of the inputs.
        bn_mode: normalisation variant (`arat_tf.layers.BN_MODES`).
        synchronized_bn: synchronise BN statistics across replicas.
        depth: ResNet depth (10/18/34, default 18) or WideResNet depth (6n+4, default 34);
            ignored by small_cnn.
        width: channel multiplier; for wide_resnet, the widen factor (pass 10 for WRN-34-10).
        conv_padding: "torch" (PyTorch's symmetric padding of strided convolutions) or "tf_same"
            (see `BranchedClassifier`).

    Returns:
        A built model.
    """
    common = dict(
        num_classes=num_classes, image_shape=tuple(image_shape), bn_mode=bn_mode,
        synchronized_bn=synchronized_bn, conv_padding=conv_padding,
    )
    if name == "resnet":
        model = ResNet(depth=depth or 18, width=width, **common)
    elif name == "preact_resnet":
        model = PreActResNet(depth=depth or 18, width=width, **common)
    elif name == "wide_resnet":
        model = WideResNet(depth=depth or 34, widen_factor=width, **common)
    elif name == "small_cnn":
        model = SmallCNN(width=width, **common)
    else:
        raise ValueError(f"model must be one of {MODELS}, received model={name!r}.")
    model.build((None,) + tuple(image_shape))
    return model

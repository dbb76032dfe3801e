"""SmallCNN for MNIST-sized inputs (the TRADES architecture, with split BN)."""

import keras
import tensorflow as tf

from arat_tf.layers.torch_defaults import torch_default_kernel_init
from arat_tf.models.branched_classifier import BranchedClassifier


@keras.saving.register_keras_serializable(package="arat_tf")
class SmallCNN(BranchedClassifier):
    """conv32-conv32-pool-conv64-conv64-pool-fc200-fc200-fc: TRADES' MNIST model, with a BN after
    every conv and hidden dense layer so that split BN applies.

    Taps: the two hidden dense features after BN and ReLU ("fc1", "fc2").

    Args:
        num_classes: number of classes.
        image_shape: `(H, W, C)` of the inputs (default MNIST).
        width: channel/unit multiplier (> 0).
        **kwargs: `BranchedClassifier` arguments (`bn_mode`, `synchronized_bn`, `name`).

    Example:

    >>> model = SmallCNN()
    >>> model(keras.ops.zeros((2, 28, 28, 1))).shape
    (2, 10)
    """

    def __init__(self, num_classes=10, image_shape=(28, 28, 1), width=1.0, **kwargs):
        super().__init__(num_classes, image_shape, **kwargs)
        if not width > 0:
            raise ValueError(f"width must be > 0, received width={width}.")
        self.width = float(width)

        def units(n):
            return max(1, int(round(n * width)))

        self.convs = [
            keras.layers.Conv2D(
                units(filters), 3, padding="valid", use_bias=False,
                kernel_initializer=torch_default_kernel_init(), name=f"conv{i}",
            )
            for i, filters in enumerate((32, 32, 64, 64), start=1)
        ]
        self.conv_norms = [self.norm(f"conv{i}_bn") for i in range(1, 5)]
        self.hidden = [
            keras.layers.Dense(
                units(200), use_bias=False, kernel_initializer=torch_default_kernel_init(),
                name=f"fc{i}",
            )
            for i in (1, 2)
        ]
        self.hidden_norms = [self.norm(f"fc{i}_bn") for i in (1, 2)]
        self.classifier = keras.layers.Dense(
            num_classes, kernel_initializer=torch_default_kernel_init(), name="classifier"
        )

    @property
    def tap_names(self):
        return ["fc1", "fc2"]

    def forward(self, images, training, branch):
        x = images
        for index, (conv, norm) in enumerate(zip(self.convs, self.conv_norms)):
            x = tf.nn.relu(norm(conv(x), training=training, branch=branch))
            if index % 2 == 1:
                x = tf.nn.max_pool2d(x, 2, 2, "VALID")
        x = tf.reshape(x, [tf.shape(x)[0], -1])
        taps = {}
        for name, dense, norm in zip(self.tap_names, self.hidden, self.hidden_norms):
            x = tf.nn.relu(norm(dense(x), training=training, branch=branch))
            taps[name] = x
        return self.classifier(x), taps

    def get_config(self):
        config = super().get_config()
        config.update(width=self.width)
        return config

"""Mixed precision (`--mixed_precision`): which parts compute in 16 bits, and loss scaling.

With `mixed_float16` or `mixed_bfloat16` (Keras dtype policies) the convolutions and dense layers
of a classifier compute in 16 bits with float32 variables. Everything that decides what is being
learned or attacked stays float32:

* the image input and the model's output: a classifier is called with float32 images in [0, 1]
  and returns float32 logits and taps (`BranchedClassifier` casts them);
* batch normalisation: its statistics, moving averages and normalisation run in float32 on
  float32 variables, only its output is cast to the compute dtype;
* ARAT's predictor heads, every loss term, the PGD perturbation and its projection (the attack
  works on float32 images; only the model call inside it is mixed);
* every variable, so checkpoints, `.keras` files and SavedModels hold float32 weights and take a
  float32 `image`.

float16 has 5 exponent bits: gradients below 6e-8 flush to zero. The weight update therefore
goes through Keras' `LossScaleOptimizer` (dynamic loss scaling), and attacks differentiate
through `make_forward`, which scales the gradient flowing back through the model by
`ATTACK_GRADIENT_SCALE` and unscales it in float32 at the input (`scaled_input_gradient`).
bfloat16 has float32's exponent range and needs neither.
"""

import contextlib

import keras
import tensorflow as tf

MIXED_PRECISION_POLICIES = ("off", "mixed_float16", "mixed_bfloat16")

# The attack's summed cross-entropy has a gradient of at most 1 per logit and example, so scaled
# by 2^10 it stays 64x below float16's largest value (65504) at the logits, leaving room for the
# growth through the backward pass, while gradients down to ~6e-11 (instead of 6e-8) survive.
ATTACK_GRADIENT_SCALE = 2.0 ** 10


def check_policy(name):
    """Raises a ValueError naming `name` unless it is one of `MIXED_PRECISION_POLICIES`."""
    if name not in MIXED_PRECISION_POLICIES:
        raise ValueError(f"mixed precision must be one of {MIXED_PRECISION_POLICIES}, received "
                         f"{name!r}.")


@contextlib.contextmanager
def dtype_policy(name):
    """Within this context, new Keras layers get the dtype policy `name` ("off": float32).

    Layers keep the policy they were created with, so building a model inside the context is
    all it takes; the global policy is restored afterwards.
    """
    check_policy(name)
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("float32" if name == "off" else name)
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)


def wrap_optimizer(optimizer, name):
    """`LossScaleOptimizer(optimizer)` (dynamic loss scaling) for float16, else `optimizer`."""
    check_policy(name)
    if name == "mixed_float16":
        return keras.optimizers.LossScaleOptimizer(optimizer)
    return optimizer


def computes_in_float16(model):
    """Whether any layer of `model` computes in float16 (then attacks need a gradient scale)."""
    layers = model._flatten_layers() if hasattr(model, "_flatten_layers") else []  # pylint: disable=protected-access
    return any(getattr(layer, "compute_dtype", None) == "float16" for layer in layers)


def scaled_input_gradient(inputs, scale):
    """Identity on float32 `inputs` whose gradient is divided by `scale` (in float32), with
    non-finite entries (a float16 overflow) set to 0: no step rather than a NaN image."""

    @tf.custom_gradient
    def identity(x):
        def gradient(upstream):
            unscaled = upstream / scale
            return tf.where(tf.math.is_finite(unscaled), unscaled, tf.zeros_like(unscaled))

        return tf.identity(x), gradient

    return identity(inputs)


def scaled_output_gradient(outputs, scale):
    """Identity on `outputs` whose gradient is multiplied by `scale` (before it enters the
    model's float16 backward pass)."""

    @tf.custom_gradient
    def identity(y):
        def gradient(upstream):
            return upstream * scale

        return tf.identity(y), gradient

    return identity(outputs)

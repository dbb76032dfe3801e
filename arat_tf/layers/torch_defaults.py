"""PyTorch's default initialisation of convolution and linear layers, as Keras initializers.

The papers' networks (the ARAT, Dual-BN, TRADES and MART code bases) are PyTorch modules that
keep PyTorch's defaults: kernels kaiming-uniform with a = sqrt(5), i.e. U(-1/sqrt(fan_in),
1/sqrt(fan_in)), and biases U(-1/sqrt(fan_in), 1/sqrt(fan_in)). Keras' defaults (glorot-uniform
kernels, zero biases) are a different starting point.

Each function returns a NEW initializer: a Keras initializer object fixes its seed when
constructed, so one shared object would give every same-shaped layer the same initial weights and
ignore `keras.utils.set_random_seed`.
"""

import keras


def torch_default_kernel_init():
    """PyTorch's default kernel init (kaiming_uniform, a = sqrt(5)): U(+-1/sqrt(fan_in))."""
    return keras.initializers.VarianceScaling(1.0 / 3.0, "fan_in", "uniform")


def torch_default_bias_init(fan_in):
    """PyTorch's default bias init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / float(fan_in) ** 0.5
    return keras.initializers.RandomUniform(-bound, bound)


def torch_default_dense(units, fan_in, name, use_bias=True, dtype=None):
    """A Dense layer initialised as PyTorch's `nn.Linear(fan_in, units, bias=use_bias)`."""
    return keras.layers.Dense(
        units, use_bias=use_bias, kernel_initializer=torch_default_kernel_init(),
        bias_initializer=torch_default_bias_init(fan_in), name=name, dtype=dtype,
    )

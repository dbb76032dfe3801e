"""PyTorch-style SGD with coupled (L2) weight decay for Keras 3.

The ARAT authors, like essentially every PyTorch adversarial-training codebase, train with
``torch.optim.SGD(params, lr, momentum=0.9, weight_decay=5e-4)``. Reproducing their numbers in
Keras needs *that* optimiser, and Keras does not ship it:

* ``keras.optimizers.SGD(weight_decay=...)`` applies **decoupled** decay
  (``w -= lr * wd * w`` outside the momentum buffer, as in SGDW/AdamW). PyTorch's
  ``weight_decay`` is **coupled** L2 regularisation: ``wd * w`` is added to the gradient
  *before* the momentum buffer, so the decay term is itself accelerated by momentum (with
  ``momentum=0.9`` it acts roughly 10x stronger in steady state). The two are different
  optimisers, and adversarial training is known to be sensitive to the amount of weight decay.
* Keras' momentum form ``m = mu * m - lr * g; w += m`` folds the learning rate into the
  buffer, PyTorch's ``buf = mu * buf + g; w -= lr * buf`` does not. The two agree while the
  learning rate is constant but differ after every learning-rate change (with Keras' form the
  buffer keeps "remembering" the old rate for ~1 / (1 - mu) steps), which matters for the
  step-decay schedules in :mod:`arat_tf.schedules`.

:class:`CoupledWeightDecaySGD` implements PyTorch's update rule exactly, on every trainable
variable (convolution kernels, biases, BatchNormalization gamma/beta and predictor heads), just as
``torch.optim.SGD(model.parameters(), ...)`` does.
"""

from __future__ import annotations

import numbers

import keras
from keras import ops

__all__ = ["CoupledWeightDecaySGD"]


@keras.saving.register_keras_serializable(package="arat_tf")
class CoupledWeightDecaySGD(keras.optimizers.Optimizer):
    """SGD with momentum and coupled L2 weight decay, matching ``torch.optim.SGD``.

    For every trainable variable ``w`` with gradient ``grad`` the update is (PyTorch's, with
    ``dampening=0``)::

        g = grad + coupled_weight_decay * w
        buf = momentum * buf + g          # buf starts at 0, so the first step gives buf = g
        d = g + momentum * buf if nesterov else buf
        w = w - learning_rate * d

    Why coupled decay: the decay gradient ``wd * w`` goes through the momentum buffer, exactly as
    in the PyTorch reference implementations of ARAT, Dual-BN, PGD-AT, TRADES and MART. Keras'
    own ``SGD(weight_decay=...)`` is decoupled decay, a different optimiser. Why PyTorch's momentum
    form: the learning rate multiplies the buffer at use time instead of being folded into it, so
    after a learning-rate drop the very next step already moves at the new rate.

    Decay is applied to all trainable variables by default (as ``model.parameters()`` in PyTorch).
    The Keras ``exclude_from_weight_decay(var_list=..., var_names=...)`` hook is honoured for users
    who want to exempt, e.g., BatchNormalization parameters; note that, like Keras' own setting,
    the exclusion is not part of ``get_config()`` and must be re-applied after deserialisation.

    Args:
        learning_rate: A float, a ``keras.optimizers.schedules.LearningRateSchedule`` (e.g. from
            :func:`arat_tf.schedules.make_learning_rate_schedule`) or a zero-argument callable.
        momentum: Momentum factor in ``[0, 1)``. ``0`` gives plain SGD with coupled decay.
        coupled_weight_decay: L2 coefficient ``>= 0`` added to the gradient (``wd * w``) before
            momentum. This is PyTorch's ``weight_decay``; ``5e-4`` is the standard CIFAR value.
        nesterov: Use Nesterov momentum (PyTorch's form). Requires ``momentum > 0``, as in PyTorch.
        name: Optimizer name.
        **kwargs: Other ``keras.optimizers.Optimizer`` arguments (``clipnorm``, ``clipvalue``,
            ``global_clipnorm``, ``use_ema``, ``loss_scale_factor``,
            ``gradient_accumulation_steps``, ...). ``weight_decay`` (Keras' decoupled decay) is
            rejected unless ``None``: use ``coupled_weight_decay``.

    Raises:
        ValueError: If ``momentum`` is not in ``[0, 1)``, ``coupled_weight_decay`` is negative,
            ``nesterov`` is set without momentum, or a non-``None`` ``weight_decay`` is passed.

    Example:
        ```python
        from arat_tf.optimizers import CoupledWeightDecaySGD
        from arat_tf.schedules import make_learning_rate_schedule

        schedule = make_learning_rate_schedule(
            "arat", base_learning_rate=0.1, epochs=100, steps_per_epoch=391)
        model.compile(
            optimizer=CoupledWeightDecaySGD(schedule, momentum=0.9, coupled_weight_decay=5e-4),
            loss="sparse_categorical_crossentropy")
        ```
    """

    def __init__(
        self,
        learning_rate=0.1,
        momentum=0.9,
        coupled_weight_decay=5e-4,
        nesterov=False,
        name="coupled_weight_decay_sgd",
        **kwargs,
    ):
        if kwargs.get("weight_decay") is not None:
            raise ValueError(
                "CoupledWeightDecaySGD applies coupled (PyTorch-style L2) decay through "
                "`coupled_weight_decay`; Keras' decoupled `weight_decay` is not supported. "
                f"Received: weight_decay={kwargs['weight_decay']!r}"
            )
        kwargs.pop("weight_decay", None)
        if (
            isinstance(momentum, bool)
            or not isinstance(momentum, numbers.Real)
            or not 0.0 <= momentum < 1.0
        ):
            raise ValueError(
                f"`momentum` must be a float in [0, 1). Received: momentum={momentum!r}"
            )
        if (
            isinstance(coupled_weight_decay, bool)
            or not isinstance(coupled_weight_decay, numbers.Real)
            or not coupled_weight_decay >= 0.0
        ):
            raise ValueError(
                "`coupled_weight_decay` must be a float >= 0. "
                f"Received: coupled_weight_decay={coupled_weight_decay!r}"
            )
        if nesterov and momentum == 0:
            raise ValueError(
                "Nesterov momentum requires momentum > 0 (as in torch.optim.SGD). "
                f"Received: momentum={momentum!r}, nesterov={nesterov!r}"
            )
        # No `weight_decay` is passed to the base class: that would add Keras' *decoupled* decay
        # on top of the coupled one.
        super().__init__(learning_rate=learning_rate, name=name, **kwargs)
        self.momentum = float(momentum)
        self.coupled_weight_decay = float(coupled_weight_decay)
        self.nesterov = bool(nesterov)

    def build(self, var_list):
        """Creates one zero-initialised momentum buffer per trainable variable.

        Args:
            var_list: The model's trainable variables.
        """
        if self.built:
            return
        super().build(var_list)
        # One slot per variable even when momentum == 0, so the optimizer's variable layout (and
        # hence its checkpoints) does not depend on the hyperparameters.
        self.momentums = self.add_optimizer_variables(var_list, "momentum")

    def update_step(self, gradient, variable, learning_rate):
        """Applies one PyTorch-SGD update to ``variable``.

        Args:
            gradient: The gradient of the loss w.r.t. ``variable`` (dense or ``IndexedSlices``;
                sparse gradients are densified because the decay term touches every row).
            variable: The model variable to update.
            learning_rate: The learning rate of this step (tensor or float).
        """
        dtype = variable.dtype
        learning_rate = ops.cast(learning_rate, dtype)
        gradient = ops.cast(ops.convert_to_tensor(gradient), dtype)
        if self.coupled_weight_decay and self._use_weight_decay(variable):
            gradient = ops.add(
                gradient, ops.multiply(ops.cast(self.coupled_weight_decay, dtype), variable)
            )
        buf = self.momentums[self._get_variable_index(variable)]
        momentum = ops.cast(self.momentum, dtype)
        new_buf = ops.add(ops.multiply(buf, momentum), gradient)
        self.assign(buf, new_buf)
        if self.nesterov:
            direction = ops.add(gradient, ops.multiply(new_buf, momentum))
        else:
            direction = new_buf
        self.assign_sub(variable, ops.multiply(direction, learning_rate))

    def get_config(self):
        """Returns the constructor arguments (plus the base optimizer config).

        Returns:
            A serialisable dict; ``CoupledWeightDecaySGD.from_config(config)`` rebuilds an
            equivalent (unbuilt) optimizer.
        """
        config = super().get_config()
        config.update(
            {
                "momentum": self.momentum,
                "coupled_weight_decay": self.coupled_weight_decay,
                "nesterov": self.nesterov,
            }
        )
        return config

"""Learning-rate schedules used by the adversarial-training recipes.

All schedules are ``keras.optimizers.schedules.LearningRateSchedule`` objects: pass them as the
``learning_rate`` of :class:`arat_tf.optimizers.CoupledWeightDecaySGD` and Keras evaluates them
at ``optimizer.iterations`` (the 0-based global step) on every update, so they work under
``tf.function`` and ``tf.distribute`` and are saved with the optimizer in ``.keras`` files.

The PyTorch reference codebases change the learning rate once per epoch (``scheduler.step()`` or
``adjust_learning_rate(optimizer, epoch)`` at the top of the epoch loop), so the step schedules
here are defined per epoch: ``epoch = step // steps_per_epoch`` (0-based) and the value is
constant within an epoch.
"""

from __future__ import annotations

import math
import numbers

import keras
from keras import ops

__all__ = [
    "LEARNING_RATE_SCHEDULES",
    "CosineSchedule",
    "EpochPiecewiseSchedule",
    "arat_boundaries",
    "dual_bn_boundaries",
    "make_learning_rate_schedule",
]

LEARNING_RATE_SCHEDULES = ("arat", "dual_bn", "cosine", "constant")
"""Names accepted by :func:`make_learning_rate_schedule`."""


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _check_positive_int(name: str, value) -> int:
    if not _is_int(value) or value < 1:
        raise ValueError(f"`{name}` must be an integer >= 1. Received: {name}={value!r}")
    return int(value)


@keras.saving.register_keras_serializable(package="arat_tf")
class EpochPiecewiseSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """Piecewise-constant learning rate that changes only at epoch boundaries.

    With ``epoch = step // steps_per_epoch`` (0-based), the rate is ``values[i]`` where ``i`` is
    the number of boundaries ``<= epoch``: ``values[0]`` before ``boundaries[0]``,
    ``values[1]`` from epoch ``boundaries[0]`` up to (excluding) ``boundaries[1]``, and so on.
    Boundaries are given in epochs rather than steps so that the schedule reads like the
    papers' ("divide by 10 at epoch 75") and survives a change of batch size unchanged except
    for ``steps_per_epoch``.

    Args:
        boundaries: Strictly increasing, non-negative integer epoch indices (0-based) at which the
            value changes. May be empty (constant schedule).
        values: ``len(boundaries) + 1`` learning rates.
        steps_per_epoch: Optimizer steps per epoch (integer ``>= 1``).

    Raises:
        ValueError: If the boundaries are not strictly increasing non-negative integers, the
            number of values is not ``len(boundaries) + 1``, a value is not a real number, or
            ``steps_per_epoch`` is not a positive integer.

    Example:
        ```python
        # 0.1 for epochs 0-74, 0.01 for 75-89, 0.001 from epoch 90; 391 steps per epoch.
        schedule = EpochPiecewiseSchedule([75, 90], [0.1, 0.01, 0.001], steps_per_epoch=391)
        float(schedule(391 * 75))  # 0.01
        ```
    """

    def __init__(self, boundaries, values, steps_per_epoch):
        boundaries = list(boundaries)
        values = list(values)
        if not all(_is_int(b) and b >= 0 for b in boundaries) or any(
            b1 <= b0 for b0, b1 in zip(boundaries, boundaries[1:])
        ):
            raise ValueError(
                "`boundaries` must be strictly increasing non-negative integer epoch indices. "
                f"Received: boundaries={boundaries!r}"
            )
        if len(values) != len(boundaries) + 1:
            raise ValueError(
                "`values` must have exactly one more element than `boundaries`. Received: "
                f"boundaries={boundaries!r} (length {len(boundaries)}) and values={values!r} "
                f"(length {len(values)})"
            )
        if not all(_is_real(v) and math.isfinite(v) for v in values):
            raise ValueError(f"`values` must be finite real numbers. Received: values={values!r}")
        self.boundaries = [int(b) for b in boundaries]
        self.values = [float(v) for v in values]
        self.steps_per_epoch = _check_positive_int("steps_per_epoch", steps_per_epoch)

    def __call__(self, step):
        """Returns the learning rate at ``step`` (0-based global step) as a float32 scalar."""
        step = ops.cast(ops.convert_to_tensor(step), "int64")
        epoch = ops.floor_divide(step, ops.cast(self.steps_per_epoch, "int64"))
        result = ops.convert_to_tensor(self.values[0], dtype="float32")
        for boundary, value in zip(self.boundaries, self.values[1:]):
            result = ops.where(
                ops.greater_equal(epoch, ops.cast(boundary, "int64")),
                ops.convert_to_tensor(value, dtype="float32"),
                result,
            )
        return result

    def get_config(self):
        """Returns the constructor arguments."""
        return {
            "boundaries": list(self.boundaries),
            "values": list(self.values),
            "steps_per_epoch": self.steps_per_epoch,
        }


@keras.saving.register_keras_serializable(package="arat_tf")
class CosineSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """Per-step cosine annealing from ``base_learning_rate`` to 0, without restarts or warm-up.

    ``lr(step) = 0.5 * base * (1 + cos(pi * min(step, total_steps) / total_steps))``: ``base`` at
    step 0, ``base / 2`` half way, 0 at (and after) ``total_steps``. Unlike the step schedules it
    is evaluated per step (as ``torch.optim.lr_scheduler.CosineAnnealingLR`` stepped per batch),
    which is the usual form for adversarial training with cosine decay.

    Args:
        base_learning_rate: Initial learning rate (finite, ``>= 0``).
        total_steps: Number of optimizer steps over which to anneal (integer ``>= 1``).

    Raises:
        ValueError: If an argument is out of range.

    Example:
        ```python
        schedule = CosineSchedule(0.1, total_steps=100 * 391)
        float(schedule(50 * 391))  # 0.05
        ```
    """

    def __init__(self, base_learning_rate, total_steps):
        if not _is_real(base_learning_rate) or not (
            math.isfinite(base_learning_rate) and base_learning_rate >= 0
        ):
            raise ValueError(
                "`base_learning_rate` must be a finite float >= 0. "
                f"Received: base_learning_rate={base_learning_rate!r}"
            )
        self.base_learning_rate = float(base_learning_rate)
        self.total_steps = _check_positive_int("total_steps", total_steps)

    def __call__(self, step):
        """Returns the learning rate at ``step`` (0-based global step) as a float32 scalar."""
        # float64 keeps step / total_steps exact for any realistic step count.
        step = ops.cast(ops.convert_to_tensor(step), "float64")
        total = ops.cast(self.total_steps, "float64")
        progress = ops.divide(ops.minimum(ops.maximum(step, 0.0), total), total)
        value = 0.5 * self.base_learning_rate * (1.0 + ops.cos(math.pi * progress))
        return ops.cast(value, "float32")

    def get_config(self):
        """Returns the constructor arguments."""
        return {"base_learning_rate": self.base_learning_rate, "total_steps": self.total_steps}


def _round_half_up(numerator: int, denominator: int) -> int:
    """``round(numerator / denominator)`` with halves rounded up, in exact integer arithmetic."""
    return (2 * numerator + denominator) // (2 * denominator)


def _strictly_increasing_from_one(boundaries: list[int]) -> list[int]:
    """Pushes each boundary to at least 1 and past its predecessor (for tiny epoch counts)."""
    fixed: list[int] = []
    for boundary in boundaries:
        fixed.append(max(boundary, 1, fixed[-1] + 1 if fixed else 1))
    return fixed


def arat_boundaries(epochs: int) -> list[int]:
    """0-based epoch boundaries of the ARAT authors' step schedule, scaled to ``epochs``.

    For the authors' 100 epochs this is ``[1, 76, 91]``: a one-epoch warm-up, the base rate for
    (1-based) epochs 2-76, then x0.1 for epochs 77-91 and x0.01 for 92-100. For other epoch
    counts the two decay points are scaled proportionally, ``round(0.76 * epochs)`` and
    ``round(0.91 * epochs)`` (halves rounded up, computed in integers so float error can never
    move a boundary), and the warm-up stays one epoch long.

    For tiny epoch counts the rounded boundaries can collide (e.g. ``epochs=2`` gives
    ``[1, 2, 2]``); each boundary is then pushed to one past its predecessor (``[1, 2, 3]``), so
    the schedule always has its four phases in order and boundaries at or past ``epochs``
    simply never trigger. The result is always strictly increasing and ``>= 1``.

    Args:
        epochs: Total number of training epochs (integer ``>= 1``).

    Returns:
        Three strictly increasing 0-based epoch indices.
    """
    epochs = _check_positive_int("epochs", epochs)
    return _strictly_increasing_from_one(
        [1, _round_half_up(76 * epochs, 100), _round_half_up(91 * epochs, 100)]
    )


def dual_bn_boundaries(epochs: int) -> list[int]:
    """0-based epoch boundaries of the Dual-BN paper's schedule, scaled to ``epochs``.

    The paper trains 110 epochs with the base rate until epoch 100, x0.1 from 100 and x0.01 from
    105 (``[100, 105]``). Other epoch counts use ``round(epochs * 100 / 110)`` and
    ``round(epochs * 105 / 110)`` (halves up, integer arithmetic), made strictly increasing and
    ``>= 1`` as in :func:`arat_boundaries`.

    Args:
        epochs: Total number of training epochs (integer ``>= 1``).

    Returns:
        Two strictly increasing 0-based epoch indices.
    """
    epochs = _check_positive_int("epochs", epochs)
    return _strictly_increasing_from_one(
        [_round_half_up(100 * epochs, 110), _round_half_up(105 * epochs, 110)]
    )


def make_learning_rate_schedule(
    name: str, *, base_learning_rate: float, epochs: int, steps_per_epoch: int
) -> keras.optimizers.schedules.LearningRateSchedule:
    """Builds a named learning-rate schedule.

    Names:
        * ``"arat"``: the schedule the ARAT authors' code actually runs (100 epochs):
          ``0.2 * base`` for the first epoch, ``base`` for epochs 2-76, ``0.1 * base`` for
          77-91 and ``0.01 * base`` for 92-100 (1-based). The 0.2x first epoch is there because
          the authors' training code warms up the first epoch (0.02 for base 0.1), which eases
          the first adversarial epoch from a random initialisation; reproducing their numbers
          means reproducing it. Boundaries scale with ``epochs``; see :func:`arat_boundaries`.
        * ``"dual_bn"``: the Dual-BN paper's 110-epoch schedule, ``base`` then x0.1 from epoch 100
          and x0.01 from epoch 105 (0-based), scaled for other ``epochs``; see
          :func:`dual_bn_boundaries`.
        * ``"cosine"``: :class:`CosineSchedule` over ``epochs * steps_per_epoch`` steps.
        * ``"constant"``: ``base`` throughout (returned as an :class:`EpochPiecewiseSchedule`
          with no boundaries, so every name yields a ``LearningRateSchedule``).

    Args:
        name: One of :data:`LEARNING_RATE_SCHEDULES`.
        base_learning_rate: The peak learning rate (``0.1`` in the reference recipes).
        epochs: Total number of training epochs (integer ``>= 1``).
        steps_per_epoch: Optimizer steps per epoch (integer ``>= 1``).

    Returns:
        A serialisable ``keras.optimizers.schedules.LearningRateSchedule``.

    Raises:
        ValueError: For an unknown name or out-of-range arguments.

    Example:
        ```python
        schedule = make_learning_rate_schedule(
            "arat", base_learning_rate=0.1, epochs=100, steps_per_epoch=391)
        [float(schedule(391 * e)) for e in (0, 1, 76, 91)]  # ~[0.02, 0.1, 0.01, 0.001]
        ```
    """
    if name not in LEARNING_RATE_SCHEDULES:
        raise ValueError(
            f"Unknown learning-rate schedule {name!r}; known: {', '.join(LEARNING_RATE_SCHEDULES)}"
        )
    if not _is_real(base_learning_rate) or not (
        math.isfinite(base_learning_rate) and base_learning_rate > 0
    ):
        raise ValueError(
            "`base_learning_rate` must be a finite float > 0. "
            f"Received: base_learning_rate={base_learning_rate!r}"
        )
    epochs = _check_positive_int("epochs", epochs)
    steps_per_epoch = _check_positive_int("steps_per_epoch", steps_per_epoch)
    base = float(base_learning_rate)
    if name == "arat":
        return EpochPiecewiseSchedule(
            arat_boundaries(epochs), [base / 5, base, base / 10, base / 100], steps_per_epoch
        )
    if name == "dual_bn":
        return EpochPiecewiseSchedule(
            dual_bn_boundaries(epochs), [base, base / 10, base / 100], steps_per_epoch
        )
    if name == "cosine":
        return CosineSchedule(base, epochs * steps_per_epoch)
    return EpochPiecewiseSchedule([], [base], steps_per_epoch)

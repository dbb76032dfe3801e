"""The iterative attack loop and the PGD, FGSM and TRADES attacks built from it."""

import dataclasses
import functools
import numbers

import tensorflow as tf

from arat_tf.attacks import losses, parts
from arat_tf.attacks.graph_mode import compiled_for

STARTS = ("uniform", "gaussian", "zero")


def _check_non_negative(name, value):
    """Validates a python-level eps/step_size; tensors are the caller's responsibility."""
    if tf.is_tensor(value):
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not value >= 0:
        raise ValueError(f"{name} must be a real number >= 0, got {value!r}")


def _check_steps(steps):
    if tf.is_tensor(steps):
        return
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 0:
        raise ValueError(f"steps must be an integer >= 0, got {steps!r}")


def _loss_fn(loss):
    if callable(loss):
        return loss
    if loss not in losses.ATTACK_LOSSES:
        raise ValueError(f"loss must be one of {sorted(losses.ATTACK_LOSSES)} or a callable, got {loss!r}")
    return losses.ATTACK_LOSSES[loss]


def iterative_attack(forward, x, target, *, loss_fn, start_fn, step_fn, project_fn, eps, step_size, steps,
                     seed=None):
    """Maximises `loss_fn(forward(x_adv), target)` over the eps ball by projected steepest ascent.

    `x_0 = project_fn(start_fn(x, eps), x, eps)`, then `steps` times
    `x_{k+1} = project_fn(x_k + step_size * step_fn(grad), x, eps)`.

    Design choices:

    * The per-example losses are SUMMED over the batch, not averaged. Each example's loss depends
      only on its own input, so the gradient of the sum w.r.t. example i is exactly the gradient
      of its own loss: the step does not depend on batch size, and a mean's 1/B factor cannot
      push small gradients below float precision or the 1e-12 floor of the l2 step.
    * The loop is a `tf.while_loop`. Inside `tf.function` (e.g. a Keras `train_step`) it is one
      graph loop whose size does not grow with `steps`, so tracing stays fast for 50-step
      evaluation attacks. Called eagerly, the attack runs as a `tf.function` compiled once per
      `forward` and attack parts (see `graph_mode`): reuse one `forward` across batches.
    * The result goes through `tf.stop_gradient`: the attack solves the inner maximisation and
      training treats its result as a fixed input (Danskin's theorem), so an enclosing tape
      must not backpropagate through the attack loop.

    The model behind `forward` must already be built: variables cannot be created inside a graph
    loop.

    Args:
      forward: callable `x -> logits`; see `make_forward` to choose BN branch and mode.
      x: clean float inputs in [0, 1], batch first.
      target: what `loss_fn` compares against: integer labels, or reference logits for KL.
      loss_fn: per-example loss `(logits, target) -> [B]` to maximise.
      start_fn: `(x, eps) -> x_start`.
      step_fn: `grad -> direction`.
      project_fn: `(x_adv, x, eps) -> x_proj`.
      eps: radius of the threat model's ball, >= 0.
      step_size: size of each step in the attack's norm, >= 0.
      steps: number of ascent steps, an int >= 0 (0 returns the projected start).
      seed: None (the random start draws from TensorFlow's global random state, as training does)
        or an int: the start is drawn with stateless random ops, so the same seed gives the same
        attack in any process (evaluation reproducibility). Starts get it as `seed=`.

    Returns:
      The adversarial inputs, same shape and dtype as `x`, with gradients stopped.

    Raises:
      ValueError: if eps, step_size or steps is invalid.

    Example:
      >>> x_adv = iterative_attack(
      ...     forward, x, labels, loss_fn=losses.cross_entropy, start_fn=parts.uniform_start("linf"),
      ...     step_fn=parts.sign_step, project_fn=parts.project_linf,
      ...     eps=8 / 255, step_size=2 / 255, steps=10)
    """
    _check_non_negative("eps", eps)
    _check_non_negative("step_size", step_size)
    _check_steps(steps)
    x = tf.stop_gradient(tf.convert_to_tensor(x))
    if not x.dtype.is_floating:
        raise ValueError(f"x must be a float tensor scaled to [0, 1], got dtype {x.dtype.name}")
    eps = tf.cast(eps, x.dtype)
    step_size = tf.cast(step_size, x.dtype)
    if seed is not None and not tf.is_tensor(seed):
        seed = tf.constant([int(seed), 0], tf.int64)
    if tf.executing_eagerly():
        parts_key = ("iterative_attack", loss_fn, start_fn, step_fn, project_fn)
        compiled = compiled_for(forward, parts_key, functools.partial(
            _compile_loop, loss_fn=loss_fn, start_fn=start_fn, step_fn=step_fn, project_fn=project_fn))
        return compiled(x, target, eps, step_size, tf.constant(steps, tf.int32), seed)
    return _attack_loop(forward, x, target, loss_fn, start_fn, step_fn, project_fn, eps, step_size,
                        steps, seed)


def _compile_loop(forward_ref, *, loss_fn, start_fn, step_fn, project_fn):
    @tf.function(reduce_retracing=True)
    def run(x, target, eps, step_size, steps, seed):
        return _attack_loop(forward_ref(), x, target, loss_fn, start_fn, step_fn, project_fn,
                            eps, step_size, steps, seed)

    return run


def _attack_loop(forward, x, target, loss_fn, start_fn, step_fn, project_fn, eps, step_size, steps,
                 seed):
    x_start = start_fn(x, eps) if seed is None else start_fn(x, eps, seed=seed)
    x_start = project_fn(x_start, x, eps)

    def cond(k, x_k):
        del x_k
        return k < steps

    def body(k, x_k):
        with tf.GradientTape(watch_accessed_variables=False) as tape:
            tape.watch(x_k)
            loss = tf.reduce_sum(loss_fn(forward(x_k), target))
        grad = tape.gradient(loss, x_k, unconnected_gradients=tf.UnconnectedGradients.ZERO)
        x_next = project_fn(x_k + step_size * tf.cast(step_fn(grad), x.dtype), x, eps)
        return k + 1, tf.ensure_shape(x_next, x.shape)

    _, x_adv = tf.while_loop(cond, body, (tf.constant(0), x_start), maximum_iterations=steps)
    return tf.stop_gradient(x_adv)


def pgd_linf(forward, x, labels, *, eps=8 / 255, step_size=2 / 255, steps=10, random_start=True, loss="ce", seed=None):
    """PGD under the linf threat model (Madry et al., 2018).

    Args:
      forward: callable `x -> logits`.
      x: clean inputs in [0, 1].
      labels: integer labels.
      eps: linf radius.
      step_size: size of each sign step.
      steps: number of steps.
      random_start: start uniformly in the ball (True) or at `x` (False).
      loss: a key of `ATTACK_LOSSES` ("ce", "cw", ...) or a per-example loss callable.
      seed: optional int making the random start reproducible (see `iterative_attack`).

    Returns:
      Adversarial inputs like `x`.

    Example:
      >>> x_adv = pgd_linf(make_forward(model), x, y, steps=20, loss="cw")
    """
    start = parts.uniform_start("linf") if random_start else parts.zero_start()
    return iterative_attack(
        forward, x, labels, loss_fn=_loss_fn(loss), start_fn=start, step_fn=parts.sign_step,
        project_fn=parts.project_linf, eps=eps, step_size=step_size, steps=steps, seed=seed)


def pgd_l2(forward, x, labels, *, eps=0.5, step_size=0.1, steps=10, random_start=True, loss="ce", seed=None):
    """PGD under the l2 threat model: normalised-gradient steps, l2-ball projection.

    Args:
      forward: callable `x -> logits`.
      x: clean inputs in [0, 1].
      labels: integer labels.
      eps: l2 radius per example.
      step_size: l2 length of each step.
      steps: number of steps.
      random_start: start uniformly in the l2 ball (True) or at `x` (False).
      loss: a key of `ATTACK_LOSSES` or a per-example loss callable.
      seed: optional int making the random start reproducible (see `iterative_attack`).

    Returns:
      Adversarial inputs like `x`.

    Example:
      >>> x_adv = pgd_l2(make_forward(model), x, y, eps=0.5, step_size=0.1)
    """
    start = parts.uniform_start("l2") if random_start else parts.zero_start()
    return iterative_attack(
        forward, x, labels, loss_fn=_loss_fn(loss), start_fn=start, step_fn=parts.l2_normalized_step,
        project_fn=parts.project_l2, eps=eps, step_size=step_size, steps=steps, seed=seed)


def fgsm(forward, x, labels, *, eps=8 / 255, loss="ce"):
    """FGSM (Goodfellow et al., 2015): one sign step of size eps from `x`, no random start.

    Args:
      forward: callable `x -> logits`.
      x: clean inputs in [0, 1].
      labels: integer labels.
      eps: linf radius, also the step size.
      loss: a key of `ATTACK_LOSSES` or a per-example loss callable.
      seed: optional int making the random start reproducible (see `iterative_attack`).

    Returns:
      Adversarial inputs like `x`.

    Example:
      >>> x_adv = fgsm(make_forward(model), x, y, eps=8 / 255)
    """
    return iterative_attack(
        forward, x, labels, loss_fn=_loss_fn(loss), start_fn=parts.zero_start(), step_fn=parts.sign_step,
        project_fn=parts.project_linf, eps=eps, step_size=eps, steps=1)


def trades_attack(forward, x, reference_logits, *, eps=8 / 255, step_size=2 / 255, steps=10, stddev=0.001):
    """The TRADES inner maximisation (Zhang et al., 2019): maximise KL to the clean prediction.

    Uses a small gaussian start (the KL and its gradient are exactly zero at `x`), sign steps and
    the linf projection.

    Args:
      forward: callable `x -> logits`.
      x: clean inputs in [0, 1].
      reference_logits: the model's logits on `x`; treated as constants.
      eps: linf radius.
      step_size: size of each sign step.
      steps: number of steps.
      stddev: standard deviation of the gaussian start.

    Returns:
      Adversarial inputs like `x`.

    Example:
      >>> forward = make_forward(model)
      >>> x_adv = trades_attack(forward, x, forward(x))
    """
    return iterative_attack(
        forward, x, reference_logits, loss_fn=losses.kl_divergence, start_fn=parts.gaussian_start(stddev),
        step_fn=parts.sign_step, project_fn=parts.project_linf, eps=eps, step_size=step_size, steps=steps)


@dataclasses.dataclass(frozen=True)
class AttackConfig:
    """An attack described by plain values, so training code can build it from flags.

    Attributes:
      norm: "linf" (sign steps, linf projection) or "l2" (normalised steps, l2 projection).
      eps: radius of the ball, >= 0.
      step_size: step length in `norm`, >= 0.
      steps: number of steps, an int >= 0.
      loss: a key of `ATTACK_LOSSES`; "kl" expects reference logits as target.
      start: "uniform" (in the `norm` ball), "gaussian" (stddev 0.001) or "zero".

    Example:
      >>> config = AttackConfig(norm="linf", eps=8 / 255, step_size=2 / 255, steps=10)
      >>> x_adv = config.run(make_forward(model), x, y)
    """

    norm: str = "linf"
    eps: float = 8 / 255
    step_size: float = 2 / 255
    steps: int = 10
    loss: str = "ce"
    start: str = "uniform"

    def __post_init__(self):
        if self.norm not in parts.NORMS:
            raise ValueError(f"norm must be one of {parts.NORMS}, got {self.norm!r}")
        if self.start not in STARTS:
            raise ValueError(f"start must be one of {STARTS}, got {self.start!r}")
        if not isinstance(self.loss, str) or self.loss not in losses.ATTACK_LOSSES:
            raise ValueError(f"loss must be one of {sorted(losses.ATTACK_LOSSES)}, got {self.loss!r}")
        if any(tf.is_tensor(v) for v in (self.eps, self.step_size, self.steps)):
            raise ValueError("AttackConfig takes python numbers, not tensors")
        _check_non_negative("eps", self.eps)
        _check_non_negative("step_size", self.step_size)
        _check_steps(self.steps)

    def run(self, forward, x, target):
        """Runs the configured attack.

        Args:
          forward: callable `x -> logits`.
          x: clean inputs in [0, 1].
          target: integer labels, or reference logits when `loss == "kl"`.

        Returns:
          Adversarial inputs like `x`.
        """
        if self.start == "uniform":
            start_fn = parts.uniform_start(self.norm)
        elif self.start == "gaussian":
            start_fn = parts.gaussian_start()
        else:
            start_fn = parts.zero_start()
        linf = self.norm == "linf"
        return iterative_attack(
            forward, x, target, loss_fn=losses.ATTACK_LOSSES[self.loss], start_fn=start_fn,
            step_fn=parts.sign_step if linf else parts.l2_normalized_step,
            project_fn=parts.project_linf if linf else parts.project_l2,
            eps=self.eps, step_size=self.step_size, steps=self.steps)

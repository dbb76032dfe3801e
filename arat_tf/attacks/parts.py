"""The small parts an attack is composed from: starts, step rules and projections.

* A start `start_fn(x, eps) -> x_start` picks the first iterate. It need not lie inside the eps
  ball or [0, 1]: the attack loop projects it straight away.
* A step rule `step_fn(grad) -> direction` turns the loss gradient into an ascent direction of
  unit size in the attack's norm, so `step_size` is measured in that norm.
* A projection `project_fn(x_adv, x, eps) -> x_proj` maps an iterate back into the eps ball
  around `x` intersected with the image box [0, 1].

All parts act per example (the first axis is the batch) and work on any input rank, eagerly and
inside `tf.function`.
"""

import functools

import tensorflow as tf

NORMS = ("linf", "l2")

_NORM_FLOOR = 1e-12


def _per_example_l2_norm(t):
    """The l2 norm of each example, shaped [B, 1, ..., 1] so it broadcasts against `t`."""
    axes = tf.range(1, tf.rank(t))
    return tf.sqrt(tf.reduce_sum(tf.square(t), axis=axes, keepdims=True))


def _check_norm(norm):
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")


def _uniform(shape, dtype, seed, offset, minval=0.0, maxval=1.0):
    """U(minval, maxval): stateless (reproducible) when a `[2]` integer `seed` is given."""
    if seed is None:
        return tf.random.uniform(shape, minval, maxval, dtype=dtype)
    return tf.random.stateless_uniform(shape, seed + [0, offset], minval, maxval, dtype=dtype)


def _normal(shape, dtype, seed, offset):
    """N(0, 1): stateless (reproducible) when a `[2]` integer `seed` is given."""
    if seed is None:
        return tf.random.normal(shape, dtype=dtype)
    return tf.random.stateless_normal(shape, seed + [0, offset], dtype=dtype)


@functools.lru_cache(maxsize=None)
def uniform_start(norm):
    """A start drawn uniformly from the eps ball of the given norm.

    Args:
      norm: "linf" (x + U(-eps, eps) per coordinate) or "l2" (x plus a point uniform in the l2
        ball: a gaussian direction normalised to unit length, radius `eps * u ** (1 / d)` with
        u ~ U(0, 1) and d the number of coordinates per example, so volume is covered evenly).

    Returns:
      A start fn `(x, eps) -> x_start`.

    Example:
      >>> start = uniform_start("linf")
      >>> x0 = start(tf.zeros([2, 4]), 0.1)  # every |x0| <= 0.1
    """
    _check_norm(norm)

    def linf_start(x, eps, seed=None):
        eps = tf.cast(eps, x.dtype)
        return x + _uniform(tf.shape(x), x.dtype, seed, 0, -eps, eps)

    def l2_start(x, eps, seed=None):
        eps = tf.cast(eps, x.dtype)
        direction = _normal(tf.shape(x), x.dtype, seed, 0)
        direction /= tf.maximum(_per_example_l2_norm(direction), _NORM_FLOOR)
        batch_shape = tf.concat([tf.shape(x)[:1], tf.ones([tf.rank(x) - 1], tf.int32)], axis=0)
        dims = tf.cast(tf.reduce_prod(tf.shape(x)[1:]), x.dtype)
        radius = eps * _uniform(batch_shape, x.dtype, seed, 1) ** (1.0 / dims)
        return x + radius * direction

    return linf_start if norm == "linf" else l2_start


@functools.lru_cache(maxsize=None)
def gaussian_start(stddev=0.001):
    """A start `x + stddev * N(0, 1)`, the small random start of TRADES and MART.

    Args:
      stddev: standard deviation of the noise; independent of eps.

    Returns:
      A start fn `(x, eps) -> x_start`.

    Example:
      >>> x0 = gaussian_start(0.001)(tf.zeros([2, 4]), 8 / 255)
    """

    def start(x, eps, seed=None):
        del eps
        return x + tf.cast(stddev, x.dtype) * _normal(tf.shape(x), x.dtype, seed, 0)

    return start


@functools.lru_cache(maxsize=None)
def zero_start():
    """A start at `x` itself: deterministic, as in FGSM and reproducible evaluations.

    Returns:
      A start fn `(x, eps) -> x`.

    Example:
      >>> zero_start()(tf.ones([1, 2]), 0.1).numpy()
      array([[1., 1.]], dtype=float32)
    """

    def start(x, eps, seed=None):
        del eps, seed
        return tf.identity(x)

    return start


def sign_step(grad):
    """The steepest-ascent direction under the linf norm: `sign(grad)`.

    Args:
      grad: gradient of the attack loss w.r.t. the input.

    Returns:
      A tensor like `grad` with entries in {-1, 0, 1}.

    Example:
      >>> sign_step(tf.constant([[0.3, -2.0, 0.0]])).numpy()
      array([[ 1., -1.,  0.]], dtype=float32)
    """
    return tf.sign(grad)


def l2_normalized_step(grad):
    """The steepest-ascent direction under the l2 norm: `grad / ||grad||_2` per example.

    The norm is floored at 1e-12, so an example whose gradient vanishes (e.g. a saturated
    softmax) takes no step instead of producing NaNs.

    Args:
      grad: gradient of the attack loss w.r.t. the input.

    Returns:
      A tensor like `grad` with unit (or zero) l2 norm per example.

    Example:
      >>> l2_normalized_step(tf.constant([[3.0, 4.0]])).numpy()
      array([[0.6, 0.8]], dtype=float32)
    """
    return grad / tf.maximum(_per_example_l2_norm(grad), tf.cast(_NORM_FLOOR, grad.dtype))


def project_linf(x_adv, x, eps):
    """Clip `x_adv` to the linf ball `[x - eps, x + eps]`, then to the image box [0, 1].

    Args:
      x_adv: the iterate to project.
      x: the clean input, centre of the ball (assumed inside [0, 1]).
      eps: linf radius.

    Returns:
      The projected tensor, same shape and dtype as `x_adv`.

    Example:
      >>> project_linf(tf.constant([[0.5, -1.0]]), tf.constant([[0.2, 0.0]]), 0.1).numpy()
      array([[0.3, 0. ]], dtype=float32)
    """
    eps = tf.cast(eps, x_adv.dtype)
    x_adv = tf.clip_by_value(x_adv, x - eps, x + eps)
    return tf.clip_by_value(x_adv, 0.0, 1.0)


def project_l2(x_adv, x, eps):
    """Rescale each example's perturbation to l2 norm <= eps, then clip to [0, 1].

    Clipping after rescaling keeps the result in the ball: for `x` inside [0, 1], clipping only
    shrinks each coordinate of the perturbation towards zero.

    Args:
      x_adv: the iterate to project.
      x: the clean input, centre of the ball (assumed inside [0, 1]).
      eps: l2 radius.

    Returns:
      The projected tensor, same shape and dtype as `x_adv`.

    Example:
      >>> project_l2(tf.constant([[0.6, 0.8]]), tf.constant([[0.0, 0.0]]), 0.5).numpy()
      array([[0.3, 0.4]], dtype=float32)
    """
    eps = tf.cast(eps, x_adv.dtype)
    delta = x_adv - x
    norm = _per_example_l2_norm(delta)
    scale = tf.minimum(1.0, eps / tf.maximum(norm, tf.cast(_NORM_FLOOR, delta.dtype)))
    return tf.clip_by_value(x + delta * scale, 0.0, 1.0)

"""Square Attack, L-inf (Andriushchenko et al., ECCV 2020): score-based black-box random search.

The attack only queries `forward(x) -> logits`: no gradients. It starts from vertical stripes of
+-eps and then, each iteration, redraws the perturbation inside one random square window (one
random sign per channel, so the window becomes +-eps per channel), keeping the candidate only
if it lowers the margin loss `z_y - max_{i != y} z_i`. The window side shrinks with a fixed
schedule of the fraction `p` of pixels changed. An example stops, and stops costing queries, as
soon as it is misclassified.
"""

import numbers

import tensorflow as tf

from arat_tf.attacks import losses
from arat_tf.attacks.graph_mode import run_compiled
from arat_tf.attacks.random_keys import rng_key

# Iterations (of a 10,000-query budget) after which p halves, from the paper's schedule.
_P_HALVING_POINTS = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)
# A candidate identical to the current point (e.g. the same signs redrawn) is resampled up to
# this many times, as in the authors' description; the cap only matters in degenerate cases.
_MAX_RESAMPLES = 10
_UNCHANGED_TOL = 1e-7


def square_p_schedule(iteration, n_queries, p_init=0.8):
    """The fraction of pixels changed at `iteration`: `p_init` halved at fixed points of the run.

    The published schedule is defined for 10,000 iterations (p halves after iterations 10, 50,
    200, 500, 1000, 2000, 4000, 6000 and 8000); other budgets rescale the iteration as
    `it = int(iteration / n_queries * 10000)`.

    Args:
      iteration: the 0-based iteration (after the initial query), a python int or int tensor.
      n_queries: the query budget.
      p_init: the initial fraction.

    Returns:
      p, a float32 scalar tensor.

    Example:
      >>> round(float(square_p_schedule(100, 5000)), 6)  # it = 200: p_init halved twice
      0.2
    """
    scaled = tf.cast(iteration, tf.float64) / tf.cast(n_queries, tf.float64) * 10000.0
    scaled = tf.floor(scaled)
    halvings = tf.reduce_sum(tf.cast(scaled > tf.constant(_P_HALVING_POINTS, tf.float64), tf.int32))
    return tf.cast(p_init, tf.float32) / tf.cast(2 ** halvings, tf.float32)


def _split(key, n):
    return tf.unstack(tf.random.experimental.stateless_split(key, n))


def _random_signs(shape, key, dtype):
    return tf.cast(2 * tf.random.stateless_uniform(shape, key, 0, 2, dtype=tf.int32) - 1, dtype)


def _margin(logits, labels):
    """The Square Attack loss `z_y - max_{i != y} z_i` (negative once misclassified)."""
    return -losses.cw_margin(logits, labels)


def _predicts_wrong(logits, labels):
    return tf.argmax(logits, axis=-1, output_type=tf.int32) != labels


def square_linf(forward, x, labels, *, eps, n_queries=5000, p_init=0.8, seed=None, return_queries=False):
    """The L-inf Square Attack (Andriushchenko et al., 2020) with the margin loss.

    * Initialisation (1 query): vertical stripes, `x + eps * s` clipped to [0, 1], with one
      random sign s per column and channel, constant down each column.
    * Each of the remaining `n_queries - 1` iterations (1 query per still-active example):
      `p = square_p_schedule(i, n_queries, p_init)`, window side
      `s = round(sqrt(p * n_features / c))` (n_features = h * w * c) clipped to
      [1, min(h, w) - 1] (as in the authors' code, so the window never covers the image);
      each example gets its own uniformly random window position and one random sign per
      channel; inside the window the perturbation is set to `+-eps` (a change of 0 or +-2 eps
      from the current +-eps), the candidate is projected to the eps ball and [0, 1], and is
      redrawn if that leaves the point unchanged. It is accepted only if its margin loss is
      strictly lower. An example stops (keeps its state and costs no more queries) once its
      accepted point is misclassified; the loop ends early when all have stopped.
    * The loop is one `tf.while_loop` over iterations with the whole batch vectorised (window
      masks from `tf.range` comparisons). Called eagerly, the attack runs as a `tf.function`
      compiled once per `forward` and settings (see `graph_mode.run_compiled`); inside a
      `tf.function` it is built inline. `forward` must
      therefore be built from TF ops, but it is never differentiated.
    * Randomness: stateless Philox ops keyed by `seed` (see `arat_tf.attacks.random_keys.rng_key`), so the same seed gives
      the same result, eagerly or in a graph.

    Examples misclassified on the clean input are not attacked (0 queries, `x_adv = x`).

    Args:
      forward: callable `x -> logits`; only its outputs are used.
      x: clean float inputs in [0, 1], NHWC.
      labels: integer labels [B].
      eps: L-inf radius, >= 0.
      n_queries: query budget per example (>= 1), including the initial query.
      p_init: initial fraction of pixels changed per iteration, in (0, 1].
      seed: int, `tf.random.Generator` or None.
      return_queries: also return the queries used per example.

    Returns:
      `(x_adv, success)` or, with `return_queries`, `(x_adv, success, queries)`. `x_adv` is the
      accepted point with the lowest margin (adversarial where `success`; for robust examples
      the best non-adversarial point, still inside the eps ball and [0, 1]); `success` is a bool
      [B], True where `argmax forward(x_adv) != labels` (clean-misclassified examples included,
      so `1 - mean(success)` is the robust accuracy); `queries` is an int32 [B].

    Raises:
      ValueError: on invalid arguments or if `x` is not rank 4.

    Example:
      >>> x_adv, success = square_linf(make_forward(model), x, y, eps=8 / 255, seed=0)
    """
    if not tf.is_tensor(eps) and (isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not eps >= 0):
        raise ValueError(f"eps must be a real number >= 0, got {eps!r}")
    if isinstance(n_queries, bool) or not isinstance(n_queries, numbers.Integral) or n_queries < 1:
        raise ValueError(f"n_queries must be an integer >= 1, got {n_queries!r}")
    if isinstance(p_init, bool) or not isinstance(p_init, numbers.Real) or not 0 < p_init <= 1:
        raise ValueError(f"p_init must be a real number in (0, 1], got {p_init!r}")
    x = tf.stop_gradient(tf.convert_to_tensor(x))
    if not x.dtype.is_floating:
        raise ValueError(f"x must be a float tensor scaled to [0, 1], got dtype {x.dtype.name}")
    if x.shape.rank != 4:
        raise ValueError(f"x must be a batch of NHWC images (rank 4), got shape {x.shape}")
    labels = tf.reshape(tf.cast(labels, tf.int32), [-1])
    key = rng_key(seed)

    def attack(forward, x, labels, key):
        eps_t = tf.cast(eps, x.dtype)
        shape = tf.shape(x)
        batch, height, width, channels = shape[0], shape[1], shape[2], shape[3]
        lower = tf.maximum(x - eps_t, 0.0)
        upper = tf.minimum(x + eps_t, 1.0)

        correct = ~_predicts_wrong(tf.cast(forward(x), tf.float32), labels)  # not a query of the attack
        key, init_key = _split(key, 2)
        stripes = _random_signs(tf.stack([batch, 1, width, channels]), init_key, x.dtype)
        x_init = tf.clip_by_value(x + eps_t * stripes, lower, upper)
        x_best = tf.where(correct[:, None, None, None], x_init, x)
        logits = tf.cast(forward(x_best), tf.float32)
        margin = _margin(logits, labels)
        fooled = correct & _predicts_wrong(logits, labels)
        queries = tf.cast(correct, tf.int32)
        active = correct & ~fooled

        n_features = tf.cast(height * width * channels, tf.float64)
        max_side = tf.maximum(tf.minimum(height, width) - 1, 1)
        rows = tf.range(height)[None, :, None, None]
        cols = tf.range(width)[None, None, :, None]

        def candidate(x_best, mask, sign_key):
            signs = _random_signs(tf.stack([batch, 1, 1, channels]), sign_key, x.dtype)
            window = tf.clip_by_value(x + eps_t * signs, lower, upper)
            return tf.where(mask, window, x_best)

        def unchanged(x_new, x_best):
            return tf.reduce_all(tf.abs(x_new - x_best) < _UNCHANGED_TOL, axis=[1, 2, 3])

        def body(i, key, x_best, margin, fooled, queries, active):
            key, pos_key, sign_key, resample_key = _split(key, 4)
            p = tf.cast(square_p_schedule(i, n_queries, p_init), tf.float64)
            side = tf.cast(tf.round(tf.sqrt(p * n_features / tf.cast(channels, tf.float64))), tf.int32)
            side = tf.clip_by_value(side, 1, max_side)
            row_key, col_key = _split(pos_key, 2)
            top = tf.random.stateless_uniform([batch], row_key, 0, height - side + 1, dtype=tf.int32)
            left = tf.random.stateless_uniform([batch], col_key, 0, width - side + 1, dtype=tf.int32)
            top = top[:, None, None, None]
            left = left[:, None, None, None]
            mask = (rows >= top) & (rows < top + side) & (cols >= left) & (cols < left + side)  # [B, H, W, 1]

            x_new = candidate(x_best, mask, sign_key)

            def redraw_cond(j, resample_key, x_new):
                del resample_key
                return (j < _MAX_RESAMPLES) & tf.reduce_any(active & unchanged(x_new, x_best))

            def redraw(j, resample_key, x_new):
                resample_key, draw_key = _split(resample_key, 2)
                retry = (active & unchanged(x_new, x_best))[:, None, None, None]
                return j + 1, resample_key, tf.where(retry, candidate(x_best, mask, draw_key), x_new)

            _, _, x_new = tf.while_loop(redraw_cond, redraw, (tf.constant(0), resample_key, x_new))

            logits_new = tf.cast(forward(x_new), tf.float32)
            margin_new = _margin(logits_new, labels)
            improved = active & (margin_new < margin)
            x_best = tf.where(improved[:, None, None, None], x_new, x_best)
            margin = tf.where(improved, margin_new, margin)
            fooled |= improved & _predicts_wrong(logits_new, labels)
            queries += tf.cast(active, tf.int32)
            active &= ~fooled
            # Every per-example loop variable keeps its entry shape (the window mask's batch
            # dimension is dynamic, which would otherwise turn a static batch of 1 into None).
            per_example = [tf.ensure_shape(v, labels.shape) for v in (margin, fooled, queries, active)]
            return (i + 1, key, tf.ensure_shape(x_best, x.shape), *per_example)

        def cond(i, key, x_best, margin, fooled, queries, active):
            del key, x_best, margin, fooled, queries
            return (i < n_queries - 1) & tf.reduce_any(active)

        init = (tf.constant(0), key, x_best, margin, fooled, queries, active)
        _, _, x_best, _, _, queries, _ = tf.while_loop(cond, body, init, maximum_iterations=n_queries - 1)
        # Re-evaluate (not counted as a query) so `success` always agrees with the returned points.
        success = _predicts_wrong(tf.cast(forward(x_best), tf.float32), labels)
        return x_best, success, queries

    settings = None if tf.is_tensor(eps) else ("square_linf", float(eps), n_queries, float(p_init))
    x_adv, success, queries = run_compiled(attack, forward, settings, x, labels, key)
    x_adv = tf.stop_gradient(x_adv)
    return (x_adv, success, queries) if return_queries else (x_adv, success)

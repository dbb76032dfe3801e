"""FAB-T: the targeted L-inf Fast Adaptive Boundary attack (Croce & Hein, ICML 2020).

FAB is a minimum-norm attack. Starting from the clean point it repeatedly linearises the
decision boundary between the true class `y` and a target class `t`, projects onto that
hyperplane (intersected with the image box [0, 1]) both the current iterate and the original
point, and takes a step biased towards the original point. Every time an iterate is
misclassified it is recorded if it is the closest adversarial point so far, and the iterate is
pulled back towards the original point. The result is the smallest adversarial perturbation
found; an example counts as broken at radius `eps` only if that perturbation has L-inf norm
<= eps.

`fab_targeted` is the version AutoAttack "standard" runs (FAB-T): targets are the 2nd, 3rd, ...
most likely classes of the clean logits, each attacked for `steps` iterations on the examples
not yet broken.
"""

import numbers

import tensorflow as tf

from arat_tf.attacks.graph_mode import run_compiled
from arat_tf.attacks.random_keys import rng_key

_TINY = 1e-12


def _per_example_max_abs(t):
    """max |t| over all non-batch axes, shape [B]."""
    return tf.reduce_max(tf.abs(tf.reshape(t, [tf.shape(t)[0], -1])), axis=1)


def _per_example(values, like):
    """Reshapes per-example `values` [B] to [B, 1, ..., 1] so they broadcast against `like`."""
    return tf.reshape(values, tf.concat([tf.shape(values), tf.ones([tf.rank(like) - 1], tf.int32)], axis=0))


def _batch_where(mask, a, b):
    """`tf.where` with a per-example [B] mask broadcast over the other axes of `a`."""
    return tf.where(_per_example(mask, a), a, b)


def project_linf_hyperplane_box(point, w, b):
    """Minimal L-inf projection of `point` onto the hyperplane `{z : w.z + b = 0}` within the box [0, 1].

    Solves, independently for each example,

        min_z ||z - point||_inf   s.t.   w.z + b = 0,   0 <= z <= 1,

    the projection FAB needs for the L-inf threat model.

    Method (exact, sort based; O(d log d) per example). Let `v = -(w.point + b)` be the change of
    `w.z` that is needed and `s = sign(v)`. Coordinate i moves in direction `e_i = s * sign(w_i)`,
    and has room `u_i` in that direction before leaving the box (`1 - point_i` if `e_i > 0`,
    `point_i` if `e_i < 0`). Within an L-inf radius `r` the largest achievable change is

        M(r) = sum_i |w_i| min(r, u_i),

    a nondecreasing, piecewise-linear function of `r` with breakpoints at the sorted `u_i`. The
    optimal radius is the smallest `r` with `M(r) = |v|`: the rooms are sorted, `M` is evaluated
    at every breakpoint with cumulative sums, the segment where `M` crosses `|v|` is found, and
    `r` is solved for on that (linear) segment. The projection is then
    `z_i = point_i + e_i * min(r, u_i)` (every coordinate moves by `r` unless the box stops it;
    coordinates with `w_i = 0` do not move). This is the dual of the problem: `r` is the
    Lagrange multiplier-like threshold of the paper's projection, found by sorting rather than
    by bisection, so no tolerance or iteration count is involved.

    If the hyperplane does not meet the box (`M(max u) < |v|`), there is no feasible point; the
    result is then the box corner `z_i = point_i + e_i * u_i`, which gets as close to the
    hyperplane as the box allows (it minimises |w.z + b| over the box).

    Args:
      point: float tensor [B, ...], the points to project (inside [0, 1]).
      w: float tensor like `point`, the hyperplane normals.
      b: float tensor [B], the offsets.

    Returns:
      The projections `z`, same shape and dtype as `point`.

    Example:
      >>> project_linf_hyperplane_box(tf.constant([[0.5, 0.5]]), tf.constant([[1.0, 1.0]]), tf.constant([-1.5])).numpy()
      array([[0.75, 0.75]], dtype=float32)
    """
    point = tf.convert_to_tensor(point)
    dtype = point.dtype
    w = tf.cast(w, dtype)
    b = tf.cast(b, dtype)
    batch = tf.shape(point)[0]
    p = tf.reshape(point, [batch, -1])
    w = tf.reshape(w, [batch, -1])
    b = tf.reshape(b, [batch])

    v = -(tf.reduce_sum(w * p, axis=1) + b)  # the change of w.z needed
    direction = tf.sign(v)[:, None] * tf.sign(w)  # e_i in {-1, 0, 1}
    room = tf.where(direction > 0, 1.0 - p, p)
    room = tf.where(direction == 0, tf.zeros_like(room), tf.maximum(room, 0.0))
    weight = tf.abs(w) * tf.abs(direction)
    needed = tf.abs(v)

    order = tf.argsort(room, axis=1, stable=True)
    room_sorted = tf.gather(room, order, batch_dims=1)
    weight_sorted = tf.gather(weight, order, batch_dims=1)
    total_weight = tf.reduce_sum(weight, axis=1, keepdims=True)
    # At the k-th breakpoint r = room_sorted[k]: coordinates 0..k are saturated (contribute
    # weight * room), the rest contribute weight * r.
    saturated = tf.cumsum(weight_sorted * room_sorted, axis=1)
    weight_after = tf.maximum(total_weight - tf.cumsum(weight_sorted, axis=1), 0.0)
    reach = saturated + room_sorted * weight_after  # M at each breakpoint, nondecreasing

    # First breakpoint k with M >= needed; the radius lies in [room_sorted[k - 1], room_sorted[k]]
    # (room_sorted[-1] := 0), where M(r) = saturated[k - 1] + r * weight_after[k - 1].
    k = tf.reduce_sum(tf.cast(reach < needed[:, None], tf.int32), axis=1)
    dims = tf.shape(room_sorted)[1]
    feasible = k < dims
    prev = tf.maximum(k - 1, 0)
    has_prev = k > 0
    saturated_prev = tf.where(has_prev, tf.gather(saturated, prev, batch_dims=1), tf.zeros_like(needed))
    slope_prev = tf.where(has_prev, tf.gather(weight_after, prev, batch_dims=1), total_weight[:, 0])
    lower = tf.where(has_prev, tf.gather(room_sorted, prev, batch_dims=1), tf.zeros_like(needed))
    upper = tf.gather(room_sorted, tf.minimum(k, dims - 1), batch_dims=1)
    radius = (needed - saturated_prev) / tf.maximum(slope_prev, tf.cast(_TINY, dtype))
    radius = tf.clip_by_value(radius, lower, tf.maximum(lower, upper))
    radius = tf.where(feasible, radius, tf.reduce_max(room, axis=1))  # infeasible: the box corner

    z = p + direction * tf.minimum(radius[:, None], room)
    return tf.reshape(z, tf.shape(point))


def _check_int(name, value, minimum):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _check_real(name, value, low, high, low_open=False):
    if tf.is_tensor(value):
        return
    ok = not isinstance(value, bool) and isinstance(value, numbers.Real)
    ok = ok and (value > low if low_open else value >= low) and value <= high
    if not ok:
        raise ValueError(f"{name} must be a real number in {'(' if low_open else '['}{low}, {high}], got {value!r}")


def _fab_single_run(forward, x0, labels, targets, x_start, *, num_classes, steps, alpha_max, eta, beta):
    """One FAB run towards `targets` from `x_start`: returns (best adversarial point, its L-inf norm).

    Examples for which no adversarial point was found get `x0` and norm +inf.
    """
    n = tf.shape(x0)[0]
    toward_target = tf.one_hot(targets, num_classes) - tf.one_hot(labels, num_classes)
    x0_flat = tf.reshape(x0, [n, -1])
    alpha_max = tf.cast(alpha_max, x0.dtype)
    eta = tf.cast(eta, x0.dtype)
    beta = tf.cast(beta, x0.dtype)

    def body(i, x_k, best, best_norm):
        with tf.GradientTape(watch_accessed_variables=False) as tape:
            tape.watch(x_k)
            # f_t - f_y at the current point; the hyperplane is where its linearisation is 0.
            diff = tf.reduce_sum(tf.cast(forward(x_k), tf.float32) * toward_target, axis=-1)
        grad = tape.gradient(diff, x_k, unconnected_gradients=tf.UnconnectedGradients.ZERO)
        w = tf.reshape(tf.cast(grad, x0.dtype), [n, -1])
        x_k_flat = tf.reshape(x_k, [n, -1])
        b = tf.cast(diff, x0.dtype) - tf.reduce_sum(w * x_k_flat, axis=1)
        # Project the current and the original point onto the same linearised boundary.
        z = project_linf_hyperplane_box(
            tf.concat([x_k_flat, x0_flat], 0), tf.concat([w, w], 0), tf.concat([b, b], 0))
        d_cur = z[:n] - x_k_flat
        d_orig = z[n:] - x0_flat
        norm_cur = tf.reduce_max(tf.abs(d_cur), axis=1, keepdims=True)
        norm_orig = tf.reduce_max(tf.abs(d_orig), axis=1, keepdims=True)
        # The paper's biased step: alpha = min(||d_cur|| / (||d_cur|| + ||d_orig||), alpha_max).
        alpha = tf.minimum(norm_cur / tf.maximum(norm_cur + norm_orig, tf.cast(_TINY, x0.dtype)), alpha_max)
        x_next = (1.0 - alpha) * (x_k_flat + eta * d_cur) + alpha * (x0_flat + eta * d_orig)
        x_next = tf.reshape(tf.clip_by_value(x_next, 0.0, 1.0), tf.shape(x0))

        is_adv = tf.argmax(forward(x_next), axis=-1, output_type=tf.int32) != labels
        dist = _per_example_max_abs(x_next - x0)
        closer = is_adv & (dist < best_norm)
        best = _batch_where(closer, x_next, best)
        best_norm = tf.where(closer, dist, best_norm)
        # Backward step from adversarial iterates: x <- (1 - beta) x_orig + beta x.
        x_next = _batch_where(is_adv, (1.0 - beta) * x0 + beta * x_next, x_next)
        return i + 1, tf.ensure_shape(x_next, x0.shape), best, best_norm

    init = (tf.constant(0), x_start, x0, tf.fill([n], tf.constant(float("inf"), x0.dtype)))
    _, _, best, best_norm = tf.while_loop(lambda i, *_: i < steps, body, init, maximum_iterations=steps)
    return best, best_norm


def fab_targeted(forward, x, labels, *, eps, steps=100, num_target_classes=9, alpha_max=0.1, eta=1.05, beta=0.9,
                 restarts=1, seed=None):
    """FAB-T, the targeted L-inf FAB attack of AutoAttack "standard" (Croce & Hein, 2020).

    For k = 2 .. num_target_classes + 1 (capped at the number of classes), the target of each
    example is its k-th most likely class under the clean logits, and FAB runs for `steps`
    iterations (per restart) on the examples that are correctly classified and not yet broken.
    Each iteration, with `x_k` the iterate and `x_orig` the clean input:

    1. linearise `f_t - f_y` at `x_k` (value and input gradient, one forward + backward pass);
    2. `d_cur`, `d_orig`: minimal L-inf steps from `x_k` and from `x_orig` onto that hyperplane
       within [0, 1] (`project_linf_hyperplane_box`, an exact sort-based solve);
    3. `alpha = min(||d_cur|| / (||d_cur|| + ||d_orig||), alpha_max)` (the paper's Eq.; the
       step leans towards `x_orig` when the iterate is far from the boundary);
    4. `x_{k+1} = clip_[0,1]((1 - alpha)(x_k + eta d_cur) + alpha (x_orig + eta d_orig))`;
    5. if `x_{k+1}` is misclassified (predicted class != y, the criterion that matters for
       robust accuracy): keep it if it is the closest adversarial point so far, then step back
       `x_{k+1} = (1 - beta) x_orig + beta x_{k+1}`.

    The iterations are one `tf.while_loop`. The first restart starts at `x_orig` (as AutoAttack
    does with one restart); restart r >= 1 starts at
    `clip_[0,1](x_orig + min(eps, best norm so far) / 2 * u / ||u||_inf)`, u ~ U[-1, 1]^d.

    FAB minimises the perturbation, so an example is broken only if the closest adversarial
    point found has `||x_adv - x||_inf <= eps`. Called eagerly, the attack runs as a
    `tf.function` compiled once per `forward` and settings (see `graph_mode.run_compiled`);
    inside a `tf.function` it is built inline.

    Args:
      forward: callable `x -> logits` (model in inference mode; see `make_forward`). Must be
        differentiable and accept any batch size.
      x: clean float inputs in [0, 1], batch first (e.g. NHWC).
      labels: integer labels [B].
      eps: L-inf radius deciding which examples count as broken, >= 0.
      steps: iterations per target and restart (100 in AutoAttack).
      num_target_classes: number of target classes (9 in AutoAttack), capped at classes - 1.
      alpha_max: largest bias towards the original point (0.1).
      eta: overshoot factor of the projection steps (1.05).
      beta: backward-step factor applied to adversarial iterates (0.9).
      restarts: runs per target; restarts after the first use a random start.
      seed: int, `tf.random.Generator` or None; only used by random starts (restarts > 1).

    Returns:
      `(x_adv, success)`: `x_adv` is the closest adversarial point found for broken examples
      and the clean `x` for all others (never a point outside the eps ball), same shape and
      dtype as `x`, gradients stopped; `success` is a bool [B], True where
      `argmax forward(x_adv) != labels` (so clean-misclassified examples count as successes,
      and `1 - mean(success)` is the robust accuracy).

    Raises:
      ValueError: on invalid arguments.

    Example:
      >>> x_adv, success = fab_targeted(make_forward(model), x, y, eps=8 / 255)
      >>> robust_accuracy = 1.0 - tf.reduce_mean(tf.cast(success, tf.float32))
    """
    _check_real("eps", eps, 0.0, float("inf"))
    _check_int("steps", steps, 0)
    _check_int("num_target_classes", num_target_classes, 1)
    _check_int("restarts", restarts, 1)
    _check_real("alpha_max", alpha_max, 0.0, 1.0)
    _check_real("eta", eta, 0.0, float("inf"), low_open=True)
    _check_real("beta", beta, 0.0, 1.0)
    x = tf.stop_gradient(tf.convert_to_tensor(x))
    if not x.dtype.is_floating:
        raise ValueError(f"x must be a float tensor scaled to [0, 1], got dtype {x.dtype.name}")
    labels = tf.reshape(tf.cast(labels, tf.int32), [-1])
    key = rng_key(seed) if restarts > 1 else tf.zeros([2], tf.int64)

    def attack(forward, x, labels, key):
        eps_t = tf.cast(eps, x.dtype)
        logits = tf.cast(forward(x), tf.float32)
        num_classes = logits.shape[-1]
        if num_classes is None or num_classes < 2:
            raise ValueError(f"forward must return logits with a static class axis >= 2, got shape {logits.shape}")
        correct = tf.argmax(logits, axis=-1, output_type=tf.int32) == labels
        ranked = tf.argsort(logits, axis=-1, direction="DESCENDING", stable=True)

        # One graph loop over (target, restart) runs, so the FAB loop is traced once.
        runs = min(num_target_classes, num_classes - 1) * restarts

        def run_body(j, key, best, best_norm):
            rank = 1 + j // restarts  # 0-based position in the ranking: the 2nd class is 1
            restart = j % restarts
            key, start_key = tf.unstack(tf.random.experimental.stateless_split(key, 2))
            pending = tf.cast(tf.where(correct & (best_norm > eps_t))[:, 0], tf.int32)

            def run():
                x0 = tf.gather(x, pending)
                norm0 = tf.gather(best_norm, pending)
                # Restart 0 starts at x; later restarts at a random point of radius min(eps, best) / 2.
                u = tf.random.stateless_uniform(tf.shape(x0), start_key, -1.0, 1.0, dtype=x.dtype)
                scale = 0.5 * tf.minimum(norm0, eps_t) / tf.maximum(_per_example_max_abs(u), _TINY)
                x_random = tf.clip_by_value(x0 + _per_example(scale, u) * u, 0.0, 1.0)
                x_start = tf.cond(restart == 0, lambda: x0, lambda: x_random)
                found, found_norm = _fab_single_run(
                    forward, x0, tf.gather(labels, pending), tf.gather(ranked[:, rank], pending), x_start,
                    num_classes=num_classes, steps=steps, alpha_max=alpha_max, eta=eta, beta=beta)
                closer = found_norm < norm0
                new_points = _batch_where(closer, found, tf.gather(best, pending))
                new_norms = tf.where(closer, found_norm, norm0)
                indices = pending[:, None]
                return (tf.tensor_scatter_nd_update(best, indices, new_points),
                        tf.tensor_scatter_nd_update(best_norm, indices, new_norms))

            best, best_norm = tf.cond(tf.size(pending) > 0, run, lambda: (best, best_norm))
            return j + 1, key, tf.ensure_shape(best, x.shape), best_norm

        init = (tf.constant(0), key, x, tf.fill(tf.shape(labels), tf.constant(float("inf"), x.dtype)))
        _, _, best, best_norm = tf.while_loop(lambda j, *_: j < runs, run_body, init, maximum_iterations=runs)

        broken = correct & (best_norm <= eps_t)
        x_adv = _batch_where(broken, best, x)
        # A no-op up to rounding: broken points are within eps, the rest are x.
        x_adv = tf.clip_by_value(tf.clip_by_value(x_adv, x - eps_t, x + eps_t), 0.0, 1.0)
        success = tf.argmax(forward(x_adv), axis=-1, output_type=tf.int32) != labels
        return x_adv, success

    settings = None if tf.is_tensor(eps) else (
        "fab_targeted", float(eps), steps, num_target_classes, float(alpha_max), float(eta),
        float(beta), restarts)
    x_adv, success = run_compiled(attack, forward, settings, x, labels, key)
    return tf.stop_gradient(x_adv), success

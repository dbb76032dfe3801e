"""Auto-PGD (APGD) and its targeted variant APGD-T (Croce & Hein, ICML 2020).

Croce & Hein, "Reliable evaluation of adversarial robustness with an ensemble of diverse
parameter-free attacks", ICML 2020. APGD is PGD with momentum whose step size is not a tuning
parameter: it starts at `2 * eps` and is halved, per example, at a fixed schedule of checkpoints
whenever the attack stops making progress, restarting the example from the best point found so far.

* `apgd`: untargeted APGD with the cross-entropy ("ce"), DLR ("dlr") or targeted DLR
  ("dlr_targeted") loss, linf or l2, with random restarts.
* `apgd_targeted`: APGD-T as run by AutoAttack "standard": one targeted-DLR run for each of the
  top `num_target_classes` wrong classes of the clean prediction.
* `apgd_checkpoints`: the checkpoint schedule `w_j` for a number of iterations.

An attack takes `forward(x) -> logits` (see `make_forward`) and float inputs in [0, 1].
"""

import numbers

import tensorflow as tf

from arat_tf.attacks import dlr, losses, parts
from arat_tf.attacks.graph_mode import batch_relaxed_shapes, compiled_for

APGD_LOSSES = ("ce", "dlr", "dlr_targeted")

_NORM_FLOOR = 1e-12


# The checkpoint schedule.


def apgd_checkpoints(steps):
    """The checkpoints `w_j = ceil(p_j * steps)` at which APGD may halve its step size.

    `p_0 = 0`, `p_1 = 0.22` and `p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06)`, as long as
    `p_j <= 1`: the intervals shrink by 3% of the budget from 22% down to a minimum of 6%, giving
    p = 0, 0.22, 0.41, 0.57, 0.70, 0.80, 0.87, 0.93, 0.99.

    All p_j are whole multiples of 0.01, so they are kept as integer percentages and the ceiling is
    taken in integer arithmetic: with floats, `0.57 * 100` might land just above 57 and round up to
    58. Positions that coincide for very small `steps` are listed once.

    Args:
      steps: the number of APGD iterations, an int >= 1.

    Returns:
      A strictly increasing list of ints starting with 0, all <= steps.

    Example:
      >>> apgd_checkpoints(100)
      [0, 22, 41, 57, 70, 80, 87, 93, 99]
    """
    _check_positive_int("steps", steps)
    percents = [0, 22]
    while True:
        step = max(percents[-1] - percents[-2] - 3, 6)
        if percents[-1] + step > 100:
            break
        percents.append(percents[-1] + step)
    checkpoints = []
    for p in percents:
        w = -(-p * steps // 100)  # ceil(p * steps / 100), exactly
        if not checkpoints or w > checkpoints[-1]:
            checkpoints.append(w)
    return checkpoints


# Validation.


def _check_positive_int(name, value):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


def _check_fraction(name, value):
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a real number in [0, 1], got {value!r}")


def _check_eps(eps):
    if tf.is_tensor(eps):
        return
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not eps >= 0:
        raise ValueError(f"eps must be a real number >= 0, got {eps!r}")


def _check_norm(norm):
    if norm not in parts.NORMS:
        raise ValueError(f"norm must be one of {parts.NORMS}, got {norm!r}")


def _prepare_inputs(x, labels):
    x = tf.stop_gradient(tf.convert_to_tensor(x))
    if not x.dtype.is_floating:
        raise ValueError(f"x must be a float tensor scaled to [0, 1], got dtype {x.dtype.name}")
    labels = tf.reshape(tf.cast(labels, tf.int32), [-1])
    return x, labels


# The compiled pieces, cached per forward.


def _per_example(v, x):
    """Reshapes a [B] vector to [B, 1, ..., 1] so it broadcasts against `x`."""
    return tf.reshape(v, tf.concat([tf.shape(v), tf.ones([tf.rank(x) - 1], tf.int32)], axis=0))


def _halve_step(increases, window, rho, loss_best, loss_best_at_check, reduced_at_check):
    """The checkpoint rule: True where the step size is halved and the example restarts from x_max.

    Condition 1: the loss increased in fewer than `rho * window` of the `window` iterations since
    the previous checkpoint. Condition 2: the step size was not halved at the previous checkpoint
    and the best loss has not improved since then.

    Args:
      increases: int [B], #{i in [w_{j-1}, w_j): f(x^(i+1)) > f(x^(i))}.
      window: int scalar, w_j - w_{j-1}.
      rho: float scalar.
      loss_best: float [B], f_max now.
      loss_best_at_check: float [B], f_max at the previous checkpoint.
      reduced_at_check: bool [B], whether the step size was halved at the previous checkpoint.

    Returns:
      bool [B].
    """
    condition_1 = tf.cast(increases, tf.float32) < tf.cast(rho, tf.float32) * tf.cast(window, tf.float32)
    condition_2 = tf.logical_and(tf.logical_not(reduced_at_check), loss_best <= loss_best_at_check)
    return tf.logical_or(condition_1, condition_2)


def _loss_fn(loss):
    if loss == "ce":
        return lambda logits, labels, targets: losses.cross_entropy(logits, labels)
    if loss == "dlr":
        return lambda logits, labels, targets: dlr.dlr_loss(logits, labels)
    return dlr.targeted_dlr_loss


def _build_run(forward_ref, norm, loss):
    """The APGD iteration for one (forward, norm, loss) as a `tf.function` around a `tf.while_loop`."""
    loss_fn = _loss_fn(loss)
    step_fn = parts.sign_step if norm == "linf" else parts.l2_normalized_step
    project_fn = parts.project_linf if norm == "linf" else parts.project_l2

    def evaluate(forward, x_k, labels, targets):
        with tf.GradientTape(watch_accessed_variables=False) as tape:
            tape.watch(x_k)
            logits = tf.cast(forward(x_k), tf.float32)
            loss_k = loss_fn(logits, labels, targets)
            total = tf.reduce_sum(loss_k)
        grad = tape.gradient(total, x_k, unconnected_gradients=tf.UnconnectedGradients.ZERO)
        wrong = tf.argmax(logits, axis=-1, output_type=tf.int32) != labels
        return loss_k, tf.stop_gradient(grad), wrong

    @tf.function(reduce_retracing=True)
    def run(x, labels, targets, x_start, eps, steps, checkpoints, rho, momentum):
        forward = forward_ref()
        if forward is None:
            raise RuntimeError("the forward function of this compiled APGD run was garbage-collected")
        dtype = x.dtype
        eps = tf.cast(eps, dtype)
        momentum = tf.cast(momentum, dtype)
        batch = tf.shape(x)[0]

        loss_0, grad_0, wrong_0 = evaluate(forward, x_start, labels, targets)
        state = dict(
            k=tf.constant(0),
            j=tf.constant(1),  # index of the next checkpoint in `checkpoints`
            x_cur=x_start,  # x^(k)
            x_prev=x_start,  # x^(k-1); unused in the first step (no momentum)
            loss_cur=loss_0,  # f(x^(k))
            grad_cur=grad_0,  # grad f(x^(k))
            eta=tf.fill([batch], 2.0 * eps),  # eta^(0) = 2 eps, per example
            x_best=x_start,  # x_max
            loss_best=loss_0,  # f_max
            grad_best=grad_0,  # grad f(x_max), so a restart does not need another backward pass
            found=wrong_0,  # a misclassified point has been seen
            x_found=x_start,  # the first misclassified point seen
            increases=tf.zeros([batch], tf.int32),  # #{i since last checkpoint: f(x^(i+1)) > f(x^(i))}
            loss_best_at_check=loss_0,  # f_max at the previous checkpoint (w_0 = 0: f(x^(0)))
            reduced_at_check=tf.zeros([batch], tf.bool),  # eta was halved at the previous checkpoint
        )

        def cond(s):
            # Once every example is misclassified the result can no longer change.
            return tf.logical_and(s["k"] < steps, tf.logical_not(tf.reduce_all(s["found"])))

        def body(s):
            k, x_cur = s["k"], s["x_cur"]
            # z^(k+1) = P(x^(k) + eta^(k) s(grad f(x^(k))))
            z = project_fn(x_cur + _per_example(s["eta"], x) * tf.cast(step_fn(s["grad_cur"]), dtype), x, eps)
            # x^(k+1) = P(x^(k) + a (z^(k+1) - x^(k)) + (1 - a) (x^(k) - x^(k-1))), a = 1 for x^(1).
            a = tf.where(k == 0, tf.ones([], dtype), momentum)
            x_next = project_fn(x_cur + a * (z - x_cur) + (1.0 - a) * (x_cur - s["x_prev"]), x, eps)
            loss_next, grad_next, wrong = evaluate(forward, x_next, labels, targets)

            first_wrong = _per_example(tf.logical_and(wrong, tf.logical_not(s["found"])), x)
            x_found = tf.where(first_wrong, x_next, s["x_found"])
            found = tf.logical_or(s["found"], wrong)

            increases = s["increases"] + tf.cast(loss_next > s["loss_cur"], tf.int32)
            improved = loss_next > s["loss_best"]
            improved_b = _per_example(improved, x)
            x_best = tf.where(improved_b, x_next, s["x_best"])
            grad_best = tf.where(improved_b, grad_next, s["grad_best"])
            loss_best = tf.where(improved, loss_next, s["loss_best"])

            # Checkpoint w_j reached once x^(w_j) has been computed and evaluated.
            at_check = k + 1 == checkpoints[s["j"]]
            window = checkpoints[s["j"]] - checkpoints[s["j"] - 1]
            reduce = tf.logical_and(at_check, _halve_step(
                increases, window, rho, loss_best, s["loss_best_at_check"], s["reduced_at_check"]))
            reduce_b = _per_example(reduce, x)

            return (dict(
                k=k + 1,
                j=tf.where(at_check, s["j"] + 1, s["j"]),
                # On a reduction the example restarts from x_max; x^(k) stays the previous iterate,
                # so the next momentum term is x_max - x^(k), as in the paper's Algorithm 1.
                x_cur=tf.where(reduce_b, x_best, x_next),
                x_prev=x_cur,
                loss_cur=tf.where(reduce, loss_best, loss_next),
                grad_cur=tf.where(reduce_b, grad_best, grad_next),
                eta=tf.where(reduce, 0.5 * s["eta"], s["eta"]),
                x_best=x_best,
                loss_best=loss_best,
                grad_best=grad_best,
                found=found,
                x_found=x_found,
                increases=tf.where(at_check, tf.zeros_like(increases), increases),
                loss_best_at_check=tf.where(at_check, loss_best, s["loss_best_at_check"]),
                reduced_at_check=tf.where(at_check, reduce, s["reduced_at_check"]),
            ),)

        (final,) = tf.while_loop(cond, body, (state,), maximum_iterations=steps,
                                 shape_invariants=batch_relaxed_shapes((state,)))
        return final["x_best"], final["loss_best"], final["found"], final["x_found"]

    return run


def _build_logits(forward_ref):
    @tf.function(reduce_retracing=True)
    def logits(x):
        return tf.cast(forward_ref()(x), tf.float32)

    return logits


def _compiled(forward, key):
    """The `tf.function` for `key` ("logits" or ("run", norm, loss)) bound to `forward`, cached."""
    return compiled_for(
        forward, ("apgd", key),
        lambda forward_ref: _build_logits(forward_ref) if key == "logits" else _build_run(forward_ref, *key[1:]),
    )


# Shared driver.


def _random_start(x, eps, norm, seed, index):
    """`x^(0) = P(x + eps * t / ||t||)`, t uniform in [-1, 1]^d, ||.|| the attack's norm."""
    shape = tf.shape(x)
    if seed is None:
        t = tf.random.uniform(shape, -1.0, 1.0, dtype=x.dtype)
    else:
        t = tf.random.stateless_uniform(shape, seed=[seed, index], minval=-1.0, maxval=1.0, dtype=x.dtype)
    axes = tf.range(1, tf.rank(x))
    if norm == "linf":
        size = tf.reduce_max(tf.abs(t), axis=axes, keepdims=True)
    else:
        size = tf.sqrt(tf.reduce_sum(tf.square(t), axis=axes, keepdims=True))
    eps = tf.cast(eps, x.dtype)
    start = x + eps * t / tf.maximum(size, tf.cast(_NORM_FLOOR, x.dtype))
    project_fn = parts.project_linf if norm == "linf" else parts.project_l2
    return project_fn(start, x, eps)


# The schedule has at most 9 positions (p = 0 ... 0.99). Padding it with a position past the last
# iteration to a fixed length keeps its shape, and so the trace, the same for every `steps`.
_CHECKPOINT_SLOTS = 10


def _padded_checkpoints(checkpoints, steps):
    return tf.constant(checkpoints + [steps + 1] * (_CHECKPOINT_SLOTS - len(checkpoints)), tf.int32)


def _predicted_wrong(forward, x, labels):
    logits = _compiled(forward, "logits")(x)
    return tf.argmax(logits, axis=-1, output_type=tf.int32) != labels, logits


def _attack_unbroken(forward, x, labels, targets, x_adv, best_loss, success, *, norm, loss, eps, steps,
                     checkpoints, rho, momentum, seed, seed_index):
    """One APGD run on the examples not yet broken; merges its result into (x_adv, best_loss, success)."""
    todo = tf.where(tf.logical_not(success))[:, 0]
    if tf.executing_eagerly() and int(tf.size(todo)) == 0:
        return x_adv, best_loss, success
    x_sub = tf.gather(x, todo)
    x_start = _random_start(x_sub, eps, norm, seed, seed_index)
    run = _compiled(forward, ("run", norm, loss))
    x_best, loss_best, found, x_found = run(
        x_sub, tf.gather(labels, todo), tf.gather(targets, todo), x_start, tf.cast(eps, tf.float32),
        tf.constant(steps, tf.int32), _padded_checkpoints(checkpoints, steps),
        tf.constant(rho, tf.float32), tf.constant(momentum, tf.float32))
    # An adversarial point wins; otherwise keep the highest-loss x_max over the runs so far.
    take = tf.logical_or(found, loss_best > tf.gather(best_loss, todo))
    candidate = tf.where(_per_example(found, x_sub), x_found, x_best)
    merged = tf.where(_per_example(take, x_sub), candidate, tf.gather(x_adv, todo))
    index = todo[:, None]
    x_adv = tf.tensor_scatter_nd_update(x_adv, index, merged)
    best_loss = tf.tensor_scatter_nd_update(best_loss, index, tf.where(take, loss_best, tf.gather(best_loss, todo)))
    success = tf.tensor_scatter_nd_update(success, index, found)
    return x_adv, best_loss, success


def apgd(forward, x, labels, *, eps, norm="linf", loss="ce", steps=100, restarts=1, target_labels=None,
         rho=0.75, momentum=0.75, seed=None):
    """Auto-PGD (Croce & Hein, ICML 2020, Algorithm 1), untargeted success criterion.

    Follows the paper:

    * Step size `eta^(0) = 2 * eps` (in the attack's norm), kept per example.
    * Random start `x^(0) = P(x + eps * t / ||t||)`, t uniform in [-1, 1]^d and `||t||` its linf
      norm (`max |t|`) or l2 norm per example, so the start lies on the sphere of radius eps
      before the projection P onto the eps ball and [0, 1].
    * `x^(1) = P(x^(0) + eta s(grad f(x^(0))))`, then `z^(k+1) = P(x^(k) + eta^(k) s(grad f(x^(k))))`
      and `x^(k+1) = P(x^(k) + momentum (z^(k+1) - x^(k)) + (1 - momentum) (x^(k) - x^(k-1)))`,
      `s = sign` for linf and `grad / ||grad||_2` for l2. `steps` such updates, `steps` + 1
      forward/backward passes (one for x^(0)).
    * Checkpoints `w_j = ceil(p_j * steps)` with `p_0 = 0, p_1 = 0.22,
      p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06)` (see `apgd_checkpoints`). At a checkpoint an
      example's step size is halved and the example restarts from its best point x_max if
      (1) `#{i in [w_{j-1}, w_j): f(x^(i+1)) > f(x^(i))} < rho * (w_j - w_{j-1})`, or
      (2) its step size was not halved at the previous checkpoint and its best loss f_max did not
      improve since then (at w_0 = 0 the reference is f(x^(0))).
    * f_max / x_max are updated on a strict increase, so ties keep the earlier point.

    Implementation choices the paper leaves open:

    * Checkpoint w_j is taken right after x^(w_j) has been computed and evaluated, so condition (1)
      counts exactly the `w_j - w_{j-1}` comparisons of its formula. After a restart from x_max
      the previous iterate is left as it was, so the next momentum term is `x_max - x^(k)` (the
      paper's algorithm replaces only x^(k+1)). Checkpoints that coincide for tiny `steps` count once.
    * The l2 projection rescales to the ball and then clips to [0, 1] (`parts.project_l2`).
    * Besides x_max, the FIRST misclassified iterate of each example is recorded; it is returned
      when one exists, else x_max. An example's run stops early once it (and every other example
      in the batch) has been misclassified, which cannot change the result.
    * Examples the model already misclassifies on clean `x` are returned unchanged with
      success=True and not attacked (as AutoAttack does).
    * Restarts attack only the examples not yet broken; for examples never broken the x_max with
      the highest loss over the restarts is returned.
    * `success` is recomputed from `forward(x_adv)` on the whole batch at the end, so it always
      agrees with the model's prediction on the returned points.

    The iteration is one `tf.while_loop` inside a `tf.function` with all per-example state (step
    size, best point and loss, increase counter, checkpoint flags) as loop variables; nothing is
    unrolled. The compiled function is cached per `forward` object (held weakly), so reuse one
    `forward` across batches: calls with the same input shape do not retrace, and batches of other
    sizes share one relaxed trace. The model behind `forward` must already be built.

    Args:
      forward: callable `x -> logits` (e.g. `make_forward(model)`).
      x: clean float inputs in [0, 1], batch first.
      labels: integer labels [B].
      eps: radius of the threat model's ball, >= 0.
      norm: "linf" or "l2".
      loss: "ce" (cross-entropy), "dlr" (`dlr_loss`) or "dlr_targeted" (`targeted_dlr_loss`,
        needs `target_labels`). Per-example losses are summed for the gradient.
      steps: iterations per run, an int >= 1.
      restarts: number of runs, each from a fresh random start, an int >= 1.
      target_labels: integer target classes [B] for "dlr_targeted".
      rho: fraction of the checkpoint interval in which the loss must have increased (0.75).
      momentum: the momentum alpha (0.75).
      seed: int for reproducible random starts (stateless RNG), or None for the global RNG.

    Returns:
      `(x_adv, success)`: adversarial inputs like `x` (gradients stopped) within the eps ball and
      [0, 1], and a bool [B] tensor, True where `argmax(forward(x_adv)) != labels`.

    Raises:
      ValueError: on invalid arguments.

    Example:
      >>> forward = make_forward(model)
      >>> x_adv, success = apgd(forward, x, y, eps=8 / 255, loss="dlr", steps=100)
      >>> robust_accuracy = 1 - tf.reduce_mean(tf.cast(success, tf.float32))
    """
    _check_eps(eps)
    _check_norm(norm)
    if loss not in APGD_LOSSES:
        raise ValueError(f"loss must be one of {APGD_LOSSES}, got {loss!r}")
    _check_positive_int("steps", steps)
    _check_positive_int("restarts", restarts)
    _check_fraction("rho", rho)
    _check_fraction("momentum", momentum)
    if loss == "dlr_targeted" and target_labels is None:
        raise ValueError('loss="dlr_targeted" needs target_labels')
    x, labels = _prepare_inputs(x, labels)
    targets = labels if target_labels is None else tf.reshape(tf.cast(target_labels, tf.int32), [-1])
    if tf.is_tensor(eps):
        eps = tf.cast(eps, tf.float32)

    success, _ = _predicted_wrong(forward, x, labels)
    x_adv = x
    best_loss = tf.fill(tf.shape(labels), tf.float32.min)
    checkpoints = apgd_checkpoints(steps)
    for restart in range(restarts):
        x_adv, best_loss, success = _attack_unbroken(
            forward, x, labels, targets, x_adv, best_loss, success, norm=norm, loss=loss, eps=eps, steps=steps,
            checkpoints=checkpoints, rho=rho, momentum=momentum, seed=seed, seed_index=restart)
    x_adv = tf.stop_gradient(x_adv)
    success, _ = _predicted_wrong(forward, x_adv, labels)
    return x_adv, success


def apgd_targeted(forward, x, labels, *, eps, norm="linf", steps=100, num_target_classes=9, seed=None):
    """APGD-T as in AutoAttack "standard": targeted-DLR APGD against the top wrong classes.

    For k = 2, ..., num_target_classes + 1 the target of an example is the k-th largest logit
    of the model on the CLEAN input; one APGD run (one restart, `steps` iterations, the targeted
    DLR loss) is made per target, only on the examples not broken yet, and the first success of
    each example is kept. `num_target_classes` is capped at `num_classes - 1`. Success is counted
    in the untargeted sense, `argmax(forward(x_adv)) != labels`, as AutoAttack does: a run against
    one target may well end in a third class. Examples already misclassified on clean `x` are
    returned unchanged with success=True; for examples never broken the x_max with the highest
    targeted-DLR loss over the targets is returned. See `apgd` for the details of each run.

    Args:
      forward: callable `x -> logits`.
      x: clean float inputs in [0, 1], batch first.
      labels: integer labels [B].
      eps: radius of the threat model's ball, >= 0.
      norm: "linf" or "l2".
      steps: iterations per target, an int >= 1.
      num_target_classes: number of target classes, an int >= 1 (AutoAttack standard: 9).
      seed: int for reproducible random starts, or None for the global RNG.

    Returns:
      `(x_adv, success)` as in `apgd`.

    Raises:
      ValueError: on invalid arguments or if the model has fewer than 4 classes (targeted DLR).

    Example:
      >>> x_adv, success = apgd_targeted(make_forward(model), x, y, eps=8 / 255)
    """
    _check_eps(eps)
    _check_norm(norm)
    _check_positive_int("steps", steps)
    _check_positive_int("num_target_classes", num_target_classes)
    x, labels = _prepare_inputs(x, labels)
    if tf.is_tensor(eps):
        eps = tf.cast(eps, tf.float32)

    success, logits = _predicted_wrong(forward, x, labels)
    num_classes = logits.shape[-1]
    if num_classes is None:
        raise ValueError("apgd_targeted needs logits with a static number of classes")
    if num_classes < 4:
        raise ValueError(f"apgd_targeted (targeted DLR loss) needs at least 4 classes, got {num_classes}")
    num_targets = min(num_target_classes, num_classes - 1)
    ranked = tf.argsort(logits, axis=-1, direction="DESCENDING", stable=True)
    x_adv = x
    best_loss = tf.fill(tf.shape(labels), tf.float32.min)
    checkpoints = apgd_checkpoints(steps)
    for k in range(2, num_targets + 2):
        x_adv, best_loss, success = _attack_unbroken(
            forward, x, labels, tf.cast(ranked[:, k - 1], tf.int32), x_adv, best_loss, success, norm=norm,
            loss="dlr_targeted", eps=eps, steps=steps, checkpoints=checkpoints, rho=0.75, momentum=0.75,
            seed=seed, seed_index=k)
    x_adv = tf.stop_gradient(x_adv)
    success, _ = _predicted_wrong(forward, x_adv, labels)
    return x_adv, success


__all__ = ["APGD_LOSSES", "apgd", "apgd_checkpoints", "apgd_targeted"]

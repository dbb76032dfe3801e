"""Attacks called eagerly run as compiled graphs, cached per `forward`.

Two reasons not to run an attack loop eagerly: speed (a graph loop is one call per attack instead of
one Python round trip per step), and a oneDNN defect of TensorFlow 2.20's CPU build that corrupts
memory ("double free or corruption") when eager gradient loops see varying batch sizes. Graphs are
unaffected, so every attack that is called outside a `tf.function` compiles itself here.
"""

import weakref

import tensorflow as tf

# forward -> {key: tf.function}. Weak keys, and the functions hold the forward only weakly, so a
# forward (and the model it closes over) is freed together with its compiled functions.
_CACHE = weakref.WeakKeyDictionary()


def compiled_for(forward, key, build):
    """The compiled function `build(forward_ref)` for (`forward`, `key`), built once and cached.

    Args:
        forward: the attack's `x -> logits` callable (the cache key, held weakly).
        key: hashable description of everything else the compiled function depends on.
        build: `forward_ref -> tf.function`; it must call `forward_ref()` to reach the forward,
            never close over `forward` itself (that would keep it alive forever).

    Returns:
        The cached `tf.function`.
    """
    try:
        per_forward = _CACHE.setdefault(forward, {})
    except TypeError:  # not weak-referenceable or not hashable: compile for this call only
        per_forward = {}
        holder = forward
        forward_ref = lambda: holder  # noqa: E731
    else:
        forward_ref = weakref.ref(forward)
    if key not in per_forward:
        per_forward[key] = build(forward_ref)
    return per_forward[key]


def run_compiled(attack, forward, settings, *args):
    """Calls `attack(forward, *args)` as one graph.

    Inside a `tf.function` it is built inline. Eagerly, it runs as a `tf.function` cached per
    (`forward`, `settings`), so an evaluation traces it once, not once per batch. `settings` must
    hold every Python value `attack` depends on besides its arguments; None (e.g. a tensor
    setting, which cannot be a cache key) compiles for this call only.
    """
    if not tf.executing_eagerly():
        return attack(forward, *args)
    if settings is None:
        return tf.function(attack)(forward, *args)
    compiled = compiled_for(forward, settings, lambda forward_ref: tf.function(
        lambda *call_args: attack(forward_ref(), *call_args), reduce_retracing=True))
    return compiled(*args)


def batch_relaxed_shapes(loop_vars):
    """`shape_invariants` for a `tf.while_loop` whose per-example state may be traced with a
    static batch size on entry and come back with an unknown one.

    That happens when an attack is traced for a batch of one while the forward it calls was
    already traced for a variable batch (a nested `tf.function` reuses its relaxed trace, whose
    logits have batch size None); broadcasting 1 with None gives None. Relaxing the leading
    dimension of every non-scalar loop variable accepts both.
    """
    return tf.nest.map_structure(
        lambda value: (tf.TensorShape([None]).concatenate(value.shape[1:])
                       if value.shape.rank else value.shape),
        loop_vars,
    )

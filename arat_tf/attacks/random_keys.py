"""Keys for the stateless random ops of the evaluation attacks (FAB restarts, Square)."""

import numbers

import tensorflow as tf

_INT32_MAX = 2**31 - 1


def rng_key(seed):
    """A [2] int64 key for the stateless (counter-based Philox) random ops.

    `seed` may be an int (reproducible), a `tf.random.Generator` (the key is drawn from it, so
    successive calls differ but follow the generator's seed) or None (drawn from the global TF
    seed, which `keras.utils.set_random_seed` fixes). Stateless ops are the functional form of a
    `tf.random.Generator`: unlike a generator they can be created inside `tf.function` and make
    the same seed give the same result eagerly and in graphs.
    """
    if isinstance(seed, tf.random.Generator):
        return tf.cast(seed.make_seeds(1)[:, 0], tf.int64)
    if seed is None:
        return tf.random.uniform([2], 0, _INT32_MAX, dtype=tf.int64)
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise ValueError(f"seed must be an int, a tf.random.Generator or None, got {seed!r}")
    return tf.constant([int(seed) % (2**63), 0], tf.int64)

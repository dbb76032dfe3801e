"""`evaluate_robustness`: clean accuracy, then each attack on the examples still unbroken."""

import time

import keras
import numpy as np
import tensorflow as tf

from arat_tf.evaluation import sanity


def _check_inside_ball(x_adv, x, eps, norm, attack_name):
    """The threat model is part of the result: an attack that leaves the ball or [0, 1] is a bug."""
    delta = (x_adv - x).numpy().reshape(len(x), -1)
    size = np.abs(delta).max(axis=1) if norm == "linf" else np.linalg.norm(delta, axis=1)
    tolerance = 1e-5 if norm == "linf" else 1e-4
    x_adv = x_adv.numpy()
    if (size > eps + tolerance).any() or x_adv.min() < -1e-6 or x_adv.max() > 1 + 1e-6:
        raise RuntimeError(
            f"{attack_name} returned points outside the {norm} ball of radius {eps} or [0, 1] "
            f"(max perturbation {size.max():.6g}); refusing to report its result."
        )


def _empty_counts(n_attacks):
    """The counts `evaluate_robustness` sums: `n_examples`, `n_clean`, and per attack
    `robust_after` (examples still robust after it), `examples_attacked`, `examples_broken` and
    `seconds`."""
    return {"n_examples": 0, "n_clean": 0, "robust_after": [0] * n_attacks,
            "examples_attacked": [0] * n_attacks, "examples_broken": [0] * n_attacks,
            "seconds": [0.0] * n_attacks}


def _add_counts(total, counts):
    for key, value in counts.items():
        if isinstance(value, list):
            total[key] = [a + b for a, b in zip(total[key], value)]
        else:
            total[key] += value


def _attack_examples(forward, images, labels, attacks, *, eps, norm, seed):
    """Clean accuracy, then every attack in order on the examples still unbroken, for one batch
    (or one replica's shard of it). Returns its counts (see `_empty_counts`)."""
    counts = _empty_counts(len(attacks))
    counts["n_examples"] = int(labels.shape[0])
    if counts["n_examples"] == 0:  # a replica's shard of a last batch smaller than the replicas
        return counts
    robust = (tf.argmax(forward(images), axis=-1, output_type=tf.int32) == labels).numpy()
    counts["n_clean"] = int(robust.sum())
    for attack_index, attack in enumerate(attacks):
        indices = np.flatnonzero(robust)
        if len(indices):
            x, y = tf.gather(images, indices), tf.gather(labels, indices)
            start = time.perf_counter()
            x_adv, _ = attack.run(forward, x, y, eps, norm, seed + attack_index)
            x_adv = tf.convert_to_tensor(x_adv, tf.float32)
            counts["seconds"][attack_index] += time.perf_counter() - start
            _check_inside_ball(x_adv, x, eps, norm, attack.name)
            broken = (tf.argmax(forward(x_adv), axis=-1, output_type=tf.int32) != y).numpy()
            robust[indices[broken]] = False
            counts["examples_attacked"][attack_index] += len(indices)
            counts["examples_broken"][attack_index] += int(broken.sum())
        counts["robust_after"][attack_index] = int(robust.sum())
    return counts


def _sanity_warnings(forward, images, labels):
    return (sanity.check_outputs_are_logits(forward(images))
            + sanity.check_input_gradients(forward, images, labels)
            + sanity.check_deterministic(forward, images))


def _attack_batch_on_replicas(strategy, forward, images, labels, attacks, *, eps, norm, seed,
                              check_sanity=False):
    """Splits the batch into one contiguous shard per replica (all workers see the same batch and
    each computes only its own replicas' shards) and attacks the shards in parallel with
    `strategy.run`. Returns `{replica id: counts}` for this process' replicas and, with
    `check_sanity`, the sanity warnings of replica 0's shard.

    Everything that touches the model runs in replica context: there, BN moving statistics
    (synchronization on read) are the replica's local copy, whereas reading them in cross-replica
    context under MultiWorkerMirroredStrategy is a collective op that has no gradient.

    Replica r's seeds are offset by `REPLICA_SEED_STRIDE * r`, so replica 0 (and a single device)
    draws exactly the seeds of the undistributed evaluation.
    """
    shards = np.array_split(np.arange(int(labels.shape[0])), strategy.num_replicas_in_sync)
    replica_counts, warnings = {}, []

    def attack_shard():
        replica_id = int(tf.get_static_value(
            tf.distribute.get_replica_context().replica_id_in_sync_group))
        index = shards[replica_id]
        x, y = tf.gather(images, index), tf.gather(labels, index)
        if check_sanity and replica_id == 0 and len(index):
            warnings.extend(_sanity_warnings(forward, x, y))
        replica_counts[replica_id] = _attack_examples(
            forward, x, y, attacks, eps=eps, norm=norm, seed=seed + REPLICA_SEED_STRIDE * replica_id)

    strategy.run(attack_shard)
    return replica_counts, warnings


def _local_total(replica_counts, n_attacks):
    total = _empty_counts(n_attacks)
    for counts in replica_counts.values():
        _add_counts(total, counts)
    return total


def _total_over_workers(strategy, replica_counts, n_attacks):
    """The counts summed over every replica: this process' replicas, plus, under
    MultiWorkerMirroredStrategy, every other worker's (one cross-worker reduction at the end)."""
    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return _local_total(replica_counts, n_attacks)
    layout = _empty_counts(n_attacks)

    def flat(counts):
        return [float(v) for key in layout
                for v in (counts[key] if isinstance(counts[key], list) else [counts[key]])]

    summed = strategy.reduce(
        tf.distribute.ReduceOp.SUM,
        strategy.experimental_distribute_values_from_function(lambda context: tf.constant(flat(
            replica_counts.get(context.replica_id_in_sync_group, layout)), tf.float64)),
        axis=None,
    ).numpy().tolist()
    total, position = {}, 0
    for key, value in layout.items():
        size = len(value) if isinstance(value, list) else 1
        values = summed[position:position + size] if key == "seconds" else [
            int(round(v)) for v in summed[position:position + size]]
        total[key] = values if isinstance(value, list) else values[0]
        position += size
    return total


REPLICA_SEED_STRIDE = 100_003


def evaluate_robustness(forward, dataset, attacks, *, eps, norm="linf", seed=0, progress=True,
                        strategy=None):
    """Robust accuracy as the per-example worst case over `attacks`, run in order.

    Each attack only sees the examples that are correctly classified and unbroken by every earlier
    attack (AutoAttack's protocol), so robust accuracy never exceeds clean accuracy and never
    increases from one attack to the next. Success is re-checked on the returned points, and points
    outside the threat model are refused.

    Args:
        forward: `images -> logits`, the model in inference mode (reuse one function: attacks
            cache their compiled graphs per `forward`).
        dataset: batched `(images in [0, 1], labels)`.
        attacks: `EvaluationAttack`s (see `attack_suite.resolve_attacks`).
        eps: perturbation budget.
        norm: "linf" or "l2".
        seed: base random seed (each batch and attack gets its own, reproducibly).
        progress: show a Keras progress bar over batches.
        strategy: optional `tf.distribute.Strategy` with several replicas (the model's variables
            created under its scope): every batch is split into one shard per replica, attacked
            in parallel; with several workers, every worker iterates the same `dataset` and the
            counts are summed over workers at the end. Per-attack `seconds` are then summed over
            replicas. One replica gives exactly the undistributed result.

    Returns:
        A dict: `n_examples`, `clean_accuracy`, `robust_accuracy`, `attacks` (per attack: name,
        robust accuracy after it, examples attacked, examples broken, seconds, white_box),
        `warnings` (sanity checks) and `replicas`.
    """
    replicas = strategy.num_replicas_in_sync if strategy is not None else 1
    replica_counts = {}  # replica id -> the summed counts of its shards (this process' replicas)
    warnings = []
    cardinality = int(dataset.cardinality())
    progress_bar = keras.utils.Progbar(cardinality if cardinality > 0 else None,
                                       verbose=1 if progress else 0, unit_name="batch")
    for batch_index, (images, labels) in enumerate(dataset):
        images = tf.convert_to_tensor(images, tf.float32)
        labels = tf.cast(labels, tf.int32)
        batch_seed = seed + 1000 * batch_index
        if replicas > 1:
            batch_counts, batch_warnings = _attack_batch_on_replicas(
                strategy, forward, images, labels, attacks, eps=eps, norm=norm, seed=batch_seed,
                check_sanity=batch_index == 0)
            warnings += batch_warnings
        else:
            if batch_index == 0:
                warnings += _sanity_warnings(forward, images, labels)
            batch_counts = {0: _attack_examples(forward, images, labels, attacks, eps=eps,
                                                norm=norm, seed=batch_seed)}
        for replica_id, counts in batch_counts.items():
            _add_counts(replica_counts.setdefault(replica_id, _empty_counts(len(attacks))), counts)
        local = _local_total(replica_counts, len(attacks))
        progress_bar.add(1, values=[("clean", local["n_clean"] / max(local["n_examples"], 1)),
                                    ("robust", local["robust_after"][-1]
                                     / max(local["n_examples"], 1))])
    total = _total_over_workers(strategy, replica_counts, len(attacks))
    n_examples = max(total["n_examples"], 1)
    # By position, not by name: the same attack may be listed twice (e.g. apgd-ce,autoattack).
    results = [
        {"name": attack.name, "robust_accuracy": total["robust_after"][index] / n_examples,
         "white_box": attack.white_box, "examples_attacked": total["examples_attacked"][index],
         "examples_broken": total["examples_broken"][index], "seconds": total["seconds"][index]}
        for index, attack in enumerate(attacks)
    ]
    warnings += sanity.check_black_box_not_stronger(results)
    return {
        "n_examples": total["n_examples"],
        "clean_accuracy": total["n_clean"] / n_examples,
        "robust_accuracy": total["robust_after"][-1] / n_examples,
        "attacks": results,
        "warnings": warnings,
        "replicas": replicas,
    }


def format_report(report):
    """The report as a plain-text table for stdout."""
    header = f"{report.get('variant', report.get('branch', ''))}  ({report.get('suite', '')}, " \
             f"{report['norm']} eps={report['eps']:.5g}, {report['n_examples']} examples)"
    lines = [header, f"{'attack':<16}{'robust acc':>12}{'attacked':>10}{'broken':>8}{'seconds':>10}"]
    lines.append(f"{'clean':<16}{report['clean_accuracy']:>12.2%}{report['n_examples']:>10}"
                 f"{'':>8}{'':>10}")
    for result in report["attacks"]:
        lines.append(f"{result['name']:<16}{result['robust_accuracy']:>12.2%}"
                     f"{result['examples_attacked']:>10}{result['examples_broken']:>8}"
                     f"{result['seconds']:>10.1f}")
    lines.append(f"{'robust (worst)':<16}{report['robust_accuracy']:>12.2%}")
    for warning in report["warnings"]:
        lines.append(f"WARNING: {warning}")
    return "\n".join(lines)

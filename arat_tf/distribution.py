"""Distribution strategies of a training run: `make_strategy(name, cpu_replicas)` and `is_chief`.

    default       tf.distribute.get_strategy(): one device (today's behaviour).
    mirrored      MirroredStrategy over all local GPUs (CPU if there is none); with
                  cpu_replicas=N >= 1, over N logical CPU devices instead (for testing
                  multi-replica code on one machine).
    multi_worker  MultiWorkerMirroredStrategy; the cluster and this process' task come from the
                  TF_CONFIG environment variable. Every worker runs the same command.

`--batch_size` is always the GLOBAL batch: each of the `num_replicas_in_sync` replicas gets
`batch_size / replicas` examples per step, and the losses are scaled so the update is the one of a
single device on the whole global batch.

Logical CPU devices and MultiWorkerMirroredStrategy must be set up before TensorFlow initialises
its runtime (before the first op or device query), so build the strategy first thing.
"""

import json
import os

import tensorflow as tf

STRATEGIES = ("default", "mirrored", "multi_worker")


class DistributionError(ValueError):
    """A strategy cannot be built as asked (bad TF_CONFIG, devices already initialised, ...)."""


def _logical_cpus(count):
    """Splits the physical CPU into `count` logical devices; returns their names."""
    cpu = tf.config.list_physical_devices("CPU")[0]
    wanted = [tf.config.LogicalDeviceConfiguration() for _ in range(count)]
    try:
        tf.config.set_logical_device_configuration(cpu, wanted)
    except RuntimeError as error:
        # Already initialised: fine if it already has exactly `count` logical CPUs.
        existing = tf.config.list_logical_devices("CPU")
        if len(existing) != count:
            raise DistributionError(
                f"--cpu_replicas={count}: TensorFlow's runtime is already initialised with "
                f"{len(existing)} logical CPU device(s), and logical devices can only be configured "
                f"before it starts. Build the strategy (arat_tf.distribution.make_strategy) before "
                f"running any TensorFlow op, or run in a fresh process. ({error})"
            ) from None
    return [device.name for device in tf.config.list_logical_devices("CPU")][:count]


def parse_tf_config(environ=None):
    """The TF_CONFIG of a multi-worker run as a dict; raises `DistributionError` if unusable."""
    environ = os.environ if environ is None else environ
    raw = environ.get("TF_CONFIG", "")
    if not raw.strip():
        raise DistributionError(
            "--strategy=multi_worker needs the TF_CONFIG environment variable, e.g. "
            'TF_CONFIG=\'{"cluster": {"worker": ["host1:port", "host2:port"]}, '
            '"task": {"type": "worker", "index": 0}}\' on every worker (index differs per worker).'
        )
    try:
        tf_config = json.loads(raw)
    except json.JSONDecodeError as error:
        raise DistributionError(f"TF_CONFIG is not valid JSON: {error}.") from None
    problems = []
    cluster = tf_config.get("cluster") if isinstance(tf_config, dict) else None
    task = tf_config.get("task") if isinstance(tf_config, dict) else None
    if not isinstance(cluster, dict) or not cluster:
        problems.append('it has no "cluster" mapping of task types to address lists')
    elif not all(isinstance(v, list) and v for v in cluster.values()):
        problems.append('every "cluster" entry must be a non-empty list of "host:port" addresses')
    if not isinstance(task, dict) or "type" not in task or "index" not in task:
        problems.append('it has no "task": {"type": ..., "index": ...}')
    elif isinstance(cluster, dict) and (
        task["type"] not in cluster or not isinstance(task["index"], int)
        or not 0 <= task["index"] < len(cluster.get(task["type"]) or [])
    ):
        problems.append(f'its task {task} is not in the cluster {sorted(cluster)}')
    if problems:
        raise DistributionError("TF_CONFIG is invalid for --strategy=multi_worker: "
                                + "; ".join(problems) + ".")
    return tf_config


def make_strategy(name="default", cpu_replicas=0):
    """Builds the `tf.distribute.Strategy` called `name` (one of `STRATEGIES`).

    Args:
        name: "default", "mirrored" or "multi_worker".
        cpu_replicas: with "mirrored", N >= 1 replicas on N logical CPU devices (testing);
            0 uses all local GPUs.

    Raises:
        DistributionError: unknown name, cpu_replicas with a strategy other than "mirrored",
            logical devices requested after TensorFlow started, or a missing/invalid TF_CONFIG.
    """
    if name not in STRATEGIES:
        raise DistributionError(f"strategy must be one of {', '.join(STRATEGIES)}, got {name!r}.")
    if cpu_replicas < 0:
        raise DistributionError(f"cpu_replicas must be >= 0, got {cpu_replicas}.")
    if cpu_replicas and name != "mirrored":
        raise DistributionError(f"cpu_replicas only applies to strategy 'mirrored', got {name!r}.")
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        if cpu_replicas:
            return tf.distribute.MirroredStrategy(_logical_cpus(cpu_replicas))
        return tf.distribute.MirroredStrategy()  # all local GPUs, else the CPU
    parse_tf_config()
    try:
        return tf.distribute.MultiWorkerMirroredStrategy()
    except (RuntimeError, ValueError) as error:
        raise DistributionError(
            f"Cannot start MultiWorkerMirroredStrategy: {error}. It must be built before "
            f"TensorFlow runs any op, and TF_CONFIG must describe this worker."
        ) from None


def is_chief(strategy=None):
    """Whether this process writes the run directory: always, except on non-chief workers of a
    multi-worker run (the "chief" task, or worker 0 when the cluster has no "chief")."""
    strategy = strategy or tf.distribute.get_strategy()
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return True
    task_type, task_id = resolver.task_type, resolver.task_id
    if task_type is None or task_type == "chief":
        return True
    cluster = resolver.cluster_spec().as_dict()
    return task_type == "worker" and task_id == 0 and "chief" not in cluster

"""Training under tf.distribute.MirroredStrategy with 2 logical CPU devices (in a subprocess, since
logical devices must be configured before TensorFlow initialises)."""

import json
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import json
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    import numpy as np
    from arat_tf.config import TrainConfig
    from arat_tf.data import dataset_spec
    from arat_tf.training import build_classifier, build_trainer, compile_trainer

    strategy = tf.distribute.MirroredStrategy(["CPU:0", "CPU:1"])
    rng = np.random.default_rng(0)
    x = rng.random((32, 32, 32, 3), dtype=np.float32)
    y = rng.integers(0, 10, 32).astype("int32")
    data = tf.data.Dataset.from_tensor_slices((x, y)).batch(16)
    config = TrainConfig(method="arat", depth=10, width=0.125, attack_steps=2, val_attack_steps=2,
                         epochs=1, synchronized_bn=True).resolve()
    with strategy.scope():
        classifier = build_classifier(config, dataset_spec("cifar10"))
        trainer = build_trainer(config, classifier)
        compile_trainer(trainer, config, steps_per_epoch=2)
    adv_mean = [w for w in classifier.weights if w.path.endswith("adv_moving_mean")][0]
    before = np.array(adv_mean.numpy())
    history = trainer.fit(data, epochs=1, validation_data=data, verbose=0).history
    print(json.dumps({
        "replicas": strategy.num_replicas_in_sync,
        "history": {k: float(v[-1]) for k, v in history.items()},
        "adv_stats_moved": bool(np.abs(np.array(adv_mean.numpy()) - before).max() > 0),
    }))
    """
)


def test_arat_trains_with_synchronized_bn_and_a_training_mode_attack_on_two_replicas():
    # The ARAT attack runs BN in training mode inside the PGD while-loop; a cross-replica
    # reduction there is forbidden, so this is the configuration most likely to break.
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=600,
        env={"TF_CPP_MIN_LOG_LEVEL": "2", "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["replicas"] == 2
    history = report["history"]
    assert history["loss"] > 0 and all(v == v for v in history.values())  # finite, not NaN
    assert {"invariance", "ce_adv", "ce_clean", "val_pgd2_acc_advbn"} <= set(history)
    assert report["adv_stats_moved"]

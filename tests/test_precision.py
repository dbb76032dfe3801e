"""Mixed precision (`--mixed_precision`, `arat_tf.precision`) and XLA (`--jit_compile`).

What must hold under every policy: the image input, the logits, the taps, BN, the predictor
heads, the losses and the attack's perturbation are float32; variables are float32 in every file
written; attacks stay in their ball; a float16 attack still moves where its gradient would flush to
zero; and one training step in 16 bits is the float32 step up to 16-bit rounding.
"""

import os

import keras
import numpy as np
import pytest
import tensorflow as tf

import reference_step as reference
from arat_tf import precision
from arat_tf.attacks import AttackConfig, make_forward, pgd_l2, pgd_linf, trades_attack
from arat_tf.attacks.apgd import apgd
from arat_tf.interop.official_arat import classifier_from_state_dict, load_official_predictors
from arat_tf.interop.torch_checkpoint import read_state_dict
from arat_tf.methods import AratTrainer
from arat_tf.models import build_model
from arat_tf.optimizers import CoupledWeightDecaySGD

POLICIES = precision.MIXED_PRECISION_POLICIES
COMPUTE_DTYPES = {"off": "float32", "mixed_float16": "float16", "mixed_bfloat16": "bfloat16"}


def _reference_trainer(policy, jit_compile=False):
    """The authors' reference model (tests/data/arat_official) built under `policy`, in an
    ARAT trainer that replays their adversarial batch, with their step's settings."""
    with precision.dtype_policy(policy):
        classifier, _ = classifier_from_state_dict(
            read_state_dict(reference.DATA / "r18_w0125_init_state_dict.pt"))
    trainer = AratTrainer(classifier, train_attack=AttackConfig(steps=10, start="zero"),
                          attack_bn_mode="train", adv_ce_weight=0.3, clean_ce_weight=0.7)
    load_official_predictors(trainer.predictors, classifier, read_state_dict(
        reference.DATA / "r18_w0125_predictors_state_dict.pt"))
    trainer.compile(optimizer=precision.wrap_optimizer(
        CoupledWeightDecaySGD(0.1, momentum=0.9, coupled_weight_decay=5e-4), policy),
        jit_compile=jit_compile)
    return trainer


def _small_trainer(policy, jit_compile=False, optimizer=None):
    """ARAT on a ResNet-10 at width 0.125 (seeded), built under `policy`."""
    keras.utils.set_random_seed(5)
    with precision.dtype_policy(policy):
        classifier = build_model("resnet", num_classes=10, image_shape=(32, 32, 3), depth=10,
                                 width=0.125)
    trainer = AratTrainer(classifier, train_attack=AttackConfig(steps=3),
                          attack_bn_mode="train", adv_ce_weight=0.5, clean_ce_weight=0.5)
    trainer.compile(optimizer=optimizer or precision.wrap_optimizer(
        CoupledWeightDecaySGD(0.1, momentum=0.9, coupled_weight_decay=5e-4), policy),
        jit_compile=jit_compile)
    return trainer


def _small_batch(seed=6, size=16):
    rng = np.random.default_rng(seed)
    x = rng.uniform(size=(size, 32, 32, 3)).astype("float32")
    return {"x": x, "y": rng.integers(0, 10, size).astype("int32"),
            "x_adv": np.clip(x + 8 / 255 * np.sign(np.sin(x * 9973.0)), 0, 1).astype("float32")}


@pytest.fixture(scope="module")
def reference_data():
    batch, expected, _, _ = reference.load_reference()
    return {"x": batch["x_uint8_nhwc"].astype("float32") / 255.0,
            "y": batch["y"].astype("int32"),
            "x_adv": reference.nhwc(expected["step/x_adv_f32"]), "expected": expected}


def _one_replayed_step(trainer, data):
    """Runs one `fit` step on the reference batch with the given adversarial batch; returns
    (history, trainable values before, after)."""
    x_adv = tf.constant(data["x_adv"])
    trainer.generate_adversarial = lambda images, labels: x_adv
    before = [np.array(v) for v in trainer.trainable_variables]
    history = trainer.fit(tf.data.Dataset.from_tensors((data["x"], data["y"])), epochs=1,
                          verbose=0, shuffle=False).history
    return history, before, [np.array(v) for v in trainer.trainable_variables]


@pytest.mark.parametrize("policy", POLICIES)
def test_layers_compute_in_the_policy_and_everything_around_them_stays_float32(policy,
                                                                               reference_data):
    trainer = _reference_trainer(policy)
    classifier = trainer.classifier
    assert classifier.stem_conv.compute_dtype == COMPUTE_DTYPES[policy]
    assert classifier.compute_dtype == "float32"  # its image input
    assert {v.dtype for v in classifier.weights} == {"float32"}
    assert all(layer.compute_dtype == "float32" for head in trainer.predictors.values()
               for layer in head._flatten_layers())
    logits, taps = classifier(reference_data["x"], training=False, branch="adv", return_taps=True)
    assert logits.dtype == tf.float32 and {t.dtype for t in taps.values()} == {tf.float32}
    # 16-bit compute, float32 results: bfloat16 keeps ~3 significant digits (measured 0.8% on
    # these logits), float16 ~3.3 (0.07%).
    bound = {"off": 1e-6, "mixed_float16": 5e-3, "mixed_bfloat16": 3e-2}[policy]
    error = reference.relative_l2(logits.numpy(), reference_data["expected"]["eval/logits_bn_adv_f64"])
    assert error <= bound
    if policy != "off":
        assert error > 1e-6  # it really computed in 16 bits


def test_one_bfloat16_step_is_the_float32_step_up_to_bfloat16_rounding(reference_data):
    """The same weights, batch and adversarial batch, one ARAT step each. bfloat16 rounds every
    activation to 8 significant bits (relative 2^-9 per rounding): measured here, the loss terms
    moved by <= 6e-4 and the update by 6% (cosine 0.998) of the float32 one. The bounds (1e-2,
    20%, 0.99) leave room for other kernels while rejecting a step that learns something else:
    a wrong sign, a dropped term or an update 2x off."""
    results = {policy: _one_replayed_step(_reference_trainer(policy), reference_data)
               for policy in ("off", "mixed_bfloat16")}
    (full, before, after), (half, before_16, after_16) = results["off"], results["mixed_bfloat16"]
    for before_a, before_b in zip(before, before_16):
        np.testing.assert_array_equal(before_a, before_b)
    for term in ("ce_adv", "ce_clean", "invariance", "loss"):
        assert half[term][0] == pytest.approx(full[term][0], rel=1e-2), term
    update = np.concatenate([(b - a).ravel() for b, a in zip(before, after)])
    update_16 = np.concatenate([(b - a).ravel() for b, a in zip(before_16, after_16)])
    cosine = update @ update_16 / (np.linalg.norm(update) * np.linalg.norm(update_16))
    assert cosine > 0.99
    assert np.linalg.norm(update_16 - update) <= 0.2 * np.linalg.norm(update)


def test_mixed_float16_update_is_loss_scaled_and_an_overflowing_step_is_skipped():
    """The weight update goes through Keras' LossScaleOptimizer: the scaled loss's gradient is
    unscaled before the update (so the float16 step is the float32 one up to float16 rounding),
    and a step whose scaled gradient overflows float16 is skipped and the scale halved (dynamic
    loss scaling)."""
    data = _small_batch()
    _, before, after = _one_replayed_step(_small_trainer("off"), data)
    update = np.concatenate([(b - a).ravel() for b, a in zip(before, after)])

    def loss_scaled(initial_scale):
        return keras.optimizers.LossScaleOptimizer(
            CoupledWeightDecaySGD(0.1, momentum=0.9, coupled_weight_decay=5e-4),
            initial_scale=initial_scale)

    assert isinstance(_small_trainer("mixed_float16").optimizer, keras.optimizers.LossScaleOptimizer)
    half = _small_trainer("mixed_float16", optimizer=loss_scaled(2.0 ** 8))
    history, before_16, after_16 = _one_replayed_step(half, data)
    assert float(half.optimizer.dynamic_scale) == 2.0 ** 8  # no overflow at this scale
    for b, b_16 in zip(before, before_16):
        np.testing.assert_array_equal(b, b_16)
    update_16 = np.concatenate([(b - a).ravel() for b, a in zip(before_16, after_16)])
    cosine = update @ update_16 / (np.linalg.norm(update) * np.linalg.norm(update_16))
    assert cosine > 0.99 and np.linalg.norm(update_16 - update) <= 0.1 * np.linalg.norm(update)
    assert np.isfinite(history["loss"][0])

    overflowing = _small_trainer("mixed_float16", optimizer=loss_scaled(2.0 ** 40))
    _, before_skip, after_skip = _one_replayed_step(overflowing, data)
    for b, a in zip(before_skip, after_skip):
        np.testing.assert_array_equal(a, b)
    assert float(overflowing.optimizer.dynamic_scale) == 2.0 ** 39


@pytest.mark.parametrize("policy", POLICIES)
def test_attacks_stay_in_the_ball_and_the_box_under_every_policy(policy):
    keras.utils.set_random_seed(1)
    with precision.dtype_policy(policy):
        model = build_model("resnet", num_classes=10, image_shape=(32, 32, 3), depth=10,
                            width=0.125)
    rng = np.random.default_rng(1)
    x = tf.constant(rng.uniform(size=(8, 32, 32, 3)).astype("float32"))
    y = tf.constant(rng.integers(0, 10, 8).astype("int32"))
    eps = 8 / 255
    for bn_mode in ("inference", "train"):
        forward = make_forward(model, branch="adv", bn_mode=bn_mode)
        crafted = {
            "pgd_linf": pgd_linf(forward, x, y, eps=eps, steps=3),
            "trades": trades_attack(forward, x, forward(x), eps=eps, steps=3),
            "apgd": apgd(forward, x, y, eps=eps, steps=5, seed=0)[0],
        }
        for name, x_adv in crafted.items():
            assert x_adv.dtype == tf.float32, name
            delta = np.abs(x_adv.numpy() - x.numpy())
            assert delta.max() <= eps + 1e-6, (name, bn_mode, delta.max())
            # APGD keeps the clean input of an example the untrained model already gets wrong.
            assert name == "apgd" or delta.max() > eps / 4, (name, bn_mode, delta.max())
            assert x_adv.numpy().min() >= 0.0 and x_adv.numpy().max() <= 1.0, name
        x_l2 = pgd_l2(forward, x, y, eps=0.5, step_size=0.2, steps=3)
        norms = np.sqrt(np.sum(np.square(x_l2.numpy() - x.numpy()), axis=(1, 2, 3)))
        assert norms.max() <= 0.5 + 1e-5 and norms.max() > 0.1


def _confident_float16_mlp():
    """A float16 MLP whose cross-entropy gradient at the logits is at most ~1e-8: below half of
    float16's smallest subnormal (6e-8), so it flushes to zero in the backward pass without
    scaling."""
    keras.utils.set_random_seed(2)
    with precision.dtype_policy("mixed_float16"):
        hidden = keras.layers.Dense(16, activation="relu")
        output = keras.layers.Dense(10)
        model = keras.Sequential([keras.Input((12,)), hidden, output,
                                  keras.layers.Activation("linear", dtype="float32")])
    # Hidden units are all 1.2 on the test input: logit k = 0.96 k for k >= 1 and 26.9 for class
    # 0, which leads by 18.2 (p_9 ~ 1e-8, the largest gradient entry at the logits).
    kernel = np.tile(0.05 * np.arange(10, dtype="float32"), (16, 1))
    kernel[:, 0] = 1.4
    output.kernel.assign(kernel)
    hidden.kernel.assign(np.full((12, 16), 0.2, "float32"))
    return model


def test_float16_attack_moves_where_its_unscaled_gradient_underflows():
    model = _confident_float16_mlp()
    x = tf.constant(np.full((4, 12), 0.5, "float32"))
    y = tf.zeros(4, tf.int32)
    logits = model(x).numpy()
    assert logits.dtype == np.float32 and np.all(logits[:, 0] - logits[:, 1:].max(-1) > 17.0)
    unscaled = make_forward(model, gradient_scale=1.0)
    scaled = make_forward(model)  # a float16 layer: ATTACK_GRADIENT_SCALE
    for forward, moves in ((unscaled, False), (scaled, True)):
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_sum(tf.nn.sparse_softmax_cross_entropy_with_logits(y, forward(x)))
        gradient = tape.gradient(loss, x).numpy()
        x_adv = pgd_linf(forward, x, y, eps=8 / 255, steps=2, random_start=False).numpy()
        if moves:
            assert np.all(np.isfinite(gradient)) and np.abs(gradient).min() > 0
            # As float32 would: the scaled float16 gradient has the float32 gradient's direction.
            assert np.max(np.abs(x_adv - x.numpy())) == pytest.approx(4 / 255, abs=1e-6)
        else:
            assert np.all(gradient == 0.0)  # the scale is what makes the difference
            np.testing.assert_array_equal(x_adv, x.numpy())


@pytest.mark.parametrize("policy", ("mixed_bfloat16", "mixed_float16"))
def test_export_and_reload_under_a_policy_keep_float32_weights_and_input(policy, tmp_path):
    from arat_tf.serving import export_saved_model

    keras.utils.set_random_seed(3)
    with precision.dtype_policy(policy):
        model = build_model("resnet", num_classes=10, image_shape=(32, 32, 3), depth=10,
                            width=0.125)
    images = np.random.default_rng(3).uniform(size=(4, 32, 32, 3)).astype("float32")
    expected = model(images, training=False, branch="adv").numpy()
    path = export_saved_model(model, str(tmp_path / "export"))
    loaded = tf.saved_model.load(path)
    signature = loaded.signatures["serving_default"]
    assert signature.structured_input_signature[1]["image"].dtype == tf.float32
    saved = tf.train.load_checkpoint(os.path.join(path, "variables", "variables"))
    assert {dtype for name, dtype in saved.get_variable_to_dtype_map().items()
            if not name.startswith("_CHECKPOINTABLE_OBJECT_GRAPH")} == {tf.float32}
    served = signature(image=tf.constant(images))
    assert served["logits"].dtype == tf.float32
    # The served graph and the eager call compute in 16 bits with their own kernels, which may
    # round an activation differently: one bfloat16 rounding is 0.4% (float16: 0.05%).
    tolerance = {"mixed_bfloat16": 2e-2, "mixed_float16": 2e-3}[policy]
    np.testing.assert_allclose(served["logits"].numpy(), expected, rtol=tolerance,
                               atol=tolerance * np.abs(expected).max())
    keras_path = os.path.join(tmp_path, "model.keras")
    model.save(keras_path)
    reloaded = keras.models.load_model(keras_path)  # default policy: float32 compute
    assert {v.dtype for v in reloaded.weights} == {"float32"}
    for variable, original in zip(reloaded.weights, model.weights):
        np.testing.assert_array_equal(np.asarray(variable), np.asarray(original))


@pytest.mark.slow  # ~35 s of XLA compilation on 2 cores: `pytest -m slow tests/test_precision.py`
def test_xla_compiles_the_whole_step_once_and_gives_the_same_update():
    """`jit_compile=True`: the train step, attack loop included, is traced once for all batches
    (no retracing per batch), and given the same adversarial batch it makes the update the step
    without XLA makes, up to the reordered float32 sums of XLA's fusions (measured on the
    authors' reference model: 2.3e-6 on weights that move by up to 2e-2)."""
    data = _small_batch()
    results = {jit: _one_replayed_step(_small_trainer("off", jit_compile=jit), data)
               for jit in (False, True)}
    (_, before, after), (_, before_xla, after_xla) = results[False], results[True]
    for b, b_xla in zip(before, before_xla):
        np.testing.assert_array_equal(b, b_xla)
    for a, a_xla in zip(after, after_xla):
        np.testing.assert_allclose(a_xla, a, rtol=0, atol=2e-5)
    assert max(np.abs(b - a).max() for b, a in zip(before, after)) > 1e-2

    # The real attack under XLA: traced once across several batches, inside its ball.
    trainer = _small_trainer("off", jit_compile=True)
    traces = []
    train_step = trainer.train_step
    trainer.train_step = lambda batch: traces.append(1) or train_step(batch)
    more = _small_batch(seed=7, size=48)
    trainer.fit(more["x"][:16], more["y"][:16], batch_size=16, epochs=1, verbose=0, shuffle=False)
    traced_once = len(traces)
    trainer.fit(more["x"], more["y"], batch_size=16, epochs=1, verbose=0, shuffle=False)
    assert len(traces) == traced_once, "a later batch retraced the XLA train step"
    crafted = tf.function(trainer.generate_adversarial, jit_compile=True)(
        more["x"][:16], more["y"][:16]).numpy()
    assert np.abs(crafted - more["x"][:16]).max() <= 8 / 255 + 1e-6
    assert crafted.min() >= 0.0 and crafted.max() <= 1.0


def test_train_and_evaluate_commands_under_bfloat16(tmp_path, shared_tfds_dir):
    """`--mixed_precision` end to end: training writes float32 files and records the policy,
    and `arat_tf.evaluate --mixed_precision` reports within round-off of its float32 run."""
    import json
    import subprocess
    import sys

    from arat_tf import training
    from arat_tf.config import TrainConfig

    config = TrainConfig(
        dataset="mnist", data_dir=shared_tfds_dir, method="arat", model="small_cnn", width=0.25,
        train_subset=128, val_subset=64, batch_size=64, eval_batch_size=64, attack_steps=2,
        val_attack_steps=2, auto_balance_examples=64, epochs=1, verbose=0,
        run_dir=str(tmp_path / "run"), mixed_precision="mixed_bfloat16")
    classifier, records = training.train(config)
    assert np.isfinite(records[-1]["loss"])
    assert classifier.convs[0].compute_dtype == "bfloat16"
    run = tmp_path / "run"
    assert json.loads((run / "config.json").read_text())["mixed_precision"] == "mixed_bfloat16"
    reloaded = keras.models.load_model(run / "model.keras")
    assert {v.dtype for v in reloaded.weights} == {"float32"}

    reports = {}
    for policy in ("off", "mixed_bfloat16"):
        output = tmp_path / f"evaluation_{policy}.json"
        result = subprocess.run(
            [sys.executable, "-m", "arat_tf.evaluate", f"--run_dir={run}", "--attacks=pgd5",
             "--n_examples=64", f"--mixed_precision={policy}", f"--output={output}"],
            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
            env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"), capture_output=True, text=True,
            timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        reports[policy] = json.loads(output.read_text())
    assert reports["mixed_bfloat16"]["mixed_precision"] == "mixed_bfloat16"
    # bfloat16 may flip a prediction that float32 makes by a hair; no more than a few of 64.
    assert abs(reports["mixed_bfloat16"]["clean_accuracy"] - reports["off"]["clean_accuracy"]) <= 4 / 64

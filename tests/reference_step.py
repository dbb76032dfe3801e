"""Runs the ARAT authors' reference computations (tests/data/arat_official) with arat_tf.

Shared by tests/test_reference_fidelity.py: the imported model, the eval and train-mode forwards,
one ARAT training step (PGD-10 from a zero start, or replayed on a given adversarial batch), and
the quantities the authors' README compares between their float32 and float64 runs.
"""

import json
import pathlib

import keras
import numpy as np
import tensorflow as tf

from arat_tf.attacks import AttackConfig
from arat_tf.interop.official_arat import (
    classifier_from_state_dict,
    load_official_predictors,
    model_entries,
    official_tap_names,
    predictor_entries,
)
from arat_tf.interop.torch_checkpoint import read_state_dict
from arat_tf.methods import AratTrainer
from arat_tf.methods.arat import invariance_distance
from arat_tf.optimizers import CoupledWeightDecaySGD

DATA = pathlib.Path(__file__).resolve().parent / "data" / "arat_official"


def load_reference():
    """`(batch, expected, expected_replay, settings_and_floors)` of the authors' run."""
    with open(DATA / "expected.json") as stream:
        info = json.load(stream)
    return (dict(np.load(DATA / "batch.npz")), dict(np.load(DATA / "expected.npz")),
            dict(np.load(DATA / "expected_replay.npz")), info)


def nhwc(images):
    return np.ascontiguousarray(np.transpose(images, (0, 2, 3, 1)))


def imported_model():
    """The authors' width-0.125 split-BN ResNet-18 and its predictor state, through the importer."""
    classifier, _ = classifier_from_state_dict(read_state_dict(DATA / "r18_w0125_init_state_dict.pt"))
    return classifier, read_state_dict(DATA / "r18_w0125_predictors_state_dict.pt")


class RecordingAratTrainer(AratTrainer):
    """AratTrainer that keeps the adversarial batch of its last step, or replays a given one."""

    def __init__(self, classifier, replay=None, **kwargs):
        super().__init__(classifier, **kwargs)
        self.replay = None if replay is None else tf.constant(replay)
        self.recorded = tf.Variable(tf.zeros((32,) + classifier.image_shape), trainable=False)

    def generate_adversarial(self, images, labels):
        adversarial = self.replay if self.replay is not None else super().generate_adversarial(
            images, labels)
        self.recorded.assign(adversarial)
        return adversarial


def official_step_entries(trainer):
    entries = model_entries(trainer.classifier)
    entries.update(predictor_entries(trainer.predictors, official_tap_names(trainer.classifier)))
    return entries


def run_step(settings, replay=None, jit_compile=False):
    """One ARAT step on the reference batch as the authors ran it (expected.json settings).

    `jit_compile` compiles the train step with XLA. Returns a dict: `before` / `after` (official key -> numpy, torch layout), `x_adv` (NHWC),
    `terms`, `logits_adv`, `logits_clean`, `taps_adv`, `taps_clean`, `pred_out` (official tap
    names), `grads` (official key -> numpy) at the state before the step, and the trainer.
    """
    batch, _, _, _ = load_reference()
    step = settings["settings"]["step"]
    classifier, predictor_state = imported_model()
    trainer = RecordingAratTrainer(
        classifier, replay=replay,
        train_attack=AttackConfig(eps=step["epsilon"], step_size=step["step_size"],
                                  steps=step["num_steps"], start="zero"),
        attack_bn_mode="train", invariance_weight=step["align_features_weight"],
        adv_ce_weight=step["w_adv"], clean_ce_weight=step["w_clean"],
    )
    load_official_predictors(trainer.predictors, classifier, predictor_state)
    trainer.compile(optimizer=CoupledWeightDecaySGD(
        step["learning_rate"], momentum=step["momentum"], coupled_weight_decay=step["weight_decay"]),
        jit_compile=jit_compile)
    entries = official_step_entries(trainer)
    x = batch["x_uint8_nhwc"].astype("float32") / 255.0
    y = batch["y"].astype("int32")

    def snapshot():
        return {key: np.array(to_torch(np.asarray(variable)))
                for key, (variable, _, to_torch) in entries.items()}

    before = snapshot()
    before_values = [np.array(v) for v in trainer.variables]
    trainer.fit(tf.data.Dataset.from_tensors((x, y)), epochs=1, verbose=0, shuffle=False)
    after = snapshot()
    x_adv = trainer.recorded.numpy()

    for variable, value in zip(trainer.variables, before_values):
        variable.assign(value)
    taps = official_tap_names(classifier)
    with tf.GradientTape() as tape:
        total, terms, _, _ = trainer.compute_losses(tf.constant(x), tf.constant(x_adv), y)
    trainable = [(key, variable, to_torch) for key, (variable, _, to_torch) in entries.items()
                 if variable.trainable]
    gradients = tape.gradient(total, [variable for _, variable, _ in trainable])
    grads = {key: to_torch(g.numpy()) for (key, _, to_torch), g in zip(trainable, gradients)}

    logits_adv, taps_adv = classifier(x_adv, training=True, branch="adv", return_taps=True)
    logits_clean, taps_clean = classifier(x, training=True, branch="clean", return_taps=True)
    pred_out, one_minus_cos = {}, {}
    for official, ours in taps.items():
        pred_out[official] = trainer.predictors[ours](taps_adv[ours], training=True).numpy()
        one_minus_cos[official] = float(invariance_distance(
            tf.constant(pred_out[official]), taps_clean[ours], "cos"))
    return {
        "trainer": trainer, "x": x, "y": y, "x_adv": x_adv, "before": before, "after": after,
        "grads": grads, "total": float(total),
        "terms": {"ce_adv": float(terms["ce_adv"]), "ce_clean": float(terms["ce_clean"]),
                  **{f"1-cos {name}": value for name, value in one_minus_cos.items()}},
        "logits_adv": logits_adv.numpy(), "logits_clean": logits_clean.numpy(),
        "taps_adv": {o: taps_adv[t].numpy() for o, t in taps.items()},
        "taps_clean": {o: taps_clean[t].numpy() for o, t in taps.items()},
        "pred_out": pred_out,
    }


def relative_l2(ours, reference):
    ours = np.concatenate([np.ravel(a) for a in ours]) if isinstance(ours, list) else np.ravel(ours)
    reference = (np.concatenate([np.ravel(a) for a in reference]) if isinstance(reference, list)
                 else np.ravel(reference))
    return float(np.linalg.norm(ours.astype("float64") - reference) / np.linalg.norm(reference))


def _concat(arrays):
    return np.concatenate([np.ravel(a).astype("float64") for a in arrays])


def step_metrics(result, expected, info, prefix):
    """`{(quantity, metric): value}` of arat_tf's step against the authors' float64 one, named as
    the rows of their README's float32-vs-float64 table (`prefix`: "step" or "replay")."""
    def f64(name):
        return expected[f"{prefix}/{name}_f64"]

    metrics = {}
    reference_terms = info["terms"][f"{prefix}_f64"]
    for name, value in dict(result["terms"], total=result["total"]).items():
        metrics[(name, "abs diff")] = abs(value - reference_terms[name])
        metrics[(name, "rel diff")] = abs(value - reference_terms[name]) / abs(reference_terms[name])
    metrics[("logits adv (train-mode BN_adv)", "rel L2")] = relative_l2(
        result["logits_adv"], f64("logits_adv"))
    metrics[("predictor outputs (worst of 4)", "rel L2")] = max(
        relative_l2(out, f64(f"pred_out/{tap}")) for tap, out in result["pred_out"].items())

    grads = result["grads"]
    reference_grads = {key: f64(f"grad/{key}") for key in grads}
    groups = {
        "grad conv weights (all 4-D)": [k for k in grads if grads[k].ndim == 4],
        "grad BN_adv gamma+beta": [k for k in grads if ".adv." in k],
        "grad BN_clean gamma+beta": [k for k in grads if ".clean." in k],
        "grad linear weight+bias": [k for k in grads if k.startswith("linear.")],
    }
    for tap in result["pred_out"]:
        groups[f"grad predictor {tap}"] = [k for k in grads if k.startswith(f"{tap}.predictor_x.")]
    for quantity, keys in groups.items():
        metrics[(quantity, "rel L2")] = relative_l2(_concat([grads[k] for k in keys]),
                                                    _concat([reference_grads[k] for k in keys]))
    per_tensor = [relative_l2(grads[k], reference_grads[k]) for k in grads]
    metrics[("grad, worst single tensor", "rel L2")] = max(per_tensor)
    metrics[("grad, median over tensors", "rel L2")] = float(np.median(per_tensor))

    step = info["settings"]["step"]
    before, after = result["before"], result["after"]
    if prefix == "step":
        reference_after = {key: f64(f"after/{key}") for key in after}
    else:  # the replay stores statistics only; parameters follow from the SGD identity
        reference_after = {
            key: (f64(f"after/{key}") if key not in grads else before[key] - step["learning_rate"]
                  * (reference_grads[key] + step["weight_decay"] * before[key]))
            for key in after}
    parameters = list(grads)
    metrics[("parameter update (before - after), all", "rel L2")] = relative_l2(
        _concat([before[k] - after[k] for k in parameters]),
        _concat([before[k] - reference_after[k] for k in parameters]))
    metrics[("parameters after the step, all", "rel L2")] = relative_l2(
        _concat([after[k] for k in parameters]), _concat([reference_after[k] for k in parameters]))
    for branch in ("adv", "clean"):
        for statistic in ("running_mean", "running_var"):
            keys = [k for k in after if k.endswith(f".{branch}.{statistic}")]
            metrics[(f"BN_{branch} {statistic} after", "rel L2")] = relative_l2(
                _concat([after[k] for k in keys]), _concat([reference_after[k] for k in keys]))
            metrics[(f"BN_{branch} {statistic} change (after - before)", "rel L2")] = relative_l2(
                _concat([after[k] - before[k] for k in keys]),
                _concat([reference_after[k] - before[k] for k in keys]))
    for statistic in ("running_mean", "running_var"):
        keys = [k for k in after if ".predictor_x." in k and k.endswith(statistic)]
        metrics[(f"predictor BN {statistic} change", "rel L2")] = relative_l2(
            _concat([after[k] - before[k] for k in keys]),
            _concat([reference_after[k] - before[k] for k in keys]))
    return metrics


def floors(info, section_prefix):
    """`{(quantity, metric): value}` of the authors' float32-vs-float64 rows of one section."""
    return {(row["quantity"], row["metric"]): row["value"] for row in info["floors_f32_vs_f64"]
            if row["section"].startswith(section_prefix)}


def term_floors(floors, info, prefix):
    """`floors` with the loss-term rows raised to one float32 ulp of the term's value.

    A float32 result cannot be closer to the float64 one than half an ulp; where the authors'
    float32 run happened to land nearer (their "1-cos layer4.0.bn1" of the replay: 5e-9, a sixth
    of an ulp of 0.41), the ulp is the honest floor of float32 arithmetic.
    """
    raised = dict(floors)
    for name, value in info["terms"][f"{prefix}_f64"].items():
        ulp = float(np.spacing(np.float32(abs(value))))
        for metric, bound in (("abs diff", ulp), ("rel diff", ulp / abs(value))):
            if (name, metric) in raised:
                raised[(name, metric)] = max(raised[(name, metric)], bound)
    return raised

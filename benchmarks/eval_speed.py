"""Evaluation speed of arat-tf's attacks against IBM's Adversarial Robustness Toolbox (ART 1.20).

Both frameworks attack the SAME Keras model (a CIFAR-10 ResNet from `arat_tf.models.build_model`,
its logits in inference mode) on the SAME first `--n_examples` CIFAR-10 test images, and the table
shows examples/s (n_examples / wall seconds), robust accuracy and seconds per attack, with the
speed-up of arat-tf over ART.

arat-tf side: `arat_tf.evaluation.evaluate_robustness` with `resolve_attacks(["pgd20"])` (PGD-20,
step eps/4, one uniform random start) and `resolve_attacks(["autoattack"])` (AutoAttack
"standard": APGD-CE 100, APGD-T 100 x 9 targets, FAB-T 100 x 9 targets, Square 5000 queries), run
in that order on the examples still unbroken. Its seconds are the wall time of the whole
`evaluate_robustness` call (clean pass, its sanity checks, the attacks and the ball check).
Workaround: `square_linf` raises a ValueError on a batch of exactly one example (an arat-tf bug,
not fixed here), so a single example left for Square is attacked as two copies (slower, never
faster; a line of the output says when that happened).

ART side: `art.estimators.classification.TensorFlowV2Classifier` around the same model
(`model(x, training=False, branch="adv")`, clip_values=(0, 1), sparse cross-entropy from logits),
then `ProjectedGradientDescent(norm=inf, eps, eps_step=eps/4, max_iter=20, num_random_init=1)`
and `art.attacks.evasion.AutoAttack`. ART 1.20 has no targeted-DLR APGD-T and no FAB, so AutoAttack
cannot be reproduced exactly; `--art_autoattack` chooses the attack list:

* "standard_like" (default): the closest ART list, run by ART's AutoAttack (untargeted, on the
  examples still robust): APGD-CE (100 iterations, 1 restart, initial step 2 eps as in the
  paper), APGD-DLR UNTARGETED (100, 1 restart) in APGD-T's slot, DeepFool (100 iterations,
  10 class gradients, the minimum-norm attack ART's own default list puts in FAB's slot) and
  Square (5000 iterations, p_init 0.8, 1 restart).
* "default": `AutoAttack(estimator, eps=eps, eps_step=2 eps)` with ART's own default list:
  APGD-CE x 5 restarts, APGD-DLR x 5 restarts, DeepFool, Square x 5 restarts.

Throughput is n_examples / seconds on both sides, but the work differs for PGD-20:
`evaluate_robustness` attacks only the clean-correct examples (AutoAttack's protocol) while ART's
PGD attacks all of them, so at low clean accuracy arat-tf does a fraction of ART's work. The
optional suite `pgd20_all` times the same PGD-20 on all examples on both sides (equal work).

ART's robust accuracy is the model's accuracy on ART's output (and, in the JSON, also the
stricter "clean-correct and adversarially correct"). Robust accuracies are only comparable as a
sanity check: the attack definitions differ (see above).

Timing protocol: the machine is shared, so both frameworks run in one process (or ART in a
subprocess, see below), after an untimed warm-up of each (tracing, Keras' first calls), and with
`--repeats R` the order of the two frameworks alternates per round; the table shows medians.
Process CPU seconds are shown too: other processes' load inflates wall time more than CPU time.

oneDNN: TensorFlow 2.20's CPU build has a oneDNN defect that can crash ("double free or
corruption", or a segmentation fault) eager gradient loops with varying batch sizes; here ART's
PGD crashes the process with oneDNN on. arat-tf's attacks run as graphs; ART's
`TensorFlowV2Classifier` computes gradients eagerly. So by default (`--art_onednn auto`) the ART
part runs in a subprocess with TF_ENABLE_ONEDNN_OPTS=0 while arat-tf keeps this process' setting
(the table's oneDNN column says which setting each row used): each framework in the setting it
runs in. For a like-for-like comparison run the whole script with TF_ENABLE_ONEDNN_OPTS=0 set
(ART then runs in-process, same setting for both).

Model: random init by default (~10% clean accuracy, so robust accuracy is trivially ~0); prefer
`--train_epochs 2`, which trains the ResNet with plain SGD on the first `--train_examples` CIFAR-10
training images, or `--model_path` to load a .keras model.

Smoke check (~1 min):   python benchmarks/eval_speed.py --width 0.125 --n_examples 32
Default (~10 min here): python benchmarks/eval_speed.py --train_epochs 2 --repeats 2 --json_out runs/bench/eval_speed.json
Like-for-like oneDNN:   TF_ENABLE_ONEDNN_OPTS=0 python benchmarks/eval_speed.py --train_epochs 2 --repeats 2
Equal-work PGD:         python benchmarks/eval_speed.py --train_epochs 2 --suites pgd20_all,pgd20 --repeats 3
"""

import argparse
import datetime
import fractions
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

DATASET = "cifar10"
SUITES = ("pgd20", "autoattack", "pgd20_all")
DEFAULT_SUITES = ("pgd20", "autoattack")
FRAMEWORKS = ("arat-tf", "ART")
TARGET_SPEEDUP = 3.0


def _fraction(text):
    try:
        value = float(fractions.Fraction(text))
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"not a number or fraction: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text!r}")
    return value


def _positive_int(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text!r}")
    return value


def _non_negative_int(text):
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text!r}")
    return value


def _suites(text):
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in SUITES]
    if not names or unknown:
        raise argparse.ArgumentTypeError(f"--suites takes a comma-separated subset of {','.join(SUITES)}, "
                                         f"got {text!r}")
    return names


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="See the module docstring for what each side runs, the attack-definition mismatches and "
               "the timing protocol.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--width", type=float, default=0.25, help="ResNet channel multiplier (1.0: full ResNet-18).")
    parser.add_argument("--depth", type=int, default=18, choices=(10, 18, 34), help="ResNet depth.")
    parser.add_argument("--bn_mode", default="single", choices=("single", "dual"),
                        help="BN variant of the model; both sides attack the adv branch either way.")
    parser.add_argument("--n_examples", type=_positive_int, default=64, help="First N CIFAR-10 test images.")
    parser.add_argument("--batch_size", type=_positive_int, default=64, help="Attack batch size (both sides).")
    parser.add_argument("--eps", type=_fraction, default="8/255", help="L-inf budget; fractions such as 8/255 work.")
    parser.add_argument("--suites", type=_suites, default=",".join(DEFAULT_SUITES),
                        help=f"Comma-separated, from {','.join(SUITES)}. pgd20_all: the same PGD-20 on ALL "
                             "examples on both sides (arat-tf's attack called directly, no evaluate_robustness, so "
                             "clean-misclassified examples are attacked too, as ART's PGD does): equal work.")
    parser.add_argument("--skip_art", action="store_true", help="Time arat-tf only.")
    parser.add_argument("--art_autoattack", default="standard_like", choices=("standard_like", "default"),
                        help="ART's AutoAttack attack list (see the docstring).")
    parser.add_argument("--art_onednn", default="auto", choices=("auto", "inherit", "off"),
                        help="'off' runs ART in a subprocess with TF_ENABLE_ONEDNN_OPTS=0; 'inherit' runs it "
                             "in this process with this process' setting (with oneDNN on, TF 2.20 may crash); "
                             "'auto': 'inherit' if oneDNN is already off here, else 'off'.")
    parser.add_argument("--repeats", type=_positive_int, default=1,
                        help="Timed rounds; the frameworks' order alternates per round, medians are shown.")
    parser.add_argument("--no_warmup", action="store_true",
                        help="Skip the untimed warm-up (the first timed round then includes tracing).")
    parser.add_argument("--model_path", default=None, help="A .keras model to load instead of building one.")
    parser.add_argument("--train_epochs", type=_non_negative_int, default=0,
                        help="Plain (non-adversarial) SGD epochs on the first --train_examples training images "
                             "before the benchmark (0: attack the model as built or loaded).")
    parser.add_argument("--train_examples", type=_positive_int, default=2048, help="Training subset size.")
    parser.add_argument("--train_batch_size", type=_positive_int, default=64, help="Training batch size.")
    parser.add_argument("--learning_rate", type=float, default=0.02, help="SGD learning rate (momentum 0.9).")
    parser.add_argument("--data_dir", default="../shared/datasets/tfds", help="TFDS data dir with cifar10.")
    parser.add_argument("--seed", type=int, default=0, help="Random seed (model init, training, attacks).")
    parser.add_argument("--save_model", default=None,
                        help="Save the (trained) model here as .keras, to rerun on it with --model_path.")
    parser.add_argument("--json_out", default=None, help="Also write the results as JSON here.")
    # Internal: the ART subprocess of --art_onednn off.
    parser.add_argument("--_art_worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.art_onednn == "auto":
        args.art_onednn = "inherit" if _onednn_setting() == "off" else "off"
    if not args.width > 0:
        parser.error(f"--width must be > 0, got {args.width}")
    if args.train_epochs and args.model_path:
        parser.error("--train_epochs trains a freshly built model; do not combine it with --model_path.")
    if args._art_worker and not args.model_path:
        parser.error("the ART worker needs --model_path.")
    return args


# ----------------------------------------------------------------------------------------------
# Model and data.


def build_or_load_model(args):
    import keras

    import arat_tf  # noqa: F401  (registers the custom objects for load_model)
    from arat_tf.data import dataset_spec
    from arat_tf.models.registry import build_model

    if args.model_path:
        model = keras.models.load_model(args.model_path)
        if tuple(model.image_shape) != tuple(dataset_spec(DATASET).image_shape):
            raise SystemExit(f"error: {args.model_path} expects images of shape {model.image_shape}.")
        return model
    spec = dataset_spec(DATASET)
    keras.utils.set_random_seed(args.seed)
    return build_model("resnet", num_classes=spec.num_classes, image_shape=spec.image_shape,
                       bn_mode=args.bn_mode, depth=args.depth, width=args.width)


def train_briefly(model, args):
    """Plain SGD (no attack) for `args.train_epochs` epochs on the first `args.train_examples` images.

    No augmentation (pointless for a few epochs), seeded shuffling: the model is reproducible enough
    that two runs with the same flags attack (nearly) the same model.
    """
    import keras

    from arat_tf.data import make_train_dataset

    data = make_train_dataset(DATASET, batch_size=args.train_batch_size, data_dir=args.data_dir,
                              subset=args.train_examples, seed=args.seed, augmentation="none")
    model.compile(optimizer=keras.optimizers.SGD(args.learning_rate, momentum=0.9),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"], jit_compile=False)
    start = time.perf_counter()
    history = model.fit(data, epochs=args.train_epochs, verbose=2)
    return {"epochs": args.train_epochs, "examples": args.train_examples, "seconds": time.perf_counter() - start,
            "train_accuracy": float(history.history["accuracy"][-1])}


def load_examples(args):
    """The first n test images as (tf.data.Dataset batched by batch_size, numpy images, numpy labels)."""
    from arat_tf.data import make_eval_dataset

    data = make_eval_dataset(DATASET, batch_size=args.batch_size, data_dir=args.data_dir, subset=args.n_examples)
    images, labels = [], []
    for x, y in data:
        images.append(x.numpy())
        labels.append(y.numpy())
    images = np.concatenate(images).astype(np.float32)
    labels = np.concatenate(labels).astype(np.int64)
    if len(images) != args.n_examples:
        raise SystemExit(f"error: the test split has only {len(images)} examples.")
    return data, images, labels


def predict(forward, images, batch_size):
    out = [np.asarray(forward(images[i:i + batch_size])) for i in range(0, len(images), batch_size)]
    return np.concatenate(out).argmax(axis=-1)


def _cpu_seconds():
    times = os.times()
    return times.user + times.system


# ----------------------------------------------------------------------------------------------
# arat-tf.


SQUARE_WORKAROUND = {"calls": 0}


def _pad_single_example(attack):
    """Works around an arat-tf bug (not fixed here): `square_linf` raises a ValueError ("Input tensor
    `Neg:0` enters the loop with shape (1,), but has shape (None,) after one iteration") when it is
    called on exactly ONE example, which `evaluate_robustness` does whenever a single example of a
    batch survives APGD-CE, APGD-T and FAB-T. The single example is attacked as a batch of two
    copies and the first result kept (the copies are attacked independently: same threat model,
    twice the work for that call, so the workaround can only slow arat-tf down)."""
    import dataclasses

    import tensorflow as tf

    def run(forward, x, labels, eps, norm, seed):
        if x.shape[0] != 1:
            return attack.run(forward, x, labels, eps, norm, seed)
        SQUARE_WORKAROUND["calls"] += 1
        x_adv, success = attack.run(forward, tf.concat([x, x], 0), tf.concat([labels, labels], 0), eps, norm, seed)
        return x_adv[:1], success[:1]

    return dataclasses.replace(attack, run=run)


def arat_attacks(suite, num_classes):
    from arat_tf.evaluation import resolve_attacks

    attacks = resolve_attacks([suite], num_classes, "linf")
    return [_pad_single_example(a) if a.name == "square" else a for a in attacks]


def _warm_attacks(suite):
    """Cheap versions of the suite's attacks: the same compiled graphs, few steps."""
    from arat_tf.evaluation import attack_suite as s

    if suite in ("pgd20", "pgd20_all"):
        return [s.pgd_attack(2)]
    return [s.apgd_ce_attack(2), s.apgd_t_attack(2, 9), s.fab_t_attack(2, 9), _pad_single_example(s.square_attack(10))]


def warm_up_arat(forward, suite, images, eps, batch_size):
    """Traces the suite's graphs for two batch sizes (so later shapes reuse the relaxed trace).

    Labels are the model's own predictions, so every warm-up example is attacked. The graphs
    arat-tf caches per forward (PGD, APGD, the logits) are reused by the timed run; Square and FAB
    build a new `tf.function` on every eager call, so they re-trace in every timed call anyway.
    """
    import tensorflow as tf

    start = time.perf_counter()
    for size in sorted({min(batch_size, len(images)), max(1, min(batch_size, len(images)) - 1)}):
        x = tf.constant(images[:size])
        labels = tf.argmax(forward(x), axis=-1, output_type=tf.int32)
        for attack in _warm_attacks(suite):
            attack.run(forward, x, labels, eps, "linf", 0)
    return time.perf_counter() - start


def run_arat_all(forward, data, args):
    """pgd20_all: arat-tf's PGD-20 (the attack `resolve_attacks(["pgd20"])` returns) on every example."""
    (attack,) = arat_attacks("pgd20", 10)
    batches = list(data)
    cpu, start = _cpu_seconds(), time.perf_counter()
    adversarial = [attack.run(forward, images, labels, args.eps, "linf", args.seed + 1000 * batch_index)[0].numpy()
                   for batch_index, (images, labels) in enumerate(batches)]
    seconds = time.perf_counter() - start
    cpu_seconds = _cpu_seconds() - cpu
    correct_adv = correct_clean = n = 0
    for (images, labels), x_adv in zip(batches, adversarial):
        labels = labels.numpy()
        correct_adv += int((predict(forward, x_adv, args.batch_size) == labels).sum())
        correct_clean += int((predict(forward, images.numpy(), args.batch_size) == labels).sum())
        n += len(labels)
    return {"framework": "arat-tf", "attack": "pgd20_all", "seconds": seconds, "cpu_seconds": cpu_seconds,
            "n_examples": n, "clean_accuracy": correct_clean / n, "robust_accuracy": correct_adv / n,
            "per_attack": [], "warnings": []}


def run_arat(forward, data, suite, args):
    from arat_tf.evaluation import evaluate_robustness

    if suite == "pgd20_all":
        return run_arat_all(forward, data, args)
    attacks = arat_attacks(suite, 10)
    cpu, start = _cpu_seconds(), time.perf_counter()
    report = evaluate_robustness(forward, data, attacks, eps=args.eps, norm="linf", seed=args.seed, progress=False)
    seconds = time.perf_counter() - start
    return {
        "framework": "arat-tf", "attack": suite, "seconds": seconds, "cpu_seconds": _cpu_seconds() - cpu,
        "n_examples": report["n_examples"], "clean_accuracy": report["clean_accuracy"],
        "robust_accuracy": report["robust_accuracy"],
        "per_attack": [{k: a[k] for k in ("name", "robust_accuracy", "examples_attacked", "examples_broken",
                                          "seconds")} for a in report["attacks"]],
        "warnings": report["warnings"],
    }


# ----------------------------------------------------------------------------------------------
# ART.


class _AdvBranchLogits:
    """`x -> logits` of the adv branch; ART calls it as `model(x, training=...)`."""

    def __init__(self, model):
        self.model = model

    def __call__(self, x, training=False):
        return self.model(x, training=training, branch="adv")


def make_art_classifier(model):
    import keras
    from art.estimators.classification import TensorFlowV2Classifier

    return TensorFlowV2Classifier(
        model=_AdvBranchLogits(model), nb_classes=model.num_classes, input_shape=tuple(model.image_shape),
        loss_object=keras.losses.SparseCategoricalCrossentropy(from_logits=True), clip_values=(0.0, 1.0))


def make_art_attack(classifier, suite, args, *, warm=False):
    """ART's PGD-20 or AutoAttack; `warm=True`: the same classes with 1-2 iterations, for the warm-up."""
    from art.attacks.evasion import (AutoAttack, AutoProjectedGradientDescent, DeepFool,
                                     ProjectedGradientDescent, SquareAttack)

    eps, batch_size = args.eps, args.batch_size
    if suite in ("pgd20", "pgd20_all"):
        return ProjectedGradientDescent(classifier, norm=np.inf, eps=eps, eps_step=eps / 4, max_iter=2 if warm else 20,
                                        num_random_init=1, batch_size=batch_size, verbose=False)
    if args.art_autoattack == "default" and not warm:
        return AutoAttack(classifier, norm=np.inf, eps=eps, eps_step=2 * eps, batch_size=batch_size)
    iterations = 2 if warm else 100
    attacks = [
        AutoProjectedGradientDescent(classifier, norm=np.inf, eps=eps, eps_step=2 * eps, max_iter=iterations,
                                     targeted=False, nb_random_init=1, batch_size=batch_size,
                                     loss_type="cross_entropy", verbose=False),
        AutoProjectedGradientDescent(classifier, norm=np.inf, eps=eps, eps_step=2 * eps, max_iter=iterations,
                                     targeted=False, nb_random_init=1, batch_size=batch_size,
                                     loss_type="difference_logits_ratio", verbose=False),
        DeepFool(classifier, max_iter=iterations, epsilon=1e-3, nb_grads=10, batch_size=batch_size, verbose=False),
        SquareAttack(classifier, norm=np.inf, eps=eps, max_iter=10 if warm else 5000, p_init=0.8, nb_restarts=1,
                     batch_size=batch_size, verbose=False),
    ]
    return AutoAttack(classifier, norm=np.inf, eps=eps, eps_step=2 * eps, attacks=attacks, batch_size=batch_size,
                      targeted=False)


def warm_up_art(classifier, suite, images, args):
    start = time.perf_counter()
    size = min(args.batch_size, len(images))
    for n in sorted({size, max(1, size - 1)}):
        x = images[:n]
        labels = classifier.predict(x, batch_size=args.batch_size).argmax(axis=-1)
        make_art_attack(classifier, suite, args, warm=True).generate(x, y=labels)
    return time.perf_counter() - start


def _time_art_attacks(attack):
    """Wraps the `generate` of each attack inside ART's AutoAttack to record its seconds and inputs."""
    records = []
    for index, inner in enumerate(getattr(attack, "attacks", None) or []):
        def timed(*call_args, _generate=inner.generate, _name=f"{index}:{type(inner).__name__}", **kwargs):
            x = kwargs.get("x", call_args[0] if call_args else None)
            start = time.perf_counter()
            result = _generate(*call_args, **kwargs)
            records.append({"name": _name, "examples_attacked": int(len(x)), "seconds": time.perf_counter() - start})
            return result

        inner.generate = timed
    return records


def run_art(classifier, forward, suite, images, labels, args):
    attack = make_art_attack(classifier, suite, args)
    per_attack = _time_art_attacks(attack)
    cpu, start = _cpu_seconds(), time.perf_counter()
    x_adv = attack.generate(images, y=labels)
    seconds = time.perf_counter() - start
    cpu_seconds = _cpu_seconds() - cpu
    x_adv = np.asarray(x_adv, np.float32)
    size = np.abs(x_adv - images).reshape(len(images), -1).max(axis=1)
    clean_correct = predict(forward, images, args.batch_size) == labels
    adv_correct = predict(forward, x_adv, args.batch_size) == labels
    return {
        "framework": "ART", "attack": suite, "seconds": seconds, "cpu_seconds": cpu_seconds,
        "n_examples": len(images), "clean_accuracy": float(clean_correct.mean()),
        "robust_accuracy": float(adv_correct.mean()),
        "robust_accuracy_and_clean": float((adv_correct & clean_correct).mean()),
        "max_perturbation": float(size.max()), "inside_box": bool(x_adv.min() >= -1e-6 and x_adv.max() <= 1 + 1e-6),
        "art_attack_list": _art_attack_names(attack), "per_attack": per_attack,
    }


def _art_attack_names(attack):
    inner = getattr(attack, "attacks", None)
    if not inner:
        return [type(attack).__name__]
    names = []
    for a in inner:
        text = type(a).__name__
        for key in ("loss_type", "max_iter", "nb_random_init", "nb_restarts", "targeted"):
            if hasattr(a, key):
                text += f" {key}={getattr(a, key)}"
        names.append(text)
    return names


def art_worker(args):
    """The ART part alone (for --art_onednn off): writes {warmup, results} to args._art_worker."""
    import tensorflow as tf

    model = build_or_load_model(args)
    forward = tf.function(lambda images: model(images, training=False, branch="adv"))
    _, images, labels = load_examples(args)
    classifier = make_art_classifier(model)
    out = {"warmup_seconds": {}, "results": []}
    for suite in args.suites:
        if not args.no_warmup:
            out["warmup_seconds"][suite] = warm_up_art(classifier, suite, images, args)
        result = run_art(classifier, forward, suite, images, labels, args)
        result["onednn"] = _onednn_setting()
        out["results"].append(result)
    with open(args._art_worker, "w") as stream:
        json.dump(out, stream)


def run_art_subprocess(model_path, suite, args):
    """Runs the ART warm-up and timed run of one suite in a child process with oneDNN off."""
    with tempfile.TemporaryDirectory() as tmp:
        out_path = os.path.join(tmp, "art.json")
        command = [sys.executable, os.path.abspath(__file__), "--_art_worker", out_path, "--model_path", model_path,
                   "--n_examples", str(args.n_examples), "--batch_size", str(args.batch_size),
                   "--eps", repr(args.eps), "--suites", suite, "--art_autoattack", args.art_autoattack,
                   "--data_dir", args.data_dir, "--seed", str(args.seed)]
        if args.no_warmup:
            command.append("--no_warmup")
        env = dict(os.environ, TF_ENABLE_ONEDNN_OPTS="0")
        completed = subprocess.run(command, env=env)
        if completed.returncode != 0:
            return None, f"ART subprocess (oneDNN off) exited with code {completed.returncode}"
        with open(out_path) as stream:
            out = json.load(stream)
    return out, None


# ----------------------------------------------------------------------------------------------
# Reporting.


def _onednn_setting():
    value = os.environ.get("TF_ENABLE_ONEDNN_OPTS")
    if value is None:
        return "on (default)"
    return "off" if value.strip() in ("0", "false", "False") else f"on ({value})"


def machine_info():
    import keras
    import tensorflow as tf

    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as stream:
            for line in stream:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info = {
        "cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
        "tensorflow": tf.__version__, "keras": keras.__version__,
        "tf_threads": f"intra={tf.config.threading.get_intra_op_parallelism_threads()} "
                      f"inter={tf.config.threading.get_inter_op_parallelism_threads()} (0 = all cores)",
        "load_average": " ".join(f"{v:.2f}" for v in os.getloadavg()),
    }
    try:
        import art

        info["art"] = art.__version__
    except ImportError:
        info["art"] = "not installed"
    return info


def _median(values):
    return statistics.median(values) if values else float("nan")


def summarise(rows):
    """Median seconds / cpu seconds per (framework, attack); robust accuracy of the first round."""
    summary = {}
    for row in rows:
        key = (row["framework"], row["attack"])
        entry = summary.setdefault(key, {"seconds": [], "cpu_seconds": [], "first": row})
        entry["seconds"].append(row["seconds"])
        entry["cpu_seconds"].append(row["cpu_seconds"])
    for entry in summary.values():
        first = entry["first"]
        entry["median_seconds"] = _median(entry["seconds"])
        entry["median_cpu_seconds"] = _median(entry["cpu_seconds"])
        entry["examples_per_second"] = first["n_examples"] / entry["median_seconds"]
        entry["robust_accuracy"] = first["robust_accuracy"]
        entry["clean_accuracy"] = first["clean_accuracy"]
        entry["onednn"] = first.get("onednn", "?")
    return summary


def format_table(summary, suites, art_ran):
    lines = ["| framework | attack | examples/s | robust acc | seconds | cpu s | oneDNN |",
             "|---|---|---:|---:|---:|---:|---|"]
    for suite in suites:
        for framework in FRAMEWORKS:
            entry = summary.get((framework, suite))
            if entry is None:
                continue
            lines.append(f"| {framework} | {suite} | {entry['examples_per_second']:.3g} | "
                         f"{entry['robust_accuracy']:.2%} | {entry['median_seconds']:.1f} | "
                         f"{entry['median_cpu_seconds']:.1f} | {entry['onednn']} |")
    lines.append("")
    for suite in suites:
        ours, theirs = summary.get(("arat-tf", suite)), summary.get(("ART", suite))
        if ours is None or theirs is None:
            if not art_ran:
                continue
            lines.append(f"speed-up arat-tf / ART ({suite}): n/a (ART did not finish)")
            continue
        speedup = ours["examples_per_second"] / theirs["examples_per_second"]
        cpu_ratio = theirs["median_cpu_seconds"] / max(ours["median_cpu_seconds"], 1e-9)
        met = speedup >= TARGET_SPEEDUP and ours["robust_accuracy"] <= theirs["robust_accuracy"] + 1e-12
        lines.append(f"speed-up arat-tf / ART ({suite}): {speedup:.2f}x wall, {cpu_ratio:.2f}x CPU time; "
                     f"robust acc {ours['robust_accuracy']:.2%} vs {theirs['robust_accuracy']:.2%} -> "
                     f"{'target met' if met else 'target NOT met'}")
    lines.append(f"target: >= {TARGET_SPEEDUP:g}x ART's throughput at equal or lower robust accuracy")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------


def main(argv=None):
    args = parse_args(argv)
    if args._art_worker:
        art_worker(args)
        return 0

    import tensorflow as tf

    tf.get_logger().setLevel("ERROR")
    run_art_here = not args.skip_art and args.art_onednn == "inherit"
    if not args.skip_art:
        try:
            import art  # noqa: F401
            import multiprocess  # noqa: F401  (art's AutoAttack imports it without declaring it)
        except ImportError:
            raise SystemExit('error: ART is not installed: pip install "adversarial-robustness-toolbox==1.20.*" multiprocess '
                             '(or pip install -e ".[bench]"), or pass --skip_art.') from None

    info = machine_info()
    print(f"machine: {info['cpu']}, {info['cores']} cores, load average {info['load_average']}")
    print(f"versions: python {info['python']}, tensorflow {info['tensorflow']}, keras {info['keras']}, "
          f"ART {info['art']}; TF threads {info['tf_threads']}; oneDNN here: {_onednn_setting()}")

    model = build_or_load_model(args)
    training = None
    if args.train_epochs:
        training = train_briefly(model, args)
        print(f"trained {training['epochs']} epochs of plain SGD on {training['examples']} images in "
              f"{training['seconds']:.0f} s (train accuracy {training['train_accuracy']:.1%})")
    if args.save_model:
        os.makedirs(os.path.dirname(os.path.abspath(args.save_model)), exist_ok=True)
        model.save(args.save_model)
        print(f"saved the model to {args.save_model}")
    description = (f"model: {args.model_path}" if args.model_path else
                   f"model: ResNet-{args.depth} width {args.width:g}, bn_mode={args.bn_mode}, "
                   f"{model.count_params():,} parameters, "
                   + ("random init" if not args.train_epochs else f"{args.train_epochs} epochs plain SGD"))
    print(description + "; attacked: adv branch, inference mode (training=False)")

    forward = tf.function(lambda images: model(images, training=False, branch="adv"))
    data, images, labels = load_examples(args)
    clean = float((predict(forward, images, args.batch_size) == labels).mean())
    print(f"data: first {args.n_examples} CIFAR-10 test images, batch {args.batch_size}, "
          f"linf eps={args.eps:.5g}; clean accuracy {clean:.2%}")

    model_path, tmp_dir = args.model_path, None
    if not args.skip_art and args.art_onednn == "off" and not model_path:
        tmp_dir = tempfile.TemporaryDirectory()
        model_path = os.path.join(tmp_dir.name, "model.keras")
        model.save(model_path)
    classifier = make_art_classifier(model) if run_art_here else None

    warmup = {"arat-tf": {}, "ART": {}}
    rows, errors = [], []
    for round_index in range(args.repeats):
        for suite in args.suites:
            order = FRAMEWORKS if round_index % 2 == 0 else FRAMEWORKS[::-1]
            for framework in order:
                if framework == "ART" and args.skip_art:
                    continue
                first = round_index == 0
                print(f"[round {round_index + 1}/{args.repeats}] {framework} {suite} ...", flush=True)
                if framework == "arat-tf":
                    if first and not args.no_warmup:
                        warmup["arat-tf"][suite] = warm_up_arat(forward, suite, images, args.eps, args.batch_size)
                    row = run_arat(forward, data, suite, args)
                    row["onednn"] = _onednn_setting()
                elif run_art_here:
                    if first and not args.no_warmup:
                        warmup["ART"][suite] = warm_up_art(classifier, suite, images, args)
                    row = run_art(classifier, forward, suite, images, labels, args)
                    row["onednn"] = _onednn_setting()
                else:
                    out, error = run_art_subprocess(model_path, suite, args)
                    if error:
                        errors.append(error)
                        print(f"  {error}")
                        continue
                    warmup["ART"].setdefault(suite, out["warmup_seconds"].get(suite))
                    row = out["results"][0]
                row["round"] = round_index
                rows.append(row)
                print(f"  {row['seconds']:.1f} s, robust accuracy {row['robust_accuracy']:.2%}", flush=True)

    summary = summarise(rows)
    print()
    print(f"## eval_speed: ResNet-{args.depth} width {args.width:g} ({args.bn_mode} BN, adv branch), "
          f"{args.n_examples} CIFAR-10 test images, batch {args.batch_size}, linf eps {args.eps:.5g}, "
          f"clean accuracy {clean:.2%}, {args.repeats} round(s)")
    print()
    print(format_table(summary, args.suites, not args.skip_art))
    print()
    print(f"ART AutoAttack list: {args.art_autoattack} (see --help); warm-up s (untimed): "
          + ", ".join(f"{fw} {suite} {sec:.1f}" for fw in warmup for suite, sec in warmup[fw].items()
                      if sec is not None))
    for suite in args.suites:
        times = {fw: [f"{r['seconds']:.1f}" for r in rows if r["framework"] == fw and r["attack"] == suite]
                 for fw in FRAMEWORKS}
        print(f"{suite} seconds per round: " + "; ".join(f"{fw} {', '.join(t)}" for fw, t in times.items() if t))
    for row in rows:
        if row["framework"] == "arat-tf" and row["round"] == 0 and row["per_attack"]:
            per = ", ".join(f"{a['name']} {a['seconds']:.1f}s ({a['examples_attacked']} attacked, "
                            f"{a['examples_broken']} broken)" for a in row["per_attack"])
            print(f"arat-tf {row['attack']} per attack: {per}")
            for warning in row["warnings"]:
                print(f"arat-tf {row['attack']} WARNING: {warning}")
        if row["framework"] == "ART" and row["round"] == 0:
            print(f"ART {row['attack']}: {'; '.join(row['art_attack_list'])}; max |delta| "
                  f"{row['max_perturbation']:.5g}, robust acc counting clean errors "
                  f"{row['robust_accuracy_and_clean']:.2%}, clean acc in ART's process {row['clean_accuracy']:.2%}")
            if row.get("per_attack"):
                print(f"ART {row['attack']} per attack: " + ", ".join(
                    f"{a['name'].split(':', 1)[1]} {a['seconds']:.1f}s ({a['examples_attacked']} attacked)"
                    for a in row["per_attack"]))
    if SQUARE_WORKAROUND["calls"]:
        print(f"arat-tf: Square was called on a single example {SQUARE_WORKAROUND['calls']} time(s) (incl. warm-up) "
              "and ran on two copies of it, working around square_linf's batch-of-1 ValueError (see the docstring "
              "of _pad_single_example)")
    end_load = " ".join(f"{v:.2f}" for v in os.getloadavg())
    print(f"machine: {info['cpu']}, {info['cores']} cores; load average {info['load_average']} at start, "
          f"{end_load} at end; oneDNN {_onednn_setting()} here"
          + ("; ART in a subprocess with oneDNN off" if args.art_onednn == "off" and not args.skip_art else ""))
    for error in errors:
        print(f"ERROR: {error}")

    if args.json_out:
        os.makedirs(os.path.dirname(os.path.abspath(args.json_out)), exist_ok=True)
        payload = {
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "argv": sys.argv[1:], "args": {k: v for k, v in vars(args).items() if not k.startswith("_")},
            "machine": dict(info, load_average_end=end_load), "training": training, "clean_accuracy": clean,
            "warmup_seconds": warmup, "rows": rows, "errors": errors,
            "summary": [{"framework": fw, "attack": suite,
                         **{k: v for k, v in entry.items() if k not in ("first",)}}
                        for (fw, suite), entry in summary.items()],
        }
        with open(args.json_out, "w") as stream:
            json.dump(payload, stream, indent=2)
        print(f"JSON: {args.json_out}")
    if tmp_dir is not None:
        tmp_dir.cleanup()
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())

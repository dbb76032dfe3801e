"""Training-step throughput of the adversarial-training methods, as RATIOS measured in one run.

What is timed is exactly what `fit()` runs: every method's trainer is built from a `TrainConfig`
with `arat_tf.training`'s own `build_classifier` / `build_trainer` / `compile_trainer`, and one step
is one call of the Keras train function (`trainer.make_train_function()`: the `tf.function` around
`train_step`, fed from a distributed iterator over a repeated one-batch dataset, as `fit` feeds it).
Each timed call is synchronised by reading the returned loss.

Alongside, a reference "11 fwd+bwd": a `tf.function` (a `tf.while_loop` of 11 iterations) that runs
the PGD-AT model forward in training mode on the adv branch, takes the cross-entropy and its
gradient w.r.t. the INPUT and ALL trainable variables (the sums of the weight gradients are
accumulated so nothing is pruned) and moves the input by a sign step: the theoretical cost of a
PGD-10 training step (10 attack passes + 1 update pass), with no optimizer or metrics. It is an
upper bound of a PGD-10 step's essential work: attack passes need no weight gradients.
`--arat_ablations` adds ARAT with the community's inference-mode attack BN and ARAT without
predictors, to locate ARAT's extra cost. `--pgd_core` adds "PGD-10 core": the library's own
training attack (inference-mode BN, as PGD-AT) + 1 training-mode fwd/bwd for the weight gradients,
without optimizer, metrics or the clean-accuracy pass.

Timing protocol (the machine is shared, absolute numbers are noisy): all entries live in one
process; after `--warmup` untimed steps each (tracing/compilation), `--repeats` rounds run, and in
each round every entry runs one step in turn, `--steps` times (the order is reversed every other
round). Every entry thus gets `steps * repeats` timed steps spread over the whole run; the table
shows medians. Ratios are ratios of medians; the "paired" range is the min/max over the ratios of
steps run back to back, which cancels slow changes of the machine's load. The process' CPU time
per step (all its threads) is reported too: other processes' load inflates wall time much more
than it inflates our CPU time, so the CPU-time ratio is a useful cross-check on a busy machine.

Memory: `tf.config.experimental.get_memory_info("CPU:0")` (TF's CPU allocator). Before each timed
step the peak is reset; "peak memory" = the entry's resident state (its variables: model, both BN
branches, predictors, optimizer slots, metrics) + the largest growth of the allocator's peak
over its current size during one step (activations, gradients, temporaries). It excludes the TF
runtime, Python and allocations that bypass TF's allocator (e.g. oneDNN's scratch); the process'
ru_maxrss is printed for scale but is shared by all entries.

Smoke check:    python benchmarks/train_throughput.py --width 0.125 --batch_size 32 --steps 2
Full ResNet-18: python benchmarks/train_throughput.py              (width 1.0, batch 128, PGD-10)
"""

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from arat_tf.config import TrainConfig  # noqa: E402
from arat_tf.data import dataset_spec  # noqa: E402
from arat_tf.methods import METHODS  # noqa: E402
from arat_tf.methods.adversarial_trainer import mean_cross_entropy  # noqa: E402
from arat_tf.attacks import make_forward  # noqa: E402
from arat_tf.training import build_classifier, build_trainer, compile_trainer  # noqa: E402

REFERENCE = "11 fwd+bwd"
PGD_CORE = "PGD-10 core"
DATASET = "cifar10"
CIFAR10_TRAIN_SIZE = 50_000
MIB = 1024 * 1024
ARAT_ABLATIONS = {
    "arat [attack_bn_mode=inference]": dict(attack_bn_mode="inference"),
    "arat [use_predictor=False]": dict(use_predictor=False),
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="See the module docstring for the protocol (timing, ratios, memory).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--width", type=float, default=1.0, help="ResNet channel multiplier (1.0: full ResNet-18).")
    parser.add_argument("--depth", type=int, default=18, choices=(10, 18, 34), help="ResNet depth.")
    parser.add_argument("--batch_size", type=int, default=128, help="Training batch size (clean images per step).")
    parser.add_argument("--attack_steps", type=int, default=10, help="PGD steps of the training attack.")
    parser.add_argument("--methods", default="pgd_at,trades,arat",
                        help=f"Comma-separated methods, from {', '.join(METHODS)}.")
    parser.add_argument("--warmup", type=int, default=1, help="Untimed steps per entry (tracing, compilation).")
    parser.add_argument("--steps", type=int, default=3, help="Timed steps per entry and round.")
    parser.add_argument("--repeats", type=int, default=2, help="Interleaved rounds.")
    parser.add_argument("--jit_compile", action=argparse.BooleanOptionalAction, default=False,
                        help="Compile the train steps (and the references) with XLA.")
    parser.add_argument("--pgd_core", action=argparse.BooleanOptionalAction, default=False,
                        help="Also time 'PGD-10 core': the training attack + 1 fwd/bwd, no optimizer/metrics.")
    parser.add_argument("--arat_ablations", action=argparse.BooleanOptionalAction, default=False,
                        help="Also time ARAT with attack_bn_mode=inference and with use_predictor=False "
                             "(config ablations locating ARAT's extra cost).")
    parser.add_argument("--variants", default="",
                        help=f"Comma-separated extra copies of every method: {', '.join(VARIANTS)} "
                             "(mixed precision and/or XLA), timed in the same rounds.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the weights and of the fixed batch.")
    parser.add_argument("--json_out", default="", help="Optional path of a JSON report.")
    args = parser.parse_args(argv)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown or len(set(args.methods)) != len(args.methods):
        parser.error(f"--methods must be distinct names from {', '.join(METHODS)}, got {args.methods}")
    for name in ("batch_size", "attack_steps", "steps", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1")
    if args.warmup < 0:
        parser.error("--warmup must be >= 0")
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if any(v not in VARIANTS for v in args.variants):
        parser.error(f"--variants must be names from {', '.join(VARIANTS)}, got {args.variants}")
    if not args.width > 0:
        parser.error("--width must be > 0")
    return args


def log(message):
    print(message, file=sys.stderr, flush=True)


def train_config(args, method, **overrides):
    values = dict(
        method=method, model="resnet", depth=args.depth, width=args.width,
        batch_size=args.batch_size, attack_steps=args.attack_steps, jit_compile=args.jit_compile,
        dataset=DATASET, seed=args.seed, verbose=0, run_dir="benchmark-unused",
    )
    values.update(overrides)
    return TrainConfig(**values).resolve()


# --variants: each adds a copy of every --methods entry with these TrainConfig overrides.
VARIANTS = {
    "bf16": dict(mixed_precision="mixed_bfloat16"),
    "f16": dict(mixed_precision="mixed_float16"),
    "xla": dict(jit_compile=True),
    "xla+bf16": dict(jit_compile=True, mixed_precision="mixed_bfloat16"),
}


def variables_bytes(variables):
    unique = {id(v): v for v in variables}
    return sum(int(np.prod(v.shape)) * tf.as_dtype(v.dtype).size for v in unique.values())


class Entry:
    """One timed thing: `step()` runs one step and returns when it has finished."""

    def __init__(self, name, step, state_bytes, description):
        self.name = name
        self.step = step
        self.state_bytes = state_bytes
        self.description = description
        self.warmup_seconds = []
        self.seconds = []
        self.cpu_seconds = []
        self.transient_bytes = 0


def build_fit_trainer(config):
    """The compiled trainer (optimizer built) that `fit()` would train for a resolved config."""
    spec = dataset_spec(config.dataset)
    classifier = build_classifier(config, spec)
    trainer = build_trainer(config, classifier)
    compile_trainer(trainer, config, steps_per_epoch=max(1, CIFAR10_TRAIN_SIZE // config.batch_size))
    return trainer


def fit_step_function(trainer, images, labels):
    """`step()`: one call of what `fit()` calls, the Keras train function over an iterator of the
    distributed dataset (here one batch, repeated); returns the loss, which synchronises."""
    dataset = tf.data.Dataset.from_tensors((images, labels)).repeat()
    iterator = iter(trainer.distribute_strategy.experimental_distribute_dataset(dataset))
    trainer.make_train_function()
    train_function = trainer.train_function

    def step():
        logs = train_function(iterator)
        return float(logs["loss"])  # Synchronises.

    return step


def make_method_entry(args, method, images, labels, name=None, **overrides):
    config = train_config(args, method, **overrides)
    trainer = build_fit_trainer(config)
    step = fit_step_function(trainer, images, labels)
    state = variables_bytes(list(trainer.variables) + list(trainer.optimizer.variables))
    description = (f"{type(trainer).__name__}, bn_mode={config.bn_mode}, "
                   f"attack_bn_mode={config.attack_bn_mode}, attack_start={config.attack_start}")
    return Entry(name or method, step, state, description)


def make_reference_entry(args, images, labels, passes=11):
    """`passes` x (train-mode fwd, CE, grad w.r.t. input + all trainable variables), no optimizer."""
    config = train_config(args, "pgd_at")
    classifier = build_classifier(config, dataset_spec(config.dataset))
    variables = list(classifier.trainable_variables)
    step_size = tf.constant(config.attack_step_size, tf.float32)

    def run(x, y):
        def body(k, x_k, accumulated):
            with tf.GradientTape() as tape:
                tape.watch(x_k)
                loss = mean_cross_entropy(classifier(x_k, training=True, branch="adv"), y)
            input_gradient, *weight_gradients = tape.gradient(loss, [x_k] + variables)
            weight_sum = tf.add_n([tf.reduce_sum(g) for g in weight_gradients])
            x_next = tf.clip_by_value(x_k + step_size * tf.sign(input_gradient), 0.0, 1.0)
            return k + 1, tf.ensure_shape(x_next, x.shape), accumulated + weight_sum

        _, x_final, accumulated = tf.while_loop(
            lambda k, *_: k < passes, body, (tf.constant(0), x, tf.constant(0.0)),
            maximum_iterations=passes,
        )
        return accumulated + tf.reduce_sum(x_final)

    function = tf.function(run, jit_compile=args.jit_compile)

    def step():
        return float(function(images, labels))

    return Entry(REFERENCE, step, variables_bytes(classifier.variables),
                 f"{passes} x train-mode fwd + grad w.r.t. input and all weights (single BN), no optimizer")


def make_pgd_core_entry(args, images, labels):
    """The library's PGD-AT training attack + one train-mode fwd/bwd (weights), no optimizer/metrics."""
    config = train_config(args, "pgd_at")
    classifier = build_classifier(config, dataset_spec(config.dataset))
    trainer = build_trainer(config, classifier)
    variables = list(classifier.trainable_variables)

    def run(x, y):
        x_adv = trainer.train_attack.run(
            make_forward(classifier, branch="adv", bn_mode=config.attack_bn_mode), x, y)
        with tf.GradientTape() as tape:
            loss = mean_cross_entropy(classifier(x_adv, training=True, branch="adv"), y)
        gradients = tape.gradient(loss, variables)
        return tf.add_n([tf.reduce_sum(g) for g in gradients]) + loss

    function = tf.function(run, jit_compile=args.jit_compile)

    def step():
        return float(function(images, labels))

    return Entry(PGD_CORE, step, variables_bytes(classifier.variables),
                 f"library PGD-{config.attack_steps} ({config.attack_bn_mode} BN) + 1 train fwd/bwd, "
                 "no optimizer/metrics/clean pass")


def timed_step(entry):
    tf.config.experimental.reset_memory_stats("CPU:0")
    before = tf.config.experimental.get_memory_info("CPU:0")["current"]
    start, cpu_start = time.perf_counter(), time.process_time()
    entry.step()
    entry.seconds.append(time.perf_counter() - start)
    entry.cpu_seconds.append(time.process_time() - cpu_start)
    peak = tf.config.experimental.get_memory_info("CPU:0")["peak"]
    entry.transient_bytes = max(entry.transient_bytes, peak - before)


def run_interleaved(entries, warmup, steps, repeats, timed=timed_step):
    """The timing protocol: `warmup` untimed steps per entry, then `repeats` rounds in which every
    entry runs one `timed(entry)` step in turn, `steps` times, the order reversed every other round."""
    for entry in entries:
        for index in range(warmup):
            start = time.perf_counter()
            entry.step()
            entry.warmup_seconds.append(time.perf_counter() - start)
            log(f"warmup {entry.name} step {index + 1}: {entry.warmup_seconds[-1]:.2f}s")

    for round_index in range(repeats):
        order = entries if round_index % 2 == 0 else entries[::-1]
        for step_index in range(steps):
            for entry in order:
                timed(entry)
                log(f"round {round_index + 1} step {step_index + 1} {entry.name}: "
                    f"{entry.seconds[-1]:.3f}s wall, {entry.cpu_seconds[-1]:.3f}s CPU")


def memory_info_works():
    try:
        tf.config.experimental.reset_memory_stats("CPU:0")
        tf.config.experimental.get_memory_info("CPU:0")
        return True
    except (ValueError, RuntimeError, tf.errors.OpError):
        return False


def median(values):
    return statistics.median(values) if values else float("nan")


def paired_ratios(numerator, denominator):
    """Ratios of the steps run back to back (same round, same step index)."""
    return [a / b for a, b in zip(numerator.seconds, denominator.seconds)]


def fmt_ratio(value):
    return "-" if value is None or not np.isfinite(value) else f"{value:.3f}"


def main(argv=None):
    args = parse_args(argv)
    if not memory_info_works():
        sys.exit("tf.config.experimental.get_memory_info('CPU:0') is not supported by this TF build.")
    keras.utils.set_random_seed(args.seed)
    spec = dataset_spec(DATASET)
    rng = np.random.default_rng(args.seed)
    images = tf.constant(rng.uniform(0.0, 1.0, (args.batch_size,) + spec.image_shape), tf.float32)
    labels = tf.constant(rng.integers(0, spec.num_classes, args.batch_size), tf.int64)
    load_before = os.getloadavg()
    run_start = time.perf_counter()

    entries = []
    for method in args.methods:
        log(f"building {method} ...")
        entries.append(make_method_entry(args, method, images, labels))
    for variant in args.variants:
        for method in args.methods:
            log(f"building {method} [{variant}] ...")
            entries.append(make_method_entry(args, method, images, labels,
                                             name=f"{method} [{variant}]", **VARIANTS[variant]))
    if args.arat_ablations:
        for name, overrides in ARAT_ABLATIONS.items():
            log(f"building {name} ...")
            entries.append(make_method_entry(args, "arat", images, labels, name=name, **overrides))
    log(f"building {REFERENCE} reference ...")
    entries.append(make_reference_entry(args, images, labels))
    if args.pgd_core:
        entries.append(make_pgd_core_entry(args, images, labels))

    run_interleaved(entries, args.warmup, args.steps, args.repeats)
    total_seconds = time.perf_counter() - run_start
    load_after = os.getloadavg()

    by_name = {entry.name: entry for entry in entries}
    pgd = by_name.get("pgd_at")
    reference = by_name[REFERENCE]
    medians = {entry.name: median(entry.seconds) for entry in entries}
    cpu_medians = {entry.name: median(entry.cpu_seconds) for entry in entries}

    def ratio(a, b):
        return medians[a.name] / medians[b.name] if a is not None and b is not None else None

    rows = []
    for entry in entries:
        rows.append(dict(
            name=entry.name, description=entry.description,
            median_seconds=medians[entry.name],
            min_seconds=min(entry.seconds), max_seconds=max(entry.seconds),
            images_per_second=args.batch_size / medians[entry.name],
            vs_pgd_at=ratio(entry, pgd), vs_reference=ratio(entry, reference),
            peak_memory_mib=(entry.state_bytes + entry.transient_bytes) / MIB,
            state_mib=entry.state_bytes / MIB, step_transient_mib=entry.transient_bytes / MIB,
            median_cpu_seconds=cpu_medians[entry.name],
            seconds=entry.seconds, cpu_seconds=entry.cpu_seconds,
            warmup_seconds=entry.warmup_seconds,
        ))

    info = dict(
        cpu_count=os.cpu_count(), cpus_usable=len(os.sched_getaffinity(0)),
        cpu=platform.processor() or platform.machine(), python=platform.python_version(),
        tensorflow=tf.__version__, keras=keras.__version__,
        intra_op_threads=tf.config.threading.get_intra_op_parallelism_threads(),
        inter_op_threads=tf.config.threading.get_inter_op_parallelism_threads(),
        model=f"resnet-{args.depth}", width=args.width, batch_size=args.batch_size,
        attack_steps=args.attack_steps, jit_compile=args.jit_compile, warmup=args.warmup,
        steps=args.steps, repeats=args.repeats, load_average_before=load_before,
        load_average_after=load_after, wall_seconds=total_seconds,
        process_max_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    )

    print(f"\n## Train-step throughput: ResNet-{args.depth} width {args.width}, batch {args.batch_size}, "
          f"PGD-{args.attack_steps}, jit_compile={args.jit_compile}\n")
    print("| method | s/step (median) | images/s | x PGD-AT | x (11 fwd+bwd) | peak memory "
          "| process CPU s/step |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['name']} | {row['median_seconds']:.3f} "
              f"(min {row['min_seconds']:.3f}, max {row['max_seconds']:.3f}) "
              f"| {row['images_per_second']:.1f} | {fmt_ratio(row['vs_pgd_at'])} "
              f"| {fmt_ratio(row['vs_reference'])} | {row['peak_memory_mib']:.0f} MiB "
              f"({row['state_mib']:.0f} state + {row['step_transient_mib']:.0f} step) "
              f"| {row['median_cpu_seconds']:.3f} |")
    print()
    checks = {}
    arat = by_name.get("arat")
    comparisons = [("ARAT / PGD-AT", arat, pgd, 1.10), ("PGD-AT / 11 fwd+bwd", pgd, reference, 1.15)]
    for variant in args.variants:
        comparisons.append((f"ARAT [{variant}] / ARAT", by_name.get(f"arat [{variant}]"), arat, None))
        comparisons.append((f"PGD-AT [{variant}] / PGD-AT", by_name.get(f"pgd_at [{variant}]"), pgd,
                            None))
    for label, numerator, denominator, target in comparisons:
        if numerator is None or denominator is None:
            print(f"{label} step time = n/a (method not run)")
            continue
        value = ratio(numerator, denominator)
        paired = paired_ratios(numerator, denominator)
        verdict = "" if target is None else ("OK" if value <= target else "MISSED")
        cpu_value = cpu_medians[numerator.name] / cpu_medians[denominator.name]
        checks[label] = dict(ratio=value, paired_min=min(paired), paired_max=max(paired),
                             cpu_time_ratio=cpu_value, target=target,
                             met=None if target is None else value <= target)
        target_text = "" if target is None else f" (target <= {target:.2f}) {verdict}"
        print(f"{label} step time = {value:.3f}{target_text}  "
              f"[paired back-to-back ratios {min(paired):.3f}..{max(paired):.3f}, n={len(paired)}; "
              f"process-CPU-time ratio {cpu_value:.3f}]")
    print()
    print(f"Machine: {info['cpu_count']} CPUs ({info['cpus_usable']} usable, {info['cpu']}), "
          f"Python {info['python']}, TF {info['tensorflow']}, Keras {info['keras']}, "
          f"intra/inter-op threads {info['intra_op_threads']}/{info['inter_op_threads']} (0 = auto); "
          f"load average {load_before[0]:.2f} before, {load_after[0]:.2f} after; "
          f"{total_seconds:.0f}s wall.")
    print(f"Config: resnet-{args.depth}, width {args.width}, batch {args.batch_size}, PGD-{args.attack_steps}, "
          f"jit_compile={args.jit_compile}, warmup {args.warmup}, {args.steps} steps x {args.repeats} "
          f"interleaved rounds per entry.")
    print("Peak memory: TF CPU-allocator bytes (get_memory_info), the entry's variables + the largest "
          "allocator growth during one step; process ru_maxrss (all entries, runtime) = "
          f"{info['process_max_rss_mib']:.0f} MiB.")
    for row in rows:
        print(f"  {row['name']}: {row['description']}; warmup (trace+compile+step) "
              + ", ".join(f"{s:.1f}s" for s in row["warmup_seconds"]))

    if args.json_out:
        report = dict(info=info, entries=rows, checks=checks)
        directory = os.path.dirname(os.path.abspath(args.json_out))
        os.makedirs(directory, exist_ok=True)
        with open(args.json_out, "w") as file:
            json.dump(report, file, indent=2)
        log(f"wrote {args.json_out}")


if __name__ == "__main__":
    main()

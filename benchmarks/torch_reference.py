"""arat-tf against idiomatic PyTorch: the same ARAT and PGD-AT training steps, timed side by side.

Users comparing frameworks ask whether arat-tf trains faster than the ARAT authors' PyTorch code.
This script answers with ratios measured in ONE process, on the SAME batch, interleaved:

* **arat-tf ARAT / PGD-AT**: exactly what `fit()` runs for `--method=arat` (CE weights fixed at
  0.5 / 0.5) and `--method=pgd_at`, built from a `TrainConfig` by `benchmarks/train_throughput.py`'s
  helpers (`arat_tf.training.build_classifier / build_trainer / compile_trainer`, one step = one
  call of `trainer.make_train_function()` fed from a distributed iterator over a repeated batch).
* **PyTorch ARAT / PGD-AT**: a plain PyTorch implementation written for this benchmark (what a
  user would write, not a copy of anyone's code): a split-BN CIFAR ResNet-18 (every BatchNorm2d
  twice, `nn.ModuleDict({"clean", "adv"})`, convolutions and linear shared), four predictor heads
  on layer4.{0,1}.bn{1,2}, PGD-10 in train mode on the adversarial BN branch, then
  `0.5 CE(f_adv(x_adv)) + 0.5 CE(f_clean(x)) + 30/4 sum_taps (1 - mean cos(h(z_adv), z_clean.detach()))`
  and `torch.optim.SGD(lr=0.1, momentum=0.9, weight_decay=5e-4)` over model + heads. PGD-AT: one
  ordinary BN per site, PGD-10 under `model.eval()`, CE(f(x_adv)) under `model.train()`, same SGD.

Both sides: eps 8/255, PGD step 2/255, uniform random start in the ball, clip to [0, 1], summed CE
as the attack loss, batch 128 of CIFAR-shaped images (a fixed random batch, or the first
training batch of CIFAR-10 with `--data_dir`), float32, each framework with its default threads.

**Correctness check (before timing).** The PyTorch modules are named as the ARAT authors' state
dict (`conv1.weight`, `bn1.clean.weight`, `layer2.0.shortcut_bn.adv.running_var`,
`linear.weight`, `layer4.0.bn1.predictor_x.0.weight`, ...), so arat-tf's weights are copied into
them with `arat_tf.interop.official_arat.official_state_dict(classifier, predictors)` (the
single-BN PGD-AT model with the small mapping `single_bn_state_dict` below). Then, on the very
objects that are timed afterwards: inference logits of every BN branch (NHWC vs NCHW input), one
replayed training step on a fixed adversarial batch (no attack: loss, SGD update, updated BN
running statistics) and the inference logits again, now with non-trivial per-branch statistics.
The printout gives max |a - b| / max |b| for logits and running statistics, |a - b| / |b| for the
loss and ||a - b|| / ||b|| over all parameters for the update; ~1e-6 (float32 round-off) means
the two frameworks run the same network and the same objective. A first step from a random
initialisation is ill-conditioned in float32 (batch-norm backward cancels the broadcast gradient
of the average pooling), so the same step is also replayed by the PyTorch code in float64 and
each framework's float32 update is compared with it: that distance is what float32 can promise
on this step, and the two frameworks' mutual difference should be no larger (both round the same
stored intermediates, so they can agree with each other better than with float64).

**Timing protocol.** After `--warmup` untimed steps per entry (tracing, oneDNN primitive creation),
`--repeats` rounds; in each round every entry (arat-tf ARAT, PyTorch ARAT, arat-tf PGD-AT,
PyTorch PGD-AT) runs one step in turn, `--steps` times; the order is reversed every other round
(`train_throughput.run_interleaved`). Per entry: median wall seconds per step, images/s (batch /
median), median process CPU seconds per step (all threads of the process; other processes' load
inflates it far less than wall time), and the ratios arat-tf / PyTorch images/s with the range of
the back-to-back ("paired") ratios. A step ends when its loss has been read back to Python
(`float(logs["loss"])`, `loss.item()`; plus `torch.cuda.synchronize()` on CUDA).

**Peak memory** is measured per entry in a separate short subprocess (`--memory_probe`): the
process' RSS high-water mark (`VmHWM`; `ru_maxrss` would include the parent's, see
`peak_rss_mib`) after `--warmup` + 1 steps minus its RSS after the imports and the batch, where
the high-water mark is reset (Linux `clear_refs`; the imports peak higher than they end),
i.e. the entry's weights, BN statistics, optimizer state, activations, gradients, the
framework's caches (TF: traced graphs; PyTorch/oneDNN: primitive caches) and allocator slack.
With CUDA it also reports the framework's own GPU peak.

**Threads.** Both frameworks run with their defaults (printed: TF's intra/inter-op pools, torch's
`get_num_threads()` / `get_num_interop_threads()` and the OpenMP environment). PyTorch's CPU build
parallelises with OpenMP (libgomp), whose idle threads spin-wait; when other processes keep the
cores busy this costs milliseconds per operator (measured here: a 32x10 `log_softmax` 8 ms with 2
threads, 0.01 ms with 1). `OMP_WAIT_POLICY=PASSIVE python benchmarks/torch_reference.py ...` or
`--torch_threads 1` gives the PyTorch number without that effect; run both on a shared machine.

GPU: the same script runs unchanged on a CUDA machine: `--device=cuda` puts the PyTorch side on
the GPU (with `cudnn.benchmark`, as CIFAR training scripts do) and arat-tf uses the GPU on its own
(memory growth enabled, so that the two frameworks can share it).

PyTorch is an optional, benchmark-only dependency: `pip install torch` (on the project's CPU
machine: `pip install torch==2.13.0`, the CPU build).

Smoke check (~2-3 minutes here, memory probes included):
    python benchmarks/torch_reference.py --width 0.125 --batch_size 32 --steps 1 --repeats 1 --attack_steps 2
The project's CPU configuration (a few minutes; on a shared machine also with OMP_WAIT_POLICY=PASSIVE):
    python benchmarks/torch_reference.py --width 0.25 --batch_size 128 --steps 2 --repeats 2
Full ResNet-18 (width 1.0, batch 128, PGD-10; long on a 2-core CPU):
    python benchmarks/torch_reference.py --json_out runs/bench/torch_reference_w1.json
"""

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # train_throughput, when imported

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import train_throughput as tt  # noqa: E402
from arat_tf.data import dataset_spec, make_eval_dataset  # noqa: E402
from arat_tf.interop.official_arat import official_layers, official_state_dict  # noqa: E402
from arat_tf.layers import SplitBatchNormalization  # noqa: E402
from arat_tf.models.resnet import scaled_width  # noqa: E402

try:
    import torch  # noqa: E402
    import torch.nn.functional as F  # noqa: E402
    from torch import nn  # noqa: E402
except ImportError as error:  # pragma: no cover - depends on the environment
    sys.exit(f"benchmarks/torch_reference.py compares against PyTorch, an optional benchmark-only "
             f"dependency that is not installed ({error}). Install it with: pip install torch "
             f"(on the project's CPU machine: pip install torch==2.13.0, the CPU build).")

FRAMEWORKS = ("arat_tf", "torch")
METHODS = ("arat", "pgd_at")
LABELS = {"arat_tf": "arat-tf", "torch": "PyTorch", "arat": "ARAT", "pgd_at": "PGD-AT"}
TARGET = 1.3  # arat-tf ARAT images/s >= 1.3 x PyTorch's
EPS, STEP_SIZE = 8 / 255, 2 / 255
LEARNING_RATE, MOMENTUM, WEIGHT_DECAY = 0.1, 0.9, 5e-4
ADV_CE_WEIGHT, CLEAN_CE_WEIGHT, GAMMA = 0.5, 0.5, 30.0
TAPS = ("layer4.0.bn1", "layer4.0.bn2", "layer4.1.bn1", "layer4.1.bn2")
MIB = 1024 * 1024
OPENMP_VARIABLES = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="See the module docstring for the protocol (correctness check, timing, memory).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--width", type=float, default=1.0, help="ResNet-18 channel multiplier.")
    parser.add_argument("--batch_size", type=int, default=128, help="Clean images per step.")
    parser.add_argument("--attack_steps", type=int, default=10, help="PGD steps of the training attack.")
    parser.add_argument("--warmup", type=int, default=1, help="Untimed steps per entry.")
    parser.add_argument("--steps", type=int, default=2, help="Timed steps per entry and round.")
    parser.add_argument("--repeats", type=int, default=2, help="Interleaved rounds.")
    parser.add_argument("--frameworks", default="arat_tf,torch", help="Comma-separated, from arat_tf, torch.")
    parser.add_argument("--methods", default="arat,pgd_at", help="Comma-separated, from arat, pgd_at.")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                        help="PyTorch's device (arat-tf picks its devices itself: a visible GPU).")
    parser.add_argument("--torch_threads", type=int, default=0,
                        help="torch.set_num_threads(N) for the PyTorch side (0: PyTorch's default). "
                             "See the note on OpenMP spin-waiting in benchmarks/README.md.")
    parser.add_argument("--torch_channels_last", action=argparse.BooleanOptionalAction, default=False,
                        help="PyTorch models and batch in channels_last memory format (not what "
                             "idiomatic code does; NHWC is the layout oneDNN and arat-tf work in).")
    parser.add_argument("--memory", action=argparse.BooleanOptionalAction, default=True,
                        help="Measure each entry's peak memory in a separate subprocess.")
    parser.add_argument("--data_dir", default="",
                        help="TFDS dir holding cifar10: time on its first training batch instead "
                             "of a fixed random batch (e.g. ../shared/datasets/tfds).")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the weights, batch and attacks.")
    parser.add_argument("--json_out", default="", help="Optional path of a JSON report.")
    parser.add_argument("--memory_probe", default="", help=argparse.SUPPRESS)  # internal: "fw:method"
    args = parser.parse_args(argv)
    args.frameworks = [f.strip() for f in args.frameworks.split(",") if f.strip()]
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for name, values, allowed in (("frameworks", args.frameworks, FRAMEWORKS),
                                  ("methods", args.methods, METHODS)):
        if not values or any(v not in allowed for v in values) or len(set(values)) != len(values):
            parser.error(f"--{name} must be distinct names from {', '.join(allowed)}, got {values}")
    for name in ("batch_size", "attack_steps", "steps", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1")
    if args.warmup < 0 or args.torch_threads < 0:
        parser.error("--warmup and --torch_threads must be >= 0")
    if not args.width > 0:
        parser.error("--width must be > 0")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device=cuda: this PyTorch build sees no CUDA device")
    args.depth, args.jit_compile = 18, False  # what train_throughput.train_config reads
    return args


# --------------------------------------------------------------------------------------------
# The PyTorch side: a split-BN CIFAR ResNet-18, ARAT's predictor heads, PGD and the two steps.
# Module names follow the ARAT authors' state-dict layout so that arat-tf's weights load as is.
# --------------------------------------------------------------------------------------------


class SplitBatchNorm2d(nn.ModuleDict):
    """One BN site with a clean and an adversarial BatchNorm2d, chosen per call.

    A `ModuleDict` so that the state-dict keys are `<site>.clean.weight` / `<site>.adv.running_var`,
    the layout of the authors' checkpoints. Only the called branch normalises (and, in train mode,
    updates its running statistics); the other is untouched.
    """

    def __init__(self, channels):
        super().__init__({"clean": nn.BatchNorm2d(channels, eps=1e-5, momentum=0.1),
                          "adv": nn.BatchNorm2d(channels, eps=1e-5, momentum=0.1)})

    def forward(self, x, branch):
        return self[branch](x)


class BatchNorm2d(nn.BatchNorm2d):
    """An ordinary BatchNorm2d (PGD-AT) that accepts, and ignores, the branch argument."""

    def forward(self, x, branch=None):
        del branch
        return super().forward(x)


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN + shortcut, ReLU; also returns both BN outputs (the taps).

    Strided 3x3 convolutions pad 1 on every side; a projecting shortcut is a strided 1x1
    convolution (`shortcut`) with its own BN site (`shortcut_bn`).
    """

    def __init__(self, in_planes, planes, stride, norm):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = norm(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = norm(planes)
        self.projects = stride != 1 or in_planes != planes
        if self.projects:
            self.shortcut = nn.Conv2d(in_planes, planes, 1, stride, bias=False)
            self.shortcut_bn = norm(planes)

    def forward(self, x, branch):
        bn1 = self.bn1(self.conv1(x), branch)
        bn2 = self.bn2(self.conv2(F.relu(bn1)), branch)  # tapped before the residual add
        shortcut = self.shortcut_bn(self.shortcut(x), branch) if self.projects else x
        return F.relu(bn2 + shortcut), bn1, bn2


class ResNet18(nn.Module):
    """CIFAR ResNet-18: 3x3 stride-1 stem, no max-pool, 2 BasicBlocks per stage, 64-128-256-512 x width.

    `forward(x, branch, return_taps)`: `branch` picks the BN branch at every site (ignored with
    `split_bn=False`); with `return_taps` it also returns ARAT's taps, the spatial mean of the
    ReLU of layer4.{0,1}.bn{1,2}.
    """

    def __init__(self, width=1.0, num_classes=10, split_bn=True):
        super().__init__()
        norm = SplitBatchNorm2d if split_bn else BatchNorm2d
        in_planes = scaled_width(64, width)
        self.conv1 = nn.Conv2d(3, in_planes, 3, 1, 1, bias=False)
        self.bn1 = norm(in_planes)
        for stage, base in enumerate((64, 128, 256, 512), start=1):
            planes = scaled_width(base, width)
            blocks = nn.ModuleList()
            for index in range(2):
                blocks.append(BasicBlock(in_planes, planes, 2 if stage > 1 and index == 0 else 1, norm))
                in_planes = planes
            self.add_module(f"layer{stage}", blocks)
        self.linear = nn.Linear(in_planes, num_classes)
        self.tap_width = in_planes

    def forward(self, x, branch="adv", return_taps=False):
        out = F.relu(self.bn1(self.conv1(x), branch))
        taps = {}
        for stage in (1, 2, 3, 4):
            for index, block in enumerate(getattr(self, f"layer{stage}")):
                out, bn1, bn2 = block(out, branch)
                if return_taps and stage == 4:
                    taps[f"layer4.{index}.bn1"] = F.relu(bn1).mean(dim=(2, 3))
                    taps[f"layer4.{index}.bn2"] = F.relu(bn2).mean(dim=(2, 3))
        logits = self.linear(out.mean(dim=(2, 3)))
        return (logits, taps) if return_taps else logits


class PredictorHead(nn.Module):
    """ARAT's head: Linear(d, int(d/4), bias=False) -> BatchNorm1d -> ReLU -> Linear(int(d/4), d)."""

    def __init__(self, width):
        super().__init__()
        hidden = max(1, int(width * 0.25))
        self.predictor_x = nn.Sequential(
            nn.Linear(width, hidden, bias=False), nn.BatchNorm1d(hidden, eps=1e-5, momentum=0.1),
            nn.ReLU(), nn.Linear(hidden, width))

    def forward(self, z):
        return self.predictor_x(z)


class PredictorHeads(nn.Module):
    """One `PredictorHead` per tap, nested so that the keys read `layer4.0.bn1.predictor_x.0.weight`
    (module names cannot contain dots, hence the nesting layer4 -> "0" -> "bn1")."""

    def __init__(self, taps, width):
        super().__init__()
        for tap in taps:
            stage, index, site = tap.split(".")
            if not hasattr(self, stage):
                self.add_module(stage, nn.ModuleDict())
            blocks = getattr(self, stage)
            if index not in blocks:
                blocks[index] = nn.ModuleDict()
            blocks[index][site] = PredictorHead(width)

    def head(self, tap):
        stage, index, site = tap.split(".")
        return getattr(self, stage)[index][site]


def torch_pgd_linf(forward, x, y, eps, step_size, steps):
    """L-inf PGD with a uniform random start; the summed CE is the attack loss.

    `torch.autograd.grad` w.r.t. the input only: no weight gradients are computed or accumulated
    (as in arat-tf, whose attack tape watches only the input).
    """
    x_adv = (x + torch.empty_like(x).uniform_(-eps, eps)).clamp_(0.0, 1.0)
    for _ in range(steps):
        x_adv.requires_grad_(True)
        loss = F.cross_entropy(forward(x_adv), y, reduction="sum")
        (grad,) = torch.autograd.grad(loss, [x_adv])
        with torch.no_grad():
            x_adv = x_adv + step_size * grad.sign()
            x_adv = torch.minimum(torch.maximum(x_adv, x - eps), x + eps).clamp_(0.0, 1.0)
    return x_adv.detach()


class TorchArat:
    """PyTorch ARAT: split-BN ResNet-18 + predictor heads, one SGD over both."""

    method = "arat"

    def __init__(self, width, attack_steps, device):
        self.model = ResNet18(width, split_bn=True).to(device)
        self.heads = PredictorHeads(TAPS, self.model.tap_width).to(device)
        self.modules = (self.model, self.heads)
        self.width, self.attack_steps = width, attack_steps
        self.optimizer = torch.optim.SGD(
            list(self.model.parameters()) + list(self.heads.parameters()),
            lr=LEARNING_RATE, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)

    def attack(self, x, y):
        """PGD in train mode on the adversarial branch: BN normalises with the batch statistics of
        each attack iterate and updates bn.adv's running statistics every step (the ARAT
        authors' protocol); the clean branch is untouched."""
        self.model.train()
        return torch_pgd_linf(lambda z: self.model(z, "adv"), x, y, EPS, STEP_SIZE, self.attack_steps)

    def update(self, x, x_adv, y):
        """One SGD step on ARAT's loss (both forwards in train mode); returns the loss tensor."""
        self.model.train()
        self.heads.train()
        logits_adv, taps_adv = self.model(x_adv, "adv", return_taps=True)
        logits_clean, taps_clean = self.model(x, "clean", return_taps=True)
        invariance = sum(
            1.0 - F.cosine_similarity(self.heads.head(tap)(taps_adv[tap]), taps_clean[tap].detach(),
                                      dim=1).mean()
            for tap in TAPS)
        loss = (ADV_CE_WEIGHT * F.cross_entropy(logits_adv, y)
                + CLEAN_CE_WEIGHT * F.cross_entropy(logits_clean, y)
                + GAMMA / len(TAPS) * invariance)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return loss

    def step(self, x, y):
        return self.update(x, self.attack(x, y), y)


class TorchPgdAt:
    """PyTorch PGD-AT: ResNet-18 with one ordinary BN per site."""

    method = "pgd_at"

    def __init__(self, width, attack_steps, device):
        self.model = ResNet18(width, split_bn=False).to(device)
        self.modules = (self.model,)
        self.width, self.attack_steps = width, attack_steps
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=LEARNING_RATE,
                                         momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)

    def attack(self, x, y):
        """PGD with BN in inference mode (`model.eval()`), as PGD-AT code does."""
        self.model.eval()
        return torch_pgd_linf(self.model, x, y, EPS, STEP_SIZE, self.attack_steps)

    def update(self, x, x_adv, y):
        del x
        self.model.train()
        loss = F.cross_entropy(self.model(x_adv), y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return loss

    def step(self, x, y):
        return self.update(x, self.attack(x, y), y)


TORCH_TRAINERS = {"arat": TorchArat, "pgd_at": TorchPgdAt}


def torch_state(trainer):
    """`{key: numpy array}` of every module of a torch trainer (no `num_batches_tracked`)."""
    state = {}
    for module in trainer.modules:
        for key, value in module.state_dict().items():
            if not key.endswith("num_batches_tracked"):
                state[key] = value.detach().cpu().numpy().copy()
    return state


def torch_parameter_names(trainer):
    return {name for module in trainer.modules for name, _ in module.named_parameters()}


def load_into_torch(trainer, state):
    """Copies an authors'-layout state dict into the torch modules; every key must find its
    module and every module tensor but `num_batches_tracked` must be set."""
    remaining = dict(state)
    for module in trainer.modules:
        own = set(module.state_dict())
        part = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items() if k in own}
        missing, unexpected = module.load_state_dict(part, strict=False)
        missing = [k for k in missing if not k.endswith("num_batches_tracked")]
        if missing or unexpected:
            raise RuntimeError(f"weight copy: missing {missing[:3]}, unexpected {unexpected[:3]}")
        for key in part:
            remaining.pop(key)
    if remaining:
        raise RuntimeError(f"weight copy: {len(remaining)} arat-tf keys have no torch module, "
                           f"first {sorted(remaining)[:3]}")


# --------------------------------------------------------------------------------------------
# The arat-tf side: what fit() runs, through train_throughput's helpers.
# --------------------------------------------------------------------------------------------


def tf_config(args, method):
    """The resolved `TrainConfig` of the benchmark: the protocol above, lr constant."""
    overrides = dict(learning_rate=LEARNING_RATE, lr_schedule="constant", momentum=MOMENTUM,
                     weight_decay=WEIGHT_DECAY, eps=EPS, attack_step_size=STEP_SIZE)
    if method == "arat":
        overrides.update(ce_weights="fixed", adv_ce_weight=ADV_CE_WEIGHT,
                         clean_ce_weight=CLEAN_CE_WEIGHT, invariance_weight=GAMMA)
    config = tt.train_config(args, method, **overrides)
    expected = {"arat": ("dual", "train"), "pgd_at": ("single", "inference")}[method]
    if (config.bn_mode, config.attack_bn_mode, config.attack_start, config.conv_padding) != (
            *expected, "uniform", "torch"):
        raise RuntimeError(f"{method}: unexpected protocol {config}")
    return config


def single_bn_state_dict(classifier):
    """A single-BN (`bn_mode="single"`) arat-tf ResNet as a PyTorch state dict (`bn1.weight`, ...).

    `official_state_dict` only maps split-BN models (the authors released no other); a single-BN
    site keeps its variables as `shared_*` in `SplitBatchNormalization`, which every branch reads.
    """
    state = {}
    for prefix, layer in official_layers(classifier).items():
        if isinstance(layer, SplitBatchNormalization):
            gamma, beta = layer.affine_parameters("adv")
            mean, variance = layer.moving_statistics("adv")
            for name, variable in (("weight", gamma), ("bias", beta), ("running_mean", mean),
                                   ("running_var", variance)):
                state[f"{prefix}.{name}"] = np.asarray(variable)
        elif len(layer.kernel.shape) == 4:
            state[f"{prefix}.weight"] = np.transpose(np.asarray(layer.kernel), (3, 2, 0, 1))  # HWIO->OIHW
        else:
            state[f"{prefix}.weight"] = np.transpose(np.asarray(layer.kernel))  # (in, out)->(out, in)
            if layer.use_bias:
                state[f"{prefix}.bias"] = np.asarray(layer.bias)
    return state


def tf_state(trainer):
    """arat-tf's weights in the torch layout (split BN: the authors' keys, predictors included)."""
    if trainer.classifier.bn_mode == "dual":
        return {k: np.array(v) for k, v in
                official_state_dict(trainer.classifier, trainer.predictors).items()}
    return single_bn_state_dict(trainer.classifier)


def tf_replayed_step(trainer, images, adversarial_images, labels):
    """`train_step` without its attack: the method's losses on a given adversarial batch, the
    gradient and the optimizer update (eagerly). Returns the loss."""
    with tf.GradientTape() as tape:
        total, _, _, _ = trainer.compute_losses(images, adversarial_images, labels)
    variables = trainer.trainable_variables
    trainer.optimizer.apply(tape.gradient(total, variables), variables)
    return float(total)


# --------------------------------------------------------------------------------------------
# Building entries, the correctness check, memory probes.
# --------------------------------------------------------------------------------------------


def entry_name(framework, method):
    return f"{LABELS[framework]} {LABELS[method]}"


def make_batch(args):
    """`(images NHWC float32, labels int64)` as numpy: CIFAR-10's first training batch with
    `--data_dir`, else a fixed uniform random batch."""
    spec = dataset_spec(tt.DATASET)
    if args.data_dir:
        dataset = make_eval_dataset(tt.DATASET, batch_size=args.batch_size, data_dir=args.data_dir,
                                    split="train", subset=args.batch_size)
        images, labels = next(iter(dataset))
        return images.numpy().astype(np.float32), labels.numpy().astype(np.int64)
    rng = np.random.default_rng(args.seed)
    images = rng.uniform(0.0, 1.0, (args.batch_size,) + spec.image_shape).astype(np.float32)
    return images, rng.integers(0, spec.num_classes, args.batch_size).astype(np.int64)


class Batch:
    """The batch in both layouts, converted once, outside every timed region."""

    def __init__(self, images, labels, device, channels_last=False):
        self.images, self.labels = images, labels
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.tf_images = tf.constant(images)
        self.tf_labels = tf.constant(labels)
        self.torch_images = self.to_torch(images, device)
        self.torch_labels = torch.from_numpy(labels).to(device)

    def to_torch(self, nhwc, device):
        """NHWC numpy -> an NCHW torch tensor (channels_last strides with --torch_channels_last)."""
        nchw = torch.from_numpy(np.ascontiguousarray(nhwc.transpose(0, 3, 1, 2))).to(device)
        return nchw.contiguous(memory_format=self.memory_format)


def make_tf_entry(args, method, batch):
    config = tf_config(args, method)
    trainer = tt.build_fit_trainer(config)
    step = tt.fit_step_function(trainer, batch.tf_images, batch.tf_labels)
    state = tt.variables_bytes(list(trainer.variables) + list(trainer.optimizer.variables))
    entry = tt.Entry(entry_name("arat_tf", method), step, state,
                     f"fit() train function of {type(trainer).__name__}, bn_mode={config.bn_mode}, "
                     f"attack_bn_mode={config.attack_bn_mode}"
                     + (f", ce_weights {config.adv_ce_weight}/{config.clean_ce_weight} fixed"
                        if method == "arat" else ""))
    entry.trainer = trainer
    return entry


def make_torch_entry(args, method, batch):
    trainer = TORCH_TRAINERS[method](args.width, args.attack_steps, args.device)
    if args.torch_channels_last:
        for module in trainer.modules:
            module.to(memory_format=torch.channels_last)
    synchronize = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)

    def step():
        loss = trainer.step(batch.torch_images, batch.torch_labels).item()  # synchronises
        synchronize()
        return loss

    parameters = sum(p.numel() for module in trainer.modules for p in module.parameters())
    buffers = sum(b.numel() for module in trainer.modules for b in module.buffers()
                  if b.dtype.is_floating_point)
    state = 4 * (2 * parameters + buffers)  # weights + momentum buffers + BN running statistics
    description = {"arat": "split-BN ResNet-18 + 4 heads, PGD in train mode (bn.adv), SGD",
                   "pgd_at": "single-BN ResNet-18, PGD under model.eval(), SGD"}[method]
    if args.torch_channels_last:
        description += ", channels_last"
    entry = tt.Entry(entry_name("torch", method), step, state, f"{description}, device {args.device}")
    entry.trainer = trainer
    return entry


def max_relative_difference(a, b):
    """max |a - b| / max |b|: element-wise relative errors explode near zero."""
    return float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(b))), 1e-30))


def inference_logits_differences(tf_trainer, torch_trainer, batch, branches):
    differences = {}
    model = torch_trainer.model
    model.eval()
    with torch.no_grad():
        for branch in branches:
            ours = tf_trainer.classifier(batch.tf_images, training=False, branch=branch).numpy()
            theirs = model(batch.torch_images, branch).cpu().numpy()
            differences[branch] = max_relative_difference(ours, theirs)
    return differences


def correctness_check(method, tf_entry, torch_entry, batch, seed):
    """Copies arat-tf's weights into the torch model and compares the two frameworks.

    On the objects that are timed afterwards: inference logits per branch; one replayed step
    (the loss, the SGD update of every parameter, the updated running statistics) on a fixed
    adversarial batch (no attack: each framework's random start would differ); logits again.
    """
    tf_trainer, torch_trainer = tf_entry.trainer, torch_entry.trainer
    before = tf_state(tf_trainer)
    load_into_torch(torch_trainer, before)
    branches = ("clean", "adv") if method == "arat" else ("adv",)
    tf_count = len(tf_trainer.trainable_variables)
    torch_count = len(torch_parameter_names(torch_trainer))
    if tf_count != torch_count:
        raise RuntimeError(f"{method}: {tf_count} arat-tf trainable variables, {torch_count} torch parameters")
    report = dict(trainable_tensors=tf_count, weight_tensors_copied=len(before))
    report["logits_init"] = inference_logits_differences(tf_trainer, torch_trainer, batch, branches)

    rng = np.random.default_rng(seed + 1)
    noise = rng.uniform(-EPS, EPS, batch.images.shape).astype(np.float32)
    adversarial = np.clip(batch.images + noise, 0.0, 1.0)
    tf_loss = tf_replayed_step(tf_trainer, batch.tf_images, tf.constant(adversarial), batch.tf_labels)
    torch_adversarial = batch.to_torch(adversarial, batch.torch_images.device)
    torch_loss = torch_trainer.update(batch.torch_images, torch_adversarial, batch.torch_labels).item()
    report.update(loss_tf=tf_loss, loss_torch=torch_loss,
                  loss=abs(tf_loss - torch_loss) / max(abs(torch_loss), 1e-30))

    ours, theirs = tf_state(tf_trainer), torch_state(torch_trainer)
    parameters = torch_parameter_names(torch_trainer)
    difference = sum(float(np.sum(np.square((ours[k] - before[k]) - (theirs[k] - before[k]))))
                     for k in parameters)
    norm = sum(float(np.sum(np.square(theirs[k] - before[k]))) for k in parameters)
    report["update"] = (difference / max(norm, 1e-30)) ** 0.5
    statistics = [k for k in ours if k.endswith(("running_mean", "running_var"))]
    report["running_stats"] = max(max_relative_difference(ours[k], theirs[k]) for k in statistics)
    report["logits_after_step"] = inference_logits_differences(tf_trainer, torch_trainer, batch, branches)

    # The arbiter: the same replayed step by the PyTorch code in float64, from the same weights.
    reference = TORCH_TRAINERS[method](torch_trainer.width, torch_trainer.attack_steps,
                                       batch.torch_images.device)
    load_into_torch(reference, before)
    for module in reference.modules:
        module.double()
    report["loss_float64"] = reference.update(
        batch.torch_images.double(), torch_adversarial.double(),
        batch.torch_labels).item()
    exact = torch_state(reference)
    norm = sum(float(np.sum(np.square(exact[k] - before[k]))) for k in parameters)
    for name, state in (("arat_tf", ours), ("torch", theirs)):
        difference = sum(float(np.sum(np.square((state[k] - before[k]) - (exact[k] - before[k]))))
                         for k in parameters)
        report[f"update_vs_float64_{name}"] = (difference / max(norm, 1e-30)) ** 0.5
    return report


def print_check(method, report):
    logits = lambda values: ", ".join(f"{b} {v:.1e}" for b, v in values.items())  # noqa: E731
    print(f"* {LABELS[method]}: {report['weight_tensors_copied']} tensors copied "
          f"({report['trainable_tensors']} trainable in each); inference logits [{logits(report['logits_init'])}]; "
          f"replayed step: loss {report['loss_tf']:.6f} vs {report['loss_torch']:.6f} "
          f"(rel. {report['loss']:.1e}), update rel. L2 {report['update']:.1e}, running stats "
          f"{report['running_stats']:.1e}; logits after the step [{logits(report['logits_after_step'])}]; "
          f"float32 update vs a float64 PyTorch replay (this step's float32 conditioning): "
          f"arat-tf {report['update_vs_float64_arat_tf']:.1e}, PyTorch {report['update_vs_float64_torch']:.1e}")


def proc_status_mib(field):
    """`VmRSS` / `VmHWM` of this process from /proc/self/status, in MiB (None without /proc)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def peak_rss_mib():
    """The RSS high-water mark of this process' memory map.

    `VmHWM`, not `ru_maxrss`: `ru_maxrss` also covers the memory map the process replaced at
    `exec`, which for a subprocess started with vfork is its parent's, i.e. this benchmark's
    whole parent process; `VmHWM` is this process' own (and honours the reset below).
    """
    peak = proc_status_mib("VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak_rss():
    """Restarts the RSS high-water mark at the current RSS; returns `(baseline MiB, what it is)`.

    Importing TF and PyTorch peaks above the RSS they leave behind, so without the reset a small
    model's training footprint would hide under the import peak. Linux >= 4.0 (`clear_refs` 5).
    """
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        return proc_status_mib("VmRSS"), "RSS after imports and the batch, high-water mark reset"
    except (OSError, TypeError):
        return peak_rss_mib(), "peak RSS after imports and the batch (no reset available)"


def memory_probe(args, key):
    """Subprocess mode: build one entry, run `--warmup` + 1 steps, print its memory as JSON."""
    framework, method = key.split(":")
    batch = Batch(*make_batch(args), args.device, args.torch_channels_last)
    baseline, baseline_kind = reset_peak_rss()
    make = make_tf_entry if framework == "arat_tf" else make_torch_entry
    entry = make(args, method, batch)
    built = peak_rss_mib()
    for _ in range(max(args.warmup, 1) + 1):
        entry.step()
    result = dict(baseline_mib=baseline, baseline=baseline_kind, build_mib=built - baseline,
                  peak_mib=peak_rss_mib() - baseline)
    if framework == "torch" and args.device == "cuda":
        result["gpu_peak_mib"] = torch.cuda.max_memory_allocated() / MIB
    if framework == "arat_tf" and tf.config.list_logical_devices("GPU"):
        result["gpu_peak_mib"] = tf.config.experimental.get_memory_info("GPU:0")["peak"] / MIB
    print(json.dumps(result))


def measure_memory(args, key):
    command = [sys.executable, os.path.abspath(__file__), "--memory_probe", key,
               "--width", str(args.width), "--batch_size", str(args.batch_size),
               "--attack_steps", str(args.attack_steps), "--warmup", str(args.warmup),
               "--device", args.device, "--seed", str(args.seed),
               "--torch_threads", str(args.torch_threads)]
    if args.torch_channels_last:
        command.append("--torch_channels_last")
    if args.data_dir:
        command += ["--data_dir", args.data_dir]
    tt.log(f"memory probe {key} ...")
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        tt.log(f"memory probe {key} failed:\n{result.stderr[-2000:]}")
        return None
    return json.loads(result.stdout.strip().splitlines()[-1])


def timed_step(entry):
    start, cpu_start = time.perf_counter(), time.process_time()
    entry.step()
    entry.seconds.append(time.perf_counter() - start)
    entry.cpu_seconds.append(time.process_time() - cpu_start)


def let_frameworks_share_gpus():
    """TF grabs (nearly) all GPU memory by default, which would starve PyTorch in this process."""
    for gpu in tf.config.list_physical_devices("GPU"):
        tf.config.experimental.set_memory_growth(gpu, True)


def main(argv=None):
    args = parse_args(argv)
    let_frameworks_share_gpus()
    keras.utils.set_random_seed(args.seed)
    torch.manual_seed(args.seed)
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    if args.device == "cuda":
        torch.backends.cudnn.benchmark = True
    if args.memory_probe:
        return memory_probe(args, args.memory_probe)

    batch = Batch(*make_batch(args), args.device, args.torch_channels_last)
    load_before = os.getloadavg()
    run_start = time.perf_counter()
    entries, by_key, checks = [], {}, {}
    for method in args.methods:
        for framework in args.frameworks:
            tt.log(f"building {entry_name(framework, method)} ...")
            make = make_tf_entry if framework == "arat_tf" else make_torch_entry
            by_key[framework, method] = make(args, method, batch)
            entries.append(by_key[framework, method])
        if len(args.frameworks) == 2:
            tt.log(f"correctness check {LABELS[method]} ...")
            checks[method] = correctness_check(method, by_key["arat_tf", method],
                                               by_key["torch", method], batch, args.seed)

    tt.run_interleaved(entries, args.warmup, args.steps, args.repeats, timed=timed_step)
    timing_seconds = time.perf_counter() - run_start
    load_after = os.getloadavg()
    memory = {}
    if args.memory:
        memory = {key: measure_memory(args, f"{key[0]}:{key[1]}") for key in by_key}

    medians = {key: tt.median(entry.seconds) for key, entry in by_key.items()}
    cpu_medians = {key: tt.median(entry.cpu_seconds) for key, entry in by_key.items()}
    rows = []
    for key, entry in by_key.items():
        framework, method = key
        pgd = ("pgd_at" in args.methods and method == "arat")
        within = medians[key] / medians[framework, "pgd_at"] if pgd else None
        rows.append(dict(
            name=entry.name, framework=framework, method=method, description=entry.description,
            median_seconds=medians[key], min_seconds=min(entry.seconds), max_seconds=max(entry.seconds),
            images_per_second=args.batch_size / medians[key], median_cpu_seconds=cpu_medians[key],
            arat_vs_pgd_at=within, state_mib=entry.state_bytes / MIB, memory=memory.get(key),
            seconds=entry.seconds, cpu_seconds=entry.cpu_seconds, warmup_seconds=entry.warmup_seconds,
        ))

    info = dict(
        cpu_count=os.cpu_count(), cpus_usable=len(os.sched_getaffinity(0)),
        cpu=platform.processor() or platform.machine(), python=platform.python_version(),
        tensorflow=tf.__version__, keras=keras.__version__, torch=torch.__version__,
        tf_intra_op_threads=tf.config.threading.get_intra_op_parallelism_threads(),
        tf_inter_op_threads=tf.config.threading.get_inter_op_parallelism_threads(),
        tf_onednn_opts=os.environ.get("TF_ENABLE_ONEDNN_OPTS", "unset (TF's default: on, x86 Linux)"),
        tf_gpus=len(tf.config.list_logical_devices("GPU")),
        torch_threads=torch.get_num_threads(), torch_interop_threads=torch.get_num_interop_threads(),
        torch_mkldnn=torch.backends.mkldnn.is_available(), torch_device=args.device,
        torch_channels_last=args.torch_channels_last,
        openmp_environment={name: os.environ.get(name, "unset") for name in OPENMP_VARIABLES},
        width=args.width, batch_size=args.batch_size, attack_steps=args.attack_steps,
        warmup=args.warmup, steps=args.steps, repeats=args.repeats,
        data="cifar10 train, first batch" if args.data_dir else "fixed uniform random batch",
        load_average_before=load_before, load_average_after=load_after,
        timing_wall_seconds=timing_seconds,
    )

    print(f"\n## arat-tf vs PyTorch: ResNet-18 width {args.width}, batch {args.batch_size}, "
          f"PGD-{args.attack_steps}\n")
    if checks:
        print("Correctness (arat-tf weights copied into the PyTorch modules; max|a-b|/max|b| for "
              "logits and running stats, |a-b|/|b| for the loss, ||a-b||/||b|| for the update):")
        for method, report in checks.items():
            print_check(method, report)
        print()
    else:
        print("Correctness check skipped: it needs both --frameworks.\n")
    print("| entry | s/step (median; min, max) | images/s | process CPU s/step "
          "| ARAT / PGD-AT step | state | peak RSS growth (subprocess) |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        mem = row["memory"]
        mem_text = "-" if not mem else f"{mem['peak_mib']:.0f} MiB (build {mem['build_mib']:.0f})"
        if mem and "gpu_peak_mib" in mem:
            mem_text += f", GPU {mem['gpu_peak_mib']:.0f} MiB"
        print(f"| {row['name']} | {row['median_seconds']:.3f} ({row['min_seconds']:.3f}, "
              f"{row['max_seconds']:.3f}) | {row['images_per_second']:.1f} "
              f"| {row['median_cpu_seconds']:.3f} | {tt.fmt_ratio(row['arat_vs_pgd_at'])} "
              f"| {row['state_mib']:.1f} MiB | {mem_text} |")
    print()

    ratios = {}
    for method in args.methods:
        if len(args.frameworks) < 2:
            break
        ours, theirs = by_key["arat_tf", method], by_key["torch", method]
        value = medians["torch", method] / medians["arat_tf", method]
        paired = tt.paired_ratios(theirs, ours)
        cpu_value = cpu_medians["torch", method] / cpu_medians["arat_tf", method]
        ratios[method] = dict(ratio=value, paired_min=min(paired), paired_max=max(paired),
                              cpu_time_ratio=cpu_value)
        verdict = ""
        if method == "arat":
            ratios[method].update(target=TARGET, met=value >= TARGET)
            verdict = f" (target >= {TARGET}) {'OK' if value >= TARGET else 'MISSED'}"
        print(f"{LABELS[method]}: arat-tf / PyTorch images/s = {value:.3f}{verdict}  "
              f"[paired back-to-back {min(paired):.3f}..{max(paired):.3f}, n={len(paired)}; "
              f"process-CPU-time ratio {cpu_value:.3f}]")
    for row in rows:
        if row["arat_vs_pgd_at"] is not None:
            print(f"{LABELS[row['framework']]}: ARAT / PGD-AT step time = {row['arat_vs_pgd_at']:.3f}")
    print()
    print(f"Machine: {info['cpu_count']} CPUs ({info['cpus_usable']} usable, {info['cpu']}), "
          f"Python {info['python']}, TF {info['tensorflow']} (Keras {info['keras']}), torch {info['torch']}; "
          f"TF intra/inter-op threads {info['tf_intra_op_threads']}/{info['tf_inter_op_threads']} "
          f"(0 = auto), TF_ENABLE_ONEDNN_OPTS {info['tf_onednn_opts']}, TF GPUs {info['tf_gpus']}; "
          f"torch threads {info['torch_threads']}, interop {info['torch_interop_threads']}, "
          f"mkldnn {info['torch_mkldnn']}, device {args.device}, "
          + " ".join(f"{k}={v}" for k, v in info["openmp_environment"].items())
          + f"; load average "
          f"{load_before[0]:.2f} before, {load_after[0]:.2f} after; {timing_seconds:.0f}s build+check+timing.")
    print(f"Protocol: {info['data']}; warmup {args.warmup}, {args.steps} steps x {args.repeats} interleaved "
          f"rounds per entry (order reversed every other round). arat-tf's PGD-AT step also runs its "
          f"clean-accuracy inference pass and Keras metrics (as fit() does); PyTorch steps return loss.item().")
    print("Note: PyTorch's CPU build parallelises with OpenMP (libgomp), whose threads spin-wait at "
          "every barrier; on a machine where other processes keep the cores busy this can cost "
          "milliseconds per operator. OMP_WAIT_POLICY=PASSIVE (or --torch_threads 1) removes that; "
          "TF's own thread pool is not affected.")
    if args.memory:
        print("Peak RSS growth: in a separate subprocess per entry, VmHWM after warmup+1 steps minus "
              "the RSS after imports and the batch (high-water mark reset there): weights, optimizer "
              "state, activations, framework caches incl. TF's traced graphs, allocator slack; "
              "'build' = after building the entry (PyTorch allocates its momentum buffers at the first step).")
    for row in rows:
        print(f"  {row['name']}: {row['description']}; warmup " +
              ", ".join(f"{s:.1f}s" for s in row["warmup_seconds"]))

    if args.json_out:
        directory = os.path.dirname(os.path.abspath(args.json_out))
        os.makedirs(directory, exist_ok=True)
        with open(args.json_out, "w") as file:
            json.dump(dict(info=info, checks=checks, entries=rows, ratios=ratios), file, indent=2)
        tt.log(f"wrote {args.json_out}")


if __name__ == "__main__":
    main()

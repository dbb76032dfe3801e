"""TrainConfig: every hyperparameter of a training run, its spec default and its validation.

One source of truth: `arat_tf.flags` turns these fields into absl flags (same names, defaults,
help and choices), `arat_tf.training.train` consumes a `TrainConfig`, and the tuner overrides fields
of one. Values spelled "auto" resolve to the method's protocol (see `arat_tf.methods.METHOD_DEFAULTS`)
in `resolve()`.
"""

import dataclasses
import math

from arat_tf.attacks import ATTACK_LOSSES
from arat_tf.attacks.parts import NORMS
from arat_tf.distribution import STRATEGIES
from arat_tf.data import AUGMENTATIONS, SUPPORTED_DATASETS
from arat_tf.layers import BN_MODES
from arat_tf.methods import METHOD_DEFAULTS, METHODS
from arat_tf.models import MODELS
from arat_tf.models.branched_classifier import CONV_PADDINGS
from arat_tf.precision import MIXED_PRECISION_POLICIES
from arat_tf.schedules import LEARNING_RATE_SCHEDULES

AUTO = "auto"


def _field(default, help, choices=None):
    metadata = {"help": help}
    if choices is not None:
        metadata["choices"] = tuple(choices)
    return dataclasses.field(default=default, metadata=metadata)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """A training run. Defaults: the ARAT paper's CIFAR-10 ResNet-18 recipe (docs/method.md, 1)."""

    # Data.
    dataset: str = _field("cifar10", "TFDS dataset.", SUPPORTED_DATASETS)
    data_dir: str = _field("", "TFDS data dir (empty: TFDS' default ~/tensorflow_datasets).")
    download: bool = _field(False, "Let TFDS download the dataset if it is not in --data_dir.")
    train_split: str = _field("train", "TFDS split to train on, e.g. 'train' or 'train[:45000]'.")
    val_split: str = _field("test", "TFDS split for the per-epoch validation, e.g. 'train[45000:]'.")
    train_subset: int = _field(0, "Train on the first N examples of --train_split (0: all).")
    val_subset: int = _field(1000, "Validate on the first N examples of --val_split (0: all).")
    batch_size: int = _field(128, "Global training batch size.")
    eval_batch_size: int = _field(256, "Global validation batch size.")
    augmentation: str = _field(AUTO, "Training augmentation ('auto': the dataset's default).",
                               (AUTO,) + AUGMENTATIONS)
    # Model.
    model: str = _field("resnet", "Architecture.", MODELS)
    depth: int = _field(0, "Depth: resnet/preact_resnet 10/18/34, wide_resnet 6n+4 (0: 18 / 34).")
    width: float = _field(1.0, "Channel multiplier (wide_resnet: the widen factor, e.g. 10).")
    bn_mode: str = _field(AUTO, "Normalisation variant ('auto': the method's).", (AUTO,) + BN_MODES)
    synchronized_bn: bool = _field(False, "Synchronise BN batch statistics across replicas.")
    conv_padding: str = _field("torch", "Padding of strided convolutions: 'torch' (symmetric, as "
                                        "PyTorch and the papers' code) or 'tf_same' (TensorFlow's "
                                        "'same', as arat_tf 0.1 models).", CONV_PADDINGS)
    init_from: str = _field("", "Start from the weights of this .keras model, or of a directory "
                                "holding model.keras (and ARAT's predictor_heads.npz), e.g. one "
                                "written by arat_tf.import_torch; the optimizer starts fresh.")
    # Method and attacks.
    method: str = _field("arat", "Training method.", METHODS)
    eps: float = _field(8 / 255, "Perturbation budget of the training and validation attacks "
                                 "(fractions such as 8/255 are accepted).")
    attack_norm: str = _field("linf", "Threat model of the training attack.", NORMS)
    attack_steps: int = _field(10, "PGD steps of the training attack.")
    attack_step_size: float = _field(2 / 255, "PGD step size of the training attack.")
    attack_loss: str = _field("ce", "Loss maximised by the training attack (TRADES always uses KL).",
                              tuple(ATTACK_LOSSES))
    attack_start: str = _field(AUTO, "Start of the training attack ('auto': the method's).",
                               (AUTO, "uniform", "gaussian", "zero"))
    attack_bn_mode: str = _field(AUTO, "BN mode during the training attack: 'train' (ARAT authors) or"
                                       " 'inference' (community); 'auto': the method's.",
                                 (AUTO, "train", "inference"))
    val_attack_steps: int = _field(10, "PGD steps of the per-epoch validation attack.")
    val_attack_step_size: float = _field(2 / 255, "PGD step size of the validation attack.")
    eval_branch: str = _field("adv", "BN branch of every reported number (ARAT: adv).", ("adv", "clean"))
    # ARAT.
    invariance_weight: float = _field(30.0, "ARAT gamma (30 for ResNet-18, 100 for WRN-34-10).")
    invariance: str = _field("asymmetric", "ARAT invariance: asymmetric (stop-gradient on clean) or the "
                                           "symmetric ablation.", ("asymmetric", "symmetric"))
    use_predictor: bool = _field(True, "ARAT predictor head on the adversarial side.")
    predictor_hidden_ratio: float = _field(0.25, "Predictor hidden width / tap width.")
    invariance_distance: str = _field("cos", "ARAT invariance distance.", ("cos", "mse"))
    ce_weights: str = _field("auto", "ARAT CE weights: 'auto' (w_adv = clean-branch accuracy each "
                                     "epoch) or 'fixed' (--adv_ce_weight/--clean_ce_weight).",
                             ("auto", "fixed"))
    adv_ce_weight: float = _field(1.0, "Fixed ARAT weight of the adversarial CE.")
    clean_ce_weight: float = _field(1.0, "Fixed ARAT weight of the clean CE.")
    auto_balance_examples: int = _field(1024, "Training images measured by the CE auto-balance.")
    auto_balance_sample: str = _field("fresh", "Which training images the CE auto-balance measures: "
                                               "'fresh' (the first batches of a freshly shuffled, "
                                               "augmented pass each epoch, as the authors' code) or "
                                               "'fixed' (the first --auto_balance_examples images, "
                                               "unaugmented, every epoch).", ("fresh", "fixed"))
    # Baselines.
    trades_beta: float = _field(6.0, "TRADES beta.")
    mart_beta: float = _field(5.0, "MART beta (5 for ResNet-18, 6 for WRN).")
    hybrid_clean_weight: float = _field(0.5, "Hybrid / Cross-AT weight of the clean CE.")
    # Optimisation.
    epochs: int = _field(100, "Training epochs.")
    learning_rate: float = _field(0.1, "Base learning rate.")
    momentum: float = _field(0.9, "SGD momentum (PyTorch form).")
    weight_decay: float = _field(5e-4, "Coupled (PyTorch-style L2) weight decay on all variables.")
    lr_schedule: str = _field(AUTO, "Learning-rate schedule ('auto': the method's paper).",
                              (AUTO,) + LEARNING_RATE_SCHEDULES)
    swa: bool = _field(False, "ARAT+SWA: average weights from --swa_start_epoch, refresh adv BN stats.")
    swa_start_epoch: int = _field(76, "First (1-based) epoch of weight averaging, for 100 epochs.")
    swa_every: int = _field(500, "Average the weights every N training iterations.")
    # Run.
    run_dir: str = _field("runs/default", "Run directory (flags, logs, checkpoints, model).")
    resume: bool = _field(False, "Resume from the last checkpoint in --run_dir.")
    seed: int = _field(0, "Random seed.")
    verbose: int = _field(1, "Keras verbosity: 0 silent, 1 progress bar, 2 one line per epoch.", None)
    jit_compile: bool = _field(False, "Compile the whole train step (attack included) with XLA.")
    mixed_precision: str = _field("off", "Compute the classifier's convolutions and dense layers in "
                                         "16 bits (Keras dtype policy): off, mixed_float16 (with "
                                         "loss scaling) or mixed_bfloat16. BN, predictor heads, "
                                         "losses, attacks and variables stay float32.",
                                  MIXED_PRECISION_POLICIES)
    analyze_every_steps: int = _field(0, "Every N training steps, write the gradient-conflict and "
                                         "mixture analyses of one fixed batch of training images "
                                         "to run_dir/analysis/step_<k>.json (0: off).")
    # Distribution.
    strategy: str = _field("default", "Distribution strategy: default (one device), mirrored (all "
                                      "local GPUs, or --cpu_replicas logical CPUs) or multi_worker "
                                      "(MultiWorkerMirroredStrategy from TF_CONFIG). --batch_size "
                                      "is the global batch, split evenly over the replicas.",
                           STRATEGIES)
    cpu_replicas: int = _field(0, "With --strategy=mirrored: N >= 1 replicas on N logical CPU "
                                  "devices (for testing); 0: all local GPUs.")

    def __post_init__(self):
        errors = []
        for field in dataclasses.fields(self):
            choices = field.metadata.get("choices")
            value = getattr(self, field.name)
            if choices is not None and value not in choices:
                errors.append(f"--{field.name}={value!r} is not one of {', '.join(choices)}")
        positive_ints = ("batch_size", "eval_batch_size", "attack_steps", "val_attack_steps",
                         "epochs", "auto_balance_examples", "swa_every", "swa_start_epoch")
        for name in positive_ints:
            if getattr(self, name) < 1:
                errors.append(f"--{name} must be >= 1, got {getattr(self, name)}")
        for name in ("train_subset", "val_subset", "depth", "analyze_every_steps"):
            if getattr(self, name) < 0:
                errors.append(f"--{name} must be >= 0, got {getattr(self, name)}")
        non_negative = ("eps", "attack_step_size", "val_attack_step_size", "invariance_weight",
                        "adv_ce_weight", "clean_ce_weight", "trades_beta", "mart_beta", "weight_decay")
        for name in non_negative:
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                errors.append(f"--{name} must be a finite number >= 0, got {value}")
        for name in ("learning_rate", "width", "predictor_hidden_ratio"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                errors.append(f"--{name} must be > 0, got {value}")
        if not 0 <= self.momentum < 1:
            errors.append(f"--momentum must be in [0, 1), got {self.momentum}")
        if not 0 <= self.hybrid_clean_weight <= 1:
            errors.append(f"--hybrid_clean_weight must be in [0, 1], got {self.hybrid_clean_weight}")
        if self.verbose not in (0, 1, 2):
            errors.append(f"--verbose must be 0, 1 or 2, got {self.verbose}")
        if self.method == "cross_at" and not self.bn_mode.startswith(("cross_", AUTO)):
            errors.append(f"--method=cross_at needs a cross_* --bn_mode, got {self.bn_mode!r}")
        if self.method != "cross_at" and self.bn_mode.startswith("cross_"):
            errors.append(f"--bn_mode={self.bn_mode} only applies to --method=cross_at")
        if self.method in ("pgd_at", "trades", "mart") and self.bn_mode not in (AUTO, "single"):
            errors.append(f"--method={self.method} trains one branch: use --bn_mode=single, "
                          f"got {self.bn_mode!r}")
        if self.eps > 0 and self.attack_step_size == 0:
            errors.append("--attack_step_size must be > 0 when --eps > 0")
        if self.swa and self.swa_start_epoch > self.epochs:
            errors.append(f"--swa_start_epoch={self.swa_start_epoch} is after the last epoch "
                          f"(--epochs={self.epochs})")
        if self.cpu_replicas < 0:
            errors.append(f"--cpu_replicas must be >= 0, got {self.cpu_replicas}")
        elif self.cpu_replicas and self.strategy != "mirrored":
            errors.append(f"--cpu_replicas only applies to --strategy=mirrored, got "
                          f"--strategy={self.strategy}")
        elif self.cpu_replicas and self.batch_size % self.cpu_replicas:
            errors.append(f"--batch_size={self.batch_size} (the global batch) must be divisible by "
                          f"the number of replicas (--cpu_replicas={self.cpu_replicas})")
        if not self.run_dir:
            errors.append("--run_dir must not be empty")
        if errors:
            raise ValueError("Invalid configuration: " + "; ".join(errors) + ".")

    def resolve(self):
        """Returns a copy with every "auto" replaced by the method's protocol default."""
        defaults = METHOD_DEFAULTS[self.method]
        updates = {}
        for name in ("bn_mode", "attack_bn_mode", "attack_start", "lr_schedule"):
            if getattr(self, name) == AUTO:
                updates[name] = getattr(defaults, name)
        if self.augmentation == AUTO:
            updates["augmentation"] = SUPPORTED_DATASETS[self.dataset].augmentation
        return dataclasses.replace(self, **updates)

    def replace(self, **changes):
        """`dataclasses.replace`, validated."""
        return dataclasses.replace(self, **changes)


def config_fields():
    """The `dataclasses.Field`s of TrainConfig, in definition order."""
    return dataclasses.fields(TrainConfig)

"""The ARAT authors' PyTorch models (github.com/futakw/AR-AT) and arat_tf's, weight for weight.

The authors' `save_checkpoint` writes the `state_dict()` of their split-BN CIFAR ResNet-18
(`cifar_resnet18_split_bn`) or WRN-34-10 (`cifar_wrn_34_10_split_bn`): keys without a prefix
(`conv1.weight`, `layer2.0.shortcut_bn.adv.running_var`, `block3.layer.0.convShortcut.weight`,
...), or with DataParallel's `module.` prefix when saved from a multi-GPU run (or the
`model.` prefix of their feature-extractor wrapper). Every BatchNorm
exists once per branch (`<site>.clean.*` / `<site>.adv.*`; older runs name them `base` /
`base_adv`), convolution and linear weights are shared. Their predictor heads are saved apart
(`<tap>.predictor_x.<i>.*`, one head per aligned layer).

This module maps each of those keys to the arat_tf variable that plays the same role, in the
same architecture built with PyTorch's padding (`conv_padding="torch"`), so that the same weights
give the same logits. Layouts: torch convolution kernels are OIHW (arat_tf: HWIO), linear
weights (out, in) (arat_tf: (in, out)). `num_batches_tracked` has no arat_tf counterpart (it only
matters to PyTorch's cumulative-average BN, which neither code base uses) and is skipped.
"""

import collections

import numpy as np

from arat_tf.layers import SplitBatchNormalization
from arat_tf.models import ResNet, WideResNet, build_model

# The authors' `--bn_names`: the clean branch first. ARAT's scripts use "clean,adv"; the
# argument's default (older checkpoints) is "base,base_adv".
BRANCH_NAME_PAIRS = (("clean", "adv"), ("base", "base_adv"))
BN_FIELDS = (("weight", "gamma"), ("bias", "beta"), ("running_mean", "moving_mean"),
             ("running_var", "moving_variance"))
WRAPPER_PREFIXES = ("module.", "model.")
SKIPPED_SUFFIX = ".num_batches_tracked"
RESNET_DEPTHS = {(1, 1, 1, 1): 10, (2, 2, 2, 2): 18, (3, 4, 6, 3): 34}


class CheckpointLayoutError(ValueError):
    """A state dict does not fit the model: unknown, missing or misshapen keys, or not split BN."""


def _conv_from_torch(array):
    return np.transpose(array, (2, 3, 1, 0))


def _conv_to_torch(array):
    return np.transpose(array, (3, 2, 0, 1))


def _identity(array):
    return array


def _transpose(array):
    return np.transpose(array)


def strip_wrapper_prefixes(state_dict):
    """The state dict without DataParallel's `module.` prefix and the authors' feature-extractor
    wrapper's `model.` prefix (each removed when every key has it; their own `eval.py` strips
    `model.` the same way)."""
    state_dict = collections.OrderedDict(state_dict)
    for prefix in WRAPPER_PREFIXES:
        if state_dict and all(key.startswith(prefix) for key in state_dict):
            state_dict = collections.OrderedDict(
                (key[len(prefix):], value) for key, value in state_dict.items())
    return state_dict


def branch_names(state_dict):
    """`(clean, adv)` BN branch names used by the keys of `state_dict`.

    Raises:
        CheckpointLayoutError: the BatchNorms are not split (e.g. `bn1.weight`).
    """
    for clean, adv in BRANCH_NAME_PAIRS:
        if any(f".{adv}." in key for key in state_dict):
            return clean, adv
    single = next((key for key in state_dict if key.endswith("running_mean")), None)
    raise CheckpointLayoutError(
        f"Not a split-BN checkpoint: BatchNorm key {single!r} belongs to no branch (split-BN "
        f"checkpoints of the ARAT code have '<site>.clean.*' and '<site>.adv.*' keys, e.g. "
        f"'bn1.adv.running_mean')." if single else
        "Not a split-BN checkpoint: it holds no BatchNorm running statistics."
    )


def official_layers(classifier):
    """`{official module name: arat_tf layer}` of a `ResNet` or `WideResNet` classifier.

    Raises:
        CheckpointLayoutError: another architecture (the authors released these two).
    """
    if isinstance(classifier, ResNet):
        layers = {"conv1": classifier.stem_conv, "bn1": classifier.stem_bn,
                  "linear": classifier.classifier}
        parts = (("conv1", "conv1"), ("bn1", "bn1"), ("conv2", "conv2"), ("bn2", "bn2"),
                 ("shortcut", "shortcut_conv"), ("shortcut_bn", "shortcut_bn"))
        for block in classifier.blocks:
            stage, index = block.name[len("block"):].split(".")
            for official, ours in parts:
                layer = getattr(block, ours, None)
                if layer is not None:
                    layers[f"layer{stage}.{index}.{official}"] = layer
        return layers
    if isinstance(classifier, WideResNet):
        layers = {"conv1": classifier.stem_conv, "bn1": classifier.final_bn,
                  "fc": classifier.classifier}
        parts = (("bn1", "bn1"), ("conv1", "conv1"), ("bn2", "bn2"), ("conv2", "conv2"),
                 ("convShortcut", "shortcut_conv"))
        for block in classifier.blocks:
            group, index = block.name[len("group"):].split(".")
            for official, ours in parts:
                layer = getattr(block, ours, None)
                if layer is not None:
                    layers[f"block{group}.layer.{index}.{official}"] = layer
        return layers
    raise CheckpointLayoutError(
        f"The ARAT authors' checkpoints are split-BN CIFAR ResNets and WideResNets; "
        f"{type(classifier).__name__} has no official counterpart."
    )


def official_tap_names(classifier):
    """`{official aligned-layer name: arat_tf tap name}` (e.g. layer4.0.bn1 -> block4.0.bn1)."""
    names = {}
    for tap in classifier.tap_names:
        if tap == "penultimate":
            names["avgpool"] = tap
        elif isinstance(classifier, ResNet):
            names["layer" + tap[len("block"):]] = tap
        else:
            group, index, activation = tap[len("group"):].split(".")
            names[f"block{group}.layer.{index}.{activation}"] = tap
    return names


def _layer_entries(prefix, layer, branches):
    """`{key: (variable, from_torch, to_torch)}` of one official module."""
    if isinstance(layer, SplitBatchNormalization):
        entries = {}
        for branch, official_branch in zip(("clean", "adv"), branches):
            gamma, beta = layer.affine_parameters(branch)
            mean, variance = layer.moving_statistics(branch)
            site = f"{prefix}.{official_branch}." if official_branch else f"{prefix}."
            for (name, _), variable in zip(BN_FIELDS, (gamma, beta, mean, variance)):
                entries[site + name] = (variable, _identity, _identity)
        return entries
    if len(layer.kernel.shape) == 4:
        return {f"{prefix}.weight": (layer.kernel, _conv_from_torch, _conv_to_torch)}
    entries = {f"{prefix}.weight": (layer.kernel, _transpose, _transpose)}
    if layer.use_bias:
        entries[f"{prefix}.bias"] = (layer.bias, _identity, _identity)
    return entries


def model_entries(classifier, branches=BRANCH_NAME_PAIRS[0]):
    """`{official key: (variable, from_torch, to_torch)}` for every variable of `classifier`.

    Raises:
        CheckpointLayoutError: the classifier has no separate clean/adversarial BN (statistics
            and affine: `bn_mode="dual"`), or no official counterpart.
    """
    if classifier.bn_mode != "dual":
        raise CheckpointLayoutError(
            f"The ARAT checkpoints have split BN (separate statistics and affine per branch): "
            f"build the model with bn_mode='dual', not {classifier.bn_mode!r}."
        )
    entries = collections.OrderedDict()
    for prefix, layer in official_layers(classifier).items():
        entries.update(_layer_entries(prefix, layer, branches))
    return entries


def predictor_entries(predictors, tap_names):
    """`{official key: (variable, from_torch, to_torch)}` of ARAT's predictor heads.

    Args:
        predictors: `{arat_tf tap name: Predictor}` (an `AratTrainer`'s `predictors`).
        tap_names: `official_tap_names(classifier)`.
    """
    entries = collections.OrderedDict()
    for official, tap in tap_names.items():
        head = predictors[tap]
        prefix = f"{official}.predictor_x"
        entries.update(_layer_entries(f"{prefix}.0", head.hidden_dense, ()))
        entries.update(_layer_entries(f"{prefix}.1", head.hidden_norm, (None, None)))
        entries.update(_layer_entries(f"{prefix}.3", head.output_dense, ()))
    return entries


def _assign(entries, state_dict, what):
    """Checks `state_dict` against `entries` (keys and shapes) and then assigns every value."""
    given = {key: value for key, value in state_dict.items() if not key.endswith(SKIPPED_SUFFIX)}
    unknown = [key for key in given if key not in entries]
    missing = [key for key in entries if key not in given]
    if unknown or missing:
        details = []
        if unknown:
            details.append(f"{len(unknown)} unknown key(s), first {unknown[:3]}")
        if missing:
            details.append(f"{len(missing)} missing key(s), first {missing[:3]}")
        raise CheckpointLayoutError(f"The {what} does not fit the model: {'; '.join(details)}.")
    values = []
    for key, (variable, from_torch, to_torch) in entries.items():
        value = np.asarray(given[key])
        expected = to_torch(np.zeros(variable.shape)).shape
        if value.shape != expected:
            raise CheckpointLayoutError(
                f"{what}: {key!r} has shape {list(value.shape)}, the model expects "
                f"{list(expected)} (PyTorch layout)."
            )
        if not np.issubdtype(value.dtype, np.floating):
            raise CheckpointLayoutError(f"{what}: {key!r} holds {value.dtype}, not floats.")
        values.append((variable, from_torch(value).astype(variable.dtype)))
    for variable, value in values:  # only once every key has been checked: all or nothing
        variable.assign(value)


def load_official_weights(classifier, state_dict):
    """Sets every variable of `classifier` (both BN branches) from the authors' model state dict.

    Args:
        classifier: a `ResNet` or `WideResNet` with `bn_mode="dual"` and `conv_padding="torch"`,
            of the checkpoint's depth and width (see `infer_architecture`).
        state_dict: `{key: numpy array}` as `arat_tf.interop.torch_checkpoint.read_state_dict`
            returns it (`module.` and `model.` prefixes are accepted).

    Raises:
        CheckpointLayoutError: unknown or missing keys, a wrong shape, or a non-split model;
            the message names the key. Nothing is assigned unless everything fits.
    """
    state_dict = strip_wrapper_prefixes(state_dict)
    entries = model_entries(classifier, branch_names(state_dict))
    _assign(entries, state_dict, "model checkpoint")


def load_official_predictors(predictors, classifier, state_dict):
    """Sets ARAT's predictor heads from the authors' predictor state dict
    (`<aligned layer>.predictor_x.<i>.<name>`, e.g. `layer4.0.bn1.predictor_x.0.weight`).

    Raises:
        CheckpointLayoutError: as `load_official_weights`.
    """
    state_dict = strip_wrapper_prefixes(state_dict)
    entries = predictor_entries(predictors, official_tap_names(classifier))
    _assign(entries, state_dict, "predictor checkpoint")


def official_state_dict(classifier, predictors=None):
    """The inverse: arat_tf weights as the authors' `{key: numpy array}` (torch layouts)."""
    entries = model_entries(classifier)
    if predictors is not None:
        entries.update(predictor_entries(predictors, official_tap_names(classifier)))
    return collections.OrderedDict(
        (key, to_torch(np.asarray(variable))) for key, (variable, _, to_torch) in entries.items())


def _count_blocks(state_dict, pattern_prefix, index_position):
    counts = collections.Counter()
    for key in state_dict:
        parts = key.split(".")
        if key.startswith(pattern_prefix) and len(parts) > index_position:
            counts[(parts[0], parts[index_position])] += 1
    blocks = collections.defaultdict(set)
    for stage, index in counts:
        blocks[stage].add(index)
    return {stage: len(indices) for stage, indices in blocks.items()}


def infer_architecture(state_dict):
    """`build_model` arguments of the authors' model a state dict belongs to.

    Returns:
        `{"model": "resnet" | "wide_resnet", "depth": int, "width": float, "num_classes": int}`.

    Raises:
        CheckpointLayoutError: neither the split-BN CIFAR ResNet nor the WideResNet layout.
    """
    state_dict = strip_wrapper_prefixes(state_dict)
    branch_names(state_dict)
    try:
        if "linear.weight" in state_dict and "layer1.0.conv1.weight" in state_dict:
            blocks = _count_blocks(state_dict, "layer", 1)
            stages = tuple(blocks.get(f"layer{s}", 0) for s in (1, 2, 3, 4))
            if stages not in RESNET_DEPTHS:
                raise CheckpointLayoutError(
                    f"ResNet checkpoint with {stages} blocks per stage: arat_tf builds ResNet-10, "
                    f"-18 and -34 ({sorted(RESNET_DEPTHS.values())}).")
            return {"model": "resnet", "depth": RESNET_DEPTHS[stages],
                    "width": state_dict["conv1.weight"].shape[0] / 64.0,
                    "num_classes": int(state_dict["linear.weight"].shape[0])}
        if "fc.weight" in state_dict and "block1.layer.0.conv1.weight" in state_dict:
            blocks = _count_blocks(state_dict, "block", 2)
            per_group = {blocks.get(f"block{g}", 0) for g in (1, 2, 3)}
            if len(per_group) != 1:
                raise CheckpointLayoutError(
                    f"WideResNet checkpoint with unequal groups {sorted(blocks.items())}.")
            return {"model": "wide_resnet", "depth": 6 * per_group.pop() + 4,
                    "width": state_dict["block1.layer.0.conv1.weight"].shape[0] / 16.0,
                    "num_classes": int(state_dict["fc.weight"].shape[0])}
    except (AttributeError, IndexError) as error:
        raise CheckpointLayoutError(f"Malformed checkpoint: {error}") from None
    first = next(iter(state_dict), None)
    raise CheckpointLayoutError(
        f"Unknown checkpoint layout (first key {first!r}): expected the ARAT authors' split-BN "
        f"CIFAR ResNet ('conv1.weight', 'layer1.0.conv1.weight', ..., 'linear.weight') or "
        f"WideResNet ('block1.layer.0.conv1.weight', ..., 'fc.weight')."
    )


def classifier_from_state_dict(state_dict, image_shape=(32, 32, 3)):
    """Builds the arat_tf classifier of the authors' model state dict and loads it.

    Args:
        state_dict: the authors' model `{key: numpy array}`.
        image_shape: `(H, W, C)` of the inputs (CIFAR's by default).

    Returns:
        `(classifier, architecture)`: a `ResNet` / `WideResNet` with split BN (`bn_mode="dual"`)
        and PyTorch padding holding the checkpoint's weights, and `infer_architecture`'s dict.

    Raises:
        CheckpointLayoutError: see `infer_architecture` and `load_official_weights`.
    """
    architecture = infer_architecture(state_dict)
    classifier = build_model(
        architecture["model"], num_classes=architecture["num_classes"], image_shape=image_shape,
        bn_mode="dual", depth=architecture["depth"], width=architecture["width"],
    )
    load_official_weights(classifier, state_dict)
    return classifier, architecture

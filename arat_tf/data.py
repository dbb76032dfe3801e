"""TFDS input pipelines for adversarial training: loading, augmentation, batching.

Images come out as float32 in [0, 1], the box adversarial attacks clip to, so that epsilon is measured in
pixel space; any normalisation belongs inside the model.
"""

import dataclasses

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """Static facts about a supported dataset; `augmentation` is its default training augmentation."""

    name: str
    num_classes: int
    image_shape: tuple
    augmentation: str


# SVHN gets "crop" only: a mirrored digit is a different (or no) digit, so flipping would corrupt labels.
# MNIST-style digits/clothes are centred on a blank canvas and are conventionally trained without augmentation.
SUPPORTED_DATASETS = {
    "cifar10": DatasetSpec("cifar10", 10, (32, 32, 3), "crop_flip"),
    "cifar100": DatasetSpec("cifar100", 100, (32, 32, 3), "crop_flip"),
    "svhn_cropped": DatasetSpec("svhn_cropped", 10, (32, 32, 3), "crop"),
    "mnist": DatasetSpec("mnist", 10, (28, 28, 1), "none"),
    "fashion_mnist": DatasetSpec("fashion_mnist", 10, (28, 28, 1), "none"),
}

AUGMENTATIONS = ("crop_flip", "crop", "none")

# A split string "tfrecord:<path>" names a split materialised by `serialize_example` (the pipeline's
# ExampleGen) instead of a TFDS split, so training, tuning and evaluation read the very examples a
# pipeline versioned. The images stay uint8, exactly as TFDS yields them.
TFRECORD_SPLIT_PREFIX = "tfrecord:"


class DatasetNotAvailableError(FileNotFoundError):
    """The dataset is not prepared in the data dir and could not (or may not) be downloaded."""


def dataset_spec(name):
    """Returns the `DatasetSpec` of a supported dataset.

    Args:
        name: TFDS dataset name, e.g. "cifar10".

    Returns:
        The `DatasetSpec`.

    Raises:
        ValueError: `name` is not supported; the message lists the supported names.

    Example:
        >>> dataset_spec("cifar10").num_classes
        10
    """
    if name not in SUPPORTED_DATASETS:
        raise ValueError(f"Unknown dataset {name!r}; supported datasets: {', '.join(SUPPORTED_DATASETS)}.")
    return SUPPORTED_DATASETS[name]


def _check_subset(subset):
    if subset is not None and (isinstance(subset, bool) or int(subset) != subset or subset < 1):
        raise ValueError(f"subset must be an integer >= 1 or None, got {subset!r}.")


def serialize_example(image, label):
    """One uint8 (H, W, C) image and its label as a serialised `tf.train.Example` (raw bytes).

    The format read back by a "tfrecord:<path>" split (see `TFRECORD_SPLIT_PREFIX`).

    Example:
        >>> writer.write(serialize_example(np.zeros((32, 32, 3), np.uint8), 3))
    """
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3:
        raise ValueError(f"serialize_example expects a uint8 (H, W, C) image, received "
                         f"{image.dtype.name} of shape {image.shape}.")
    feature = {
        "image": tf.train.Feature(bytes_list=tf.train.BytesList(value=[image.tobytes()])),
        "label": tf.train.Feature(int64_list=tf.train.Int64List(value=[int(label)])),
    }
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


def _read_tfrecord_split(path, spec):
    """(uint8 image, int64 label) pairs of a file written with `serialize_example`."""
    if not tf.io.gfile.exists(path):
        raise DatasetNotAvailableError(f"Materialised split {path!r} does not exist.")
    features = {"image": tf.io.FixedLenFeature([], tf.string),
                "label": tf.io.FixedLenFeature([], tf.int64)}

    def parse(record):
        parsed = tf.io.parse_single_example(record, features)
        image = tf.reshape(tf.io.decode_raw(parsed["image"], tf.uint8), spec.image_shape)
        return image, parsed["label"]

    records = tf.data.TFRecordDataset(path)
    # Reading the raw records is cheap; a known size gives steps per epoch like a TFDS split.
    count = int(records.reduce(tf.constant(0, tf.int64), lambda n, _: n + 1))
    records = records.apply(tf.data.experimental.assert_cardinality(count))
    return records.map(parse, num_parallel_calls=tf.data.AUTOTUNE)


def load_raw_split(name, split, *, data_dir=None, download=False, subset=None):
    """Like `load_split` but the images stay uint8 (0-255), as stored: for materialising splits."""
    return _load_raw(name, split, data_dir, download, subset)


def _load_raw(name, split, data_dir, download, subset):
    """Loads (uint8 image, label) pairs after checking that the data is there and has the spec's shape."""
    spec = dataset_spec(name)
    _check_subset(subset)
    if split.startswith(TFRECORD_SPLIT_PREFIX):
        ds = _read_tfrecord_split(split[len(TFRECORD_SPLIT_PREFIX):], spec)
        return ds.take(int(subset)) if subset is not None else ds
    builder = tfds.builder(name, data_dir=data_dir)
    searched = data_dir if data_dir is not None else tfds.core.constants.DATA_DIR
    if not builder.is_prepared():
        fix = (f"Expected the prepared data at {builder.data_dir}. Pass --data_dir pointing at a prepared TFDS "
               f"dir (e.g. ../shared/datasets/tfds), or allow downloads with --download.")
        if not download:
            raise DatasetNotAvailableError(f"Dataset {name!r} is not prepared in data_dir {searched!r}. {fix}")
        try:
            builder.download_and_prepare()
        except Exception as e:
            raise DatasetNotAvailableError(
                f"Dataset {name!r} is not prepared in data_dir {searched!r} and downloading it failed ({e}). {fix}"
            ) from e
    ds = builder.as_dataset(split=split, as_supervised=True, shuffle_files=False)
    got = ds.element_spec[0].shape
    if not got.is_compatible_with(spec.image_shape):
        raise ValueError(f"Dataset {name!r} images have shape {tuple(got)}, expected {spec.image_shape}.")
    if subset is not None:
        ds = ds.take(int(subset))
    return ds


def _to_float(image, label, image_shape):
    image = tf.ensure_shape(image, image_shape)
    return tf.image.convert_image_dtype(image, tf.float32), tf.cast(label, tf.int32)


def load_split(name, split, *, data_dir=None, download=False, subset=None):
    """Loads one split as unbatched (image, label) pairs.

    `subset` keeps the FIRST examples of the split, in file order and before any shuffling, so that small
    debugging or smoke-test runs see the same examples every time.

    Args:
        name: Supported TFDS dataset name.
        split: Any TFDS split string, e.g. "train", "test", "train[:45000]".
        data_dir: TFDS data dir; None means the TFDS default (~/tensorflow_datasets).
        download: Whether to download and prepare the dataset if it is missing.
        subset: If given, keep only the first `subset` (>= 1) examples.

    Returns:
        A `tf.data.Dataset` of (float32 image in [0, 1] with the spec's shape, int32 scalar label).

    Raises:
        DatasetNotAvailableError: The dataset is not prepared and `download` is False or failed.
        ValueError: Unknown dataset, bad `subset`, or images whose shape differs from the spec.

    Example:
        >>> ds = load_split("cifar10", "test", data_dir="../shared/datasets/tfds", subset=8)
    """
    spec = dataset_spec(name)
    ds = _load_raw(name, split, data_dir, download, subset)
    return ds.map(lambda x, y: _to_float(x, y, spec.image_shape), num_parallel_calls=tf.data.AUTOTUNE)


def augment(image, label, *, mode, pad=4):
    """Applies a standard training augmentation to one (H, W, C) image.

    The crop pads with zeros rather than reflecting, matching the usual CIFAR adversarial-training recipe.
    Randomness comes from `tf.random`-backed `tf.image` ops, so it works eagerly and inside `tf.data.map`
    or `tf.function` and follows `keras.utils.set_random_seed`.

    Args:
        image: Float image tensor of shape (H, W, C).
        label: Label, passed through unchanged.
        mode: "crop_flip" (pad-and-crop, then random horizontal flip), "crop" (pad-and-crop), or "none".
        pad: Pixels of zero padding on each side before cropping back to H x W.

    Returns:
        The (augmented image, label) pair; the image keeps its shape and dtype.

    Raises:
        ValueError: Unknown `mode`.

    Example:
        >>> ds = ds.map(lambda x, y: augment(x, y, mode="crop_flip"))
    """
    if mode not in AUGMENTATIONS:
        raise ValueError(f"Unknown augmentation mode {mode!r}; expected one of {AUGMENTATIONS}.")
    if mode == "none":
        return image, label
    padded = tf.pad(image, [[pad, pad], [pad, pad], [0, 0]])
    out = tf.image.random_crop(padded, tf.shape(image))
    if mode == "crop_flip":
        out = tf.image.random_flip_left_right(out)
    return tf.ensure_shape(out, image.shape), label


def _check_batch_size(batch_size):
    if isinstance(batch_size, bool) or int(batch_size) != batch_size or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}.")


def make_train_dataset(name, *, batch_size, data_dir=None, split="train", subset=None, augmentation=None,
                       shuffle_buffer=10_000, seed=None, download=False, drop_remainder=True):
    """Builds the shuffled, augmented, batched training pipeline.

    The raw uint8 images are cached (4x smaller than float32), reshuffled every epoch, then converted and
    augmented per example so each epoch sees fresh crops/flips. `drop_remainder=True` keeps batch shapes
    static, which avoids retracing and keeps per-replica batches equal under `tf.distribute`.

    Args:
        name: Supported TFDS dataset name.
        batch_size: Examples per batch (>= 1).
        data_dir: TFDS data dir; None means the TFDS default.
        split: TFDS split string.
        subset: If given, train on the first `subset` examples only (see `load_split`).
        augmentation: "crop_flip", "crop", "none", or None for the dataset's default.
        shuffle_buffer: Shuffle buffer size.
        seed: Shuffle seed, for reproducible example order.
        download: Whether to download the dataset if it is missing.
        drop_remainder: Whether to drop the last incomplete batch.

    Returns:
        A `tf.data.Dataset` of (float32 [B, H, W, C] in [0, 1], int32 [B]).

    Example:
        >>> ds = make_train_dataset("cifar10", batch_size=128, data_dir="../shared/datasets/tfds")
    """
    _check_batch_size(batch_size)
    spec = dataset_spec(name)
    mode = spec.augmentation if augmentation is None else augmentation
    if mode not in AUGMENTATIONS:
        raise ValueError(f"Unknown augmentation mode {mode!r}; expected one of {AUGMENTATIONS}.")

    def prepare(image, label):
        return augment(*_to_float(image, label, spec.image_shape), mode=mode)

    ds = _load_raw(name, split, data_dir, download, subset).cache()
    ds = ds.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
    ds = ds.map(prepare, num_parallel_calls=tf.data.AUTOTUNE)
    return ds.batch(int(batch_size), drop_remainder=drop_remainder).prefetch(tf.data.AUTOTUNE)


def make_eval_dataset(name, *, batch_size, data_dir=None, split="test", subset=None, download=False):
    """Builds the deterministic evaluation pipeline: no augmentation, no shuffling, remainder batch kept.

    Args:
        name: Supported TFDS dataset name.
        batch_size: Examples per batch (>= 1).
        data_dir: TFDS data dir; None means the TFDS default.
        split: TFDS split string.
        subset: If given, evaluate on the first `subset` examples only.
        download: Whether to download the dataset if it is missing.

    Returns:
        A `tf.data.Dataset` of (float32 [B, H, W, C] in [0, 1], int32 [B]); the last batch may be smaller.

    Example:
        >>> ds = make_eval_dataset("cifar10", batch_size=500, data_dir="../shared/datasets/tfds")
    """
    _check_batch_size(batch_size)
    spec = dataset_spec(name)
    ds = _load_raw(name, split, data_dir, download, subset).cache()
    ds = ds.map(lambda x, y: _to_float(x, y, spec.image_shape), num_parallel_calls=tf.data.AUTOTUNE)
    return ds.batch(int(batch_size)).prefetch(tf.data.AUTOTUNE)


def count_examples(dataset):
    """Counts the examples in an unbatched or batched dataset.

    A dataset counts as batched when the last component of its elements (the label) has rank >= 1. Known
    cardinality is used where that gives the answer without reading data (unbatched, or batched with a static
    batch size); otherwise the dataset is iterated once.

    Args:
        dataset: A finite `tf.data.Dataset` of tensors or tuples whose last component is the label.

    Returns:
        The number of examples.

    Raises:
        ValueError: The dataset is infinite.

    Example:
        >>> count_examples(make_eval_dataset("mnist", batch_size=256, data_dir="../shared/datasets/tfds"))
        10000
    """
    cardinality = int(dataset.cardinality())
    if cardinality == tf.data.INFINITE_CARDINALITY:
        raise ValueError("Cannot count the examples of an infinite dataset.")
    label_shape = tf.nest.flatten(dataset.element_spec)[-1].shape
    batched = label_shape.rank is not None and label_shape.rank >= 1
    per_element = label_shape[0] if batched else 1
    if cardinality >= 0 and per_element is not None:
        return cardinality * int(per_element)

    def add(n, element):
        return n + tf.cast(tf.shape(tf.nest.flatten(element)[-1])[0] if batched else 1, tf.int64)

    return int(dataset.reduce(tf.constant(0, tf.int64), add))

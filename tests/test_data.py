"""Tests for arat_tf.data: specs, loading from the shared TFDS dir, augmentation, pipelines, counting."""

import collections

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from arat_tf import data


def test_dataset_spec_known():
    spec = data.dataset_spec("svhn_cropped")
    assert spec == data.DatasetSpec("svhn_cropped", 10, (32, 32, 3), "crop")
    assert data.dataset_spec("cifar100").num_classes == 100
    assert data.dataset_spec("mnist").image_shape == (28, 28, 1)
    assert data.dataset_spec("mnist").augmentation == "none"
    assert set(data.SUPPORTED_DATASETS) == {"cifar10", "cifar100", "svhn_cropped", "mnist", "fashion_mnist"}


def test_dataset_spec_unknown_lists_supported():
    with pytest.raises(ValueError, match="imagenet") as err:
        data.dataset_spec("imagenet")
    for name in data.SUPPORTED_DATASETS:
        assert name in str(err.value)


def test_load_split_cifar10_subset(shared_tfds_dir):
    ds = data.load_split("cifar10", "train", data_dir=shared_tfds_dir, subset=5)
    examples = list(ds.as_numpy_iterator())
    assert len(examples) == 5
    assert data.count_examples(ds) == 5
    for image, label in examples:
        assert image.dtype == np.float32 and image.shape == (32, 32, 3)
        assert image.min() >= 0.0 and image.max() <= 1.0
        assert label.dtype == np.int32 and 0 <= label < 10
    assert max(image.max() for image, _ in examples) > 0.5  # scaled to [0, 1], not left as 0..1/255


def test_load_split_subset_is_first_examples(shared_tfds_dir):
    small = list(data.load_split("cifar10", "test", data_dir=shared_tfds_dir, subset=3).as_numpy_iterator())
    large = list(data.load_split("cifar10", "test[:6]", data_dir=shared_tfds_dir).as_numpy_iterator())
    for (x1, y1), (x2, y2) in zip(small, large[:3]):
        np.testing.assert_array_equal(x1, x2)
        assert y1 == y2


def test_load_split_mnist_shape(shared_tfds_dir):
    image, label = next(iter(data.load_split("mnist", "test", data_dir=shared_tfds_dir, subset=1)))
    assert image.shape == (28, 28, 1) and image.dtype == tf.float32
    assert label.dtype == tf.int32


def test_missing_dataset_in_shared_dir(shared_tfds_dir):
    with pytest.raises(data.DatasetNotAvailableError) as err:
        data.load_split("cifar100", "train", data_dir=shared_tfds_dir)
    message = str(err.value)
    assert "cifar100" in message and shared_tfds_dir in message and "--download" in message
    assert isinstance(err.value, FileNotFoundError)


def test_missing_dataset_in_empty_dir(tmp_path):
    for make in (lambda: data.load_split("mnist", "test", data_dir=str(tmp_path)),
                 lambda: data.make_train_dataset("svhn_cropped", batch_size=4, data_dir=str(tmp_path)),
                 lambda: data.make_eval_dataset("cifar10", batch_size=4, data_dir=str(tmp_path))):
        with pytest.raises(data.DatasetNotAvailableError) as err:
            make()
        assert str(tmp_path) in str(err.value)
    with pytest.raises(data.DatasetNotAvailableError, match="mnist"):
        data.load_split("mnist", "test", data_dir=str(tmp_path))


def test_failed_download_raises_not_available(tmp_path, monkeypatch):
    def fail(self, *args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", fail)
    with pytest.raises(data.DatasetNotAvailableError, match="no network") as err:
        data.load_split("mnist", "test", data_dir=str(tmp_path), download=True)
    assert "mnist" in str(err.value) and str(tmp_path) in str(err.value)
    assert isinstance(err.value.__cause__, OSError)


def test_image_shape_mismatch_raises(shared_tfds_dir, monkeypatch):
    monkeypatch.setitem(data.SUPPORTED_DATASETS, "mnist", data.DatasetSpec("mnist", 10, (32, 32, 3), "none"))
    with pytest.raises(ValueError, match=r"\(28, 28, 1\).*\(32, 32, 3\)"):
        data.load_split("mnist", "test", data_dir=shared_tfds_dir, subset=2)


@pytest.mark.parametrize("name", ["svhn_cropped", "cifar100"])
def test_mock_data_for_datasets_not_in_shared_dir(name, tmp_path):
    spec = data.dataset_spec(name)
    with tfds.testing.mock_data(num_examples=12, policy=tfds.testing.MockPolicy.USE_CODE):
        ds = data.make_train_dataset(name, batch_size=4, data_dir=str(tmp_path), download=True)
        batches = list(ds.as_numpy_iterator())
    assert len(batches) == 3
    for x, y in batches:
        assert x.shape == (4, *spec.image_shape) and x.dtype == np.float32
        assert x.min() >= 0.0 and x.max() <= 1.0
        assert y.dtype == np.int32 and np.all((0 <= y) & (y < spec.num_classes))


def test_bad_subset_and_batch_size(shared_tfds_dir):
    for subset in (0, -3, 2.5):
        with pytest.raises(ValueError, match="subset"):
            data.load_split("cifar10", "test", data_dir=shared_tfds_dir, subset=subset)
    for batch_size in (0, -1, 1.5):
        with pytest.raises(ValueError, match="batch_size"):
            data.make_train_dataset("cifar10", batch_size=batch_size, data_dir=shared_tfds_dir)
        with pytest.raises(ValueError, match="batch_size"):
            data.make_eval_dataset("cifar10", batch_size=batch_size, data_dir=shared_tfds_dir)
    with pytest.raises(ValueError, match="augmentation"):
        data.make_train_dataset("cifar10", batch_size=4, data_dir=shared_tfds_dir, augmentation="cutout")


def _shifted_copies(image, pad, flips):
    """All images `augment` may produce from `image`: every pad-and-crop offset, optionally mirrored."""
    h, w, _ = image.shape
    padded = np.pad(image, [(pad, pad), (pad, pad), (0, 0)])
    crops = [padded[i:i + h, j:j + w] for i in range(2 * pad + 1) for j in range(2 * pad + 1)]
    return crops + [c[:, ::-1] for c in crops] if flips else crops


def _matches_one(output, candidates):
    return any(np.array_equal(output, c) for c in candidates)


def _run_augment(images, mode, how):
    if how == "eager":
        return [data.augment(tf.constant(x), 0, mode=mode)[0].numpy() for x in images]
    if how == "function":
        fn = tf.function(lambda x: data.augment(x, 0, mode=mode)[0])
        return [fn(tf.constant(x)).numpy() for x in images]
    ds = tf.data.Dataset.from_tensor_slices((np.stack(images), np.zeros(len(images), np.int32)))
    return [x for x, _ in ds.map(lambda x, y: data.augment(x, y, mode=mode)).as_numpy_iterator()]


@pytest.mark.parametrize("how", ["eager", "function", "tf.data"])
def test_augment_crop_flip_is_shifted_flipped_copy(how):
    rng = np.random.default_rng(0)
    images = [rng.uniform(0.1, 1.0, (8, 8, 3)).astype(np.float32) for _ in range(12)]
    outputs = _run_augment(images, "crop_flip", how)
    for image, out in zip(images, outputs):
        assert out.shape == image.shape and out.dtype == np.float32
        assert _matches_one(out, _shifted_copies(image, 4, flips=True))
    assert any(not np.array_equal(image, out) for image, out in zip(images, outputs))


@pytest.mark.parametrize("how", ["eager", "function", "tf.data"])
def test_augment_crop_on_ones_pads_with_zeros(how):
    images = [np.ones((32, 32, 3), np.float32)] * 16
    outputs = _run_augment(images, "crop", how)
    for out in outputs:
        assert out.shape == (32, 32, 3)
        assert set(np.unique(out)) <= {0.0, 1.0}
        zero_rows = int(np.sum(np.all(out == 0, axis=(1, 2))))
        zero_cols = int(np.sum(np.all(out == 0, axis=(0, 2))))
        assert zero_rows <= 4 and zero_cols <= 4
        assert out.sum() == (32 - zero_rows) * (32 - zero_cols) * 3
    assert any(out.min() == 0.0 for out in outputs)


def test_augment_crop_never_flips():
    image = np.tile(np.arange(8, dtype=np.float32)[None, :, None] + 1, (8, 1, 1))
    for _ in range(20):
        out = data.augment(tf.constant(image), 0, mode="crop")[0].numpy()
        assert _matches_one(out, _shifted_copies(image, 4, flips=False))


def test_augment_none_is_identity_and_unknown_raises():
    image = tf.random.uniform((32, 32, 3))
    out, label = data.augment(image, 7, mode="none")
    np.testing.assert_array_equal(out.numpy(), image.numpy())
    assert label == 7
    with pytest.raises(ValueError, match="mixup"):
        data.augment(image, 7, mode="mixup")


def test_make_train_dataset_batches_and_reshuffles(shared_tfds_dir):
    ds = data.make_train_dataset("cifar10", batch_size=16, data_dir=shared_tfds_dir, subset=64, seed=1)
    epochs = []
    for _ in range(2):
        batches = list(ds.as_numpy_iterator())
        assert len(batches) == 4
        for x, y in batches:
            assert x.shape == (16, 32, 32, 3) and x.dtype == np.float32
            assert x.min() >= 0.0 and x.max() <= 1.0
            assert y.shape == (16,) and y.dtype == np.int32
        epochs.append(np.concatenate([y for _, y in batches]))
    assert not np.array_equal(epochs[0], epochs[1])
    assert collections.Counter(epochs[0].tolist()) == collections.Counter(epochs[1].tolist())
    assert data.count_examples(ds) == 64


def test_make_train_dataset_keeps_remainder_when_asked(shared_tfds_dir):
    ds = data.make_train_dataset("mnist", batch_size=4, data_dir=shared_tfds_dir, subset=10, drop_remainder=False)
    assert sorted(len(y) for _, y in ds.as_numpy_iterator()) == [2, 4, 4]
    assert data.count_examples(ds) == 10


def test_make_eval_dataset_keeps_remainder_and_is_deterministic(shared_tfds_dir):
    ds = data.make_eval_dataset("cifar10", batch_size=4, data_dir=shared_tfds_dir, subset=10)
    first = list(ds.as_numpy_iterator())
    second = list(ds.as_numpy_iterator())
    assert [len(y) for _, y in first] == [4, 4, 2]
    for (x1, y1), (x2, y2) in zip(first, second):
        np.testing.assert_array_equal(x1, x2)
        np.testing.assert_array_equal(y1, y2)
    reference = list(data.load_split("cifar10", "test", data_dir=shared_tfds_dir, subset=10).as_numpy_iterator())
    np.testing.assert_array_equal(np.concatenate([x for x, _ in first]), np.stack([x for x, _ in reference]))
    assert data.count_examples(ds) == 10


def test_count_examples_without_known_cardinality():
    ds = tf.data.Dataset.range(7).filter(lambda i: i % 2 == 0).map(lambda i: (tf.zeros([2]), tf.cast(i, tf.int32)))
    assert int(ds.cardinality()) == tf.data.UNKNOWN_CARDINALITY
    assert data.count_examples(ds) == 4
    assert data.count_examples(ds.batch(3)) == 4
    assert data.count_examples(tf.data.Dataset.range(5).batch(2, drop_remainder=True)) == 4
    with pytest.raises(ValueError, match="infinite"):
        data.count_examples(tf.data.Dataset.range(3).repeat())

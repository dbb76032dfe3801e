"""`ExampleGen`: a TFDS dataset -> versioned TFRecord splits train / val / test.

Every later component reads these files (through the "tfrecord:<path>" splits of
`arat_tf.data`), never TFDS: the exact examples a model was trained, selected and evaluated on are
part of its lineage, and their fingerprint is in every downstream cache key.

Output `examples` (type Examples): train.tfrecord, val.tfrecord, test.tfrecord and stats.json
(per split: the TFDS source split, the example count and the label histogram).
"""

import collections
import hashlib
import os

from arat_tf.io_utils import atomic_write_json
from pipeline.artifacts import EXAMPLES
from pipeline.components.base import Component

SPLITS = ("train", "val", "test")


def split_file(examples, split):
    """The TFRecord file of `split` in an Examples artifact."""
    return examples.path(f"{split}.tfrecord")


def tfrecord_split(examples, split):
    """The arat_tf split string that reads `split` of an Examples artifact."""
    from arat_tf.data import TFRECORD_SPLIT_PREFIX

    return TFRECORD_SPLIT_PREFIX + split_file(examples, split)


def source_fingerprint(data_dir, dataset):
    """Names and sizes of the prepared TFDS files of `dataset` (cheap: no file is read).

    Part of the cache key, so replacing the prepared data (another TFDS version) re-materialises
    the splits, while the data dir's own path is not: moving it keeps the cache.
    """
    root = os.path.join(data_dir, dataset) if data_dir else None
    if not root or not os.path.isdir(root):
        return None
    digest = hashlib.sha256()
    for directory, dirs, files in os.walk(root):
        dirs.sort()
        for name in sorted(files):
            path = os.path.join(directory, name)
            digest.update(f"{os.path.relpath(path, root)}:{os.path.getsize(path)}\n".encode())
    return digest.hexdigest()


class ExampleGen(Component):
    """Materialises the three splits of a TFDS dataset.

    Args:
        dataset: supported TFDS dataset name.
        splits: `{"train": "train[:90%]", "val": "train[90%:]", "test": "test"}` (TFDS split
            strings).
        subsets: `{split: N}`: keep the first N examples (0: all).
        data_dir: TFDS data dir (runtime: not part of the cache key, see `source_fingerprint`).
        download: let TFDS download a missing dataset (runtime).
    """

    OUTPUTS = {"examples": EXAMPLES}

    def __init__(self, *, dataset, splits, subsets, data_dir="", download=False, name=None):
        if set(splits) != set(SPLITS) or set(subsets) != set(SPLITS):
            raise ValueError(f"ExampleGen needs a source and a subset for each of {SPLITS}, "
                             f"received {splits} and {subsets}.")
        super().__init__({"dataset": dataset, "splits": dict(splits), "subsets": dict(subsets)},
                         runtime={"data_dir": data_dir, "download": download}, name=name)

    def cache_parameters(self):
        return dict(self.parameters, source=source_fingerprint(self.runtime["data_dir"],
                                                               self.parameters["dataset"]))

    def execute(self, inputs, outputs):
        import tensorflow as tf
        import tensorflow_datasets as tfds

        from arat_tf.data import dataset_spec, load_raw_split, serialize_example

        dataset = self.parameters["dataset"]
        spec = dataset_spec(dataset)
        data_dir = self.runtime["data_dir"] or None
        directory = outputs["examples"].path
        stats = {"dataset": dataset, "num_classes": spec.num_classes,
                 "image_shape": list(spec.image_shape), "splits": {}}
        for split in SPLITS:
            source = self.parameters["splits"][split]
            subset = self.parameters["subsets"][split] or None
            raw = load_raw_split(dataset, source, data_dir=data_dir,
                                 download=self.runtime["download"], subset=subset)
            histogram = collections.Counter()
            with tf.io.TFRecordWriter(os.path.join(directory, f"{split}.tfrecord")) as writer:
                for image, label in raw.as_numpy_iterator():
                    writer.write(serialize_example(image, label))
                    histogram[int(label)] += 1
            count = sum(histogram.values())
            if count == 0:
                raise ValueError(f"Split {split} ({dataset} {source!r}) has no examples.")
            stats["splits"][split] = {
                "source": source, "subset": subset or 0, "examples": count,
                "label_histogram": [histogram[label] for label in range(spec.num_classes)],
            }
            print(f"    {split}: {count} examples from {dataset} {source!r}")
        stats["tfds_version"] = str(tfds.builder(dataset, data_dir=data_dir).info.version)
        atomic_write_json(os.path.join(directory, "stats.json"), stats)
        return {"examples": {
            "dataset": dataset, "tfds_version": stats["tfds_version"],
            "counts": {split: stats["splits"][split]["examples"] for split in SPLITS},
            "sources": dict(self.parameters["splits"]),
        }}

"""tf.data input pipelines over AdapNet++ record files.

Both yield (images float32 [B,H,W,3] BGR 0..255, labels one-hot float32
[B,H,W,num_classes]). Bad records surface at session run time as
InvalidArgumentError; turn them into a UserError with
records.data_error_from(exc, path).
"""

import numbers
import os

import tensorflow as tf

from dataset.records import parse_example, require_record_file
from common.errors import UserError

DEFAULT_SHUFFLE_BUFFER = 256


def _is_int(value):
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _require_positive_int(name, value):
    if not _is_int(value) or value < 1:
        raise UserError(f"{name} must be a positive integer, got {value!r}")


def _check_common(path, batch_size, height, width, num_classes):
    if isinstance(path, (str, bytes, os.PathLike)):  # else a tensor, fed per pass
        require_record_file(path)
    _require_positive_int("batch_size", batch_size)
    _require_positive_int("height", height)
    _require_positive_int("width", width)
    _require_positive_int("num_classes", num_classes)


def _parser(height, width, num_classes):
    def parse(serialized):
        return parse_example(serialized, height, width, num_classes)
    return parse


def _random_horizontal_flip(seed):
    def flip(image, label):
        # One coin for both tensors keeps image and label aligned.
        do_flip = tf.less(tf.random.uniform([], seed=seed), 0.5)
        return tf.cond(
            do_flip,
            lambda: (tf.reverse(image, [1]), tf.reverse(label, [1])),
            lambda: (image, label))
    return flip


def train_dataset(path, batch_size, height, width, num_classes, flip=False,
                  shuffle_buffer=DEFAULT_SHUFFLE_BUFFER, seed=None):
    """Endless shuffled batches of exactly batch_size (static shapes)."""
    _check_common(path, batch_size, height, width, num_classes)
    _require_positive_int("shuffle_buffer", shuffle_buffer)
    dataset = tf.data.TFRecordDataset(path)
    # Shuffle the serialised strings: cheaper to buffer than decoded images.
    dataset = dataset.shuffle(shuffle_buffer, seed=seed,
                              reshuffle_each_iteration=True)
    dataset = dataset.repeat()
    dataset = dataset.map(_parser(height, width, num_classes),
                          num_parallel_calls=tf.data.AUTOTUNE)
    if flip:
        dataset = dataset.map(_random_horizontal_flip(seed),
                              num_parallel_calls=tf.data.AUTOTUNE)
    dataset = dataset.batch(batch_size, drop_remainder=True)
    # Several worker processes (docs/distribute.md) read the one record file
    # alike and each keeps its share of the elements; one process: no effect.
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = \
        tf.data.experimental.AutoShardPolicy.DATA
    return dataset.with_options(options).prefetch(tf.data.AUTOTUNE)


def eval_dataset(path, batch_size, height, width, num_classes, shard=None,
                 whole_batches=False):
    """One ordered pass; the last batch may be smaller than batch_size.

    path: a record file, or a string tensor fed when the pass's iterator is
    initialised (one graph for several files; the caller checks each file).

    shard=(index, count) keeps every count-th record starting at index, so
    the count shards together cover every record exactly once.
    whole_batches: the last batch is filled up with padding examples whose
    image and labels are all zero (no class, not even void), so every batch
    has batch_size examples: a pass split across replicas needs that, and a
    padding example adds nothing to a sum of per-example losses.
    """
    _check_common(path, batch_size, height, width, num_classes)
    dataset = tf.data.TFRecordDataset(path)
    if shard is not None:
        index, count = _check_shard(shard)
        dataset = dataset.shard(count, index)
    dataset = dataset.map(_parser(height, width, num_classes),
                          num_parallel_calls=tf.data.AUTOTUNE)
    if whole_batches:
        padding = (tf.zeros([height, width, 3]), tf.zeros([height, width, num_classes]))
        dataset = dataset.concatenate(
            tf.data.Dataset.from_tensors(padding).repeat(batch_size - 1))
    dataset = dataset.batch(batch_size, drop_remainder=whole_batches)
    return dataset.prefetch(tf.data.AUTOTUNE)


def _check_shard(shard):
    try:
        index, count = shard
    except (TypeError, ValueError):
        raise UserError(f"shard must be (index, count), got {shard!r}") from None
    _require_positive_int("shard count", count)
    if not _is_int(index) or not 0 <= index < count:
        raise UserError(f"shard index must be in 0..{count - 1}, got {index!r}")
    return int(index), int(count)

"""The AdapNet++ TFRecord format: one tf.train.Example per image.

Features:
  height, width  int64
  modality1      bytes, raw uint8 HxWx3 image in BGR order (OpenCV's order;
                 existing AdapNet++ records use it)
  label          bytes, raw uint8 HxW class ids, 0 = void
"""

import contextlib
import os
import re

import numpy as np
import tensorflow as tf

from common.errors import UserError, error_text, first_message_line
from common.files import atomic_target, replace_atomically

IMAGE_KEY = "modality1"
LABEL_KEY = "label"

_FEATURE_SPEC = {
    "height": tf.io.FixedLenFeature([], tf.int64),
    "width": tf.io.FixedLenFeature([], tf.int64),
    IMAGE_KEY: tf.io.FixedLenFeature([], tf.string),
    LABEL_KEY: tf.io.FixedLenFeature([], tf.string),
}


def _check_example_arrays(image_bgr, label):
    if not isinstance(image_bgr, np.ndarray) or image_bgr.dtype != np.uint8:
        raise UserError(f"image must be a uint8 numpy array, got {_describe(image_bgr)}")
    if not isinstance(label, np.ndarray) or label.dtype != np.uint8:
        raise UserError(f"label must be a uint8 numpy array, got {_describe(label)}")
    if image_bgr.ndim != 3 or image_bgr.shape[2] != 3:
        raise UserError(f"image must be HxWx3, got shape {image_bgr.shape}")
    if label.ndim != 2:
        raise UserError(f"label must be HxW, got shape {label.shape}")
    if image_bgr.shape[:2] != label.shape:
        raise UserError(
            f"image is {image_bgr.shape[0]}x{image_bgr.shape[1]} but label is "
            f"{label.shape[0]}x{label.shape[1]}")
    if label.size == 0:
        raise UserError(f"image is empty (shape {image_bgr.shape})")


def _describe(value):
    if isinstance(value, np.ndarray):
        return f"{value.dtype} array of shape {value.shape}"
    return type(value).__name__


def encode_example(image_bgr, label):
    """Serialise one image (uint8 HxWx3, BGR) and its label (uint8 HxW)."""
    _check_example_arrays(image_bgr, label)
    height, width = label.shape

    def int64(value):
        return tf.train.Feature(int64_list=tf.train.Int64List(value=[value]))

    def raw(array):
        return tf.train.Feature(bytes_list=tf.train.BytesList(
            value=[np.ascontiguousarray(array).tobytes()]))

    example = tf.train.Example(features=tf.train.Features(feature={
        "height": int64(height),
        "width": int64(width),
        IMAGE_KEY: raw(image_bgr),
        LABEL_KEY: raw(label),
    }))
    # deterministic=True sorts the feature map, so equal inputs give equal bytes.
    return example.SerializeToString(deterministic=True)


def decode_example(serialized):
    """numpy (image_bgr uint8 HxWx3, label uint8 HxW) from serialised bytes."""
    example = tf.train.Example.FromString(serialized)
    feature = example.features.feature
    height = feature["height"].int64_list.value[0]
    width = feature["width"].int64_list.value[0]
    image = np.frombuffer(feature[IMAGE_KEY].bytes_list.value[0], np.uint8)
    label = np.frombuffer(feature[LABEL_KEY].bytes_list.value[0], np.uint8)
    return image.reshape(height, width, 3), label.reshape(height, width)


def parse_example(serialized, height, width, num_classes):
    """Graph op: serialised Example -> (image, one-hot label).

    Returns image float32 [height, width, 3] (0..255, BGR) and label float32
    [height, width, num_classes]. Records of another size or with label ids
    >= num_classes fail at run time with an InvalidArgumentError whose
    message says what is wrong (see data_error_from).
    """
    height, width, num_classes = int(height), int(width), int(num_classes)
    features = tf.io.parse_single_example(serialized, _FEATURE_SPEC)
    stored_height = features["height"]
    stored_width = features["width"]
    image_flat = tf.io.decode_raw(features[IMAGE_KEY], tf.uint8)
    label_flat = tf.io.decode_raw(features[LABEL_KEY], tf.uint8)

    size_ok = tf.logical_and(tf.equal(stored_height, height),
                             tf.equal(stored_width, width))
    size_check = tf.debugging.Assert(size_ok, [tf.strings.format(
        "record is {}x{}, config expects %dx%d" % (height, width),
        (stored_height, stored_width))])
    # The size message must win over the byte-count ones it implies.
    with tf.control_dependencies([size_check]):
        # Guards the reshapes below against truncated or padded payloads.
        image_bytes_ok = tf.equal(tf.size(image_flat), height * width * 3)
        image_check = tf.debugging.Assert(image_bytes_ok, [tf.strings.format(
            "%s has {} bytes, expected %dx%dx3 = %d"
            % (IMAGE_KEY, height, width, height * width * 3),
            tf.size(image_flat))])
        label_bytes_ok = tf.equal(tf.size(label_flat), height * width)
        label_check = tf.debugging.Assert(label_bytes_ok, [tf.strings.format(
            "%s has {} bytes, expected %dx%d = %d"
            % (LABEL_KEY, height, width, height * width),
            tf.size(label_flat))])
        max_label_id = tf.reduce_max(tf.cast(label_flat, tf.int32))
        ids_check = tf.debugging.Assert(
            tf.less(max_label_id, num_classes),
            [tf.strings.format(
                "label id {} >= num_classes (%d)" % num_classes, max_label_id)])

    with tf.control_dependencies([size_check, image_check, label_check, ids_check]):
        image = tf.reshape(image_flat, [height, width, 3])
        label = tf.reshape(label_flat, [height, width])
    image = tf.cast(image, tf.float32)
    label = tf.one_hot(tf.cast(label, tf.int32), num_classes, dtype=tf.float32)
    return image, label


def require_record_file(path):
    """UserError unless path is an existing, non-empty record file."""
    if not os.path.exists(path):
        raise UserError(f"record file not found: {path}")
    if not os.path.isfile(path):
        raise UserError(f"record path is not a file: {path}")
    if os.path.getsize(path) == 0:
        raise UserError(f"record file is empty: {path}")


def _record_iterator(path):
    """Serialised examples of path, read through tf.data in a private graph."""
    require_record_file(path)
    graph = tf.Graph()
    with graph.as_default():
        dataset = tf.data.TFRecordDataset(path)
        next_record = tf.compat.v1.data.make_one_shot_iterator(dataset).get_next()
    with tf.compat.v1.Session(graph=graph) as session:
        while True:
            try:
                yield session.run(next_record)
            except tf.errors.OutOfRangeError:
                return
            except tf.errors.OpError as exc:
                raise data_error_from(exc, path) from None


def count_records(path):
    """Number of examples in a record file (one pass, no decoding)."""
    require_record_file(path)
    graph = tf.Graph()
    with graph.as_default():
        count = tf.data.TFRecordDataset(path).reduce(
            tf.constant(0, tf.int64), lambda total, _: total + 1)
    with tf.compat.v1.Session(graph=graph) as session:
        try:
            return int(session.run(count))
        except tf.errors.OpError as exc:
            raise data_error_from(exc, path) from None


def read_examples(path):
    """Yield (image_bgr uint8 HxWx3, label uint8 HxW) for each record."""
    for serialized in _record_iterator(path):
        try:
            yield decode_example(serialized)
        except Exception as exc:  # protobuf and reshape errors alike
            raise UserError(f"{path}: malformed example ({type(exc).__name__}: "
                            f"{first_message_line(exc)})") from None


_ASSERT_MESSAGE = re.compile(r"assertion failed: \[(.*)\]")


def data_error_from(exc, path):
    """One-line UserError for a TF error raised while reading records at path.

    Keeps the message of parse_example's asserts (or the first meaningful line
    of any other TF error) and names the record file.
    """
    found = _ASSERT_MESSAGE.search(error_text(exc))
    reason = found.group(1) if found else first_message_line(exc)
    if isinstance(exc, tf.errors.DataLossError):
        reason = f"corrupt or truncated record file ({reason})"
    return UserError(f"bad data in {path}: {reason}")


@contextlib.contextmanager
def record_writer(path):
    """Context manager yielding a TFRecordWriter that writes path atomically
    (common/files.atomic_target): a failure, Ctrl-C included, never leaves a
    half-written file at path nor damages an existing one."""
    try:
        with atomic_target(path) as temp_path:
            try:
                writer = tf.io.TFRecordWriter(temp_path)
            except tf.errors.OpError as exc:
                raise UserError(f"cannot write record file {path}: "
                                f"{first_message_line(exc)}") from None
            try:
                yield writer
            finally:
                writer.close()  # before the rename, or before the removal
    except (OSError, tf.errors.OpError) as exc:
        reason = getattr(exc, "strerror", None) or first_message_line(exc)
        raise UserError(f"cannot write record file {path}: {reason}") from None


def save_npy_atomic(path, array):
    """np.save through a temporary file; loadable with allow_pickle=False."""

    def write(tmp):
        with open(tmp, "wb") as handle:
            np.save(handle, np.asarray(array), allow_pickle=False)
    replace_atomically(path, write)  # an OSError there is a UserError already

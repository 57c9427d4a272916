"""Atrous (dilated) 3x3 convolutions that train on every device.

Two formulations of the same function (docs/atrous.md):

- ``native``: one Conv2D with ``dilations``. TensorFlow's CPU build has
  gradient kernels for it only when oneDNN is on (by default only on CPUs
  with AVX-512 class features); elsewhere training fails with "Current CPU
  implementations do not yet support dilation rates larger than 1".
- ``space_to_batch``: rearrange the map into rate x rate interleaved
  sub-maps (SpaceToBatchND), run an ordinary conv on them, rearrange back
  (BatchToSpaceND) -- TF1's ``atrous_conv2d``. Every op has a gradient
  kernel on every device.

Both use the same kernel variable, so checkpoints do not depend on the path.
``auto`` picks one per device from the measurements in docs/atrous.md:
native where it has gradient kernels (GPU, oneDNN on), else space-to-batch.
"""

import functools

import numpy as np
import tensorflow as tf

tf1 = tf.compat.v1

NATIVE = "native"
SPACE_TO_BATCH = "space_to_batch"
AUTO = "auto"
PATHS = (NATIVE, SPACE_TO_BATCH)


def conv2d(x, kernel, stride=1, rate=1, path=NATIVE):
    """SAME conv of ``x`` with ``kernel`` [k, k, in, out]; ``rate`` > 1 is
    atrous, computed by ``path`` (NATIVE or SPACE_TO_BATCH)."""
    if rate == 1 or path == NATIVE:
        return tf.nn.conv2d(x, kernel, strides=[1, stride, stride, 1], padding="SAME",
                            dilations=[1, rate, rate, 1])
    if path != SPACE_TO_BATCH:
        raise ValueError(f"unknown atrous path {path!r}; expected one of {PATHS}")
    if stride != 1:
        raise ValueError(f"an atrous conv (rate {rate}) must have stride 1, got {stride}")

    def valid_conv(blocks, num_spatial_dims, padding):
        # ``padding`` is VALID here: with_space_to_batch pads for SAME itself.
        return tf.nn.conv2d(blocks, kernel, strides=1, padding=padding)

    return tf.nn.with_space_to_batch(x, dilation_rate=[rate, rate], padding="SAME",
                                     op=valid_conv, filter_shape=kernel.shape[:2])


@functools.lru_cache(maxsize=None)
def native_gradients_available():
    """Whether this process's default device has gradient kernels for a
    dilated Conv2D. Answered by running one tiny gradient: no public
    TensorFlow API says whether oneDNN is on, and a GPU has them."""
    graph = tf.Graph()
    with graph.as_default():
        # Placeholders, not constants: constant folding would run on the CPU.
        x = tf1.placeholder(tf.float32, [1, 5, 5, 1])
        kernel = tf1.placeholder(tf.float32, [3, 3, 1, 1])
        y = tf.nn.conv2d(x, kernel, 1, "SAME", dilations=2)
        gradients = tf.gradients(tf.reduce_sum(y), [x, kernel])
    with tf1.Session(graph=graph) as session:
        try:
            session.run(gradients, {x: np.ones([1, 5, 5, 1]), kernel: np.ones([3, 3, 1, 1])})
        except (tf.errors.InvalidArgumentError, tf.errors.UnimplementedError,
                tf.errors.NotFoundError):
            return False
    return True


def resolve_path(path=AUTO):
    """AUTO -> the path for this process's device; NATIVE / SPACE_TO_BATCH
    are kept. Measured (docs/atrous.md): where native gradient kernels exist
    the two paths train equally fast and native infers up to 9 % faster;
    where they do not, only space-to-batch trains, and both infer alike."""
    if path in PATHS:
        return path
    if path != AUTO:
        raise ValueError(f"unknown atrous path {path!r}; expected auto or one of {PATHS}")
    return NATIVE if native_gradients_available() else SPACE_TO_BATCH

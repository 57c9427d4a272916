"""Graph primitives with the original AdapNet++ variable names (tf.compat.v1)."""

import tensorflow as tf

tf1 = tf.compat.v1

BN_EPSILON = 1e-5
BN_DECAY = 0.99


def weight_variable(shape):
    return tf1.get_variable(
        "weights", shape, tf.float32,
        initializer=tf1.variance_scaling_initializer(2.0, "fan_in", "truncated_normal"))


def batch_norm(x, training):
    """Batch norm in scope ``BatchNorm``: batch statistics when training (and
    moving-average updates in UPDATE_OPS), moving statistics otherwise."""
    channels = x.shape[-1]
    with tf1.variable_scope("BatchNorm"):
        gamma = tf1.get_variable("gamma", [channels], initializer=tf1.ones_initializer())
        beta = tf1.get_variable("beta", [channels], initializer=tf1.zeros_initializer())
        moving_mean = tf1.get_variable("moving_mean", [channels], trainable=False,
                                       initializer=tf1.zeros_initializer())
        moving_variance = tf1.get_variable("moving_variance", [channels], trainable=False,
                                           initializer=tf1.ones_initializer())
    if not training:
        y, _, _ = tf1.nn.fused_batch_norm(x, gamma, beta, moving_mean, moving_variance,
                                          epsilon=BN_EPSILON, is_training=False)
        return y
    y, mean, variance = tf1.nn.fused_batch_norm(x, gamma, beta, epsilon=BN_EPSILON,
                                                is_training=True)
    # The fused op returns the Bessel-corrected variance (x n/(n-1), n = N*H*W);
    # the original averaged the biased one (tf.nn.moments), docs/network.md.
    shape = tf.shape(x)
    n = tf.cast(shape[0] * shape[1] * shape[2], variance.dtype)
    variance = variance * (n - 1.0) / n
    for variable, value in ((moving_mean, mean), (moving_variance, variance)):
        update = tf1.assign_sub(variable, (1.0 - BN_DECAY) * (variable - value))
        tf1.add_to_collection(tf1.GraphKeys.UPDATE_OPS, update)
    return y


def conv2d_transpose(x, kernel, stride):
    """``kernel`` is [k, k, out, in] (the TF transposed-conv layout)."""
    shape = tf.shape(x)
    out_channels = kernel.shape[2]
    output_shape = tf.stack([shape[0], shape[1] * stride, shape[2] * stride, out_channels])
    y = tf.nn.conv2d_transpose(x, kernel, output_shape, [1, stride, stride, 1],
                               padding="SAME")
    static = x.shape
    height = None if static[1] is None else static[1] * stride
    width = None if static[2] is None else static[2] * stride
    return tf.ensure_shape(y, [static[0], height, width, out_channels])


def resize_bilinear(x, size):
    """TF1 ``resize_images`` semantics (align_corners=False, no half-pixel)."""
    return tf1.image.resize_bilinear(x, size, align_corners=False, half_pixel_centers=False)


def scatter_output_channels(kernel, kept, width):
    """Widen a [k, k, in, len(kept)] kernel to ``width`` output channels, its
    columns at positions ``kept`` and zeros elsewhere. A conv with the widened
    kernel equals the narrow conv scattered into ``width`` channels; widening
    the small kernel costs far less than scattering the activation."""
    source = [len(kept)] * width
    for position, channel in enumerate(kept):
        source[int(channel)] = position
    padded = tf.pad(kernel, [[0, 0], [0, 0], [0, 0], [0, 1]])
    return tf.gather(padded, source, axis=3)

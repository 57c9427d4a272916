"""Graph primitives with the original AdapNet++ variable names (tf.compat.v1)."""

import tensorflow as tf

from models.architecture import BATCH_NORM_SCOPE, BATCH_NORM_VARIABLES, KERNEL_VARIABLE

tf1 = tf.compat.v1

BN_EPSILON = 1e-5
BN_DECAY = 0.99

# Gradient of the all-replica sum below (docs/distribute.md).
_ALL_REPLICAS_SUM_GRADIENT = "NetcompressAllReplicasSum"


def _replica_context_sum(x):
    """Sum of ``x`` over the replicas, through the strategy's own reduction
    (a merge call); no gradient of its own."""
    def reduce(strategy, per_replica):
        return strategy.extended.reduce_to(tf.distribute.ReduceOp.SUM, per_replica,
                                           destinations=per_replica)
    return tf.distribute.get_replica_context().merge_call(reduce, args=(x,))


@tf.RegisterGradient(_ALL_REPLICAS_SUM_GRADIENT)
def _all_replicas_sum_gradient(op, total_gradient, _unused):
    # y = sum_s x_s is read by every replica's loss, so dL/dx_r = sum_s dL_s/dy.
    return [None, _replica_context_sum(total_gradient)]


def all_replicas_sum(x):
    """Sum of ``x`` over the replicas of the current tf.distribute replica
    context, differentiable: the gradient is the replicas' sum of the
    gradients. (ReplicaContext.all_reduce's own gradient fails in graph mode
    with mirrored variables, docs/distribute.md.)"""
    total = _replica_context_sum(tf.stop_gradient(x))
    # IdentityN passes `total` forward unchanged; its gradient is overridden
    # to reach `x`.
    with tf1.get_default_graph().gradient_override_map(
            {"IdentityN": _ALL_REPLICAS_SUM_GRADIENT}):
        forwarded, _ = tf.identity_n([total, x])
    return forwarded


def replicas_in_sync():
    """How many replicas run this graph code together (1 outside tf.distribute)."""
    return tf.distribute.get_replica_context().num_replicas_in_sync \
        if tf.distribute.get_replica_context() is not None else 1


def weight_variable(shape):
    return tf1.get_variable(
        KERNEL_VARIABLE, shape, tf.float32,
        initializer=tf1.variance_scaling_initializer(2.0, "fan_in", "truncated_normal"))


def batch_norm(x, training):
    """Batch norm in scope ``BatchNorm``: batch statistics when training (and
    moving-average updates in UPDATE_OPS), moving statistics otherwise."""
    channels = x.shape[-1]
    gamma_name, beta_name, mean_name, variance_name = BATCH_NORM_VARIABLES
    with tf1.variable_scope(BATCH_NORM_SCOPE, dtype=x.dtype):
        gamma = tf1.get_variable(gamma_name, [channels], initializer=tf1.ones_initializer())
        beta = tf1.get_variable(beta_name, [channels], initializer=tf1.zeros_initializer())
        # Several replicas compute the same synchronised statistics: the
        # first one's update is the update (docs/distribute.md).
        moving_mean = tf1.get_variable(
            mean_name, [channels], trainable=False, initializer=tf1.zeros_initializer(),
            aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)
        moving_variance = tf1.get_variable(
            variance_name, [channels], trainable=False,
            initializer=tf1.ones_initializer(),
            aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)
    if not training:
        y, _, _ = tf1.nn.fused_batch_norm(x, gamma, beta, moving_mean, moving_variance,
                                          epsilon=BN_EPSILON, is_training=False)
        return y
    if replicas_in_sync() > 1:
        y, mean, variance = _synchronised_batch_norm(x, gamma, beta)
    else:
        y, mean, variance = tf1.nn.fused_batch_norm(x, gamma, beta, epsilon=BN_EPSILON,
                                                    is_training=True)
        # The fused op returns the Bessel-corrected variance (x n/(n-1),
        # n = N*H*W); the original averaged the biased one (tf.nn.moments),
        # docs/network.md.
        shape = tf.shape(x)
        n = tf.cast(shape[0] * shape[1] * shape[2], variance.dtype)
        variance = variance * (n - 1.0) / n
    for variable, value in ((moving_mean, mean), (moving_variance, variance)):
        update = tf1.assign_sub(variable, (1.0 - BN_DECAY) * (variable - value))
        tf1.add_to_collection(tf1.GraphKeys.UPDATE_OPS, update)
    return y


def _synchronised_batch_norm(x, gamma, beta):
    """Batch norm over the union of every replica's batch: N replicas of B/N
    images normalise (and update the statistics) as one replica of B.
    Two passes (mean, then squared deviations) as the fused op does, rather
    than E[x^2] - E[x]^2, which cancels badly on large activations."""
    axes = [0, 1, 2]
    shape = tf.shape(x)
    count = tf.cast(shape[0] * shape[1] * shape[2], x.dtype)
    sums = all_replicas_sum(tf.concat([tf.reduce_sum(x, axes), count[None]], 0))
    total = sums[-1]
    mean = sums[:-1] / total
    variance = all_replicas_sum(tf.reduce_sum(tf.square(x - mean), axes)) / total
    y = tf.nn.batch_normalization(x, mean, variance, beta, gamma, BN_EPSILON)
    return y, mean, variance


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

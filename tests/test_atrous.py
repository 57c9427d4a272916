"""Atrous convs: both paths against a float64 reference, outputs and gradients.

Tolerances follow from float32 accumulation: an output that sums n float32
products (each exact in float64) computed in float32 in any order is within
(n + 1) * 2**-24 * sum(|terms|) of the exact value (the standard bound for
recursive summation; blocked or pairwise sums do better). The reference
computes that bound per element, in float64, alongside the value.
"""

import numpy as np
import pytest
import tensorflow as tf

from helpers import randomise_variables, scaled_model_def
from models import atrous
from models.AdapNet_pp import AdapNet_pp
from netcompress.formats import checkpoints

tf1 = tf.compat.v1
# Which kernels exist depends on oneDNN: every test here runs in both passes.
pytestmark = pytest.mark.onednn
UNIT_ROUNDOFF = 2.0 ** -24
RATES = (2, 3, 6, 12)  # every rate AdapNet++ uses
SIZES = ((9, 13), (14, 26))  # odd and even maps


def same_padding(size, kernel, rate):
    total = (kernel - 1) * rate
    return total // 2, total - total // 2


def reference_conv(x, kernel, rate, weights):
    """float64 SAME dilated conv y of x [N,H,W,C] with kernel [k,k,C,O], and
    the gradients of L = sum(y * weights) with respect to x and the kernel;
    each with its float32 accumulation bound (module docstring)."""
    x, kernel, weights = (np.asarray(a, np.float64) for a in (x, kernel, weights))
    n, height, width, _ = x.shape
    k = kernel.shape[0]
    (top, bottom), (left, right) = (same_padding(height, k, rate),
                                    same_padding(width, k, rate))
    padded = np.pad(x, [(0, 0), (top, bottom), (left, right), (0, 0)])
    y = np.zeros((n, height, width, kernel.shape[3]))
    y_abs = np.zeros_like(y)
    grad_padded = np.zeros_like(padded)
    grad_padded_abs = np.zeros_like(padded)
    grad_kernel = np.zeros_like(kernel)
    grad_kernel_abs = np.zeros_like(kernel)
    for a in range(k):
        for b in range(k):
            window = padded[:, a * rate:a * rate + height, b * rate:b * rate + width, :]
            y += window @ kernel[a, b]
            y_abs += np.abs(window) @ np.abs(kernel[a, b])
            grad_kernel[a, b] = np.einsum("nhwc,nhwo->co", window, weights)
            grad_kernel_abs[a, b] = np.einsum("nhwc,nhwo->co", np.abs(window),
                                              np.abs(weights))
            region = (slice(None), slice(a * rate, a * rate + height),
                      slice(b * rate, b * rate + width))
            grad_padded[region] += weights @ kernel[a, b].T
            grad_padded_abs[region] += np.abs(weights) @ np.abs(kernel[a, b]).T
    crop = (slice(None), slice(top, top + height), slice(left, left + width))
    terms = {"y": k * k * x.shape[3], "grad_x": k * k * kernel.shape[3],
             "grad_kernel": n * height * width}
    values = {"y": y, "grad_x": grad_padded[crop], "grad_kernel": grad_kernel}
    magnitudes = {"y": y_abs, "grad_x": grad_padded_abs[crop], "grad_kernel": grad_kernel_abs}
    bounds = {name: (terms[name] + 1) * UNIT_ROUNDOFF * magnitudes[name] for name in values}
    return values, bounds


def run_path(path, x, kernel, rate, weights, gradients=True):
    graph = tf.Graph()
    with graph.as_default():
        x_t = tf.constant(x)
        kernel_t = tf.constant(kernel)
        y = atrous.conv2d(x_t, kernel_t, 1, rate, path)
        fetches = {"y": y}
        if gradients:
            grad_x, grad_kernel = tf.gradients(tf.reduce_sum(y * weights), [x_t, kernel_t])
            fetches.update(grad_x=grad_x, grad_kernel=grad_kernel)
    with tf1.Session(graph=graph) as session:
        return session.run(fetches)


def random_case(size, seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(2, *size, 5)).astype(np.float32)
    kernel = rng.normal(size=(3, 3, 5, 4)).astype(np.float32)
    weights = rng.normal(size=(2, *size, 4)).astype(np.float32)
    return x, kernel, weights


def assert_within_bounds(got, values, bounds):
    for name, value in got.items():
        error = np.abs(value.astype(np.float64) - values[name])
        worst = np.unravel_index(np.argmax(error - bounds[name]), error.shape)
        assert (error <= bounds[name]).all(), (
            f"{name}: error {error[worst]:.3g} > bound {bounds[name][worst]:.3g} at {worst}")


@pytest.mark.parametrize("rate", RATES)
@pytest.mark.parametrize("size", SIZES)
def test_space_to_batch_matches_reference(rate, size):
    x, kernel, weights = random_case(size, rate)
    values, bounds = reference_conv(x, kernel, rate, weights)
    got = run_path(atrous.SPACE_TO_BATCH, x, kernel, rate, weights)
    assert_within_bounds(got, values, bounds)
    if min(size) > rate:
        assert np.abs(values["grad_kernel"]).min() > 0  # every tap saw data


@pytest.mark.parametrize("rate", RATES)
@pytest.mark.parametrize("size", SIZES)
def test_native_matches_reference_where_it_has_kernels(rate, size):
    """The forward pass runs everywhere; the gradient only where TensorFlow
    has dilated backprop kernels (a GPU, or oneDNN on)."""
    x, kernel, weights = random_case(size, 100 + rate)
    values, bounds = reference_conv(x, kernel, rate, weights)
    backward = atrous.native_gradients_available()
    got = run_path(atrous.NATIVE, x, kernel, rate, weights, gradients=backward)
    assert_within_bounds(got, values, bounds)


def test_native_gradients_probe_agrees_with_the_dilated_backprop():
    x, kernel, weights = random_case((8, 8), 7)
    if atrous.native_gradients_available():
        run_path(atrous.NATIVE, x, kernel, 2, weights)
    else:
        with pytest.raises(tf.errors.InvalidArgumentError, match="dilation"):
            run_path(atrous.NATIVE, x, kernel, 2, weights)


def test_auto_path_trains_on_this_machine():
    """Whatever auto picks must have gradient kernels here."""
    path = atrous.resolve_path(atrous.AUTO)
    assert path in atrous.PATHS
    x, kernel, weights = random_case((8, 8), 3)
    got = run_path(path, x, kernel, 2, weights)
    assert np.isfinite(got["grad_kernel"]).all()


def test_unknown_path_and_strided_atrous_are_refused():
    with pytest.raises(ValueError, match="unknown atrous path 'fast'"):
        atrous.resolve_path("fast")
    with tf.Graph().as_default():
        x = tf.zeros([1, 8, 8, 2])
        with pytest.raises(ValueError, match="stride 1"):
            atrous.conv2d(x, tf.zeros([3, 3, 2, 2]), 2, 2, atrous.SPACE_TO_BATCH)


def model_outputs(path, values=None):
    """Outputs and loss gradients of the small network built with ``path``."""
    model_def = scaled_model_def(16)
    rng = np.random.default_rng(5)
    images = rng.uniform(0, 255, (2, 32, 64, 3)).astype(np.float32)
    labels = np.eye(3, dtype=np.float32)[rng.integers(0, 3, (2, 32, 64))]
    graph = tf.Graph()
    with graph.as_default():
        model = AdapNet_pp(model_def, 3, atrous_path=path)
        outputs = model.build(tf.constant(images), training=False, aux=True)
        loss = tf.reduce_sum(model.per_example_loss(outputs, tf.constant(labels)))
        variables = checkpoints.model_variables()
        weights = [v for v in variables if v.name.endswith("weights:0")]
        fetches = {"probabilities": outputs.probabilities}
        if path == atrous.SPACE_TO_BATCH or atrous.native_gradients_available():
            fetches["gradients"] = dict(zip([v.name for v in weights],
                                            tf.gradients(loss, weights)))
        with tf1.Session() as session:
            if values is None:
                values = randomise_variables(session, variables)
            else:
                checkpoints.assign_values(session, {v: values[v.name[:-2]]
                                                    for v in variables})
            return session.run(fetches), values


def test_network_is_the_same_function_on_both_paths():
    """Same variables, same outputs: the path changes only how the atrous
    convs are computed. The network stacks ~60 convs whose float32 rounding
    differs between the paths (op order); relative error grows about
    linearly with depth, so 1e-4 relative (~60 layers x a few 2**-24 per
    layer, with wide margin for the softmax and the ReLU kinks) bounds it."""
    s2b, values = model_outputs(atrous.SPACE_TO_BATCH)
    native, _ = model_outputs(atrous.NATIVE, values)
    np.testing.assert_allclose(s2b["probabilities"], native["probabilities"],
                               rtol=1e-4, atol=1e-6)
    if "gradients" in native:
        for name, gradient in native["gradients"].items():
            scale = np.abs(gradient).max()
            np.testing.assert_allclose(s2b["gradients"][name], gradient,
                                       rtol=1e-3, atol=1e-4 * scale, err_msg=name)

"""Training as the original trained: biased BN moving variance, the learning
rate decaying to 1e-4, no flips by default (README.md, docs/network.md)."""

import numpy as np
import pytest
import tensorflow as tf

from helpers import scaled_model_def, write_config, write_json
from dataset import pipeline
from dataset.records import encode_example, record_writer
from models.architecture import OUTER_SCOPE
from models.layers import batch_norm
from netcompress.graphs import training
from netcompress.settings.config import load_config, setting_defaults
from common.errors import UserError

tf1 = tf.compat.v1

HEIGHT, WIDTH, NUM_CLASSES = 32, 64, 5


def bn_training_step(data, static_shape):
    """Run one training-mode batch_norm (output and moving-average updates)
    on ``data``; returns y, moving_mean, moving_variance after the update."""
    with tf.Graph().as_default():
        shape = data.shape if static_shape else [None, None, None, data.shape[-1]]
        x = tf1.placeholder(tf.float32, shape)
        with tf1.variable_scope("unit"):
            y = batch_norm(x, training=True)
        updates = tf1.get_collection(tf1.GraphKeys.UPDATE_OPS)
        assert len(updates) == 2
        with tf1.variable_scope("unit/BatchNorm", reuse=True):
            moving_mean = tf1.get_variable("moving_mean")
            moving_variance = tf1.get_variable("moving_variance")
        with tf1.Session() as session:
            session.run(tf1.global_variables_initializer())
            output, _ = session.run([y, updates], {x: data})
            return (output,) + tuple(session.run([moving_mean, moving_variance]))


@pytest.mark.onednn
@pytest.mark.parametrize("shape, static_shape", [
    ((4, 1, 1, 3), True),     # the image-pooling BN at batch 4: n = 4
    ((4, 1, 1, 3), False),    # the same with the batch size known only at run time
    ((2, 3, 5, 4), False),    # n = 30
])
def test_moving_variance_is_updated_with_the_biased_batch_variance(shape, static_shape):
    data = np.random.default_rng(0).normal(1.0, 2.0, shape).astype(np.float32)
    y, moving_mean, moving_variance = bn_training_step(data, static_shape)
    values = data.astype(np.float64).reshape(-1, shape[-1])
    n = values.shape[0]
    mean = values.sum(axis=0) / n
    biased = ((values - mean) ** 2).sum(axis=0) / n
    # initial moving statistics: mean 0, variance 1; decay 0.99
    np.testing.assert_allclose(moving_mean, 0.01 * mean, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(moving_variance, 0.99 * 1.0 + 0.01 * biased, rtol=1e-6)
    bessel = 0.99 + 0.01 * biased * n / (n - 1)
    assert np.all(np.abs(moving_variance - bessel) > 100 * 1e-6 * bessel)
    # the output itself is normalised with the biased variance, as before
    expected = (data.astype(np.float64) - mean) / np.sqrt(biased + 1e-5)
    np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-5)


def test_a_single_value_per_channel_leaves_variance_zero():
    data = np.array([[[[3.0, -2.0]]]], np.float32)   # n = 1
    _, moving_mean, moving_variance = bn_training_step(data, static_shape=False)
    np.testing.assert_allclose(moving_mean, [0.03, -0.02], rtol=1e-6)
    np.testing.assert_allclose(moving_variance, [0.99, 0.99], rtol=1e-7)


@pytest.fixture(scope="module")
def train_config(tmp_path_factory):
    """A train config as train.py loads it, tiny model."""
    root = tmp_path_factory.mktemp("original")
    rng = np.random.default_rng(0)
    with record_writer(str(root / "train.tfrecords")) as writer:
        for _ in range(4):
            image = rng.integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8)
            label = rng.integers(0, NUM_CLASSES, (HEIGHT, WIDTH), dtype=np.uint8)
            writer.write(encode_example(image, label))
    path = write_config(root / "train.config", dict(
        gpu_id="", model="AdapNet_pp", num_classes=NUM_CLASSES, intialize=None,
        checkpoint=root / "run" / "model.ckpt", train_data=root / "train.tfrecords",
        batch_size=2, skip_step=1, height=HEIGHT, width=WIDTH, max_iteration=10,
        learning_rate=0.005, save_step=10, power=0.9, mask=None,
        model_def=write_json(root / "tiny.json", scaled_model_def(16))))
    return path


def load(path, *overrides):
    return load_config(path, "train", list(overrides))


class _OneWeightModel:
    """A one-variable stand-in for AdapNet_pp: the schedule does not depend on
    the network, and building the real one's gradients takes seconds."""

    def build(self, images, training, aux):
        with tf1.variable_scope(OUTER_SCOPE):
            weight = tf1.get_variable("weight", [], initializer=tf1.ones_initializer())
        return images * weight

    @staticmethod
    def per_example_loss(outputs, labels):
        return tf.reduce_mean(tf.square(outputs), axis=[1, 2, 3])

    @staticmethod
    def weight_decay():
        return tf.constant(0.0)


def test_learning_rate_decays_polynomially_to_1e_4(train_config, monkeypatch):
    config = load(train_config)
    assert config["end_learning_rate"] == 1e-4
    monkeypatch.setattr(training, "model_from_config", lambda config: _OneWeightModel())
    graph = training.TrainGraph(config, seed=0)
    with tf1.Session(graph=graph.graph) as session:
        session.run(graph.initializer)
        rates = {}
        for step in (0, 5, 10, 15):
            graph.global_step.load(step, session)
            rates[step] = session.run(graph.learning_rate)
    # (0.005 - 1e-4) * (1 - step / 10) ** 0.9 + 1e-4, held at 1e-4 after step 10
    np.testing.assert_allclose(rates[0], 0.005, rtol=1e-6)
    np.testing.assert_allclose(rates[5], 0.0049 * 0.5 ** 0.9 + 1e-4, rtol=1e-6)
    np.testing.assert_allclose(rates[10], 1e-4, rtol=1e-6)
    np.testing.assert_allclose(rates[15], 1e-4, rtol=1e-6)


@pytest.mark.parametrize("value", ["-1.0e-4", "0.006"])
def test_bad_end_learning_rate_is_a_one_line_error(train_config, value):
    config = load(train_config, f"end_learning_rate={value}")
    with pytest.raises(UserError) as caught:
        training.TrainGraph(config)
    message = str(caught.value)
    assert "\n" not in message
    assert "'end_learning_rate'" in message and str(float(value)) in message


def test_end_learning_rate_may_be_zero_or_the_learning_rate():
    for end in (0.0, 0.005):
        assert training._end_learning_rate({"learning_rate": 0.005,
                                            "end_learning_rate": end}) == end
    # left out, the declared default: the original's end
    assert setting_defaults("train")["end_learning_rate"] == 1e-4


class _Built(Exception):
    """Stops TrainGraph at its dataset: the flip argument is all we need."""


def flip_argument(config, monkeypatch):
    def record(*args, **kwargs):
        raise _Built(kwargs["flip"])
    monkeypatch.setattr(training, "train_dataset", record)
    with pytest.raises(_Built) as caught:
        training.TrainGraph(config)
    return caught.value.args[0]


def test_train_graph_flips_only_when_asked(train_config, monkeypatch):
    assert flip_argument(load(train_config), monkeypatch) is False
    assert flip_argument(load(train_config, "flip=true"), monkeypatch) is True
    # left out of the config: the declared default, no flips
    assert flip_argument(load_config(train_config, "train"), monkeypatch) is False


def test_train_dataset_does_not_flip_by_default(tmp_path):
    ys, xs = np.mgrid[0:HEIGHT, 0:WIDTH]
    image = np.stack([xs * 3 + ys, ys, xs], axis=-1).astype(np.uint8)  # not symmetric
    label = (xs % NUM_CLASSES).astype(np.uint8)
    path = str(tmp_path / "one.tfrecords")
    with record_writer(path) as writer:
        writer.write(encode_example(image, label))
    with tf.Graph().as_default():
        dataset = pipeline.train_dataset(path, 4, HEIGHT, WIDTH, NUM_CLASSES, seed=1)
        images, labels = tf1.data.make_one_shot_iterator(dataset).get_next()
        with tf1.Session() as session:
            batches = [session.run([images, labels]) for _ in range(8)]
    # 32 draws: a fair coin would flip about 16 of them
    for batch_images, batch_labels in batches:
        for one_image, one_label in zip(batch_images, batch_labels):
            np.testing.assert_array_equal(one_image, image.astype(np.float32))
            np.testing.assert_array_equal(one_label.argmax(-1), label)

"""Session failures: the input pipeline's are bad data, any other op's is named."""

import numpy as np
import pytest
import tensorflow as tf

from dataset.pipeline import eval_dataset
from dataset.records import encode_example, record_writer
from netcompress.graphs import op_errors
from common.errors import UserError, error_line, error_text, first_message_line, \
    message_lines, one_line
from netcompress.graphs.inference import iterate_batches

tf1 = tf.compat.v1


def write_records(path, label_ids):
    with record_writer(str(path)) as writer:
        for value in label_ids:
            writer.write(encode_example(np.zeros((16, 16, 3), np.uint8),
                                        np.full((16, 16), value, np.uint8)))
    return str(path)


def run_all(path, make_fetches):
    graph = tf.Graph()
    with graph.as_default():
        dataset = eval_dataset(path, 2, 16, 16, 4)
        images, labels = tf1.data.make_one_shot_iterator(dataset).get_next()
        fetches = make_fetches(images, labels)
    with tf1.Session(graph=graph) as session:
        return list(iterate_batches(session, fetches, path))


def test_pipeline_failure_is_bad_data(tmp_path):
    path = write_records(tmp_path / "bad.tfrecords", [1, 2, 7])
    with pytest.raises(UserError) as caught:
        run_all(path, lambda images, labels: tf.reduce_sum(images))
    assert not isinstance(caught.value, op_errors.OpFailure)
    assert str(caught.value) == f"bad data in {path}: label id 7 >= num_classes (4)"


def test_other_op_failure_names_the_op(tmp_path):
    path = write_records(tmp_path / "good.tfrecords", [1, 2, 3])

    def failing_model(images, labels):
        # A reshape that cannot hold the batch: fails after the data were read.
        return tf.reshape(images, [5, -1], name="model_reshape")

    with pytest.raises(op_errors.OpFailure) as caught:
        run_all(path, failing_model)
    message = str(caught.value)
    assert message.startswith("TensorFlow op model_reshape (Reshape) failed: "
                              "InvalidArgumentError: ")
    assert "bad data" not in message and "\n" not in message
    assert caught.value.exit_status == 1


def test_good_data_runs_to_the_end(tmp_path):
    path = write_records(tmp_path / "good.tfrecords", [1, 2, 3])
    batches = run_all(path, lambda images, labels: tf.shape(labels)[0])
    assert batches == [2, 1]


def test_one_way_to_quote_a_tensorflow_error():
    """common/errors.py keeps TensorFlow's own lines, without the frame,
    node, stack trace and tf.data context it adds (docs/errors.md)."""
    exc = tf.errors.InvalidArgumentError(None, None, (
        "Graph execution error:\n\nDetected at node 'x' defined at (most recent call last):\n"
        "  File \"train.py\", line 1, in <module>\n"
        "Node: 'x'\n"
        "{{function_node __wrapped}} Iterator::Root::Map: label id 7 >= num_classes (4)\n"
        "\t second line of the cause\n"
        "\t [[{{node IteratorGetNext}}]]\n"
        "Original stack trace for 'x':\n  File \"y.py\", line 2"))
    assert message_lines(exc) == [
        "{{function_node __wrapped}} Iterator::Root::Map: label id 7 >= num_classes (4)",
        "second line of the cause"]
    assert first_message_line(exc) == "label id 7 >= num_classes (4)"
    assert error_line(exc) == "InvalidArgumentError: label id 7 >= num_classes (4)"
    assert error_text(ValueError("plain")) == "plain"
    assert first_message_line(ValueError("")) == "ValueError"
    assert one_line(ValueError("two\n  lines")) == "two lines"

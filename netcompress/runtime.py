"""Process set-up shared by the scripts, done before TensorFlow is imported."""

import os


def quiet_tensorflow():
    # TF's C++ start-up chatter hides the script's own output.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def graph_mode():
    import tensorflow as tf

    tf.get_logger().setLevel("ERROR")
    tf.compat.v1.disable_eager_execution()

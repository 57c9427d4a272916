"""Process set-up shared by the scripts, done before TensorFlow is imported."""

import os
import sys


def quiet_tensorflow():
    # TF's C++ start-up chatter hides the script's own output.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def _import_tensorflow_silently():
    """Import TensorFlow with file descriptor 2 pointed at /dev/null: its C++
    start-up lines (absl, oneDNN) ignore TF_CPP_MIN_LOG_LEVEL, and would
    surround a script's one-line error messages."""
    if "tensorflow" in sys.modules:
        return sys.modules["tensorflow"]
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        import tensorflow
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)
    return tensorflow


def import_tensorflow_quietly():
    """Import TensorFlow with none of its start-up or deprecation lines:
    every script's entry calls this (or graph_mode) before anything imports
    TensorFlow. Returns the module."""
    quiet_tensorflow()
    tf = _import_tensorflow_silently()
    tf.get_logger().setLevel("ERROR")
    return tf


def graph_mode():
    import_tensorflow_quietly().compat.v1.disable_eager_execution()

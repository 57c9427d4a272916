"""The one error type that scripts turn into a one-line message, the exit
statuses scripts end with, and the one way a TensorFlow error's message is
put on one line (docs/errors.md)."""

import re

USER_ERROR_EXIT = 2
INTERRUPT_EXIT = 130  # 128 + SIGINT, what shells report for Ctrl-C


class UserError(Exception):
    """Bad input from the user (config, file, model_def, data).

    Scripts catch it at the top, print ``error: <message>`` on one line to
    stderr and exit with status 2, without a traceback.
    """


def one_line(exc):
    """Any exception's whole text on one line (its lines joined); for a
    TensorFlow error, error_line."""
    return " ".join(str(exc).split()) or type(exc).__name__


# ---- TensorFlow's errors on one line -----------------------------------------
# Read by duck typing (``exc.message``, what tf.errors.OpError carries): this
# module is below dataset/ and netcompress/ and imports no TensorFlow.

# Lines TensorFlow writes around an error's own: the graph-execution frame,
# the node it surfaced at, Python stack traces.
_TF_NOISE_LINE = re.compile(
    r"^(Graph execution error:|Detected at node|Node: |File \"|\[\[|Original stack trace)")
# tf.data's context before its own message ("...Iterator::Root::Map: ").
_TF_CONTEXT_PREFIX = re.compile(r"^.*?Iterator::[\w:]+: ")


def error_text(exc):
    """The whole message of ``exc``: TensorFlow's ``exc.message``, else str(exc)."""
    return getattr(exc, "message", None) or str(exc)


def message_lines(exc):
    """The lines of ``exc``'s message that are its own (stripped, in order),
    up to the stack trace TensorFlow appends."""
    lines = []
    for line in error_text(exc).splitlines():
        line = line.strip()
        if line.startswith("Original stack trace"):
            break
        if line and not _TF_NOISE_LINE.match(line):
            lines.append(line)
    return lines


def first_message_line(exc):
    """``exc``'s first own line, without tf.data's context; its type name
    when the message has none."""
    lines = message_lines(exc)
    return _TF_CONTEXT_PREFIX.sub("", lines[0]) if lines else type(exc).__name__


def error_line(exc):
    """``Type: first own line``: how an op failure is named in one line."""
    return f"{type(exc).__name__}: {first_message_line(exc)}"

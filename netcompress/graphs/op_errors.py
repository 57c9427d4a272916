"""Failures of a session run, reported as what they are (docs/errors.md).

Only an error raised by the input pipeline (the iterator's get-next op: a
record that does not parse, a wrong size, a label id out of range) or a
corrupt record file is "bad data in FILE". Any other op failure names the
op and TensorFlow's message, on one line.
"""

import contextlib
import re

import tensorflow as tf

from dataset.records import data_error_from
from common.errors import UserError, error_line, error_text

INPUT_PIPELINE_OPS = ("IteratorGetNext", "IteratorGetNextSync", "IteratorGetNextAsOptional")


class OpFailure(UserError):
    """A TensorFlow op other than the input pipeline failed: not the data's
    fault (a missing kernel, memory, a bug). Scripts exit with status 1."""

    exit_status = 1


# The graph node a failure surfaced at: "[[{{node NAME}}]]" or "[[NAME]]" on
# the message's last line. A tf.data failure has no ``exc.op``: the node is
# the iterator's get-next op.
_NODE_CONTEXT = re.compile(r"\[\[(?:\{\{node )?([^\]{}]+?)(?:\}\})?\]\]\s*$")


def failed_op(exc, graph=None):
    """The graph op that raised ``exc`` (None if it cannot be told)."""
    if getattr(exc, "op", None) is not None:
        return exc.op
    found = _NODE_CONTEXT.search(error_text(exc))
    if found is None or graph is None:
        return None
    try:
        return graph.get_operation_by_name(found.group(1))
    except KeyError:
        return None


def session_error_from(exc, data_path, graph=None):
    """One-line UserError for ``exc``, a tf.errors.OpError from a session run
    of ``graph`` that reads ``data_path`` through tf.data."""
    op = failed_op(exc, graph)
    if isinstance(exc, tf.errors.DataLossError) or (op is not None
                                                     and op.type in INPUT_PIPELINE_OPS):
        return data_error_from(exc, data_path)
    where = f"op {op.name} ({op.type})" if op is not None else "an op"
    return OpFailure(f"TensorFlow {where} failed: {error_line(exc)}")


@contextlib.contextmanager
def reported(data_path, graph):
    """Turn op errors raised inside the block (session runs of ``graph``)
    into one-line errors; the end of a dataset (OutOfRangeError) passes
    through."""
    try:
        yield
    except tf.errors.OutOfRangeError:
        raise
    except tf.errors.OpError as exc:
        raise session_error_from(exc, data_path, graph) from None

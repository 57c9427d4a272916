"""Checkpoint reading, name-based restoring and model/checkpoint matching."""

import os

import numpy as np
import tensorflow as tf

from models.architecture import OUTER_SCOPE
from netcompress.errors import UserError

tf1 = tf.compat.v1


def checkpoint_key(name):
    """Variable or checkpoint name without the ':0' output suffix."""
    return name[:-2] if name.endswith(":0") else name


def resolve_checkpoint(path):
    """A checkpoint prefix, or a directory -> its newest checkpoint prefix."""
    if os.path.isdir(path):
        latest = tf1.train.latest_checkpoint(path)
        if latest is None:
            raise UserError(f"no checkpoint found in directory {path}")
        return latest
    if not os.path.exists(path + ".index"):
        raise UserError(f"checkpoint not found: {path} (no {path}.index)")
    return path


def read_checkpoint(path):
    """{name without ':0': numpy array} of every tensor in a checkpoint."""
    prefix = resolve_checkpoint(path)
    reader = tf1.train.NewCheckpointReader(prefix)
    return {checkpoint_key(name): reader.get_tensor(name)
            for name in reader.get_variable_to_shape_map()}


def checkpoint_shapes(path):
    reader = tf1.train.NewCheckpointReader(resolve_checkpoint(path))
    return {checkpoint_key(name): tuple(shape)
            for name, shape in reader.get_variable_to_shape_map().items()}


def model_variables(graph=None):
    """The network's variables (optimizer slots excluded)."""
    graph = graph or tf1.get_default_graph()
    return [v for v in graph.get_collection(tf1.GraphKeys.GLOBAL_VARIABLES, OUTER_SCOPE + "/")
            if not _is_optimizer_slot(checkpoint_key(v.name))]


def _is_optimizer_slot(name):
    return name.rsplit("/", 1)[-1].startswith("Adam")


def check_matches(path, variables, model_name="model_def", optional_scopes=()):
    """Every model variable is in the checkpoint with the same shape, and the
    checkpoint has no model variable the graph lacks (optimizer slots and
    ``optional_scopes``, e.g. aux heads not built for inference, aside);
    else a one-line UserError naming the first mismatch."""
    shapes = checkpoint_shapes(path)
    graph_names = set()
    for variable in variables:
        name = checkpoint_key(variable.name)
        graph_names.add(name)
        want = tuple(variable.shape.as_list())
        if name not in shapes:
            raise UserError(f"checkpoint {path} does not match the {model_name}: it has no "
                            f"variable {name} (shape {list(want)})")
        if shapes[name] != want:
            raise UserError(f"checkpoint {path} does not match the {model_name}: {name} is "
                            f"{list(shapes[name])} in the checkpoint but {list(want)} in the "
                            f"model")
    extra = sorted(n for n in shapes if n.startswith(OUTER_SCOPE + "/")
                   and n not in graph_names and not _is_optimizer_slot(n)
                   and not any(n.startswith(f"{OUTER_SCOPE}/{s}/") for s in optional_scopes))
    if extra:
        raise UserError(f"checkpoint {path} does not match the {model_name}: it has "
                        f"{len(extra)} variable(s) the model lacks, first {extra[0]} "
                        f"(a mask file missing or wrong?)")


def assign_values(session, values_by_variable):
    """Load numpy values into variables in one session run.

    Through each variable's own initializer, fed the value (what
    ``Variable.load`` does): no new ops, so it works on a finalized graph
    (the training graph is finalized before ``intialize`` restores into it)."""
    if not values_by_variable:
        return
    ops, feed = [], {}
    for variable, value in values_by_variable.items():
        ops.append(variable.initializer)
        feed[variable.initializer.inputs[1]] = value
    session.run(ops, feed)


def restore_strict(session, path, variables, model_name="model_def", optional_scopes=()):
    """Restore every variable by name from a checkpoint that must match."""
    check_matches(path, variables, model_name, optional_scopes)
    values = read_checkpoint(path)
    assign_values(session, {v: values[checkpoint_key(v.name)] for v in variables})


def restore_matching(session, path, variables):
    """Restore by name whatever matches (keys with or without ':0').

    Returns (restored variable names, graph variables not restored with why).
    """
    values = read_checkpoint(path)
    restored, missing, assign = [], [], {}
    for variable in variables:
        name = checkpoint_key(variable.name)
        want = tuple(variable.shape.as_list())
        if name not in values:
            missing.append(f"{name} (not in checkpoint)")
        elif tuple(values[name].shape) != want:
            missing.append(f"{name} (shape {list(values[name].shape)} in checkpoint, "
                           f"{list(want)} in graph)")
        else:
            assign[variable] = values[name]
            restored.append(name)
    assign_values(session, assign)
    return restored, missing


def write_checkpoint(values, path):
    """Write ``{name: array}`` as a TF checkpoint at prefix ``path`` (plus the
    directory's 'checkpoint' state file), through a temporary prefix."""
    graph = tf.Graph()
    with graph.as_default():
        # Graph names are generic: checkpoint keys may hold ':0', op names may not.
        variables = {name: tf1.Variable(tf.zeros(np.shape(value), np.asarray(value).dtype),
                                        name=f"v{i}", trainable=False)
                     for i, (name, value) in enumerate(values.items())}
        saver = tf1.train.Saver(variables, write_version=tf1.train.SaverDef.V2)
        with tf1.Session(graph=graph) as session:
            assign_values(session, {variables[n]: v for n, v in values.items()})
            directory = os.path.dirname(os.path.abspath(path))
            os.makedirs(directory, exist_ok=True)
            tmp_prefix = os.path.join(directory, f".tmp{os.getpid()}-{os.path.basename(path)}")
            saver.save(session, tmp_prefix, write_meta_graph=False,
                       write_state=False)
    for suffix in (".index", ".data-00000-of-00001"):
        os.replace(tmp_prefix + suffix, path + suffix)
    tf1.train.update_checkpoint_state(directory, os.path.abspath(path))
    return path

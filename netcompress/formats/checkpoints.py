"""Checkpoint reading, name-based restoring and model/checkpoint matching."""

import contextlib
import os

import numpy as np
import tensorflow as tf

from models.architecture import OUTER_SCOPE
from common.errors import UserError, error_line, first_message_line
from common.files import staged
from netcompress.formats.description import KEY as DESCRIPTION_KEY
from netcompress.formats.checkpoint_paths import CHECKPOINT_SUFFIXES, checkpoint_files, \
    record_in_state_file, resolve_checkpoint

tf1 = tf.compat.v1

# What TensorFlow's checkpoint reader raises on a damaged or foreign file
# (IndexError: a truncated .data file); none of the damage tried in
# tests/test_faults.py aborts the process. description.py reads with them too.
READER_ERRORS = (tf.errors.OpError, IndexError, ValueError, RuntimeError, OSError)


def checkpoint_key(name):
    """Variable or checkpoint name without the ':0' output suffix."""
    return name[:-2] if name.endswith(":0") else name


def _tf_reason(exc):
    """The first own line of a TensorFlow reader error."""
    reason = first_message_line(exc)
    if isinstance(exc, IndexError):  # what the reader raises on a short .data file
        reason = f"its data file is truncated or damaged ({reason})"
    return reason


def damaged_error(prefix, exc, detail=""):
    """One-line UserError for ``exc``, one of READER_ERRORS, on ``prefix``."""
    return UserError(f"checkpoint {prefix} is damaged or not a TensorFlow checkpoint"
                     f"{detail}: {_tf_reason(exc)}")


def _open_reader(path):
    """(resolved prefix, reader, {checkpoint name: shape})."""
    prefix = resolve_checkpoint(path)
    try:
        reader = tf1.train.NewCheckpointReader(prefix)
        shapes = reader.get_variable_to_shape_map()
    except READER_ERRORS as exc:
        raise damaged_error(prefix, exc) from None
    return prefix, reader, shapes


_shared_reads = {}  # read_once: {checkpoint prefix: its values, or None until read}


@contextlib.contextmanager
def read_once(prefix):
    """Within the block, the values of checkpoint ``prefix`` are read from
    disk once and shared, read-only, by every read_checkpoint of it (a
    compress stage's rank pass, gated graph and pruning all read its model)."""
    key = os.path.realpath(prefix)
    if key in _shared_reads:  # an outer block shares it already
        yield
        return
    _shared_reads[key] = None
    try:
        yield
    finally:
        del _shared_reads[key]


def read_checkpoint(path):
    """{name without ':0': numpy array} of every tensor in a checkpoint.

    Refuses a checkpoint with NaN or inf in a variable (optimizer slots
    aside): every reader (evaluation, ranking, pruning, ``intialize``) would
    otherwise carry them on silently."""
    key = os.path.realpath(path)
    if key not in _shared_reads:
        return _read_values(path)
    if _shared_reads[key] is None:
        values = _read_values(path)
        for value in values.values():
            if isinstance(value, np.ndarray):
                value.flags.writeable = False  # shared: a reader must copy to change it
        _shared_reads[key] = values
    return dict(_shared_reads[key])


def _read_values(path):
    prefix, reader, shapes = _open_reader(path)
    values = {}
    # The description (netcompress/formats/description.py) is no tensor of the model.
    for name in sorted(set(shapes) - {DESCRIPTION_KEY}):
        try:
            value = reader.get_tensor(name)
        except READER_ERRORS as exc:
            raise damaged_error(prefix, exc, f" (reading {checkpoint_key(name)})") from None
        key = checkpoint_key(name)
        if (isinstance(value, np.ndarray) and value.dtype.kind in "fc"
                and not _is_optimizer_slot(key) and not np.isfinite(value).all()):
            raise UserError(f"checkpoint {prefix} has non-finite values in {key}: it is "
                            f"not usable (diverged training?)")
        values[key] = value
    return values


def checkpoint_shapes(path):
    _, _, shapes = _open_reader(path)
    return {checkpoint_key(name): tuple(shape) for name, shape in shapes.items()}


def model_variables(graph=None):
    """The network's variables (optimizer slots excluded)."""
    graph = graph or tf1.get_default_graph()
    return [v for v in graph.get_collection(tf1.GraphKeys.GLOBAL_VARIABLES, OUTER_SCOPE + "/")
            if not _is_optimizer_slot(checkpoint_key(v.name))]


def _is_optimizer_slot(name):
    return name.rsplit("/", 1)[-1].startswith("Adam")


def check_matches(path, variables, model_name="model_def", optional_scopes=(),
                  widened=None):
    """Every model variable is in the checkpoint with the same shape, and the
    checkpoint has no model variable the graph lacks (optimizer slots and
    ``optional_scopes``, e.g. aux heads not built for inference, aside);
    else a one-line UserError naming the first mismatch. ``widened``:
    {variable name: (kept, width)} of kernels the graph holds at ``width``
    output channels and the checkpoint at ``len(kept)`` (folded masks)."""
    shapes = checkpoint_shapes(path)
    widened = widened or {}
    graph_names = set()
    for variable in variables:
        name = checkpoint_key(variable.name)
        graph_names.add(name)
        want = tuple(variable.shape.as_list())
        if name in widened:
            want = want[:-1] + (len(widened[name][0]),)
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
        # A tf.distribute variable holds one copy per replica: set each.
        for copy in getattr(variable, "values", None) or (variable,):
            ops.append(copy.initializer)
            feed[copy.initializer.inputs[1]] = value
    session.run(ops, feed)


def widen_output_channels(kernel, kept, width):
    """numpy twin of models.layers.scatter_output_channels: ``kernel``'s
    output channels at positions ``kept`` of ``width``, zeros elsewhere."""
    wide = np.zeros(kernel.shape[:-1] + (width,), kernel.dtype)
    wide[..., np.asarray(kept, np.int64)] = kernel
    return wide


def restore_strict(session, path, variables, model_name="model_def", optional_scopes=(),
                   widened=None):
    """Restore every variable by name from a checkpoint that must match;
    the ``widened`` kernels (see check_matches) are widened once, here.
    Returns the checkpoint's values as read (read_checkpoint), so that a
    caller needing them (the rank pass's filter norms) reads them once."""
    widened = widened or {}
    check_matches(path, variables, model_name, optional_scopes, widened)
    values = read_checkpoint(path)
    assign = {}
    for variable in variables:
        name = checkpoint_key(variable.name)
        value = values[name]
        if name in widened:
            value = widen_output_channels(value, *widened[name])
        assign[variable] = value
    assign_values(session, assign)
    return values


def restore_model(session, path, variables, model_def_path, model):
    """restore_strict for the graph of ``model`` (a model class instance),
    whose checkpoint may hold the auxiliary heads its declaration names and
    the graph does not build (inference); its folded_kernels() are widened.
    Returns the values read (restore_strict)."""
    name = f"model_def {model_def_path}" if model_def_path else "model the checkpoint describes"
    return restore_strict(session, path, variables, model_name=name,
                          optional_scopes=model.architecture.aux_scopes(),
                          widened=model.folded_kernels())


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


def write_checkpoint(values, path, description=None):
    """Write ``{name: array}`` as a TF checkpoint at prefix ``path``, through
    staging files (common/files.py); the directory's state file names it only when the
    directory has none of another run (see record_in_state_file). ``description``:
    the JSON text of netcompress/formats/description.py, which every checkpoint the
    project writes carries (only tests write without)."""
    graph = tf.Graph()
    with graph.as_default():
        # Graph names are generic: checkpoint keys may hold ':0', op names may not.
        variables = {name: tf1.Variable(tf.zeros(np.shape(value), np.asarray(value).dtype),
                                        name=f"v{i}", trainable=False)
                     for i, (name, value) in enumerate(values.items())}
        if description is not None:
            variables[DESCRIPTION_KEY] = tf1.Variable(description, dtype=tf.string,
                                                      name="description", trainable=False)
        saver = tf1.train.Saver(variables, write_version=tf1.train.SaverDef.V2)
        with tf1.Session(graph=graph) as session:
            if description is not None:
                session.run(variables[DESCRIPTION_KEY].initializer)
            assign_values(session, {variables[n]: v for n, v in values.items()})
            try:
                with staged() as staging:
                    places = [staging.place(f, key=f.endswith(CHECKPOINT_SUFFIXES[0]))
                              for f in checkpoint_files(path)]
                    staged_prefix = places[0][:-len(CHECKPOINT_SUFFIXES[0])]
                    saver.save(session, staged_prefix, write_meta_graph=False,
                               write_state=False)
            except (OSError, tf.errors.OpError) as exc:
                # TensorFlow's reason (disk full) follows its graph context.
                reason = getattr(exc, "strerror", None) or error_line(exc)
                raise UserError(f"cannot write checkpoint {path}: {reason}") from None
    record_in_state_file(path)
    return path



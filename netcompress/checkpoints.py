"""Checkpoint reading, name-based restoring and model/checkpoint matching."""

import glob
import os

import numpy as np
import tensorflow as tf
from google.protobuf import text_format
from tensorflow.python.training.checkpoint_state_pb2 import CheckpointState

from models.architecture import OUTER_SCOPE
from netcompress.errors import UserError
from netcompress.files import make_directory, remove_quietly, replace_atomically
from netcompress.outputs import CHECKPOINT_SUFFIXES, STATE_FILE

tf1 = tf.compat.v1

# What TensorFlow's checkpoint reader raises on a damaged or foreign file
# (IndexError: a truncated .data file); none of the damage tried in
# tests/test_faults.py aborts the process.
_READER_ERRORS = (tf.errors.OpError, IndexError, ValueError, RuntimeError, OSError)


def checkpoint_key(name):
    """Variable or checkpoint name without the ':0' output suffix."""
    return name[:-2] if name.endswith(":0") else name


def resolve_checkpoint(path):
    """A checkpoint prefix, or a directory -> its newest checkpoint prefix.

    The prefix's files must be there and non-empty; a directory's
    ``checkpoint`` state file is parsed here, so that an empty or damaged one
    is a one-line UserError rather than TensorFlow's exception or silence
    (docs/errors.md)."""
    if os.path.isdir(path):
        state = read_state(path)
        if state is None:
            raise UserError(f"no checkpoint found in directory {path} (it has no "
                            f"'{STATE_FILE}' state file; give a checkpoint prefix such as "
                            f"{os.path.join(path, 'model.ckpt-1000')})")
        prefix = path_in_directory(path, state.model_checkpoint_path)
        _check_files(prefix, f"checkpoint {prefix} (named by "
                             f"{os.path.join(path, STATE_FILE)})")
        return prefix
    _check_files(path, f"checkpoint {path}")
    return path


def read_state(directory):
    """The CheckpointState of ``directory``'s state file, None when there is
    none; UserError when it is unreadable, damaged or names no checkpoint."""
    state_path = os.path.join(directory, STATE_FILE)
    if not os.path.lexists(state_path):
        return None
    hint = "give a checkpoint prefix instead of the directory, or delete the state file"
    if not os.path.isfile(state_path):
        raise UserError(f"checkpoint state file {state_path} is not a file; {hint}")
    try:
        with open(state_path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError:
        raise UserError(f"checkpoint state file {state_path} is damaged (not text); "
                        f"{hint}") from None
    except OSError as exc:
        raise UserError(f"cannot read checkpoint state file {state_path}: "
                        f"{exc.strerror or exc}") from None
    state = CheckpointState()
    try:
        text_format.Parse(text, state)
    except text_format.ParseError as exc:
        raise UserError(f"checkpoint state file {state_path} is damaged ({exc}); "
                        f"{hint}") from None
    if not state.model_checkpoint_path:
        raise UserError(f"checkpoint state file {state_path} names no checkpoint "
                        f"({'it is empty' if not text.strip() else 'no model_checkpoint_path'}"
                        f"); {hint}")
    return state


def path_in_directory(directory, name):
    """A state file's path: relative ones are relative to its directory."""
    return name if os.path.isabs(name) else os.path.join(directory, name)


def _check_files(prefix, what):
    """The .index and .data files are there and plausible before TensorFlow
    opens them (its messages do not say which file is missing)."""
    index = prefix + ".index"
    if not os.path.exists(index):
        raise UserError(f"{what} not found (no {index})")
    if not os.path.isfile(index):
        raise UserError(f"{what} is not usable: {index} is not a file")
    if os.path.getsize(index) == 0:
        raise UserError(f"{what} is damaged: {index} is empty")
    shards = glob.glob(glob.escape(prefix) + ".data-?????-of-?????")
    if not shards:
        raise UserError(f"{what} is incomplete: {prefix}.data-00000-of-00001 is missing")
    for shard in shards:
        if not os.path.isfile(shard):
            raise UserError(f"{what} is not usable: {shard} is not a file")


def _tf_reason(exc):
    """The first meaningful line of a TensorFlow reader error."""
    message = getattr(exc, "message", None) or str(exc)
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    reason = lines[0] if lines else type(exc).__name__
    if isinstance(exc, IndexError):  # what the reader raises on a short .data file
        reason = f"its data file is truncated or damaged ({reason})"
    return reason


def _damaged(prefix, exc, detail=""):
    return UserError(f"checkpoint {prefix} is damaged or not a TensorFlow checkpoint"
                     f"{detail}: {_tf_reason(exc)}")


def _open_reader(path):
    """(resolved prefix, reader, {checkpoint name: shape})."""
    prefix = resolve_checkpoint(path)
    try:
        reader = tf1.train.NewCheckpointReader(prefix)
        shapes = reader.get_variable_to_shape_map()
    except _READER_ERRORS as exc:
        raise _damaged(prefix, exc) from None
    return prefix, reader, shapes


def read_checkpoint(path):
    """{name without ':0': numpy array} of every tensor in a checkpoint.

    Refuses a checkpoint with NaN or inf in a variable (optimizer slots
    aside): every reader (evaluation, ranking, pruning, ``intialize``) would
    otherwise carry them on silently."""
    prefix, reader, shapes = _open_reader(path)
    values = {}
    for name in sorted(shapes):
        try:
            value = reader.get_tensor(name)
        except _READER_ERRORS as exc:
            raise _damaged(prefix, exc, f" (reading {checkpoint_key(name)})") from None
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
    """Write ``{name: array}`` as a TF checkpoint at prefix ``path``, through
    a temporary prefix; the directory's state file names it only when the
    directory has none of another run (see record_in_state_file)."""
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
            make_directory(directory)
            tmp_prefix = os.path.join(directory, f".tmp{os.getpid()}-{os.path.basename(path)}")
            try:
                saver.save(session, tmp_prefix, write_meta_graph=False, write_state=False)
                for suffix in CHECKPOINT_SUFFIXES:
                    os.replace(tmp_prefix + suffix, path + suffix)
            except (OSError, tf.errors.OpError) as exc:
                raise UserError(f"cannot write checkpoint {path}: "
                                f"{getattr(exc, 'strerror', None) or _tf_reason(exc)}") \
                    from None
            finally:
                for leftover in glob.glob(glob.escape(tmp_prefix) + ".*"):
                    remove_quietly(leftover)
    record_in_state_file(path)
    return path


def record_in_state_file(prefix):
    """Make the directory's ``checkpoint`` state file name ``prefix`` (by its
    base name, as TensorFlow's Saver does: a copied directory then names its
    own files), unless the directory already has a state file naming other
    checkpoints (another run's, or one that cannot be read): that one is
    left as it is and the new checkpoint is used by its prefix. Returns
    whether the state file was written."""
    directory = os.path.dirname(os.path.abspath(prefix))
    name = os.path.basename(prefix)
    if name == STATE_FILE:
        return False  # the state file would shadow the checkpoint's own name
    if os.path.lexists(os.path.join(directory, STATE_FILE)):
        try:
            state = read_state(directory)
        except UserError:
            return False
        target = os.path.realpath(os.path.join(directory, name))
        named = [state.model_checkpoint_path, *state.all_model_checkpoint_paths]
        if any(os.path.realpath(path_in_directory(directory, p)) != target for p in named):
            return False
    state = CheckpointState(model_checkpoint_path=name, all_model_checkpoint_paths=[name])
    text = text_format.MessageToString(state)

    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
    replace_atomically(os.path.join(directory, STATE_FILE), write)
    return True

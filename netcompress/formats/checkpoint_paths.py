"""Where checkpoints are: prefixes, directories, their state files
(docs/outputs.md). The one module that turns a config's checkpoint path
into files; TensorFlow is imported only to parse or write a state file."""

import glob
import os
import re

from common.errors import UserError
from common.files import interrupted_commit, replace_atomically

CHECKPOINT_SUFFIXES = (".index", ".data-00000-of-00001")
STATE_FILE = "checkpoint"  # TensorFlow's checkpoint state file in a checkpoint directory


def checkpoint_files(prefix):
    """The files of a checkpoint prefix (written or read)."""
    return [prefix + suffix for suffix in CHECKPOINT_SUFFIXES]


def input_checkpoint_files(path):
    """Files a checkpoint input (a prefix, or a directory with a state file)
    reads; [] when there is none yet (the reader reports that itself)."""
    if path is None:
        return []
    if os.path.isdir(path):
        files = [os.path.join(path, STATE_FILE)]
        for name in os.listdir(path):
            if name.endswith(CHECKPOINT_SUFFIXES[0]):
                files += checkpoint_files(os.path.join(path, name[:-len(".index")]))
        return files
    return checkpoint_files(path)


def checkpoint_exists(path):
    """True if `path` names a TF checkpoint: a prefix with `<prefix>.index`,
    or a directory holding a `checkpoint` state file."""
    if not path:
        return False
    if os.path.isfile(path + ".index"):
        return True
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, STATE_FILE))


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
    from google.protobuf import text_format
    from tensorflow.python.training.checkpoint_state_pb2 import CheckpointState

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
        pending = interrupted_commit(index)
        if pending:  # docs/outputs.md, "Results of several files"
            raise UserError(f"{what} is not there: the run replacing it stopped before it "
                            f"finished; its new files are complete in {pending}, and the "
                            f"next run writing into {os.path.dirname(pending)} (a pruning, "
                            f"an export, a checkpoint) moves them in")
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


CHECKPOINT_BASENAME = "model.ckpt"  # what training names its checkpoints


def checkpoint_prefix(checkpoint):
    """Config `checkpoint` -> (directory, prefix). An existing directory, a
    path ending in '/', or a path that is neither an existing checkpoint
    prefix nor named like one ('.ckpt' in its name) is a directory, created
    if needed (as the original): checkpoints go to DIR/model.ckpt-STEP."""
    path = checkpoint.rstrip(os.sep) or os.sep
    named_like_prefix = ".ckpt" in os.path.basename(path) or glob.glob(glob.escape(path)
                                                                       + "-*.index")
    if checkpoint.endswith(os.sep) or os.path.isdir(path) or not named_like_prefix:
        return path, os.path.join(path, CHECKPOINT_BASENAME)
    return os.path.dirname(path) or ".", path


def latest_of_run(directory, prefix):
    """The newest `prefix-STEP` checkpoint the directory's state file names,
    or None when there is none. A state file naming anything else (a pruned
    checkpoint, another run's prefix) is refused: resuming from it would
    restore another model or miss the optimizer state."""
    state = read_state(directory) if os.path.isdir(directory) else None
    if state is None:
        return None
    latest = path_in_directory(directory, state.model_checkpoint_path)
    if not re.fullmatch(re.escape(os.path.basename(prefix)) + r"-\d+", os.path.basename(latest)):
        raise UserError(f"checkpoint directory {directory} already holds {latest}, which is "
                        f"not a checkpoint of this run ({prefix}-STEP): give an empty or new "
                        f"checkpoint directory (to start from its weights, set intialize: "
                        f"{latest})")
    return latest


def checkpoint_directory(path):
    """The directory of a checkpoint prefix, or the directory itself (real path)."""
    return os.path.realpath(path if os.path.isdir(path) else os.path.dirname(path) or ".")


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
    from google.protobuf import text_format
    from tensorflow.python.training.checkpoint_state_pb2 import CheckpointState

    state = CheckpointState(model_checkpoint_path=name, all_model_checkpoint_paths=[name])
    text = text_format.MessageToString(state)

    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
    replace_atomically(os.path.join(directory, STATE_FILE), write)
    return True

"""What a script may write, checked before any work starts (docs/outputs.md).

Every script names its inputs and outputs as concrete files (a checkpoint is
its ``.index`` and ``.data`` files); ``check_outputs`` resolves them to real
paths (symlinks followed) and refuses an output that is, or would replace,
an input or another output, that is an existing directory, or whose parent
is not a writable directory. ``staged`` writes a multi-file result next to
its final places and moves it in only once all of it is written.
"""

import contextlib
import os
import shutil
import tempfile

from netcompress.errors import UserError

CHECKPOINT_SUFFIXES = (".index", ".data-00000-of-00001")
STATE_FILE = "checkpoint"  # TensorFlow's checkpoint state file in a checkpoint directory


def real(path):
    return os.path.realpath(os.path.expanduser(str(path)))


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


def _nearest_existing(path):
    directory = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(directory):
        parent = os.path.dirname(directory)
        if parent == directory:
            break
        directory = parent
    return directory


def _check_writable_place(key, path):
    if os.path.isdir(path):
        raise UserError(f"{key} {path!r} is a directory; give a file path")
    parent = _nearest_existing(path)
    if not os.path.isdir(parent):
        raise UserError(f"{key} {path!r}: {parent!r} is a file, not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"{key} {path!r}: directory {parent!r} is not writable")


def check_outputs(outputs, inputs):
    """``outputs`` / ``inputs``: {key: [file paths]} (a key names the config
    key or option, for the message). Raises a one-line UserError on the
    first output file that is an input file, another output's file, an
    existing directory, or not writable."""
    owner_of_input = {}
    for key, paths in inputs.items():
        for path in paths:
            owner_of_input.setdefault(real(path), (key, path))
    owner_of_output = {}
    for key, paths in outputs.items():
        for path in paths:
            resolved = real(path)
            if resolved in owner_of_input:
                input_key, input_path = owner_of_input[resolved]
                raise UserError(f"{key} {path!r} would replace the input {input_key} "
                                f"{input_path!r}: choose another path")
            if resolved in owner_of_output and owner_of_output[resolved][0] != key:
                other_key, other_path = owner_of_output[resolved]
                raise UserError(f"{key} {path!r} and {other_key} {other_path!r} are the "
                                f"same file: choose different paths")
            owner_of_output[resolved] = (key, path)
            _check_writable_place(key, path)


class Staging:
    """Temporary places for a set of final files; see ``staged``."""

    def __init__(self):
        self._moves = []  # (temporary path, final path)
        self._directories = {}

    def place(self, final):
        """A temporary path to write ``final``'s content to, in a hidden
        directory beside it (same file system: the final move is a rename)."""
        directory = os.path.dirname(os.path.abspath(final))
        os.makedirs(directory, exist_ok=True)
        if directory not in self._directories:
            self._directories[directory] = tempfile.mkdtemp(prefix=".staging-", dir=directory)
        temporary = os.path.join(self._directories[directory], os.path.basename(final))
        self._moves.append((temporary, final))
        return temporary

    def commit(self):
        missing = [final for temporary, final in self._moves if not os.path.exists(temporary)]
        if missing:
            raise RuntimeError(f"staged output never written: {missing[0]}")
        for temporary, final in self._moves:
            os.replace(temporary, final)

    def discard(self):
        for directory in self._directories.values():
            shutil.rmtree(directory, ignore_errors=True)


@contextlib.contextmanager
def staged():
    """Write a multi-file result through ``staging.place(final)``; when the
    block ends without error every file is renamed into place (renames
    only: the set changes within microseconds, and a failure while writing
    leaves every previous file untouched)."""
    staging = Staging()
    try:
        yield staging
        staging.commit()
    finally:
        staging.discard()

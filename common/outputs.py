"""What a script may write, checked before any work starts (docs/outputs.md).

Every script names its inputs and outputs as concrete files (a checkpoint is
its ``.index`` and ``.data`` files); ``check_outputs`` resolves them to real
paths (symlinks followed) and refuses an output that is, or would replace,
an input or another output, that is an existing directory, or whose parent
is not a writable directory. How outputs are then written: common/files.py.
"""

import os

from common.errors import UserError

def real(path):
    return os.path.realpath(os.path.expanduser(str(path)))


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

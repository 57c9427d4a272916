"""Writing outputs without ever leaving a half-written or damaged file."""

import contextlib
import os

from netcompress.errors import UserError


def make_directory(directory):
    """os.makedirs, with a one-line UserError saying why it cannot be made
    (an ancestor that is a file, no permission); docs/errors.md."""
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as exc:
        blocker = _first_non_directory(directory)
        if blocker == os.path.abspath(directory):
            raise UserError(f"cannot create directory {directory}: it is a file") from None
        if blocker is not None:
            raise UserError(f"cannot create directory {directory}: parent {blocker} is a "
                            f"file") from None
        raise UserError(f"cannot create directory {directory}: "
                        f"{exc.strerror or exc}") from None


def _first_non_directory(directory):
    """The nearest existing ancestor (or ``directory`` itself) when it is
    not a directory, else None."""
    path = os.path.abspath(directory)
    while not os.path.exists(path):
        parent = os.path.dirname(path)
        if parent == path:
            return None
        path = parent
    return None if os.path.isdir(path) else path


def one_line(exc):
    """An exception's text on one line (for `error: ...` messages)."""
    return " ".join(str(exc).split()) or type(exc).__name__


def numpy_file_kind(path):
    """'npz', 'npy', 'empty' or 'other', from the file's first bytes: np.load
    would try to unpickle anything else and speak of pickled data."""
    with open(path, "rb") as f:
        magic = f.read(6)
    if magic.startswith(b"PK"):
        return "npz"
    if magic == b"\x93NUMPY":
        return "npy"
    return "empty" if not magic else "other"


def replace_atomically(path, write):
    """Call ``write(tmp_path)``, then rename tmp_path to ``path``.

    On any failure the temporary file is removed and ``path`` is untouched;
    an OSError (no directory, no permission, disk full) is a UserError.
    """
    directory = os.path.dirname(os.path.abspath(path))
    make_directory(directory)
    tmp = os.path.join(directory, f".{os.path.basename(path)}.tmp{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    except OSError as exc:
        raise UserError(f"cannot write {path}: {exc.strerror or exc}") from None
    finally:
        remove_quietly(tmp)


def remove_quietly(path):
    with contextlib.suppress(OSError):
        os.remove(path)

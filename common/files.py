"""Writing outputs without ever leaving a half-written or damaged file
(docs/outputs.md): one file through ``atomic_target`` / ``replace_atomically``,
a set of files through ``staged``, a whole directory through
``atomic_directory``. Every module that writes an output uses
these; none renames temporary files itself."""

import contextlib
import os
import shutil
import tempfile

from common.errors import UserError


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


@contextlib.contextmanager
def atomic_target(path):
    """Yield a temporary path beside ``path`` (same file system) to write to;
    when the block ends without error it is renamed to ``path``. On any
    failure the temporary file is removed and ``path`` is untouched."""
    directory = os.path.dirname(os.path.abspath(path))
    make_directory(directory)
    tmp = os.path.join(directory, f".{os.path.basename(path)}.tmp{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        remove_quietly(tmp)


@contextlib.contextmanager
def atomic_directory(path):
    """Yield a hidden directory beside ``path`` to fill; when the block ends
    without error it becomes ``path`` (which must not exist or be empty).
    On any failure it is removed and ``path`` is untouched."""
    parent = os.path.dirname(os.path.abspath(path))
    make_directory(parent)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(os.path.abspath(path))}-",
                               dir=parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(staging, 0o777 & ~umask)  # mkdtemp's 0700 would stay on the result
    try:
        yield staging
        if os.path.isdir(path):
            os.rmdir(path)  # only an empty one: rmdir refuses anything else
        os.replace(staging, path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def replace_atomically(path, write):
    """Call ``write(tmp_path)``, then rename tmp_path to ``path`` (see
    ``atomic_target``); an OSError (no directory, no permission, disk full)
    is a UserError."""
    try:
        with atomic_target(path) as tmp:
            write(tmp)
    except OSError as exc:
        raise UserError(f"cannot write {path}: {exc.strerror or exc}") from None


def remove_quietly(path):
    with contextlib.suppress(OSError):
        os.remove(path)


class Staging:
    """Temporary places for a set of final files; see ``staged``."""

    def __init__(self):
        self._moves = []  # (temporary path, final path)
        self._directories = {}

    def place(self, final):
        """A temporary path to write ``final``'s content to, in a hidden
        directory beside it (same file system: the final move is a rename)."""
        directory = os.path.dirname(os.path.abspath(final))
        make_directory(directory)
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

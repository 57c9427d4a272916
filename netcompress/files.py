"""Writing outputs without ever leaving a half-written or damaged file."""

import contextlib
import os


def replace_atomically(path, write):
    """Call ``write(tmp_path)``, then rename tmp_path to ``path``.

    On any failure the temporary file is removed and ``path`` is untouched.
    """
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f".{os.path.basename(path)}.tmp{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        remove_quietly(tmp)


def remove_quietly(path):
    with contextlib.suppress(OSError):
        os.remove(path)

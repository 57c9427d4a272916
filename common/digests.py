"""Content digests of inputs (docs/outputs.md, "Content identity"): what a
rank file, a compress.py run and the scripts' input lines identify an input
by, so that a path that now holds other content is told apart.

A file's digest is the sha256 of its bytes, read in blocks; it is computed
once per process for a file unchanged since (same real path, size,
modification time and inode; a file modified in the last two seconds is
hashed again each time), so a checkpoint or a record file read by
several steps of one run is hashed once. A checkpoint's digest covers its
``.index`` and ``.data`` files by suffix, not by prefix: a copied checkpoint
has the digest of its original."""

import glob
import hashlib
import os
import time

BLOCK = 1 << 20
RACY_NS = 2 * 10 ** 9  # coarser than any file system's modification times
SHORT = 12  # hex digits shown in messages and input lines

_cache = {}


def file_digest(path):
    """sha256 hex digest of the file at ``path``."""
    real = os.path.realpath(path)
    stat = os.stat(real)
    key = (real, stat.st_size, stat.st_mtime_ns, stat.st_ino)
    if key in _cache:
        return _cache[key]
    started = time.time_ns()
    digest = hashlib.sha256()
    with open(real, "rb") as handle:
        for block in iter(lambda: handle.read(BLOCK), b""):
            digest.update(block)
    # A file modified within the file system's timestamp granularity of the
    # hashing may change again without its key changing: not cached.
    if stat.st_mtime_ns < started - RACY_NS:
        _cache[key] = digest.hexdigest()
    return digest.hexdigest()


def checkpoint_digest(prefix):
    """sha256 over a checkpoint's .index and .data files (the digests of
    each, named by suffix); ``prefix`` is a resolved prefix, not a directory."""
    files = [prefix + ".index"] + sorted(glob.glob(glob.escape(prefix) + ".data-?????-of-?????"))
    digest = hashlib.sha256()
    for path in files:
        digest.update(f"{path[len(prefix):]} {file_digest(path)}\n".encode())
    return digest.hexdigest()


def records_digest(path):
    """The digest of a record file (its bytes)."""
    return file_digest(path)


def short(digest):
    return digest[:SHORT] if digest else "none recorded"


def checkpoint_line(prefix):
    """The line a script prints for the checkpoint it restored."""
    return f"checkpoint: {prefix} (sha256 {short(checkpoint_digest(prefix))})"


def records_line(key, path, count):
    """The line a script prints for a record file it read ``count`` examples of."""
    return (f"{key}: {path}, {count} example{'' if count == 1 else 's'} "
            f"(sha256 {short(records_digest(path))})")

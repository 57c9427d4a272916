"""Writing outputs without ever leaving a half-written or damaged file
(docs/outputs.md): one file through ``atomic_target`` / ``replace_atomically``,
a set of files through ``staged``, a whole directory through
``atomic_directory``. Every module that writes an output uses
these; none renames temporary files itself."""

import contextlib
import fcntl
import glob
import json
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
    failure the temporary file is removed and ``path`` is untouched; one
    that a killed run left for the same path is removed first."""
    directory = os.path.dirname(os.path.abspath(path))
    make_directory(directory)
    base = f".{os.path.basename(path)}.tmp"
    _remove_dead_temporaries(directory, base)
    tmp = os.path.join(directory, f"{base}{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        remove_quietly(tmp)


def _remove_dead_temporaries(directory, base):
    """Remove ``base``PID files whose process is gone (a killed run's)."""
    for name in glob.glob(glob.escape(os.path.join(directory, base)) + "*"):
        pid = name[len(os.path.join(directory, base)):]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            remove_quietly(name)
        except OSError:
            pass  # alive, another user's


@contextlib.contextmanager
def atomic_directory(path):
    """Yield a hidden staging directory beside ``path`` to fill; when the
    block ends without error it becomes ``path`` (which must not exist or
    be empty). On any failure it is removed and ``path`` is untouched;
    killed runs' leftovers beside it are removed first."""
    staging, fd = _new_staging(os.path.dirname(os.path.abspath(path)))
    try:
        yield staging
        if os.path.isdir(path):
            os.rmdir(path)  # only an empty one: rmdir refuses anything else
        os.replace(staging, path)
    finally:
        os.close(fd)
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


# Staging directories (docs/outputs.md, "Results of several files"): hidden,
# beside their final places, locked (flock) by the run that fills them, so
# that a later run into the same place can tell a killed run's leftovers
# from a live run's.
STAGING_PREFIX = ".staging-"
_JOURNAL = ".commit"   # the moves to make, written once every file is complete
_PRIMARY = ".primary"  # in a set's other staging directories: the journal's directory


def _lock(directory):
    """An open descriptor holding ``directory``'s exclusive lock, or None
    when another open description (a live run) holds it."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return None  # not ours to judge (another user's)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


@contextlib.contextmanager
def directory_lock(directory, busy):
    """Hold ``directory``'s exclusive lock (flock) for the block: yields
    True, or False where the file system cannot lock (then nobody can tell
    a live writer's files from a killed one's). UserError ``busy`` when a
    live process holds it."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError as exc:
        raise UserError(f"cannot open directory {directory}: {exc.strerror or exc}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            locked = True
        except BlockingIOError:
            raise UserError(busy) from None
        except OSError:
            locked = False  # e.g. ENOLCK on some network file systems
        yield locked
    finally:
        os.close(fd)


def _new_staging(parent):
    """A locked hidden staging directory in ``parent``, after the leftovers
    of killed runs there are removed: (path, lock descriptor)."""
    make_directory(parent)
    remove_leftovers(parent)
    path = tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o777 & ~umask)  # mkdtemp's 0700 would stay on a renamed directory
    return path, _lock(path)


def _read_journal(staging):
    """The journal that decides ``staging``'s fate, or None (never committed)."""
    directory = staging
    primary = os.path.join(staging, _PRIMARY)
    if os.path.isfile(primary):
        with open(primary, encoding="utf-8") as f:
            directory = os.path.normpath(os.path.join(staging, f.read()))
    try:
        with open(os.path.join(directory, _JOURNAL), encoding="utf-8") as f:
            journal = json.load(f)
    except (OSError, ValueError):
        return None
    # Paths are relative to the journal's directory's parent: a directory
    # moved after a kill is still finished in its new place.
    base = os.path.dirname(os.path.abspath(directory))
    return {"moves": [(os.path.join(base, t), os.path.join(base, f), key)
                      for t, f, key in journal["moves"]],
            "removals": [os.path.join(base, f) for f in journal["removals"]],
            "staging": [os.path.join(base, d) for d in journal["staging"]]}


def _finish(journal):
    """Make the journal's moves; idempotent, so that a commit cut short (a
    kill, a failed rename) is finished by running it again. A file still in
    staging is yet to move. Readers open a checkpoint by its .index (a
    "key"): an old key goes first and the new one comes last, so a reader
    sees the old set, no checkpoint, or the new set, never a mixed pair."""
    moves = [(t, f, key) for t, f, key in journal["moves"] if os.path.lexists(t)]
    for _, final, key in moves:
        if key:
            with contextlib.suppress(FileNotFoundError):
                os.remove(final)
    for final in journal["removals"]:
        with contextlib.suppress(FileNotFoundError):
            os.remove(final)
    for temporary, final, _ in sorted(moves, key=lambda move: move[2]):
        os.replace(temporary, final)
    for directory in journal["staging"]:
        shutil.rmtree(directory, ignore_errors=True)


def remove_leftovers(directory):
    """Clear the staging directories that killed runs left in ``directory``:
    one whose set was committed (its journal written) has its moves
    finished, any other is deleted. Live runs' (locked) ones are left."""
    try:
        names = os.listdir(directory)
    except OSError:
        return
    for name in sorted(names):
        path = os.path.join(directory, name)
        if not name.startswith(STAGING_PREFIX) or os.path.islink(path) \
                or not os.path.isdir(path):
            continue
        fd = _lock(path)
        if fd is None:
            continue
        try:
            journal = _read_journal(path)
            if journal is not None:
                _finish(journal)
            shutil.rmtree(path, ignore_errors=True)
        except OSError as exc:
            raise UserError(f"cannot finish the interrupted write staged in {path}: "
                            f"{exc.strerror or exc} (delete {path} to give it up)") from None
        finally:
            os.close(fd)


def interrupted_commit(final):
    """The staging directory holding the new ``final`` of a committed set
    not moved in whole yet (a killed run's, or a live one's for
    microseconds); None when there is none. For readers' messages."""
    final = os.path.abspath(final)
    directory = os.path.dirname(final)
    try:
        names = os.listdir(directory)
    except OSError:
        return None
    for name in sorted(names):
        path = os.path.join(directory, name)
        if name.startswith(STAGING_PREFIX) and os.path.isdir(path):
            journal = _read_journal(path)
            if journal and any(f == final and os.path.lexists(t)
                               for t, f, _ in journal["moves"]):
                return path
    return None


class Staging:
    """Temporary places for a set of final files; see ``staged``."""

    def __init__(self):
        self._moves = []  # (temporary path, final path, key)
        self._removals = []
        self._directories = {}  # final directory -> its staging directory
        self._locks = []
        self._committed = False  # the journal is written: the set must arrive

    def place(self, final, key=False):
        """A temporary path to write ``final``'s content to, in a hidden
        directory beside it (same file system: the final move is a rename).
        ``key``: a file readers open first (a checkpoint's .index), removed
        first and moved in last."""
        directory = os.path.dirname(os.path.abspath(final))
        if directory not in self._directories:
            staging, fd = _new_staging(directory)
            self._locks.append(fd)
            if self._directories:
                with open(os.path.join(staging, _PRIMARY), "w", encoding="utf-8") as f:
                    f.write(os.path.relpath(next(iter(self._directories.values())), staging))
            self._directories[directory] = staging
        temporary = os.path.join(self._directories[directory], os.path.basename(final))
        self._moves.append((temporary, os.path.abspath(final), bool(key)))
        return temporary

    def remove(self, final):
        """Delete ``final`` with the commit (a member of the set being
        replaced that the new set lacks)."""
        self._removals.append(os.path.abspath(final))

    def commit(self):
        missing = [final for temporary, final, _ in self._moves
                   if not os.path.exists(temporary)]
        if missing:
            raise RuntimeError(f"staged output never written: {missing[0]}")
        if not self._moves:
            return
        primary = next(iter(self._directories.values()))
        journal = {"moves": self._moves, "removals": self._removals,
                   "staging": list(self._directories.values())}
        base = os.path.dirname(primary)

        def relative(path):
            return os.path.relpath(path, base)
        with open(os.path.join(primary, _JOURNAL + ".tmp"), "w", encoding="utf-8") as f:
            json.dump({"moves": [(relative(t), relative(f), key) for t, f, key in self._moves],
                       "removals": [relative(f) for f in self._removals],
                       "staging": [relative(d) for d in journal["staging"]]}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(os.path.join(primary, _JOURNAL + ".tmp"), os.path.join(primary, _JOURNAL))
        self._committed = True
        try:
            _finish(journal)
        except OSError as exc:
            raise UserError(f"cannot move the new {self._moves[0][1]} and the files "
                            f"written with it into place ({exc.strerror or exc}); they "
                            f"stay complete in {primary}, and the next run writing there "
                            f"(a pruning, an export, a checkpoint) moves them in") from None

    def close(self):
        """Delete the staging directories (kept when a committed set could
        not be moved in whole: the next run into the same place finishes
        it), and release their locks."""
        if not self._committed:
            for directory in self._directories.values():
                shutil.rmtree(directory, ignore_errors=True)
        for fd in self._locks:
            os.close(fd)
        self._locks = []


@contextlib.contextmanager
def staged():
    """Write a multi-file result through ``staging.place(final)``; when the
    block ends without error every file is renamed into place (renames
    only, keys last: see ``_finish``). A failure while writing leaves every
    previous file untouched and no staging files; a commit cut short by a
    kill is finished by the next run into the same place."""
    staging = Staging()
    try:
        yield staging
        staging.commit()
    finally:
        staging.close()

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


# ---- sets of files written together (docs/outputs.md, "Results of several files")

SET_SUFFIX = ".set.json"  # beside a checkpoint prefix: the files written with it


def set_manifest(prefix):
    return prefix + SET_SUFFIX


def manifest_text(manifest, files):
    """The manifest of a set: {key: [paths]}, relative to the manifest's
    directory (a copied directory keeps naming its own files)."""
    import json

    directory = os.path.dirname(os.path.abspath(manifest))
    return json.dumps({"files": {key: [os.path.relpath(os.path.abspath(p), directory)
                                       for p in paths] for key, paths in files.items()}},
                      indent=1) + "\n"


def _read_manifest(manifest):
    """{real member path: key} of a manifest (itself included)."""
    import json

    directory = os.path.dirname(manifest)
    try:
        with open(manifest, encoding="utf-8") as f:
            files = json.load(f)["files"]
        members = {real(os.path.join(directory, p)): key
                   for key, paths in files.items() for p in paths}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise UserError(f"set manifest {manifest} is unreadable or damaged "
                        f"({type(exc).__name__}): delete it together with the files it "
                        f"listed") from None
    members[real(manifest)] = "manifest"
    return members


def check_sets(claimed, written):
    """``claimed``: {key: [paths]} a run writes or takes over (a mask path
    it may leave empty included); ``written``: the paths it writes. An
    output that belongs to an existing set (a manifest in one of the
    outputs' directories lists it) is refused unless every file of that
    set is claimed. Returns the files of replaced sets that the new set
    lacks (to delete with the commit)."""
    owner = {real(p): (key, p) for key, paths in claimed.items() for p in paths}
    directories = sorted({os.path.dirname(path) for path in owner})
    manifests = sorted({os.path.join(d, name) for d in directories if os.path.isdir(d)
                        for name in os.listdir(d) if name.endswith(SET_SUFFIX)})
    written = {real(p) for p in written}
    stale = []
    for manifest in manifests:
        members = _read_manifest(manifest)
        touched = [path for path in members if path in owner]
        if not touched:
            continue
        left = [path for path in members if path not in owner and os.path.lexists(path)]
        if left:
            key, path = owner[touched[0]]
            raise UserError(f"{key} {path!r} belongs to the set of files listed in "
                            f"{manifest}, which this run would not replace whole (it "
                            f"would leave {members[left[0]]} {left[0]!r}): choose paths "
                            f"outside that set, or write all of it")
        stale += [path for path in members if path not in written and os.path.lexists(path)]
    return sorted(set(stale))

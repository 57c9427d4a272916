"""Loading and validating the `key: value` config files of train / evaluate /
get_oracle_rank.

A config is parsed as YAML (``yaml.safe_load``, the original format), then
overrides from the command line are applied, then every key is checked. All
problems are reported as a one-line :class:`UserError` naming the key and the
offending value.

Relative paths in a config are left relative: they are resolved against the
current working directory of the process, as the original scripts did (not
against the directory of the config file). ``~`` is expanded.

Defaults: ``gpu_id`` ('' = all devices / CPU), ``mask`` (None),
``atrous_path`` (auto) and, for training, ``initialize`` (None = train from
scratch) may be left out. Every
other key of a kind is required.
"""

import difflib
import os

import yaml

from common.errors import UserError
from netcompress.checkpoint_paths import checkpoint_exists

TRAIN_KEYS = (
    "gpu_id", "model", "num_classes", "intialize", "checkpoint", "train_data",
    "batch_size", "skip_step", "height", "width", "max_iteration",
    "learning_rate", "save_step", "power", "mask", "model_def", "atrous_path",
)
EVALUATE_KEYS = (
    "gpu_id", "model", "num_classes", "checkpoint", "test_data", "batch_size",
    "skip_step", "height", "width", "mask", "model_def", "atrous_path",
)
ORACLE_RANK_KEYS = EVALUATE_KEYS + ("rank_save",)

# The key names as users write them, per config kind (original spelling).
CONFIG_KEYS = {
    "train": TRAIN_KEYS,
    "evaluate": EVALUATE_KEYS,
    "oracle_rank": ORACLE_RANK_KEYS,
}

# Alternative spellings accepted in a config -> the key used in the result.
# The original README spells it 'intialize'; both spellings mean the same.
KEY_ALIASES = {
    "train": {"intialize": "initialize", "initialize": "initialize"},
    "evaluate": {},
    "oracle_rank": {},
}

OPTIONAL_DEFAULTS = {"gpu_id": "", "mask": None, "initialize": None, "atrous_path": "auto"}

# Keys a train config may add, with their defaults (train.py's `optional`).
# flip: random horizontal flips (the original had no augmentation);
# end_learning_rate: where the polynomial decay ends (the original's 1e-4);
# max_to_keep: newest checkpoints kept (the original kept 1000).
TRAIN_OPTIONAL = {"flip": False, "end_learning_rate": 1e-4, "max_to_keep": 3}

# How dilated convs are computed (models/atrous.py; docs/atrous.md). The same
# names as models.atrous, repeated here because configs load before TensorFlow.
ATROUS_PATHS = ("auto", "native", "space_to_batch")

POSITIVE_INT_KEYS = ("batch_size", "skip_step", "height", "width",
                     "max_iteration", "save_step")
POSITIVE_FLOAT_KEYS = ("learning_rate", "power")
# Files the scripts read; output paths (checkpoint for train, rank_save) need
# not exist yet.
INPUT_FILE_KEYS = ("train_data", "test_data", "model_def")
# Strings that mean "no value" for optional paths: YAML turns `None` into the
# string 'None' (only null/~/empty are YAML nulls), and the original configs
# wrote `mask: None`.
NONE_STRINGS = ("", "none", "null", "~")

INPUT_SIZE_MULTIPLE = 16  # output stride 16 of AdapNet++


def accepted_keys(kind, optional=None):
    """All key spellings a config of `kind` may contain (aliases included)."""
    keys = list(_keys_of(kind))
    keys.extend(k for k in KEY_ALIASES[kind] if k not in keys)
    keys.extend(k for k in (optional or {}) if k not in keys)
    return keys


def _keys_of(kind):
    if kind not in CONFIG_KEYS:
        raise ValueError("unknown config kind %r (expected one of %s)"
                         % (kind, ", ".join(CONFIG_KEYS)))
    return CONFIG_KEYS[kind]


def apply_gpu_id(gpu_id):
    """Make only `gpu_id` visible to TensorFlow; ''/None keeps the current
    environment (all GPUs, or CPU when there are none)."""
    if gpu_id is None or gpu_id == "":
        return
    os.environ["CUDA_VISIBLE_DEVICES"] = str(gpu_id)


def parse_overrides(overrides):
    """['key=value', ...] -> [(key, value)], values parsed as YAML scalars."""
    parsed = []
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise UserError("override %r is not of the form key=value" % item)
        try:
            value = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError:
            # e.g. 'a: b' or '[1' - not a scalar; keep the text as written.
            value = text
        parsed.append((key, value))
    return parsed


def load_config(path, kind, overrides=(), optional=None):
    """Read, override and validate a config of `kind` ('train', 'evaluate'
    or 'oracle_rank').

    `overrides`: 'key=value' strings applied after the file, in order.
    `optional`: extra keys a script allows, with their defaults
    (e.g. {'flip': True}); a given value must have the default's type.
    Returns a new dict with every key present and values normalised; the
    training key 'intialize' is returned as 'initialize'.
    """
    keys = _keys_of(kind)
    optional = dict(optional or {})
    raw = _read_mapping(path)

    # (value, where it came from) per key as written by the user.
    given = {}
    for key, value in raw.items():
        given[str(key)] = (value, path)
    for key, value in parse_overrides(overrides):
        given[key] = (value, "override %s=%s" % (key, _show(value)))

    allowed = accepted_keys(kind, optional)
    for key, (value, source) in given.items():
        if key not in allowed:
            close = difflib.get_close_matches(key, allowed, n=1)
            hint = "; did you mean %r?" % close[0] if close else ""
            raise UserError("%s: unknown key %r (value %s) for a %s config%s"
                            % (source, key, _show(value), kind, hint))

    config = _resolve_aliases(given, kind)
    result = {}
    for key in keys:
        key = KEY_ALIASES[kind].get(key, key)
        if key in config:
            value, source = config[key]
            result[key] = _check_value(key, value, source)
        elif key in OPTIONAL_DEFAULTS:
            result[key] = OPTIONAL_DEFAULTS[key]
        else:
            raise UserError("%s: missing required key %r" % (path, key))
    for key, default in optional.items():
        if key in config:
            value, source = config[key]
            result[key] = _check_optional(key, value, default, source)
        else:
            result[key] = default

    _check_paths(result, kind, {k: s for k, (_, s) in config.items()}, path)
    return result


def _read_mapping(path):
    if not os.path.isfile(path):
        raise UserError("config file %r not found" % path)
    try:
        with open(path, encoding="utf-8") as handle:
            data = yaml.safe_load(handle)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = " at line %d" % (mark.line + 1) if mark is not None else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise UserError("%s: not a valid `key: value` config (%s%s)"
                        % (path, problem, where)) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError("cannot read config file %r: %s" % (path, exc)) from None
    if data is None:
        raise UserError("%s: config file is empty" % path)
    if not isinstance(data, dict):
        raise UserError("%s: config must be `key: value` lines, got a %s"
                        % (path, type(data).__name__))
    return data


def _resolve_aliases(given, kind):
    aliases = KEY_ALIASES[kind]
    resolved = {}
    spelled = {}
    for key, entry in given.items():
        target = aliases.get(key, key)
        if target in resolved and spelled[target] != key:
            raise UserError("%s: %r and %r are the same setting; give only one"
                            % (entry[1], spelled[target], key))
        resolved[target] = entry
        spelled[target] = key
    return resolved


def _show(value):
    """A value as the user would have written it, for messages."""
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    return str(value)


def check_gpu_id(value, source):
    """The checked, normalised `gpu_id` (for settings outside a config)."""
    return _check_value("gpu_id", value, source)


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def _check_value(key, value, source):
    def fail(expected):
        raise UserError("%s: %r must be %s, got %s"
                        % (source, key, expected, _show(value)))

    if key == "gpu_id":
        # Becomes CUDA_VISIBLE_DEVICES: anything else there silently hides
        # every GPU (or picks the wrong ones) instead of failing.
        expected = "'' (all GPUs / CPU), a GPU id such as 0, ids such as '0,1', or -1 (no GPU)"
        if value is None:
            return ""
        if _is_int(value):
            if value < -1:
                fail(expected)
            return str(value)
        if not isinstance(value, str):
            fail(expected)
        text = value.strip()
        if text.lower() in NONE_STRINGS:
            return ""
        ids = [part.strip() for part in text.split(",")]
        if ids == ["-1"]:
            return "-1"
        if not all(part.isascii() and part.isdigit() for part in ids):
            fail(expected)
        return ",".join(str(int(part)) for part in ids)

    if key == "atrous_path":
        if value not in ATROUS_PATHS:
            fail("one of " + ", ".join(ATROUS_PATHS))
        return value

    if key == "num_classes":
        if not _is_int(value) or value < 2:
            fail("an integer >= 2 (classes including void)")
        return value

    if key in POSITIVE_INT_KEYS:
        if not _is_int(value) or value <= 0:
            fail("a positive integer")
        if key in ("height", "width") and value % INPUT_SIZE_MULTIPLE:
            fail("a multiple of %d" % INPUT_SIZE_MULTIPLE)
        return value

    if key in POSITIVE_FLOAT_KEYS:
        number = value
        # YAML 1.1 reads `1e-4` (no dot) as a string; accept what float() reads.
        if isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                fail("a positive number")
        if isinstance(number, bool) or not isinstance(number, (int, float)) \
                or not number > 0 or number == float("inf"):
            fail("a positive number")
        return float(number)

    if key == "model":
        if not isinstance(value, str) or not value.strip():
            fail("a model name such as 'AdapNet_pp.AdapNet_pp'")
        return value.strip()

    if key in ("mask", "initialize"):
        if value is None or (isinstance(value, str)
                             and value.strip().lower() in NONE_STRINGS):
            return None
        if not isinstance(value, str):
            fail("a path or None")
        return os.path.expanduser(value.strip())

    # Everything else is a path.
    if not isinstance(value, str) or not value.strip():
        fail("a path")
    return os.path.expanduser(value.strip())


def _check_optional(key, value, default, source):
    if default is None:
        return value
    expected = type(default)
    ok = isinstance(value, expected)
    if expected is float and _is_int(value):
        return float(value)
    if expected is int and isinstance(value, bool):
        ok = False
    if not ok:
        raise UserError("%s: %r must be of type %s (like the default %s), got %s"
                        % (source, key, expected.__name__, _show(default),
                           _show(value)))
    return value


def _check_paths(config, kind, sources, config_path):
    """Inputs must exist now rather than fail deep inside TensorFlow later."""
    def source(key):
        return sources.get(key, config_path)

    for key in INPUT_FILE_KEYS:
        if key in config and not os.path.exists(config[key]):
            raise UserError("%s: %r file %r does not exist (relative paths are "
                            "taken from the current directory %s)"
                            % (source(key), key, config[key], os.getcwd()))
    mask = config.get("mask")
    if mask is not None and not os.path.isfile(mask):
        raise UserError("%s: 'mask' file %r does not exist (use None for no mask)"
                        % (source("mask"), mask))

    if kind == "train":
        checkpoint_keys = ("initialize",)
    else:
        checkpoint_keys = ("checkpoint",)
    for key in checkpoint_keys:
        prefix = config.get(key)
        if prefix is not None and not checkpoint_exists(prefix):
            raise UserError("%s: %r checkpoint %r not found (expected %s.index, "
                            "or a directory with a 'checkpoint' file)"
                            % (source(key), key, prefix, prefix))

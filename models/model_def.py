"""model_def JSON files and residual masks: loading, validation, saving."""

import json
import os

import numpy as np

from models.architecture import Shortcut, adapnet_pp
from common.errors import UserError, one_line
from common.files import numpy_file_kind, replace_atomically

PARAM_KEYS = adapnet_pp().param_keys()
UNIT_KEYS = {u.key for u in adapnet_pp().units}
SPLIT_KEYS = tuple(u.key for u in adapnet_pp().units if u.split_rates)


def load_model_def(path):
    if not os.path.isfile(path):
        raise UserError(f"model_def file not found: {path}")
    try:
        with open(path) as f:
            model_def = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"model_def {path} is not valid JSON: {exc}") from None
    validate_model_def(model_def, source=path)
    return model_def


def validate_model_def(model_def, source="model_def"):
    """Raise UserError naming the first problem; returns nothing."""
    if not isinstance(model_def, dict) or not isinstance(model_def.get("params"), dict):
        raise UserError(f"{source}: expected a JSON object with a 'params' object")
    params = model_def["params"]
    split = model_def.get("split", {})
    if not isinstance(split, dict):
        raise UserError(f"{source}: 'split' must be an object")
    missing = [k for k in PARAM_KEYS if k not in params]
    if missing:
        raise UserError(f"{source}: params is missing key(s) {', '.join(missing)}")
    unknown = sorted(set(params) - set(PARAM_KEYS), key=str)
    if unknown:
        raise UserError(f"{source}: params has unknown key(s) {', '.join(unknown)}")

    def positive_int(value):
        return isinstance(value, int) and not isinstance(value, bool) and value > 0

    for key in PARAM_KEYS:
        value = params[key]
        if key in UNIT_KEYS:
            if (not isinstance(value, list) or len(value) not in (3, 4)
                    or not all(positive_int(v) for v in value)):
                raise UserError(f"{source}: params[\"{key}\"] must be a list of 3 or 4 "
                                f"positive integers, got {value!r}")
        elif not positive_int(value):
            raise UserError(f"{source}: params[\"{key}\"] must be a positive integer, "
                            f"got {value!r}")
    for unit in adapnet_pp().units:
        if unit.shortcut is not Shortcut.NONE and len(params[unit.key]) != 4:
            raise UserError(f"{source}: params[\"{unit.key}\"] ({unit.name} has a shortcut) "
                            f"needs 4 entries [conv1, conv2, conv3, residual width]")
    for key in SPLIT_KEYS:
        parts = split.get(key)
        if (not isinstance(parts, list) or len(parts) != 2
                or not all(positive_int(v) for v in parts)):
            raise UserError(f"{source}: split[\"{key}\"] must be two positive integers "
                            f"[A, B], got {parts!r}")
        if sum(parts) != params[key][1]:
            raise UserError(f"{source}: split[\"{key}\"] {parts} sums to {sum(parts)} but "
                            f"params[\"{key}\"][1] (conv2 width) is {params[key][1]}")
    unknown = sorted(set(split) - set(SPLIT_KEYS), key=str)
    if unknown:
        raise UserError(f"{source}: split has unknown key(s) {', '.join(unknown)}")


def save_model_def(model_def, path):
    validate_model_def(model_def, source=path)
    text = json.dumps(model_def, indent=1) + "\n"

    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text)
    replace_atomically(path, write)


# ---- masks ---------------------------------------------------------------
# A mask file is a structured .npy array (loads with allow_pickle=False), one
# row per masked residual unit: its name and a boolean "kept" vector over the
# unit's full residual width (padded with False up to the longest row).

def _mask_dtype(length):
    return np.dtype([("unit", "U32"), ("width", "<i4"), ("keep", "?", (length,))])


def save_masks(masks, path):
    """``masks``: unit name -> sorted kept indices; widths from ``mask_widths``."""
    rows = sorted(masks.items())
    length = max([w for _, (_, w) in rows], default=1)
    array = np.zeros(len(rows), dtype=_mask_dtype(length))
    for row, (unit, (indices, width)) in zip(array, rows):
        row["unit"], row["width"] = unit, width
        row["keep"][np.asarray(indices, dtype=np.int64)] = True

    def write(tmp):
        with open(tmp, "wb") as f:
            np.save(f, array, allow_pickle=False)
    replace_atomically(path, write)


def load_masks(path):
    """Mask file -> {unit name: (kept indices, residual width)}; None -> {}."""
    if path is None:
        return {}
    if not os.path.isfile(path):
        raise UserError(f"mask file not found: {path}")
    array = _read_mask_array(path)
    masks = {}
    for row in array:
        keep = row["keep"]
        width = int(row["width"])
        if not 0 < width <= keep.shape[0]:
            raise UserError(f"mask file {path}: {row['unit']} has width {width}, outside "
                            f"1..{keep.shape[0]}")
        if keep[width:].any():
            raise UserError(f"mask file {path}: {row['unit']} keeps channels beyond "
                            f"its width {width}")
        masks[str(row["unit"])] = (np.flatnonzero(keep[:width]), width)
    return masks


def _read_mask_array(path):
    """The structured 1-d array of a mask file, or a one-line UserError
    saying what the file is instead (docs/errors.md)."""
    not_mask = f"mask file {path} is not a mask array (a .npy written by prun_model.py)"
    try:
        kind = numpy_file_kind(path)
    except OSError as exc:
        raise UserError(f"cannot read mask file {path}: {exc.strerror or exc}") from None
    if kind == "npz":
        raise UserError(f"{not_mask}: it is a zip or .npz archive (a rank file?)")
    if kind != "npy":
        raise UserError(f"{not_mask}: " + ("it is empty" if kind == "empty" else
                                           "it is not a .npy file"))
    try:
        loaded = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:  # a damaged or object-array .npy
        raise UserError(f"{not_mask}: {one_line(exc)}") from None
    if loaded.dtype.names != ("unit", "width", "keep"):
        raise UserError(f"{not_mask} (fields {loaded.dtype.names})")
    fields = loaded.dtype.fields
    if (fields["unit"][0].kind != "U" or fields["width"][0].kind not in "iu"
            or fields["keep"][0].base.kind != "b" or len(fields["keep"][0].shape) != 1):
        raise UserError(f"{not_mask}: field types {loaded.dtype}")
    if loaded.ndim != 1:
        raise UserError(f"{not_mask}: it holds a {loaded.ndim}-d array, not one row per "
                        f"residual unit")
    return loaded


def check_masks(model_def, masks, source="mask"):
    """Every residual conv3 narrower than its residual width needs a mask that
    keeps exactly its channels; returns {unit name: kept indices}."""
    units = adapnet_pp().units
    by_name = {u.name: u for u in units}
    unknown = sorted(set(masks) - set(by_name))
    if unknown:
        raise UserError(f"{source}: unknown residual unit(s) {', '.join(unknown)}")
    indices_by_unit = {}
    for unit in units:
        width = adapnet_pp().residual_width(model_def, unit)
        conv3 = model_def["params"][unit.key][2]
        if unit.name not in masks:
            if conv3 != width:
                raise UserError(f"{unit.name}: conv3 has {conv3} channels but the residual "
                                f"width is {width}, and no mask is given for it")
            continue
        indices, mask_width = masks[unit.name]
        if mask_width != width:
            raise UserError(f"{source}: {unit.name} mask is over {mask_width} channels but "
                            f"the model_def's residual width is {width}")
        if len(indices) != conv3:
            raise UserError(f"{source}: {unit.name} mask keeps {len(indices)} channels but "
                            f"model_def conv3 has {conv3}")
        indices_by_unit[unit.name] = np.asarray(indices, dtype=np.int64)
    return indices_by_unit

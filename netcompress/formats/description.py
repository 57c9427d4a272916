"""A checkpoint's description of its own model (docs/outputs.md): one scalar
string tensor `netcompress/description` holding JSON

    {"format": 1, "model": NAME, "num_classes": N, "model_def": {...},
     "masks": {unit: {"width": w, "kept": [indices]}}, "classes": [names] or null}

Every checkpoint the project writes carries one, so that readers build the
network the checkpoint holds instead of trusting a model_def and mask file
whose agreement tensor shapes alone cannot check (split halves, mask
positions). Checkpoints without one (the original's, ImageNet weights) are
read with the config's files as before.
"""

import json
from dataclasses import dataclass

import numpy as np

from common.errors import UserError
from models.model_def import check_masks, load_masks, load_model_def, validate_model_def

KEY = "netcompress/description"  # outside resnet_v2_50/: no model variable
FORMAT = 1
DEFAULT_MODEL = "AdapNet_pp"


@dataclass
class Description:
    model: str
    num_classes: int
    model_def: dict
    masks: dict  # {unit: (kept indices, residual width)}, as load_masks gives
    classes: list  # or None
    checkpoint: str  # where it was read

    def class_names(self):
        """{class id: name} as palette.read_class_names gives, or None."""
        return dict(enumerate(self.classes)) if self.classes else None


def masks_json(masks):
    return {unit: {"width": int(width), "kept": [int(i) for i in kept]}
            for unit, (kept, width) in sorted(masks.items())}


def describe(model_def, masks, num_classes, model=DEFAULT_MODEL, class_names=None):
    """The description's JSON text. ``class_names``: {id: name} or None."""
    classes = None
    if class_names:
        classes = [class_names.get(i, str(i)) for i in range(num_classes)]
    return json.dumps({"format": FORMAT, "model": model, "num_classes": int(num_classes),
                       "model_def": model_def, "masks": masks_json(masks or {}),
                       "classes": classes}, sort_keys=True)


def describe_model(model, model_name=DEFAULT_MODEL, class_names=None):
    """describe() of a built model instance (AdapNet_pp)."""
    return describe(model.model_def, model.masks, model.num_classes, model_name, class_names)


def parse(text, checkpoint):
    """Description from its JSON text; a one-line UserError if it is not one."""
    def bad(why):
        return UserError(f"checkpoint {checkpoint} has an invalid {KEY}: {why}")
    try:
        data = json.loads(text)
    except (ValueError, UnicodeDecodeError) as exc:
        raise bad(f"not JSON ({exc})") from None
    if not isinstance(data, dict):
        raise bad("not a JSON object")
    if data.get("format") != FORMAT:
        raise bad(f"format {data.get('format')!r}, expected {FORMAT}")
    model, num_classes = data.get("model"), data.get("num_classes")
    if not isinstance(model, str) or not model:
        raise bad("no model name")
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 2:
        raise bad(f"num_classes {num_classes!r}")
    try:
        validate_model_def(data.get("model_def"), source="its model_def")
    except UserError as exc:
        raise bad(str(exc)) from None
    raw_masks = data.get("masks")
    if not isinstance(raw_masks, dict):
        raise bad("masks is not an object")
    masks = {}
    for unit, entry in raw_masks.items():
        try:
            width, kept = int(entry["width"]), np.asarray(entry["kept"], np.int64)
        except (TypeError, KeyError, ValueError):
            raise bad(f"masks[{unit!r}] is not {{'width': w, 'kept': [indices]}}") from None
        if kept.ndim != 1 or (kept.size and (kept.min() < 0 or kept.max() >= width)) \
                or np.any(np.diff(kept) <= 0):
            raise bad(f"masks[{unit!r}] kept indices are not increasing within 0..{width - 1}")
        masks[unit] = (kept, width)
    try:
        check_masks(data["model_def"], masks, source="its masks")
    except UserError as exc:
        raise bad(str(exc)) from None
    classes = data.get("classes")
    if classes is not None and (not isinstance(classes, list) or len(classes) != num_classes
                                or not all(isinstance(c, str) for c in classes)):
        raise bad(f"classes is not a list of {num_classes} names")
    return Description(model, num_classes, data["model_def"], masks, classes, checkpoint)


def read_description(path):
    """The Description in checkpoint ``path`` (a prefix or directory), or
    None when it has none (the original's, or written before descriptions)."""
    from common.runtime import import_tensorflow_quietly

    # First: scripts' checks read descriptions before graph_mode imports it.
    tf = import_tensorflow_quietly()
    from netcompress.formats.checkpoints import READER_ERRORS, damaged_error
    from netcompress.formats.checkpoint_paths import resolve_checkpoint

    prefix = resolve_checkpoint(path)
    try:
        reader = tf.compat.v1.train.NewCheckpointReader(prefix)
        if not reader.has_tensor(KEY):
            return None
        value = reader.get_tensor(KEY)
    except READER_ERRORS as exc:
        raise damaged_error(prefix, exc) from None
    if isinstance(value, np.ndarray):
        value = value.item() if value.shape == () else None
    if not isinstance(value, bytes):
        raise UserError(f"checkpoint {prefix} has an invalid {KEY}: not a scalar string")
    return parse(value.decode("utf-8", "replace"), prefix)


# ---- comparing ---------------------------------------------------------------

def _show(value):
    return json.dumps(value)


def model_def_difference(mine, theirs):
    """The first difference of two model_defs ('split["8"] is [4, 4] in the
    file, [2, 6] in the checkpoint'), or None when they are equal."""
    for section in ("params", "split"):
        a, b = mine.get(section, {}), theirs.get(section, {})
        for key in sorted(set(a) | set(b), key=lambda k: (len(k), k)):
            if a.get(key) != b.get(key):
                return (f"{section}[{_show(key)}] is {_show(a.get(key))} in the file, "
                        f"{_show(b.get(key))} in the checkpoint")
    others = sorted((set(mine) | set(theirs)) - {"params", "split"})
    for key in others:
        if mine.get(key) != theirs.get(key):
            return f"{key} is {_show(mine.get(key))} in the file, {_show(theirs.get(key))} " \
                   f"in the checkpoint"
    return None


def _positions(kept, width):
    kept = [int(i) for i in kept]
    shown = ", ".join(map(str, kept[:6])) + (", ..." if len(kept) > 6 else "")
    return f"[{shown}] of {width}"


def masks_difference(mine, theirs, mine_place="in the file",
                     theirs_place="in the checkpoint"):
    """The first difference of two {unit: (kept, width)} in words, or None."""
    for unit in sorted(set(mine) | set(theirs)):
        if unit not in theirs:
            return f"{unit} is masked {mine_place}, not {theirs_place}"
        if unit not in mine:
            return f"{unit} is masked {theirs_place}, not {mine_place}"
        (kept_a, width_a), (kept_b, width_b) = mine[unit], theirs[unit]
        if width_a == width_b and len(kept_a) != len(kept_b):
            return (f"{unit} keeps {len(kept_a)} channels {mine_place}, {len(kept_b)} "
                    f"{theirs_place}")
        if width_a != width_b or list(kept_a) != list(kept_b):
            return (f"{unit} keeps {_positions(kept_a, width_a)} {mine_place}, "
                    f"{_positions(kept_b, width_b)} {theirs_place}")
    return None


# ---- readers -------------------------------------------------------------------

@dataclass
class CheckpointModel:
    """What a reader builds: the checkpoint's model, from its description or,
    for an undescribed checkpoint, from the config's files."""
    model_def: dict
    masks: dict
    num_classes: int
    description: object  # Description or None
    source: str  # where it comes from: the model_def file, or the checkpoint
    label: str  # names the model in messages

    @property
    def model(self):
        return self.description.model if self.description else None


def checkpoint_model(checkpoint, model_def_path=None, mask_path=None, num_classes=None,
                     model_def_name="model_def", mask_name="mask", head_may_differ=False,
                     description=None):
    """The model of ``checkpoint``. With a description there, a given model_def,
    mask and num_classes must equal it (else a one-line UserError naming the
    first difference); ``head_may_differ``: num_classes may differ (training
    from `intialize` to another class count). Without one, the model_def
    (required) and mask files, as before. ``description``: one already read."""
    described = description or read_description(checkpoint)
    if described is None:
        if model_def_path is None or num_classes is None:
            missing = model_def_name if model_def_path is None else "num_classes"
            raise UserError(f"checkpoint {checkpoint} does not describe its model (an "
                            f"original or older checkpoint): give its {missing}")
        return files_model(model_def_path, mask_path, num_classes, model_def_name, mask_name)
    where = described.checkpoint
    if model_def_path is not None:
        difference = model_def_difference(load_model_def(model_def_path), described.model_def)
        if difference:
            raise UserError(f"{model_def_name} {model_def_path} differs from the one in "
                            f"checkpoint {where}: {difference}")
    if mask_path is not None:
        difference = masks_difference(load_masks(mask_path), described.masks)
        if difference:
            raise UserError(f"{mask_name} {mask_path} differs from the checkpoint's "
                            f"({where}): {difference}")
    if num_classes is None:
        num_classes = described.num_classes
    elif num_classes != described.num_classes and not head_may_differ:
        raise UserError(f"num_classes {num_classes} differs from the checkpoint's "
                        f"({where}): {described.num_classes}")
    return CheckpointModel(described.model_def, described.masks, num_classes, described,
                           f"the description in checkpoint {where}",
                           f"model described in checkpoint {where}")


def files_model(model_def_path, mask_path, num_classes, model_def_name="model_def",
                mask_name="mask"):
    """The CheckpointModel of a model_def and mask file (no description)."""
    model_def, masks = load_model_def(model_def_path), load_masks(mask_path)
    return CheckpointModel(model_def, masks, num_classes, None, model_def_path,
                           f"{model_def_name} {model_def_path} (mask {mask_path})")

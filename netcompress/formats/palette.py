"""Class colours and names for predict.py's label images (docs/deploy.md).

``--palette auto`` (the default) takes Cityscapes' class colours when the
class count is one of Cityscapes' sets (12: AdapNet++'s Cityscapes classes,
19: the train ids, 20: void + the train ids), else a fixed distinct palette.
``--palette FILE``: one class per line, ``R G B [name]`` (0..255), class 0
first; blank lines and ``#`` comments are ignored.
"""

import colorsys
import os

from common.errors import UserError

VOID = (0, 0, 0)

# Cityscapes' official colours of its 19 train classes, in train-id order.
CITYSCAPES_19 = (
    ("road", (128, 64, 128)),
    ("sidewalk", (244, 35, 232)),
    ("building", (70, 70, 70)),
    ("wall", (102, 102, 156)),
    ("fence", (190, 153, 153)),
    ("pole", (153, 153, 153)),
    ("traffic light", (250, 170, 30)),
    ("traffic sign", (220, 220, 0)),
    ("vegetation", (107, 142, 35)),
    ("terrain", (152, 251, 152)),
    ("sky", (70, 130, 180)),
    ("person", (220, 20, 60)),
    ("rider", (255, 0, 0)),
    ("car", (0, 0, 142)),
    ("truck", (0, 0, 70)),
    ("bus", (0, 60, 100)),
    ("train", (0, 80, 100)),
    ("motorcycle", (0, 0, 230)),
    ("bicycle", (119, 11, 32)),
)
CITYSCAPES_20 = (("void", VOID),) + CITYSCAPES_19
_CITYSCAPES = dict(CITYSCAPES_19)
# AdapNet++'s 12-class Cityscapes set, in its label-id order, each with the
# colour of the Cityscapes class it stands for (cyclist: rider).
ADAPNET_12 = (
    ("void", VOID), ("sky", _CITYSCAPES["sky"]), ("building", _CITYSCAPES["building"]),
    ("road", _CITYSCAPES["road"]), ("sidewalk", _CITYSCAPES["sidewalk"]),
    ("fence", _CITYSCAPES["fence"]), ("vegetation", _CITYSCAPES["vegetation"]),
    ("pole", _CITYSCAPES["pole"]), ("car", _CITYSCAPES["car"]),
    ("sign", _CITYSCAPES["traffic sign"]), ("pedestrian", _CITYSCAPES["person"]),
    ("cyclist", _CITYSCAPES["rider"]),
)
CITYSCAPES = {12: ADAPNET_12, 19: CITYSCAPES_19, 20: CITYSCAPES_20}

# Hand-picked to be told apart at a glance; more classes continue with
# golden-ratio hue steps.
_DISTINCT = (
    (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
    (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212),
    (0, 128, 128), (220, 190, 255), (170, 110, 40), (255, 250, 200), (128, 0, 0),
    (170, 255, 195), (128, 128, 0), (255, 215, 180), (0, 0, 128), (128, 128, 128),
)
MAX_CLASSES = 256  # label PNGs are palette images: one byte per pixel


def distinct_colours(count):
    """Void black, then ``count - 1`` distinct colours."""
    colours = [VOID]
    for index in range(count - 1):
        if index < len(_DISTINCT):
            colours.append(_DISTINCT[index])
        else:
            hue = (index * 0.618033988749895) % 1.0
            value = 0.95 if index % 2 else 0.7
            r, g, b = colorsys.hsv_to_rgb(hue, 0.75, value)
            colours.append((round(255 * r), round(255 * g), round(255 * b)))
    return colours


def read_palette_file(path):
    """(colours, names) of a palette file; names[i] is None where not given."""
    if not os.path.isfile(path):
        raise UserError(f"palette file not found: {path}")
    colours, names = [], []
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read palette file {path}: {exc}") from None
    for number, line in enumerate(lines, start=1):
        text = line.split("#", 1)[0].strip()
        if not text:
            continue
        parts = text.split(None, 3)
        try:
            colour = tuple(int(v) for v in parts[:3])
        except ValueError:
            colour = ()
        if len(colour) != 3 or not all(0 <= v <= 255 for v in colour):
            raise UserError(f"palette file {path} line {number}: expected `R G B [name]` "
                            f"with R, G, B in 0..255, got {line.strip()!r}")
        colours.append(colour)
        names.append(parts[3].strip() if len(parts) > 3 else None)
    if not colours:
        raise UserError(f"palette file {path} has no colours")
    return colours, names


def read_class_names(path, num_classes=None):
    """Names from a `classes.txt` (`ID NAME` or `NAME` per line); with
    ``num_classes``, a class id beyond the model's is a UserError (the file
    of another class set)."""
    if not os.path.isfile(path):
        raise UserError(f"class names file not found: {path}")
    names = {}
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read class names file {path}: {exc}") from None
    for position, line in enumerate(lines):
        text = line.strip()
        if not text:
            continue
        first, _, rest = text.partition(" ")
        if first.isdigit() and rest.strip():
            names[int(first)] = rest.strip()
        else:
            names[position] = text
    if num_classes is not None and names and max(names) >= num_classes:
        raise UserError(f"class names file {path} names class {max(names)} but "
                        f"num_classes is {num_classes}: is it the file of these records?")
    return names


def config_class_names(config):
    """{class id: name} from a config's optional `classes` file, or None."""
    path = config.get("classes")
    if path:
        return read_class_names(path, config["num_classes"])
    found = config.get("checkpoint_model")  # netcompress/formats/description.py
    described = found.description if found is not None else None
    if described is None or described.num_classes != config["num_classes"]:
        return None
    return described.class_names()


class Palette:
    """``colours[i]``: the RGB of class i; ``names[i]``: its legend name."""

    def __init__(self, colours, names, source):
        self.colours = [tuple(int(v) for v in c) for c in colours]
        self.names = list(names)
        self.source = source

    def flat(self):
        """Pillow's 768-value palette."""
        values = [v for colour in self.colours for v in colour]
        return values + [0] * (3 * MAX_CLASSES - len(values))


def make_palette(num_classes, spec="auto", class_names=None):
    """The palette for ``num_classes`` from ``spec`` ('auto', 'cityscapes',
    'distinct' or a palette file) and optional names by class id (from
    read_class_names; they win over the palette's own names)."""
    if num_classes > MAX_CLASSES:
        raise UserError(f"num_classes {num_classes}: label images hold at most "
                        f"{MAX_CLASSES} classes")
    spec = spec or "auto"
    if spec == "auto":
        spec = "cityscapes" if num_classes in CITYSCAPES else "distinct"
    if spec == "cityscapes":
        if num_classes not in CITYSCAPES:
            raise UserError(f"--palette cityscapes fits 12, 19 or 20 classes, not "
                            f"{num_classes}: use distinct or a palette file")
        table = CITYSCAPES[num_classes]
        colours, names = [c for _, c in table], [n for n, _ in table]
        source = f"Cityscapes ({num_classes} classes)"
    elif spec == "distinct":
        colours, names = distinct_colours(num_classes), [None] * num_classes
        source = "distinct"
    else:
        colours, names = read_palette_file(spec)
        if len(colours) < num_classes:
            raise UserError(f"palette file {spec} has {len(colours)} colours but the "
                            f"model has {num_classes} classes")
        colours, names = colours[:num_classes], names[:num_classes]
        source = spec
    class_names = class_names or {}
    names = [class_names.get(i) or names[i] or ("void" if i == 0 else f"class {i}")
             for i in range(num_classes)]
    return Palette(colours, names, source)

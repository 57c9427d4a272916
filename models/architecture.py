"""AdapNet++ declared once, as data.

Three readers use this declaration: the graph builder (which tensors each
conv reads and how it is configured), the ranking step (the prunable layer
list) and the pruner (who reads a layer's channels, at which offset).

Vocabulary:
- a *group* is a set of channels produced together and kept or removed
  together: a conv's output, one half of a split conv, a residual stream;
- a *conv* is one kernel variable; it reads the concatenation of its input
  groups (in order) and writes one group, or two for a split conv ([A | B]).

Widths are references into a model_def (``WidthRef``), resolved by
``resolve_widths``; the declaration itself does not depend on a model_def.
"""

from dataclasses import dataclass
from functools import lru_cache

# Width references: ("params", key) | ("params", key, index) | ("split", key, part)
# | ("const", n) | ("classes",)
WidthRef = tuple

OUTER_SCOPE = "resnet_v2_50"
IMAGE = "image"


@dataclass(frozen=True)
class Group:
    name: str
    width: WidthRef
    prunable: bool
    section: str = ""
    # For a residual unit's conv3: the unit whose mask scatters it back.
    residual_unit: str = ""


@dataclass(frozen=True)
class Conv:
    scope: str
    inputs: tuple
    outputs: tuple
    kernel: int
    stride: int = 1
    rates: tuple = (1,)  # one per output group
    transposed: bool = False
    norm: bool = True
    relu: bool = True
    section: str = ""
    aux: bool = False  # auxiliary heads exist only for training and ranking


@dataclass(frozen=True)
class Unit:
    """A residual bottleneck unit (docs/network.md)."""

    block: str
    index: int
    key: str  # model_def params key
    shortcut: str  # "none" | "input" | "conv1" (block1/unit_1's quirk)
    stride: int = 1
    split_rates: tuple = ()  # (rate A, rate B) for a split conv2
    dropout_keep: float = 1.0

    @property
    def name(self):
        return f"{self.block}/unit_{self.index}"

    @property
    def scope(self):
        return f"{self.name}/bottleneck_v1"

    @property
    def residual_group(self):
        return f"{self.block}/residual"


def _units():
    units = []
    for index, key in enumerate(("2", "3", "4"), start=1):
        units.append(Unit("block1", index, key, "conv1" if index == 1 else "none"))
    for index, key in enumerate(("5", "6", "7", "8"), start=1):
        units.append(Unit("block2", index, key, "input" if index == 1 else "none",
                          stride=2 if index == 1 else 1,
                          split_rates=(1, 2) if index == 4 else ()))
    for index, key in enumerate(("9", "10", "11", "12", "13", "14"), start=1):
        units.append(Unit("block3", index, key, "input" if index == 1 else "none",
                          stride=2 if index == 1 else 1,
                          split_rates=(1, 2) if index >= 3 else ()))
    for index, key in enumerate(("15", "16", "17"), start=1):
        units.append(Unit("block4", index, key, "input" if index == 1 else "none",
                          split_rates=(2, 2), dropout_keep=0.3 if index == 3 else 1.0))
    return tuple(units)


UNITS = _units()
BLOCKS = ("block1", "block2", "block3", "block4")

# eASPP branches: (1x1 in, atrous 3x3, atrous 3x3, 1x1 out) scopes, keys, rate.
EASPP_BRANCHES = (
    (("conv70", "conv7", "conv247", "conv71"), ("19", "20", "21", "22"), 3),
    (("conv80", "conv8", "conv248", "conv81"), ("23", "24", "25", "26"), 6),
    (("conv90", "conv9", "conv249", "conv91"), ("27", "28", "29", "30"), 12),
)

# Pruner sections for the decoder layers (names from the original script).
DECODER_SECTIONS = {
    "conv41": "upsample1", "conv89": "decoder_conv1", "conv96": "decoder_conv1",
    "conv16": "upsample2", "conv88": "decoder_conv2", "conv95": "decoder_conv2",
}

# Skip connections (not prunable): scope -> residual stream read.
SKIPS = {"conv32": "block1/residual", "conv174": "block2/residual"}
SKIP_WIDTH = 24
IMAGE_POOLING_WIDTH = 256


@dataclass(frozen=True)
class Architecture:
    groups: tuple
    convs: tuple
    units: tuple

    @property
    def group_by_name(self):
        return {g.name: g for g in self.groups}

    def conv(self, scope):
        for conv in self.convs:
            if conv.scope == scope:
                return conv
        raise KeyError(scope)

    def producer_of(self, group_name):
        """The conv writing ``group_name`` and the group's offset in its output."""
        for conv in self.convs:
            if group_name in conv.outputs:
                return conv
        raise KeyError(group_name)

    def prunable_groups(self):
        return [g for g in self.groups if g.prunable]

    def consumers_of(self, group_name):
        """Convs that read ``group_name``: list of (conv, position in conv.inputs)."""
        return [(conv, conv.inputs.index(group_name))
                for conv in self.convs if group_name in conv.inputs]


def _unit_declarations(unit, unit_input):
    """Groups and convs of one residual unit reading group ``unit_input``."""
    key, scope, section = unit.key, unit.scope, unit.block
    groups, convs = [], []

    def group(name, width):
        groups.append(Group(name, width, True, section))
        return name

    conv1 = group(f"{scope}/conv1", ("params", key, 0))
    convs.append(Conv(f"{scope}/conv1", (unit_input,), (conv1,), 1, section=section))
    if unit.split_rates:
        parts = (group(f"{scope}/conv2/A", ("split", key, 0)),
                 group(f"{scope}/conv2/B", ("split", key, 1)))
        convs.append(Conv(f"{scope}/conv2", (conv1,), parts, 3, unit.stride,
                          rates=unit.split_rates, section=section))
    else:
        parts = (group(f"{scope}/conv2", ("params", key, 1)),)
        convs.append(Conv(f"{scope}/conv2", (conv1,), parts, 3, unit.stride,
                          section=section))
    conv3 = f"{scope}/conv3"
    groups.append(Group(conv3, ("params", key, 2), True, section, residual_unit=unit.name))
    convs.append(Conv(conv3, parts, (conv3,), 1, norm=False, relu=False, section=section))
    if unit.shortcut != "none":
        shortcut_input = conv1 if unit.shortcut == "conv1" else unit_input
        shortcut_stride = unit.stride if unit.shortcut == "input" else 1
        convs.append(Conv(f"{scope}/shortcut", (shortcut_input,), (unit.residual_group,),
                          1, shortcut_stride, norm=False, relu=False, section=section))
    return groups, convs


@lru_cache(maxsize=1)
def adapnet_pp():
    """The AdapNet++ declaration (docs/network.md)."""
    groups = [Group(IMAGE, ("const", 3), False),
              Group("conv1", ("params", "1"), True, "conv1")]
    convs = [Conv("conv1", (IMAGE,), ("conv1",), 7, 2, section="conv1")]
    previous = "conv1"
    for block in BLOCKS:
        first = next(u for u in UNITS if u.block == block)
        groups.append(Group(f"{block}/residual", ("params", first.key, 3), False, block))
        for unit in (u for u in UNITS if u.block == block):
            unit_groups, unit_convs = _unit_declarations(unit, previous)
            groups += unit_groups
            convs += unit_convs
            previous = unit.residual_group

    for scope, stream in SKIPS.items():
        groups.append(Group(scope, ("const", SKIP_WIDTH), False, "skip"))
        convs.append(Conv(scope, (stream,), (scope,), 1, relu=False, section="skip"))

    def easpp_conv(scope, key, inputs, kernel=1, rate=1, relu=True, prunable=True):
        groups.append(Group(scope, ("params", key), prunable, "easpp"))
        convs.append(Conv(scope, inputs, (scope,), kernel, rates=(rate,), relu=relu,
                          section="easpp"))
        return scope

    b4 = "block4/residual"
    branch_outputs = [easpp_conv("conv256", "18", (b4,))]
    for scopes, keys, rate in EASPP_BRANCHES:
        x = easpp_conv(scopes[0], keys[0], (b4,))
        x = easpp_conv(scopes[1], keys[1], (x,), 3, rate)
        x = easpp_conv(scopes[2], keys[2], (x,), 3, rate)
        branch_outputs.append(easpp_conv(scopes[3], keys[3], (x,)))
    # Image pooling: global average pool -> conv57 -> resize (done by the builder).
    groups.append(Group("conv57", ("const", IMAGE_POOLING_WIDTH), False, "easpp"))
    convs.append(Conv("conv57", (b4,), ("conv57",), 1, section="easpp"))
    branch_outputs.append("conv57")
    easpp_conv("conv10", "31", tuple(branch_outputs), relu=False)

    def decoder_conv(scope, key, inputs, kernel, stride=1, transposed=False, relu=True):
        section = DECODER_SECTIONS[scope]
        groups.append(Group(scope, ("params", key), True, section))
        convs.append(Conv(scope, inputs, (scope,), kernel, stride, transposed=transposed,
                          relu=relu, section=section))

    decoder_conv("conv41", "32", ("conv10",), 4, 2, transposed=True, relu=False)
    decoder_conv("conv89", "33", ("conv41", "conv174"), 3)
    decoder_conv("conv96", "34", ("conv89",), 3)
    decoder_conv("conv16", "35", ("conv96",), 4, 2, transposed=True, relu=False)
    decoder_conv("conv88", "36", ("conv16", "conv32"), 3)
    decoder_conv("conv95", "37", ("conv88",), 3)

    for scope, inputs, kernel, stride, transposed, relu, aux in (
            ("conv78", ("conv95",), 1, 1, False, True, False),
            ("conv5", ("conv78",), 8, 4, True, False, False),
            ("conv911", ("conv16",), 1, 1, False, False, True),
            ("conv912", ("conv41",), 1, 1, False, False, True)):
        groups.append(Group(scope, ("classes",), False, "classifier"))
        convs.append(Conv(scope, inputs, (scope,), kernel, stride, transposed=transposed,
                          relu=relu, section="classifier", aux=aux))
    return Architecture(tuple(groups), tuple(convs), UNITS)


def resolve_width(ref, model_def, num_classes):
    kind = ref[0]
    if kind == "const":
        return ref[1]
    if kind == "classes":
        return num_classes
    if kind == "params":
        value = model_def["params"][ref[1]]
        return value if len(ref) == 2 else value[ref[2]]
    if kind == "split":
        return model_def["split"][ref[1]][ref[2]]
    raise ValueError(f"unknown width reference {ref!r}")


def resolve_widths(model_def, num_classes, architecture=None):
    """Group name -> channel count for a (validated) model_def."""
    architecture = architecture or adapnet_pp()
    return {g.name: resolve_width(g.width, model_def, num_classes)
            for g in architecture.groups}


def input_offsets(conv, widths):
    """Start channel of each of ``conv``'s inputs in its concatenated input."""
    offsets, start = [], 0
    for name in conv.inputs:
        offsets.append(start)
        start += widths[name]
    return offsets, start


def output_offset(conv, group_name, widths):
    """Start channel of ``group_name`` in ``conv``'s output ([A | B] for splits)."""
    start = 0
    for name in conv.outputs:
        if name == group_name:
            return start
        start += widths[name]
    raise KeyError(group_name)

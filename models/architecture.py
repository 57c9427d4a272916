"""AdapNet++ declared once, as data.

Four readers use this declaration: the graph builder (which tensors each
conv reads and how it is configured), the cost counts (parameters and
multiply-adds), the ranking step (the prunable layer list) and the pruner
(who reads a layer's channels, at which offset).

Vocabulary:
- a *group* is a set of channels produced together and kept or removed
  together: a conv's output, one half of a split conv, a residual stream;
- a *conv* is one kernel variable; it reads the concatenation of its input
  groups (in order) and writes one group, or two for a split conv ([A | B]).

Widths are references into a model_def (``WidthRef``: ``resolve`` reads a
width, ``assign`` sets a pruned one); the declaration itself does not depend
on a model_def. It also holds the variable names and kernel axes of every
conv, the batch norms outside convs (``Norm``) and the output stride; it
imports no TensorFlow (configs read it before TensorFlow loads). Readers
ask the ``Architecture`` (aux heads, sections, units, residual widths, batch
norms) rather than knowing names; docs/design.md describes the network and
its quirks.
"""

import enum
from dataclasses import dataclass
from functools import lru_cache

OUTER_SCOPE = "resnet_v2_50"
IMAGE = "image"

# Variable names within a conv's (or batch norm's) scope, those of the
# original checkpoints (docs/design.md, "Variable names"). No biases.
KERNEL_VARIABLE = "weights"
BATCH_NORM_SCOPE = "BatchNorm"
BATCH_NORM_VARIABLES = ("gamma", "beta", "moving_mean", "moving_variance")


def variable_name(scope, name):
    """The checkpoint name of variable ``name`` in ``scope``."""
    return f"{OUTER_SCOPE}/{scope}/{name}"


def batch_norm_variables(scope):
    """The variables of the batch norm in ``scope``, in BATCH_NORM_VARIABLES order."""
    return tuple(variable_name(scope, f"{BATCH_NORM_SCOPE}/{name}")
                 for name in BATCH_NORM_VARIABLES)


# ---- widths: references into a model_def ------------------------------------

class WidthRef:
    """Where a group's channel count comes from. ``resolve`` reads it from a
    model_def; ``assign`` writes a new count (prunable widths only)."""

    def resolve(self, model_def, num_classes):
        raise NotImplementedError

    def assign(self, model_def, value):
        raise ValueError(f"width {self} is fixed by the architecture, not prunable")


@dataclass(frozen=True)
class ParamWidth(WidthRef):
    """``params[key]``, or ``params[key][index]`` for a residual unit's list."""
    key: str
    index: int = None

    def resolve(self, model_def, num_classes):
        value = model_def["params"][self.key]
        return value if self.index is None else value[self.index]

    def assign(self, model_def, value):
        if self.index is None:
            model_def["params"][self.key] = value
        else:
            model_def["params"][self.key][self.index] = value


@dataclass(frozen=True)
class SplitWidth(WidthRef):
    """One half of a split conv2: ``split[key][part]``; conv2's width
    ``params[key][1]`` is the sum of both halves."""
    key: str
    part: int

    def resolve(self, model_def, num_classes):
        return model_def["split"][self.key][self.part]

    def assign(self, model_def, value):
        model_def["split"][self.key][self.part] = value
        model_def["params"][self.key][1] = sum(model_def["split"][self.key])


@dataclass(frozen=True)
class FixedWidth(WidthRef):
    channels: int

    def resolve(self, model_def, num_classes):
        return self.channels


@dataclass(frozen=True)
class ClassesWidth(WidthRef):
    def resolve(self, model_def, num_classes):
        return num_classes


# ---- the building blocks ------------------------------------------------------

class Shortcut(enum.Enum):
    """What a residual unit adds its branch to."""
    NONE = "identity"    # the unit's input
    INPUT = "input"      # a 1x1 conv (stride of the unit) of the unit's input
    CONV1 = "conv1"      # a 1x1 conv of the unit's own conv1 output (block1/unit_1)


class Pooling(enum.Enum):
    NONE = "none"
    MAX_AFTER = "max_after"  # a 3x3/2 max-pool on the output: consumers read half size
    GLOBAL_INPUT = "global_input"  # runs on the globally averaged input; output
    # resized back to the input's size (image pooling)


@dataclass(frozen=True)
class Group:
    name: str
    width: WidthRef
    prunable: bool
    section: str = ""  # what prun_model.py's `phase` calls its part of the network
    unit: str = ""  # the residual unit it belongs to
    # The name prun_model.py's conv_name may use within its section or unit
    # (conv1, conv2/A, ...); the scope always works.
    short_name: str = ""
    # A residual unit's conv3: removed channels leave through the unit's mask.
    through_mask: bool = False
    # A block's residual stream: written by the first unit's shortcut and
    # every unit's conv3 (added), normalised in every conv3 scope, read by
    # the units' conv1s and what reads the block output (docs/design.md).
    # Pruned only when asked for (prunable_groups(streams=True)).
    stream: bool = False


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
    aux: bool = False  # auxiliary heads exist only for training and ranking
    loss_weight: float = 0.0  # an auxiliary head's weight in the training loss
    pooling: Pooling = Pooling.NONE
    unit: str = ""  # the residual unit it belongs to (built by the unit, not alone)

    @property
    def kernel_axes(self):
        """(input axis, output axis) of the kernel: [k, k, in, out], a
        transposed conv's [k, k, out, in] (the TensorFlow layouts)."""
        return (3, 2) if self.transposed else (2, 3)

    def kernel_shape(self, in_channels, out_channels):
        shape = [self.kernel, self.kernel, 0, 0]
        input_axis, output_axis = self.kernel_axes
        shape[input_axis], shape[output_axis] = in_channels, out_channels
        return shape

    @property
    def kernel_variable(self):
        return variable_name(self.scope, KERNEL_VARIABLE)

    @property
    def norm_variables(self):
        """Its batch norm's variables; () for a conv without one."""
        return batch_norm_variables(self.scope) if self.norm else ()


@dataclass(frozen=True)
class Norm:
    """A batch norm that is not a conv's own: the image's, and each unit's
    pre-activation, which lives in the unit's conv3 scope (docs/design.md)."""
    scope: str
    group: str  # the channels it normalises
    unit: str = ""  # the unit whose residual sum it normalises

    @property
    def variables(self):
        return batch_norm_variables(self.scope)


@dataclass(frozen=True)
class Unit:
    """A residual bottleneck unit (docs/design.md)."""

    block: str
    index: int
    key: str  # model_def params key
    shortcut: Shortcut
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
        units.append(Unit("block1", index, key,
                          Shortcut.CONV1 if index == 1 else Shortcut.NONE))
    for index, key in enumerate(("5", "6", "7", "8"), start=1):
        units.append(Unit("block2", index, key,
                          Shortcut.INPUT if index == 1 else Shortcut.NONE,
                          stride=2 if index == 1 else 1,
                          split_rates=(1, 2) if index == 4 else ()))
    for index, key in enumerate(("9", "10", "11", "12", "13", "14"), start=1):
        units.append(Unit("block3", index, key,
                          Shortcut.INPUT if index == 1 else Shortcut.NONE,
                          stride=2 if index == 1 else 1,
                          split_rates=(1, 2) if index >= 3 else ()))
    for index, key in enumerate(("15", "16", "17"), start=1):
        units.append(Unit("block4", index, key,
                          Shortcut.INPUT if index == 1 else Shortcut.NONE,
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

# Skip connections (not prunable): scope -> residual stream read.
SKIPS = {"conv32": "block1/residual", "conv174": "block2/residual"}
SKIP_WIDTH = 24
IMAGE_POOLING_WIDTH = 256


@dataclass(frozen=True)
class Architecture:
    groups: tuple
    convs: tuple
    units: tuple
    logits: str  # the conv whose output is the class scores
    norms: tuple = ()  # Norm: the batch norms outside convs, in build order

    @property
    def group_by_name(self):
        return {g.name: g for g in self.groups}

    def group(self, name):
        for group in self.groups:
            if group.name == name:
                return group
        raise KeyError(name)

    def conv(self, scope):
        for conv in self.convs:
            if conv.scope == scope:
                return conv
        raise KeyError(scope)

    def producer_of(self, group_name):
        """The conv writing ``group_name``."""
        for conv in self.convs:
            if group_name in conv.outputs:
                return conv
        raise KeyError(group_name)

    def prunable_groups(self, streams=False):
        """Prunable groups in declaration order; the residual streams only
        with ``streams`` (they are pruned only when asked for)."""
        return [g for g in self.groups if g.prunable and (streams or not g.stream)]

    def stream_groups(self):
        return [g for g in self.groups if g.stream]

    def stream_units(self, group_name):
        """The units whose additions and pre-activations make up a stream."""
        return [unit for unit in self.units if unit.residual_group == group_name]

    def stream_writers(self, group_name):
        """Convs adding into a stream: the first unit's shortcut, then every
        unit's conv3 (a masked conv3 at its kept positions)."""
        units = self.stream_units(group_name)
        return [self.producer_of(group_name)] + [self.unit_convs(u)["conv3"] for u in units]

    def consumers_of(self, group_name):
        """Convs that read ``group_name``: list of (conv, position in conv.inputs)."""
        return [(conv, conv.inputs.index(group_name))
                for conv in self.convs if group_name in conv.inputs]

    def aux_heads(self):
        return [conv for conv in self.convs if conv.aux]

    def input_norm(self):
        """The batch norm on the image."""
        return next(norm for norm in self.norms if norm.group == IMAGE)

    def pre_activation(self, unit):
        """The batch norm turning ``unit``'s residual sum into what the next
        unit (or the block's readers) read."""
        return next(norm for norm in self.norms if norm.unit == unit.name)

    def norms_of(self, group_name):
        """The batch norms (not convs' own) normalising ``group_name``."""
        return [norm for norm in self.norms if norm.group == group_name]

    @property
    def output_stride(self):
        """The largest downsampling of any group (16 for AdapNet++): input
        height and width must be multiples of it, so that the decoder's
        upsampled maps meet the skips' at equal sizes."""
        stride_of_group = {IMAGE: 1}
        for conv in self.convs:
            stride = stride_of_group[conv.inputs[0]]
            stride = stride // conv.stride if conv.transposed else stride * conv.stride
            if conv.pooling is Pooling.MAX_AFTER:
                stride *= 2
            if conv.pooling is Pooling.GLOBAL_INPUT:
                stride = stride_of_group[conv.inputs[0]]  # resized back
            for group in conv.outputs:
                stride_of_group[group] = stride
        return max(stride_of_group.values())

    def aux_scopes(self):
        return [conv.scope for conv in self.aux_heads()]

    def sections(self):
        """Sections of the prunable layers, in network order."""
        return tuple(dict.fromkeys(g.section for g in self.prunable_groups()))

    def unit(self, name):
        for unit in self.units:
            if unit.name == name:
                return unit
        raise KeyError(name)

    def unit_convs(self, unit):
        """{name within the unit (conv1, conv2, conv3, shortcut): conv}."""
        return {conv.scope[len(unit.scope) + 1:]: conv for conv in self.convs
                if conv.unit == unit.name}

    def units_of(self, block):
        return [unit for unit in self.units if unit.block == block]

    def first_unit(self, block):
        """The unit whose model_def entry sets the block's residual width."""
        return self.units_of(block)[0]

    def unit_ranges(self):
        """'block1/unit_1 .. block1/unit_3, ...': the units, for messages."""
        blocks = dict.fromkeys(unit.block for unit in self.units)
        return ", ".join(f"{self.units_of(b)[0].name} .. {self.units_of(b)[-1].name}"
                         for b in blocks)

    def residual_width(self, model_def, unit, num_classes=None):
        """Channels of ``unit``'s residual stream (its block's width)."""
        return self.group(unit.residual_group).width.resolve(model_def, num_classes)

    def param_keys(self):
        """The model_def ``params`` keys the declaration reads, in order."""
        keys = {g.width.key for g in self.groups if isinstance(g.width, ParamWidth)}
        return tuple(sorted(keys, key=int))


def _unit_declarations(unit, unit_input):
    """Groups and convs of one residual unit reading group ``unit_input``."""
    key, scope, block = unit.key, unit.scope, unit.block
    groups, convs = [], []

    def group(short_name, width, through_mask=False):
        name = f"{scope}/{short_name}"
        groups.append(Group(name, width, True, block, unit.name, short_name, through_mask))
        return name

    def conv(name, inputs, outputs, kernel, stride=1, **options):
        convs.append(Conv(f"{scope}/{name}", inputs, outputs, kernel, stride,
                          unit=unit.name, **options))

    conv1 = group("conv1", ParamWidth(key, 0))
    conv("conv1", (unit_input,), (conv1,), 1)
    if unit.split_rates:
        parts = (group("conv2/A", SplitWidth(key, 0)), group("conv2/B", SplitWidth(key, 1)))
        conv("conv2", (conv1,), parts, 3, unit.stride, rates=unit.split_rates)
    else:
        parts = (group("conv2", ParamWidth(key, 1)),)
        conv("conv2", (conv1,), parts, 3, unit.stride)
    conv3 = group("conv3", ParamWidth(key, 2), through_mask=True)
    conv("conv3", parts, (conv3,), 1, norm=False, relu=False)
    if unit.shortcut is not Shortcut.NONE:
        reads_conv1 = unit.shortcut is Shortcut.CONV1
        conv("shortcut", (conv1 if reads_conv1 else unit_input,), (unit.residual_group,), 1,
             1 if reads_conv1 else unit.stride, norm=False, relu=False)
    return groups, convs


@lru_cache(maxsize=1)
def adapnet_pp():
    """The AdapNet++ declaration (docs/design.md)."""
    groups = [Group(IMAGE, FixedWidth(3), False),
              Group("conv1", ParamWidth("1"), True, "conv1")]
    convs = [Conv("conv1", (IMAGE,), ("conv1",), 7, 2, pooling=Pooling.MAX_AFTER)]
    previous = "conv1"
    for block in BLOCKS:
        units = [u for u in UNITS if u.block == block]
        groups.append(Group(f"{block}/residual", ParamWidth(units[0].key, 3), True, block,
                            short_name="residual", stream=True))
        for unit in units:
            unit_groups, unit_convs = _unit_declarations(unit, previous)
            groups += unit_groups
            convs += unit_convs
            previous = unit.residual_group

    for scope, stream in SKIPS.items():
        groups.append(Group(scope, FixedWidth(SKIP_WIDTH), False, "skip"))
        convs.append(Conv(scope, (stream,), (scope,), 1, relu=False))

    def easpp_conv(scope, key, inputs, kernel=1, rate=1, relu=True):
        groups.append(Group(scope, ParamWidth(key), True, "easpp"))
        convs.append(Conv(scope, inputs, (scope,), kernel, rates=(rate,), relu=relu))
        return scope

    b4 = "block4/residual"
    branch_outputs = [easpp_conv("conv256", "18", (b4,))]
    for scopes, keys, rate in EASPP_BRANCHES:
        x = easpp_conv(scopes[0], keys[0], (b4,))
        x = easpp_conv(scopes[1], keys[1], (x,), 3, rate)
        x = easpp_conv(scopes[2], keys[2], (x,), 3, rate)
        branch_outputs.append(easpp_conv(scopes[3], keys[3], (x,)))
    groups.append(Group("conv57", FixedWidth(IMAGE_POOLING_WIDTH), False, "easpp"))
    convs.append(Conv("conv57", (b4,), ("conv57",), 1, pooling=Pooling.GLOBAL_INPUT))
    branch_outputs.append("conv57")
    easpp_conv("conv10", "31", tuple(branch_outputs), relu=False)

    # Sections and short names are those of the original pruning script.
    def decoder_conv(scope, key, inputs, kernel, section, short_name="", stride=1,
                     transposed=False, relu=True):
        groups.append(Group(scope, ParamWidth(key), True, section, short_name=short_name))
        convs.append(Conv(scope, inputs, (scope,), kernel, stride, transposed=transposed,
                          relu=relu))

    decoder_conv("conv41", "32", ("conv10",), 4, "upsample1", stride=2, transposed=True,
                 relu=False)
    decoder_conv("conv89", "33", ("conv41", "conv174"), 3, "decoder_conv1", "conv1")
    decoder_conv("conv96", "34", ("conv89",), 3, "decoder_conv1", "conv2")
    decoder_conv("conv16", "35", ("conv96",), 4, "upsample2", stride=2, transposed=True,
                 relu=False)
    decoder_conv("conv88", "36", ("conv16", "conv32"), 3, "decoder_conv2", "conv1")
    decoder_conv("conv95", "37", ("conv88",), 3, "decoder_conv2", "conv2")

    for scope, inputs, kernel, stride, transposed, relu, loss_weight in (
            ("conv78", ("conv95",), 1, 1, False, True, 0.0),
            ("conv5", ("conv78",), 8, 4, True, False, 0.0),
            ("conv911", ("conv16",), 1, 1, False, False, 0.6),
            ("conv912", ("conv41",), 1, 1, False, False, 0.5)):
        groups.append(Group(scope, ClassesWidth(), False, "classifier"))
        convs.append(Conv(scope, inputs, (scope,), kernel, stride, transposed=transposed,
                          relu=relu, aux=loss_weight > 0, loss_weight=loss_weight))
    norms = (Norm("conv0", IMAGE),) + tuple(
        Norm(f"{unit.scope}/conv3", unit.residual_group, unit.name) for unit in UNITS)
    return Architecture(tuple(groups), tuple(convs), UNITS, logits="conv5", norms=norms)


def resolve_widths(model_def, num_classes, architecture=None):
    """Group name -> channel count for a (validated) model_def."""
    architecture = architecture or adapnet_pp()
    return {g.name: g.width.resolve(model_def, num_classes) for g in architecture.groups}


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

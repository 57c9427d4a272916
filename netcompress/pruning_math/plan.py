"""The pruning plan and its two appliers (docs/design.md, "The pruning plan").

``plan_removal`` takes, per selected layer, the output channels that go
(``plan_pruning`` finds them from scores and a threshold) and finds, from the
architecture declaration, every tensor slice that carries them (the
producer's kernel and batch norm, every consumer's input slice at its
concatenation offset, the residual masks; for a residual stream every writer,
batch norm and reader), plus the new model_def and masks.
``remove_channels`` deletes the slices; ``zero_channels`` keeps shapes and
zeros what the consumers read (and a residual conv3's own outputs). Both read
one plan, so the zeroed network computes what the pruned one computes.
"""

import copy
from dataclasses import dataclass, field

import numpy as np

from common.errors import UserError
from models.architecture import OUTER_SCOPE, adapnet_pp, input_offsets, output_offset, \
    resolve_widths
from models.model_def import check_masks, validate_model_def
from netcompress.pruning_math.scores import channels_to_keep, kept_count


@dataclass(frozen=True)
class ChannelSlice:
    """Positions ``indices`` along ``axis`` (``length`` long in the source
    model) of checkpoint variable ``variable`` that carry removed channels.
    ``role``: 'output' (the producer's kernel and batch norm), 'input' (a
    consumer's kernel) or 'residual' (a residual conv3's kernel outputs,
    scattered by a mask). ``optional``: the variable belongs to an auxiliary
    head, which a checkpoint may lack."""
    variable: str
    axis: int
    length: int
    indices: tuple
    role: str
    optional: bool = False


@dataclass(frozen=True)
class LayerCut:
    layer: str
    width: int
    kept: tuple
    no_signal: bool = False  # scores all zero: left as it is

    @property
    def removed(self):
        return tuple(sorted(set(range(self.width)) - set(self.kept)))


@dataclass
class PruningPlan:
    layers: list  # LayerCut per selected layer, in architecture order
    slices: list  # ChannelSlice
    model_def_before: dict
    model_def_after: dict
    masks_before: dict  # {unit: (kept indices, residual width)}
    masks_after: dict
    num_classes: int
    threshold: float = None  # None: an explicit removal (plan_removal)
    notes: list = field(default_factory=list)
    # {layer: channels} kept although the removal took them: a conv3's or
    # a stream's, so that a masked conv3 keeps a channel (_give_back_stream,
    # _give_back_conv3)
    given_back: dict = field(default_factory=dict)
    # The declaration planned on (models/architecture.py); the cost report counts with it.
    architecture: object = None

    @property
    def pruned_layers(self):
        return [cut for cut in self.layers if cut.removed]

    def removal_slices(self):
        return list(self.slices)

    def zeroing_slices(self):
        """What try_zeros zeros: consumers' inputs and residual conv3 outputs.
        Zeroing a producer's kernel would not do: its batch norm still adds
        beta - gamma * mean / std, a constant the consumers would read."""
        return [s for s in self.slices if s.role in ("input", "residual")]


def _slices_for(group, removed, widths, architecture):
    """Every tensor slice carrying ``removed`` channels of ``group``."""
    producer = architecture.producer_of(group.name)
    start = output_offset(producer, group.name, widths)
    out_channels = sum(widths[name] for name in producer.outputs)
    at_output = tuple(int(start + i) for i in removed)
    slices = [ChannelSlice(producer.kernel_variable, producer.kernel_axes[1],
                           out_channels, at_output,
                           "residual" if group.through_mask else "output")]
    slices += [ChannelSlice(name, 0, out_channels, at_output, "output")
               for name in producer.norm_variables]
    return slices + _reader_slices(group, removed, widths, architecture)


def _reader_slices(group, removed, widths, architecture):
    """The input slices of ``removed`` channels of ``group`` in every conv
    that reads it (at the group's offset in that conv's concatenated input)."""
    slices = []
    for consumer, position in architecture.consumers_of(group.name):
        offsets, in_channels = input_offsets(consumer, widths)
        slices.append(ChannelSlice(consumer.kernel_variable, consumer.kernel_axes[0],
                                   in_channels,
                                   tuple(int(offsets[position] + i) for i in removed),
                                   "input", optional=consumer.aux))
    return slices


def _stream_slices(group, removed, widths, masks, architecture):
    """Every tensor slice carrying ``removed`` channels of a residual stream:
    the writers' kernel outputs (a masked conv3 at the kept positions among
    them), every pre-activation batch norm on it, and every reader's input."""
    removed = np.asarray(removed, np.int64)
    width = widths[group.name]
    slices = []
    for writer in architecture.stream_writers(group.name):
        if writer.unit and writer.outputs != (group.name,):  # a unit's conv3
            unit = architecture.unit(writer.unit)
            positions = np.asarray(masks.get(unit.name, (np.arange(width), width))[0])
            columns = np.flatnonzero(np.isin(positions, removed))
            out_channels = len(positions)
        else:
            columns, out_channels = removed, width
        if len(columns):
            slices.append(ChannelSlice(writer.kernel_variable, writer.kernel_axes[1],
                                       out_channels, tuple(int(c) for c in columns),
                                       "output"))
    at_stream = tuple(int(i) for i in removed)
    for norm in architecture.norms_of(group.name):  # every unit's pre-activation
        slices += [ChannelSlice(name, 0, width, at_stream, "output")
                   for name in norm.variables]
    return slices + _reader_slices(group, removed, widths, architecture)


def _unit_masks(unit, cuts, masks, new_model_def, new_masks, architecture, model_def):
    """Update the mask and conv3 width of ``unit`` after its conv3 and/or its
    stream lost channels. Mask indices refer to the stream's full width: a
    conv3 cut selects among the unit's current channels (old_kept[kept]); a
    stream cut drops the removed positions and renumbers the rest."""
    full = architecture.residual_width(model_def, unit)
    positions = np.asarray(masks.get(unit.name, (np.arange(full), full))[0], np.int64)
    conv3_cut = cuts.get(f"{unit.scope}/conv3")
    stream_cut = cuts.get(unit.residual_group)
    if conv3_cut is not None:
        positions = positions[np.asarray(conv3_cut.kept, np.int64)]
    stream_kept = np.arange(full) if stream_cut is None \
        else np.asarray(stream_cut.kept, np.int64)
    positions = np.searchsorted(stream_kept, positions[np.isin(positions, stream_kept)])
    if not len(positions):
        raise UserError(f"{unit.name}: its conv3 would keep no channel (every channel it "
                        f"writes is removed from {unit.residual_group}); keep more of the "
                        f"stream or of the conv3")
    new_model_def["params"][unit.key][2] = len(positions)
    if len(positions) == len(stream_kept):
        new_masks.pop(unit.name, None)  # writes the whole stream again: no mask
    else:
        new_masks[unit.name] = (positions, len(stream_kept))


def _give_back_stream(cuts, masks, widths, architecture, notes, given_back):
    """A stream whose cut removes every position a masked conv3 writes would
    leave that conv3 nothing: the stream keeps the first of those positions
    (a channel given back, noted)."""
    by_layer = {cut.layer: cut for cut in cuts}
    for unit in architecture.units:
        stream = by_layer.get(unit.residual_group)
        if stream is None or not stream.removed or unit.name not in masks:
            continue
        positions = np.asarray(masks[unit.name][0], np.int64)
        if np.isin(positions, stream.kept).any():
            continue
        position = int(positions[0])
        given_back[stream.layer] = given_back.get(stream.layer, ()) + (position,)
        stream = LayerCut(stream.layer, stream.width, tuple(sorted(stream.kept + (position,))))
        by_layer[stream.layer] = stream
        notes.append(f"{stream.layer}: keeps channel {position} too, every channel "
                     f"{unit.name}'s conv3 writes being removed")
    return [by_layer[cut.layer] for cut in cuts]


def _give_back_conv3(cuts, masks, widths, architecture, notes, given_back):
    """A conv3 whose kept channels all sit at stream positions the stream's
    cut removes would keep none: it keeps instead its first channel at a
    position the stream keeps (as round_to, a channel given back; noted)."""
    by_layer = {cut.layer: cut for cut in cuts}
    for unit in architecture.units:
        conv3, stream = by_layer.get(f"{unit.scope}/conv3"), by_layer.get(unit.residual_group)
        if conv3 is None or stream is None or not conv3.removed or not stream.removed:
            continue
        full = widths[unit.residual_group]
        positions = np.asarray(masks.get(unit.name, (np.arange(full), full))[0], np.int64)
        surviving = np.flatnonzero(np.isin(positions, stream.kept))
        if not len(surviving) or np.isin(positions[list(conv3.kept)], stream.kept).any():
            continue  # fine, or nothing to give back (_unit_masks says so)
        channel = int(surviving[0])
        given_back[conv3.layer] = (channel,)
        by_layer[conv3.layer] = LayerCut(conv3.layer, conv3.width,
                                         tuple(sorted(conv3.kept + (channel,))))
        notes.append(f"{conv3.layer}: keeps channel {channel} too, every channel it kept "
                     f"being removed from {unit.residual_group}")
    return [by_layer[cut.layer] for cut in cuts]


def _checked_widths(model_def, masks, num_classes, layers, architecture):
    """{group: width} of the model, once it and ``layers`` are checked."""
    validate_model_def(model_def)
    check_masks(model_def, masks)
    groups = architecture.group_by_name
    unknown = [name for name in layers if name not in groups or not groups[name].prunable]
    if unknown:
        raise UserError(f"not a prunable layer: {unknown[0]}")
    return resolve_widths(model_def, num_classes, architecture)


def plan_pruning(model_def, masks, num_classes, normalised_scores, layers, threshold,
                 min_channels=1, round_to=1, architecture=None):
    """The plan for pruning ``layers`` (names) of the model ``model_def`` +
    ``masks`` ({unit: (kept indices, residual width)}, as from load_masks):
    channels with normalised score < ``threshold`` go (see channels_to_keep,
    the one place a threshold, min_channels and round_to become a removal),
    then plan_removal. ``normalised_scores``: {layer: array or None (no
    signal)}. Layers may include residual streams (docs/design.md, "Residual
    streams")."""
    # None: AdapNet++'s, for tests and bench/ scripts, which build no model.
    architecture = architecture or adapnet_pp()
    widths = _checked_widths(model_def, masks, num_classes, layers, architecture)
    removed, no_signal = {}, []
    selected = set(layers)
    for group in (g for g in architecture.prunable_groups(streams=True) if g.name in selected):
        width = widths[group.name]
        if group.name not in normalised_scores:
            raise UserError(f"no scores for {group.name} (a rank file written before "
                            f"residual streams were ranked?): regenerate the rank file")
        scores = normalised_scores[group.name]
        if scores is None:
            no_signal.append(group.name)
            continue
        if len(scores) != width:
            raise UserError(f"{group.name}: {len(scores)} scores for {width} channels")
        kept = channels_to_keep(scores, threshold, min_channels, round_to)
        removed[group.name] = np.setdiff1d(np.arange(width), kept)
    plan = plan_removal(model_def, masks, num_classes, removed, architecture=architecture,
                        no_signal=no_signal)
    plan.threshold = threshold
    return plan


def _kept_channels(layer, removed, width, min_channels, round_to):
    """The channels ``layer`` keeps when ``removed`` go: at least min_channels,
    rounded up to round_to (kept_count), by giving back the lowest removed
    indices (what equal scores below a threshold give back)."""
    removed = np.unique(np.asarray(removed, np.int64))
    outside = removed[(removed < 0) | (removed >= width)]
    if len(outside):
        raise UserError(f"{layer}: it has no channel {outside[0]} (it has {width})")
    if len(removed) == width:
        raise UserError(f"{layer}: the removal takes all its {width} channels; a layer "
                        f"keeps at least one")
    passing = width - len(removed)
    removed = removed[kept_count(width, passing, min_channels, round_to) - passing:]
    return tuple(int(k) for k in np.setdiff1d(np.arange(width), removed))


def plan_removal(model_def, masks, num_classes, removed, min_channels=1, round_to=1,
                 architecture=None, no_signal=()):
    """The plan that removes ``removed`` ({layer: channel indices}; an empty
    list selects a layer and removes nothing) from the model ``model_def`` +
    ``masks``. Each layer keeps at least ``min_channels``, its count rounded
    up to a multiple of ``round_to``, the lowest removed indices given back;
    a removal that takes every channel of a layer is an error. ``no_signal``:
    selected layers left as they are (their scores are all zero)."""
    # None: AdapNet++'s, for tests and bench/ scripts, which build no model.
    architecture = architecture or adapnet_pp()
    widths = _checked_widths(model_def, masks, num_classes, list(removed) + list(no_signal),
                             architecture)
    groups = architecture.group_by_name
    new_model_def = copy.deepcopy(model_def)
    new_masks = {unit: (np.asarray(kept, np.int64), width)
                 for unit, (kept, width) in masks.items()}
    cuts, slices, notes = [], [], []
    selected = set(removed) | set(no_signal)
    for group in (g for g in architecture.prunable_groups(streams=True) if g.name in selected):
        width = widths[group.name]
        if group.name in no_signal:
            cuts.append(LayerCut(group.name, width, tuple(range(width)), no_signal=True))
            notes.append(f"{group.name}: all scores are zero, layer left unpruned")
            continue
        cuts.append(LayerCut(group.name, width, _kept_channels(
            group.name, removed[group.name], width, min_channels, round_to)))
    given_back = {}  # {layer: channels kept beyond the removal}
    cuts = _give_back_stream(cuts, masks, widths, architecture, notes, given_back)
    cuts = _give_back_conv3(cuts, masks, widths, architecture, notes, given_back)
    for cut in cuts:
        if not cut.removed:
            continue
        group = groups[cut.layer]
        if group.stream:
            slices += _stream_slices(group, cut.removed, widths, masks, architecture)
            for unit in architecture.stream_units(group.name):
                # A unit's 4th entry is read only in the first unit; kept equal.
                if len(new_model_def["params"][unit.key]) == 4:
                    new_model_def["params"][unit.key][3] = len(cut.kept)
        else:
            slices += _slices_for(group, cut.removed, widths, architecture)
        group.width.assign(new_model_def, len(cut.kept))
    cut_by_layer = {cut.layer: cut for cut in cuts if cut.removed}
    for unit in architecture.units:
        if {f"{unit.scope}/conv3", unit.residual_group} & set(cut_by_layer):
            _unit_masks(unit, cut_by_layer, masks, new_model_def, new_masks, architecture,
                        model_def)
    validate_model_def(new_model_def, source="pruned model_def")
    check_masks(new_model_def, new_masks, source="pruned masks")
    return PruningPlan(cuts, slices, model_def, new_model_def, masks, new_masks, num_classes,
                       None, notes, given_back, architecture)


# ---- applying the plan to checkpoint values --------------------------------

def _present(slices, values):
    """The slices whose variable the checkpoint has, checked against its shape."""
    for piece in slices:
        if piece.variable not in values:
            if piece.optional:
                continue
            raise UserError(f"the checkpoint does not match the model: it has no variable "
                            f"{piece.variable}")
        shape = np.shape(values[piece.variable])
        if len(shape) <= piece.axis or shape[piece.axis] != piece.length:
            raise UserError(f"the checkpoint does not match the model: {piece.variable} is "
                            f"{list(shape)}, the model_def gives {piece.length} channels on "
                            f"axis {piece.axis}")
        yield piece


def remove_channels(plan, values):
    """New {name: array} with every slice of the plan deleted."""
    by_axis = {}
    for piece in _present(plan.removal_slices(), values):
        by_axis.setdefault((piece.variable, piece.axis), set()).update(piece.indices)
    result = dict(values)
    for (name, axis), indices in sorted(by_axis.items()):
        result[name] = np.delete(result[name], sorted(indices), axis=axis)
    return result


def zero_channels(plan, values):
    """New {name: array}, shapes unchanged, with the consumer-side slices of the
    plan (and residual conv3 outputs) set to zero."""
    result = dict(values)
    for piece in _present(plan.zeroing_slices(), values):
        array = np.array(result[piece.variable])  # copy: sources stay untouched
        index = [slice(None)] * array.ndim
        index[piece.axis] = list(piece.indices)
        array[tuple(index)] = 0.0
        result[piece.variable] = array
    return result


def model_values(values):
    """The model's variables of a checkpoint (no optimizer slots, no step)."""
    return {name: value for name, value in values.items()
            if name.startswith(OUTER_SCOPE + "/")
            and not name.rsplit("/", 1)[-1].startswith("Adam")}

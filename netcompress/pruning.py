"""Filter pruning of AdapNet++ from Taylor-oracle ranks (README.md, "Pruning").

The pieces, in the order prun_model.py uses them:

- selection: ``select_layers(phase, conv_name, all_convs)`` -> layer names;
- scores: ``normalise(values, method)`` per layer (``max`` as the original,
  ``l2`` as Molchanov et al.);
- the plan: ``plan_pruning`` decides, per selected layer, which output
  channels go and, from the architecture declaration, every tensor slice that
  carries them (the producer's kernel and batch norm, every consumer's input
  slice at its concatenation offset, the residual masks), plus the new
  model_def and masks;
- two appliers of the same plan: ``remove_channels`` deletes the slices,
  ``zero_channels`` keeps shapes and zeros what the consumers read (and a
  residual conv3's own outputs). Since both read one plan, the zeroed network
  computes what the pruned one computes;
- ``prune`` runs the whole thing on files; ``threshold_summary`` is the
  decide_threshold mode; ``cost_report`` the parameters/FLOPs table.
"""

import copy
import math
import os
from dataclasses import dataclass, field

import numpy as np

from models.architecture import OUTER_SCOPE, UNITS, adapnet_pp, input_offsets, \
    output_offset, resolve_widths
from models.model_def import check_masks, load_masks, load_model_def, residual_width, \
    save_masks, save_model_def, validate_model_def
from common.errors import UserError
from common.files import staged
from netcompress import outputs
from netcompress.checkpoint_paths import checkpoint_directory, checkpoint_files, \
    input_checkpoint_files, record_in_state_file, resolve_checkpoint
from netcompress.flops import conv_costs, inference_macs, total_parameters
from netcompress.rankfile import CRITERIA, RankSums

NORMALISATIONS = ("max", "l2")
BATCH_NORM_VARIABLES = ("gamma", "beta", "moving_mean", "moving_variance")
SECTION_PHASES = ("conv1", "block1", "block2", "block3", "block4", "easpp", "upsample1",
                  "upsample2", "decoder_conv1", "decoder_conv2")
ALL_PHASE = "all"
# The original script names the two convs of a decoder pair conv1 and conv2.
DECODER_PAIRS = {"decoder_conv1": ("conv89", "conv96"),
                 "decoder_conv2": ("conv88", "conv95")}
SUMMARY_THRESHOLDS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


# ---- selection -------------------------------------------------------------

def unit_phases():
    return [u.name for u in UNITS]


def _phase_groups(phase, architecture):
    prunable = architecture.prunable_groups()
    if phase == ALL_PHASE:
        return prunable
    if phase in SECTION_PHASES:
        return [g for g in prunable if g.section == phase]
    if phase in unit_phases():
        return [g for g in prunable if g.name.startswith(phase + "/")]
    raise UserError(f"unknown phase {phase!r}; valid: {', '.join(SECTION_PHASES)}, "
                    f"a unit (block1/unit_1 .. block1/unit_3, block2/unit_1 .. "
                    f"block2/unit_4, block3/unit_1 .. block3/unit_6, block4/unit_1 .. "
                    f"block4/unit_3) or {ALL_PHASE}")


def _short_names(group, phase, architecture):
    """Names a ``conv_name`` may use for ``group`` within ``phase``."""
    names = {group.name, architecture.producer_of(group.name).scope}
    if "/bottleneck_v1/" in group.name:
        relative = group.name.split("/bottleneck_v1/", 1)[1]  # conv1, conv2/A, ...
        names.add(relative)
        names.add(relative.split("/")[0])  # conv2 = both halves of a split conv2
    if phase in DECODER_PAIRS:
        names.add(("conv1", "conv2")[DECODER_PAIRS[phase].index(group.name)])
    return names


def select_layers(phase, conv_name=None, all_convs=False, architecture=None):
    """Prunable layer names of ``phase``: all of them with ``all_convs``, else
    those ``conv_name`` names (unit-relative names such as conv2/A match in
    every unit of a block; conv2 means both halves of a split conv2)."""
    architecture = architecture or adapnet_pp()
    groups = _phase_groups(phase, architecture)
    if all_convs:
        return [g.name for g in groups]
    valid = []
    for group in groups:
        names = _short_names(group, phase, architecture)
        for name in sorted(names, key=lambda n: (n.count("/"), n)):
            if name not in valid:
                valid.append(name)
    if conv_name is None:
        raise UserError(f"phase {phase!r}: set conv_name (one of {', '.join(valid)}) or "
                        f"all_convs true")
    chosen = [g.name for g in groups if conv_name in _short_names(g, phase, architecture)]
    if not chosen:
        raise UserError(f"conv_name {conv_name!r} is not a prunable layer of phase "
                        f"{phase!r}; valid: {', '.join(valid)} (or all_convs true)")
    if phase != ALL_PHASE:
        return chosen
    # In phase all a full name means that layer only (conv1: the stem conv,
    # not every unit's conv1); a short name naming several convs is refused.
    exact = [name for name in chosen
             if conv_name in (name, architecture.producer_of(name).scope)]
    if exact:
        return exact
    if len({architecture.producer_of(name).scope for name in chosen}) > 1:
        raise UserError(f"conv_name {conv_name!r} is ambiguous in phase all: it names "
                        f"{len(chosen)} layers ({', '.join(chosen[:3])}, ...); give a full "
                        f"layer name, or a block or unit as phase")
    return chosen


# ---- scores ----------------------------------------------------------------

def normalise(values, method):
    """Per-layer normalised scores; None when the layer carries no signal
    (all scores zero), which leaves it unpruned rather than guessing."""
    if method not in NORMALISATIONS:
        raise UserError(f"unknown normalisation {method!r}; valid: {', '.join(NORMALISATIONS)}")
    values = np.maximum(np.asarray(values, np.float64), 0.0)  # as the original: clamp
    scale = values.max() if method == "max" else np.sqrt(np.sum(values ** 2))
    if not scale > 0:
        return None
    return values / scale


def load_normalised_scores(rank_path, model_def, num_classes, criterion, normalisation,
                           architecture=None):
    """Rank file -> {layer: normalised scores or None}; the file must match the model."""
    architecture = architecture or adapnet_pp()
    if criterion not in CRITERIA:
        raise UserError(f"unknown criterion {criterion!r}; valid: {', '.join(CRITERIA)}")
    ranks = RankSums.load(rank_path)
    widths = resolve_widths(model_def, num_classes, architecture)
    ranks.check_model(widths, [g.name for g in architecture.prunable_groups()], rank_path)
    return {layer: normalise(values, normalisation)
            for layer, values in ranks.scores(criterion).items()}


def channels_to_keep(normalised, threshold, min_channels=1, round_to=1):
    """Sorted indices of the channels kept: those scoring >= threshold, at least
    ``min_channels`` (and always one), the count rounded up to a multiple of
    ``round_to`` (capped at the width); extra keeps are the highest scoring."""
    width = len(normalised)
    keep_count = width - int(np.sum(normalised < threshold))
    keep_count = max(keep_count, min(max(min_channels, 1), width))
    if round_to > 1:
        keep_count = min(width, -(-keep_count // round_to) * round_to)
    order = np.argsort(-normalised, kind="stable")
    return np.sort(order[:keep_count])


# ---- the plan --------------------------------------------------------------

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
    threshold: float = 0.0
    notes: list = field(default_factory=list)

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


def _variable(scope, name="weights"):
    return f"{OUTER_SCOPE}/{scope}/{name}"


def _slices_for(group, removed, widths, architecture):
    """Every tensor slice carrying ``removed`` channels of ``group``."""
    producer = architecture.producer_of(group.name)
    start = output_offset(producer, group.name, widths)
    out_channels = sum(widths[name] for name in producer.outputs)
    at_output = tuple(int(start + i) for i in removed)
    slices = [ChannelSlice(_variable(producer.scope), 2 if producer.transposed else 3,
                           out_channels, at_output,
                           "residual" if group.residual_unit else "output")]
    if producer.norm:
        slices += [ChannelSlice(_variable(producer.scope, f"BatchNorm/{name}"), 0,
                                out_channels, at_output, "output")
                   for name in BATCH_NORM_VARIABLES]
    for consumer, position in architecture.consumers_of(group.name):
        offsets, in_channels = input_offsets(consumer, widths)
        slices.append(ChannelSlice(_variable(consumer.scope), 3 if consumer.transposed else 2,
                                   in_channels,
                                   tuple(int(offsets[position] + i) for i in removed),
                                   "input", optional=consumer.aux))
    return slices


def _set_width(model_def, ref, value):
    kind, key = ref[0], ref[1]
    if kind == "params" and len(ref) == 2:
        model_def["params"][key] = value
    elif kind == "params":
        model_def["params"][key][ref[2]] = value
    elif kind == "split":
        model_def["split"][key][ref[2]] = value
        model_def["params"][key][1] = sum(model_def["split"][key])
    else:
        raise ValueError(f"width {ref!r} is not prunable")


def plan_pruning(model_def, masks, num_classes, normalised_scores, layers, threshold,
                 min_channels=1, round_to=1, architecture=None):
    """The plan for pruning ``layers`` (names) of the model ``model_def`` +
    ``masks`` ({unit: (kept indices, residual width)}, as from load_masks):
    channels with normalised score < ``threshold`` go (see channels_to_keep).
    ``normalised_scores``: {layer: array or None (no signal)}."""
    architecture = architecture or adapnet_pp()
    validate_model_def(model_def)
    check_masks(model_def, masks)
    groups = architecture.group_by_name
    unknown = [name for name in layers if name not in groups or not groups[name].prunable]
    if unknown:
        raise UserError(f"not a prunable layer: {unknown[0]}")
    widths = resolve_widths(model_def, num_classes, architecture)
    new_model_def = copy.deepcopy(model_def)
    new_masks = {unit: (np.asarray(kept, np.int64), width)
                 for unit, (kept, width) in masks.items()}
    cuts, slices, notes = [], [], []
    selected = set(layers)
    for group in (g for g in architecture.prunable_groups() if g.name in selected):
        width = widths[group.name]
        scores = normalised_scores[group.name]
        if scores is None:
            cuts.append(LayerCut(group.name, width, tuple(range(width)), no_signal=True))
            notes.append(f"{group.name}: all scores are zero, layer left unpruned")
            continue
        if len(scores) != width:
            raise UserError(f"{group.name}: {len(scores)} scores for {width} channels")
        kept = channels_to_keep(scores, threshold, min_channels, round_to)
        cut = LayerCut(group.name, width, tuple(int(k) for k in kept))
        cuts.append(cut)
        if not cut.removed:
            continue
        slices += _slices_for(group, cut.removed, widths, architecture)
        _set_width(new_model_def, group.width, len(kept))
        if group.residual_unit:
            unit = next(u for u in UNITS if u.name == group.residual_unit)
            full = residual_width(model_def, unit)
            # Mask indices always refer to the full residual width.
            previous = new_masks.get(unit.name, (np.arange(full), full))[0]
            new_masks[unit.name] = (np.asarray(previous)[kept], full)
    validate_model_def(new_model_def, source="pruned model_def")
    check_masks(new_model_def, new_masks, source="pruned masks")
    return PruningPlan(cuts, slices, model_def, new_model_def, masks, new_masks, num_classes,
                       threshold, notes)


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


# ---- report ----------------------------------------------------------------

def _percent_change(before, after):
    return f"{100.0 * (after - before) / before:+.1f}%" if before else "n/a"


def cost_report(plan, height, width):
    """Text: channels per pruned layer; params and MACs (at height x width) of
    every conv whose shape changed; totals before/after."""
    num_classes = plan.num_classes
    before = conv_costs(plan.model_def_before, num_classes, height, width, plan.masks_before)
    after = conv_costs(plan.model_def_after, num_classes, height, width, plan.masks_after)
    lines = [f"pruned {len(plan.pruned_layers)} of {len(plan.layers)} selected layer(s) "
             f"at threshold {plan.threshold:g}"]
    name_width = max([len(c.layer) for c in plan.layers] + [24])
    for cut in plan.layers:
        if cut.removed or cut.no_signal:
            status = " (no signal: kept)" if cut.no_signal else ""
            lines.append(f"  {cut.layer:<{name_width}} channels {cut.width:>5} -> "
                         f"{len(cut.kept):>5}{status}")
    unchanged = sum(1 for cut in plan.layers if not cut.removed and not cut.no_signal)
    if unchanged:
        lines.append(f"  ({unchanged} selected layer(s) have no channel below the threshold)")
    changed = [scope for scope in before if before[scope] != after[scope]]
    if changed:
        lines.append(f"  {'conv':<{name_width}} {'params before':>14} {'after':>12} "
                     f"{'MMACs before':>14} {'after':>12}")
        for scope in changed:
            lines.append(f"  {scope:<{name_width}} {before[scope].params:>14,} "
                         f"{after[scope].params:>12,} {before[scope].macs / 1e6:>14,.3f} "
                         f"{after[scope].macs / 1e6:>12,.3f}")
    params = [total_parameters(d, num_classes)
              for d in (plan.model_def_before, plan.model_def_after)]
    macs = [inference_macs(plan.model_def_before, num_classes, height, width, plan.masks_before),
            inference_macs(plan.model_def_after, num_classes, height, width, plan.masks_after)]
    lines.append(f"parameters: {params[0]:,} -> {params[1]:,} "
                 f"({_percent_change(*params)})")
    lines.append(f"inference GMACs at {height}x{width}: {macs[0] / 1e9:,.3f} -> "
                 f"{macs[1] / 1e9:,.3f} ({_percent_change(*macs)})")
    lines += [f"note: {note}" for note in plan.notes]
    return "\n".join(lines)


# ---- decide_threshold ------------------------------------------------------

def threshold_summary(normalised_scores, layers, histogram_path=None):
    """Text summary of how many channels fall below 0.1, 0.2, ...; writes a
    histogram PNG of the selection's normalised scores when a path is given."""
    values = {layer: normalised_scores[layer] for layer in layers
              if normalised_scores[layer] is not None}
    silent = [layer for layer in layers if normalised_scores[layer] is None]
    if not values:
        raise UserError("no selected layer has a non-zero score")
    everything = np.concatenate(list(values.values()))
    header = "below " + " ".join(f"{t:>5g}" for t in SUMMARY_THRESHOLDS)
    name_width = max(len(name) for name in values) + 2
    lines = [f"{'layer':<{name_width}}{'channels':>8}  {header}"]
    for layer, scores in list(values.items()) + [("all selected", everything)]:
        counts = " ".join(f"{int(np.sum(scores < t)):>5}" for t in SUMMARY_THRESHOLDS)
        lines.append(f"{layer:<{name_width}}{len(scores):>8}        {counts}")
    lines += [f"{layer}: all scores are zero (not shown)" for layer in silent]
    if histogram_path:
        _write_histogram(values, everything, histogram_path)
        lines.append(f"histogram: {histogram_path}")
    return "\n".join(lines)


def _write_histogram(values, everything, path):
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    from common.files import replace_atomically

    figure, axes = plt.subplots(figsize=(7, 4))
    upper = max(1.0, float(everything.max()))
    axes.hist(everything, bins=40, range=(0.0, upper))
    title = next(iter(values)) if len(values) == 1 else f"{len(values)} layers"
    axes.set_title(f"normalised scores: {title}")
    axes.set_xlabel("normalised score (channels below the threshold are removed)")
    axes.set_ylabel("channels")
    figure.tight_layout()
    replace_atomically(path, lambda tmp: figure.savefig(tmp, format="png"))
    plt.close(figure)


# ---- the whole run on files ------------------------------------------------

@dataclass
class PruneSettings:
    """The header constants of prun_model.py (same names, same meanings)."""
    decide_threshold: bool
    phase: str
    all_convs: bool
    conv_name: object  # str or None
    save_nvidia_name: str
    threshold: float
    checkpoint_name: str
    gpu_id: str
    try_zeros: bool
    new_checkpoint_save: str
    mask_load: object
    mask_save: object
    Num_classes: int
    height: int
    width: int
    model_def: str
    new_model_def: str
    criterion: str = "taylor"
    normalisation: str = "max"
    min_channels: int = 1
    round_to: int = 1
    histogram_save: object = None


@dataclass
class PruneResult:
    plan: object = None
    report: str = ""
    written: list = field(default_factory=list)


def _checkcheckpoint_directory(new_prefix, source):
    """``source``: the checkpoint prefix or directory the run reads."""
    if os.path.dirname(os.path.realpath(new_prefix)) == checkpoint_directory(source):
        # Training would resume from, and a directory evaluation load, the
        # pruned checkpoint there.
        raise UserError(f"new_checkpoint_save {new_prefix!r} is in the source checkpoint's "
                        f"directory {checkpoint_directory(source)}: write it to another "
                        f"directory")


def planned_files(settings, with_mask=True):
    """(outputs, inputs) of a run, as {setting name: [files]}."""
    inputs = {"save_nvidia_name": [settings.save_nvidia_name],
              "checkpoint_name": input_checkpoint_files(settings.checkpoint_name),
              "model_def": [settings.model_def]}
    if settings.mask_load is not None:
        inputs["mask_load"] = [settings.mask_load]
    if settings.decide_threshold:
        written = {"histogram_save": [settings.histogram_save]} \
            if settings.histogram_save else {}
        return written, inputs
    written = {"new_checkpoint_save": checkpoint_files(settings.new_checkpoint_save)}
    if not settings.try_zeros:
        written["new_model_def"] = [settings.new_model_def]
        if with_mask and settings.mask_save is not None:
            written["mask_save"] = [settings.mask_save]
    return written, inputs


def _check_outputs(settings):
    """Nothing the run writes may replace one of its inputs or each other."""
    outputs.check_outputs(*planned_files(settings))
    if not settings.decide_threshold:
        _checkcheckpoint_directory(settings.new_checkpoint_save, settings.checkpoint_name)


def verify_checkpoint(path, model_def, masks, num_classes, height, width, name):
    """Build the graph of model_def + masks and check that the checkpoint at
    ``path`` has exactly its variables (aux heads included)."""
    import tensorflow as tf

    from models.AdapNet_pp import AdapNet_pp
    from netcompress.checkpoints import check_matches, model_variables

    graph = tf.Graph()
    with graph.as_default():
        model = AdapNet_pp(model_def, num_classes, masks)
        images = tf.compat.v1.placeholder(tf.float32, [1, height, width, 3])
        model.build(images, training=False, aux=True)
        aux_heads = [c.scope for c in adapnet_pp().convs if c.aux]
        check_matches(path, model_variables(graph), model_name=name,
                      optional_scopes=aux_heads)


@dataclass
class PruneJob:
    """Everything decided before TensorFlow is needed."""
    settings: PruneSettings
    model_def: dict
    masks: dict
    layers: list
    scores: dict
    plan: object = None  # PruningPlan; None with decide_threshold


def prepare(settings):
    """Check the outputs, read and check the inputs and make the plan; no
    TensorFlow (so that mistakes are reported at once)."""
    _check_outputs(settings)
    model_def = load_model_def(settings.model_def)
    masks = load_masks(settings.mask_load)
    check_masks(model_def, masks, source=settings.mask_load or "mask")
    layers = select_layers(settings.phase, settings.conv_name, settings.all_convs)
    scores = load_normalised_scores(settings.save_nvidia_name, model_def,
                                    settings.Num_classes, settings.criterion,
                                    settings.normalisation)
    job = PruneJob(settings, model_def, masks, layers, scores)
    if settings.decide_threshold:
        return job
    job.plan = plan_pruning(model_def, masks, settings.Num_classes, scores, layers,
                            settings.threshold, settings.min_channels, settings.round_to)
    if job.plan.masks_after and not settings.try_zeros and settings.mask_save is None:
        raise UserError("the pruned model has residual masks but mask_save is None: "
                        "give a path for the mask file")
    return job


def execute(job, log=print, verify=True):
    """decide_threshold's summary, or write the try_zeros checkpoint, or the
    pruned checkpoint, model_def and masks. ``verify``: build the graphs to
    check that the source checkpoint matches its model and the new one the
    pruned model (a few seconds each)."""
    settings, plan = job.settings, job.plan
    if settings.decide_threshold:
        report = threshold_summary(job.scores, job.layers, settings.histogram_save)
        log(report)
        return PruneResult(report=report, written=[settings.histogram_save]
                           if settings.histogram_save else [])

    from netcompress.checkpoints import read_checkpoint

    if settings.phase == ALL_PHASE and settings.all_convs:
        log(f"selected all {len(job.layers)} prunable layers")
    else:
        log(f"selected {len(job.layers)} layer(s): {', '.join(job.layers)}")
    if settings.threshold > 1:
        log(f"warning: threshold {settings.threshold:g} > 1: normalised scores are at most "
            f"1 with max normalisation, so every selected layer keeps only its "
            f"min_channels best channels")
    source = resolve_checkpoint(settings.checkpoint_name)
    _checkcheckpoint_directory(settings.new_checkpoint_save, source)
    if verify:
        verify_checkpoint(source, job.model_def, job.masks, settings.Num_classes,
                          settings.height, settings.width,
                          f"model_def {settings.model_def} (mask {settings.mask_load})")
    values = model_values(read_checkpoint(source))
    new_values = zero_channels(plan, values) if settings.try_zeros \
        else remove_channels(plan, values)
    written = _write_result(settings, plan, new_values, verify)
    if settings.try_zeros:
        log(f"try_zeros: wrote {settings.new_checkpoint_save} (same shapes); evaluate it "
            f"with model_def {settings.model_def} and mask {settings.mask_load}; "
            f"the costs below are those removal would give")
    else:
        mask_path = settings.mask_save if plan.masks_after else None
        log(f"wrote checkpoint {settings.new_checkpoint_save}, model_def "
            f"{settings.new_model_def}, mask {mask_path}")
    report = cost_report(plan, settings.height, settings.width)
    log(report)
    return PruneResult(plan, report, written)


def _write_result(settings, plan, new_values, verify):
    """Write the new checkpoint (and model_def and mask) through staging
    places, moved in only when all are written and the new checkpoint
    restores into its model. Returns the paths written."""
    from netcompress.checkpoints import write_checkpoint

    files, _ = planned_files(settings, with_mask=bool(plan.masks_after))
    with staged() as staging:
        places = {path: staging.place(path) for paths in files.values() for path in paths}
        staged_prefix = places[settings.new_checkpoint_save + ".index"][:-len(".index")]
        write_checkpoint(new_values, staged_prefix)
        if not settings.try_zeros:
            if plan.masks_after:
                save_masks(plan.masks_after, places[settings.mask_save])
            save_model_def(plan.model_def_after, places[settings.new_model_def])
            if verify:
                verify_checkpoint(staged_prefix, plan.model_def_after, plan.masks_after,
                                  settings.Num_classes, settings.height, settings.width,
                                  f"pruned model_def {settings.new_model_def}")
    record_in_state_file(settings.new_checkpoint_save)
    return [settings.new_checkpoint_save] + [
        getattr(settings, key) for key in ("mask_save", "new_model_def") if key in files]


def prune(settings, log=print, verify=True):
    """decide_threshold, try_zeros or removal, per the header constants."""
    return execute(prepare(settings), log, verify)


# ---- header constants from the command line --------------------------------

_NONE_STRINGS = ("", "none", "null", "~")
_BOOLEANS = ("decide_threshold", "all_convs", "try_zeros")
_OPTIONAL_PATHS = ("conv_name", "mask_load", "mask_save", "histogram_save")
_CHOICES = {"criterion": CRITERIA, "normalisation": NORMALISATIONS}
_POSITIVE_INTS = ("Num_classes", "height", "width", "min_channels", "round_to")


def _read_scalar(text):
    import yaml

    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if isinstance(value, str) and value.strip().lower() in _NONE_STRINGS:
        return None
    return value


def _checked(name, value):
    def fail(expected):
        shown = "None" if value is None else repr(value)
        raise UserError(f"{name} must be {expected}, got {shown}")

    if name in _BOOLEANS:
        if not isinstance(value, bool):
            fail("true or false")
        return value
    if name == "threshold":
        if isinstance(value, bool) or not isinstance(value, (int, float)) \
                or not math.isfinite(value) or value < 0:
            fail("a finite number >= 0")
        return float(value)
    if name in _POSITIVE_INTS:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            fail("a positive integer")
        if name == "Num_classes" and value < 2:
            fail("an integer >= 2 (classes including void)")
        if name in ("height", "width") and value % 16:
            fail("a multiple of 16")
        return value
    if name == "gpu_id":
        from netcompress.config import check_gpu_id
        return check_gpu_id(value, "prun_model.py")
    if name in _CHOICES:
        if value not in _CHOICES[name]:
            fail(f"one of {', '.join(_CHOICES[name])}")
        return value
    if value is None:
        if name in _OPTIONAL_PATHS:
            return None
        fail("given")
    if isinstance(value, bool):
        fail("a name or path")
    return os.path.expanduser(str(value))


def settings_from_header(header, argv):
    """PruneSettings from a script's header constants ({name: value}) with any
    ``--NAME VALUE`` on the command line replacing them (values read as YAML
    scalars: true/false, numbers, None)."""
    import argparse

    class Parser(argparse.ArgumentParser):
        def error(self, message):  # one line, like every other bad input
            raise UserError(message)

    parser = Parser(
        description="Prune AdapNet++ filters. Every header constant of prun_model.py can "
                    "be replaced with --NAME VALUE (YAML scalars: true, 0.3, None).",
        allow_abbrev=False)
    for name, default in header.items():
        parser.add_argument(f"--{name}", dest=name, metavar="VALUE", type=str,
                            default=None, help=f"(header: {default!r})")
    given = vars(parser.parse_args(argv))
    values = {name: header[name] if given[name] is None else _read_scalar(given[name])
              for name in header}
    return PruneSettings(**{name: _checked(name, value) for name, value in values.items()})

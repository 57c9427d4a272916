"""Which layers prun_model.py's `phase` and `conv_name` select (README.md,
"Pruning"): sections, units and short names come from the architecture
declaration."""

from common.errors import UserError
from models.architecture import adapnet_pp

ALL_PHASE = "all"


def _phase_groups(phase, architecture, streams=False):
    prunable = architecture.prunable_groups(streams)
    if phase == ALL_PHASE:
        return prunable
    if phase in architecture.sections():
        return [g for g in prunable if g.section == phase]
    if phase in [unit.name for unit in architecture.units]:
        return [g for g in prunable if g.unit == phase]
    raise UserError(f"unknown phase {phase!r}; valid: {', '.join(architecture.sections())}, "
                    f"a unit ({architecture.unit_ranges()}) or {ALL_PHASE}")


def _names_of(group, architecture):
    """Names a ``conv_name`` may use for ``group``: its own, its conv's scope,
    its short name (conv1, conv2/A, ...) and, for a split half, the short
    name of the whole conv (conv2 = both halves)."""
    if group.stream:  # not its shortcut's scope: that conv is one of its writers
        return {group.name, group.short_name}
    names = {group.name, architecture.producer_of(group.name).scope}
    if group.short_name:
        names.add(group.short_name)
        names.add(group.short_name.split("/")[0])
    return names


def select_layers(phase, conv_name=None, all_convs=False, architecture=None, streams=False):
    """Prunable layer names of ``phase``: all of them with ``all_convs``, else
    those ``conv_name`` names (unit-relative names such as conv2/A match in
    every unit of a block; conv2 means both halves of a split conv2).
    ``streams``: the phase's residual streams are among them."""
    # None: AdapNet++'s, for tests and bench/ scripts, which build no model.
    architecture = architecture or adapnet_pp()
    groups = _phase_groups(phase, architecture, streams)
    stream_names = {g.name for g in architecture.stream_groups()}
    if not streams and conv_name is not None and not all_convs and (
            conv_name in stream_names or (conv_name == "residual" and phase in
                                          {g.section for g in architecture.stream_groups()})):
        raise UserError(f"conv_name {conv_name!r} is a residual stream: set streams true "
                        f"to prune it")
    if all_convs:
        return [g.name for g in groups]
    valid = []
    for group in groups:
        names = _names_of(group, architecture)
        for name in sorted(names, key=lambda n: (n.count("/"), n)):
            if name not in valid:
                valid.append(name)
    if conv_name is None:
        raise UserError(f"phase {phase!r}: set conv_name (one of {', '.join(valid)}) or "
                        f"all_convs true")
    chosen = [g.name for g in groups if conv_name in _names_of(g, architecture)]
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

"""compress.py's default stage rule (docs/compress.md, "Stages judged after
retraining"): each stage removes a step of a resource toward a target, the
allocation across layers chosen on validation data, and is accepted by the
validation mIoU it keeps *after* retraining; a stage that falls below the
tolerance is redone with half the step. No TensorFlow here: the tests drive
the step/redo logic with a stand-in evaluation.

Resources are counted on the model_def (parameters, inference MACs); a
latency target sizes its steps in MACs and is checked on measured latency.
"""

import math
from dataclasses import dataclass, field

import numpy as np

from models.architecture import adapnet_pp, resolve_widths
from netcompress.pruning_math.costs import inference_macs, total_parameters
from netcompress.pruning_math.plan import plan_removal

RESOURCES = ("parameters", "macs", "latency")


# ---- the step, acceptance and redo logic ------------------------------------------

@dataclass
class Attempt:
    """One try of a stage: what it aimed at and what it left."""
    step: float  # percentage points of the given model's resource this try removes
    goal: float  # resource percentage of the given model it aimed at
    reached: float = None  # resource percentage after pruning
    removed: int = None  # channels removed
    val_miou: float = None  # validation mIoU after retraining
    accepted: bool = False
    note: str = ""
    details: dict = field(default_factory=dict)
    family: str = None  # the allocation family its removal came from
    # Families not tried at this step yet that would remove something else.
    others: tuple = ()


def run_stage(current, target, step, min_step, floor, attempt, log=print, earlier=()):
    """Tries of one stage, from ``current`` (resource % of the given model)
    toward ``target`` (%): a step of ``step`` points (never past the target);
    ``attempt(step, goal, excluded) -> Attempt`` prunes, retrains and
    validates, choosing its removal among the allocation families not in
    ``excluded``. A try whose validation mIoU is below ``floor`` is redone at
    the same step with another family when the try names one
    (``Attempt.others``: with residual streams prunable, the convs alone and
    the convs with the streams), then with half the step, down to
    ``min_step`` (a last step to the target may be smaller). ``earlier``:
    tries of this stage made before (a direct try), counted in the try
    numbers. Returns (the accepted Attempt or None, every Attempt in order,
    ``earlier`` first)."""
    tries = list(earlier)
    step = min(step, current - target)
    excluded = ()
    while True:
        goal = current - step
        result = attempt(step, goal, excluded)
        tries.append(result)
        if not _judged(result, step, goal, floor):
            log(f"try {len(tries)}: {result.note}")
            return None, tries
        if result.accepted:
            return result, tries
        if result.others:
            excluded += (result.family,)
            result.note = (f"validation mIoU {result.val_miou:.2f} < {floor:.2f}: redo the "
                           f"step with the allocation family {result.others[0]}")
            log(f"try {len(tries)}: {result.note}")
            continue
        excluded = ()
        smaller = step / 2
        if smaller < min_step:
            result.note = (f"validation mIoU {result.val_miou:.2f} < {floor:.2f}; the "
                           f"smallest step ({step:g} points) failed")
            log(f"try {len(tries)}: {result.note}")
            return None, tries
        result.note = (f"validation mIoU {result.val_miou:.2f} < {floor:.2f}: redo with a "
                       f"step of {smaller:g} points")
        log(f"try {len(tries)}: {result.note}")
        step = smaller


def direct_try(current, target, floor, attempt, log=print):
    """A stage's direct try: ``attempt(step, goal)`` the whole way from
    ``current`` to ``target`` in one step, judged as run_stage judges a
    step, never redone. Returns (the Attempt if kept, else None; [it])."""
    step = current - target
    result = attempt(step, target)
    if not _judged(result, step, target, floor):
        log(f"try 1: {result.note}")
    elif not result.accepted:
        result.note = (f"validation mIoU {result.val_miou:.2f} < {floor:.2f}: step toward "
                       f"the target from the stage's model instead")
        log(f"try 1: {result.note}")
    return (result if result.accepted else None), [result]


def _judged(result, step, goal, floor):
    """Records a try's step and goal and whether it is kept (its validation
    mIoU at least ``floor``); False, with a note, when it removed nothing."""
    result.step, result.goal = step, goal
    if result.removed == 0:
        result.note = "no channel left to remove"
        return False
    result.accepted = result.val_miou is not None and result.val_miou >= floor
    return True


def target_reached(percent, target):
    return percent <= target + 1e-9


def direct_iterations(setting, retrain_iterations, stages, current, target, step):
    """Retraining steps of a stage's direct try (the whole way from
    ``current`` to ``target`` in one step; docs/compress.md), or 0 where
    the first step reaches the target anyway. ``setting``: an integer, or
    auto: the retraining of the stages ``step`` needs to reach the target
    (at most ``stages``), each kept at its first try."""
    distance = current - target
    if distance <= step + 1e-9:
        return 0
    if setting == "auto":
        return retrain_iterations * min(stages, math.ceil(distance / step - 1e-9))
    return setting


# ---- resources of a removal -----------------------------------------------------

def resource_of(model_def, masks, num_classes, height, width, resource, architecture=None):
    """Parameters or inference MACs (a latency target counts MACs) of
    ``architecture``, the model's declaration (costs.py's default)."""
    if resource == "parameters":
        return total_parameters(model_def, num_classes, architecture)
    return inference_macs(model_def, num_classes, height, width, masks, architecture)


# ---- allocation: which channels make the step -----------------------------------

def orderings(raw, normalised, costs, min_channels=1):
    """Candidate removal orders, each a list of (layer, channel), first to go
    first. ``raw``: {layer: criterion scores} (taylor_out is a loss change,
    comparable across layers); ``normalised``: per-layer normalised scores
    (the order a single threshold on every layer follows); ``costs``:
    {layer: resource one channel of it saves}. A layer's best
    ``min_channels`` channels (at least one) never go."""
    candidates = {
        "global": {layer: np.asarray(values, np.float64) for layer, values in raw.items()},
        "global_per_cost": {layer: np.asarray(values, np.float64) / costs[layer]
                            for layer, values in raw.items() if costs.get(layer, 0) > 0},
        "per_layer": {layer: values for layer, values in normalised.items()
                      if values is not None},
    }
    result = {}
    for name, scores in candidates.items():
        entries = []
        for layer, values in scores.items():
            keep = np.argsort(-np.asarray(raw[layer]), kind="stable")[:max(min_channels, 1)]
            entries += [(float(values[i]), layer, int(i)) for i in range(len(values))
                        if i not in set(int(k) for k in keep)]
        entries.sort(key=lambda entry: entry[0])
        result[name] = [(layer, index) for _, layer, index in entries]
    return result


STREAMS_SUFFIX = "+streams"


def family_orderings(raw, normalised, costs, streams, min_channels=1):
    """{allocation name: (family, order)}: ``orderings`` over the convs alone
    (family "convs", names as ``orderings``'), and when ``streams`` (the
    residual streams among the layers of ``raw``) is not empty, over the
    convs with the streams too (family "streams", names ending
    "+streams"). A stream channel saves many MACs at once and its loss is
    seen only after retraining, so a stage may fail with the streams where
    the convs alone pass, or the other way round (docs/compress.md)."""
    def only(values, layers):
        return {layer: value for layer, value in values.items() if layer in layers}

    convs = set(raw) - set(streams)
    result = {name: ("convs", order) for name, order in
              orderings(only(raw, convs), only(normalised, convs), only(costs, convs),
                        min_channels).items()}
    if streams:
        result.update({name + STREAMS_SUFFIX: ("streams", order) for name, order in
                       orderings(raw, normalised, costs, min_channels).items()})
    return result


def channel_costs(model_def, masks, num_classes, height, width, resource, layers,
                  architecture=None):
    """{layer: resource saved by removing one of its channels}, at the
    current widths of ``architecture`` (the model's declaration)."""
    # None: AdapNet++'s, for tests and bench/ scripts, which build no model.
    architecture = architecture or adapnet_pp()
    widths = resolve_widths(model_def, num_classes, architecture)
    base = resource_of(model_def, masks, num_classes, height, width, resource, architecture)
    costs = {}
    for layer in layers:
        if widths[layer] < 2:
            continue
        plan = plan_removal(model_def, masks, num_classes, {layer: [0]},
                            architecture=architecture)
        costs[layer] = base - resource_of(plan.model_def_after, plan.masks_after,
                                          num_classes, height, width, resource, architecture)
    return costs


def prefix_removal(order, count):
    removed = {}
    for layer, index in order[:count]:
        removed.setdefault(layer, []).append(index)
    return {layer: sorted(indices) for layer, indices in removed.items()}


def _after_prefix(order, count, model_def, masks, num_classes, height, width, resource,
                  min_channels, round_to, architecture):
    plan = plan_removal(model_def, masks, num_classes, prefix_removal(order, count),
                        min_channels, round_to, architecture=architecture)
    return resource_of(plan.model_def_after, plan.masks_after, num_classes, height, width,
                       resource, architecture)


def least_reachable(orders, model_def, masks, num_classes, height, width, resource,
                    min_channels=1, round_to=1, architecture=None):
    """The least of ``resource`` any of ``orders`` ({name: order}) leaves
    with every channel of it removed: what no step can go below."""
    return min(_after_prefix(order, len(order), model_def, masks, num_classes, height, width,
                             resource, min_channels, round_to, architecture)
               for order in orders.values())


def removal_for_goal(order, goal, model_def, masks, num_classes, height, width, resource,
                     min_channels=1, round_to=1, architecture=None):
    """The shortest prefix of ``order`` whose removal brings the resource to
    ``goal`` (absolute) or below, by bisection on the prefix length (the
    whole order when even that does not reach it). Returns (removed,
    resource after). ``architecture``: the model's declaration (plan.py's
    default)."""
    def after(count):
        return _after_prefix(order, count, model_def, masks, num_classes, height, width,
                             resource, min_channels, round_to, architecture)

    low, high = 0, len(order)
    if after(high) > goal:
        return prefix_removal(order, high), after(high)
    while low < high:  # smallest count with after(count) <= goal
        middle = (low + high) // 2
        if after(middle) <= goal:
            high = middle
        else:
            low = middle + 1
    return prefix_removal(order, low), after(low)

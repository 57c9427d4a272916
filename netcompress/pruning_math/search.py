"""Threshold search for compress.py (docs/compress.md, "The search").

For one stage's model: the largest threshold (per section, or one for all
layers) whose gated model keeps the validation mIoU within the budget.
Candidates are evaluated by ``evaluate(removed) -> mIoU``, in practice a
GatedGraph pass over the validation records (netcompress/graphs/inference.py): a
gate of 0 computes exactly what removal computes, so no graph is rebuilt and
no checkpoint written per candidate. No TensorFlow here.

Bisection on the threshold in [0, 1]: threshold 0 removes nothing, 1 (with
max or l2 normalisation every score is <= 1) leaves each layer only its
best channel(s). mIoU does not fall strictly monotonically with the
threshold, so the result is the largest threshold bisection finds that
passes, not necessarily the largest of all.
"""

import time
from dataclasses import dataclass, field

import numpy as np

from models.architecture import adapnet_pp
from netcompress.pruning_math.scores import channels_to_keep

ALL = "all"
# What the search calls a section: prun_model.py's phases, with the decoder's
# four (upsample1, decoder_conv1, upsample2, decoder_conv2) taken as one.
DECODER = "decoder"
OWN_SECTIONS = ("conv1", "block1", "block2", "block3", "block4", "easpp")


def search_section(phase):
    return phase if phase in OWN_SECTIONS else DECODER


def search_groups(mode, architecture=None, streams=False):
    """{group name: [layers]} in network order: sections, or one group 'all';
    ``streams``: each block's residual stream is in its section."""
    # None: AdapNet++'s, for tests and bench/ scripts, which build no model.
    architecture = architecture or adapnet_pp()
    groups = {}
    for group in architecture.prunable_groups(streams):
        key = ALL if mode == ALL else search_section(group.section)
        groups.setdefault(key, []).append(group.name)
    return groups


def scaled(scores, threshold):
    """Scores divided by the threshold: channels below it are those below 1.
    Both the search and the pruning plan threshold these at 1.0, so the
    channels the plan removes are exactly those the search evaluated."""
    return np.asarray(scores, np.float64) / threshold


def removed_channels(scores, threshold, min_channels=1, round_to=1):
    """Sorted indices removed from a layer at ``threshold`` (none at 0, or
    without signal)."""
    if scores is None or threshold <= 0:
        return np.zeros(0, np.int64)
    kept = channels_to_keep(scaled(scores, threshold), 1.0, min_channels, round_to)
    return np.setdiff1d(np.arange(len(scores)), kept)


@dataclass
class SearchResult:
    start_miou: float  # the stage's model, nothing removed
    goal: float  # the mIoU the final removal had to keep
    thresholds: dict  # {group: threshold}, 0 = nothing removed
    removed: dict  # {layer: removed indices}, only layers losing channels
    miou: float  # gated mIoU of the chosen removal
    evaluations: int = 0
    seconds: float = 0.0
    history: list = field(default_factory=list)  # (group, threshold, mIoU, passed)

    @property
    def per_second(self):
        return self.evaluations / self.seconds if self.seconds > 0 else 0.0

    @property
    def removed_count(self):
        return int(sum(len(indices) for indices in self.removed.values()))


def max_evaluations(groups, steps):
    """Candidates the search evaluates at most (for a progress bar)."""
    return 1 + len(groups) * (1 + steps)


def search(evaluate, scores, groups, budget, floor=None, steps=6, min_channels=1,
           round_to=1, on_evaluation=None):
    """Thresholds per group, in order, each keeping the earlier groups'
    removals. Group i (of n) may bring the mIoU down to start - budget *
    (i + 1) / n (and never below ``floor``): every group gets a share of the
    budget, and a share an earlier group left unused passes on.

    ``evaluate(removed) -> mIoU`` with removed = {layer: indices};
    ``scores``: {layer: normalised scores or None}; ``groups``: {group:
    [layers]}; ``on_evaluation(unused)`` is called after each evaluation
    (with 0) and with the number of candidates a group did not need (> 0)."""
    cache = {}
    result = SearchResult(0.0, 0.0, {}, {}, 0.0)

    def measure(removed):
        key = tuple(sorted((layer, tuple(int(i) for i in indices))
                           for layer, indices in removed.items() if len(indices)))
        if key not in cache:
            started = time.perf_counter()
            cache[key] = float(evaluate({layer: indices for layer, indices in
                                         removed.items() if len(indices)}))
            result.seconds += time.perf_counter() - started
            result.evaluations += 1
            if on_evaluation is not None:
                on_evaluation(0)
        return cache[key]

    start = measure({})
    result.start_miou = result.miou = start
    chosen = {}
    names = list(groups)
    for position, name in enumerate(names):
        goal = start - budget * (position + 1) / len(names)
        if floor is not None:
            goal = max(goal, floor)
        layers = groups[name]
        before = result.evaluations

        def removal(threshold):
            return dict(chosen, **{layer: removed_channels(scores[layer], threshold,
                                                           min_channels, round_to)
                                   for layer in layers})

        def passes(threshold):
            miou = measure(removal(threshold))
            result.history.append((name, threshold, miou, miou >= goal))
            return miou >= goal, miou

        best, best_miou = 0.0, measure(chosen)
        ok, miou = passes(1.0)
        if ok:
            best, best_miou = 1.0, miou
        else:
            low, high = 0.0, 1.0
            for _ in range(steps):
                middle = (low + high) / 2
                ok, miou = passes(middle)
                if ok:
                    low, best, best_miou = middle, middle, miou
                else:
                    high = middle
        unused = 1 + steps - (result.evaluations - before)
        if on_evaluation is not None and unused > 0:
            on_evaluation(unused)
        result.thresholds[name] = best
        if best > 0:
            chosen = removal(best)
            result.miou = best_miou
        result.goal = goal
    result.removed = {layer: np.asarray(indices, np.int64)
                      for layer, indices in chosen.items() if len(indices)}
    return result


def plan_scores(scores, groups, thresholds):
    """(layers, scores) for plan_pruning at threshold 1.0: each layer of a
    group with a threshold > 0, its scores divided by that threshold."""
    layers, scaled_scores = [], {}
    for name, members in groups.items():
        threshold = thresholds.get(name, 0.0)
        if threshold <= 0:
            continue
        for layer in members:
            layers.append(layer)
            scaled_scores[layer] = None if scores[layer] is None \
                else scaled(scores[layer], threshold)
    return layers, scaled_scores

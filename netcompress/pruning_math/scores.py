"""From rank sums to the per-layer scores a threshold is applied to: a
criterion (netcompress/pruning_math/criteria.py's CRITERIA), a normalisation,
and the channels each layer keeps. Loading a rank file is
netcompress/formats/rankfile.py's."""

import numpy as np

from common.errors import UserError


# How a layer's scores are scaled before the threshold: by their maximum (as
# the original) or by their l2 norm (as Molchanov et al.).
NORMALISATIONS = {"max": np.max, "l2": lambda values: np.sqrt(np.sum(values ** 2))}


def normalise(values, method):
    """Per-layer normalised scores; None when the layer carries no signal
    (all scores zero), which leaves it unpruned rather than guessing."""
    if method not in NORMALISATIONS:
        raise UserError(f"unknown normalisation {method!r}; valid: {', '.join(NORMALISATIONS)}")
    values = np.maximum(np.asarray(values, np.float64), 0.0)  # as the original: clamp
    scale = NORMALISATIONS[method](values)
    if not scale > 0:
        return None
    return values / scale


def normalised_scores(ranks, criterion, normalisation):
    """Loaded ranks -> {layer: normalised scores or None}."""
    return {layer: normalise(values, normalisation)
            for layer, values in ranks.scores(criterion).items()}


def kept_count(width, passing, min_channels=1, round_to=1):
    """How many of a layer's ``width`` channels it keeps when ``passing`` of
    them pass: at least ``min_channels`` (and always one), rounded up to a
    multiple of ``round_to`` (capped at the width)."""
    count = max(passing, min(max(min_channels, 1), width))
    if round_to > 1:
        count = min(width, -(-count // round_to) * round_to)
    return count


def channels_to_keep(normalised, threshold, min_channels=1, round_to=1):
    """Sorted indices of the channels kept: those scoring >= threshold, as many
    as kept_count says; extra keeps are the highest scoring."""
    width = len(normalised)
    keep_count = kept_count(width, width - int(np.sum(normalised < threshold)),
                            min_channels, round_to)
    order = np.argsort(-normalised, kind="stable")
    return np.sort(order[:keep_count])

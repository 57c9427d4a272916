"""Criteria: per-channel scores from a rank file's sums (docs/ranking.md).

A criterion is one function (rank sums, layer) -> float64 [channels], higher
= keep; the `criterion` settings name an entry of CRITERIA. The rank sums are
netcompress/formats/rankfile.py's RankSums, read through ``sum_of``, ``l1_of``,
``count`` and ``widths``: no file is read here."""

import zlib

import numpy as np

RANDOM_SEED = 20171101  # the `random` criterion's scores are fixed per layer name


def taylor(ranks, layer):
    """Molchanov et al.: mean over examples of |t_n|, t on the conv's output
    before batch norm."""
    return ranks.sum_of("taylor", layer) / max(ranks.count, 1)


def reference(ranks, layer):
    """The original code's signed sum of t_n, negatives clamped to zero."""
    return np.maximum(ranks.sum_of("reference", layer), 0.0)


def taylor_out(ranks, layer):
    """Mean over examples of |t_out_n|: |first-order loss change| of removing
    the channel from what its consumers read."""
    return ranks.sum_of("taylor_out", layer) / max(ranks.count, 1)


def l1(ranks, layer):
    """The filter's weight norm, sum of |w| over its kernel."""
    return ranks.l1_of(layer)


def random(ranks, layer):
    """A baseline: fixed pseudo-random scores (seeded by the layer name)."""
    seed = [RANDOM_SEED, zlib.crc32(layer.encode("utf-8"))]
    return np.random.default_rng(seed).random(ranks.widths[layer])


CRITERIA = {"taylor": taylor, "reference": reference, "taylor_out": taylor_out, "l1": l1,
            "random": random}

"""Criteria judged by what pruning does (get_oracle_rank.py --compare;
docs/ranking.md, "Comparing criteria").

For every criterion of the rank file and every fraction f, remove the
round(f x width) lowest-scoring channels of every prunable layer (at least
one channel stays) and measure the mean IoU on the validation records,
without retraining. All candidates run in one inference graph whose channel
gates are inputs: a gate of 0 computes exactly what removal computes, so no
graph is rebuilt and no checkpoint written per candidate. ``--oracle LAYER``
adds, for each channel of LAYER, the true change of the mean validation loss
when that channel alone is removed, and each criterion's Spearman rank
correlation with it.
"""

import csv
import math
import os

import numpy as np
from tqdm import tqdm

from common.errors import UserError
from common.files import replace_atomically
from netcompress.pruning_math.criteria import CRITERIA

DEFAULT_FRACTIONS = (0.05, 0.1, 0.2)


def lowest(scores, fraction):
    """Indices of the round(fraction x width) lowest scores (ties: lower
    index first), leaving at least one channel."""
    width = len(scores)
    count = min(int(round(fraction * width)), width - 1)
    return np.sort(np.argsort(np.asarray(scores, np.float64), kind="stable")[:count])


def check_fractions(fractions):
    for fraction in fractions:
        if not (math.isfinite(fraction) and 0 < fraction < 1):
            raise UserError(f"--fractions: {fraction:g} is not a fraction between 0 and 1")
    return sorted(set(fractions))


def compared_layers(ranks, architecture, streams=False):
    """The rank file's layers a fraction is removed from: residual streams
    (of ``architecture``, the model's declaration) only with ``streams``."""
    stream_names = {g.name for g in architecture.stream_groups()}
    layers = [layer for layer in ranks.layers if streams or layer not in stream_names]
    if streams and not stream_names.intersection(layers):
        raise UserError(f"rank file {ranks.path} has no residual stream scores (written "
                        f"before streams were ranked): regenerate it with "
                        f"get_oracle_rank.py")
    return layers


def compare(config, ranks, fractions=DEFAULT_FRACTIONS, oracle_layers=(), progress=True,
            streams=False):
    """``streams``: remove the fractions from the residual streams too.
    Returns {"baseline": mIoU, "rows": [(criterion, fraction, removed
    channels, mIoU)], "oracle": {layer: {"loss_change": array, "spearman":
    {criterion: rho}}}} over config['val_data']."""
    data_path = config["val_data"]
    fractions = check_fractions(fractions)
    from netcompress.graphs.models import model_architecture

    layers = compared_layers(ranks, model_architecture(config["model"]), streams)
    unknown = [layer for layer in oracle_layers if layer not in ranks.layers]
    if unknown:
        raise UserError(f"--oracle {unknown[0]}: not a prunable layer (one of "
                        f"{ranks.layers[0]}, ..., {ranks.layers[-1]})")
    import tensorflow as tf

    from dataset.records import count_records
    from netcompress.graphs.inference import GatedGraph

    scores = {criterion: ranks.scores(criterion) for criterion in CRITERIA}
    gated = GatedGraph(config, data_path)
    examples = count_records(data_path)
    batches = math.ceil(examples / config["batch_size"])
    candidates = 1 + len(CRITERIA) * len(fractions) + sum(ranks.widths[layer]
                                                          for layer in oracle_layers)
    result = {"rows": [], "oracle": {}, "examples": examples}
    num_classes = config["num_classes"]
    with tf.compat.v1.Session(graph=gated.graph) as session:
        gated.restore(session, config["checkpoint"], config["model_def"])
        with tqdm(total=candidates * batches, desc="compare", unit="batch",
                  disable=not progress, dynamic_ncols=True) as bar:
            matrix, base_loss = gated.evaluate(session, {}, num_classes, bar)
            result["baseline"] = 100 * float(np.nan_to_num(matrix.mean_iou()))
            for criterion in CRITERIA:
                for fraction in fractions:
                    removed = {layer: lowest(scores[criterion][layer], fraction)
                               for layer in layers}
                    matrix, _ = gated.evaluate(session, removed, num_classes, bar)
                    result["rows"].append((criterion, fraction,
                                           sum(len(r) for r in removed.values()),
                                           100 * float(np.nan_to_num(matrix.mean_iou()))))
            for layer in oracle_layers:
                change = np.array([gated.evaluate(session, {layer: [k]}, num_classes,
                                                  bar)[1] - base_loss
                                   for k in range(ranks.widths[layer])])
                result["oracle"][layer] = {
                    "loss_change": change,
                    "spearman": {criterion: spearman(scores[criterion][layer], change)
                                 for criterion in CRITERIA}}
    return result


def spearman(scores, loss_change):
    """Rank correlation of a criterion (higher = keep) with the loss change
    of removing each channel (higher = worse to remove); nan without spread."""
    from scipy.stats import spearmanr

    if np.ptp(scores) == 0 or np.ptp(loss_change) == 0:
        return float("nan")
    return float(spearmanr(scores, loss_change).statistic)


def table(result):
    """Text: mIoU per criterion (rows) and fraction removed (columns)."""
    fractions = sorted({row[1] for row in result["rows"]})
    by_key = {(row[0], row[1]): row[3] for row in result["rows"]}
    criteria = list(dict.fromkeys(row[0] for row in result["rows"]))
    lines = [f"validation mIoU after removing a fraction of every prunable layer "
             f"(no retraining); unpruned {result['baseline']:.2f}",
             f"{'criterion':<12}" + "".join(f"{100 * f:>9g} %" for f in fractions)]
    for criterion in criteria:
        lines.append(f"{criterion:<12}" + "".join(f"{by_key[(criterion, f)]:>11.2f}"
                                                  for f in fractions))
    for layer, oracle in result["oracle"].items():
        rhos = ", ".join(f"{c} {rho:+.2f}" for c, rho in oracle["spearman"].items())
        lines.append(f"Spearman with the true loss change, {layer}: {rhos}")
    return lines


def write_csv(result, path):
    def write(tmp):
        with open(tmp, "w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(["criterion", "fraction", "removed_channels", "miou"])
            writer.writerow(["none", 0.0, 0, f"{result['baseline']:.4f}"])
            for criterion, fraction, removed, miou in result["rows"]:
                writer.writerow([criterion, fraction, removed, f"{miou:.4f}"])
    replace_atomically(path, write)


def write_plot(result, path):
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 4))
    for criterion in dict.fromkeys(row[0] for row in result["rows"]):
        points = [(0.0, result["baseline"])] + [(100 * row[1], row[3]) for row in
                                                 result["rows"] if row[0] == criterion]
        axes.plot(*zip(*points), marker="o", label=criterion)
    axes.set_xlabel("channels removed from every prunable layer (%)")
    axes.set_ylabel("validation mIoU (%)")
    axes.set_title("criteria at equal budget, no retraining")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    replace_atomically(path, lambda tmp: figure.savefig(tmp, format="png"))
    plt.close(figure)


def output_paths(rank_save):
    stem = os.path.splitext(rank_save)[0]
    return stem + ".compare.csv", stem + ".compare.png"

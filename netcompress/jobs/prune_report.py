"""What prun_model.py prints: the cost table of a plan, and decide_threshold's
score summary and histogram."""

import numpy as np

from common.errors import UserError
from common.files import replace_atomically
from netcompress.pruning_math.costs import conv_costs, inference_macs, total_parameters

SUMMARY_THRESHOLDS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def _percent_change(before, after):
    return f"{100.0 * (after - before) / before:+.1f}%" if before else "n/a"


def cost_report(plan, height, width):
    """Text: channels per pruned layer; params and MACs (at height x width) of
    every conv whose shape changed; totals before/after."""
    num_classes, architecture = plan.num_classes, plan.architecture
    before = conv_costs(plan.model_def_before, num_classes, height, width, plan.masks_before,
                        architecture)
    after = conv_costs(plan.model_def_after, num_classes, height, width, plan.masks_after,
                       architecture)
    how = "by an explicit removal" if plan.threshold is None \
        else f"at threshold {plan.threshold:g}"
    lines = [f"pruned {len(plan.pruned_layers)} of {len(plan.layers)} selected layer(s) {how}"]
    name_width = max([len(c.layer) for c in plan.layers] + [24])
    for cut in plan.layers:
        if cut.removed or cut.no_signal:
            status = " (no signal: kept)" if cut.no_signal else ""
            lines.append(f"  {cut.layer:<{name_width}} channels {cut.width:>5} -> "
                         f"{len(cut.kept):>5}{status}")
    unchanged = sum(1 for cut in plan.layers if not cut.removed and not cut.no_signal)
    if unchanged:
        lines.append(f"  ({unchanged} selected layer(s) keep every channel)" if plan.threshold
                     is None else f"  ({unchanged} selected layer(s) have no channel below "
                                  f"the threshold)")
    changed = [scope for scope in before if before[scope] != after[scope]]
    if changed:
        lines.append(f"  {'conv':<{name_width}} {'params before':>14} {'after':>12} "
                     f"{'MMACs before':>14} {'after':>12}")
        for scope in changed:
            lines.append(f"  {scope:<{name_width}} {before[scope].params:>14,} "
                         f"{after[scope].params:>12,} {before[scope].macs / 1e6:>14,.3f} "
                         f"{after[scope].macs / 1e6:>12,.3f}")
    params = [total_parameters(d, num_classes, architecture)
              for d in (plan.model_def_before, plan.model_def_after)]
    macs = [inference_macs(plan.model_def_before, num_classes, height, width, plan.masks_before,
                           architecture),
            inference_macs(plan.model_def_after, num_classes, height, width, plan.masks_after,
                           architecture)]
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

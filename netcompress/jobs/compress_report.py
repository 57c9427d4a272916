"""compress.py's report (docs/compress.md): the stage table it logs,
stages.csv and compression.png, from the stages' rows; the stages
themselves are netcompress/jobs/compress.py's."""

import csv

import numpy as np

from common.files import replace_atomically
from netcompress.settings.config import AFTER_RETRAINING

CSV_COLUMNS = ("stage", "parameters", "parameter_reduction_pct", "gmacs",
               "macs_reduction_pct", "latency_ms", "test_miou", "miou_change",
               "val_miou_start", "val_miou_pruned", "val_miou_retrained", "reference",
               "tries", "step_pct", "removed_channels", "candidates", "candidates_per_s",
               "allocation", "thresholds")


def parameter_reduction(rows, row):
    return 100.0 * (1 - row["parameters"] / rows[0]["parameters"])


def macs_reduction(rows, row):
    return 100.0 * (1 - row["macs"] / rows[0]["macs"])


def csv_rows(rows, latencies, final=None):
    """The stage table as dicts of CSV_COLUMNS (numbers rounded for reading);
    with ``final`` (final_tuning's record) a last row, stage "final": the last
    stage's model (same costs and latency) after its final retraining."""
    table_rows = _stage_csv_rows(rows, latencies)
    if final is not None:
        last = table_rows[-1]
        table_rows.append(dict(
            last, stage="final", test_miou=round(final["test_miou"], 2),
            miou_change=round(final["test_miou"] - rows[0]["test_miou"], 2),
            val_miou_start="", val_miou_pruned="",
            val_miou_retrained=_rounded(final["val_miou"]), reference="", tries=0,
            step_pct="", removed_channels=0, candidates=0, candidates_per_s="",
            allocation="", thresholds=""))
    return table_rows


def _stage_csv_rows(rows, latencies):
    table_rows = []
    for row in rows:
        latency = latencies.get(row["stage"])
        table_rows.append({
            "stage": row["stage"], "parameters": row["parameters"],
            "parameter_reduction_pct": round(parameter_reduction(rows, row), 2),
            "gmacs": round(row["macs"] / 1e9, 4),
            "macs_reduction_pct": round(macs_reduction(rows, row), 2),
            "latency_ms": "" if latency is None else round(latency, 2),
            "test_miou": round(row["test_miou"], 2),
            "miou_change": round(row["test_miou"] - rows[0]["test_miou"], 2),
            "val_miou_start": _rounded(row["val_miou_start"]),
            "val_miou_pruned": _rounded(row["val_miou_pruned"]),
            "val_miou_retrained": _rounded(row.get("val_miou_retrained")),
            "reference": _rounded(row.get("reference")),
            "tries": row.get("tries", 1 if row["stage"] else 0),
            "step_pct": _rounded(row.get("step_pct")),
            "removed_channels": row["removed_channels"], "candidates": row["candidates"],
            "candidates_per_s": _rounded(row["candidates_per_s"]),
            "allocation": row.get("allocation") or "",
            "thresholds": _thresholds_text(row["thresholds"]),
        })
    return table_rows


def _thresholds_text(thresholds):
    return " ".join(f"{name}={value:.3f}" for name, value in thresholds.items())


def _rounded(value):
    return "" if value is None else round(value, 2)


def write_csv(rows, latencies, path, final=None):
    def write(tmp):
        with open(tmp, "w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS)
            writer.writeheader()
            writer.writerows(csv_rows(rows, latencies, final))
    replace_atomically(path, write)


def table(rows, latencies, final=None):
    """The summary table, one line per stage (validation mIoU: the stage's
    model -> pruned, gated; after retraining; the reference it was judged by),
    and the final model's line after final_tuning."""
    lines = [f"{'stage':>5} {'parameters':>11} {'params %':>9} {'GMACs':>8} {'MACs %':>7} "
             f"{'latency ms':>10} {'val pruned':>13} {'val retrained':>13} {'reference':>9} "
             f"{'tries':>5} {'test mIoU':>9} {'change':>7}  how"]
    how = [_how(full) for full in rows]
    if final is not None:
        how.append(f"stage {final['stage']} retrained {final['iterations']} more steps")
    for row, described in zip(csv_rows(rows, latencies, final), how):
        latency = "-" if row["latency_ms"] == "" else f"{row['latency_ms']:.2f}"
        val = "-" if row["val_miou_start"] == "" else \
            f"{row['val_miou_start']:.2f}->{row['val_miou_pruned']:.2f}"
        retrained, reference = ("-" if row[key] == "" else f"{row[key]:.2f}"
                                for key in ("val_miou_retrained", "reference"))
        lines.append(f"{row['stage']:>5} {row['parameters']:>11} "
                     f"{0.0 - row['parameter_reduction_pct']:>+9.1f} {row['gmacs']:>8.4f} "
                     f"{0.0 - row['macs_reduction_pct']:>+7.1f} {latency:>10} {val:>13} "
                     f"{retrained:>13} {reference:>9} {row['tries']:>5} "
                     f"{row['test_miou']:>9.2f} "
                     f"{row['miou_change']:>+7.2f}  {described}")
    return lines


def _how(full):
    """What a stage removed: thresholds, or its step and allocation (and
    the steps of the tries redone)."""
    if full["stage"] == 0:
        return "the given model"
    if full["thresholds"]:
        return _thresholds_text(full["thresholds"])
    failed = full.get("failed_tries") or []
    redone = ""
    if failed:
        redone = " (redone: " + ", ".join(
            f"{_step_text(t)}{_failed_allocation(t, full)} -> val "
            f"{t['val_miou_retrained']:.2f}"
            if t.get("val_miou_retrained") is not None else _step_text(t)
            for t in failed) + ")"
    return f"{_step_text(full)}, {full['allocation']}{redone}"


def _step_text(done):
    # A direct try names its own retraining (docs/compress.md, "The direct try").
    if done.get("direct"):
        return f"direct step {done['step_pct']:g} ({done['iterations']} steps)"
    return f"step {done['step_pct']:g}"


def _failed_allocation(failed, row):
    # Named only where it differs from the kept one (a family redone).
    allocation = failed.get("allocation")
    return f" {allocation}" if allocation and allocation != row["allocation"] else ""


def write_plot(config, rows, widths, path):
    """Parameter reduction per stage; validation mIoU after retraining
    against the target resource and the reference; the last stage's width
    of every prunable layer against the original (``widths``: compress's
    layer_widths)."""
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    from netcompress.graphs.models import model_architecture
    from netcompress.pruning_math.search import search_section

    stages = [row["stage"] for row in rows]
    reduction = [0.0 - parameter_reduction(rows, row) for row in rows]
    layers, original, kept = widths
    figure = plt.figure(figsize=(9, 7))
    grid = figure.add_gridspec(2, 2, height_ratios=[1, 1.1])
    axes = figure.add_subplot(grid[0, 0])
    bars = axes.bar(stages, reduction, color="tab:blue", alpha=0.75, width=0.6)
    for bar, value in zip(bars, reduction):
        axes.annotate(f"{value:.1f}", (bar.get_x() + bar.get_width() / 2, value),
                      ha="center", va="top" if value < 0 else "bottom", fontsize=8,
                      xytext=(0, -2 if value < 0 else 2), textcoords="offset points")
    axes.axhline(0, color="black", linewidth=0.8)
    low = min(reduction + [0.0])
    axes.set_ylim(low - 0.15 * max(-low, 1.0), 0.15 * max(-low, 1.0))
    axes.set_xticks(stages)
    axes.set_xlabel("stage")
    axes.set_title("parameters (%)", fontsize=10)
    axes.grid(axis="y", alpha=0.3)
    _plot_curve(figure.add_subplot(grid[0, 1]), config, rows)
    if config.get("stage_rule") == AFTER_RETRAINING:
        title = (f"staged compression: {config['criterion']}, {config['target']} toward "
                 f"{config['target_percent']:g} %, tolerance {config['tolerance']:g} mIoU "
                 f"after retraining")
    else:
        title = (f"staged compression: {config['criterion']}, budget {config['budget']:g} "
                 f"mIoU per stage before retraining, {config['search']} search")
    figure.suptitle(title, fontsize=11)
    bottom = figure.add_subplot(grid[1, :])
    positions = np.arange(len(layers))
    bottom.bar(positions, original, color="lightgray", label="original")
    bottom.bar(positions, kept, color="tab:blue", label=f"stage {stages[-1]}")
    bottom.set_xlim(-1, len(layers))
    architecture = model_architecture(config["model"])
    sections = [search_section(architecture.group_by_name[name].section) for name in layers]
    starts = [i for i in range(len(layers)) if i == 0 or sections[i] != sections[i - 1]]
    for begin, end in zip(starts, starts[1:] + [len(layers)]):
        if begin:
            bottom.axvline(begin - 0.5, color="gray", linewidth=0.6, linestyle=":")
        bottom.annotate(sections[begin], ((begin + end - 1) / 2, 1.0),
                        xycoords=("data", "axes fraction"), ha="center", va="bottom",
                        fontsize=7)
    bottom.set_xticks([])
    bottom.set_xlabel("prunable layers, network order")
    bottom.set_ylabel("channels")
    bottom.set_title("width of every prunable layer: kept vs original", fontsize=10, pad=14)
    bottom.legend(fontsize=8, loc="upper left")
    figure.tight_layout()
    replace_atomically(path, lambda tmp: figure.savefig(tmp, format="png", dpi=80))
    plt.close(figure)


def _plot_curve(axes, config, rows):
    """Validation mIoU after retraining against the target resource, with
    the reference, the tolerance and the tries that fell below it."""
    resource = [row.get("resource_percent", 100.0) for row in rows]
    val = [row.get("val_miou_retrained") for row in rows]
    axes.plot(resource, [row["test_miou"] for row in rows], "s--", color="gray",
              markersize=4, linewidth=0.8, label="test")
    axes.plot(resource, val, "o-", color="tab:red", label="validation, retrained")
    for row, x, y in zip(rows, resource, val):
        axes.annotate(str(row["stage"]), (x, y), fontsize=7, xytext=(3, 3),
                      textcoords="offset points")
    failed = [t for row in rows for t in row.get("failed_tries") or []
              if t.get("val_miou_retrained") is not None]
    if failed:
        axes.plot([t["resource_pct"] for t in failed],
                  [t["val_miou_retrained"] for t in failed], "x", color="black",
                  label="tries redone")
    references = [(x, row["reference"]) for x, row in zip(resource, rows)
                  if row.get("reference") is not None]
    if references:
        xs, ys = zip(*references)
        axes.plot(xs, ys, "-", color="black", linewidth=0.8, label="reference")
        if config.get("stage_rule") == AFTER_RETRAINING:
            axes.plot(xs, [y - config["tolerance"] for y in ys], "--", color="black",
                      linewidth=0.8, label="reference - tolerance")
    axes.set_xlim(105, min(resource + [config.get("target_percent", 100)]) - 5)
    axes.set_xlabel(f"{config.get('target', 'parameters')} (% of the given model)")
    axes.set_ylabel("mIoU")
    axes.set_title("mIoU after retraining", fontsize=10)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=7)


"""compress.py against one-shot pruning at equal retraining (docs/compress.md,
"compress.py against one-shot pruning").

    python bench/compress_vs_oneshot.py -c config/compress.config \
        [--thresholds 0.2 0.3 0.5] [--out DIR] [--KEY VALUE ...]

In one run, on the data of a compress config (its --KEY VALUE overrides,
e.g. --retrain_iterations or --stages, apply to every arm):
- compress.py's run with the config's settings, into DIR/compress;
- one shot: every prunable layer of the given model cut at each threshold
  (the config's criterion and normalisation, ranks of the given model on the
  training records), then retrained as many steps as compress.py retrained
  in all (its redone tries included);
- the control: the given model retrained as many steps.
Every retraining uses the config's learning rate, decay and seed + 1.
Printed: parameters, MACs, validation and test mIoU of each, and which
one-shot threshold removes most while staying within 1 test mIoU point of
the control. An arm whose DIR/<arm>/result.json exists is not run again (a
stopped bench resumes; compress.py resumes its own run).
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common.errors import UserError  # noqa: E402
from common.files import make_directory, replace_atomically  # noqa: E402
from netcompress.cli import run_main, run_script  # noqa: E402

DESCRIPTION = ("compress.py's run against one-shot pruning at fixed thresholds and the "
               "unpruned model, all retrained as long (settings from a compress.py config).")
WITHIN = 1.0  # test mIoU points below the control that still count as a match


def add_arguments(parser):
    parser.add_argument("--thresholds", type=float, nargs="+", default=[0.2, 0.3, 0.5],
                        help="one-shot thresholds (every prunable layer)")
    parser.add_argument("--out", default=None,
                        help="output directory (default: run_dir + '-vs-oneshot')")


def _check(config, args):
    from netcompress import compress as staged

    for threshold in args.thresholds:
        if not 0 < threshold <= 1:
            raise UserError(f"--thresholds must be in (0, 1], got {threshold}")
    out = args.out or config["run_dir"].rstrip("/") + "-vs-oneshot"
    config["run_dir"] = os.path.join(out, "compress")
    staged.check(config)
    return out


def _miou(config, model, data):
    import numpy as np

    from netcompress.evaluation import evaluate

    matrix = evaluate(dict(model, test_data=data), log=lambda line: None, progress=False)
    return 100.0 * float(np.nan_to_num(matrix.mean_iou()))


def _result(config, name, model, steps, out):
    """Costs and mIoU of a finished arm, saved as DIR/<name>/result.json."""
    from netcompress import compress as staged

    parameters, macs = staged._costs(config, model["model_def"], model["mask"])
    result = {"name": name, "steps": steps, "parameters": parameters, "macs": macs,
              "val_miou": _miou(config, model, config["val_data"]),
              "test_miou": _miou(config, model, config["test_data"])}
    path = os.path.join(out, name, "result.json")

    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as handle:
            json.dump(result, handle, indent=1)
    replace_atomically(path, write)
    return result


def _saved(out, name):
    path = os.path.join(out, name, "result.json")
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    return None


def _tries(run_dir, rows):
    """Every retraining compress.py ran: the tries of its kept stages and of
    a stage that failed (its stageN/tries.json; the reference's retraining
    is a control, not counted)."""
    count = sum(row["tries"] for row in rows[1:])
    failed = os.path.join(run_dir, f"stage{len(rows)}", "tries.json")
    if os.path.isfile(failed):
        with open(failed, encoding="utf-8") as handle:
            count += sum(1 for entry in json.load(handle)["tries"]
                         if entry.get("val_miou_retrained") is not None)
    return count


def _retrained(config, model, directory, steps):
    from netcompress import compress as staged
    from netcompress.training import train

    result = train(staged.retrain_config(config, model, directory, steps),
                   log=lambda line: None, progress=False,
                   seed=None if config["seed"] is None else config["seed"] + 1)
    return dict(model, checkpoint=result["checkpoint"])


def _work(config, args, out):
    from models.model_def import load_masks, load_model_def
    from netcompress import compress as staged
    from netcompress.plan import plan_pruning
    from netcompress.scores import load_normalised_scores

    make_directory(out)
    print(f"== compress.py into {config['run_dir']}")
    rows = staged.run(config, progress=False)
    tries = _tries(config["run_dir"], rows)
    steps = tries * config["retrain_iterations"]
    compressed = rows[-1]
    results = [{"name": "compress", "steps": steps, "parameters": compressed["parameters"],
                "macs": compressed["macs"], "val_miou": compressed["val_miou_retrained"],
                "test_miou": compressed["test_miou"],
                "note": f"{len(rows) - 1} stages kept, {tries} tries in all"}]
    given = staged._given_model(config)
    print(f"== {steps} retraining steps for every other arm")
    control = _saved(out, "control")
    if control is None:
        directory = os.path.join(out, "control")
        make_directory(directory)
        control = _result(config, "control", _retrained(config, given, directory, steps),
                          steps, out)
    results.append(dict(control, note="unpruned, retrained"))
    # The ranks of the given model: compress.py's first stage made them.
    rank_path = os.path.join(config["run_dir"], "stage1", "rank.npz")
    model_def, masks = load_model_def(given["model_def"]), load_masks(given["mask"])
    scores = load_normalised_scores(rank_path, model_def, config["num_classes"],
                                    config["criterion"], config["normalisation"])
    for threshold in args.thresholds:
        name = f"oneshot-{threshold:g}"
        result = _saved(out, name)
        if result is None:
            print(f"== one shot at threshold {threshold:g}")
            plan = plan_pruning(model_def, masks, config["num_classes"], scores, list(scores),
                                threshold, config["min_channels"], config["round_to"])
            removed = {cut.layer: list(cut.removed) for cut in plan.pruned_layers}
            directory = os.path.join(out, name)
            make_directory(directory)
            pruned = staged.prune_removal(config, given, rank_path, removed, directory)
            result = _result(config, name, _retrained(config, pruned, directory, steps),
                             steps, out)
        results.append(dict(result, note=f"threshold {threshold:g}, every layer"))
    lines = _summary(rows, results, config)
    for line in lines:
        print(line)
    replace_atomically(os.path.join(out, "summary.txt"),
                       lambda tmp: open(tmp, "w", encoding="utf-8").write("\n".join(lines) +
                                                                            "\n"))


def _summary(rows, results, config):
    base_parameters, base_macs = rows[0]["parameters"], rows[0]["macs"]
    control = next(r for r in results if r["name"] == "control")
    lines = ["", f"given model: {base_parameters} parameters, {base_macs / 1e9:.4f} GMACs, "
             f"test mIoU {rows[0]['test_miou']:.2f}; every arm retrained "
             f"{results[0]['steps']} steps ({config['retrain_iterations']} per compress.py "
             f"try)",
             f"{'run':<14} {'parameters':>10} {'params %':>9} {'GMACs':>8} {'MACs %':>7} "
             f"{'val mIoU':>8} {'test mIoU':>9} {'vs control':>10}  note"]
    for r in results:
        lines.append(f"{r['name']:<14} {r['parameters']:>10} "
                     f"{100 * (r['parameters'] / base_parameters - 1):>+9.1f} "
                     f"{r['macs'] / 1e9:>8.4f} {100 * (r['macs'] / base_macs - 1):>+7.1f} "
                     f"{r['val_miou']:>8.2f} {r['test_miou']:>9.2f} "
                     f"{r['test_miou'] - control['test_miou']:>+10.2f}  {r['note']}")
    matches = [r for r in results if r["name"].startswith("oneshot")
               and r["test_miou"] >= control["test_miou"] - WITHIN]
    compressed = results[0]
    if matches:
        best = min(matches, key=lambda r: r["parameters"])
        gap = 100 * (best["parameters"] - compressed["parameters"]) / base_parameters
        lines.append(f"best one shot within {WITHIN:g} test mIoU point of the control: "
                     f"{best['name']} ({100 * (1 - best['parameters'] / base_parameters):.1f} "
                     f"% fewer parameters); compress.py removes {gap:+.1f} points more")
    else:
        lines.append(f"no one shot stays within {WITHIN:g} test mIoU point of the control")
    ok = compressed["test_miou"] >= control["test_miou"] - WITHIN
    lines.append(f"compress.py is {'within' if ok else 'NOT within'} {WITHIN:g} test mIoU "
                 f"point of the control ({compressed['test_miou'] - control['test_miou']:+.2f})")
    return lines


def main(argv=None):
    return run_script(argv, "compress", DESCRIPTION, _work, add_arguments=add_arguments,
                      check=_check)


if __name__ == "__main__":
    sys.exit(run_main(main))

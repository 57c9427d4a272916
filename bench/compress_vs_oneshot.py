"""compress.py against one-shot pruning at equal retraining (docs/compress.md,
"compress.py against one-shot pruning" and "Targets that need the residual
streams").

    python bench/compress_vs_oneshot.py -c config/compress.config \
        [--thresholds 0.2 0.3 0.5] [--compress_streams false true] \
        [--compress_direct 0 auto] [--oneshot_streams true] [--oneshot_at_target] \
        [--out DIR] [--KEY VALUE ...]

In one run, on the data of a compress config (its --KEY VALUE overrides,
e.g. --retrain_iterations or --stages, apply to every arm):
- compress.py's run with the config's settings, into DIR/compress (or one
  run per value of --compress_streams: DIR/compress for streams false,
  DIR/compress-streams for true; and per value of --compress_direct, the
  direct_iterations: DIR/compress[-streams]-direct<value>), in the order
  given;
- one shot: every prunable layer of the given model (with --oneshot_streams
  true the residual streams too) cut at each threshold (the config's
  criterion and normalisation, ranks of the given model on the training
  records), and with --oneshot_at_target at the smallest threshold whose
  removal reaches the config's target (parameters or MACs, counted), then
  retrained as many steps as the last compress.py run's stages retrained in
  all (its redone tries included); compress.py's result is its final model
  (the last stage's after the final retraining, final_iterations), whose
  lineage has had as many steps with `auto`;
- the control: the given model retrained as many steps.
Every retraining uses the config's learning rate, decay and seed + 1.
Printed: parameters, MACs, batch-1 CPU latency (every arm's final model and
the given one, timed in this process, runs interleaved), validation and test
mIoU of each, and which one-shot threshold removes most while staying within
1 test mIoU point of the control. An arm whose DIR/<arm>/result.json exists
is not run again (a stopped bench resumes; compress.py resumes its own run).
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common.errors import UserError  # noqa: E402
from common.files import make_directory, replace_atomically  # noqa: E402
from netcompress.settings.cli import run_main, run_script  # noqa: E402

DESCRIPTION = ("compress.py's run against one-shot pruning at fixed thresholds and the "
               "unpruned model, all retrained as long (settings from a compress.py config).")
WITHIN = 1.0  # test mIoU points below the control that still count as a match
TARGET_STEPS = 20  # bisection steps for --oneshot_at_target's threshold


def _bool(text):
    return {"false": False, "true": True}[text]


def add_arguments(parser):
    parser.add_argument("--thresholds", type=float, nargs="*", default=[0.2, 0.3, 0.5],
                        help="one-shot thresholds (every prunable layer); none: no such arm")
    parser.add_argument("--compress_streams", choices=["false", "true"], nargs="+",
                        default=None, help="one compress.py run per value of `streams` "
                        "(default: the config's)")
    parser.add_argument("--compress_direct", nargs="+", default=None,
                        help="one compress.py run per value of `direct_iterations` (auto or "
                        "a count; default: the config's); the other arms are retrained as "
                        "long as the last run listed")
    parser.add_argument("--oneshot_streams", choices=["false", "true"], default=None,
                        help="one shot cuts the residual streams too (default: the "
                        "config's `streams`)")
    parser.add_argument("--oneshot_at_target", action="store_true",
                        help="a one-shot arm at the smallest threshold whose removal reaches "
                        "the config's target (latency: MACs), found on costs alone")
    parser.add_argument("--out", default=None,
                        help="output directory (default: run_dir + '-vs-oneshot')")


def _arm_name(streams, direct=None):
    return ("compress-streams" if streams else "compress") + \
        ("" if direct is None else f"-direct{direct}")


def _check(config, args):
    from netcompress.jobs import compress as staged

    for threshold in args.thresholds:
        if not 0 < threshold <= 1:
            raise UserError(f"--thresholds must be in (0, 1], got {threshold}")
    out = args.out or config["run_dir"].rstrip("/") + "-vs-oneshot"
    values = ([config["streams"]] if args.compress_streams is None
              else list(dict.fromkeys(_bool(v) for v in args.compress_streams)))
    for value in args.compress_direct or ():
        if value != "auto" and not (value.isdigit()):
            raise UserError(f"--compress_direct takes auto or counts >= 0, got {value!r}")
    directs = [None] if args.compress_direct is None else list(dict.fromkeys(
        "auto" if value == "auto" else int(value) for value in args.compress_direct))
    staged.check_inputs(config)  # also makes `seed` an integer, for every arm
    arms = []
    for streams in values:
        for direct in directs:
            name = _arm_name(streams, direct)
            arm = dict(config, streams=streams, run_dir=os.path.join(out, name), name=name,
                       direct_iterations=(config["direct_iterations"] if direct is None
                                          else direct))
            staged.check(arm)
            arms.append(arm)
    config["run_dir"] = arms[-1]["run_dir"]
    config["streams"] = (config["streams"] if args.oneshot_streams is None
                         else _bool(args.oneshot_streams))
    return {"out": out, "arms": arms}


def _miou(config, model, data):
    import numpy as np

    from netcompress.jobs.evaluate import evaluate

    matrix = evaluate(dict(model, test_data=data), log=lambda line: None, progress=False)
    return 100.0 * float(np.nan_to_num(matrix.mean_iou()))


def _result(config, name, model, steps, out, **extra):
    """Costs and mIoU of a finished arm, saved as DIR/<name>/result.json."""
    from netcompress.jobs import compress as staged

    parameters, macs = staged._costs(config, model["model_def"], model["mask"])
    result = {"name": name, "steps": steps, "parameters": parameters, "macs": macs,
              "val_miou": _miou(config, model, config["val_data"]),
              "test_miou": _miou(config, model, config["test_data"]),
              "model": {key: model[key] for key in ("model_def", "mask", "checkpoint")},
              **extra}
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


def _retrained(config, model, directory, steps):
    from netcompress.jobs import compress as staged
    from netcompress.jobs.train import train

    result = train(staged.retrain_config(config, model, directory, steps),
                   log=lambda line: None, progress=False,
                   seed=None if config["seed"] is None else config["seed"] + 1)
    return dict(model, checkpoint=result["checkpoint"])


def _compressed(arm):
    """compress.py's run for one arm (resumed if begun): its result."""
    from netcompress.jobs import compress as staged
    from netcompress.formats.checkpoint_paths import resolve_checkpoint

    print(f"== compress.py (streams {str(arm['streams']).lower()}, direct_iterations "
          f"{arm['direct_iterations']}) into {arm['run_dir']}")
    rows = staged.run(arm, progress=False)
    steps = staged.retraining_steps(arm, rows)
    last = rows[-1]
    model_def, mask, checkpoint = staged._stage_model(arm, last)
    stopped = staged.stop_reason(arm, rows)
    val, test = last["val_miou_retrained"], last["test_miou"]
    tries = sum(row.get("tries", 1) for row in rows[1:])
    note = f"stages kept {len(rows) - 1}, tries {tries}, retraining steps {steps}"
    final_path = os.path.join(arm["run_dir"], staged.FINAL_DIR, staged.FINAL_FILE)
    if os.path.isfile(final_path):  # the last stage's model after the final retraining
        with open(final_path, encoding="utf-8") as handle:
            final = json.load(handle)
        checkpoint = os.path.join(arm["run_dir"], final["checkpoint"])
        val, test = final["val_miou"], final["test_miou"]
        note += (f", final +{final['iterations']} steps (stage {last['stage']}: val "
                 f"{last['val_miou_retrained']:.2f}, test {last['test_miou']:.2f})")
    return {"name": arm["name"], "steps": steps,
            "parameters": last["parameters"], "macs": last["macs"],
            "val_miou": val, "test_miou": test,
            "model": {"model_def": model_def, "mask": mask,
                      "checkpoint": resolve_checkpoint(checkpoint)},
            "note": f"{note}; stopped: {stopped}"}


def _threshold_for_target(config, model_def, masks, scores, layers):
    """The smallest threshold (bisection) whose one-shot removal brings the
    target resource (latency: MACs) to target_percent of the given model's;
    1.0 if even that does not."""
    from netcompress.pruning_math.plan import plan_pruning
    from netcompress.pruning_math.schedule import resource_of

    resource = "parameters" if config["target"] == "parameters" else "macs"
    num_classes, height, width = config["num_classes"], config["height"], config["width"]
    goal = config["target_percent"] / 100.0 * resource_of(model_def, masks, num_classes,
                                                          height, width, resource)

    def reaches(threshold):
        plan = plan_pruning(model_def, masks, num_classes, scores, layers, threshold,
                            config["min_channels"], config["round_to"])
        return resource_of(plan.model_def_after, plan.masks_after, num_classes, height,
                           width, resource) <= goal
    low, high = 0.0, 1.0
    if not reaches(high):
        return high
    for _ in range(TARGET_STEPS):
        middle = (low + high) / 2
        low, high = (low, middle) if reaches(middle) else (middle, high)
    return high


def _oneshot(config, given, rank_path, model_def, masks, scores, layers, name, threshold,
             steps, out):
    from netcompress.jobs import compress as staged
    from netcompress.pruning_math.plan import plan_pruning

    print(f"== one shot at threshold {threshold:g} ({name})")
    plan = plan_pruning(model_def, masks, config["num_classes"], scores, layers, threshold,
                        config["min_channels"], config["round_to"])
    removed = {cut.layer: list(cut.removed) for cut in plan.pruned_layers}
    directory = os.path.join(out, name)
    make_directory(directory)
    pruned = staged.prune_removal(config, given, rank_path, removed, directory)
    return _result(config, name, _retrained(config, pruned, directory, steps), steps, out,
                   threshold=threshold, streams=config["streams"])


def _work(config, args, prepared):
    from models.architecture import adapnet_pp
    from models.model_def import load_masks, load_model_def
    from netcompress.jobs import compress as staged
    from netcompress.formats.rankfile import load_normalised_scores

    out = prepared["out"]
    make_directory(out)
    compressed = [_compressed(arm) for arm in prepared["arms"]]
    steps = compressed[-1]["steps"]
    results = list(compressed)
    given = staged._given_model(config)
    rows = staged.finished_rows(config)
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
    layers = [group.name for group in adapnet_pp().prunable_groups(streams=config["streams"])]
    scores = {layer: scores[layer] for layer in layers}
    what = "every layer and stream" if config["streams"] else "every layer"
    arms = [(f"oneshot-{threshold:g}", threshold, f"threshold {threshold:g}, {what}")
            for threshold in args.thresholds]
    if args.oneshot_at_target:
        threshold = _threshold_for_target(config, model_def, masks, scores, layers)
        arms.append(("oneshot-target", threshold,
                     f"threshold {threshold:.4f} (the smallest reaching the target), {what}"))
    for name, threshold, note in arms:
        result = _saved(out, name)
        if result is None:
            result = _oneshot(config, given, rank_path, model_def, masks, scores, layers,
                              name, threshold, steps, out)
        results.append(dict(result, note=note))
    latencies = _latencies(config, given, results)
    lines = _summary(rows, results, latencies, config, compressed)
    for line in lines:
        print(line)
    replace_atomically(os.path.join(out, "summary.txt"),
                       lambda tmp: open(tmp, "w", encoding="utf-8").write("\n".join(lines) +
                                                                            "\n"))


def _latencies(config, given, results):
    """{arm: median ms} of every arm's final model and the given model
    ("given"), timed together (compress.py's latency_of)."""
    from netcompress.jobs import compress as staged

    models = {"given": given}
    for result in results:
        if result.get("model"):  # result.json of an older bench has none
            models[result["name"]] = staged.model_config(config, **result["model"])
    print(f"== latency: {config['latency_runs']} batch-1 runs each, interleaved")
    return staged.latency_of(config, models, progress=False)


def _summary(rows, results, latencies, config, compressed):
    base_parameters, base_macs = rows[0]["parameters"], rows[0]["macs"]
    base_latency = latencies["given"]
    control = next(r for r in results if r["name"] == "control")
    width = max(16, *(len(r["name"]) for r in results))
    lines = ["", f"given model: {base_parameters} parameters, {base_macs / 1e9:.4f} GMACs, "
             f"{base_latency:.2f} ms, test mIoU {rows[0]['test_miou']:.2f}; target "
             f"{config['target']} at {config['target_percent']:g} %; every arm but "
             f"compress.py retrained {results[len(compressed)]['steps']} steps "
             f"({config['retrain_iterations']} per compress.py try); latency: batch 1, CPU, "
             f"{config['height']}x{config['width']}, median of {config['latency_runs']}",
             f"{'run':<{width}} {'parameters':>10} {'params %':>9} {'GMACs':>8} {'MACs %':>7} "
             f"{'ms':>6} {'ms %':>6} {'val mIoU':>8} {'test mIoU':>9} {'vs control':>10}  note"]
    for r in results:
        latency = latencies.get(r["name"])
        shown = (f"{latency:>6.2f} {100 * (latency / base_latency - 1):>+6.1f}"
                 if latency is not None else f"{'-':>6} {'-':>6}")
        lines.append(f"{r['name']:<{width}} {r['parameters']:>10} "
                     f"{100 * (r['parameters'] / base_parameters - 1):>+9.1f} "
                     f"{r['macs'] / 1e9:>8.4f} {100 * (r['macs'] / base_macs - 1):>+7.1f} "
                     f"{shown} {r['val_miou']:>8.2f} {r['test_miou']:>9.2f} "
                     f"{r['test_miou'] - control['test_miou']:>+10.2f}  {r['note']}")
    matches = [r for r in results if r["name"].startswith("oneshot")
               and r["test_miou"] >= control["test_miou"] - WITHIN]
    if matches:
        best = min(matches, key=lambda r: r["parameters"])
        gap = 100 * (best["parameters"] - compressed[-1]["parameters"]) / base_parameters
        lines.append(f"best one shot within {WITHIN:g} test mIoU point of the control: "
                     f"{best['name']} ({100 * (1 - best['parameters'] / base_parameters):.1f} "
                     f"% fewer parameters); {compressed[-1]['name']} removes {gap:+.1f} "
                     f"points more")
    else:
        lines.append(f"no one shot stays within {WITHIN:g} test mIoU point of the control")
    for arm in compressed:
        ok = arm["test_miou"] >= control["test_miou"] - WITHIN
        percent = 100.0 * (arm["macs"] if config["target"] != "parameters"
                           else arm["parameters"]) / (base_macs if config["target"] !=
                                                      "parameters" else base_parameters)
        lines.append(f"{arm['name']} ends at {percent:.1f} % of the given model's "
                     f"{'parameters' if config['target'] == 'parameters' else 'MACs'} and is "
                     f"{'within' if ok else 'NOT within'} {WITHIN:g} test mIoU point of the "
                     f"control ({arm['test_miou'] - control['test_miou']:+.2f})")
    return lines


def main(argv=None):
    return run_script(argv, "compress", DESCRIPTION, _work, add_arguments=add_arguments,
                      check=_check)


if __name__ == "__main__":
    sys.exit(run_main(main))

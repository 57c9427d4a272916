"""compress.py's job (docs/compress.md): staged compression in one command.

Stage 0 is the model given (its validation mIoU, or that of the given model
retrained, is the reference). Each stage then ranks the current model on the
training records and, by ``stage_rule``:

- after_retraining (default): removes a step of the target resource, the
  allocation across layers chosen by gated passes over the validation
  records (netcompress/pruning_math/schedule.py) -> prune -> retrain ->
  validate; a try that ends below reference - tolerance is redone with half
  the step (stageN/tryK/ holds each try);
- budget_before_retraining: threshold search within ``budget`` before
  retraining (netcompress/pruning_math/search.py) -> prune -> retrain ->
  validate.

Only then is the stage's model evaluated on the test records, which nothing
else reads. Every stage's files live in run_dir/stageN/, its row
(stageN/row.json) is written last, and a rerun continues after the last
stage with a row. Latency is measured at the end of every run, for all
stages in one process.

Its settings are the config kind 'compress' (COMPRESS_SETTINGS in
netcompress/settings/config.py); its table, CSV and plot are
netcompress/jobs/compress_report.py's. No TensorFlow at import.
"""

import functools
import json
import os
import shutil
import statistics
import time

import numpy as np

from common import outputs
from common.digests import checkpoint_digest, file_digest, short
from common.errors import UserError
from common.files import make_directory, replace_atomically
from netcompress.formats.checkpoint_paths import checkpoint_exists, input_checkpoint_files
from netcompress.formats.palette import config_class_names
from netcompress.graphs.models import model_architecture
from netcompress.jobs.compress_report import table, write_csv, write_plot
from netcompress.pruning_math.search import search_groups
from netcompress.settings.config import AFTER_RETRAINING, setting_defaults

# What defines a run: a rerun into the same run_dir must agree on these.
RUN_KEYS = ("model", "num_classes", "model_def", "mask", "checkpoint", "train_data",
            "val_data", "test_data", "batch_size", "height", "width", "retrain_iterations",
            "learning_rate", "power", "flip", "seed", "criterion", "normalisation",
            "stage_rule", "target", "tolerance", "reference", "step_percent",
            "min_step_percent", "search", "budget", "search_steps", "miou_floor",
            "min_channels", "round_to")
PATH_KEYS = ("model_def", "mask", "checkpoint", "train_data", "val_data", "test_data")
RUN_FILE = "run.json"
ROW_FILE = "row.json"
CSV_FILE = "stages.csv"
PLOT_FILE = "compression.png"
STOP_FILE = "stopped.json"
FINAL_DIR = "final"  # the last kept stage's model, retrained final_iterations more steps
FINAL_FILE = "final.json"

# Which step runs now (reference, rank, search, prune, retrain, validate,
# evaluate, latency): the tests check which records each step reads.
current_step = None


def _real(path):
    return os.path.realpath(os.path.expanduser(path))


def _stage_dir(run_dir, stage):
    return os.path.join(run_dir, f"stage{stage}")


# ---- checks before any work ----------------------------------------------------

def check(config, args=None):
    """Settings, inputs, the run directory and its finished stages; no
    TensorFlow. Returns the finished rows (stage 0 first)."""
    check_inputs(config)
    _check_run_dir(config)
    return finished_rows(config)


def check_inputs(config):
    """Everything but the run directory (also bench/criteria_compare.py's check)."""
    if config["seed"] is not None:
        try:
            config["seed"] = int(config["seed"])
        except ValueError:
            raise UserError(f"'seed' must be an integer or None, got {config['seed']!r}") \
                from None
    for key in ("learning_rate", "power"):
        if not config[key] > 0:
            raise UserError(f"{key!r} must be a positive number, got {config[key]}")
    if not 0 < config["target_percent"] < 100:
        raise UserError(f"'target_percent' is the percentage of the given model to reach, "
                        f"above 0 and below 100; got {config['target_percent']}")
    if not 0 < config["min_step_percent"] <= config["step_percent"]:
        raise UserError(f"'min_step_percent' must be above 0 and at most step_percent "
                        f"({config['step_percent']}), got {config['min_step_percent']}")
    for key in ("model_def", "train_data", "val_data", "test_data", "mask"):
        if config[key] is not None and not os.path.isfile(config[key]):
            raise UserError(f"{key!r} file {config[key]!r} does not exist (relative paths "
                            f"are taken from the current directory {os.getcwd()})")
    config_class_names(config)  # a missing or mismatching names file stops here
    if not checkpoint_exists(config["checkpoint"]):
        raise UserError(f"'checkpoint' {config['checkpoint']!r} not found (expected "
                        f"{config['checkpoint']}.index, or a directory with a 'checkpoint' "
                        f"file)")
    if _real(config["val_data"]) == _real(config["test_data"]):
        raise UserError(f"val_data {config['val_data']!r} is the test data: the search "
                        f"needs held-out validation records, and the test records judge "
                        f"the result")
    if _real(config["val_data"]) == _real(config["train_data"]):
        raise UserError(f"val_data {config['val_data']!r} is the training data: give "
                        f"held-out validation records")


def _inputs(config):
    files = {key: [config[key]] for key in PATH_KEYS
             if key != "checkpoint" and config[key] is not None}
    files["checkpoint"] = input_checkpoint_files(config["checkpoint"])
    if config.get("classes") is not None:
        files["classes"] = [config["classes"]]
    return files


def _check_run_dir(config):
    run_dir = config["run_dir"]
    root = _real(run_dir)
    for key, paths in _inputs(config).items():
        for path in paths:
            if _real(path) == root or _real(path).startswith(root + os.sep):
                raise UserError(f"run_dir {run_dir!r} holds the input {key} {path!r}: "
                                f"give another run_dir")
    outputs.check_outputs({"run_dir": [os.path.join(run_dir, RUN_FILE)]}, _inputs(config))
    if not os.path.isdir(run_dir) or not os.listdir(run_dir):
        return
    run_file = os.path.join(run_dir, RUN_FILE)
    if not os.path.isfile(run_file):
        raise UserError(f"run_dir {run_dir!r} is not empty and holds no {RUN_FILE}: give a "
                        f"new or empty directory, or an earlier compress.py run to resume")
    saved = _read_json(run_file)
    current = run_identity(config)
    for key in RUN_KEYS:
        if saved.get(key) != current[key]:
            raise UserError(f"run_dir {run_dir!r} holds a run with {key} {saved.get(key)!r}, "
                            f"this one has {current[key]!r}: use a new run_dir to change it")


def input_digests(config):
    """{key: {"path", "sha256"} or None} of the inputs (PATH_KEYS) as read
    now: a checkpoint directory by the prefix it names (common/digests.py)."""
    from netcompress.formats.checkpoint_paths import resolve_checkpoint

    inputs = {}
    for key in PATH_KEYS:
        if config[key] is None:
            inputs[key] = None
        elif key == "checkpoint":
            prefix = resolve_checkpoint(config[key])
            inputs[key] = {"path": prefix, "sha256": checkpoint_digest(prefix)}
        else:
            inputs[key] = {"path": config[key], "sha256": file_digest(config[key])}
    return inputs


def check_contents(config, log=print):
    """A rerun into run_dir reads inputs of the content its finished stages
    were measured on (a path that now holds other content is refused);
    returns input_digests(config). A run.json written before digests were
    recorded is accepted with a warning (docs/compress.md)."""
    inputs = input_digests(config)
    run_file = os.path.join(config["run_dir"], RUN_FILE)
    if not os.path.isfile(run_file):
        return inputs
    saved = _read_json(run_file).get("inputs")
    if saved is None:
        log(f"warning: {run_file} records no input digests (written before they were "
            f"recorded): not checked that the inputs still hold what its stages read")
        return inputs
    for key in PATH_KEYS:
        before, now = saved.get(key) or {}, inputs[key] or {}
        if before.get("sha256") != now.get("sha256"):
            raise UserError(f"run_dir {config['run_dir']!r} holds a run whose {key} had other "
                            f"content ({before.get('path')}, sha256 "
                            f"{short(before.get('sha256'))}; now {now.get('path')}, sha256 "
                            f"{short(now.get('sha256'))}): use a new run_dir, or restore "
                            f"that input")
    return inputs


def record_run(config, inputs):
    """run_dir/run.json: the settings and the inputs' digests of this run."""
    make_directory(config["run_dir"])
    _write_json(os.path.join(config["run_dir"], RUN_FILE),
                dict(run_identity(config), inputs=inputs))


def run_identity(config):
    identity = {key: config[key] for key in RUN_KEYS}
    for key in PATH_KEYS:
        if identity[key] is not None:
            identity[key] = _real(identity[key])
    return identity


def _read_json(path):
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read {path}: {exc}") from None


def _write_json(path, data):
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as handle:
            json.dump(data, handle, indent=1)
    replace_atomically(path, write)


def _write_lines(path, lines):
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write("\n".join(lines) + "\n")
    replace_atomically(path, write)


def finished_rows(config):
    """Rows of the finished stages, consecutive from stage 0."""
    rows, stage = [], 0
    while os.path.isfile(os.path.join(_stage_dir(config["run_dir"], stage), ROW_FILE)):
        rows.append(_read_json(os.path.join(_stage_dir(config["run_dir"], stage), ROW_FILE)))
        stage += 1
    return rows


# ---- the run --------------------------------------------------------------------

def stop_reason(config, rows):
    """Why no further stage runs, or None."""
    stage = len(rows) - 1
    if stage < 0:
        return None
    if stage >= config["stages"]:
        return f"{config['stages']} stage(s) done"
    if stage > 0:
        from netcompress.pruning_math.schedule import target_reached

        percent = rows[-1]["resource_percent"]
        if target_reached(percent, config["target_percent"]):
            return (f"{config['target']} at {percent:.1f} % of the given model (target "
                    f"{config['target_percent']:g} %)")
    stopped = os.path.join(config["run_dir"], STOP_FILE)
    if os.path.isfile(stopped):
        record = _read_json(stopped)
        if record.get("stage") == stage + 1:
            return record["reason"]
    return None


def model_config(config, model_def, mask, checkpoint=None):
    """A config of the evaluation kind for one stage's model."""
    result = {key: config[key] for key in ("gpu_id", "model", "num_classes", "batch_size",
                                           "skip_step", "height", "width", "atrous_path")}
    result.update(model_def=model_def, mask=mask, checkpoint=checkpoint,
                  classes=config.get("classes"))
    return result


def _stage_model(config, row):
    """(model_def, mask, checkpoint) paths of a finished stage."""
    if row["stage"] == 0:
        return config["model_def"], config["mask"], config["checkpoint"]

    def absolute(path):
        return None if path is None else os.path.join(config["run_dir"], path)
    return absolute(row["model_def"]), absolute(row["mask"]), absolute(row["checkpoint"])


def run(config, args=None, rows=None, log=print, progress=True):
    """Run the stages still to do, then measure latency of every stage, write
    stages.csv and compression.png and log the summary table. Returns the rows."""
    try:
        return _run(config, rows, log, progress)
    finally:
        _held.close()


def _run(config, rows, log, progress):
    run_dir = config["run_dir"]
    rows = list(rows if rows is not None else finished_rows(config))
    make_directory(run_dir)
    # run.json records the settings as given; the digests, the files read
    # (a described checkpoint's model_def and mask are written to run_dir/given/).
    given = given_model_files(config)
    inputs = check_contents(given, log)
    record_run(config, inputs)
    for key, read in inputs.items():
        if read is not None:
            log(f"{key}: {read['path']} (sha256 {short(read['sha256'])})")
    config = given
    if rows:
        log(f"resuming {run_dir}: stage(s) 0..{len(rows) - 1} done")
    durations = []
    while True:
        reason = stop_reason(config, rows)
        if reason is not None:
            break
        stage = len(rows)
        directory = _stage_dir(run_dir, stage)
        if os.path.exists(directory):
            log(f"clearing the unfinished {directory}")
            shutil.rmtree(directory)
        _announce(config, stage, durations, log)
        started = time.perf_counter()
        if stage == 0:
            work = _stage_zero
        elif config["stage_rule"] == AFTER_RETRAINING:
            work = _stage_after_retraining
        else:
            work = _stage_budget
        row, reason = work(config, rows, directory, log, progress)
        if row is None:  # the stage failed: its tries stay, the run stops here
            _write_json(os.path.join(run_dir, STOP_FILE), {"stage": stage, "reason": reason})
            break
        row["seconds"] = round(time.perf_counter() - started, 1)
        _write_json(os.path.join(directory, ROW_FILE), row)  # last: the stage is done
        rows.append(row)
        if stage > 0:
            durations.append(row["seconds"])
        write_csv(rows, {}, os.path.join(run_dir, CSV_FILE))
    log(f"stopped: {reason}")
    final = final_tuning(config, rows, log, progress)
    latencies = measure_latency(config, rows, log, progress)
    write_csv(rows, latencies, os.path.join(run_dir, CSV_FILE), final)
    write_plot(config, rows, layer_widths(config, rows), os.path.join(run_dir, PLOT_FILE))
    for line in table(rows, latencies, final):
        log(line)
    log(f"saved {os.path.join(run_dir, CSV_FILE)} and {os.path.join(run_dir, PLOT_FILE)}")
    return rows


def _announce(config, stage, durations, log):
    if stage == 0:
        log(f"== stage 0: the model to compress ({_given_model(config)['checkpoint']})")
        return
    note = ""
    if durations:
        per_stage = statistics.mean(durations)
        note = (f"; about {_duration(per_stage)} per stage, at most "
                f"{_duration(per_stage * (config['stages'] - stage + 1))} left")
    log(f"== stage {stage} of at most {config['stages']}{note}")


def _duration(seconds):
    minutes, seconds = divmod(int(round(seconds)), 60)
    return f"{minutes}m{seconds:02d}s"


def _set_step(name):
    global current_step
    current_step = name


class _HeldEvaluation:
    """The evaluation graph of the model evaluated last, restored once and
    kept for its next pass: a stage tests the try it validated last (stage
    0 and the final retraining validate and test one model too), so one
    graph and one checkpoint read serve both. Closed before any retraining
    (no idle session beside training) and at the end of a run."""

    def __init__(self):
        self.key = self.evaluation = None

    def of(self, model):
        from netcompress.jobs.evaluate import Evaluation

        key = tuple(None if model[name] is None else os.path.realpath(model[name])
                    for name in ("model_def", "mask", "checkpoint"))
        if key != self.key:
            self.close()
            self.evaluation, self.key = Evaluation(model), key
        return self.evaluation

    def close(self):
        if self.evaluation is not None:
            self.evaluation.close()
        self.key = self.evaluation = None


_held = _HeldEvaluation()


def _miou_pass(model, records, report_path, progress):
    """mIoU in percent of one plain pass of ``model`` over ``records``; the
    per-class report goes to ``report_path``."""
    lines = []
    matrix = _held.of(model).run(records, log=lines.append, progress=progress)
    _write_lines(report_path, lines)
    return 100.0 * float(np.nan_to_num(matrix.mean_iou()))


def _evaluate_test(config, model, directory, log, progress):
    """Test mIoU of a stage's model; the report goes to directory/eval.txt."""
    _set_step("evaluate")
    miou = _miou_pass(model, config["test_data"], os.path.join(directory, "eval.txt"),
                      progress)
    log(f"test mIoU: {miou:.2f}")
    return miou


def _validate(config, model, directory, log, progress, what="after retraining"):
    """Validation mIoU of a model (one plain pass over val_data); the report
    goes to directory/val.txt."""
    _set_step("validate")
    miou = _miou_pass(model, config["val_data"], os.path.join(directory, "val.txt"),
                      progress)
    log(f"validation mIoU {what}: {miou:.2f}")
    return miou


def _costs(config, model_def_path, mask_path):
    from models.model_def import load_masks, load_model_def

    return _model_costs(config, load_model_def(model_def_path), load_masks(mask_path))


def _model_costs(config, model_def, masks):
    """(parameters, multiply-adds) of a model_def and masks already read."""
    from netcompress.pruning_math.costs import inference_macs, total_parameters

    architecture = model_architecture(config["model"])
    return (total_parameters(model_def, config["num_classes"], architecture),
            inference_macs(model_def, config["num_classes"], config["height"],
                           config["width"], masks, architecture))


def _resource_percent(config, rows, model, parameters, macs, log, progress):
    """The target resource of ``model`` as a percentage of the given model's;
    latency is measured against stage 0 in this process."""
    if config["target"] == "parameters":
        return 100.0 * parameters / rows[0]["parameters"]
    if config["target"] == "macs":
        return 100.0 * macs / rows[0]["macs"]
    latencies = latency_of(config, {"given": _given_model(config), "new": model}, progress)
    percent = 100.0 * latencies["new"] / latencies["given"]
    log(f"latency {latencies['new']:.2f} ms, {percent:.1f} % of the given model's "
        f"{latencies['given']:.2f} ms")
    return percent


GIVEN_DIR = "given"  # the given checkpoint's model_def and mask, when it describes them


def given_model_files(config):
    """``config`` with the given model's model_def and mask files and
    num_classes: when the checkpoint describes its model (netcompress/
    description.py), the config's (if given) must equal it, and what the
    config leaves out is written from the description into run_dir/given/
    (every stage reads files); else the config's, as before."""
    from models.model_def import save_masks, save_model_def
    from netcompress.formats.description import checkpoint_model

    found = checkpoint_model(config["checkpoint"], config["model_def"], config["mask"],
                             config["num_classes"])
    config = dict(config, num_classes=found.num_classes)
    if found.description is None:
        return config
    directory = os.path.join(config["run_dir"], GIVEN_DIR)
    if config["model_def"] is None:
        make_directory(directory)
        config["model_def"] = os.path.join(directory, "model_def.json")
        save_model_def(found.model_def, config["model_def"])
    if config["mask"] is None and found.masks:
        make_directory(directory)
        config["mask"] = os.path.join(directory, "mask.npy")
        save_masks(found.masks, config["mask"])
    return config


def _given_model(config):
    from netcompress.formats.checkpoint_paths import resolve_checkpoint

    return model_config(config, config["model_def"], config["mask"],
                        resolve_checkpoint(config["checkpoint"]))


def _stage_zero(config, rows, directory, log, progress):
    """The given model: its validation mIoU (stage 0's reference) and test mIoU."""
    make_directory(directory)
    model = _given_model(config)
    val = _validate(config, model, directory, log, progress, what="of the given model")
    miou = _evaluate_test(config, model, directory, log, progress)
    parameters, macs = _costs(config, config["model_def"], config["mask"])
    return {"stage": 0, "model_def": None, "mask": None, "checkpoint": None,
            "parameters": parameters, "macs": macs, "test_miou": miou,
            "resource_percent": 100.0, "reference": val, "reference_checkpoint": None,
            "val_miou_start": None, "val_miou_pruned": None, "val_miou_retrained": val,
            "tries": 0, "step_pct": None, "allocation": None, "failed_tries": [],
            "thresholds": {}, "removed_channels": 0, "candidates": 0,
            "candidates_per_s": None}, None


def _relative(config, path):
    return None if path is None else os.path.relpath(path, config["run_dir"])


def _described(model):
    """``model`` (a checkpoint this run wrote) with its model taken from the
    checkpoint's description alone: its model_def and mask files, written
    with it and checked against it when pruned, are not read again."""
    return dict(model, model_def=None, mask=None)


def _reading_source_once(stage):
    """A stage whose readers of the stage's model (rank pass, gated graph,
    pruning of every try) share one read of its checkpoint."""
    @functools.wraps(stage)
    def reading_once(config, rows, directory, log, progress):
        from netcompress.formats.checkpoint_paths import resolve_checkpoint
        from netcompress.formats.checkpoints import read_once

        with read_once(resolve_checkpoint(_stage_model(config, rows[-1])[2])):
            return stage(config, rows, directory, log, progress)
    return reading_once


@_reading_source_once
def _stage_budget(config, rows, directory, log, progress):
    """budget_before_retraining: (its row, None), or (None, why) when nothing
    can be removed within the budget."""
    from netcompress.formats.checkpoint_paths import resolve_checkpoint
    from netcompress.graphs.models import with_checkpoint_model

    stage = len(rows)
    model_def_path, mask_path, checkpoint = _stage_model(config, rows[-1])
    model = model_config(config, model_def_path, mask_path, resolve_checkpoint(checkpoint))
    described = with_checkpoint_model(model)  # as in _stage_after_retraining
    model_def, masks = described["checkpoint_model"].model_def, \
        described["checkpoint_model"].masks
    make_directory(directory)
    rank_path = os.path.join(directory, "rank.npz")
    _rank(config, described, rank_path, log, progress)
    found, groups, scores = _search(config, described, model_def, rank_path, log, progress)
    _write_json(os.path.join(directory, "search.json"), _search_record(found))
    if not found.removed:
        return None, (f"no channel can go within the budget (validation mIoU "
                      f"{found.start_miou:.2f}, goal >= {found.goal:.2f})")
    pruned, plan = _prune(config, model, model_def, masks, rank_path, groups, scores, found,
                          directory, log)
    retrained = _retrain(config, _described(pruned), directory, stage, log, progress)
    final = _described(dict(pruned, checkpoint=retrained))
    val = _validate(config, final, directory, log, progress)
    miou = _evaluate_test(config, final, directory, log, progress)
    parameters, macs = _model_costs(config, plan.model_def_after, plan.masks_after)
    return {"stage": stage, "model_def": _relative(config, pruned["model_def"]),
            "mask": _relative(config, pruned["mask"]),
            "checkpoint": _relative(config, retrained),
            "parameters": parameters, "macs": macs, "test_miou": miou,
            "resource_percent": _resource_percent(config, rows, final, parameters, macs, log,
                                                  progress),
            "val_miou_start": found.start_miou, "val_miou_pruned": found.miou,
            "val_miou_retrained": val, "tries": 1, "step_pct": None,
            "reference": rows[0]["reference"], "reference_checkpoint": None,
            "allocation": "thresholds", "failed_tries": [],
            "thresholds": found.thresholds, "removed_channels": found.removed_count,
            "candidates": found.evaluations,
            "candidates_per_s": round(found.per_second, 2)}, None


def _reference(config, rows, directory, stage, log, progress, iterations=None,
               name="reference"):
    """(reference validation mIoU, its checkpoint relative to run_dir or
    None). ``retrained``: the previous stage's reference model (stage 0: the
    given model) retrained as each try is, so that stage N is judged against
    the given model after as many retraining steps, on the same schedule."""
    if config["reference"] != "retrained":
        return rows[0]["reference"], None
    model = _given_model(config)
    if rows[-1].get("reference_checkpoint"):
        model["checkpoint"] = os.path.join(config["run_dir"], rows[-1]["reference_checkpoint"])
    reference_dir = os.path.join(directory, name)
    make_directory(reference_dir)
    checkpoint = _retrain(config, model, reference_dir, stage, log, progress,
                          iterations=iterations, step="reference")
    miou = _validate(config, dict(model, checkpoint=checkpoint), reference_dir, log, progress,
                     what="of the reference (the given model, retrained as long)")
    return miou, _relative(config, checkpoint)


def _removal_key(removed):
    return tuple(sorted((layer, tuple(int(i) for i in indices))
                        for layer, indices in removed.items() if len(indices)))


class _GatedCandidates:
    """Validation mIoU of removals from one model, by gated passes (one
    graph and session for all of a stage's tries; identical removals are
    evaluated once)."""

    def __init__(self, config, model):
        self.config, self.model = config, model
        self.session = self.gated = None
        self.cache, self.evaluations, self.seconds = {}, 0, 0.0

    def miou(self, removed):
        import tensorflow as tf

        from netcompress.graphs.inference import GatedGraph

        key = _removal_key(removed)
        if key in self.cache:
            return self.cache[key]
        _set_step("search")
        started = time.perf_counter()
        if self.session is None:
            self.gated = GatedGraph(self.model, self.config["val_data"])
            self.session = tf.compat.v1.Session(graph=self.gated.graph)
            self.gated.restore(self.session, self.model["checkpoint"],
                               self.model["model_def"])
        matrix, _ = self.gated.evaluate(self.session, dict(key), self.config["num_classes"])
        self.cache[key] = 100.0 * float(np.nan_to_num(matrix.mean_iou()))
        self.seconds += time.perf_counter() - started
        self.evaluations += 1
        return self.cache[key]

    def close(self):
        if self.session is not None:
            self.session.close()


@_reading_source_once
def _stage_after_retraining(config, rows, directory, log, progress):
    """after_retraining: (its row, None), or (None, why) when its smallest
    step fails or nothing is left to remove. Each try lives in
    directory/tryK/."""
    from netcompress.formats.checkpoint_paths import resolve_checkpoint
    from netcompress.graphs.models import with_checkpoint_model
    from netcompress.formats.rankfile import RankSums
    from netcompress.pruning_math.schedule import Attempt, channel_costs, direct_iterations, \
        family_orderings, least_reachable, removal_for_goal, run_stage
    from netcompress.formats.rankfile import load_normalised_scores

    stage = len(rows)
    num_classes, height, width = config["num_classes"], config["height"], config["width"]
    model_def_path, mask_path, checkpoint = _stage_model(config, rows[-1])
    model = model_config(config, model_def_path, mask_path, resolve_checkpoint(checkpoint))
    # Its model_def and mask read once, for the readers of this model only
    # (a config derived from `model` for another model must not carry it).
    described = with_checkpoint_model(model)
    model_def, masks = described["checkpoint_model"].model_def, \
        described["checkpoint_model"].masks
    make_directory(directory)
    rank_path = os.path.join(directory, "rank.npz")
    _rank(config, described, rank_path, log, progress)
    _set_step("allocate")
    architecture = model_architecture(config["model"])
    normalised = load_normalised_scores(rank_path, model_def, num_classes,
                                        config["criterion"], config["normalisation"],
                                        architecture)
    # A latency target sizes its steps in MACs (docs/compress.md).
    sized = "macs" if config["target"] == "latency" else config["target"]
    groups = architecture.prunable_groups(streams=config.get("streams", False))
    layers = [group.name for group in groups]
    _check_stream_scores(rank_path, normalised, layers)
    normalised = {layer: normalised[layer] for layer in layers}
    raw = {layer: values for layer, values in
           RankSums.load(rank_path).scores(config["criterion"]).items() if layer in layers}
    costs = channel_costs(model_def, masks, num_classes, height, width, sized, layers,
                          architecture)
    orders = family_orderings(raw, normalised, costs,
                              [group.name for group in groups if group.stream],
                              config["min_channels"])
    given = rows[0][sized]
    current_sized = 100.0 * rows[-1][sized] / given
    current = rows[-1]["resource_percent"] if sized == config["target"] else current_sized
    step = rows[-1]["step_pct"] or config["step_percent"]
    direct_steps = 0 if stage > 1 else direct_iterations(
        config["direct_iterations"], config["retrain_iterations"], config["stages"], current,
        config["target_percent"], step)
    if direct_steps:
        least = least_reachable({name: order for name, (_, order) in orders.items()},
                                model_def, masks, num_classes, height, width, sized,
                                config["min_channels"], config["round_to"], architecture)
        if least > config["target_percent"] * given / 100.0:
            log(f"no direct try: removing every removable channel leaves "
                f"{100.0 * least / given:.1f} % of the {sized}, short of the target")
            direct_steps = 0
    candidates = _GatedCandidates(config, described)
    records = []

    def attempt(step, goal, excluded=(), iterations=None, direct=False):
        try_dir = os.path.join(directory, f"try{len(records) + 1}")
        make_directory(try_dir)
        aim = (current_sized - step) * given / 100.0
        iterations = iterations or config["retrain_iterations"]
        log(f"try {len(records) + 1}: remove {step:g} points of {config['target']} "
            f"(to {goal:.1f} % of the given model)" +
            (f", not by {' or '.join(excluded)}" if excluded else "") +
            (f", retrained {iterations} steps" if iterations != config["retrain_iterations"]
             else ""))
        options = {name: removal_for_goal(order, aim, model_def, masks, num_classes, height,
                                          width, sized, config["min_channels"],
                                          config["round_to"], architecture)
                   for name, (family, order) in orders.items() if family not in excluded}
        meeting = {name: option for name, option in options.items() if option[1] <= aim}
        if not meeting:
            reachable = 100.0 * min(after for _, after in options.values()) / given
            log(f"the goal is out of reach: removing every removable channel leaves "
                f"{reachable:.1f} % (min_channels per layer); trying that")
        elif len(meeting) < len(options):
            # One that falls short removes less and would look better gated.
            log(f"cannot meet the step: {', '.join(n for n in options if n not in meeting)}")
            options = meeting
        start = candidates.miou({})
        mious = {name: candidates.miou(removed) for name, (removed, _) in options.items()}
        chosen = max(mious, key=lambda name: mious[name])  # ties: the first
        removed, _ = options[chosen]
        family = orders[chosen][0]
        # A family is another chance only if one of its removals differs.
        others = tuple(dict.fromkeys(
            orders[name][0] for name, (other, _) in options.items()
            if orders[name][0] != family and _removal_key(other) != _removal_key(removed)))
        count = sum(len(indices) for indices in removed.values())
        record = {"try": len(records) + 1, "step_pct": step, "goal_pct": goal,
                  "allocations": mious, "allocation": chosen, "family": family,
                  "val_miou_start": start, "removed_channels": count,
                  "iterations": iterations, "direct": direct}
        records.append(record)
        log("allocation on validation data (gated, before retraining): " +
            ", ".join(f"{name} {value:.2f}" for name, value in mious.items()) +
            f" -> {chosen}")
        if not count:
            return Attempt(step, goal, removed=0, family=family)
        # The stage's model_def and masks, and its checkpoint the rank pass restored.
        pruned, plan = _prune_removal(config, model, rank_path, removed, try_dir, log,
                                      model_def, masks, source_verified=True)
        parameters, macs = _model_costs(config, plan.model_def_after, plan.masks_after)
        retrained = _retrain(config, _described(pruned), try_dir, stage, log, progress,
                             iterations=iterations)
        final = _described(dict(pruned, checkpoint=retrained))
        reached = _resource_percent(config, rows, final, parameters, macs, log, progress)
        val = _validate(config, final, try_dir, log, progress)
        record.update(resource_pct=reached, val_miou_retrained=val, parameters=parameters,
                      macs=macs, model_def=_relative(config, pruned["model_def"]),
                      mask=_relative(config, pruned["mask"]),
                      checkpoint=_relative(config, retrained))
        return Attempt(step, goal, reached=reached, removed=count, val_miou=val,
                       details=record, family=family, others=others)

    judged = {}  # "direct" and "steps": what their tries were judged by
    try:
        accepted, tries = None, []
        if direct_steps:
            accepted, tries = _direct_try(config, rows, directory, current, direct_steps,
                                          attempt, judged, log, progress)
        if accepted is None and not (tries and tries[-1].removed == 0):
            judged["steps"] = _judgement(config, *_reference(config, rows, directory, stage,
                                                             log, progress))
            accepted, tries = run_stage(current, config["target_percent"], step,
                                        config["min_step_percent"], judged["steps"]["floor"],
                                        attempt, log, earlier=tries)
    finally:
        candidates.close()
    for record, result in zip(records, tries):
        record.update(accepted=result.accepted, note=result.note)
    summary = {"tries": records}
    if "steps" in judged:
        summary.update(reference=judged["steps"]["reference"], floor=judged["steps"]["floor"])
    if "direct" in judged:
        summary["direct"] = judged["direct"]
    _write_json(os.path.join(directory, "tries.json"), summary)
    if accepted is None:
        return None, f"stage {stage}: {tries[-1].note}"
    chosen = accepted.details
    reference, floor, reference_checkpoint = (
        judged["direct" if chosen["direct"] else "steps"][key]
        for key in ("reference", "floor", "reference_checkpoint"))
    log(f"stage {stage} kept after {len(tries)} tr{'y' if len(tries) == 1 else 'ies'}: "
        f"validation mIoU {chosen['val_miou_retrained']:.2f} >= {floor:.2f}")
    final = _described(model_config(config, *_stage_model(config, dict(chosen, stage=stage))))
    miou = _evaluate_test(config, final, directory, log, progress)
    return {"stage": stage, "model_def": chosen["model_def"], "mask": chosen["mask"],
            "checkpoint": chosen["checkpoint"], "parameters": chosen["parameters"],
            "macs": chosen["macs"], "test_miou": miou, "resource_percent": accepted.reached,
            "val_miou_start": chosen["val_miou_start"],
            "val_miou_pruned": chosen["allocations"][chosen["allocation"]],
            "val_miou_retrained": chosen["val_miou_retrained"], "tries": len(tries),
            "reference": reference, "reference_checkpoint": reference_checkpoint,
            "step_pct": accepted.step, "allocation": chosen["allocation"],
            "iterations": chosen["iterations"], "direct": chosen["direct"],
            "failed_tries": [{"step_pct": r["step_pct"], "allocation": r["allocation"],
                              "resource_pct": r.get("resource_pct"),
                              "val_miou_retrained": r.get("val_miou_retrained"),
                              "iterations": r["iterations"], "direct": r["direct"]}
                             for r in records if not r["accepted"]],
            "thresholds": {}, "removed_channels": chosen["removed_channels"],
            "candidates": candidates.evaluations,
            "candidates_per_s": round(candidates.evaluations / candidates.seconds, 2)
            if candidates.seconds else None}, None


def _judgement(config, reference, reference_checkpoint):
    return {"reference": reference, "floor": reference - config["tolerance"],
            "reference_checkpoint": reference_checkpoint}


def _direct_try(config, rows, directory, current, iterations, attempt, judged, log,
                progress):
    """Stage 1's direct try (docs/compress.md, "The direct try"): the whole
    way to the target in one step, retrained ``iterations`` steps and judged
    against a reference retrained as long (schedule.direct_try). Returns (the
    Attempt if kept, else None; [the Attempt]); its reference goes into
    judged["direct"]."""
    from netcompress.pruning_math.schedule import direct_try

    log(f"direct try: the whole way to the target ({current - config['target_percent']:g} "
        f"points) in one step, retrained {iterations} steps; if it falls below the "
        f"tolerance, the run steps toward the target")
    judged["direct"] = _judgement(config, *_reference(
        config, rows, directory, len(rows), log, progress, iterations=iterations,
        name="direct_reference"))
    return direct_try(current, config["target_percent"], judged["direct"]["floor"],
                      lambda step, goal: attempt(step, goal, iterations=iterations,
                                                 direct=True), log)


def _rank(config, model, rank_path, log, progress):
    from netcompress.jobs.rank import rank

    _set_step("rank")
    sums = rank(dict(model, test_data=config["train_data"]), progress=progress)
    sums.save(rank_path)
    log(f"ranked {sums.count} training examples -> {rank_path}")


def _search(config, model, model_def, rank_path, log, progress):
    import tensorflow as tf
    from tqdm import tqdm

    from netcompress.graphs.inference import GatedGraph
    from netcompress.formats.rankfile import load_normalised_scores
    from netcompress.pruning_math.search import max_evaluations, search

    _set_step("search")
    architecture = model_architecture(config["model"])
    scores = load_normalised_scores(rank_path, model_def,
                                    config["num_classes"], config["criterion"],
                                    config["normalisation"], architecture)
    groups = search_groups(config["search"], architecture,
                           streams=config.get("streams", False))
    gated = GatedGraph(model, config["val_data"])
    floor = config["miou_floor"] or None
    with tf.compat.v1.Session(graph=gated.graph) as session, \
            tqdm(total=max_evaluations(groups, config["search_steps"]), desc="search",
                 unit="cand", disable=not progress, dynamic_ncols=True) as bar:
        gated.restore(session, model["checkpoint"], model["model_def"])

        def evaluate(removed):
            matrix, _ = gated.evaluate(session, removed, config["num_classes"])
            return 100.0 * float(np.nan_to_num(matrix.mean_iou()))

        def advance(skipped):
            if skipped:
                bar.total -= skipped
                bar.refresh()
            else:
                bar.update(1)

        found = search(evaluate, scores, groups, config["budget"], floor,
                       config["search_steps"], config["min_channels"], config["round_to"],
                       advance)
    shown = ", ".join(f"{name} {value:.3f}" for name, value in found.thresholds.items())
    log(f"search: validation mIoU {found.start_miou:.2f} -> {found.miou:.2f} (goal >= "
        f"{found.goal:.2f}), {found.removed_count} channels; thresholds {shown}; "
        f"{found.evaluations} candidates, {found.per_second:.1f} candidates/s")
    return found, groups, scores


def _check_stream_scores(rank_path, scores, layers):
    missing = [layer for layer in layers if layer not in scores]
    if missing:
        raise UserError(f"rank file {rank_path} has no scores for {missing[0]} (written "
                        f"before residual streams were ranked): regenerate it")


def _search_record(found):
    return {"start_miou": found.start_miou, "goal": found.goal, "miou": found.miou,
            "thresholds": found.thresholds, "evaluations": found.evaluations,
            "seconds": round(found.seconds, 3), "candidates_per_s": round(found.per_second, 2),
            "removed": {layer: [int(i) for i in indices]
                        for layer, indices in found.removed.items()},
            "history": [list(entry) for entry in found.history]}


def _prune(config, model, model_def, masks, rank_path, groups, scores, found, directory,
           log):
    """Remove what the search chose through pruning.execute (staged, verified
    writes, as prun_model.py) from ``model`` (its model_def and masks read,
    its checkpoint restored by the stage's rank pass). Returns (the pruned
    model's paths, the plan)."""
    from models.model_def import check_masks
    from netcompress.pruning_math.plan import plan_pruning
    from netcompress.jobs.prune import PruneJob, execute, planned_files
    from netcompress.pruning_math.search import plan_scores

    _set_step("prune")
    pruned_dir = os.path.join(directory, "pruned")
    settings = prune_settings(config, model, rank_path, directory, threshold=1.0)
    outputs.check_outputs(*planned_files(settings))
    check_masks(model_def, masks, source=model["mask"] or "mask")
    layers, scaled_scores = plan_scores(scores, groups, found.thresholds)
    plan = plan_pruning(model_def, masks, config["num_classes"], scaled_scores, layers, 1.0,
                        config["min_channels"], config["round_to"],
                        model_architecture(config["model"]))
    planned = {cut.layer: list(cut.removed) for cut in plan.pruned_layers}
    searched = {layer: [int(i) for i in indices] for layer, indices in found.removed.items()}
    for layer, channels in plan.given_back.items():  # a conv3 emptied by its stream
        searched[layer] = [i for i in searched[layer] if i not in channels]
    searched = {layer: indices for layer, indices in searched.items() if indices}
    if planned != searched:
        raise RuntimeError("the pruning plan differs from the searched removal")
    lines = []
    execute(PruneJob(settings, model_def, masks, layers, plan=plan, source_verified=True,
                     **_described_as(config)),
            log=lines.append)
    _write_lines(os.path.join(directory, "prune.txt"), lines)
    mask = settings.mask_save if plan.masks_after else None
    log(f"pruned {found.removed_count} channels of {len(planned)} layers -> {pruned_dir}")
    return dict(model, model_def=settings.new_model_def, mask=mask,
                checkpoint=settings.new_checkpoint_save), plan


def _described_as(config):
    """What a stage's checkpoint description names besides its model_def and
    masks (netcompress/formats/description.py)."""
    return {"model_name": config["model"], "class_names": config_class_names(config)}


def prune_settings(config, model, rank_path, directory, threshold=None):
    """prun_model.py's settings for pruning ``model`` into directory/pruned/
    (``threshold`` None: the plan is an explicit removal)."""
    from netcompress.jobs.prune import PruneSettings

    pruned_dir = os.path.join(directory, "pruned")
    return PruneSettings(
        rank_file=rank_path, threshold=threshold, checkpoint_name=model["checkpoint"],
        new_checkpoint_save=os.path.join(pruned_dir, "model.ckpt"),
        mask_load=model["mask"], mask_save=os.path.join(pruned_dir, "mask.npy"),
        num_classes=config["num_classes"], height=config["height"], width=config["width"],
        model_def=model["model_def"], new_model_def=os.path.join(pruned_dir, "model_def.json"),
        criterion=config["criterion"], normalisation=config["normalisation"],
        min_channels=config["min_channels"], round_to=config["round_to"],
        gpu_id=config["gpu_id"])


def prune_removal(config, model, rank_path, removed, directory, log=None):
    """Remove exactly ``removed`` ({layer: indices}; round_to may give some
    back, as netcompress/pruning_math/schedule.py counted) through pruning.execute into
    directory/pruned/. Returns the pruned model's paths."""
    from models.model_def import load_masks, load_model_def

    pruned, _ = _prune_removal(config, model, rank_path, removed, directory, log,
                               load_model_def(model["model_def"]), load_masks(model["mask"]))
    return pruned


def _prune_removal(config, model, rank_path, removed, directory, log, model_def, masks,
                   source_verified=False):
    """prune_removal of ``model`` whose model_def and masks are read already;
    (the pruned model's paths, the plan). ``source_verified``: its checkpoint
    was restored strictly into this model (the stage's rank pass), so the
    pruning does not build its graph again to check it."""
    from netcompress.pruning_math.plan import plan_removal
    from netcompress.jobs.prune import PruneJob, execute, planned_files

    _set_step("prune")
    plan = plan_removal(model_def, masks, config["num_classes"], removed,
                        config.get("min_channels", 1), config.get("round_to", 1),
                        model_architecture(config["model"]))
    layers = [cut.layer for cut in plan.layers]
    settings = prune_settings(config, model, rank_path, directory)
    outputs.check_outputs(*planned_files(settings))
    lines = []
    execute(PruneJob(settings, model_def, masks, layers, plan=plan,
                     source_verified=source_verified, **_described_as(config)),
            log=lines.append)
    _write_lines(os.path.join(directory, "prune.txt"), lines)
    count = sum(len(cut.removed) for cut in plan.layers)
    if log is not None:
        log(f"pruned {count} channels of {len(plan.pruned_layers)} layers -> "
            f"{os.path.join(directory, 'pruned')}")
    return dict(model, model_def=settings.new_model_def,
                mask=settings.mask_save if plan.masks_after else None,
                checkpoint=settings.new_checkpoint_save), plan


def failed_retraining_steps(config, rows):
    """Retraining steps of the tries not kept: the failed tries of kept
    stages and the tries of a stage that failed (its tries.json). The
    reference's retraining, a control, is not counted."""
    failed = [t for row in rows[1:] for t in row.get("failed_tries") or []]
    stopped = os.path.join(config["run_dir"], f"stage{len(rows)}", "tries.json")
    if os.path.isfile(stopped):
        failed += _read_json(stopped)["tries"]
    # retrain_iterations is one of RUN_KEYS: every try without its own count used it.
    return sum(t.get("iterations") or config["retrain_iterations"]
               for t in failed if t.get("val_miou_retrained") is not None)


def retraining_steps(config, rows):
    """Every retraining step the stages ran: the kept tries and the tries not
    kept (the reference's retraining, a control, and the final retraining
    are not counted)."""
    kept = sum(row.get("iterations") or config["retrain_iterations"] for row in rows[1:])
    return kept + failed_retraining_steps(config, rows)


def final_tuning(config, rows, log=print, progress=True):
    """The last kept stage's model retrained ``final_iterations`` more steps
    (auto: as many as the tries not kept used, so that the final model has
    had as much retraining as the run spent in all) into run_dir/final/;
    validated and tested. Its record (run_dir/final/final.json, kept for a
    rerun that ends at the same stage with as many steps), or None."""
    from netcompress.formats.checkpoint_paths import resolve_checkpoint

    iterations = config["final_iterations"]
    if iterations == "auto":
        iterations = failed_retraining_steps(config, rows)
    directory = os.path.join(config["run_dir"], FINAL_DIR)
    path = os.path.join(directory, FINAL_FILE)
    last = rows[-1]
    if len(rows) < 2 or not iterations:
        if os.path.exists(directory):  # an earlier run's, for another model
            shutil.rmtree(directory)
        return None
    if os.path.isfile(path):
        done = _read_json(path)
        if done["stage"] == last["stage"] and done["iterations"] == iterations:
            log(f"final: stage {last['stage']}'s model retrained {iterations} more steps "
                f"(done: {done['checkpoint']})")
            return done
    if os.path.exists(directory):
        shutil.rmtree(directory)
    make_directory(directory)
    model_def, mask, checkpoint = _stage_model(config, last)
    # Written by this run: its checkpoint describes its model (not read again).
    model = _described(model_config(config, model_def, mask, resolve_checkpoint(checkpoint)))
    log(f"== final: stage {last['stage']}'s model retrained {iterations} more steps "
        f"(final_iterations {config['final_iterations']})")
    retrained = _retrain(config, model, directory, len(rows), log, progress,
                         iterations=iterations, step="final")
    final = dict(model, checkpoint=retrained)
    val = _validate(config, final, directory, log, progress, what="of the final model")
    miou = _evaluate_test(config, final, directory, log, progress)
    record = {"stage": last["stage"], "iterations": iterations,
              "model_def": last["model_def"], "mask": last["mask"],
              "checkpoint": _relative(config, retrained), "val_miou": val, "test_miou": miou}
    _write_json(path, record)
    return record


def retrain_config(config, pruned, directory, iterations=None):
    """The training config that retrains ``pruned`` into directory/retrain/
    (retrain_iterations steps unless ``iterations``); the train settings it
    does not set have their declared defaults."""
    iterations = iterations or config["retrain_iterations"]
    return dict(dict(setting_defaults("train"), **pruned), initialize=pruned["checkpoint"],
                checkpoint=os.path.join(directory, "retrain", "model.ckpt"),
                train_data=config["train_data"], max_iteration=iterations,
                save_step=iterations, learning_rate=config["learning_rate"],
                power=config["power"], flip=config["flip"], max_to_keep=1,
                end_learning_rate=min(1e-4, config["learning_rate"]))


def _retrain(config, pruned, directory, stage, log, progress, iterations=None,
             step="retrain"):
    """Train the pruned model retrain_iterations (or ``iterations``) steps;
    its checkpoint prefix."""
    from netcompress.jobs.train import train

    _set_step(step)
    _held.close()
    train_config = retrain_config(config, pruned, directory, iterations)
    seed = None if config["seed"] is None else config["seed"] + stage
    lines = []
    result = train(train_config, log=lines.append, seed=seed, progress=progress)
    losses = result["losses"]
    log(f"retrained {result['step']} steps (loss {losses[0]:.4f} -> {losses[-1]:.4f})"
        if losses else f"retrained: {lines[-1] if lines else ''}")
    return result["checkpoint"]


# ---- latency, table, CSV, plot ----------------------------------------------------

def measure_latency(config, rows, log=print, progress=True):
    """{stage: median ms} of one batch-1 inference on the CPU, every stage in
    this process."""
    from netcompress.formats.checkpoint_paths import resolve_checkpoint

    models = {}
    for row in rows:
        model_def, mask, checkpoint = _stage_model(config, row)
        models[row["stage"]] = model_config(config, model_def, mask,
                                            resolve_checkpoint(checkpoint))
    return latency_of(config, models, progress)


def latency_of(config, models, progress=True):
    """{key: median ms} of one batch-1 CPU inference of each of ``models``
    ({key: model config}), runs interleaved across models so that machine
    drift hits all alike."""
    import tensorflow as tf
    from tqdm import tqdm

    from netcompress.graphs.serving import ServingGraph

    step = current_step
    _set_step("latency")
    tf1 = tf.compat.v1
    image = np.random.default_rng(0).integers(
        0, 256, (1, config["height"], config["width"], 3), dtype=np.uint8)
    sessions, times = {}, {}
    try:
        for key, model in models.items():
            graph = ServingGraph(model)
            session = tf1.Session(graph=graph.graph,
                                  config=tf1.ConfigProto(device_count={"GPU": 0}))
            sessions[key] = (graph, session)
            graph.restore(session)
            for _ in range(2):  # warm-up
                session.run(graph.class_map, {graph.images: image})
            times[key] = []
        with tqdm(total=config["latency_runs"] * len(models), desc="latency", unit="run",
                  disable=not progress, dynamic_ncols=True) as bar:
            for _ in range(config["latency_runs"]):
                for key, (graph, session) in sessions.items():
                    started = time.perf_counter()
                    session.run(graph.class_map, {graph.images: image})
                    times[key].append(1000.0 * (time.perf_counter() - started))
                    bar.update(1)
    finally:
        for _, session in sessions.values():
            session.close()
        _set_step(step)
    return {key: statistics.median(values) for key, values in times.items()}


def layer_widths(config, rows):
    """(layers, original widths, kept widths of the last stage)."""
    from models.architecture import resolve_widths
    from models.model_def import load_model_def

    architecture = model_architecture(config["model"])
    layers = [g.name for g in architecture.prunable_groups(config.get("streams", False))]
    first = resolve_widths(load_model_def(_stage_model(config, rows[0])[0]),
                           config["num_classes"], architecture)
    last = resolve_widths(load_model_def(_stage_model(config, rows[-1])[0]),
                          config["num_classes"], architecture)
    return layers, [first[name] for name in layers], [last[name] for name in layers]



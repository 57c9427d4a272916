"""Loading and validating the settings of every script: the `key: value`
config files of train / evaluate / get_oracle_rank / predict / export /
compress, and prun_model.py's settings (its header constants, an optional
config file, the command line).

A config is parsed as YAML (``yaml.safe_load``, the original format, less
aliases, duplicate keys and YAML 1.1 octal or sexagesimal numbers), then
overrides from the command line are applied, then every key is checked. All
problems are reported as a one-line :class:`UserError` naming the key and the
offending value.

Relative paths in a config are left relative: they are resolved against the
current working directory of the process, as the original scripts did (not
against the directory of the config file). ``~`` is expanded.

Every kind's settings are declared once (SETTINGS): name, check, default
(REQUIRED: the key must be given) and --help text.
"""

import difflib
import math
import os
import re
from dataclasses import dataclass, replace

import yaml

from common.errors import UserError
from models.architecture import adapnet_pp
from netcompress.formats.checkpoint_paths import checkpoint_exists
from netcompress.pruning_math.criteria import CRITERIA
from netcompress.pruning_math.scores import NORMALISATIONS

# How dilated convs are computed (models/atrous.py; docs/atrous.md). The same
# names as models.atrous, repeated here because configs load before TensorFlow.
ATROUS_PATHS = ("auto", "native", "space_to_batch")

# Input sizes are multiples of the network's output stride (16). AdapNet++'s:
# each value is checked as the config loads, before TensorFlow, so before the
# class `model` names can be imported; its build checks its own stride.
INPUT_SIZE_MULTIPLE = adapnet_pp().output_stride
SIZE_RULE = f"a multiple of {INPUT_SIZE_MULTIPLE}"


# ---- every script's settings, declared once ----------------------------------
# A kind's settings give its keys, their checks, defaults and --help texts;
# prun_model.py's header constants and the README's settings lists are
# checked against them (tests/test_config.py).

REQUIRED = object()

# What must exist once every value is checked (_check_paths): a file or
# directory, a file, or a checkpoint (prefix or directory).
EXISTS_PATH, EXISTS_FILE, EXISTS_CHECKPOINT = "path", "file", "checkpoint"


@dataclass(frozen=True)
class Setting:
    name: str
    kind: str  # how a value is checked (_check_setting)
    default: object = REQUIRED
    help: str = ""
    choices: tuple = ()
    exists: str = None  # EXISTS_*: checked after every value (_check_paths)


def _changed(settings, **changes):
    """``settings`` with some fields changed ({name: {field: value}})."""
    return tuple(replace(setting, **changes.get(setting.name, {})) for setting in settings)


# The optional `classes` key of every kind: names for the per-class reports.
CLASSES_HELP = ("class names, `ID NAME` per line (the converter's .classes.txt), for "
                "per-class reports and legends (None = numbers only)")
GPU_HELP = "GPU(s) to use: an id, ids such as '0,1', -1 = none ('' = all GPUs / CPU only)"
REPLICATED_GPU_HELP = ("GPU(s) to use: an id, ids such as '0,1' (one replica each), -1 = "
                       "none ('' = all GPUs / CPU only)")

ATROUS_PATH_SETTING = Setting("atrous_path", "choice", "auto",
                              "how atrous convs are computed: auto, native or space_to_batch",
                              choices=ATROUS_PATHS)

MODEL_SETTING = Setting("model", "model_name", REQUIRED, "name of the model (AdapNet_pp: "
                        "models/AdapNet_pp.py, class AdapNet_pp)")
CLASSES_SETTING = Setting("classes", "optional_path", None, CLASSES_HELP, exists=EXISTS_FILE)

# evaluate.py's settings; the other kinds that read a checkpoint start from them.
EVALUATE_SETTINGS = (
    Setting("gpu_id", "gpu_id", "", GPU_HELP),
    MODEL_SETTING,
    Setting("num_classes", "num_classes", None,
            "number of classes including void (None: the checkpoint's; needed only for a "
            "checkpoint that does not describe its model)"),
    Setting("checkpoint", "path", REQUIRED,
            "the checkpoint to evaluate (a prefix, or a directory: its newest checkpoint)",
            exists=EXISTS_CHECKPOINT),
    Setting("test_data", "path", REQUIRED, "the test .tfrecords", exists=EXISTS_PATH),
    Setting("batch_size", "positive_int", REQUIRED, "batch size"),
    Setting("skip_step", "positive_int", REQUIRED, "batches between progress reports"),
    Setting("height", "size", REQUIRED, f"height of the input image ({SIZE_RULE})"),
    Setting("width", "size", REQUIRED, f"width of the input image ({SIZE_RULE})"),
    Setting("mask", "optional_path", None,
            "mask file of the residual units (None: the checkpoint's, or no mask)",
            exists=EXISTS_FILE),
    Setting("model_def", "optional_path", None,
            "the model definition (None: the one the checkpoint describes; required for "
            "checkpoints without a description)", exists=EXISTS_PATH),
    ATROUS_PATH_SETTING,
    CLASSES_SETTING,
)

REPLICAS_HELP = ("replicas on CPU devices (None: one per GPU listed in gpu_id, else 1); "
                 "the batch splits evenly")

ORACLE_RANK_SETTINGS = _changed(
    EVALUATE_SETTINGS,
    gpu_id={"help": REPLICATED_GPU_HELP},
    checkpoint={"help": "the checkpoint to rank (a prefix, or a directory: its newest)"},
    test_data={"help": "the records the ranks are summed over"},
) + (
    Setting("rank_save", "path", REQUIRED, "where the rank file goes"),
    # Held-out records for --compare (never the test records).
    Setting("val_data", "optional_path", None,
            "held-out validation records for --compare (None = none)", exists=EXISTS_FILE),
    Setting("replicas", "replicas", None, REPLICAS_HELP),
)

TRAIN_SETTINGS = (
    Setting("gpu_id", "gpu_id", "", REPLICATED_GPU_HELP),
    MODEL_SETTING,
    Setting("num_classes", "num_classes", None,
            "number of classes including void (label id 0); None when resuming or with "
            "a described intialize (its count)"),
    Setting("initialize", "optional_path", None,
            "checkpoint to initialise from, by variable name (None = train from scratch; "
            "the original spells it intialize)", exists=EXISTS_CHECKPOINT),
    Setting("checkpoint", "path", REQUIRED,
            "where to save the model: a directory (created if needed), or a prefix named "
            "like runs/x/model.ckpt"),
    Setting("train_data", "path", REQUIRED, "the training .tfrecords", exists=EXISTS_PATH),
    Setting("batch_size", "positive_int", REQUIRED,
            "training batch size (the global batch, split over the replicas)"),
    Setting("skip_step", "positive_int", REQUIRED, "steps between loss reports"),
    Setting("height", "size", REQUIRED, f"height of the input image ({SIZE_RULE})"),
    Setting("width", "size", REQUIRED, f"width of the input image ({SIZE_RULE})"),
    Setting("max_iteration", "positive_int", REQUIRED, "how many steps to train"),
    Setting("learning_rate", "positive_float", REQUIRED, "initial learning rate"),
    Setting("save_step", "positive_int", REQUIRED, "steps between checkpoints"),
    Setting("power", "positive_float", REQUIRED,
            "power of the polynomial learning-rate decay"),
    Setting("mask", "optional_path", None,
            "mask file of the residual units (None: none, or the checkpoint's)",
            exists=EXISTS_FILE),
    Setting("model_def", "optional_path", None,
            "the model definition (None when resuming, or when intialize describes its "
            "model: that checkpoint's)", exists=EXISTS_PATH),
    ATROUS_PATH_SETTING,
    Setting("replicas", "replicas", None, REPLICAS_HELP),
    CLASSES_SETTING,
    Setting("flip", "typed", False, "random horizontal flips (the original had none)"),
    Setting("end_learning_rate", "typed", 1e-4,
            "where the polynomial decay ends (the original's 1e-4)"),
    Setting("max_to_keep", "typed", 3,
            "how many of the newest checkpoints are kept (the original kept 1000)"),
    Setting("write_graph", "typed", False,
            "also write the graph to the TensorBoard events file (large)"),
    Setting("worker_timeout", "typed", 600.0,
            "seconds to wait for the other workers TF_CONFIG lists"),
)

# predict.py and export.py read an evaluation config; the keys they do not
# read are accepted, unchecked, so that one config serves all three.
UNUSED = {"kind": "unused", "default": None}
PREDICT_SETTINGS = _changed(
    EVALUATE_SETTINGS,
    checkpoint={"help": "the checkpoint to predict with (a prefix, or a directory: its "
                        "newest)"},
    test_data=dict(UNUSED, help="not read by predict.py (--input gives the images)",
                   exists=None),
    skip_step=dict(UNUSED, help="not read by predict.py"),
    height={"help": f"height the images are resized to ({SIZE_RULE})"},
    width={"help": f"width the images are resized to ({SIZE_RULE})"},
)
EXPORT_SETTINGS = _changed(
    EVALUATE_SETTINGS,
    checkpoint={"help": "the checkpoint to export (a prefix, or a directory: its newest)"},
    test_data={"help": "records whose first --check_images images check every file "
                       "(and --int8's mIoU)"},
    skip_step=dict(UNUSED, help="not read by export.py"),
    height={"help": f"input height of the exported model ({SIZE_RULE})"},
    width={"help": f"input width of the exported model ({SIZE_RULE})"},
)

# prun_model.py's settings (its header constants).
PRUNE_SETTINGS = (
    Setting("decide_threshold", "bool", False,
            "true: only print how many channels of the selection score below 0.1, 0.2, "
            "... and write histogram_save"),
    Setting("phase", "text", "all",
            "what to prune: conv1, block1 .. block4, a unit (block3/unit_4), easpp, "
            "upsample1 (conv41), upsample2 (conv16), decoder_conv1 (conv89, conv96), "
            "decoder_conv2 (conv88, conv95), or all"),
    Setting("all_convs", "bool", True, "true: every prunable layer of the phase"),
    Setting("streams", "bool", False,
            "true: the residual streams of the phase too (block1/residual ... "
            "block4/residual: all four in phase all, the block's in a block phase); "
            "conv_name may then name one (residual in a block phase)"),
    Setting("conv_name", "optional_text", None,
            "the layer within the phase when all_convs is false: conv1, conv2, conv3, "
            "conv2/A, conv2/B in a block or unit; an eASPP conv; conv1/conv2 of a decoder "
            "pair; or a full layer name"),
    Setting("rank_file", "path", REQUIRED,
            "the rank file written by get_oracle_rank.py (header: save_nvidia_name)"),
    Setting("threshold", "threshold", REQUIRED,
            "remove channels whose normalised score is below it (a finite number >= 0)"),
    Setting("checkpoint_name", "path", REQUIRED,
            "the checkpoint to prune (a prefix, or a directory: its newest); never modified"),
    Setting("gpu_id", "gpu_id", "", "GPU to use ('' = all GPUs / CPU only)"),
    Setting("try_zeros", "bool", False,
            "true: write a checkpoint of the same shapes with the channels zeroed where "
            "they are read, to evaluate a threshold"),
    Setting("new_checkpoint_save", "path", REQUIRED,
            "where the new checkpoint goes (another directory than checkpoint_name)"),
    Setting("mask_load", "optional_path", None,
            "the current mask file (None: the checkpoint's, or no mask)"),
    Setting("mask_save", "optional_path", None,
            "where the new mask file goes (written when the pruned model has masks)"),
    Setting("num_classes", "num_classes", None,
            "number of classes, void included (header: Num_classes; None: the "
            "checkpoint's)"),
    Setting("height", "size", REQUIRED, "input height, for the FLOPs report and graph checks"),
    Setting("width", "size", REQUIRED, "input width, for the FLOPs report and graph checks"),
    Setting("model_def", "optional_path", None,
            "the current model definition (None: the one the checkpoint describes; "
            "required for checkpoints without a description)"),
    Setting("new_model_def", "path", REQUIRED, "where the pruned model definition goes"),
    Setting("criterion", "choice", "taylor_out",
            "how ranks become scores: " + ", ".join(CRITERIA) + " (docs/ranking.md; "
            "get_oracle_rank.py --compare judges them on your model)",
            choices=tuple(CRITERIA)),
    Setting("normalisation", "choice", "max",
            "max (divide by the layer maximum) or l2 (by the layer's l2 norm)",
            choices=tuple(NORMALISATIONS)),
    Setting("min_channels", "positive_int", 1, "a layer keeps at least this many channels"),
    Setting("round_to", "positive_int", 1,
            "round kept counts up to a multiple of this (e.g. 8); 1 = no rounding"),
    Setting("histogram_save", "optional_path", None,
            "the decide_threshold histogram PNG (None = none)"),
    Setting("classes", "optional_path", None, CLASSES_HELP),
)

PRUNE_DEFAULT_CRITERION = next(s.default for s in PRUNE_SETTINGS if s.name == "criterion")
SEARCH_MODES = ("section", "all")  # netcompress/pruning_math/search.py
AFTER_RETRAINING = "after_retraining"  # compress.py's default rule
STAGE_RULES = (AFTER_RETRAINING, "budget_before_retraining")  # netcompress/jobs/compress.py
TARGET_RESOURCES = ("parameters", "macs", "latency")  # netcompress/pruning_math/schedule.py

# compress.py's settings (docs/compress.md).
COMPRESS_SETTINGS = (
    Setting("gpu_id", "gpu_id", "", "GPU to use ('' = all GPUs / CPU only)"),
    Setting("model", "text", "AdapNet_pp", "name of the model (models/AdapNet_pp.py)"),
    Setting("num_classes", "num_classes", None,
            "number of classes, void included (None: the checkpoint's)"),
    Setting("model_def", "optional_path", None,
            "the model definition of the model to compress (None: the one the checkpoint "
            "describes; required for checkpoints without a description)"),
    Setting("mask", "optional_path", None,
            "its residual mask file (None: the checkpoint's, or no mask)"),
    Setting("checkpoint", "path", REQUIRED,
            "the trained model to compress (a prefix, or a directory: its newest)"),
    Setting("train_data", "path", REQUIRED, "training records: ranking and retraining"),
    Setting("val_data", "path", REQUIRED,
            "held-out validation records: the threshold search (never the test records)"),
    Setting("test_data", "path", REQUIRED,
            "test records: read only to evaluate each finished stage"),
    Setting("batch_size", "positive_int", 8, "batch size of every pass"),
    Setting("skip_step", "positive_int", 10, "steps between loss reports while retraining"),
    Setting("height", "size", REQUIRED, f"input height ({SIZE_RULE})"),
    Setting("width", "size", REQUIRED, f"input width ({SIZE_RULE})"),
    ATROUS_PATH_SETTING,
    Setting("run_dir", "path", REQUIRED,
            "where every stage's files go (new, empty, or an earlier run to resume)"),
    Setting("stages", "positive_int", 3, "stop after this many stages"),
    Setting("retrain_iterations", "positive_int", 300, "training steps after each pruning"),
    Setting("learning_rate", "threshold", 0.001, "initial learning rate of the retraining"),
    Setting("power", "threshold", 0.9, "power of the polynomial learning-rate decay"),
    Setting("flip", "bool", False, "random horizontal flips while retraining"),
    Setting("final_iterations", "auto_count", "auto",
            "after the stages, the last kept stage's model is retrained this many more "
            "steps into run_dir/final/ (auto: as many as the tries not kept retrained, so "
            "that the final model has been retrained as long as the run retrained in all; "
            "0: none)"),
    Setting("seed", "optional_text", None,
            "an integer: seeded retraining (stage N uses seed + N); None = unseeded"),
    Setting("criterion", "choice", PRUNE_DEFAULT_CRITERION,
            "how ranks become scores: " + ", ".join(CRITERIA), choices=tuple(CRITERIA)),
    Setting("normalisation", "choice", "max",
            "max (divide by the layer maximum) or l2", choices=tuple(NORMALISATIONS)),
    Setting("streams", "bool", False,
            "true: the residual streams (block1/residual .. block4/residual) are "
            "prunable layers too, with each block's section; after_retraining then "
            "chooses between the convs alone and the convs with the streams, and "
            "redoes a failed step with the other first; false: as before"),
    Setting("stage_rule", "choice", "after_retraining",
            "after_retraining: each stage removes a step toward the target and is kept "
            "if its validation mIoU after retraining stays within tolerance of the "
            "reference (else redone with half the step); budget_before_retraining: "
            "threshold search within `budget` before retraining (the original's manual "
            "procedure)", choices=STAGE_RULES),
    Setting("target", "choice", "parameters",
            "the resource to reduce: parameters, macs (inference) or latency (measured; "
            "its steps are sized in MACs)", choices=TARGET_RESOURCES),
    Setting("target_percent", "threshold", 50.0,
            "stop once the target resource is at this percentage of the given model"),
    Setting("tolerance", "threshold", 1.0,
            "after_retraining: validation mIoU points a stage may end below the reference"),
    Setting("reference", "choice", "given",
            "after_retraining: given (the given model's validation mIoU) or retrained "
            "(the given model retrained alongside, as many steps as each stage's model "
            "has had: fairer to a model that was not converged)",
            choices=("given", "retrained")),
    Setting("step_percent", "threshold", 20.0,
            "after_retraining: percentage points of the given model's resource the first "
            "stage removes; a later stage starts from the last step kept"),
    Setting("min_step_percent", "threshold", 2.5,
            "after_retraining: a stage that fails at a smaller step than this stops the run"),
    Setting("direct_iterations", "auto_count", "auto",
            "after_retraining: stage 1 first tries the whole way to the target in one "
            "step, retrained this many steps, and is kept if it stays within tolerance; "
            "else the run steps toward the target as usual (auto: retrain_iterations "
            "times the stages step_percent needs to reach the target, at most `stages`; "
            "0: no direct try)"),
    Setting("search", "choice", "section",
            "budget_before_retraining: a threshold per section (conv1, block1..block4, "
            "easpp, decoder), or all: one threshold for every layer", choices=SEARCH_MODES),
    Setting("budget", "threshold", 1.0,
            "budget_before_retraining: mIoU points (validation) a stage may lose before "
            "retraining"),
    Setting("search_steps", "positive_int", 6,
            "budget_before_retraining: bisection steps per threshold (resolution "
            "2^-steps)"),
    Setting("miou_floor", "threshold", 0.0,
            "budget_before_retraining: validation mIoU no pruning may go below; the run "
            "stops when no channel can go without (0 = none)"),
    Setting("min_channels", "positive_int", 1, "a layer keeps at least this many channels"),
    Setting("round_to", "positive_int", 1, "round kept counts up to a multiple of this"),
    Setting("latency_runs", "positive_int", 5,
            "CPU latency: the median of this many runs (batch 1) per stage"),
    Setting("classes", "optional_path", None, CLASSES_HELP),
)

SETTINGS = {
    "train": TRAIN_SETTINGS,
    "evaluate": EVALUATE_SETTINGS,
    "oracle_rank": ORACLE_RANK_SETTINGS,
    "predict": PREDICT_SETTINGS,
    "export": EXPORT_SETTINGS,
    "prune": PRUNE_SETTINGS,
    "compress": COMPRESS_SETTINGS,
}

# Alternative spellings accepted in a config -> the key used in the result.
KEY_ALIASES = {kind: {} for kind in SETTINGS}
# The original README spells it 'intialize'; both spellings mean the same.
KEY_ALIASES["train"] = {"intialize": "initialize", "initialize": "initialize"}
# The original script's names, still accepted (header constants and flags).
KEY_ALIASES["prune"] = {"Num_classes": "num_classes", "save_nvidia_name": "rank_file"}


def setting_defaults(kind):
    """{name: default} of the settings of ``kind`` that have one."""
    return {setting.name: setting.default for setting in _settings_of(kind)
            if setting.default is not REQUIRED}


# Strings that mean "no value" for optional paths: YAML turns `None` into the
# string 'None' (only null/~/empty are YAML nulls), and the original configs
# wrote `mask: None`.
NONE_STRINGS = ("", "none", "null", "~")


def accepted_keys(kind):
    """All key spellings a config of `kind` may contain (aliases included)."""
    keys = [setting.name for setting in _settings_of(kind)]
    keys.extend(k for k in KEY_ALIASES[kind] if k not in keys)
    return keys


def _settings_of(kind):
    if kind not in SETTINGS:
        raise ValueError("unknown config kind %r (expected one of %s)"
                         % (kind, ", ".join(SETTINGS)))
    return SETTINGS[kind]


def apply_gpu_id(gpu_id):
    """Make only `gpu_id` visible to TensorFlow; ''/None keeps the current
    environment (all GPUs, or CPU when there are none)."""
    if gpu_id is None or gpu_id == "":
        return
    os.environ["CUDA_VISIBLE_DEVICES"] = str(gpu_id)


def parse_overrides(overrides):
    """['key=value', ...] -> [(key, value)], values parsed as YAML scalars."""
    parsed = []
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise UserError("override %s is not of the form key=value" % _show(item))
        try:
            value = yaml.load(text, StrictLoader) if text.strip() else None
        except ConfigSyntaxError as exc:
            raise UserError("override %s: %s" % (_show(item), exc.message)) from None
        except yaml.YAMLError:
            # e.g. 'a: b' or '[1' - not a scalar; keep the text as written.
            value = text
        parsed.append((key, value))
    return parsed


# ---- strict YAML -------------------------------------------------------------
# A config is a short list of `key: value` lines. YAML features that make such
# a file mean something else than it shows are refused (docs/errors.md):
# aliases (an alias bomb grows without bound), duplicate keys (the last one
# silently won), YAML 1.1 octal (`010` is 8) and sexagesimal (`1:30` is 90)
# numbers.

# Longest value or key text a message repeats (docs/errors.md).
SHOWN_LENGTH = 80
# A missing file's path is shown whole up to the longest path Linux takes.
PATH_SHOWN_LENGTH = 4096

_OCTAL = re.compile(r"[-+]?0[0-7_]+$")


class ConfigSyntaxError(yaml.YAMLError):
    """A refused YAML construct: ``message`` and the 1-based ``line``."""

    def __init__(self, message, mark):
        super().__init__(message)
        self.message = message
        self.line = mark.line + 1 if mark is not None else None


def _number_problem(node):
    """Why an int/float scalar reads as another number than it shows, or None."""
    if not isinstance(node, yaml.ScalarNode) or node.tag not in (
            "tag:yaml.org,2002:int", "tag:yaml.org,2002:float"):
        return None
    text = node.value.strip()
    if ":" in text:
        return "a YAML 1.1 sexagesimal (base 60) number"
    if node.tag == "tag:yaml.org,2002:int" and _OCTAL.match(text) and text.strip("-+0_"):
        return "a YAML 1.1 octal number (%d)" % int(text.replace("_", ""), 8)
    return None


class StrictLoader(yaml.SafeLoader):
    """yaml.SafeLoader without aliases, duplicate keys and octal or
    sexagesimal numbers (ConfigSyntaxError)."""

    def compose_node(self, parent, index):
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None):
            raise ConfigSyntaxError("YAML anchors and aliases (&name, *name) are not "
                                    "accepted in a config; write each value out",
                                    event.start_mark)
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, value_node in node.value:
            key = self.construct_object(key_node, deep=True)
            shown = _show(key)
            try:
                first = seen.setdefault(key, key_node.start_mark.line + 1)
            except TypeError:  # unhashable: SafeLoader's own message follows
                break
            if first != key_node.start_mark.line + 1:
                raise ConfigSyntaxError("key %s is given twice (first at line %d); give "
                                        "it once" % (shown, first), key_node.start_mark)
            problem = _number_problem(value_node)
            if problem:
                raise ConfigSyntaxError("key %s: %s is %s; write the number in decimal, or "
                                        "quote it for text" % (shown, _elide(value_node.value),
                                                                problem),
                                        value_node.start_mark)
        return super().construct_mapping(node, deep=deep)

    @staticmethod
    def _check_number(node):
        problem = _number_problem(node)
        if problem:
            raise ConfigSyntaxError("%s is %s; write the number in decimal, or quote it for "
                                    "text" % (_elide(node.value), problem), node.start_mark)

    def construct_yaml_int(self, node):
        self._check_number(node)
        return super().construct_yaml_int(node)

    def construct_yaml_float(self, node):
        self._check_number(node)
        return super().construct_yaml_float(node)


StrictLoader.add_constructor("tag:yaml.org,2002:int", StrictLoader.construct_yaml_int)
StrictLoader.add_constructor("tag:yaml.org,2002:float", StrictLoader.construct_yaml_float)


def _elide(text, limit=SHOWN_LENGTH):
    """``text`` cut to about ``limit`` characters, saying how long it was."""
    text = str(text)
    if len(text) <= limit:
        return text
    return "%s... (%d characters)" % (text[:limit], len(text))


def load_config(path, kind, overrides=(), defaults=None):
    """Read, override and validate a config of `kind` (a key of SETTINGS:
    'train', 'evaluate', 'oracle_rank', 'predict', 'export', 'prune',
    'compress').

    `overrides`: 'key=value' strings applied after the file, in order.
    `defaults`: (values, source name) read before the file, e.g. a script's
    header constants; `path` may then be None.
    Returns a new dict with every setting of the kind present (left out:
    its declared default) and values normalised, under the settings' names
    (the training key 'intialize' is returned as 'initialize').
    """
    settings = _settings_of(kind)
    # Layers of (key as written, value, where it came from); a later layer
    # replaces an earlier one's values.
    layers = []
    if defaults is not None:
        values, source = defaults
        layers.append([(str(key), value, source) for key, value in values.items()])
    if path is not None:
        layers.append([(str(key), value, path) for key, value in _read_mapping(path).items()])
    path = path or (defaults[1] if defaults else "settings")
    layers.append([(key, value, "override %s=%s" % (_elide(key), _show(value)))
                   for key, value in parse_overrides(overrides)])

    allowed = accepted_keys(kind)
    for key, value, source in (entry for layer in layers for entry in layer):
        if key not in allowed:
            close = difflib.get_close_matches(key, allowed, n=1)
            hint = "; did you mean %r?" % close[0] if close else ""
            raise UserError("%s: unknown key %s (value %s) for a %s config%s"
                            % (source, _show(key), _show(value), kind, hint))

    config = {}
    for layer in layers:
        config.update(_resolve_aliases(layer, kind))
    result = {}
    for setting in settings:
        if setting.name in config:
            value, source = config[setting.name]
            result[setting.name] = _check_setting(setting, value, source)
        elif setting.default is REQUIRED:
            raise UserError("%s: missing required key %r" % (path, setting.name))
        else:
            result[setting.name] = setting.default

    sources = {k: s for k, (_, s) in config.items()}
    _check_paths(result, settings, sources, path)
    if any(setting.kind == "replicas" for setting in settings):
        result["replicas"] = replica_count(result, sources.get("replicas") or
                                           sources.get("gpu_id") or path)
    return result


def listed_gpus(gpu_id):
    """The GPU ids a normalised gpu_id lists ('' and -1 list none)."""
    return [] if gpu_id in ("", "-1") else gpu_id.split(",")


def replica_count(config, source):
    """How many replicas a config's step runs: one per GPU of a gpu_id list,
    else ``replicas`` (CPU devices), else 1; the batch splits evenly."""
    gpus, wanted = listed_gpus(config["gpu_id"]), config["replicas"]
    if len(gpus) > 1:
        if wanted is not None and wanted != len(gpus):
            raise UserError("%s: replicas: %d but gpu_id %r lists %d GPUs (one replica "
                            "per GPU): drop replicas or make them agree"
                            % (source, wanted, config["gpu_id"], len(gpus)))
        count = len(gpus)
    else:
        count = wanted or 1
        if count > 1 and gpus:
            raise UserError("%s: replicas: %d but gpu_id %r names one GPU: list one GPU "
                            "per replica (e.g. '0,1'), or set gpu_id: -1 for replicas on "
                            "CPU devices" % (source, count, config["gpu_id"]))
    if count > 1 and len(gpus) <= 1:
        # CPU replicas share the cores; far more of them only builds a huge
        # graph for minutes (docs/distribute.md).
        cores = _cpu_cores()
        if count > CPU_REPLICAS_PER_CORE * cores:
            raise UserError("%s: replicas: %d on CPU devices, but this machine has %d CPU "
                            "core(s): at most %d (%d per core; CPU replicas share the cores)"
                            % (source, count, cores, CPU_REPLICAS_PER_CORE * cores,
                               CPU_REPLICAS_PER_CORE))
    if config["batch_size"] % count:
        raise UserError("%s: batch_size %d (the global batch) must be a multiple of the "
                        "%d replicas" % (source, config["batch_size"], count))
    return count


# Most CPU-device replicas per core (docs/distribute.md).
CPU_REPLICAS_PER_CORE = 4


def _cpu_cores():
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _read_mapping(path):
    if not os.path.isfile(path):
        raise UserError("config file %r not found" % path)
    try:
        with open(path, encoding="utf-8") as handle:
            data = yaml.load(handle, StrictLoader)
    except ConfigSyntaxError as exc:
        where = "line %d: " % exc.line if exc.line else ""
        raise UserError("%s: %s%s" % (path, where, exc.message)) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = " at line %d" % (mark.line + 1) if mark is not None else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise UserError("%s: not a valid `key: value` config (%s%s)"
                        % (path, problem, where)) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError("cannot read config file %r: %s" % (path, exc)) from None
    if data is None:
        raise UserError("%s: config file is empty" % path)
    if not isinstance(data, dict):
        raise UserError("%s: config must be `key: value` lines, got a %s"
                        % (path, type(data).__name__))
    return data


def _resolve_aliases(layer, kind):
    """One layer's {key: (value, source)} under the keys' main spellings; two
    spellings of one setting in the same layer are refused."""
    aliases = KEY_ALIASES[kind]
    resolved = {}
    spelled = {}
    for key, value, source in layer:
        target = aliases.get(key, key)
        if target in resolved and spelled[target] != key:
            raise UserError("%s: %r and %r are the same setting; give only one"
                            % (source, spelled[target], key))
        resolved[target] = (value, source)
        spelled[target] = key
    return resolved


def _show(value, limit=SHOWN_LENGTH):
    """A value as the user would have written it, for messages (elided past
    ``limit`` characters)."""
    if isinstance(value, str):
        if len(value) > limit:
            return "%r... (%d characters)" % (value[:limit], len(value))
        return repr(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    return _elide(value)


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def _is_none(value):
    return value is None or (isinstance(value, str) and value.strip().lower() in NONE_STRINGS)


def _check_setting(setting, value, source):
    """A setting's checked, normalised value; a one-line UserError naming the
    setting and the value otherwise."""
    name, kind = setting.name, setting.kind

    def fail(expected):
        raise UserError("%s: %r must be %s, got %s" % (source, name, expected, _show(value)))

    if kind == "gpu_id":
        # Becomes CUDA_VISIBLE_DEVICES: anything else there silently hides
        # every GPU (or picks the wrong ones) instead of failing.
        expected = "'' (all GPUs / CPU), a GPU id such as 0, ids such as '0,1', or -1 (no GPU)"
        if value is None:
            return ""
        if _is_int(value):
            if value < -1:
                fail(expected)
            return str(value)
        if not isinstance(value, str):
            fail(expected)
        text = value.strip()
        if text.lower() in NONE_STRINGS:
            return ""
        ids = [part.strip() for part in text.split(",")]
        if ids == ["-1"]:
            return "-1"
        if not all(part.isascii() and part.isdigit() for part in ids):
            fail(expected)
        return ",".join(str(int(part)) for part in ids)
    if kind == "bool":
        if not isinstance(value, bool):
            fail("true or false")
        return value
    if kind in ("threshold", "positive_float"):
        # YAML 1.1 reads `1e-4` (no dot) as a string; accept what float() reads.
        expected = "a finite number >= 0" if kind == "threshold" else "a positive number"
        number = value
        if isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                fail(expected)
        if isinstance(number, bool) or not isinstance(number, (int, float)) \
                or not math.isfinite(number) or number < 0 \
                or (kind == "positive_float" and number == 0):
            fail(expected)
        return float(number)
    if kind in ("positive_int", "size"):
        if not _is_int(value) or value < 1:
            fail("a positive integer")
        if kind == "size" and value % INPUT_SIZE_MULTIPLE:
            fail(SIZE_RULE)
        return value
    if kind == "auto_count":
        if isinstance(value, str) and value.strip().lower() == "auto":
            return "auto"
        if not _is_int(value) or value < 0:
            fail("auto or an integer >= 0")
        return value
    if kind == "replicas":
        if _is_none(value):
            return None
        if not _is_int(value) or value < 1:
            fail("a positive integer (replicas on CPU devices) or None")
        return value
    if kind == "num_classes":
        if not _is_int(value) or value < 2:
            fail("an integer >= 2 (classes including void)")
        return value
    if kind == "choice":
        if value not in setting.choices:
            fail("one of " + ", ".join(setting.choices))
        return value
    if kind == "model_name":
        if not isinstance(value, str) or not value.strip():
            fail("a model name such as 'AdapNet_pp.AdapNet_pp'")
        return value.strip()
    if kind in ("text", "optional_text"):
        if _is_none(value):
            if kind == "text":
                fail("given")
            return None
        if isinstance(value, bool):
            fail("a name")
        return str(value).strip()
    if kind == "optional_path":
        if _is_none(value):
            return None
        if not isinstance(value, str):
            fail("a path or None")
        return os.path.expanduser(value.strip())
    if kind == "path":
        if not isinstance(value, str) or not value.strip():
            fail("a path")
        return os.path.expanduser(value.strip())
    if kind == "typed":
        return _check_typed(setting, value, source)
    if kind == "unused":
        return value
    raise ValueError("setting %r: unknown kind %r" % (name, kind))


def _check_typed(setting, value, source):
    """A value of the default's type (ints and float text taken as floats)."""
    expected = type(setting.default)
    if expected is float and _is_int(value):
        return float(value)
    if expected is float and isinstance(value, str):
        # YAML 1.1 reads `1e-6` (no dot) as text, as for positive_float.
        try:
            return float(value)
        except ValueError:
            pass
    if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
        raise UserError("%s: %r must be of type %s (like the default %s), got %s"
                        % (source, setting.name, expected.__name__, _show(setting.default),
                           _show(value)))
    return value


def _check_paths(config, settings, sources, config_path):
    """Inputs must exist now rather than fail deep inside TensorFlow later
    (after every value is checked: a wrong value is reported first)."""
    def source(key):
        return sources.get(key, config_path)

    def checked(exists):
        return [(s.name, config[s.name]) for s in settings
                if s.exists == exists and config[s.name] is not None]

    for key, path in checked(EXISTS_PATH):
        if not os.path.exists(path):
            raise UserError("%s: %r file %s does not exist (relative paths are "
                            "taken from the current directory %s)"
                            % (source(key), key, _show(path, PATH_SHOWN_LENGTH), os.getcwd()))
    for key, path in checked(EXISTS_FILE):
        if not os.path.isfile(path):
            raise UserError("%s: %r file %s does not exist (use None for none)"
                            % (source(key), key, _show(path, PATH_SHOWN_LENGTH)))
    for key, prefix in checked(EXISTS_CHECKPOINT):
        if not checkpoint_exists(prefix):
            raise UserError("%s: %r checkpoint %s not found (expected %s.index, "
                            "or a directory with a 'checkpoint' file)"
                            % (source(key), key, _show(prefix, PATH_SHOWN_LENGTH),
                               _elide(prefix, PATH_SHOWN_LENGTH)))

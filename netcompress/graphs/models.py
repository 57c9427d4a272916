"""Config -> model instance (the `model`, `model_def`, `mask` keys)."""

import importlib
import inspect
import re

from common.errors import UserError
from netcompress.formats.description import checkpoint_model, files_model

# `Module` or `Module.Class`: a file models/Module.py and a class in it.
_MODEL_NAME = re.compile(r"[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)?")


def model_class(name):
    """`AdapNet_pp` -> models.AdapNet_pp.AdapNet_pp; `module.Class` -> models.module.Class."""
    if not isinstance(name, str) or not _MODEL_NAME.fullmatch(name):
        raise UserError(f"model {name!r} is not a model name: give Module or Module.Class "
                        f"(letters, digits and underscores), e.g. AdapNet_pp")
    module_name, _, class_name = name.rpartition(".")
    module_name = module_name or class_name
    try:
        module = importlib.import_module(f"models.{module_name}")
    except ModuleNotFoundError as exc:
        if exc.name not in (f"models.{module_name}", "models"):
            raise  # the module exists but imports something missing: a bug there
        raise UserError(f"model {name!r}: no module models/{module_name}.py") from None
    found = getattr(module, class_name, None)
    # A module attribute that is not a model class (e.g. AdapNet_pp.tf, the
    # TensorFlow module it imports) would fail later with a traceback.
    if not inspect.isclass(found) or not callable(getattr(found, "build", None)):
        raise UserError(f"model {name!r}: models/{module_name}.py has no model class "
                        f"{class_name}")
    return found


def model_architecture(name):
    """The declaration (models/architecture.py) of the class model ``name``
    gives: what pruning, ranking and costs read instead of assuming AdapNet++."""
    return model_class(name).architecture


# Most parameters a model_def may have: 1e9 float32 weights are 4 GB, 16 GB
# with their gradients and Adam's two slots (the default model has 30 M).
# Checked before building: TensorFlow would allocate for minutes, or die.
MAX_PARAMETERS = 10 ** 9


def check_model_size(model_def, num_classes, source, architecture):
    """A UserError when ``model_def`` has more than MAX_PARAMETERS parameters
    (counted from ``architecture``, the model's declaration, nothing built)."""
    from netcompress.pruning_math.costs import total_parameters

    count = total_parameters(model_def, num_classes, architecture)
    if count > MAX_PARAMETERS:
        raise UserError(f"{source}: {count:,} parameters ({4 * count / 2**30:,.1f} GiB of "
                        f"float32 weights) is more than the {MAX_PARAMETERS:,} a model may "
                        f"have: are its widths right?")


def model_from_config(config, **options):
    """``options``: further keyword arguments of the model class (e.g.
    AdapNet_pp's fold_masks for inference graphs). The model_def and masks
    are a checkpoint's when the config went through
    with_checkpoint_model, else the config's files."""
    found = config.get("checkpoint_model")
    if found is None:
        if config.get("model_def") is None:
            raise UserError("no model_def given (needed unless the checkpoint describes "
                            "its model)")
        found = files_model(config["model_def"], config.get("mask"), config["num_classes"])
    cls = model_class(config["model"])  # its errors name the model, not the model_def
    check_model_size(found.model_def, config["num_classes"], found.source, cls.architecture)
    try:
        return cls(found.model_def, config["num_classes"], found.masks,
                   atrous_path=config.get("atrous_path", "auto"), **options)
    except UserError as exc:
        where = found.source if found.description else \
            f"{found.source} / mask {config.get('mask')}"
        raise UserError(f"{where}: {exc}") from None


def check_model_name(given, described):
    """A config's model name must build the class the description names."""
    if given is None or described is None:
        return
    if model_class(given) is not model_class(described.model):
        raise UserError(f"model {given} differs from the checkpoint's ({described.checkpoint}):"
                        f" {described.model}")


def with_checkpoint_model(config, checkpoint_key="checkpoint"):
    """``config`` (a dict of a kind that runs a checkpoint: evaluate,
    oracle_rank, predict, export, or compress's per-stage evaluation config;
    train's model is training.training_model's, prune's jobs/prune.py's)
    with its model taken from ``config[checkpoint_key]``: 'num_classes'
    filled, and 'checkpoint_model' the CheckpointModel that model_from_config
    builds. Idempotent."""
    if config.get("checkpoint_model") is not None:
        return config
    found = checkpoint_model(config[checkpoint_key], config.get("model_def"),
                             config.get("mask"), config.get("num_classes"))
    check_model_name(config.get("model"), found.description)
    return dict(config, num_classes=found.num_classes, checkpoint_model=found)

"""Config -> model instance (the `model`, `model_def`, `mask` keys)."""

import importlib

from models.model_def import load_masks, load_model_def
from netcompress.errors import UserError


def model_class(name):
    """`AdapNet_pp` -> models.AdapNet_pp.AdapNet_pp; `module.Class` -> models.module.Class."""
    module_name, _, class_name = name.rpartition(".")
    module_name = module_name or class_name
    try:
        module = importlib.import_module(f"models.{module_name}")
    except ModuleNotFoundError:
        raise UserError(f"model {name!r}: no module models/{module_name}.py") from None
    try:
        return getattr(module, class_name)
    except AttributeError:
        raise UserError(f"model {name!r}: models/{module_name}.py has no class "
                        f"{class_name}") from None


def model_from_config(config):
    model_def = load_model_def(config["model_def"])
    masks = load_masks(config.get("mask"))
    try:
        return model_class(config["model"])(model_def, config["num_classes"], masks,
                                            atrous_path=config.get("atrous_path", "auto"))
    except UserError as exc:
        raise UserError(f"{config['model_def']} / mask {config.get('mask')}: {exc}") from None

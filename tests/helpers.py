"""Shared test helpers: tiny model_defs, random weights, graph runs."""

import copy
import json
import os

import numpy as np
import tensorflow as tf

from models.model_def import load_model_def

tf1 = tf.compat.v1
tf1.disable_eager_execution()

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# How far two float32 passes of a tiny model_def may differ when they compute
# the same function in another summation order (another batch composition,
# zero channels vs removed ones, oneDNN on or off, another CPU), measured
# relative to a tensor's largest magnitude. Each conv of a forward + backward
# pass (~120 along the deepest path) sums n <= ~150 float32 products here; a
# reordered sum moves by about sqrt(n) * u ~ 12 u (u = 2**-24) relative to the
# magnitudes summed, and these perturbations add up along the depth:
# 120 * 12 * 6e-8 ~ 1e-4. Seen: below 3e-7 on AMD and Intel CPUs. Elementwise
# relative tolerances are wrong for such values: a channel whose value is a
# near-cancelling sum has a large relative error and a tiny absolute one.
FLOAT32_PASS_TOLERANCE = 1e-4


def default_model_def():
    return load_model_def(os.path.join(REPO, "models", "default.json"))


def scaled_model_def(divisor):
    """default.json with every width divided by ``divisor`` (at least 2)."""
    model_def = copy.deepcopy(default_model_def())

    def scale(value):
        return max(2, value // divisor)
    for key, value in model_def["params"].items():
        model_def["params"][key] = [scale(v) for v in value] if isinstance(value, list) \
            else scale(value)
    for key, (a, b) in model_def["split"].items():
        model_def["split"][key] = [scale(a), scale(b)]
        model_def["params"][key][1] = scale(a) + scale(b)
    return model_def


def write_json(path, data):
    with open(path, "w") as f:
        json.dump(data, f)
    return str(path)


def write_config(path, values):
    """A `key: value` config file: None as the original's `None`, text (and
    paths) JSON-quoted, which YAML reads back unchanged."""
    def show(value):
        if value is None:
            return "None"
        return json.dumps(value if isinstance(value, (bool, int, float)) else str(value))
    with open(path, "w") as f:
        for key, value in values.items():
            f.write(f"{key}: {show(value)}\n")
    return str(path)


def random_values(variables, rng):
    """{variable name without ':0': float32 array}: He-scaled kernels and
    non-trivial batch norms (BN statistics and betas included)."""
    values = {}
    for variable in variables:
        shape = variable.shape.as_list()
        name = variable.name[:-2] if variable.name.endswith(":0") else variable.name
        if name.endswith("moving_variance"):
            value = rng.uniform(0.5, 2.0, shape)
        elif name.endswith("gamma"):
            value = rng.uniform(0.5, 1.5, shape)
        elif name.endswith(("beta", "moving_mean")):
            value = rng.normal(0.0, 0.3, shape)
        else:
            fan_in = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
            value = rng.normal(0.0, np.sqrt(2.0 / fan_in), shape)
        values[name] = value.astype(np.float32)
    return values


def randomise_variables(session, variables, seed=0):
    """Assign random_values to ``variables``; returns them by name."""
    from netcompress.formats.checkpoints import assign_values
    values = random_values(variables, np.random.default_rng(seed))
    assign_values(session, {v: values[v.name[:-2]] for v in variables})
    return values


def run_script_in_process(script, *arguments, env=None):
    """``python SCRIPT ARGUMENTS`` (SCRIPT a path from the repository root) in
    this process, as the script's __main__ runs it: its main(argv) under
    run_main. For tests of a script's messages and exit status, where a new
    process (TensorFlow imported again, Grappler on) is not the point.
    ``env``: variables set for the call only; the environment is restored.
    Returns (returncode, stdout, stderr, the stderr lines `error: ...`)."""
    import contextlib
    import importlib
    import io
    import types

    from netcompress.settings.cli import run_main

    module = importlib.import_module(os.path.splitext(str(script))[0].replace(os.sep, "."))
    saved = dict(os.environ)
    os.environ.update(env or {})
    stdout, stderr = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            result = run_main(lambda: module.main([str(a) for a in arguments]))
        code = result if isinstance(result, int) else 0
    except SystemExit as exit:
        code = exit.code if isinstance(exit.code, int) else 1
    finally:
        os.environ.clear()
        os.environ.update(saved)
    errors = [line for line in stderr.getvalue().splitlines() if line.startswith("error:")]
    return types.SimpleNamespace(returncode=code, stdout=stdout.getvalue(),
                                 stderr=stderr.getvalue(), errors=errors)


def compress_workspace(root, num_classes, height, width, num_train, train_steps, **settings):
    """A tiny model (default.json / 16) trained ``train_steps`` on synthetic
    shapes, and a compress config for it (``settings`` added or replacing
    the defaults). Returns {root, files, config, checkpoint, model_def, base}."""
    from dataset import synthetic
    from models.model_def import save_model_def
    from netcompress.jobs import train as training
    from netcompress.settings.config import load_config

    model_def = scaled_model_def(16)
    save_model_def(model_def, str(root / "tiny.json"))
    files = synthetic.generate(str(root / "data"), num_train=num_train, num_test=4,
                               num_val=4, height=height, width=width, seed=3)
    base = dict(gpu_id="", model="AdapNet_pp", num_classes=num_classes, batch_size=4,
                skip_step=10, height=height, width=width, mask=None,
                model_def=str(root / "tiny.json"))
    train_config = write_config(root / "train.config", dict(
        base, intialize=None, checkpoint=root / "start" / "model.ckpt",
        train_data=files["train"], max_iteration=train_steps, learning_rate=0.005,
        save_step=train_steps, power=0.9))
    checkpoint = training.train(load_config(train_config, "train"), progress=False,
                                seed=0)["checkpoint"]
    config = write_config(root / "compress.config", dict(dict(
        base, checkpoint=checkpoint, train_data=files["train"], val_data=files["val"],
        test_data=files["test"], run_dir=root / "run", stages=1, learning_rate=0.001,
        power=0.9, target_percent=10, step_percent=30, min_step_percent=5, tolerance=1.0,
        seed=0, streams=True, direct_iterations=0), **settings))
    return {"root": root, "files": files, "config": config, "checkpoint": checkpoint,
            "model_def": model_def, "base": base}

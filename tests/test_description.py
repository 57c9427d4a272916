"""Checkpoints describe their model (docs/outputs.md): readers build the
model a checkpoint holds, refuse a model_def or mask that differs from it
in what tensor shapes cannot tell (split halves, mask positions), and still
read undescribed (original) checkpoints with the config's files.

One tiny random-weight model (widths /16, 32x64 inputs, 4 records), whose
block2/unit_4 conv2 is split [2, 6]: the tiny model_def's [4, 4] has the
same shapes.
"""

import copy
import json
import os

import numpy as np
import pytest
import tensorflow as tf

from helpers import random_values, run_script_in_process, scaled_model_def, write_config, \
    write_json
from dataset import synthetic
from models.AdapNet_pp import AdapNet_pp
from models.model_def import load_masks, load_model_def, save_masks
from common.errors import UserError
from netcompress.formats import checkpoints, description
from netcompress.settings.config import load_config
from netcompress.jobs.evaluate import evaluate
from netcompress.graphs.models import with_checkpoint_model
from netcompress.jobs.prune import PruneSettings, prepare, prune
from test_faults import write_rank_file

tf1 = tf.compat.v1
tf1.disable_eager_execution()

NUM_CLASSES = synthetic.NUM_CLASSES
HEIGHT, WIDTH = 32, 64
SPLIT_KEY = "8"  # block2/unit_4


def model_values(model_def, seed=0):
    graph = tf.Graph()
    with graph.as_default():
        images = tf1.placeholder(tf.float32, [1, HEIGHT, WIDTH, 3])
        AdapNet_pp(model_def, NUM_CLASSES).build(images, training=False, aux=True)
        return random_values(checkpoints.model_variables(graph), np.random.default_rng(seed))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("described")
    file_def = scaled_model_def(16)
    assert file_def["split"][SPLIT_KEY] == [4, 4]
    model_def = copy.deepcopy(file_def)
    model_def["split"][SPLIT_KEY] = [2, 6]
    values = model_values(model_def)
    described = checkpoints.write_checkpoint(
        values, str(root / "described" / "model.ckpt"),
        description.describe(model_def, {}, NUM_CLASSES))
    original = checkpoints.write_checkpoint(values, str(root / "original" / "model.ckpt"))
    data = synthetic.generate(str(root / "data"), num_train=4, num_test=4, height=HEIGHT,
                              width=WIDTH, seed=1)
    base = dict(gpu_id="", model="AdapNet_pp", num_classes=NUM_CLASSES, batch_size=2,
                skip_step=1, height=HEIGHT, width=WIDTH, mask=None,
                test_data=data["test"], checkpoint=described)
    return dict(root=root, model_def=model_def, file_def=file_def,
                model_def_path=write_json(root / "model_def.json", model_def),
                file_def_path=write_json(root / "file_def.json", file_def),
                values=values, described=described, original=original, data=data,
                base=base)


def evaluate_config(tiny, name, **values):
    """A checked evaluate config: the tiny base with ``values`` (None drops a key)."""
    entries = {k: v for k, v in dict(tiny["base"], **values).items() if v is not None}
    return load_config(write_config(tiny["root"] / f"{name}.config", entries), "evaluate")


def prune_settings(tiny, out, **values):
    settings = dict(rank_file=write_rank_file(tiny["root"] / "rank.npz", tiny["model_def"]),
                    threshold=0.3, checkpoint_name=tiny["described"],
                    new_checkpoint_save=str(out / "model.ckpt"),
                    new_model_def=str(out / "model_def.json"),
                    mask_save=str(out / "mask.npy"), height=HEIGHT, width=WIDTH)
    settings.update(values)
    return PruneSettings(**settings)


SPLIT_MESSAGE = 'differs from the one in checkpoint'
SPLIT_DIFFERENCE = f'split["{SPLIT_KEY}"] is [4, 4] in the file, [2, 6] in the checkpoint'


# ---- the description ------------------------------------------------------------

def test_description_is_read_back_and_ignored_by_model_checks(tiny):
    found = description.read_description(tiny["described"])
    assert (found.model, found.num_classes, found.model_def, found.masks, found.classes) == \
        ("AdapNet_pp", NUM_CLASSES, tiny["model_def"], {}, None)
    assert description.read_description(tiny["original"]) is None
    # Outside resnet_v2_50/: not a model variable, not among the values read.
    assert description.KEY in checkpoints.checkpoint_shapes(tiny["described"])
    assert set(checkpoints.read_checkpoint(tiny["described"])) == set(tiny["values"])


def test_an_invalid_description_is_one_line(tiny, tmp_path):
    for text, reason in (("{", "not JSON"), ('{"format": 2}', "format 2"),
                         (json.dumps(dict(json.loads(description.describe(
                             tiny["model_def"], {}, NUM_CLASSES)), num_classes=1)),
                          "num_classes 1")):
        path = checkpoints.write_checkpoint({"a": np.zeros(2, np.float32)},
                                            str(tmp_path / reason / "model.ckpt"), text)
        with pytest.raises(UserError, match=f"has an invalid {description.KEY}: {reason}"):
            description.read_description(path)


def test_differences_are_named():
    mine, theirs = scaled_model_def(16), scaled_model_def(16)
    assert description.model_def_difference(mine, theirs) is None
    theirs["params"]["3"] = [4, 4, 14]
    assert description.model_def_difference(mine, theirs) == \
        'params["3"] is [4, 4, 16] in the file, [4, 4, 14] in the checkpoint'
    a = {"block1/unit_2": (np.arange(14), 16)}
    assert description.masks_difference(a, {"block1/unit_2": (np.arange(2, 16), 16)}) == (
        "block1/unit_2 keeps [0, 1, 2, 3, 4, 5, ...] of 16 in the file, "
        "[2, 3, 4, 5, 6, 7, ...] of 16 in the checkpoint")
    assert description.masks_difference(a, {}) == \
        "block1/unit_2 is masked in the file, not in the checkpoint"
    assert description.masks_difference(a, {"block1/unit_2": (np.arange(12), 16)}) == \
        "block1/unit_2 keeps 14 channels in the file, 12 in the checkpoint"


# ---- readers refuse another model ---------------------------------------------------

def test_evaluate_prune_predict_refuse_other_split_halves(tiny, tmp_path):
    config = evaluate_config(tiny, "split", model_def=tiny["file_def_path"])
    with pytest.raises(UserError) as caught:
        evaluate(config, log=lambda line: None, progress=False)
    assert str(caught.value) == (f"model_def {tiny['file_def_path']} {SPLIT_MESSAGE} "
                                 f"{tiny['described']}: {SPLIT_DIFFERENCE}")
    with pytest.raises(UserError, match=SPLIT_MESSAGE) as caught:
        prepare(prune_settings(tiny, tmp_path / "pruned", model_def=tiny["file_def_path"],
                               num_classes=NUM_CLASSES))
    assert str(caught.value).endswith(SPLIT_DIFFERENCE)
    assert not os.path.exists(tmp_path / "pruned")
    from netcompress.jobs.predict import predict
    with pytest.raises(UserError, match=SPLIT_MESSAGE) as caught:
        predict(config, tiny["data"]["test"], str(tmp_path / "predicted"), progress=False)
    assert str(caught.value).endswith(SPLIT_DIFFERENCE)
    assert not os.path.exists(tmp_path / "predicted")
    # The script: one line, exit 2.
    result = run_script_in_process("evaluate.py", "-c", tiny["root"] / "split.config")
    assert result.returncode == 2
    assert result.errors == [f"error: model_def {tiny['file_def_path']} {SPLIT_MESSAGE} "
                             f"{tiny['described']}: {SPLIT_DIFFERENCE}"]


def test_a_mask_keeping_other_positions_is_refused(tiny, tmp_path):
    model_def = copy.deepcopy(tiny["model_def"])
    model_def["params"]["3"][2] -= 2  # block1/unit_2's conv3: 14 of the stream's 16
    kept = {"block1/unit_2": (np.arange(14), 16)}
    other = {"block1/unit_2": (np.arange(2, 16), 16)}
    values = dict(tiny["values"])
    kernel = "resnet_v2_50/block1/unit_2/bottleneck_v1/conv3/weights"
    values[kernel] = values[kernel][..., :14]
    checkpoint = checkpoints.write_checkpoint(
        values, str(tmp_path / "masked" / "model.ckpt"),
        description.describe(model_def, kept, NUM_CLASSES))
    save_masks(other, str(tmp_path / "other.npy"))
    config = evaluate_config(tiny, "mask", checkpoint=checkpoint,
                             mask=str(tmp_path / "other.npy"))
    with pytest.raises(UserError) as caught:
        evaluate(config, log=lambda line: None, progress=False)
    assert str(caught.value) == (f"mask {tmp_path / 'other.npy'} differs from the "
                                 f"checkpoint's ({checkpoint}): block1/unit_2 keeps "
                                 f"[2, 3, 4, 5, 6, 7, ...] of 16 in the file, "
                                 f"[0, 1, 2, 3, 4, 5, ...] of 16 in the checkpoint")


# ---- readers take the model from the checkpoint ---------------------------------------

def test_evaluate_needs_no_model_def_and_reads_originals_as_before(tiny):
    logged = []
    described = evaluate(evaluate_config(tiny, "bare"), log=logged.append, progress=False)
    # The same weights without a description, with the config's model_def.
    original = evaluate(evaluate_config(tiny, "original", checkpoint=tiny["original"],
                                        model_def=tiny["model_def_path"]),
                        log=logged.append, progress=False)
    assert np.array_equal(described.matrix, original.matrix)
    assert described.matrix.sum() > 0 and described.mean_iou() == original.mean_iou()
    # num_classes may be left out too; an original needs its model_def.
    bare = evaluate_config(tiny, "no_classes", num_classes=None)
    assert with_checkpoint_model(bare)["num_classes"] == NUM_CLASSES
    with pytest.raises(UserError, match="does not describe its model .*: give its model_def"):
        evaluate(evaluate_config(tiny, "no_def", checkpoint=tiny["original"]),
                 log=logged.append, progress=False)


def test_pruned_checkpoint_describes_the_files_beside_it(tiny, tmp_path):
    out = tmp_path / "pruned"
    prune(prune_settings(tiny, out), log=lambda line: None, verify=False)
    found = description.read_description(str(out / "model.ckpt"))
    assert found.model_def == load_model_def(str(out / "model_def.json"))
    assert found.model_def != tiny["model_def"] and found.masks  # conv3s were cut
    assert description.masks_difference(load_masks(str(out / "mask.npy")), found.masks) \
        is None
    assert found.num_classes == NUM_CLASSES
    zeros = tmp_path / "zeros"
    prune(prune_settings(tiny, zeros, try_zeros=True), log=lambda line: None, verify=False)
    zeroed = description.read_description(str(zeros / "model.ckpt"))
    assert zeroed.model_def == tiny["model_def"] and zeroed.masks == {}


def test_compress_takes_the_given_model_from_its_description(tiny, tmp_path):
    from netcompress.jobs.compress import given_model_files

    config = dict(checkpoint=tiny["described"], model_def=None, mask=None, num_classes=None,
                  run_dir=str(tmp_path / "run"))
    given = given_model_files(config)
    assert given["num_classes"] == NUM_CLASSES and given["mask"] is None
    assert load_model_def(given["model_def"]) == tiny["model_def"]
    with pytest.raises(UserError, match=f"{SPLIT_MESSAGE} .*: {SPLIT_DIFFERENCE}"
                       .replace("[", "\\[").replace("]", "\\]")):
        given_model_files(dict(config, model_def=tiny["file_def_path"]))

"""Damaged or wrong inputs are one-line errors (exit 2), and nothing is
written or changed: checkpoints (data, index, state file, non-finite
values), rank files, masks, model names, gpu_id, output paths under a file,
and Ctrl-C in the converter (docs/errors.md).

One tiny random-weight model (widths /16, 32x64 inputs, 4 records) is
written once per module; the readers are checked in-process for every kind
of damage, the scripts on a few of them as subprocesses.
"""

import glob
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from helpers import REPO, random_values, run_script_in_process, scaled_model_def, write_config, \
    write_json
from dataset import synthetic
from models.AdapNet_pp import AdapNet_pp
from models.architecture import adapnet_pp, resolve_widths
from models.model_def import load_masks, save_masks
from common import digests
from common.errors import UserError
from common.files import replace_atomically
from netcompress.formats import checkpoints
from netcompress.formats.checkpoint_paths import resolve_checkpoint
from netcompress.settings.config import load_config
from netcompress.graphs.models import model_class
from netcompress.formats.rankfile import RankSums

tf1 = tf.compat.v1
tf1.disable_eager_execution()

NUM_CLASSES = synthetic.NUM_CLASSES
HEIGHT, WIDTH = 32, 64
DATA_SUFFIX = ".data-00000-of-00001"


# ---- fixtures and helpers ------------------------------------------------------

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny model on disk (model_def, checkpoint, records, configs) and a
    graph of its variables with a session to restore into."""
    root = tmp_path_factory.mktemp("tiny")
    model_def = scaled_model_def(16)
    model_def_path = write_json(root / "tiny.json", model_def)
    data = synthetic.generate(str(root / "data"), num_train=4, num_test=4, height=HEIGHT,
                              width=WIDTH, seed=1)
    graph = tf.Graph()
    with graph.as_default():
        images = tf1.placeholder(tf.float32, [1, HEIGHT, WIDTH, 3])
        AdapNet_pp(model_def, NUM_CLASSES).build(images, training=False, aux=True)
        variables = checkpoints.model_variables(graph)
    values = random_values(variables, np.random.default_rng(0))
    checkpoint = str(root / "train" / "model.ckpt")
    checkpoints.write_checkpoint(values, checkpoint)
    base = dict(gpu_id="", model="AdapNet_pp", num_classes=NUM_CLASSES, batch_size=2,
                skip_step=1, height=HEIGHT, width=WIDTH, mask=None, model_def=model_def_path)
    test_config = write_config(root / "test.config", dict(
        base, checkpoint=checkpoint, test_data=data["test"]))
    rank_config = write_config(root / "rank.config", dict(
        base, checkpoint=checkpoint, test_data=data["train"],
        rank_save=root / "ranks" / "rank.npz"))
    train_config = write_config(root / "train.config", dict(
        base, intialize=None, checkpoint=root / "retrain", train_data=data["train"],
        max_iteration=1, learning_rate=1e-4, save_step=1, power=0.9))
    session = tf1.Session(graph=graph)
    yield dict(root=root, model_def=model_def, model_def_path=model_def_path, data=data,
               values=values, checkpoint=checkpoint, graph=graph, variables=variables,
               session=session, test_config=test_config, rank_config=rank_config,
               train_config=train_config)
    session.close()


def hash_tree(*paths):
    """sha256 of every file under ``paths`` (files or directories)."""
    digests = {}
    for top in map(str, paths):
        files = [top] if os.path.isfile(top) else [
            os.path.join(root, name) for root, _, names in os.walk(top) for name in names]
        for path in files:
            with open(path, "rb") as f:
                digests[path] = hashlib.sha256(f.read()).hexdigest()
    return digests


def run_script(script, *arguments):
    """The script's main in this process: its messages and exit status."""
    return run_script_in_process(script, *arguments)


def assert_one_line_error(result, *patterns):
    """Exit 2 and nothing on stderr but one `error:` line naming ``patterns``."""
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for pattern in patterns:
        assert pattern in lines[0], lines[0]
    return lines[0]


def write_rank_file(path, model_def, transform=None):
    """A valid rank file of the tiny model; ``transform(arrays)`` may spoil it."""
    widths = resolve_widths(model_def, NUM_CLASSES)
    layers = [g.name for g in adapnet_pp().prunable_groups()]
    ranks = RankSums(layers, widths)
    ranks.count = 2
    rng = np.random.default_rng(3)
    for layer in layers:
        ranks.add("taylor", layer, rng.uniform(0.1, 1.0, widths[layer]))
        ranks.add("reference", layer, rng.normal(0.0, 1.0, widths[layer]))
        ranks.add("taylor_out", layer, rng.uniform(0.1, 1.0, widths[layer]))
    ranks.save(str(path))
    if transform is not None:
        with np.load(path, allow_pickle=False) as data:
            arrays = {key: data[key] for key in data.files}
        transform(arrays)
        with open(path, "wb") as f:
            np.savez(f, **arrays)
    return str(path)


# ---- damaged checkpoints ---------------------------------------------------------

def _truncate(path, size):
    with open(path, "r+b") as f:
        f.truncate(size)


def _garbage(path, size=None):
    size = os.path.getsize(path) if size is None else size
    with open(path, "wb") as f:
        f.write(np.random.default_rng(5).integers(0, 256, size, np.uint8).tobytes())


# kind -> (damage(prefix, directory), message, whether resolve/shape readers see it)
DAMAGE = {
    "truncated data": (lambda p, d: _truncate(p + DATA_SUFFIX, os.path.getsize(p + DATA_SUFFIX)
                                              // 2),
                       "its data file is truncated or damaged", False),
    "empty data": (lambda p, d: _truncate(p + DATA_SUFFIX, 0),
                   "its data file is truncated or damaged", False),
    "garbage data": (lambda p, d: _garbage(p + DATA_SUFFIX),
                     "is damaged or not a TensorFlow checkpoint", False),
    "missing data": (lambda p, d: os.remove(p + DATA_SUFFIX),
                     "is incomplete: ", True),
    "truncated index": (lambda p, d: _truncate(p + ".index", os.path.getsize(p + ".index") // 2),
                        "is damaged or not a TensorFlow checkpoint", "shapes"),
    "garbage index": (lambda p, d: _garbage(p + ".index"),
                      "is damaged or not a TensorFlow checkpoint", "shapes"),
    "empty index": (lambda p, d: _truncate(p + ".index", 0), ".index is empty", True),
    "missing index": (lambda p, d: os.remove(p + ".index"), "not found (no ", True),
    "empty state file": (lambda p, d: _truncate(os.path.join(d, "checkpoint"), 0),
                         "names no checkpoint (it is empty)", True),
    "binary state file": (lambda p, d: _garbage(os.path.join(d, "checkpoint"), 64),
                          "is damaged (not text)", True),
    "garbage state file": (lambda p, d: open(os.path.join(d, "checkpoint"), "w").write(
        "model_checkpoint_path: model.ckpt\n}{"), "is damaged (", True),
    "state file naming a missing checkpoint": (
        lambda p, d: open(os.path.join(d, "checkpoint"), "w").write(
            'model_checkpoint_path: "gone.ckpt"\n'), "gone.ckpt.index", True),
}
STATE_DAMAGE = {k for k in DAMAGE if "state file" in k}


def damaged_copy(tiny, directory, kind):
    """A copy of the tiny checkpoint's directory with ``kind`` of damage;
    returns (the path to give a reader, its directory)."""
    shutil.copytree(os.path.dirname(tiny["checkpoint"]), directory)
    prefix = os.path.join(str(directory), "model.ckpt")
    DAMAGE[kind][0](prefix, str(directory))
    return (str(directory) if kind in STATE_DAMAGE else prefix), str(directory)


def call_reader(tiny, reader, path):
    if reader == "resolve_checkpoint":
        return resolve_checkpoint(path)
    if reader == "checkpoint_shapes":
        return checkpoints.checkpoint_shapes(path)
    if reader == "read_checkpoint":
        return checkpoints.read_checkpoint(path)
    with tiny["graph"].as_default():
        if reader == "restore_matching":
            return checkpoints.restore_matching(tiny["session"], path, tiny["variables"])
        return checkpoints.restore_strict(tiny["session"], path, tiny["variables"])


READERS = ("resolve_checkpoint", "checkpoint_shapes", "read_checkpoint", "restore_matching",
           "restore_strict")


@pytest.mark.parametrize("kind", sorted(DAMAGE))
def test_every_reader_reports_a_damaged_checkpoint_in_one_line(tiny, tmp_path, kind):
    path, directory = damaged_copy(tiny, tmp_path / "ckpt", kind)
    _, message, seen_by = DAMAGE[kind]
    before = hash_tree(directory)
    for reader in READERS:
        # resolve only checks files; shapes read the index; values the data too.
        expect_error = (seen_by is True or reader not in ("resolve_checkpoint",
                                                          "checkpoint_shapes")
                        or (seen_by == "shapes" and reader == "checkpoint_shapes"))
        if not expect_error:
            call_reader(tiny, reader, path)
            continue
        with pytest.raises(UserError) as info:
            call_reader(tiny, reader, path)
        text = str(info.value)
        assert message in text and "\n" not in text, (reader, text)
        assert os.path.join(directory, "") in text or directory in text, (reader, text)
    assert hash_tree(directory) == before


def test_an_intact_checkpoint_reads_and_restores(tiny):
    values = checkpoints.read_checkpoint(os.path.dirname(tiny["checkpoint"]))
    assert values.keys() == tiny["values"].keys()
    with tiny["graph"].as_default():
        checkpoints.restore_strict(tiny["session"], tiny["checkpoint"], tiny["variables"])
        restored, missing = checkpoints.restore_matching(tiny["session"], tiny["checkpoint"],
                                                         tiny["variables"])
    assert len(restored) == len(tiny["variables"]) and not missing


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_checkpoint_is_refused_naming_the_first_variable(tiny, tmp_path, bad):
    values = dict(tiny["values"])
    names = sorted(values)
    for name in names[7], names[3]:
        values[name] = values[name].copy()
        values[name].flat[1] = bad
    prefix = checkpoints.write_checkpoint(values, str(tmp_path / "nan" / "model.ckpt"))
    before = hash_tree(tmp_path / "nan")
    for reader in ("read_checkpoint", "restore_strict", "restore_matching"):
        with pytest.raises(UserError) as info:
            call_reader(tiny, reader, prefix)
        assert str(info.value) == (f"checkpoint {prefix} has non-finite values in "
                                   f"{names[3]}: it is not usable (diverged training?)")
    assert hash_tree(tmp_path / "nan") == before


def test_scripts_report_damaged_checkpoints_in_one_line(tiny, tmp_path):
    """evaluate (prefix, directory), rank and prune: exit 2, one line, the
    inputs untouched and nothing written."""
    truncated, _ = damaged_copy(tiny, tmp_path / "truncated", "truncated data")
    empty_state, _ = damaged_copy(tiny, tmp_path / "empty_state", "empty state file")
    garbage_index, _ = damaged_copy(tiny, tmp_path / "garbage_index", "garbage index")
    rank_path = write_rank_file(tmp_path / "rank.npz", tiny["model_def"])
    before = hash_tree(tmp_path, tiny["root"])

    assert_one_line_error(run_script("evaluate.py", "-c", tiny["test_config"],
                                     "--checkpoint", truncated),
                          f"checkpoint {truncated} is damaged", "truncated")
    assert_one_line_error(run_script("evaluate.py", "-c", tiny["test_config"],
                                     "--checkpoint", empty_state),
                          "checkpoint state file", "names no checkpoint")
    assert_one_line_error(run_script("get_oracle_rank.py", "-c", tiny["rank_config"],
                                     "--checkpoint", garbage_index),
                          f"checkpoint {garbage_index} is damaged")
    out = tmp_path / "pruned"
    assert_one_line_error(run_script(
        "prun_model.py", "--checkpoint_name", truncated, "--save_nvidia_name", rank_path,
        "--model_def", tiny["model_def_path"], "--Num_classes", NUM_CLASSES,
        "--height", HEIGHT, "--width", WIDTH, "--threshold", 0.3, "--phase", "all",
        "--all_convs", "true", "--mask_load", "None", "--histogram_save", "None",
        "--new_checkpoint_save", out / "model.ckpt", "--mask_save", out / "mask.npy",
        "--new_model_def", out / "model_def.json"),
        f"checkpoint {truncated} is damaged", "truncated")
    assert hash_tree(tmp_path, tiny["root"]) == before
    assert not os.path.exists(out)
    assert not os.path.exists(tiny["root"] / "ranks")


def test_scripts_refuse_a_non_finite_checkpoint(tiny, tmp_path):
    values = dict(tiny["values"])
    name = sorted(values)[0]
    values[name] = np.full_like(values[name], np.nan)
    prefix = checkpoints.write_checkpoint(values, str(tmp_path / "diverged" / "model.ckpt"))
    retrain = tmp_path / "retrain"
    os.mkdir(retrain)
    before = hash_tree(tmp_path, tiny["root"])
    message = f"checkpoint {prefix} has non-finite values in {name}: it is not usable"
    assert_one_line_error(run_script("evaluate.py", "-c", tiny["test_config"],
                                     "--checkpoint", tmp_path / "diverged"), message)
    assert_one_line_error(run_script("train.py", "-c", tiny["train_config"],
                                     "--intialize", prefix, "--checkpoint", retrain), message)
    assert hash_tree(tmp_path, tiny["root"]) == before
    assert os.listdir(retrain) == []


# ---- the state file: relative paths, another run's state file kept ---------------

def test_state_file_names_the_checkpoint_relatively(tiny, tmp_path):
    with open(os.path.join(os.path.dirname(tiny["checkpoint"]), "checkpoint")) as f:
        text = f.read()
    assert text == ('model_checkpoint_path: "model.ckpt"\n'
                    'all_model_checkpoint_paths: "model.ckpt"\n')
    copy = tmp_path / "copy"
    shutil.copytree(os.path.dirname(tiny["checkpoint"]), copy)
    assert resolve_checkpoint(str(copy)) == os.path.join(str(copy), "model.ckpt")
    read = checkpoints.read_checkpoint(str(copy))
    assert all(np.array_equal(read[k], v) for k, v in tiny["values"].items())


def test_evaluate_prints_the_prefix_it_restored(tiny, tmp_path):
    """A directory whose state file names another run's checkpoint: evaluate
    says which prefix it restored (and its content), not the directory."""
    directory = tmp_path / "named"
    directory.mkdir()
    with open(directory / "checkpoint", "w") as f:
        f.write(f'model_checkpoint_path: "{tiny["checkpoint"]}"\n')
    result = run_script("evaluate.py", "-c", tiny["test_config"], "--checkpoint", directory)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert f"checkpoint: {tiny['checkpoint']} (sha256 " \
           f"{digests.checkpoint_digest(tiny['checkpoint'])[:12]})" in lines
    assert f"test_data: {tiny['data']['test']}, 4 examples (sha256 " \
           f"{digests.file_digest(tiny['data']['test'])[:12]})" in lines
    assert not any(str(directory) in line for line in lines)


def test_a_state_file_of_another_run_is_left_alone(tiny, tmp_path):
    other = tmp_path / "run"
    checkpoints.write_checkpoint(tiny["values"], str(other / "model.ckpt-5"))
    before = hash_tree(other / "checkpoint")
    checkpoints.write_checkpoint(tiny["values"], str(other / "pruned.ckpt"))
    assert hash_tree(other / "checkpoint") == before
    assert resolve_checkpoint(str(other)) == str(other / "model.ckpt-5")
    assert resolve_checkpoint(str(other / "pruned.ckpt")) == str(
        other / "pruned.ckpt")
    # Rewriting the checkpoint the state file names keeps it naming it.
    checkpoints.write_checkpoint(tiny["values"], str(other / "model.ckpt-5"))
    assert hash_tree(other / "checkpoint") == before
    # A damaged state file is not ours to repair either.
    with open(other / "checkpoint", "w") as f:
        f.write("garbage {")
    before = hash_tree(other / "checkpoint")
    checkpoints.write_checkpoint(tiny["values"], str(other / "third.ckpt"))
    assert hash_tree(other / "checkpoint") == before


def test_pruning_into_another_runs_directory_keeps_its_state_file(tiny, tmp_path):
    other = tmp_path / "other_run"
    checkpoints.write_checkpoint(tiny["values"], str(other / "model.ckpt-7"))
    state_before = hash_tree(other / "checkpoint")
    rank_path = write_rank_file(tmp_path / "rank.npz", tiny["model_def"])
    result = run_script(
        "prun_model.py", "--checkpoint_name", tiny["checkpoint"], "--save_nvidia_name",
        rank_path, "--model_def", tiny["model_def_path"], "--Num_classes", NUM_CLASSES,
        "--height", HEIGHT, "--width", WIDTH, "--threshold", 0.3, "--phase", "block1",
        "--all_convs", "true", "--mask_load", "None", "--histogram_save", "None",
        "--new_checkpoint_save", other / "pruned.ckpt", "--mask_save",
        tmp_path / "mask.npy", "--new_model_def", tmp_path / "model_def.json")
    assert result.returncode == 0, result.stderr
    assert hash_tree(other / "checkpoint") == state_before
    assert resolve_checkpoint(str(other)) == str(other / "model.ckpt-7")
    assert os.path.isfile(other / "pruned.ckpt.index")


# ---- rank files ------------------------------------------------------------------

def _zero_d_layers(arrays):
    arrays["layers"] = np.array("conv1")


def _zero_d_scores(arrays):
    arrays["taylor/conv1"] = np.float64(1.0)


def _nan_scores(arrays):
    arrays["taylor/block2/unit_1/bottleneck_v1/conv1"] = arrays[
        "taylor/block2/unit_1/bottleneck_v1/conv1"].copy()
    arrays["taylor/block2/unit_1/bottleneck_v1/conv1"][0] = np.nan


@pytest.mark.parametrize("make, message", [
    (lambda path, tiny: _truncated(write_rank_file(path, tiny["model_def"])),
     "is not a rank file (an .npz written by get_oracle_rank.py): "),
    (lambda path, tiny: save_masks({"block1/unit_2": (np.arange(3), 16)}, str(path)),
     "it is a single .npy array"),
    (lambda path, tiny: np.save(path, np.zeros(3), allow_pickle=False),
     "it is a single .npy array"),
    (lambda path, tiny: write_rank_file(path, tiny["model_def"], _zero_d_layers),
     "'layers' is a 0-d"),
    (lambda path, tiny: write_rank_file(path, tiny["model_def"], _zero_d_scores),
     "'taylor/conv1' is a 0-d"),
    (lambda path, tiny: open(path, "wb").write(b"not a rank file at all"),
     "it is neither an .npz nor a .npy file"),
    (lambda path, tiny: write_rank_file(path, tiny["model_def"], _nan_scores),
     "has scores that are not finite (taylor/block2/unit_1/bottleneck_v1/conv1): it is "
     "not usable; regenerate it by rerunning get_oracle_rank.py"),
], ids=["truncated npz", "mask npy", "npy", "0-d layers", "0-d scores", "garbage", "nan"])
def test_bad_rank_files(tiny, tmp_path, make, message):
    path = tmp_path / "rank.npz"
    make(path, tiny)
    path = str(path) if os.path.exists(path) else str(path) + ".npy"
    before = hash_tree(path)
    with pytest.raises(UserError) as info:
        RankSums.load(path)
    assert message in str(info.value) and "\n" not in str(info.value)
    assert hash_tree(path) == before


def _truncated(path):
    _truncate(path, os.path.getsize(path) * 2 // 3)
    return path


def test_prune_reports_a_nan_rank_file_in_one_line(tiny, tmp_path):
    rank_path = write_rank_file(tmp_path / "rank.npz", tiny["model_def"], _nan_scores)
    before = hash_tree(tmp_path, tiny["root"])
    out = tmp_path / "pruned"
    assert_one_line_error(run_script(
        "prun_model.py", "--checkpoint_name", tiny["checkpoint"], "--save_nvidia_name",
        rank_path, "--model_def", tiny["model_def_path"], "--Num_classes", NUM_CLASSES,
        "--height", HEIGHT, "--width", WIDTH, "--mask_load", "None",
        "--histogram_save", "None", "--new_checkpoint_save", out / "model.ckpt",
        "--mask_save", out / "mask.npy", "--new_model_def", out / "model_def.json"),
        "not finite", "rerunning get_oracle_rank.py")
    assert hash_tree(tmp_path, tiny["root"]) == before
    assert not os.path.exists(out)


# ---- masks -------------------------------------------------------------------------

@pytest.mark.parametrize("make, message", [
    (lambda f: np.savez(f, a=np.zeros(2)), "it is a zip or .npz archive"),
    (lambda f: np.save(f, np.zeros((), dtype=[("unit", "U32"), ("width", "<i4"),
                                              ("keep", "?", (4,))])),
     "it holds a 0-d array"),
    (lambda f: np.save(f, np.float32(3.0)), "fields None"),
    (lambda f: f.write(bytes(range(256)) * 3), "it is not a .npy file"),
    (lambda f: None, "it is empty"),
    (lambda f: _truncated_mask(f), "is not a mask array"),
], ids=["npz", "0-d", "plain 0-d", "garbage", "empty", "truncated"])
def test_bad_mask_files(tmp_path, make, message):
    path = tmp_path / "mask.npy"
    with open(path, "wb") as f:
        make(f)
    before = hash_tree(path)
    with pytest.raises(UserError) as info:
        load_masks(str(path))
    assert message in str(info.value) and "\n" not in str(info.value), str(info.value)
    assert hash_tree(path) == before


def _truncated_mask(handle):
    np.save(handle, np.zeros(40, dtype=[("unit", "U32"), ("width", "<i4"),
                                        ("keep", "?", (64,))]))
    handle.truncate(handle.tell() // 2)


def test_evaluate_reports_an_npz_mask_in_one_line(tiny, tmp_path):
    rank_path = write_rank_file(tmp_path / "rank.npz", tiny["model_def"])
    before = hash_tree(tmp_path, tiny["root"])
    assert_one_line_error(run_script("evaluate.py", "-c", tiny["test_config"],
                                     "--mask", rank_path),
                          f"mask file {rank_path} is not a mask array", "a rank file?")
    assert hash_tree(tmp_path, tiny["root"]) == before


# ---- model names and gpu_id ------------------------------------------------------------

@pytest.mark.parametrize("name, message", [
    ("AdapNet_pp.tf", "models/AdapNet_pp.py has no model class tf"),
    ("AdapNet_pp.np", "has no model class np"),
    ("AdapNet_pp.UserError", "has no model class UserError"),
    ("AdapNet_pp.", "is not a model name"),
    ("models/AdapNet_pp", "is not a model name"),
    ("AdapNet_pp.AdapNet_pp.x", "is not a model name"),
    ("..", "is not a model name"),
    ("Nope", "no module models/Nope.py"),
])
def test_bad_model_names(name, message):
    with pytest.raises(UserError) as info:
        model_class(name)
    assert message in str(info.value) and repr(name) in str(info.value)


def test_good_model_names():
    assert model_class("AdapNet_pp") is AdapNet_pp
    assert model_class("AdapNet_pp.AdapNet_pp") is AdapNet_pp


def test_evaluate_reports_a_bad_model_name_in_one_line(tiny):
    assert_one_line_error(run_script("evaluate.py", "-c", tiny["test_config"],
                                     "--model", "AdapNet_pp.tf"),
                          "model 'AdapNet_pp.tf': models/AdapNet_pp.py has no model class tf")


@pytest.mark.parametrize("value", ["'0;1'", "'gpu0'", "'0,,1'", "'-2'", "-3", "'0,-1'",
                                   "'1.5'", "'cuda:0'", "[0, 1]", "'٣'"])
def test_bad_gpu_id(tiny, value):
    with pytest.raises(UserError) as info:
        load_config(tiny["test_config"], "evaluate", [f"gpu_id={value}"])
    assert "'gpu_id' must be" in str(info.value)


@pytest.mark.parametrize("value, expected", [
    ("''", ""), ("None", ""), ("0", "0"), ("'1'", "1"), ("'0,1'", "0,1"),
    ("'0, 2'", "0,2"), ("-1", "-1"), ("'-1'", "-1")])
def test_good_gpu_id(tiny, value, expected):
    assert load_config(tiny["test_config"], "evaluate", [f"gpu_id={value}"])["gpu_id"] \
        == expected


# ---- outputs under a regular file ------------------------------------------------------

def test_replace_atomically_under_a_file(tmp_path):
    blocker = tmp_path / "some_file.txt"
    blocker.write_text("keep me\n")
    for target, reason in ((blocker / "rank.npz", "it is a file"),
                           (blocker / "deeper" / "rank.npz", f"parent {blocker} is a file")):
        with pytest.raises(UserError) as info:
            replace_atomically(str(target), lambda tmp: open(tmp, "w").close())
        assert str(info.value) == f"cannot create directory {os.path.dirname(target)}: {reason}"
    assert blocker.read_text() == "keep me\n"
    assert sorted(os.listdir(tmp_path)) == ["some_file.txt"]


def test_replace_atomically_onto_a_directory(tmp_path):
    (tmp_path / "out").mkdir()
    with pytest.raises(UserError, match="cannot write .*out: Is a directory"):
        replace_atomically(str(tmp_path / "out"), lambda tmp: open(tmp, "w").close())
    assert os.listdir(tmp_path) == ["out"] and os.listdir(tmp_path / "out") == []


def test_write_checkpoint_under_a_file(tiny, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(UserError, match=f"parent {blocker} is a file"):
        checkpoints.write_checkpoint({"a": np.zeros(2, np.float32)},
                                     str(blocker / "run" / "model.ckpt"))


def write_pngs(directory, count, size=(32, 64)):
    """``count`` image/label pairs and their list file."""
    rng = np.random.default_rng(0)
    os.makedirs(directory, exist_ok=True)
    lines = []
    image = rng.integers(0, 256, (*size, 3), np.uint8)
    label = rng.integers(0, NUM_CLASSES, size, np.uint8)
    Image.fromarray(image).save(os.path.join(directory, "image.png"))
    Image.fromarray(label).save(os.path.join(directory, "label.png"))
    for index in range(count):
        # Links to one pair: the converter decodes each entry anew.
        for name in ("image", "label"):
            os.link(os.path.join(directory, f"{name}.png"),
                    os.path.join(directory, f"{name}{index}.png"))
        lines.append(f"image{index}.png label{index}.png\n")
    list_path = os.path.join(directory, "list.txt")
    with open(list_path, "w") as f:
        f.writelines(lines)
    return list_path


def test_converter_record_under_a_file(tmp_path):
    list_path = write_pngs(tmp_path / "pngs", 2)
    blocker = tmp_path / "out.txt"
    blocker.write_text("keep me\n")
    before = hash_tree(tmp_path)
    assert_one_line_error(run_script("dataset/convert_to_tfrecords.py", "--file", list_path,
                                     "--record", blocker / "train.tfrecords", "--no_progress"),
                          f"--record '{blocker / 'train.tfrecords'}': '{blocker}' is a "
                          f"file, not a directory")
    assert_one_line_error(run_script("dataset/convert_to_tfrecords.py", "--file", list_path,
                                     "--record", tmp_path / "ok.tfrecords",
                                     "--mean", blocker / "sub" / "mean.npy", "--no_progress"),
                          f"--mean '{blocker / 'sub' / 'mean.npy'}': '{blocker}' is a file, "
                          f"not a directory")
    assert hash_tree(tmp_path) == before


# ---- Ctrl-C in the converter -------------------------------------------------------------

def test_converter_interrupted_in_process(tmp_path, monkeypatch, capsys):
    from dataset import convert_to_tfrecords, records

    list_path = write_pngs(tmp_path / "pngs", 20)
    record = tmp_path / "out" / "train.tfrecords"
    calls = []
    encode = records.encode_example

    def interrupting_encode(image, label):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return encode(image, label)

    monkeypatch.setattr(records, "encode_example", interrupting_encode)
    before = hash_tree(tmp_path)
    status = convert_to_tfrecords.main(["--file", list_path, "--record", str(record),
                                        "--mean", str(tmp_path / "out" / "mean.npy"),
                                        "--no_progress"])
    assert status == 130
    assert capsys.readouterr().err == "interrupted\n"
    assert os.listdir(tmp_path / "out") == []
    assert hash_tree(tmp_path) == before


def test_converter_interrupted_by_sigint(tmp_path):
    # Enough entries that a starved test process (a loaded machine) still
    # signals long before the conversion could finish (300 did not).
    list_path = write_pngs(tmp_path / "pngs", 3000, size=(128, 256))
    out = tmp_path / "out"
    out.mkdir()
    record = out / "train.tfrecords"
    before = hash_tree(tmp_path)
    process = subprocess.Popen(
        [sys.executable, os.path.join(REPO, "dataset", "convert_to_tfrecords.py"), "--file",
         list_path, "--record", str(record), "--mean", str(out / "mean.npy"), "--no_progress"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    # The temporary record (common/files.atomic_target) appears when the conversion starts.
    while not any(".tmp" in name for name in os.listdir(out)) and process.poll() is None \
            and time.monotonic() < deadline:
        time.sleep(0.005)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    assert stderr == "interrupted\n"
    assert os.listdir(out) == []
    assert hash_tree(tmp_path) == before


# ---- training: what a resume ignores, the TensorBoard graph -----------------------

def events_have_graph(directory):
    """Whether the TensorBoard events files in ``directory`` hold a graph."""
    from tensorflow.core.util import event_pb2
    found = False
    for path in glob.glob(os.path.join(directory, "events.out.tfevents.*")):
        for record in tf1.io.tf_record_iterator(path):
            found |= event_pb2.Event.FromString(record).HasField("graph_def")
    return found


def test_resume_warns_that_it_ignores_intialize(tiny, tmp_path):
    """What train() does first: a run directory with a checkpoint resumes
    from it, and an explicit intialize is named as not used."""
    from netcompress.jobs.train import _initialise

    run = tmp_path / "run"
    config = load_config(tiny["train_config"], "train",
                         [f"checkpoint={run}", f"intialize={tiny['checkpoint']}"])
    graph = stand_in_training_graph()
    messages = []
    with tf1.Session(graph=graph.graph) as session:
        session.run(graph.initializer)
        graph.saver.save(session, str(run / "model.ckpt"), global_step=0)
        step = _initialise(session, graph, config, str(run), str(run / "model.ckpt"),
                           messages.append)
    assert step == 0
    assert messages[0] == f"resuming from {run}/model.ckpt-0 at step 0"
    assert messages[1].startswith(f"warning: intialize {tiny['checkpoint']} is not used: "
                                  f"resuming restores every variable from "
                                  f"{run}/model.ckpt-0"), messages


@pytest.mark.parametrize("write_graph", [False, True])
def test_the_graph_is_written_to_tensorboard_only_when_asked(tmp_path, write_graph):
    from netcompress.jobs.train import summary_writer

    graph = tf.Graph()
    with graph.as_default():
        tf.constant(1.0, name="c")
    summary_writer({"write_graph": write_graph}, str(tmp_path), graph).close()
    assert events_have_graph(tmp_path) == write_graph
    os.mkdir(tmp_path / "default")
    writer = summary_writer({}, str(tmp_path / "default"), graph)  # retraining stages
    writer.add_summary(tf1.Summary(value=[tf1.Summary.Value(tag="loss", simple_value=0.5)])
                       .SerializeToString(), 3)
    writer.close()
    assert not events_have_graph(tmp_path / "default")
    from tensorflow.core.util import event_pb2
    (path,) = glob.glob(str(tmp_path / "default" / "events.out.tfevents.*"))
    events = [event_pb2.Event.FromString(r) for r in tf1.io.tf_record_iterator(path)]
    assert events[0].file_version == "brain.Event:2"
    assert (events[1].step, events[1].summary.value[0].simple_value) == (3, 0.5)


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_tensorboard_events_on_a_full_disk_are_one_line(tmp_path, monkeypatch):
    """Writes to /dev/full fail as on a full disk. TensorFlow's FileWriter
    failed in its writer thread, a traceback per event; ours in this thread."""
    from netcompress.jobs import train as training

    monkeypatch.setattr(training, "_events_path", lambda directory: "/dev/full")
    with pytest.raises(UserError, match=re.escape(
            "cannot write TensorBoard events /dev/full: ResourceExhaustedError: /dev/full; "
            "No space left on device")):
        training.summary_writer({}, str(tmp_path), tf.Graph())


# ---- predict.py's inputs -------------------------------------------------------------

def test_predict_skips_16_bit_images_as_the_converter_refuses_them(tmp_path):
    """Pillow's convert('RGB') would clip a 16-bit PNG to white."""
    from netcompress.jobs.predict import Source

    grey16 = np.full((4, 6), 1000, np.uint16)  # dark in 16 bits; 255 once clipped
    Image.fromarray(grey16).save(tmp_path / "deep.png")
    Image.fromarray(np.full((4, 6, 3), 7, np.uint8)).save(tmp_path / "plain.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")
    items = {name: (image, problem) for name, image, problem in Source(str(tmp_path)).items()}
    image, problem = items["deep"]
    assert image is None and problem.startswith(f"{tmp_path}/deep.png: unsupported mode I")
    assert "8-bit grayscale or colour" in problem
    image, problem = items["plain"]
    assert problem is None and image.shape == (4, 6, 3) and (image == 7).all()


# ---- export.py's self-check ------------------------------------------------------------

def test_export_check_images_are_resized_to_the_network_as_predict_does(tiny):
    from netcompress.jobs.export import test_images
    from netcompress.jobs.predict import network_input
    from dataset.records import read_examples

    path = tiny["data"]["test"]
    records = [image for image, _ in read_examples(path)][:2]
    same, labels = test_images(path, 2, HEIGHT, WIDTH)
    assert np.array_equal(same, np.stack(records)) and labels.shape == (2, HEIGHT, WIDTH)
    larger, labels = test_images(path, 2, 48, 96)
    assert larger.shape == (2, 48, 96, 3) and labels.shape == (2, HEIGHT, WIDTH)
    for image, record in zip(larger, records):  # BGR in and out
        assert np.array_equal(image, network_input(record[..., ::-1].copy(), 48, 96))


def test_export_check_bound_is_relative_to_the_logits_scale():
    """An untrained network's logits are large: its probabilities may move by
    the tolerance times the largest logit (a softmax moves no probability by
    more than the largest logit change)."""
    from netcompress.jobs.export import EXPORT_TOLERANCE, compare

    logits = np.array([[[[120.0, 0.0, -40.0], [3.0, 3.05, 0.0]]]])  # 1x1x2 pixels, 3 classes
    exp = np.exp(logits - logits.max(axis=-1, keepdims=True))
    probabilities = exp / exp.sum(axis=-1, keepdims=True)
    class_map = np.argmax(logits, axis=-1)
    reference = (class_map, probabilities, logits)
    moved = probabilities + np.array([0.0012, -0.0012, 0.0])
    found = compare(reference, (class_map, moved), EXPORT_TOLERANCE)
    assert found["bound"] == pytest.approx(EXPORT_TOLERANCE * 120.0)
    assert found["max_probability_difference"] == pytest.approx(0.0012)
    # The second pixel's top two logits are 0.05 apart, within 2 x 0.12: a tie.
    assert found["ties"] == 1 and found["class_map_mismatches"] == 0
    swapped = class_map.copy()
    swapped[0, 0, 1] = 0
    assert compare(reference, (swapped, moved), EXPORT_TOLERANCE)["class_map_mismatches"] == 0
    swapped[0, 0, 0] = 2
    assert compare(reference, (swapped, moved), EXPORT_TOLERANCE)["class_map_mismatches"] == 1
    # Logits within 1 in magnitude: the bound is the tolerance itself.
    small = compare((class_map, probabilities, logits / 200.0), (class_map, moved),
                    EXPORT_TOLERANCE)
    assert small["bound"] == EXPORT_TOLERANCE


# ---- environment failures: writes, resume files, model size, workers -------------------

def stand_in_training_graph():
    """What netcompress/jobs/train.py's resume and save need of a TrainGraph, without the
    model (whose training graph takes long to build): a global step and a
    weight, their initializer and Saver."""
    from types import SimpleNamespace

    graph = SimpleNamespace(graph=tf.Graph())
    with graph.graph.as_default():
        graph.global_step = tf1.train.get_or_create_global_step()
        weight = tf1.get_variable("w", [64, 64], initializer=tf1.ones_initializer())
        graph.saved_variables = graph.restored_variables = tf1.global_variables()
        graph.model_variables = []
        graph.initializer = tf1.global_variables_initializer()
        graph.all_finite = tf.reduce_all(tf.math.is_finite(weight))
        graph.saver = graph.resume_saver = tf1.train.Saver()
    return graph


@pytest.mark.parametrize("damage", ["truncated", "garbage", "flipped byte"])
def test_resume_from_a_truncated_data_file_is_one_line(tiny, tmp_path, damage):
    """A .data file cut short, overwritten, or with one byte changed (the
    index is intact: only the restore itself can tell)."""
    from netcompress.jobs.train import _initialise

    run = tmp_path / "run"
    config = load_config(tiny["train_config"], "train", [f"checkpoint={run}"])
    graph = stand_in_training_graph()
    with tf1.Session(graph=graph.graph) as session:
        session.run(graph.initializer)
        graph.saver.save(session, str(run / "model.ckpt"), global_step=3)
        data = str(run / ("model.ckpt-3" + DATA_SUFFIX))
        if damage == "truncated":
            _truncate(data, os.path.getsize(data) // 2)
        elif damage == "garbage":
            _garbage(data)
        else:
            with open(data, "r+b") as f:
                f.seek(100)
                byte = f.read(1)
                f.seek(100)
                f.write(bytes([byte[0] ^ 1]))
        with pytest.raises(UserError, match=re.escape(
                f"cannot resume from {run}/model.ckpt-3: it is damaged (")) as error:
            _initialise(session, graph, config, str(run), str(run / "model.ckpt"), print)
    message = str(error.value)
    assert "\n" not in message and "give a new checkpoint directory" in message
    assert "Graph execution error" not in message
    assert ("Read less bytes" if damage == "truncated" else "DataLossError") in message


# A training save killed midway (SIGXFSZ past a file-size limit: the kernel
# kills the process inside TensorFlow's own write, as a SIGKILL would).
_KILLED_SAVE = """
import os, resource, signal, sys
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
import tensorflow as tf
tf1 = tf.compat.v1
tf1.disable_eager_execution()
with tf.Graph().as_default() as graph:
    tf1.train.get_or_create_global_step()
    tf1.get_variable("w", [64, 64], initializer=tf1.ones_initializer())
    saver = tf1.train.Saver(save_relative_paths=True)
    with tf1.Session() as session:
        session.run(tf1.global_variables_initializer())
        saver.save(session, sys.argv[1], global_step=1, write_meta_graph=False)
        signal.signal(signal.SIGXFSZ, signal.SIG_DFL)  # Python ignores it
        resource.setrlimit(resource.RLIMIT_FSIZE, (5000, 5000))
        saver.save(session, sys.argv[1], global_step=2, write_meta_graph=False)
"""


def test_a_killed_save_is_cleaned_up_by_the_next_run_into_the_directory(tmp_path):
    """What TensorFlow's Saver leaves when killed (its .tempstate file, for
    real), and the other leftovers of killed saves (by name), go when the
    next run takes the directory; checkpoints and other files stay."""
    from netcompress.formats.checkpoint_paths import latest_of_run
    from netcompress.jobs.train import _run_directory

    run = tmp_path / "run"
    process = subprocess.run([sys.executable, "-c", _KILLED_SAVE, str(run / "model.ckpt")],
                             capture_output=True, text=True)
    assert process.returncode == -signal.SIGXFSZ, process.stderr[-2000:]
    killed = [n for n in os.listdir(run) if n.startswith("model.ckpt-2")]
    assert len(killed) == 1 and re.fullmatch(r"model\.ckpt-2\.data-00000-of-00001\.tempstate\d+",
                                             killed[0]), killed
    (run / "model.ckpt-3_temp").mkdir()  # a sharded save's part files
    (run / "model.ckpt-3_temp" / "part-00000-of-00001.index").write_bytes(b"i")
    (run / "model.ckpt-4.index.tempstate123").write_bytes(b"i")
    (run / ("model.ckpt-5" + DATA_SUFFIX)).write_bytes(b"d")  # no .index
    (run / ("checkpoint.tmp" + "0123456789abcdef" * 2)).write_text("x")
    (run / ".staging-killed").mkdir()
    kept = sorted(["model.ckpt-1.index", "model.ckpt-1" + DATA_SUFFIX, "checkpoint",
                   "other.ckpt-7" + DATA_SUFFIX, "model.ckpt-best" + DATA_SUFFIX, "notes.txt"])
    for name in kept[-3:]:
        (run / name).write_text("user's")
    lines = []
    with _run_directory(str(run), str(run / "model.ckpt"), True, lines.append):
        assert sorted(os.listdir(run)) == kept
        assert latest_of_run(str(run), str(run / "model.ckpt")) == str(run / "model.ckpt-1")
    assert lines == [f"removed 5 leftover file(s) of an interrupted save in {run} "
                     f"(checkpoint.tmp{'0123456789abcdef' * 2}, ...)"]


def test_two_training_runs_into_one_directory_are_refused(tmp_path):
    """The second is refused while the first holds the directory (and a
    worker that is not the chief neither locks nor cleans)."""
    from netcompress.jobs.train import _run_directory

    run, prefix = str(tmp_path / "run"), str(tmp_path / "run" / "model.ckpt")
    with _run_directory(run, prefix, True, print):
        (tmp_path / "run" / "model.ckpt-2.index.tempstate9").write_bytes(b"live")
        with pytest.raises(UserError, match=re.escape(
                f"checkpoint directory {run} is in use by another training run")):
            with _run_directory(run, prefix, True, print):
                pass
        with _run_directory(run, prefix, False, print):
            assert os.listdir(run) == ["model.ckpt-2.index.tempstate9"]
    with _run_directory(run, prefix, True, print):
        assert os.listdir(run) == []


@pytest.mark.parametrize("failure", ["disk full", "file size limit", "directory gone"])
def test_a_checkpoint_that_cannot_be_written_stops_training_in_one_line(tmp_path, failure,
                                                                        monkeypatch):
    """"file size limit": TensorFlow's own write fails for real (EFBIG, as
    ENOSPC would; Python ignores SIGXFSZ), and leaves nothing behind."""
    import resource

    from netcompress.jobs.train import _save_if_finite

    run = tmp_path / "run"
    graph = stand_in_training_graph()
    with tf1.Session(graph=graph.graph) as session:
        session.run(graph.initializer)
        _save_if_finite(session, graph, str(run), str(run / "model.ckpt"), 1)
        if failure == "disk full":
            def full(*args, **kwargs):
                raise tf.errors.ResourceExhaustedError(
                    None, None, f"{run}/model.ckpt-2_temp/part-00000-of-00001.data-00000-of-"
                    f"00001.tempstate; No space left on device\n\tmore lines")
            monkeypatch.setattr(graph.saver, "save", full)
            reason = "No space left on device"
        elif failure == "file size limit":
            before = sorted(os.listdir(run))
            limits = resource.getrlimit(resource.RLIMIT_FSIZE)
            resource.setrlimit(resource.RLIMIT_FSIZE, (4000, limits[1]))
            monkeypatch.setattr(graph.saver, "save", _restoring_limits(graph.saver.save, limits))
            reason = "File too large"
        else:  # the run directory replaced by a file while training
            shutil.rmtree(run)
            run.write_text("")
            reason = ""
        with pytest.raises(UserError, match=re.escape(
                f"cannot write checkpoint {run}/model.ckpt-2: ")) as error:
            _save_if_finite(session, graph, str(run), str(run / "model.ckpt"), 2)
    message = str(error.value)
    assert "\n" not in message and reason in message and "training stopped" in message
    if failure != "directory gone":
        assert message.endswith(f"last good checkpoint: {run}/model.ckpt-1")
    if failure == "file size limit":
        assert sorted(os.listdir(run)) == before


def test_a_checkpoint_written_past_the_file_size_limit_is_one_line_and_leaves_the_old(
        tmp_path, monkeypatch):
    """write_checkpoint (pruned models, compress stages) with TensorFlow's
    write failing for real (EFBIG, as ENOSPC): its reason, not 'Graph
    execution error:'; the old checkpoint whole, no staging left."""
    import resource

    prefix = str(tmp_path / "m.ckpt")
    checkpoints.write_checkpoint({"a": np.zeros(10, np.float32)}, prefix)
    before = hash_tree(tmp_path)
    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    monkeypatch.setattr(tf1.train.Saver, "save",
                        _restoring_limits(tf1.train.Saver.save, limits))
    resource.setrlimit(resource.RLIMIT_FSIZE, (4000, limits[1]))
    with pytest.raises(UserError, match=re.escape(f"cannot write checkpoint {prefix}: "
                                                  f"OutOfRangeError: ")) as error:
        checkpoints.write_checkpoint({"a": np.ones(10000, np.float32)}, prefix)
    assert str(error.value).endswith("File too large") and "\n" not in str(error.value)
    assert hash_tree(tmp_path) == before and hidden_names(tmp_path) == []


def _restoring_limits(save, limits):
    """``save``, with the file size limit set back as soon as it returns."""
    import resource

    def limited(*args, **kwargs):
        try:
            return save(*args, **kwargs)
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, limits)
    return limited


def test_export_with_the_disk_full_is_one_line_and_leaves_nothing(tiny, tmp_path, monkeypatch):
    """TensorFlow's own file writes fail with an OpError, not an OSError."""
    from netcompress.jobs import export

    def full(graph, session, directory):
        os.makedirs(directory)
        with open(os.path.join(directory, "saved_model.pb"), "wb") as f:
            f.write(b"partial")
        raise tf.errors.ResourceExhaustedError(
            None, None, "Graph execution error:\n\nfailed to write saved_model.pb: No space "
                        "left on device\n\t [[{{node save/SaveV2}}]]")
    monkeypatch.setattr(export, "write_saved_model", full)
    before = hash_tree(tiny["root"])
    result = run_script("export.py", "-c", tiny["test_config"], "--output", tmp_path / "out",
                        "--check_images", 1)
    assert_one_line_error(result, f"cannot write the export to {tmp_path}/out: ",
                          "No space left on device")
    assert os.listdir(tmp_path) == [] and hash_tree(tiny["root"]) == before


def test_a_model_def_too_large_is_refused_before_building(tiny, tmp_path, monkeypatch):
    """default.json with every width x 8 (1.9 billion parameters)."""
    import copy

    from helpers import default_model_def
    from netcompress.graphs import models

    big = copy.deepcopy(default_model_def())
    for key, value in big["params"].items():
        big["params"][key] = [8 * v for v in value] if isinstance(value, list) else 8 * value
    for key, (a, b) in big["split"].items():
        big["split"][key] = [8 * a, 8 * b]
    path = write_json(tmp_path / "big.json", big)

    def never(*args, **kwargs):
        raise AssertionError("the model was built")
    monkeypatch.setattr(AdapNet_pp, "build", never)
    result = run_script("evaluate.py", "-c", tiny["test_config"], "--model_def", path)
    line = assert_one_line_error(result, f"{path}: ", " parameters (",
                                 "is more than the 1,000,000,000 a model may have")
    count = int(line.split(f"{path}: ")[1].split(" parameters")[0].replace(",", ""))
    assert count > 60 * 30_000_000  # about 64 x the default model's parameters
    assert models.MAX_PARAMETERS == 10 ** 9


@pytest.mark.parametrize("address", ["localhost", "localhost:http", "localhost:0",
                                     ":2222", "localhost:70000", 12345, "local host:22"])
def test_tf_config_addresses_must_be_host_port(monkeypatch, address):
    from netcompress.graphs.replicas import cluster_task

    monkeypatch.setenv("TF_CONFIG", json.dumps({
        "cluster": {"worker": ["localhost:2222", address]},
        "task": {"type": "worker", "index": 0}}))
    with pytest.raises(UserError, match=r"TF_CONFIG worker 1 address .* is not HOST:PORT"):
        cluster_task()
    monkeypatch.setenv("TF_CONFIG", json.dumps({
        "cluster": {"worker": ["localhost:2222", "[::1]:2223"]},
        "task": {"type": "worker", "index": 1}}))
    assert cluster_task() == ({"worker": ["localhost:2222", "[::1]:2223"]}, 1)


@pytest.mark.parametrize("text, message", [
    ("{not json", "TF_CONFIG is not {"),
    ('{"cluster": {"worker": ["localhost:2222"]}}', "TF_CONFIG is not {"),
    ('{"cluster": {}, "task": {"type": "worker", "index": 0}}', "TF_CONFIG is not {"),
    ('{"cluster": {"worker": ["localhost:2222"]}, "task": {"type": "worker", "index": "x"}}',
     "TF_CONFIG is not {"),
    ('{"cluster": {"worker": ["localhost:2222", "localhost:2223"]}, '
     '"task": {"type": "worker", "index": 2}}', "TF_CONFIG task {'type': 'worker', 'index': 2} "
                                                "is not one of the 2 workers"),
    ('{"cluster": {"worker": ["localhost:2222"]}, "task": {"type": "ps", "index": 0}}',
     "is not one of the 1 workers"),
    ('{"cluster": {"worker": "localhost:2222"}, "task": {"type": "worker", "index": 0}}',
     "TF_CONFIG is not {"),
    ("[1, 2]", "TF_CONFIG is not {"),
])
def test_a_malformed_tf_config_is_one_line(monkeypatch, text, message):
    from netcompress.graphs.replicas import cluster_task

    monkeypatch.setenv("TF_CONFIG", text)
    with pytest.raises(UserError, match=re.escape(message)) as error:
        cluster_task()
    assert "\n" not in str(error.value)


def test_a_worker_that_never_starts_is_named_after_the_timeout():
    from netcompress.graphs.replicas import wait_for_workers

    listening = socket.socket()
    listening.bind(("localhost", 0))
    listening.listen()
    silent = socket.socket()  # bound, never listening: nobody answers there
    silent.bind(("localhost", 0))
    up = f"localhost:{listening.getsockname()[1]}"
    down = f"localhost:{silent.getsockname()[1]}"
    try:
        wait_for_workers([up, up], 0, timeout=5)  # the other one answers: no wait
        start = time.monotonic()
        with pytest.raises(UserError, match=re.escape(
                f"worker 2 ({down}) did not start within 0.5 s (this is worker 0)")):
            wait_for_workers([up, up, down], 0, timeout=0.5, interval=0.1)
        assert 0.5 <= time.monotonic() - start < 5
    finally:
        listening.close()
        silent.close()


# What a survivor's collective op raised when worker 1 was killed mid-training
# (two train.py workers on loopback, tests/test_workers.py's setup).
_PEER_RESET = ("From /job:worker/replica:0/task:0:\nCollective ops is aborted by: "
               "recvmsg:Connection reset by peer\nAdditional GRPC error information from remote target /job:worker/replica:0/"
               "task:1 while calling /tensorflow.WorkerService/RecvBuf:\n:UNKNOWN:Error "
               "received from peer  {grpc_status:14, grpc_message:\"recvmsg:Connection reset "
               "by peer\"}\nThe error could be from a previous operation. Restart your "
               "program to reset.\n\t [[{{node gradients/conv2/CollectiveReduceV2}}]]")


def test_a_worker_that_dies_is_named_with_its_whole_cause():
    from netcompress.graphs.replicas import PeerWatch

    listening = socket.socket()
    listening.bind(("localhost", 0))
    listening.listen()
    up = f"localhost:{listening.getsockname()[1]}"
    watch = PeerWatch(["localhost:1", up], 0, interval=60)
    watch.stopped = lambda: "training stopped; last good checkpoint: run/model.ckpt-3"
    try:
        with pytest.raises(UserError) as error, watch.collective():
            raise tf.errors.UnavailableError(None, None, _PEER_RESET)
        assert str(error.value) == (
            f"worker 1 ({up}) stopped during training (this is worker 0): UnavailableError: "
            f"From /job:worker/replica:0/task:0: Collective ops is aborted by: "
            f"recvmsg:Connection reset by peer Additional "
            f"GRPC error information from remote target /job:worker/replica:0/task:1 while "
            f"calling /tensorflow.WorkerService/RecvBuf: :UNKNOWN:Error received from peer "
            f"{{grpc_status:14, grpc_message:\"recvmsg:Connection reset by peer\"}} The error "
            f"could be from a previous operation. Restart your program to reset.; training "
            f"stopped; last good checkpoint: run/model.ckpt-3")
        assert error.value.exit_status == 1
        # An error that names no worker, while every worker answers: as it was.
        with pytest.raises(tf.errors.InternalError), watch.collective():
            raise tf.errors.InternalError(None, None, "no kernel")
    finally:
        watch.close()
        listening.close()


def test_a_step_waiting_for_a_dead_worker_ends_naming_it():
    """TensorFlow can wait for a dead worker forever (killed during the first
    step): the watch gives up once its server has refused connections for
    the grace time, and only while a step waits."""
    import threading

    from netcompress.graphs.replicas import PeerWatch

    listening = socket.socket()
    listening.bind(("localhost", 0))
    listening.listen()
    up = f"localhost:{listening.getsockname()[1]}"
    given_up, messages = threading.Event(), []

    def give_up(message):
        messages.append(message)
        given_up.set()
    watch = PeerWatch([up, up], 1, interval=0.05, grace=0.3, give_up=give_up)
    try:
        with watch.collective():
            assert not given_up.wait(0.6)  # the peer answers
        listening.close()
        assert not given_up.wait(0.6)  # dead, but no step waits for it
        start = time.monotonic()
        with watch.collective():
            assert given_up.wait(5)
        assert time.monotonic() - start >= 0.3  # the grace, from the first refusal seen
    finally:
        watch.close()
    assert messages == [f"worker 0 ({up}) stopped during training (this is worker 1): its "
                        f"server has refused connections for 0.3 s while this worker's step "
                        f"waits for it (its own output says why); training stopped"]


# ---- sets of files: kills between renames, partial replacements, leftovers --------
# docs/outputs.md, "Results of several files". A kill between two renames
# of a commit is simulated by failing the n-th rename: the process then
# leaves on disk what a kill there leaves (the staging lock goes with it).

def failing_nth_rename(monkeypatch, n, into=None):
    """os.replace raises at its n-th call from common/files.py (counting
    only renames to ``into`` when given); returns the count so far (a list
    of one int)."""
    from common import files

    calls = [0]
    real_replace = os.replace

    def replace(source, destination):
        if into is not None and str(destination) != str(into):
            return real_replace(source, destination)
        calls[0] += 1
        if calls[0] == n:
            raise OSError(5, "simulated kill")
        return real_replace(source, destination)
    monkeypatch.setattr(files.os, "replace", replace)
    return calls


def hidden_names(directory):
    return sorted(name for name in os.listdir(directory) if name.startswith("."))


def write_set(directory, content, with_mask=True):
    """A model-like set through common.files.staged: .index is the key."""
    from common.files import staged

    names = ["m.ckpt.data", "m.ckpt.index", "model_def.json"] + (["mask.npy"] if with_mask
                                                                  else [])
    with staged() as staging:
        for name in names:
            with open(staging.place(os.path.join(directory, name),
                                    key=name.endswith(".index")), "w") as f:
                f.write(f"{content} {name}")
        if not with_mask:
            staging.remove(os.path.join(directory, "mask.npy"))


def read_set(directory):
    """{name: content} of the set's files that are there."""
    found = {}
    for name in ("m.ckpt.data", "m.ckpt.index", "model_def.json", "mask.npy"):
        path = os.path.join(directory, name)
        if os.path.exists(path):
            with open(path) as f:
                found[name] = f.read()
    return found


@pytest.mark.parametrize("with_mask", [True, False])
def test_a_kill_at_any_rename_leaves_the_old_set_no_checkpoint_or_the_new_set(
        tmp_path, monkeypatch, with_mask):
    from common.files import remove_leftovers

    old = {name: f"old {name}" for name in ("m.ckpt.data", "m.ckpt.index", "model_def.json",
                                              "mask.npy")}
    new = {name: f"new {name}" for name in old if with_mask or name != "mask.npy"}
    seen = set()
    for n in range(1, 10):
        directory = tmp_path / f"kill{n}"
        directory.mkdir()
        write_set(directory, "old")
        calls = failing_nth_rename(monkeypatch, n)
        try:
            write_set(directory, "new", with_mask)
            killed = False
        except (OSError, UserError):
            killed = True
        monkeypatch.undo()
        state = read_set(directory)
        # A reader opens the .index first: with it, the whole set is one run's.
        if "m.ckpt.index" in state:
            assert state in (old, new), (n, state)
            seen.add("old" if state == old else "new")
        else:
            seen.add("no checkpoint")
        if not killed:
            assert calls[0] < n and state == new and hidden_names(directory) == []
            break
        # The next run into the same place finishes the committed set, also
        # when the directory was moved meanwhile.
        directory = directory.rename(tmp_path / f"moved{n}")
        remove_leftovers(str(directory))
        assert read_set(directory) in (old, new) and hidden_names(directory) == []
        if state == new or "m.ckpt.index" not in state:
            assert read_set(directory) == new
    assert seen == {"old", "no checkpoint", "new"}


def test_a_real_kill_at_any_rename_is_finished_by_the_next_run(tmp_path):
    """SIGKILL itself at each rename of a commit (a process without
    TensorFlow): the lock dies with it and the next run finishes the set."""
    from common.files import remove_leftovers

    code = ("import os, signal, sys\n"
            f"sys.path.insert(0, {REPO!r})\n"
            "from common import files\n"
            "real, n, calls = os.replace, int(sys.argv[2]), []\n"
            "def replace(a, b):\n"
            "    calls.append(1)\n"
            "    if len(calls) == n:\n"
            "        os.kill(os.getpid(), signal.SIGKILL)\n"
            "    real(a, b)\n"
            "files.os.replace = replace\n"
            "with files.staged() as staging:\n"  # as write_set(directory, 'new')
            "    for name in ('m.ckpt.data', 'm.ckpt.index', 'model_def.json', 'mask.npy'):\n"
            "        place = staging.place(os.path.join(sys.argv[1], name),\n"
            "                              key=name.endswith('.index'))\n"
            "        with open(place, 'w') as f:\n"
            "            f.write('new ' + name)\n")
    new = {name: f"new {name}" for name in ("m.ckpt.data", "m.ckpt.index", "model_def.json",
                                              "mask.npy")}
    for n in range(1, 6):  # the journal, then data, model_def, mask, index
        directory = tmp_path / f"kill{n}"
        directory.mkdir()
        write_set(directory, "old")
        process = subprocess.run([sys.executable, "-c", code, str(directory), str(n)],
                                 capture_output=True, text=True)
        assert process.returncode == -signal.SIGKILL, process.stderr
        old = {name: f"old {name}" for name in new}
        if n == 1:  # before the journal: the old set, whole
            assert read_set(directory) == old
        else:
            assert "m.ckpt.index" not in read_set(directory), n
        remove_leftovers(str(directory))
        assert read_set(directory) == (old if n == 1 else new)
        assert hidden_names(directory) == []


def test_a_killed_checkpoint_write_never_leaves_a_mixed_pair(tmp_path, monkeypatch):
    prefix = str(tmp_path / "run" / "model.ckpt")
    old_values = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(4, np.int64)}
    new_values = {key: value + 1 for key, value in old_values.items()}

    def holds(values):
        read = checkpoints.read_checkpoint(prefix)
        return read.keys() == values.keys() and all(np.array_equal(read[k], v)
                                                    for k, v in values.items())
    checkpoints.write_checkpoint(old_values, prefix)
    outcomes = []
    for n in (1, 2, 3):  # the journal, the .data, the .index
        failing_nth_rename(monkeypatch, n)
        with pytest.raises(UserError, match="simulated kill"):
            checkpoints.write_checkpoint(new_values, prefix)
        monkeypatch.undo()
        try:
            outcomes.append("old" if holds(old_values) else "other")
        except UserError as exc:
            assert f"checkpoint {prefix} is not there: the run replacing it stopped " \
                   f"before it finished; its new files are complete in " \
                   f"{tmp_path / 'run' / '.staging-'}" in str(exc)
            outcomes.append("none")
        # Another run into the directory finishes the committed one.
        checkpoints.write_checkpoint(old_values, str(tmp_path / "run" / "other.ckpt"))
        assert hidden_names(tmp_path / "run") == []
        assert holds(old_values if n == 1 else new_values)
        checkpoints.write_checkpoint(old_values, prefix)
    assert outcomes == ["old", "none", "none"]


def test_leftovers_of_killed_runs_are_removed_by_the_next_run(tmp_path):
    """An uncommitted staging directory and a temporary file of a dead
    process go; a live run's (locked) staging directory stays."""
    from common.files import _lock, replace_atomically

    directory = tmp_path / "out"
    directory.mkdir()
    dead = directory / ".staging-killed"
    dead.mkdir()
    (dead / "m.ckpt.data").write_bytes(b"x" * 1000)
    live = directory / ".staging-live"
    live.mkdir()
    fd = _lock(str(live))
    child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                           capture_output=True, text=True, check=True)
    stale_tmp = directory / f".mask.npy.tmp{child.stdout.strip()}"  # its process is gone
    stale_tmp.write_bytes(b"y")
    try:
        write_set(str(directory), "new")
        assert sorted(os.listdir(directory)) == sorted(
            [".mask.npy.tmp" + child.stdout.strip(), ".staging-live", "m.ckpt.data",
             "m.ckpt.index", "mask.npy", "model_def.json"])
        replace_atomically(str(directory / "mask.npy"), lambda tmp: open(tmp, "w").close())
        assert hidden_names(directory) == [".staging-live"]
    finally:
        os.close(fd)
    write_set(str(directory), "again")
    assert hidden_names(directory) == []


def _prune_arguments(tiny, rank_path, directory, **settings):
    """prun_model.py's arguments writing model.ckpt, model_def.json and
    mask.npy in ``directory``; ``settings`` replace any."""
    values = dict(checkpoint_name=tiny["checkpoint"], save_nvidia_name=rank_path,
                  model_def=tiny["model_def_path"], Num_classes=NUM_CLASSES, height=HEIGHT,
                  width=WIDTH, phase="block1", all_convs="true", mask_load="None",
                  histogram_save="None", new_checkpoint_save=directory / "model.ckpt",
                  mask_save=directory / "mask.npy",
                  new_model_def=directory / "model_def.json")
    values.update(settings)
    return [item for key, value in values.items() for item in (f"--{key}", value)]


def _prune_in_process(tiny, rank_path, directory, **settings):
    """The same run as prun_model.py in this process, without its graph checks."""
    from netcompress.jobs import prune as pruning

    values = dict(decide_threshold=False, phase="block1", all_convs=True, conv_name=None,
                  rank_file=rank_path, threshold=0.2, checkpoint_name=tiny["checkpoint"],
                  gpu_id="", try_zeros=False, mask_load=None, num_classes=NUM_CLASSES,
                  height=HEIGHT, width=WIDTH, model_def=tiny["model_def_path"],
                  histogram_save=None, new_checkpoint_save=str(directory / "model.ckpt"),
                  mask_save=str(directory / "mask.npy"),
                  new_model_def=str(directory / "model_def.json"))
    values.update(settings)
    return pruning.prune(pruning.PruneSettings(**values), log=lambda line: None,
                         verify=False)


def test_a_pruned_set_is_replaced_whole_or_not_at_all(tiny, tmp_path, monkeypatch):
    """try_zeros into a pruned set's paths is refused (it would leave the
    set's model_def and mask); a removal run replaces the whole set, its
    stale mask included; a kill at its last rename is finished by the next
    run into the directory."""
    from models.model_def import load_model_def
    from netcompress.jobs.prune import verify_checkpoint

    rank_path = write_rank_file(tmp_path / "rank.npz", tiny["model_def"])
    pruned = tmp_path / "pruned"
    _prune_in_process(tiny, rank_path, pruned, threshold=0.5)
    assert sorted(os.listdir(pruned)) == [
        "checkpoint", "mask.npy", "model.ckpt.data-00000-of-00001", "model.ckpt.index",
        "model.ckpt.set.json", "model_def.json"]
    before = hash_tree(pruned)
    result = run_script("prun_model.py", *_prune_arguments(tiny, rank_path, pruned,
                                                           try_zeros="true"))
    assert_one_line_error(result, f"new_checkpoint_save '{pruned / 'model.ckpt'}.index' "
                                  f"belongs to the set of files listed in "
                                  f"{pruned / 'model.ckpt'}.set.json", "new_model_def",
                          "model_def.json")
    # Part of a set is refused as another output too.
    result = run_script("prun_model.py", *_prune_arguments(
        tiny, rank_path, tmp_path / "elsewhere", mask_save=pruned / "mask.npy"))
    assert_one_line_error(result, f"mask_save '{pruned / 'mask.npy'}' belongs to the set")
    assert hash_tree(pruned) == before

    # A threshold that leaves no residual mask: the old mask goes with the
    # commit; a kill at the .index rename (the last) leaves no checkpoint.
    calls = failing_nth_rename(monkeypatch, 1, into=pruned / "model.ckpt.index")
    with pytest.raises(UserError, match="simulated kill.*the next run writing there"):
        _prune_in_process(tiny, rank_path, pruned, threshold=0.0)
    monkeypatch.undo()
    assert calls[0] == 1 and not os.path.exists(pruned / "model.ckpt.index")
    assert not os.path.exists(pruned / "mask.npy")  # went before the .index
    with pytest.raises(UserError, match="the run replacing it stopped before it finished"):
        checkpoints.read_checkpoint(str(pruned / "model.ckpt"))
    assert hidden_names(pruned)
    _prune_in_process(tiny, rank_path, pruned, new_checkpoint_save=str(pruned / "other.ckpt"),
                      new_model_def=str(pruned / "other.json"),
                      mask_save=str(pruned / "other_mask.npy"))
    assert hidden_names(pruned) == [] and not os.path.exists(pruned / "mask.npy")
    verify_checkpoint(str(pruned / "model.ckpt"), load_model_def(pruned / "model_def.json"),
                      {}, NUM_CLASSES, HEIGHT, WIDTH, "pruned")
    # A damaged manifest is one line too, before any work.
    (pruned / "model.ckpt.set.json").write_text("{not json")
    result = run_script("prun_model.py", *_prune_arguments(tiny, rank_path, pruned))
    assert_one_line_error(result, f"set manifest {pruned / 'model.ckpt.set.json'} is "
                                  f"unreadable or damaged")

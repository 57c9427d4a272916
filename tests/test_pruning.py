"""Pruning: selection, the plan, removal == try_zeros, files, masks, errors.

One random-weight tiny model (widths /16 of the default, 32x64 inputs) is
written once; each exactness case prunes several layers of it at once
(remove_channels), zeros them (zero_channels) and compares the two networks'
softmax and aux outputs on one fixed batch. Batch-norm betas and moving
statistics are random and non-trivial (each case checks that zeroing the
producers' kernels alone would *not* be equivalent); the moving statistics
sit near the batch's own so that activations stay well scaled.
"""

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import types
from unittest import mock

import numpy as np
import pytest
import tensorflow as tf

from helpers import FLOAT32_PASS_TOLERANCE, REPO, random_values, scaled_model_def
from models.AdapNet_pp import AdapNet_pp
from models.architecture import adapnet_pp, resolve_widths
from models.model_def import load_masks, load_model_def, save_masks, save_model_def
from netcompress.jobs import prune as pruning
from netcompress.formats.checkpoints import check_matches, checkpoint_key, model_variables, \
    read_checkpoint, write_checkpoint
from common.digests import checkpoint_digest
from common.errors import UserError
from netcompress.settings.config import load_config
from netcompress.formats.description import describe, read_description
from netcompress.pruning_math.costs import conv_costs, inference_macs, spatial_sizes, \
    total_parameters
from netcompress.pruning_math.plan import plan_pruning, plan_removal, remove_channels, \
    zero_channels
from netcompress.jobs.prune_report import cost_report
from netcompress.formats.rankfile import RankSums, masks_json
from netcompress.pruning_math.scores import channels_to_keep, normalise
from netcompress.pruning_math.selection import select_layers

tf1 = tf.compat.v1
tf1.disable_eager_execution()

NUM_CLASSES = 4
HEIGHT, WIDTH = 32, 64
# Removed and zeroed channels give the same sums in another float32 order
# (adding an exact zero is exact; a narrower conv blocks differently): see
# helpers.FLOAT32_PASS_TOLERANCE. Softmax outputs are in [0, 1]; logits are
# compared relative to their scale. Pruning itself moves them by > 1e-3.
TOLERANCE = FLOAT32_PASS_TOLERANCE
AUX_HEADS = ("conv911", "conv912")
ARCHITECTURE = adapnet_pp()
SESSION_CONFIG = tf1.ConfigProto()
# Graph rewriting costs more than these tiny graphs ever run.
SESSION_CONFIG.graph_options.rewrite_options.disable_meta_optimizer = True
LAYERS = [g.name for g in ARCHITECTURE.prunable_groups()]
STREAMS = [g.name for g in ARCHITECTURE.stream_groups()]


def _variable_behind(tensor):
    """The variable a (read of a) variable tensor comes from."""
    op = tensor.op
    while op.type not in ("VarHandleOp", "VariableV2"):
        op = op.inputs[0].op
    return op.name


class BatchNormCalibrator:
    """Sets moving statistics near the batch statistics of a fixed batch
    (randomly off by a fraction of a standard deviation). Random statistics
    alone let activations grow ~1e3-fold over the depth; the softmax would
    saturate and float rounding of huge logits would decide the comparisons."""

    def __init__(self, model_def, images):
        self.graph = tf.Graph()
        # Training mode gives every batch norm its batch statistics; without the
        # dropout of block4/unit_3, which inference does not apply.
        with self.graph.as_default(), \
                mock.patch.object(tf1.nn, "dropout", lambda x, rate: x):
            AdapNet_pp(model_def, NUM_CLASSES).build(tf.constant(images), training=True,
                                                     aux=True)
            norms = [op for op in self.graph.get_operations()
                     if op.type.startswith("FusedBatchNorm")]
            self.scopes = [_variable_behind(op.inputs[1]).rsplit("/", 1)[0] for op in norms]
            self.statistics = [(op.outputs[1], op.outputs[2]) for op in norms]
            self.variables = model_variables(self.graph)
            self.feeds = [tf1.placeholder(v.dtype.base_dtype, v.shape) for v in self.variables]
            self.load = tf.group(*[v.assign(p) for v, p in zip(self.variables, self.feeds)])
        self.graph.finalize()
        self.session = tf1.Session(graph=self.graph, config=SESSION_CONFIG)

    def __call__(self, values, seed):
        rng = np.random.default_rng(seed)
        self.session.run(self.load, {p: values[checkpoint_key(v.name)]
                                     for v, p in zip(self.variables, self.feeds)})
        calibrated = dict(values)
        for scope, (mean, variance) in zip(self.scopes, self.session.run(self.statistics)):
            std = np.sqrt(variance + 1e-5)
            calibrated[f"{scope}/moving_mean"] = (
                mean + rng.uniform(-0.1, 0.1, mean.shape) * std).astype(np.float32)
            # A floor: a channel nearly constant over the batch (image pooling
            # sees 2 values) would otherwise amplify float rounding ~1e3-fold.
            variance = np.maximum(variance, mean ** 2 + 1.0)
            calibrated[f"{scope}/moving_variance"] = (
                variance * rng.uniform(0.8, 1.2, variance.shape)).astype(np.float32)
        return calibrated


class Network:
    """An inference graph (aux heads built) into which checkpoint values load."""

    def __init__(self, model_def, masks):
        self.graph = tf.Graph()
        with self.graph.as_default():
            model = AdapNet_pp(model_def, NUM_CLASSES, masks)
            self.images = tf1.placeholder(tf.float32, [2, HEIGHT, WIDTH, 3])
            outputs = model.build(self.images, training=False, aux=True)
            self.fetches = {"softmax": outputs.probabilities}
            for name in AUX_HEADS:
                self.fetches[name] = outputs.aux_logits[name]
                self.fetches[name + "/softmax"] = tf.nn.softmax(outputs.aux_logits[name])
            self.variables = model_variables(self.graph)
            self.feeds = [tf1.placeholder(v.dtype.base_dtype, v.shape) for v in self.variables]
            self.load = tf.group(*[v.assign(p) for v, p in zip(self.variables, self.feeds)])
        self.graph.finalize()
        self.session = tf1.Session(graph=self.graph, config=SESSION_CONFIG)

    def run(self, values, images):
        self.session.run(self.load, {p: values[checkpoint_key(v.name)]
                                     for v, p in zip(self.variables, self.feeds)})
        return self.session.run(self.fetches, {self.images: images})


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """The tiny model on disk (checkpoint, model_def), its values, a batch and
    its built network (reused by every zeroed run)."""
    directory = tmp_path_factory.mktemp("source")
    model_def = scaled_model_def(16)
    network = Network(model_def, {})
    rng = np.random.default_rng(7)
    images = rng.uniform(0.0, 255.0, [2, HEIGHT, WIDTH, 3]).astype(np.float32)
    calibrate = BatchNormCalibrator(model_def, images)
    values = calibrate(random_values(network.variables, rng), seed=1)
    checkpoint = str(directory / "train" / "model.ckpt")
    write_checkpoint(values, checkpoint)
    model_def_path = str(directory / "tiny.json")
    save_model_def(model_def, model_def_path)
    yield dict(directory=directory, model_def=model_def, values=values, images=images,
               network=network, calibrate=calibrate, checkpoint=checkpoint,
               model_def_path=model_def_path)
    network.session.close()
    calibrate.session.close()


def removal_scores(model_def, layers, fraction=0.5, seed=0):
    """Normalised scores removing a scattered ``fraction`` of each layer's
    channels at threshold 0.1 (never all: max-normalised scores keep one at 1)."""
    rng = np.random.default_rng(seed)
    widths = resolve_widths(model_def, NUM_CLASSES)
    scores = {}
    for layer in LAYERS + STREAMS:
        values = rng.uniform(0.2, 1.0, widths[layer])
        values /= values.max()
        if layer in layers:
            count = min(max(1, int(round(fraction * widths[layer]))), widths[layer] - 1)
            values[rng.choice(widths[layer], count, replace=False)] = 0.05
        scores[layer] = normalise(values, "max")
    return scores


def assert_same_outputs(first, second):
    assert first.keys() == second.keys()
    for name in first:
        difference = np.max(np.abs(first[name] - second[name]))
        if name in AUX_HEADS:  # logits: tolerance relative to their scale
            scale = max(1.0, float(np.max(np.abs(first[name]))))
            assert difference <= TOLERANCE * scale, (name, difference, scale)
        else:
            assert difference <= TOLERANCE, (name, difference)


def check_removal_equals_zeroing(source, layers, threshold=0.1):
    """Prune ``layers`` of the source model by removal and by zeroing; the two
    networks must give the same outputs, different from the unpruned one."""
    model_def, network, images = source["model_def"], source["network"], source["images"]
    scores = removal_scores(model_def, layers)
    plan = plan_pruning(model_def, {}, NUM_CLASSES, scores, layers, threshold)
    assert plan.pruned_layers, "the case must remove something"
    # Statistics of the network as pruned keep the outputs well scaled; the
    # zeroed slices stay zero, so both appliers start from the same values.
    values = source["calibrate"](zero_channels(plan, source["values"]), seed=2)
    zeroed_values = zero_channels(plan, values)
    assert all(np.array_equal(zeroed_values[n], values[n]) for n in values)
    pruned_network = Network(plan.model_def_after, plan.masks_after)
    try:
        pruned = pruned_network.run(remove_channels(plan, values), images)
    finally:
        pruned_network.session.close()
    zeroed = network.run(zeroed_values, images)
    assert_same_outputs(pruned, zeroed)
    assert pruned["softmax"].max(axis=-1).mean() < 0.99, "saturated softmax: tests little"
    original = network.run(source["values"], images)
    assert np.max(np.abs(original["softmax"] - pruned["softmax"])) > 1e-3, \
        "pruning changed nothing: the case tests nothing"
    if any(s.role == "output" for s in plan.slices):
        # Zeroing the producers' kernels instead of the consumers' inputs leaves
        # the batch norms' constants in: not removal, and these weights show it.
        naive = {name: np.array(value) for name, value in values.items()}
        for piece in plan.slices:
            index = [slice(None)] * naive[piece.variable].ndim
            index[piece.axis] = list(piece.indices)
            index = tuple(index)
            if piece.role == "input" and piece.variable in source["values"]:
                naive[piece.variable][index] = source["values"][piece.variable][index]
            elif piece.role == "output" and piece.variable.endswith("/weights"):
                naive[piece.variable][index] = 0.0
        naive_outputs = network.run(naive, images)
        assert np.max(np.abs(naive_outputs["softmax"] - pruned["softmax"])) > 1e-3
    return plan


# Each case prunes several kinds of layer at once (one graph build per case).
EXACTNESS_CASES = {
    "backbone": [
        "conv1",
        # a unit's conv1 and conv2; block1/unit_1's shortcut reads its conv1
        "block1/unit_1/bottleneck_v1/conv1", "block1/unit_1/bottleneck_v1/conv2",
        "block2/unit_1/bottleneck_v1/conv2", "block3/unit_2/bottleneck_v1/conv1",
        # both halves of split conv2s (block4: both atrous)
        "block2/unit_4/bottleneck_v1/conv2/A", "block2/unit_4/bottleneck_v1/conv2/B",
        "block3/unit_5/bottleneck_v1/conv2/A", "block3/unit_5/bottleneck_v1/conv2/B",
        "block4/unit_1/bottleneck_v1/conv2/A", "block4/unit_1/bottleneck_v1/conv2/B",
        # conv3 of a shortcut unit and of an identity unit (masks)
        "block2/unit_1/bottleneck_v1/conv3", "block3/unit_2/bottleneck_v1/conv3"],
    "easpp": [
        "conv256", "conv71", "conv81", "conv91",  # conv10's concat offsets
        "conv7", "conv248", "conv249",  # atrous
        "conv10"],  # feeds a transposed conv; its own input slices change too
    "decoder": [
        "conv41", "conv16",  # transposed; feed a concat and an aux head
        "conv89", "conv96", "conv88", "conv95"],
    # Every block's stream: its writers (shortcut, conv3s), its pre-activation
    # batch norms and every reader (units' conv1s, the next block's conv1 and
    # shortcut, the skips conv32 / conv174, the eASPP's 1x1s and image pooling).
    "streams": STREAMS,
    # A stream and conv3s of its block (masked) and of another block.
    "stream_and_conv3": ["block3/residual", "block3/unit_1/bottleneck_v1/conv3",
                         "block3/unit_4/bottleneck_v1/conv3",
                         "block1/unit_2/bottleneck_v1/conv3"],
}


@pytest.mark.onednn
@pytest.mark.parametrize("layers", EXACTNESS_CASES.values(), ids=EXACTNESS_CASES.keys())
def test_removal_equals_try_zeros(source, layers):
    check_removal_equals_zeroing(source, layers)


def test_every_layer_down_to_one_channel(source):
    plan = check_removal_equals_zeroing(source, LAYERS, threshold=2.0)
    assert all(len(cut.kept) == 1 for cut in plan.layers)
    assert plan.model_def_after["params"]["1"] == 1
    assert plan.model_def_after["split"]["8"] == [1, 1]
    assert plan.model_def_after["params"]["8"][1] == 2


def test_threshold_zero_removes_nothing(source):
    scores = removal_scores(source["model_def"], LAYERS)
    plan = plan_pruning(source["model_def"], {}, NUM_CLASSES, scores, LAYERS, 0.0)
    assert not plan.pruned_layers and not plan.slices
    assert plan.model_def_after == source["model_def"] and plan.masks_after == {}
    values = remove_channels(plan, source["values"])
    assert all(np.array_equal(values[n], source["values"][n]) for n in source["values"])
    first = source["network"].run(source["values"], source["images"])
    second = source["network"].run(values, source["images"])
    assert all(np.array_equal(first[name], second[name]) for name in first)


def test_plan_slices_follow_the_declaration(source):
    """Offsets and axes by hand for the tricky consumers."""
    model_def = source["model_def"]
    scores = removal_scores(model_def, [])
    scores["conv81"] = normalise(np.r_[0.0, 1.0, 0.0, np.ones(13)], "max")
    scores["conv41"] = normalise(np.r_[1.0, 0.0, np.ones(14)], "max")
    plan = plan_pruning(model_def, {}, NUM_CLASSES, scores, ["conv81", "conv41"], 0.1)
    cuts = {(s.variable.split("/", 1)[1], s.axis): s.indices for s in plan.slices}
    # conv10 reads [conv256 16 | conv71 16 | conv81 16 | conv91 16 | conv57 256].
    assert cuts[("conv10/weights", 2)] == (32, 34)
    assert cuts[("conv81/weights", 3)] == (0, 2)
    assert cuts[("conv81/BatchNorm/moving_mean", 0)] == (0, 2)
    # Transposed kernels are [k, k, out, in]; conv89 reads [conv41 | conv174].
    assert cuts[("conv41/weights", 2)] == (1,)
    assert cuts[("conv89/weights", 2)] == (1,)
    assert cuts[("conv912/weights", 2)] == (1,)
    assert plan.model_def_after["params"]["26"] == 14
    assert plan.model_def_after["params"]["32"] == 15
    wrong = dict(source["values"])
    wrong["resnet_v2_50/conv10/weights"] = np.zeros([1, 1, 8, 16], np.float32)
    with pytest.raises(UserError, match=r"conv10/weights is \[1, 1, 8, 16\], the model_def "
                                        r"gives 320 channels on axis 2"):
        remove_channels(plan, wrong)


def test_stream_plan_follows_the_declaration(source):
    """A stream's slices, widths and masks by hand: block2's stream (32 wide)
    loses channels 1 and 2 while block2/unit_3's conv3 is masked (it lacks
    stream positions 1 and 5)."""
    model_def = json.loads(json.dumps(source["model_def"]))
    model_def["params"]["7"][2] = 30
    kept = np.array([c for c in range(32) if c not in (1, 5)])
    masks = {"block2/unit_3": (kept, 32)}

    def stream_plan(removed, masks=masks, model_def=model_def):
        scores = removal_scores(model_def, [])
        scores["block2/residual"] = normalise(
            np.where(np.isin(np.arange(32), removed), 0.0, 1.0), "max")
        return plan_pruning(model_def, masks, NUM_CLASSES, scores, ["block2/residual"], 0.1)

    plan = stream_plan([1, 2])
    cuts = {(s.variable.split("/", 1)[1], s.axis): (s.indices, s.length, s.role)
            for s in plan.slices}
    unit = "block{}/unit_{}/bottleneck_v1/{}".format
    assert cuts[(unit(2, 1, "shortcut/weights"), 3)] == ((1, 2), 32, "output")
    for u in (1, 2, 4):
        assert cuts[(unit(2, u, "conv3/weights"), 3)] == ((1, 2), 32, "output")
    # The masked conv3's column 1 sits at stream position 2.
    assert cuts[(unit(2, 3, "conv3/weights"), 3)] == ((1,), 30, "output")
    for u in (1, 2, 3, 4):  # every pre-activation batch norm on the stream
        assert cuts[(unit(2, u, "conv3/BatchNorm/moving_variance"), 0)] == \
            ((1, 2), 32, "output")
    readers = [unit(2, u, "conv1/weights") for u in (2, 3, 4)] + [
        unit(3, 1, "conv1/weights"), unit(3, 1, "shortcut/weights"), "conv174/weights"]
    for reader in readers:
        assert cuts[(reader, 2)] == ((1, 2), 32, "input")
    assert len(plan.slices) == 5 + 4 * 4 + len(readers)
    assert {s.variable for s in plan.zeroing_slices()} == \
        {f"resnet_v2_50/{r}" for r in readers}
    after = plan.model_def_after["params"]
    assert after["5"] == [8, 8, 30, 30]
    assert [after[k][2] for k in ("6", "7", "8")] == [30, 29, 30]
    # Positions renumbered in the 30-wide stream: old 5 is now 3.
    assert plan.masks_after["block2/unit_3"][0].tolist() == \
        [c for c in range(30) if c != 3]
    assert plan.masks_after["block2/unit_3"][1] == 30
    # Removing exactly what the mask lacks: the conv3 writes the whole stream again.
    plan = stream_plan([1, 5])
    assert plan.masks_after == {} and plan.model_def_after["params"]["7"][2] == 30
    # The masked conv3 keeps only channel 0 (stream position 0), which the
    # stream loses: it keeps its channel 1 (position 2, now 0) instead.
    scores = removal_scores(model_def, [])
    scores["block2/residual"] = normalise(np.r_[0.0, 0.0, np.ones(30)], "max")
    scores["block2/unit_3/bottleneck_v1/conv3"] = normalise(np.r_[1.0, np.zeros(29)], "max")
    plan = plan_pruning(model_def, masks, NUM_CLASSES, scores,
                        ["block2/residual", "block2/unit_3/bottleneck_v1/conv3"], 0.1)
    assert plan.given_back == {"block2/unit_3/bottleneck_v1/conv3": (1,)}
    assert plan.masks_after["block2/unit_3"][0].tolist() == [0]
    assert plan.model_def_after["params"]["7"][2] == 1
    assert "keeps channel 1 too" in plan.notes[0]
    narrow = json.loads(json.dumps(source["model_def"]))
    narrow["params"]["7"][2] = 2
    # The stream removes both positions a conv3 masked to [0, 1] writes: the
    # stream keeps position 0 (given back), the conv3 writes it alone.
    plan = stream_plan([0, 1], {"block2/unit_3": (np.array([0, 1]), 32)}, narrow)
    assert plan.given_back == {"block2/residual": (0,)}
    assert "block2/residual: keeps channel 0 too" in plan.notes[0]
    assert plan.model_def_after["params"]["5"][3] == 31
    assert plan.model_def_after["params"]["7"][2] == 1
    assert plan.masks_after["block2/unit_3"][0].tolist() == [0]
    assert plan.masks_after["block2/unit_3"][1] == 31


def _plan_facts(plan):
    return (plan.layers, plan.slices, plan.model_def_after, plan.notes, plan.given_back,
            {unit: (kept.tolist(), width) for unit, (kept, width) in plan.masks_after.items()})


def test_explicit_removal_plans_as_its_scores(source):
    """plan_removal of a removal is plan_pruning of scores that threshold to
    it, on a stream with a masked conv3 (block2/unit_3 lacks positions 1, 5);
    round_to and min_channels give back the lowest removed channels, as equal
    scores below the threshold do."""
    model_def = json.loads(json.dumps(source["model_def"]))
    model_def["params"]["7"][2] = 30
    masks = {"block2/unit_3": (np.array([c for c in range(32) if c not in (1, 5)]), 32)}
    layers = ["conv1", "block1/unit_1/bottleneck_v1/conv2", "block2/residual",
              "block2/unit_3/bottleneck_v1/conv3", "conv81"]
    scores = removal_scores(model_def, layers)
    removed = {layer: np.flatnonzero(scores[layer] < 0.1) for layer in layers}
    assert all(len(indices) for indices in removed.values())
    by_scores = plan_pruning(model_def, masks, NUM_CLASSES, scores, layers, 0.1)
    explicit = plan_removal(model_def, masks, NUM_CLASSES, removed)
    assert _plan_facts(explicit) == _plan_facts(by_scores)
    assert by_scores.threshold == 0.1 and explicit.threshold is None
    assert cost_report(explicit, HEIGHT, WIDTH).splitlines()[0] == \
        f"pruned {len(layers)} of {len(layers)} selected layer(s) by an explicit removal"
    for min_channels, round_to in ((1, 4), (12, 1)):
        binary = {layer: np.where(np.isin(np.arange(len(scores[layer])), indices), 0.0, 1.0)
                  for layer, indices in removed.items()}
        assert _plan_facts(plan_removal(model_def, masks, NUM_CLASSES, removed, min_channels,
                                        round_to)) == \
            _plan_facts(plan_pruning(model_def, masks, NUM_CLASSES, binary, layers, 0.5,
                                     min_channels, round_to))
    # conv81 (16 wide) keeps 11: round_to 4 gives back channel 3, the lowest removed.
    plan = plan_removal(model_def, masks, NUM_CLASSES, {"conv81": [3, 5, 7, 9, 11]},
                        round_to=4)
    assert plan.layers[0].removed == (5, 7, 9, 11)
    plan = plan_removal(model_def, masks, NUM_CLASSES, {"conv81": range(2, 16)},
                        min_channels=4)
    assert plan.layers[0].removed == tuple(range(4, 16))


@pytest.mark.parametrize("layer, width", [("conv81", 16), ("block2/residual", 32)])
def test_explicit_removal_of_every_channel_is_an_error(source, layer, width):
    with pytest.raises(UserError) as raised:
        plan_removal(source["model_def"], {}, NUM_CLASSES, {layer: range(width)})
    assert str(raised.value) == \
        f"{layer}: the removal takes all its {width} channels; a layer keeps at least one"


def test_pruned_files_restore_exactly(source, tmp_path):
    """prune() on files: the graph of the new model_def + mask restores the
    new checkpoint with no missing or unexpected variable; sources untouched."""
    layers = ["conv1", "block1/unit_3/bottleneck_v1/conv3", "conv16"]
    before = hash_files(source["directory"])
    settings = None
    for stage, layer in enumerate(layers):  # one layer per stage, as recommended
        directory = tmp_path / f"stage{stage}"
        model_def = load_model_def(settings.new_model_def) if settings else source["model_def"]
        rank_path = write_rank_file(directory / "rank.npz", model_def, [layer])
        if settings is None:
            settings = make_settings(source, directory, rank_path, phase="all",
                                     all_convs=False, conv_name=layer)
        else:
            settings = next_stage(settings, directory, source, rank_path)
            settings.conv_name = layer
        pruning.prune(settings, log=quiet, verify=False)
    assert hash_files(source["directory"]) == before
    model_def = load_model_def(settings.new_model_def)
    masks = load_masks(settings.mask_save)
    assert list(masks) == ["block1/unit_3"]
    graph = tf.Graph()
    with graph.as_default():
        AdapNet_pp(model_def, NUM_CLASSES, masks).build(
            tf1.placeholder(tf.float32, [1, HEIGHT, WIDTH, 3]), aux=True)
        check_matches(settings.new_checkpoint_save, model_variables(graph))
    assert not any("Adam" in name for name in read_checkpoint(settings.new_checkpoint_save))


def test_checkpoint_of_another_model_is_refused(source):
    model_def = json.loads(json.dumps(source["model_def"]))
    model_def["params"]["33"] = 8
    with pytest.raises(UserError, match=r"conv89/weights is \[3, 3, 40, 16\] in the "
                                        r"checkpoint but \[3, 3, 40, 8\] in the model"):
        pruning.verify_checkpoint(source["checkpoint"], model_def, {}, NUM_CLASSES, HEIGHT,
                                  WIDTH, "model_def x")


def test_pruning_builds_the_model_class_named(source, tmp_path, monkeypatch):
    """The graph checks build the class that the model name gives (here the
    checkpoint's description; compress.py's `model`), not AdapNet_pp."""
    built = []

    class Recording(AdapNet_pp):
        def build(self, *args, **kwargs):
            built.append(type(self).__name__)
            return super().build(*args, **kwargs)

    module = types.ModuleType("models.recording")
    module.Recording = Recording
    monkeypatch.setitem(sys.modules, "models.recording", module)
    checkpoint = str(tmp_path / "described" / "model.ckpt")
    write_checkpoint(source["values"], checkpoint,
                     describe(source["model_def"], {}, NUM_CLASSES, "recording.Recording"))
    rank_path = write_rank_file(tmp_path / "rank.npz", source["model_def"], ["conv1"])
    settings = make_settings(source, tmp_path, rank_path, checkpoint_name=checkpoint,
                             model_def=None, all_convs=False, conv_name="conv1")
    pruning.prune(settings, log=quiet)
    assert built == ["Recording", "Recording"]  # the source, then the pruned checkpoint
    assert read_description(settings.new_checkpoint_save).model == "recording.Recording"


def test_rank_file_of_another_checkpoint_is_refused(source, tmp_path):
    """Ranks hold for the content they were computed on: pruning another
    checkpoint (one weight differs) with them is refused before anything is
    written; a copy of the ranked checkpoint is the same content; a rank
    file that records no checkpoint digest is used with a warning."""
    def copy_source(directory):
        directory.mkdir()
        for suffix in (".index", ".data-00000-of-00001"):
            shutil.copy(source["checkpoint"] + suffix, directory / ("model.ckpt" + suffix))
        return str(directory / "model.ckpt")

    other = copy_source(tmp_path / "other")
    with open(other + ".data-00000-of-00001", "r+b") as f:  # one weight changed
        f.seek(64)
        byte = f.read(1)
        f.seek(64)
        f.write(bytes([byte[0] ^ 1]))
    rank_path = write_rank_file(tmp_path / "rank.npz", source["model_def"], ["conv1"],
                                checkpoint=source["checkpoint"], masks={})
    settings = make_settings(source, tmp_path, rank_path, phase="conv1", all_convs=True,
                             try_zeros=True, checkpoint_name=other)
    with pytest.raises(UserError, match=rf"rank file {rank_path} ranks another checkpoint "
                                        rf"\({source['checkpoint']}, sha256 [0-9a-f]{{12}}\) "
                                        rf"than {other} \(sha256 [0-9a-f]{{12}}\): rerank"):
        pruning.prune(settings, log=quiet, verify=False)
    assert not os.path.exists(tmp_path / "pruned")

    settings.checkpoint_name = copy_source(tmp_path / "copy")
    messages = []
    pruning.prune(settings, log=messages.append, verify=False)
    assert f"checkpoint: {settings.checkpoint_name} (sha256 " \
           f"{checkpoint_digest(source['checkpoint'])[:12]})" in messages
    assert not any(line.startswith("warning") for line in messages)

    legacy = write_rank_file(tmp_path / "legacy.npz", source["model_def"], ["conv1"])
    messages = []
    RankSums.load(legacy).check_checkpoint(other, checkpoint_digest(other), messages.append)
    assert messages == [f"warning: rank file {legacy} records no checkpoint digest (written "
                        f"before they were recorded): not checked that it ranks {other}"]


def test_rank_file_of_another_mask_is_refused(source, tmp_path):
    """Two masks keeping as many channels of block1/unit_2's conv3 give the
    same widths; the rank file says which one it was computed with."""
    model_def = json.loads(json.dumps(source["model_def"]))
    residual = model_def["params"]["2"][3]
    model_def["params"]["3"][2] = residual - 2
    model_def_path = str(tmp_path / "masked.json")
    save_model_def(model_def, model_def_path)
    ranked = {"block1/unit_2": (np.arange(2, residual), residual)}
    given = {"block1/unit_2": (np.arange(residual - 2), residual)}
    mask_path = str(tmp_path / "given.npy")
    save_masks(given, mask_path)
    rank_path = write_rank_file(tmp_path / "rank.npz", model_def, ["conv1"], masks=ranked)
    settings = make_settings(source, tmp_path, rank_path, phase="conv1", all_convs=True,
                             model_def=model_def_path, mask_load=mask_path)
    with pytest.raises(UserError) as info:
        pruning.prepare(settings)
    assert str(info.value) == (
        f"rank file {rank_path} was computed with another mask than {mask_path}: "
        f"block1/unit_2 keeps [2, 3, 4, 5, 6, 7, ...] of {residual} in the rank file, "
        f"[0, 1, 2, 3, 4, 5, ...] of {residual} in the mask; rerank with get_oracle_rank.py "
        f"and this mask")
    save_masks(ranked, mask_path)
    assert pruning.prepare(settings).layers == ["conv1"]


def test_second_pruning_composes_masks(source, tmp_path):
    """Stage 1 masks block2/unit_1 and block1/unit_2; stage 2 prunes
    block2/unit_1 again: its mask composes, block1/unit_2's is carried.
    Stage 3 prunes block2's stream: the mask is renumbered, and removal
    equals try_zeros on the masked model."""
    unit1, unit2 = "block2/unit_1/bottleneck_v1/conv3", "block1/unit_2/bottleneck_v1/conv3"
    first_removed = {unit1: [1, 5, 7], unit2: [0, 15]}
    rank_path = write_rank_file(tmp_path / "rank1.npz", source["model_def"], [],
                                removed=first_removed)
    settings = make_settings(source, tmp_path / "stage1", rank_path, phase="all",
                             all_convs=True)
    pruning.prune(settings, log=quiet, verify=False)
    masks = load_masks(settings.mask_save)
    kept_first = [c for c in range(32) if c not in (1, 5, 7)]
    assert masks["block2/unit_1"][0].tolist() == kept_first
    assert masks["block1/unit_2"][0].tolist() == list(range(1, 15))

    stage1 = settings
    model_def = load_model_def(stage1.new_model_def)
    rank_path = write_rank_file(tmp_path / "rank2.npz", model_def, [],
                                removed={unit1: [0, 3]})
    settings = next_stage(stage1, tmp_path / "stage2", source, rank_path)
    settings.phase, settings.all_convs = "block2/unit_1", False
    settings.conv_name = "conv3"
    pruning.prune(settings, log=quiet, verify=False)
    masks = load_masks(settings.mask_save)
    # Local channel 0 of stage 1 is residual channel 0, local 3 is residual 4.
    assert masks["block2/unit_1"][0].tolist() == [c for c in range(32)
                                                  if c not in (0, 1, 4, 5, 7)]
    assert masks["block1/unit_2"][0].tolist() == list(range(1, 15))
    assert load_model_def(settings.new_model_def)["params"]["5"][2] == 27

    # The composed model computes what stage 1 with those channels zeroed computes.
    stage1_values = read_checkpoint(stage1.new_checkpoint_save)
    stage1_network = Network(model_def, load_masks(stage1.mask_save))
    stage2_network = Network(load_model_def(settings.new_model_def),
                             load_masks(settings.mask_save))
    try:
        zeroed_settings = next_stage(stage1, tmp_path / "zeros", source, rank_path)
        zeroed_settings.phase, zeroed_settings.conv_name = "block2/unit_1", "conv3"
        zeroed_settings.all_convs, zeroed_settings.try_zeros = False, True
        pruning.prune(zeroed_settings, log=quiet, verify=False)
        zeroed = stage1_network.run(read_checkpoint(zeroed_settings.new_checkpoint_save),
                                    source["images"])
        pruned = stage2_network.run(read_checkpoint(settings.new_checkpoint_save),
                                    source["images"])
        assert_same_outputs(pruned, zeroed)
        unpruned = stage1_network.run(stage1_values, source["images"])
        assert np.max(np.abs(unpruned["softmax"] - pruned["softmax"])) > 10 * TOLERANCE

        # Stage 3: block2's stream on the masked model. Its mask renumbers.
        # block1's stream loses every position block1/unit_2's conv3 writes
        # (1..14): it keeps position 1 for it (given back).
        stage2 = settings
        rank_path = write_rank_file(tmp_path / "rank3.npz",
                                    load_model_def(stage2.new_model_def), [],
                                    removed={"block2/residual": [0, 4, 6, 9],
                                             "block1/residual": list(range(1, 15))})
        settings = next_stage(stage2, tmp_path / "stage3", source, rank_path)
        settings.phase, settings.all_convs, settings.streams = "all", True, True
        pruning.prune(settings, log=quiet)  # both checkpoints checked against their model
        stage3_def = load_model_def(settings.new_model_def)
        assert stage3_def["params"]["2"][2:] == [3, 3]
        assert stage3_def["params"]["3"][2] == 1
        assert load_masks(settings.mask_save)["block1/unit_2"][0].tolist() == [1]
        assert stage3_def["params"]["5"] == [8, 8, 25, 28]
        assert [stage3_def["params"][k][2] for k in ("6", "7", "8")] == [28, 28, 28]
        positions = [c for c in range(32) if c not in (0, 1, 4, 5, 7, 6, 9)]
        assert load_masks(settings.mask_save)["block2/unit_1"][0].tolist() == [
            c - sum(r < c for r in (0, 4, 6, 9)) for c in positions]
        zeroed_settings = next_stage(stage2, tmp_path / "zeros3", source, rank_path)
        zeroed_settings.phase, zeroed_settings.all_convs = "all", True
        zeroed_settings.streams, zeroed_settings.try_zeros = True, True
        pruning.prune(zeroed_settings, log=quiet, verify=False)
        zeroed = stage2_network.run(read_checkpoint(zeroed_settings.new_checkpoint_save),
                                    source["images"])
        stage3_network = Network(stage3_def, load_masks(settings.mask_save))
        try:
            assert_same_outputs(stage3_network.run(
                read_checkpoint(settings.new_checkpoint_save), source["images"]), zeroed)
        finally:
            stage3_network.session.close()
    finally:
        stage1_network.session.close()
        stage2_network.session.close()


def test_try_zeros_writes_only_a_checkpoint(source, tmp_path):
    rank_path = write_rank_file(tmp_path / "rank.npz", source["model_def"], ["conv96"])
    settings = make_settings(source, tmp_path, rank_path, phase="decoder_conv1",
                             all_convs=False, conv_name="conv2", try_zeros=True)
    result = pruning.prune(settings, log=quiet, verify=False)
    assert result.written == [settings.new_checkpoint_save]
    assert not os.path.exists(settings.new_model_def)
    assert not os.path.exists(settings.mask_save)
    values = read_checkpoint(settings.new_checkpoint_save)
    assert all(values[n].shape == source["values"][n].shape for n in source["values"])


# ---- selection, scores, settings --------------------------------------------

def test_select_layers():
    assert select_layers("all", all_convs=True) == LAYERS
    assert len(LAYERS) == 77
    assert select_layers("conv1", "conv1") == ["conv1"]
    assert select_layers("block3", "conv2/A") == [
        f"block3/unit_{u}/bottleneck_v1/conv2/A" for u in (3, 4, 5, 6)]
    assert select_layers("block2/unit_4", "conv2") == [
        "block2/unit_4/bottleneck_v1/conv2/A", "block2/unit_4/bottleneck_v1/conv2/B"]
    assert select_layers("decoder_conv1", "conv2") == ["conv96"]
    assert select_layers("decoder_conv2", "conv88") == ["conv88"]
    assert select_layers("upsample2", all_convs=True) == ["conv16"]
    assert len(select_layers("easpp", all_convs=True)) == 14
    assert select_layers("all", "conv247") == ["conv247"]
    # Phase all: a full name is that layer only; a short name of many is refused.
    assert select_layers("all", "conv1") == ["conv1"]
    assert select_layers("all", "block2/unit_4/bottleneck_v1/conv2") == [
        "block2/unit_4/bottleneck_v1/conv2/A", "block2/unit_4/bottleneck_v1/conv2/B"]
    with pytest.raises(UserError, match=r"conv_name 'conv2' is ambiguous in phase all: it "
                                        r"names 26 layers"):
        select_layers("all", "conv2")
    with pytest.raises(UserError, match=r"'conv3' is ambiguous in phase all: it names 16"):
        select_layers("all", "conv3")
    with pytest.raises(UserError,
                       match=r"conv_name 'conv12' .*valid: conv256, conv70, conv7, conv247"):
        select_layers("easpp", "conv12")
    with pytest.raises(UserError, match=r"unknown phase 'block5'.*easpp"):
        select_layers("block5", "conv1")


def test_select_streams(source, tmp_path):
    """Streams only when asked for; a rank file without stream scores loads
    for everything else and names the problem when a stream is selected."""
    assert select_layers("all", all_convs=True, streams=True) == \
        [g.name for g in ARCHITECTURE.prunable_groups(streams=True)]
    assert len(select_layers("all", all_convs=True, streams=True)) == 81
    block2 = select_layers("block2", all_convs=True, streams=True)
    assert block2[0] == "block2/residual" and len(block2) == 14
    assert select_layers("block2", all_convs=True) == block2[1:]
    assert select_layers("block3", "residual", streams=True) == ["block3/residual"]
    assert select_layers("all", "block4/residual", streams=True) == ["block4/residual"]
    assert "residual" not in str(select_layers("block2/unit_1", all_convs=True, streams=True))
    with pytest.raises(UserError, match=r"conv_name 'residual' is a residual stream: set "
                                        r"streams true to prune it"):
        select_layers("block3", "residual")
    old = write_rank_file(tmp_path / "old.npz", source["model_def"], ["conv1"], streams=False)
    settings = make_settings(source, tmp_path, old, phase="block1", all_convs=False,
                             conv_name="conv1")
    assert len(pruning.prepare(settings).layers) == 3  # every unit's conv1
    settings.conv_name, settings.streams = "residual", True
    with pytest.raises(UserError, match=r"rank file .*old.npz has no scores for "
                                        r"block1/residual \(written before residual streams "
                                        r"were ranked\): regenerate it"):
        pruning.prepare(settings)


def test_normalise_and_channels_to_keep():
    assert np.allclose(normalise([1.0, -2.0, 4.0], "max"), [0.25, 0.0, 1.0])
    assert np.allclose(normalise([3.0, 4.0], "l2"), [0.6, 0.8])
    assert normalise([0.0, 0.0], "max") is None
    scores = np.array([0.5, 0.05, 1.0, 0.01, 0.3, 0.02, 0.9, 0.2, 0.15, 0.04])
    assert channels_to_keep(scores, 0.1).tolist() == [0, 2, 4, 6, 7, 8]
    assert channels_to_keep(scores, 5.0).tolist() == [2]
    assert channels_to_keep(scores, 5.0, min_channels=3).tolist() == [0, 2, 6]
    assert channels_to_keep(scores, 0.1, round_to=4).tolist() == \
        [0, 1, 2, 4, 6, 7, 8, 9]
    assert channels_to_keep(scores, 0.0).tolist() == list(range(10))


def prune_settings(header, argv):
    """prun_model.py's settings from a header and a command line."""
    from netcompress.settings.cli import parse_script_args
    config_path, overrides, _ = parse_script_args(argv, "prune", "prune", defaults=header)
    return load_config(config_path, "prune", overrides, defaults=(header, "header"))


def test_settings_from_the_command_line():
    header = dict(decide_threshold=False, phase="all", all_convs=True, conv_name=None,
                  save_nvidia_name="r.npz", threshold=0.2, checkpoint_name="c",
                  gpu_id="", try_zeros=False, new_checkpoint_save="n", mask_load=None,
                  mask_save="m.npy", Num_classes=6, height=64, width=128,
                  model_def="a.json", new_model_def="b.json", criterion="taylor",
                  normalisation="max", min_channels=1, round_to=1, histogram_save=None)
    settings = pruning.PruneSettings(**prune_settings(header, [
        "--threshold", "0.3", "--phase", "block1", "--all_convs", "false",
        "--conv_name", "conv2", "--mask_load", "None", "--gpu_id", "1", "--round_to", "8",
        "--Num_classes", "7"]))
    assert (settings.threshold, settings.phase, settings.all_convs) == (0.3, "block1", False)
    assert (settings.conv_name, settings.mask_load, settings.gpu_id) == ("conv2", None, "1")
    assert settings.round_to == 8 and settings.criterion == "taylor"
    # The original's names map to the library's at the script boundary.
    assert (settings.num_classes, settings.rank_file) == (7, "r.npz")
    with pytest.raises(UserError, match="'try_zeros' must be true or false, got 'maybe'"):
        prune_settings(header, ["--try_zeros", "maybe"])
    with pytest.raises(UserError, match="'height' must be a multiple of 16, got 40"):
        prune_settings(header, ["--height", "40"])
    with pytest.raises(UserError, match="unknown key 'treshold'.*did you mean 'threshold'"):
        prune_settings(header, ["--set", "treshold=0.3"])
    with pytest.raises(SystemExit):  # argparse: no such flag
        prune_settings(header, ["--treshold", "0.3"])
    # Either name overrides the header; both on one command line is refused.
    assert prune_settings(header, ["--num_classes", "5"])["num_classes"] == 5
    with pytest.raises(UserError, match="'Num_classes' and 'num_classes' are the same"):
        prune_settings(header, ["--Num_classes", "7", "--num_classes", "5"])


def test_flops_and_parameters(source):
    model_def = source["model_def"]
    costs = conv_costs(model_def, NUM_CLASSES, HEIGHT, WIDTH)
    # Counted from the declaration, equal to the variables the builder makes.
    assert total_parameters(model_def, NUM_CLASSES) == sum(
        int(np.prod(np.shape(value))) for value in source["values"].values())
    assert costs["conv1"].macs == 7 * 7 * 3 * 4 * 16 * 32
    assert costs["conv5"].macs == 8 * 8 * NUM_CLASSES * NUM_CLASSES * 8 * 16
    assert costs["conv57"].macs == 128 * 256
    sizes = spatial_sizes(HEIGHT, WIDTH)
    assert sizes["block1/unit_1/bottleneck_v1/conv1"][:2] == (8, 16)  # after the pool
    assert sizes["conv10"][2:] == (2, 4) and sizes["conv88"][2:] == (8, 16)
    assert inference_macs(model_def, NUM_CLASSES, HEIGHT, WIDTH) == sum(
        costs[c.scope].macs for c in ARCHITECTURE.convs if c.scope not in AUX_HEADS)


def test_decide_threshold_summary(source, tmp_path):
    rank_path = write_rank_file(tmp_path / "rank.npz", source["model_def"], ["conv7"])
    settings = make_settings(source, tmp_path, rank_path, phase="easpp", all_convs=False,
                             conv_name="conv7", decide_threshold=True,
                             histogram_save=str(tmp_path / "histogram.png"))
    result = pruning.prune(settings, log=quiet, verify=False)
    assert "conv7" in result.report and "all selected" in result.report
    with open(settings.histogram_save, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert not os.path.exists(settings.new_checkpoint_save + ".index")


# ---- the script: one-line errors ---------------------------------------------

def run_script(*arguments):
    return subprocess.run([sys.executable, os.path.join(REPO, "prun_model.py"),
                           *map(str, arguments)], cwd=REPO, capture_output=True,
                          text=True, timeout=120)


def script_arguments(settings):
    arguments = []
    for name, value in vars(settings).items():
        text = "None" if value is None else str(value).lower() if isinstance(value, bool) \
            else str(value)
        arguments += [f"--{name}", text]
    return arguments


def assert_one_line_error(result, pattern):
    """Exit 2 and nothing on stderr but one `error:` line (TensorFlow's
    start-up lines are silenced too)."""
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert pattern in lines[0], lines[0]


def test_script_errors(source, tmp_path):
    rank_path = write_rank_file(tmp_path / "rank.npz", source["model_def"], ["conv1"])
    settings = make_settings(source, tmp_path, rank_path, phase="easpp", all_convs=False,
                             conv_name="conv1")
    before = hash_files(source["directory"])
    assert_one_line_error(run_script(*script_arguments(settings)),
                          "conv_name 'conv1' is not a prunable layer of phase 'easpp'; "
                          "valid: conv256, conv70")

    small_rank = write_rank_file(tmp_path / "small.npz",
                                 load_model_def(os.path.join(REPO, "models/small.json")),
                                 ["conv1"])
    settings.phase, settings.conv_name, settings.rank_file = "conv1", "conv1", small_rank
    assert_one_line_error(run_script(*script_arguments(settings)),
                          "does not match the model: conv1 has 8 channels in the rank file "
                          "but 4 in the model_def")

    settings.rank_file = rank_path
    settings.new_checkpoint_save = source["checkpoint"]
    assert_one_line_error(run_script(*script_arguments(settings)),
                          "would replace the input checkpoint_name")
    assert hash_files(source["directory"]) == before


# ---- helpers ------------------------------------------------------------------

def quiet(*_):
    pass


def write_rank_file(path, model_def, layers, removed=None, streams=True, checkpoint=None,
                    masks=None):
    """A rank file whose taylor scores remove half of each of ``layers`` at
    threshold 0.1, or exactly the channels in ``removed`` ({layer: indices});
    without ``streams``, as written before the streams were ranked. It
    records the ``checkpoint`` prefix's content and ``masks`` when given,
    else no source (as a file written before they were recorded)."""
    widths = resolve_widths(model_def, NUM_CLASSES)
    ranked = [g.name for g in ARCHITECTURE.prunable_groups(streams)]
    ranks = RankSums(ranked, widths)
    ranks.count = 1
    if checkpoint is not None:
        ranks.metadata.update(checkpoint=checkpoint,
                              checkpoint_sha256=checkpoint_digest(checkpoint))
    if masks is not None:
        ranks.metadata["masks_json"] = masks_json(masks)
    scores = removal_scores(model_def, layers)
    for layer in ranked:
        values = np.asarray(scores[layer], np.float64)
        if removed and layer in removed:
            values = np.ones(widths[layer])
            values[removed[layer]] = 0.01
        for kind in ("taylor", "reference", "taylor_out"):  # every criterion but l1, random
            ranks.add(kind, layer, values)
    ranks.save(str(path))
    return str(path)


def make_settings(source, directory, rank_path, **overrides):
    directory = str(directory)
    values = dict(decide_threshold=False, phase="all", all_convs=True, streams=False,
                  conv_name=None,
                  rank_file=rank_path, threshold=0.1,
                  checkpoint_name=source["checkpoint"], gpu_id="", try_zeros=False,
                  new_checkpoint_save=os.path.join(directory, "pruned", "model.ckpt"),
                  mask_load=None, mask_save=os.path.join(directory, "mask.npy"),
                  num_classes=NUM_CLASSES, height=HEIGHT, width=WIDTH,
                  model_def=source["model_def_path"],
                  new_model_def=os.path.join(directory, "model_def.json"))
    values.update(overrides)
    return pruning.PruneSettings(**values)


def next_stage(settings, directory, source, rank_path):
    """Settings pruning the output of ``settings`` again, into ``directory``."""
    following = make_settings(source, directory, rank_path, phase=settings.phase,
                              all_convs=settings.all_convs, conv_name=settings.conv_name)
    following.checkpoint_name = settings.new_checkpoint_save
    following.model_def = settings.new_model_def
    following.mask_load = settings.mask_save if os.path.exists(settings.mask_save) else None
    return following


def hash_files(directory):
    digests = {}
    for root, _, names in os.walk(directory):
        for name in names:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                digests[path] = hashlib.sha256(f.read()).hexdigest()
    return digests


# ---- outputs never replace inputs ------------------------------------------------

def test_histogram_over_an_input_is_refused(source, tmp_path):
    """decide_threshold writes only the histogram, but never over an input."""
    rank_path = write_rank_file(tmp_path / "rank.npz", source["model_def"], ["conv1"])
    before = {**hash_files(source["directory"]), **hash_files(tmp_path)}
    for target, key in ((rank_path, "rank_file"),
                        (source["checkpoint"] + ".index", "checkpoint_name")):
        settings = make_settings(source, tmp_path, rank_path, decide_threshold=True,
                                 histogram_save=target)
        assert_one_line_error(run_script(*script_arguments(settings)),
                              f"histogram_save {target!r} would replace the input {key}")
    assert {**hash_files(source["directory"]), **hash_files(tmp_path)} == before


def test_outputs_are_checked_before_any_work(source, tmp_path):
    rank_path = write_rank_file(tmp_path / "rank.npz", source["model_def"], ["conv1"])
    link = tmp_path / "link"
    os.symlink(os.path.dirname(source["checkpoint"]), link)
    (tmp_path / "a_directory").mkdir()
    before = {**hash_files(source["directory"]), **hash_files(tmp_path)}
    cases = [
        # the source checkpoint reached through a symlink
        (dict(new_checkpoint_save=str(link / "model.ckpt")),
         "would replace the input checkpoint_name"),
        # a new checkpoint in the source's directory, through the symlink
        (dict(new_checkpoint_save=str(link / "other.ckpt")),
         "is in the source checkpoint's directory"),
        (dict(new_model_def=str(tmp_path / "a_directory")), "is a directory"),
        (dict(mask_save=rank_path + "/mask.npy"), "is a file, not a directory"),
        (dict(new_model_def=str(tmp_path / "same.json"), mask_save=str(tmp_path / "same.json")),
         "are the same file"),
        (dict(mask_save=source["model_def_path"]), "would replace the input model_def"),
    ]
    for overrides, message in cases:
        settings = make_settings(source, tmp_path, rank_path, phase="block1", **overrides)
        with pytest.raises(UserError, match=re.escape(message)):
            pruning.prepare(settings)
    assert {**hash_files(source["directory"]), **hash_files(tmp_path)} == before


def test_a_failure_while_writing_keeps_the_previous_set(source, tmp_path, monkeypatch):
    """Checkpoint, model_def and mask are staged and moved in together: a
    failure after the checkpoint is written leaves the previous set whole."""
    rank_path = write_rank_file(tmp_path / "rank.npz", source["model_def"],
                                ["block1/unit_2/bottleneck_v1/conv3", "conv1"])
    out = tmp_path / "out"
    settings = make_settings(source, out, rank_path)
    pruning.prune(settings, log=quiet, verify=False)  # the previous, good set
    assert os.path.exists(settings.mask_save)
    before = hash_files(tmp_path)

    def disk_full(*_):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(pruning, "save_model_def", disk_full)
    settings.threshold = 0.3
    with pytest.raises(OSError, match="No space left"):
        pruning.prune(settings, log=quiet, verify=False)
    assert hash_files(tmp_path) == before  # nothing replaced, no staging left behind


def test_threshold_must_be_finite_and_above_one_warns(source, tmp_path):
    rank_path = write_rank_file(tmp_path / "rank.npz", source["model_def"], ["conv1"])
    settings = make_settings(source, tmp_path, rank_path)
    header = {name: value for name, value in vars(settings).items()}
    for bad in (".nan", "-.inf", "-0.1"):
        with pytest.raises(UserError, match="'threshold' must be a finite number >= 0"):
            prune_settings(header, [f"--threshold={bad}"])
    settings = make_settings(source, tmp_path, rank_path, phase="conv1", all_convs=True,
                             threshold=1.5, try_zeros=True)
    messages = []
    pruning.prune(settings, log=messages.append, verify=False)
    assert messages[0] == "selected 1 layer(s): conv1"
    assert messages[1].startswith("warning: threshold 1.5 > 1")

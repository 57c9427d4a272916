"""Criteria (docs/ranking.md): taylor_out against finite differences of the
loss by a channel's gate for every layer kind, gates against try_zeros,
shards for every criterion, l1 by hand, format-1 rank files, and
get_oracle_rank.py --compare reading only val_data.

A tiny AdapNet++ (default.json / 16, one masked residual conv3) trained 30
steps on 32x64 synthetic shapes.
"""

import os
import subprocess
import sys
from unittest import mock

import numpy as np
import pytest
import tensorflow as tf

import get_oracle_rank
from common.errors import UserError
from common.runtime import graph_mode
from dataset import records, synthetic
from helpers import FLOAT32_PASS_TOLERANCE, REPO, scaled_model_def, write_config
from models.architecture import OUTER_SCOPE, adapnet_pp
from models.model_def import load_masks, save_masks, save_model_def
from netcompress.formats.checkpoints import read_checkpoint, write_checkpoint
from netcompress.jobs.compare import compared_layers, lowest
from netcompress.settings.config import load_config
from netcompress.graphs.inference import GatedGraph
from netcompress.jobs.evaluate import evaluate
from netcompress.pruning_math.plan import model_values, plan_pruning, zero_channels
from netcompress.formats.rankfile import RankSums, merge
from netcompress.pruning_math.criteria import CRITERIA
from netcompress.jobs.rank import rank
from netcompress.jobs.train import train

graph_mode()
tf1 = tf.compat.v1

HEIGHT, WIDTH = 32, 64
NUM_CLASSES = synthetic.NUM_CLASSES
MASKED_UNIT = "block2/unit_2"
# One layer of every kind: the stem (read after its max-pool), a unit conv1
# read by conv2 and the shortcut, a split half, a masked and a plain residual
# conv3, an atrous eASPP conv, conv10 (no ReLU, read by the decoder), a
# transposed conv read by a decoder conv and an aux head, a decoder conv.
LAYER_KINDS = ("conv1", "block1/unit_1/bottleneck_v1/conv1",
               "block2/unit_4/bottleneck_v1/conv2/B", f"{MASKED_UNIT}/bottleneck_v1/conv3",
               "block3/unit_2/bottleneck_v1/conv3", "conv7", "conv10", "conv41", "conv89")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("criteria")
    model_def = scaled_model_def(16)
    unit = adapnet_pp().unit(MASKED_UNIT)
    width = adapnet_pp().residual_width(model_def, unit)
    model_def["params"][unit.key][2] = width - 2
    save_model_def(model_def, str(root / "tiny.json"))
    save_masks({MASKED_UNIT: (np.delete(np.arange(width), [1, 4]), width)},
               str(root / "mask.npy"))
    files = synthetic.generate(str(root / "data"), num_train=8, num_test=2, num_val=6,
                               height=HEIGHT, width=WIDTH, seed=5)
    base = dict(gpu_id="", model="AdapNet_pp", num_classes=NUM_CLASSES, batch_size=4,
                skip_step=10, height=HEIGHT, width=WIDTH, mask=str(root / "mask.npy"),
                model_def=str(root / "tiny.json"))
    train_config = write_config(root / "train.config", dict(
        base, intialize=None, checkpoint=root / "run" / "model.ckpt",
        train_data=files["train"], max_iteration=30, learning_rate=0.005, save_step=30,
        power=0.9))
    # Moving statistics that follow the batches within 30 steps (decay 0.5):
    # inference then normalises as training did, and the loss is well scaled.
    with mock.patch("models.layers.BN_DECAY", 0.5):
        checkpoint = train(load_config(train_config, "train"), progress=False,
                           seed=0)["checkpoint"]
    # One validation example alone: its rank-file sums are that example's |t|.
    one = str(root / "one.tfrecords")
    with records.record_writer(one) as writer:
        image, label = next(records.read_examples(files["val"]))
        writer.write(records.encode_example(image, label))
    config = dict(base, checkpoint=checkpoint, test_data=files["train"],
                  val_data=files["val"], rank_save=str(root / "rank.npz"))
    ranks = rank(config, progress=False)
    ranks.save(config["rank_save"])
    return dict(root=root, files=files, config=config, one=one, model_def=model_def,
                ranks=ranks, checkpoint=checkpoint)


def session_for(gated, config):
    session = tf1.Session(graph=gated.graph)
    gated.restore(session, config["checkpoint"], config["model_def"])
    return session


@pytest.mark.slow
def test_taylor_out_is_the_derivative_of_the_loss_by_the_channel_gate(tiny):
    """t_out_n(k) = dC_n/dg_k at g = 1, g_k a gate on channel k of what the
    layer's consumers read. (1) For every layer and channel, the rank pass's
    value equals that derivative taken in the gated graph (another graph:
    gates as inputs, the gradient by the gate), to float32 rounding. (2) For
    layer kinds after the first block, central differences of the loss
    agree: step 3e-4, tolerance 5 % of the layer's largest value (measured
    worst 2.3 % with oneDNN off; a mean instead of a sum over positions
    would be off by the position count, 32 or more here). The step is a
    compromise: at 1e-4 float32 rounding of the loss is 8 %, and on some
    CPUs the model trains to one where a step of 1e-3 crosses a ReLU kink in
    block2/unit_4's conv2/B (11 % off). In the stem and block1 a gate step of 1e-3 already flips
    enough ReLUs that differences of the piecewise-linear network wander
    around the derivative (measured: off by up to 40 %), so (1) alone checks
    those."""
    config = dict(tiny["config"], test_data=tiny["one"])
    ranks = rank(config, progress=False)
    assert ranks.count == 1
    gated = GatedGraph(config, tiny["one"], aux=True)  # the rank pass's loss
    with gated.graph.as_default():
        # One backward graph for every gate (one per layer built 81).
        by_gate = dict(zip(ranks.layers, tf.gradients(
            gated.fetches["loss"], [gated.gates[layer] for layer in ranks.layers])))
    step = 3e-4
    with session_for(gated, config) as session:
        session.run(gated.iterator.initializer)
        derivatives = session.run(by_gate)
        for layer in ranks.layers:
            t_out = ranks.sum_of("taylor_out", layer)
            assert np.abs(np.abs(derivatives[layer]) - t_out).max() <= \
                FLOAT32_PASS_TOLERANCE * t_out.max(), layer
        for layer in LAYER_KINDS[2:]:
            t_out = ranks.sum_of("taylor_out", layer)
            for k in range(min(3, len(t_out))):
                losses = []
                for sign in (1, -1):
                    gate = np.ones(len(t_out), np.float32)
                    gate[k] += sign * step
                    _, loss = gated.evaluate(session, {}, NUM_CLASSES,
                                             gate_values={layer: gate})
                    losses.append(loss)
                finite_difference = (losses[0] - losses[1]) / (2 * step)
                assert abs(abs(finite_difference) - t_out[k]) <= 0.05 * t_out.max(), \
                    (layer, k, finite_difference, t_out[k])


def test_gates_compute_exactly_what_the_try_zeros_checkpoint_computes(tiny, tmp_path):
    config, ranks = tiny["config"], tiny["ranks"]
    removed = {layer: lowest(ranks.scores("taylor")[layer], 0.3) for layer in ranks.layers}
    # Scores 0 for the removed channels, 1 for the rest: threshold 0.5 removes them.
    scores = {}
    for layer in ranks.layers:
        scores[layer] = np.ones(ranks.widths[layer])
        scores[layer][removed[layer]] = 0.0
    masks = load_masks(config["mask"])
    plan = plan_pruning(tiny["model_def"], masks, NUM_CLASSES, scores, ranks.layers, 0.5)
    assert sum(len(cut.removed) for cut in plan.layers) == \
        sum(len(r) for r in removed.values()) > 0
    zeroed = str(tmp_path / "zeros" / "model.ckpt")
    write_checkpoint(zero_channels(plan, model_values(read_checkpoint(config["checkpoint"]))),
                     zeroed)
    from_checkpoint = evaluate(dict(config, checkpoint=zeroed, test_data=config["val_data"]),
                               log=lambda _: None, progress=False)
    gated = GatedGraph(config, config["val_data"])
    with session_for(gated, config) as session:
        from_gates, _ = gated.evaluate(session, removed, NUM_CLASSES)
        unpruned, _ = gated.evaluate(session, {}, NUM_CLASSES)
    np.testing.assert_array_equal(from_gates.matrix, from_checkpoint.matrix)
    assert not np.array_equal(unpruned.matrix, from_gates.matrix)


def test_shards_merge_to_the_single_pass_for_every_criterion(tiny, tmp_path):
    config, whole = tiny["config"], tiny["ranks"]
    parts = []
    for index in range(2):
        part = rank(config, shard=(index, 2), progress=False)
        path = str(tmp_path / f"rank.shard{index}of2.npz")
        part.save(path)
        parts.append((path, RankSums.load(path)))
    merged = merge(parts)
    assert merged.count == whole.count == 8
    for criterion in CRITERIA:
        for layer in whole.layers:
            expected = whole.scores(criterion)[layer]
            got = merged.scores(criterion)[layer]
            scale = max(np.abs(expected).max(), 1e-30)
            assert np.abs(got - expected).max() <= FLOAT32_PASS_TOLERANCE * scale, \
                (criterion, layer)
            if criterion in ("l1", "random"):  # not sums: the same in every shard
                np.testing.assert_array_equal(got, expected)
    # The file holds every criterion's final scores for numpy-only readers.
    with np.load(config["rank_save"], allow_pickle=False) as data:
        for criterion in CRITERIA:
            for layer in whole.layers:
                np.testing.assert_array_equal(data[f"score/{criterion}/{layer}"],
                                              whole.scores(criterion)[layer])


def test_l1_is_the_filter_norm(tiny):
    values = read_checkpoint(tiny["checkpoint"])
    ranks = tiny["ranks"]
    kernel = values[f"{OUTER_SCOPE}/block2/unit_4/bottleneck_v1/conv2/weights"]
    half_a = tiny["model_def"]["split"]["8"][0]
    np.testing.assert_allclose(ranks.l1_of("block2/unit_4/bottleneck_v1/conv2/B"),
                               np.abs(kernel[..., half_a:].astype(np.float64)).sum(axis=(0, 1, 2)),
                               rtol=1e-12)
    transposed = values[f"{OUTER_SCOPE}/conv41/weights"]  # [k, k, out, in]
    np.testing.assert_allclose(ranks.l1_of("conv41"),
                               np.abs(transposed.astype(np.float64)).sum(axis=(0, 1, 3)),
                               rtol=1e-12)


def test_a_format_1_rank_file_loads_for_its_criteria_only(tiny, tmp_path):
    with np.load(tiny["config"]["rank_save"], allow_pickle=False) as data:
        old = {key: data[key] for key in data.files
               if key.split("/")[0] in ("layers", "count", "taylor", "reference", "meta")}
    old["format_version"] = np.int64(1)
    path = str(tmp_path / "old.npz")
    np.savez(path, **old)
    loaded = RankSums.load(path)
    layer = loaded.layers[0]
    np.testing.assert_array_equal(loaded.scores("taylor")[layer],
                                  tiny["ranks"].scores("taylor")[layer])
    for criterion, what in (("taylor_out", "no taylor_out values"),
                            ("l1", r"no filter norms \(l1\)")):
        with pytest.raises(UserError, match=rf"rank file {path} \(format 1\) has {what}: "
                                            rf"regenerate it with get_oracle_rank.py"):
            loaded.scores(criterion)


def compare_config(tiny, tmp_path, **changes):
    values = dict(tiny["config"], **changes)
    return write_config(tmp_path / "rank.config", values)


def test_compare_reads_only_val_data_and_writes_table_csv_and_plot(tiny, tmp_path, capsys):
    # The ranking data replaced by a file that is no record file at all:
    # --compare must not open it (nor any test records).
    garbage = tmp_path / "not_records.tfrecords"
    garbage.write_bytes(b"no records here")
    config_path = compare_config(tiny, tmp_path, test_data=garbage)
    stem = os.path.splitext(tiny["config"]["rank_save"])[0]
    get_oracle_rank.main(["-c", config_path, "--compare", "--fractions", "0.25", "0.5",
                          "--oracle", "conv1"])
    out = capsys.readouterr().out
    assert "validation mIoU after removing a fraction of every prunable layer" in out
    assert "Spearman with the true loss change, conv1: taylor" in out
    assert f"checkpoint: {tiny['checkpoint']} (sha256 " in out
    assert f"val_data: {tiny['config']['val_data']}, " in out
    with open(stem + ".compare.csv", encoding="utf-8") as handle:
        rows = handle.read().splitlines()
    assert rows[0] == "criterion,fraction,removed_channels,miou"
    assert len(rows) == 2 + len(CRITERIA) * 2
    assert rows[1].startswith("none,0.0,0,")
    assert os.path.getsize(stem + ".compare.png") > 1000


def test_compare_takes_streams_only_when_asked(tiny):
    layers = tiny["ranks"].layers
    streams = [f"block{b}/residual" for b in (1, 2, 3, 4)]
    assert set(streams) < set(layers)
    architecture = adapnet_pp()
    assert compared_layers(tiny["ranks"], architecture) == \
        [name for name in layers if name not in streams]
    assert compared_layers(tiny["ranks"], architecture, streams=True) == layers


def test_compare_errors_are_one_line(tiny, tmp_path):
    def run(*extra, **changes):
        command = [sys.executable, os.path.join(REPO, "get_oracle_rank.py"), "-c",
                   compare_config(tiny, tmp_path, **changes), *extra]
        result = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
        assert result.returncode == 2, result.stderr
        assert result.stderr.count("\n") == 1, result.stderr
        return result.stderr

    assert "--compare needs val_data" in run("--compare", val_data=None)
    assert "is the ranking data (test_data)" in run(
        "--compare", val_data=tiny["config"]["test_data"])
    assert "not a fraction between 0 and 1" in run("--compare", "--fractions", "1.5")
    assert "--fractions, --oracle and --streams go with --compare" in run("--oracle", "conv1")
    assert "rank first" in run("--compare", rank_save=str(tmp_path / "none.npz"))

"""Taylor oracle ranking: exactness, sharding, usefulness, errors, layer list.

Runs a tiny AdapNet++ (default.json widths / 16) on 32x64 synthetic images,
so the whole module needs about a minute of CPU on two cores.
"""

import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
from scipy.stats import spearmanr
from tensorflow.core.protobuf import rewriter_config_pb2

import get_oracle_rank
from helpers import FLOAT32_PASS_TOLERANCE, REPO, scaled_model_def, write_config
from dataset import records, synthetic
from models.AdapNet_pp import AdapNet_pp
from models.architecture import adapnet_pp, output_offset, resolve_widths
from models.model_def import load_masks, load_model_def, save_masks, save_model_def
from netcompress.formats import checkpoints
from common.digests import checkpoint_digest
from common.errors import UserError
from netcompress.formats.rankfile import RankSums
from netcompress.jobs.rank import rank, rank_layers, summary_table
from netcompress.formats.sharding import parse_shard, records_in_shard, shard_output_path
from common.runtime import graph_mode

graph_mode()
tf1 = tf.compat.v1

HEIGHT, WIDTH = 32, 64
NUM_CLASSES = synthetic.NUM_CLASSES
NUM_RECORDS = 10
TRAIN_STEPS = 40


def rank_config(checkpoint, data, model_def, mask=None, batch_size=4, rank_save=""):
    return {"gpu_id": "", "model": "AdapNet_pp", "num_classes": NUM_CLASSES,
            "checkpoint": checkpoint, "test_data": data, "batch_size": batch_size,
            "skip_step": 1, "height": HEIGHT, "width": WIDTH, "mask": mask,
            "model_def": model_def, "rank_save": rank_save}


def one_hot(labels):
    return np.eye(NUM_CLASSES, dtype=np.float32)[labels]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return tmp_path_factory.mktemp("ranking")


@pytest.fixture(scope="module")
def tiny_def(workspace):
    path = str(workspace / "tiny.json")
    save_model_def(scaled_model_def(16), path)
    return path


@pytest.fixture(scope="module")
def examples():
    return list(synthetic.generate_examples(NUM_RECORDS, HEIGHT, WIDTH, seed=7))


@pytest.fixture(scope="module")
def data(workspace, examples):
    path = str(workspace / "rank.tfrecords")
    with records.record_writer(path) as writer:
        for image, label in examples:
            writer.write(records.encode_example(image, label))
    return path


class TinyModel:
    """The tiny model in one graph and session: an Adam training step and,
    sharing its variables, the inference-mode per-example losses and the z and
    dC/dz (C = summed loss) of ``scopes``, all on fed numpy batches."""

    def __init__(self, model_def_path, scopes):
        self.graph = tf.Graph()
        with self.graph.as_default():
            tf1.set_random_seed(0)
            model = AdapNet_pp(load_model_def(model_def_path), NUM_CLASSES)
            self.widths = model.widths
            self.images = tf1.placeholder(tf.float32, [None, HEIGHT, WIDTH, 3])
            self.labels = tf1.placeholder(tf.float32, [None, HEIGHT, WIDTH, NUM_CLASSES])
            training = model.build(self.images, training=True, aux=True)
            training_loss = tf.reduce_mean(model.per_example_loss(training, self.labels))
            with tf.control_dependencies(tf1.get_collection(tf1.GraphKeys.UPDATE_OPS)):
                self.train_op = tf1.train.AdamOptimizer(1e-3).minimize(training_loss)
            with tf1.variable_scope(tf1.get_variable_scope(), reuse=True):
                outputs = model.build(self.images, training=False, aux=True)
            self.per_example_loss = model.per_example_loss(outputs, self.labels)
            self.z = {scope: outputs.pre_norm[scope] for scope in scopes}
            # What each residual stream's readers read (its gate's derivative).
            self.reads = {(name, i): tensor for name, tensors in outputs.stream_reads.items()
                          for i, tensor in enumerate(tensors)}
            gradients = tf.gradients(tf.reduce_sum(self.per_example_loss),
                                     list(self.z.values()) + list(self.reads.values()))
            self.dz = dict(zip(scopes, gradients))
            self.dreads = dict(zip(self.reads, gradients[len(scopes):]))
            self.saver = tf1.train.Saver([v for v in checkpoints.model_variables(self.graph)
                                          if "Adam" not in v.name.rsplit("/", 1)[-1]])
            # Grappler's graph rewrites take longer than these few small runs.
            options = tf1.GraphOptions(rewrite_options=rewriter_config_pb2.RewriterConfig(
                disable_meta_optimizer=True))
            self.session = tf1.Session(graph=self.graph,
                                       config=tf1.ConfigProto(graph_options=options))
            self.session.run(tf1.global_variables_initializer())

    def feed(self, batch):
        return {self.images: np.stack([image for image, _ in batch]).astype(np.float32),
                self.labels: one_hot(np.stack([label for _, label in batch]))}

    def train(self, examples, steps, batch_size=4):
        for step in range(steps):
            first = step * batch_size % len(examples)
            batch = (examples + examples)[first:first + batch_size]
            self.session.run(self.train_op, self.feed(batch))

    def kernel(self, scope):
        return next(v for v in self.graph.get_collection(tf1.GraphKeys.GLOBAL_VARIABLES)
                    if v.name == f"resnet_v2_50/{scope}/weights:0")


EXACTNESS_LAYERS = (
    "conv1",                                    # 7x7 stride 2
    "block2/unit_1/bottleneck_v1/conv2",        # 3x3 stride 2
    "block1/unit_2/bottleneck_v1/conv3",        # residual conv3, no batch norm
    "conv7",                                    # atrous rate 3
    "block3/unit_3/bottleneck_v1/conv2/A",      # split: regular half
    "block3/unit_3/bottleneck_v1/conv2/B",      # split: atrous half
    "block4/unit_1/bottleneck_v1/conv2/B",      # split, both halves atrous
    "conv41", "conv16",                         # transposed convs
)


@pytest.fixture(scope="module")
def tiny(workspace, tiny_def, examples):
    """The tiny model after a few dozen Adam steps, and its checkpoint."""
    architecture = adapnet_pp()
    scopes = sorted({architecture.producer_of(name).scope for name in EXACTNESS_LAYERS} |
                    {conv.scope for group in architecture.stream_groups()
                     for conv in architecture.stream_writers(group.name)})
    model = TinyModel(tiny_def, scopes)
    model.train(examples, TRAIN_STEPS)
    model.checkpoint = model.saver.save(model.session, str(workspace / "tiny" / "model.ckpt"),
                                        write_meta_graph=False)
    yield model
    model.session.close()


@pytest.fixture(scope="module")
def trained(tiny):
    return tiny.checkpoint


@pytest.fixture(scope="module")
def full_pass(trained, data, tiny_def):
    """One unsharded ranking pass, batch 4 (the last batch holds 2)."""
    return rank(rank_config(trained, data, tiny_def), progress=False)


# ---- the layer list ----------------------------------------------------------------

def test_default_layer_list_has_77_layers_and_4_streams_in_declaration_order():
    layers = rank_layers(adapnet_pp())
    assert len(layers) == 81 == len(set(layers))
    # Each block's stream comes before its units' layers.
    assert [layers.index(f"block{b}/residual") for b in (1, 2, 3, 4)] == [1, 11, 25, 48]
    layers = [name for name in layers if not name.endswith("/residual")]
    assert layers[:4] == ["conv1", "block1/unit_1/bottleneck_v1/conv1",
                          "block1/unit_1/bottleneck_v1/conv2",
                          "block1/unit_1/bottleneck_v1/conv3"]
    split = layers.index("block2/unit_4/bottleneck_v1/conv2/A")
    assert layers[split + 1] == "block2/unit_4/bottleneck_v1/conv2/B"
    assert layers[split - 1] == "block2/unit_4/bottleneck_v1/conv1"
    assert layers[-7:] == ["conv10", "conv41", "conv89", "conv96", "conv16", "conv88",
                           "conv95"]
    assert layers.index("conv256") < layers.index("conv70") < layers.index("conv91")
    for excluded in ("conv0", "conv32", "conv174", "conv57", "conv78", "conv5",
                     "conv911", "conv912", "block1/unit_1/bottleneck_v1/shortcut"):
        assert excluded not in layers


def test_default_layer_widths_follow_the_model_def():
    model_def = load_model_def(os.path.join(REPO, "models", "default.json"))
    widths = resolve_widths(model_def, NUM_CLASSES)
    layer_widths = [widths[name] for name in rank_layers(adapnet_pp())]
    assert layer_widths[:5] == [64, 256, 64, 64, 256]  # conv1, block1 stream, unit_1
    assert widths["block2/unit_4/bottleneck_v1/conv2/A"] == 64
    assert widths["block4/unit_3/bottleneck_v1/conv2/B"] == 256
    assert widths["conv41"] == 256 and widths["conv95"] == 256


# ---- exactness -------------------------------------------------------------------

@pytest.mark.onednn
def test_rank_pass_equals_numpy_reference(full_pass, tiny, examples):
    architecture = adapnet_pp()
    abs_sums = {scope: 0.0 for scope in tiny.z}
    signed_sums = {scope: 0.0 for scope in tiny.z}
    # One example per run: the rank pass (batches of 4) must not depend on batching.
    for example in examples:
        z, dz = tiny.session.run([tiny.z, tiny.dz], tiny.feed([example]))
        for scope in tiny.z:
            t = (z[scope].astype(np.float64) * dz[scope].astype(np.float64)).mean(axis=(1, 2))
            abs_sums[scope] = abs_sums[scope] + np.abs(t).sum(axis=0)
            signed_sums[scope] = signed_sums[scope] + t.sum(axis=0)
    assert full_pass.count == NUM_RECORDS
    assert full_pass.layers == rank_layers(adapnet_pp())
    worst = 0.0
    for name in EXACTNESS_LAYERS:
        conv = architecture.producer_of(name)
        start = output_offset(conv, name, tiny.widths)
        part = slice(start, start + tiny.widths[name])
        for criterion, reference in (("taylor", abs_sums), ("reference", signed_sums)):
            expected = reference[conv.scope][part]
            got = full_pass.sums[criterion][name]
            assert got.shape == expected.shape
            # Relative to the layer's scale (helpers.FLOAT32_PASS_TOLERANCE).
            error = np.abs(got - expected).max() / np.abs(expected).max()
            worst = max(worst, error)
            assert error <= FLOAT32_PASS_TOLERANCE, (name, criterion, error)
    print(f"largest relative error vs the float64 reference: {worst:.2e}")
    taylor = full_pass.scores("taylor")["conv41"]
    np.testing.assert_allclose(taylor, full_pass.sums["taylor"]["conv41"] / NUM_RECORDS)


@pytest.mark.onednn
def test_stream_rank_sums_equal_numpy_reference(full_pass, tiny, examples):
    """A stream's t is the sum of its writers' t (shortcut and conv3s), its
    t_out the sum over every tensor its readers read, its l1 the sum of its
    writers' column norms; computed here one example at a time in float64."""
    architecture = adapnet_pp()
    streams = [group.name for group in architecture.stream_groups()]
    expected = {kind: {name: 0.0 for name in streams}
                for kind in ("taylor", "reference", "taylor_out")}
    for example in examples:
        z, dz, reads, dreads = tiny.session.run([tiny.z, tiny.dz, tiny.reads, tiny.dreads],
                                                tiny.feed([example]))
        for name in streams:
            t = sum((z[w.scope].astype(np.float64) * dz[w.scope]).mean(axis=(1, 2))
                    for w in architecture.stream_writers(name))
            t_out = sum((reads[key].astype(np.float64) * dreads[key]).sum(axis=(1, 2))
                        for key in reads if key[0] == name)
            expected["taylor"][name] += np.abs(t).sum(axis=0)
            expected["reference"][name] += t.sum(axis=0)
            expected["taylor_out"][name] += np.abs(t_out).sum(axis=0)
    assert len([key for key in tiny.reads if key[0] == "block3/residual"]) == 6
    values = checkpoints.read_checkpoint(tiny.checkpoint)
    for name in streams:
        for kind, by_stream in expected.items():
            got = full_pass.sums[kind][name]
            assert got.shape == (tiny.widths[name],)
            error = np.abs(got - by_stream[name]).max() / np.abs(by_stream[name]).max()
            assert error <= FLOAT32_PASS_TOLERANCE, (name, kind, error)
        l1 = sum(np.abs(values[f"resnet_v2_50/{w.scope}/weights"].astype(np.float64)).sum(
            axis=(0, 1, 2)) for w in architecture.stream_writers(name))
        np.testing.assert_allclose(full_pass.l1[name], l1, rtol=1e-12)


# ---- sharding and merging ----------------------------------------------------------

def test_shards_merged_equal_a_single_pass(full_pass, trained, data, tiny_def, workspace,
                                           capsys):
    rank_save = str(workspace / "shards" / "rank.npz")
    config_path = write_config(workspace / "rank.config",
                               rank_config(trained, data, tiny_def, rank_save=rank_save))
    for index in range(2):
        get_oracle_rank.main(["-c", config_path, "--shard", f"{index}/2"])
    shard_paths = [shard_output_path(rank_save, (index, 2)) for index in range(2)]
    assert [os.path.basename(p) for p in shard_paths] == ["rank.shard0of2.npz",
                                                          "rank.shard1of2.npz"]
    shards = [RankSums.load(path) for path in shard_paths]
    assert [s.count for s in shards] == [5, 5]
    assert [s.metadata["shard"] for s in shards] == ["0/2", "1/2"]

    merged_path = str(workspace / "merged.npz")
    get_oracle_rank.main(["--merge", merged_path] + shard_paths)
    assert "saved " + merged_path in capsys.readouterr().out
    merged = RankSums.load(merged_path)
    assert merged.count == full_pass.count == NUM_RECORDS
    assert merged.layers == full_pass.layers
    # Shards batch the examples differently, so each t_n comes from float32
    # passes in another summation order: equal to FLOAT32_PASS_TOLERANCE of
    # the layer's scale (helpers), not elementwise (a near-zero t_n is a
    # near-cancelling sum). A lost or doubled example would move a layer's
    # sums by about 1/NUM_RECORDS of its scale, 1000 times more.
    for criterion in ("taylor", "reference"):
        for name in merged.layers:
            expected = full_pass.sums[criterion][name]
            np.testing.assert_allclose(
                merged.sums[criterion][name], expected, rtol=0,
                atol=FLOAT32_PASS_TOLERANCE * np.abs(expected).max(), err_msg=name)
    for key in ("model_def_sha256", "checkpoint", "data", "masks_json", "checkpoint_sha256",
                "data_sha256"):
        assert merged.metadata[key] == full_pass.metadata[key]
    assert full_pass.metadata["data_sha256"] == file_digest(data)
    assert full_pass.metadata["checkpoint_sha256"] == checkpoint_digest(trained)

    with pytest.raises(UserError, match="same shard 0/2"):
        get_oracle_rank.main(["--merge", merged_path, shard_paths[0], shard_paths[0]])
    whole_path = str(workspace / "whole.npz")
    full_pass.save(whole_path)
    with pytest.raises(UserError, match="not a shard file"):
        get_oracle_rank.main(["--merge", merged_path, shard_paths[0], whole_path])


def file_digest(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def test_merge_refuses_shards_of_other_record_contents(trained, tiny_def, workspace, examples,
                                                      full_pass, capsys):
    """Shard 1 ranked after the record file at the same path was rewritten
    (other examples): the shards' paths agree, their contents do not."""
    data = str(workspace / "rewritten.tfrecords")
    rank_save = str(workspace / "rewritten" / "rank.npz")
    shard_paths = [shard_output_path(rank_save, (index, 2)) for index in range(2)]
    for index, order in enumerate((examples, examples[::-1])):
        with records.record_writer(data) as writer:
            for image, label in order:
                writer.write(records.encode_example(image, label))
        rank(rank_config(trained, data, tiny_def, batch_size=5), (index, 2),
             progress=False).save(shard_paths[index])
    merged_path = str(workspace / "rewritten" / "merged.npz")
    with pytest.raises(UserError, match=rf"rank files {shard_paths[0]} and {shard_paths[1]} "
                                        rf"were computed on different record file contents"):
        get_oracle_rank.main(["--merge", merged_path, *shard_paths])
    assert not os.path.exists(merged_path)

    # Shards written before digests were recorded merge as before, with a warning.
    old = []
    for index in range(2):
        full_pass.metadata["shard"] = f"{index}/2"
        path = str(workspace / "rewritten" / f"old.shard{index}of2.npz")
        full_pass.save(path)
        with np.load(path, allow_pickle=False) as stored:
            arrays = {key: stored[key] for key in stored.files if key not in
                      ("meta/checkpoint_sha256", "meta/data_sha256")}
        with open(path, "wb") as f:
            np.savez(f, **arrays)
        old.append(path)
    full_pass.metadata["shard"] = "all"
    capsys.readouterr()
    get_oracle_rank.main(["--merge", merged_path, *old])
    out = capsys.readouterr().out
    assert f"warning: rank file {old[0]} records no content digests" in out
    assert RankSums.load(merged_path).count == 2 * NUM_RECORDS


def test_rank_outputs_never_replace_inputs(trained, data, tiny_def, workspace, full_pass):
    """Checked before the ranking pass: a rank_save over the records, and a
    merge whose OUT was forgotten (the first shard would be overwritten)."""
    config_path = write_config(workspace / "clash.config",
                               rank_config(trained, data, tiny_def, rank_save=data))
    before = file_digest(data)
    with pytest.raises(UserError, match=r"rank_save .* would replace the input test_data"):
        get_oracle_rank.main(["-c", config_path])
    assert file_digest(data) == before
    shards = [str(workspace / f"forgot.shard{index}of2.npz") for index in range(2)]
    for path in shards:
        full_pass.save(path)
    digests = [file_digest(path) for path in shards]
    with pytest.raises(UserError, match=r"the output comes first, and this looks like a "
                                        r"shard file"):
        get_oracle_rank.main(["--merge", *shards])
    with pytest.raises(UserError, match=r"--merge OUT .* would replace the input shard"):
        get_oracle_rank.main(["--merge", str(workspace / "m.npz"), str(workspace / "m.npz")])
    assert [file_digest(path) for path in shards] == digests


def test_shard_helpers():
    assert parse_shard("1/4") == (1, 4)
    for bad in ("4/4", "1", "a/b", "-1/2", "0/0"):
        with pytest.raises(UserError, match="shard"):
            parse_shard(bad)
    assert shard_output_path("runs/rank.npz", None) == "runs/rank.npz"
    assert shard_output_path("runs/rank.npz", (2, 3)) == "runs/rank.shard2of3.npz"
    assert [records_in_shard(10, (i, 3)) for i in range(3)] == [4, 3, 3]


def test_summary_table_lists_every_layer(full_pass):
    lines = summary_table(full_pass)
    assert len(lines) == len(full_pass.layers) + 2
    conv41 = next(line for line in lines if line.startswith("conv41 "))
    assert conv41.split()[1] == str(full_pass.sums["taylor"]["conv41"].size)
    assert lines[-1].endswith(f"{NUM_RECORDS} examples")


# ---- the criterion predicts the effect of removing a channel -------------------------

PREDICTION_LAYERS = ("block3/unit_2/bottleneck_v1/conv2",
                     "block4/unit_1/bottleneck_v1/conv1",
                     "block4/unit_2/bottleneck_v1/conv2/A",
                     "conv10", "conv89")


def loss_change_per_channel(model, layer, batch):
    """[channels, N]: each example's loss change when channel k of ``layer``'s
    z is zero (its kernel slice zeroed; no conv has a bias, so that is exact)."""
    conv = adapnet_pp().producer_of(layer)
    start = output_offset(conv, layer, model.widths)
    kernel = model.kernel(conv.scope)
    with model.graph.as_default():
        value = tf1.placeholder(tf.float32, kernel.shape)
        assign = kernel.assign(value)
    original = model.session.run(kernel)
    feed = model.feed(batch)
    base = model.session.run(model.per_example_loss, feed)
    changes = []
    output_axis = 2 if conv.transposed else 3
    try:
        for channel in range(start, start + model.widths[layer]):
            zeroed = original.copy()
            np.moveaxis(zeroed, output_axis, 0)[channel] = 0.0
            model.session.run(assign, {value: zeroed})
            changes.append(model.session.run(model.per_example_loss, feed) - base)
    finally:
        model.session.run(assign, {value: original})
    return np.array(changes)


def test_taylor_ranks_channels_like_their_actual_loss_change(full_pass, tiny, examples):
    taylor = full_pass.scores("taylor")
    correlations = []
    for layer in PREDICTION_LAYERS:
        changes = loss_change_per_channel(tiny, layer, examples)
        per_example = spearmanr(taylor[layer], np.abs(changes).mean(axis=1))[0]
        whole_batch = spearmanr(taylor[layer], np.abs(changes.mean(axis=1)))[0]
        print(f"{layer}: {changes.shape[0]} channels, spearman vs mean |dC_n| "
              f"{per_example:.3f}, vs |mean dC_n| {whole_batch:.3f}")
        correlations.append(per_example)
    print(f"mean spearman {np.mean(correlations):.3f}")
    assert np.mean(correlations) > 0.3
    assert min(correlations) > 0.0


# ---- masks and mismatches -----------------------------------------------------------

def random_checkpoint(model_def_path, mask_path, prefix):
    """A freshly initialised checkpoint of the model (aux heads included)."""
    graph = tf.Graph()
    with graph.as_default():
        model = AdapNet_pp(load_model_def(model_def_path), NUM_CLASSES,
                           load_masks(mask_path))
        model.build(tf1.placeholder(tf.float32, [1, HEIGHT, WIDTH, 3]), aux=True)
        saver = tf1.train.Saver(checkpoints.model_variables(graph))
        with tf1.Session(graph=graph) as session:
            session.run(tf1.global_variables_initializer())
            return saver.save(session, prefix)


def test_masked_model_def_ranks_at_its_own_widths(workspace, data):
    model_def = scaled_model_def(16)
    unit = "block1/unit_1"
    residual = model_def["params"]["2"][3]
    kept = [0, 2, 3, 5, 7, 8, 9, 10, 11, 13, 14, 15][:residual - 4]
    model_def["params"]["2"][2] = len(kept)
    model_def_path = str(workspace / "masked.json")
    save_model_def(model_def, model_def_path)
    mask_path = str(workspace / "mask.npy")
    save_masks({unit: (kept, residual)}, mask_path)
    checkpoint = random_checkpoint(model_def_path, mask_path, str(workspace / "masked" / "m"))

    sums = rank(rank_config(checkpoint, data, model_def_path, mask=mask_path, batch_size=5),
                progress=False)
    assert sums.count == NUM_RECORDS
    assert sums.sums["taylor"]["block1/unit_1/bottleneck_v1/conv3"].shape == (len(kept),)
    assert sums.sums["taylor"]["block1/unit_2/bottleneck_v1/conv3"].shape == (residual,)
    assert all(np.isfinite(s).all() for s in sums.sums["taylor"].values())
    assert json.loads(sums.metadata["masks_json"]) == {
        unit: {"width": residual, "kept": kept}}
    assert json.loads(sums.metadata["model_def_json"]) == model_def


def test_checkpoint_of_another_model_def_is_a_one_line_error(workspace, trained, data):
    model_def = scaled_model_def(16)
    model_def["params"]["1"] += 2
    model_def_path = str(workspace / "wider.json")
    save_model_def(model_def, model_def_path)
    config_path = write_config(workspace / "mismatch.config", rank_config(
        trained, data, model_def_path, rank_save=str(workspace / "never.npz")))
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    result = subprocess.run([sys.executable, "get_oracle_rank.py", "-c", config_path],
                            cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2, result.stderr
    # TensorFlow logs to stderr at import; ours is the one and last error line.
    stderr_lines = result.stderr.strip().splitlines()
    error_lines = [line for line in stderr_lines if line.startswith("error")]
    assert error_lines == [stderr_lines[-1]]
    width = model_def["params"]["1"]
    assert error_lines[0].startswith("error: checkpoint ")
    assert "resnet_v2_50/conv1/weights" in error_lines[0]
    assert f"[7, 7, 3, {width - 2}]" in error_lines[0]
    assert f"[7, 7, 3, {width}]" in error_lines[0]
    assert "Traceback" not in result.stderr
    assert not os.path.exists(workspace / "never.npz")

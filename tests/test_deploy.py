"""Using the compressed model: the SavedModel, TFLite and ONNX files compute
what the session graph does (unpruned and pruned with residual masks), and
predict.py's class maps are evaluate's argmax.

Two tiny random-weight models (widths /16 of the default, 32x64 inputs):
the unpruned one, and one with narrower layers and masked residual conv3s
(a model_def + mask as prun_model.py writes them). Batch-norm moving
statistics are set to a fixed batch's own, so that activations stay well
scaled and the softmax is not saturated (a saturated one would compare
nothing).

Tolerance: every file computes the session graph's float32 function with
other kernels (space-to-batch or native atrous convs, XNNPACK, ONNX
Runtime), i.e. in another summation order: helpers.FLOAT32_PASS_TOLERANCE
relative to the logits' largest magnitude. A softmax moves no probability
by more than the largest logit change, so probabilities get that bound too;
class maps must agree wherever the reference's top two logits are further
apart than twice it (closer ones are ties that rounding may decide either
way). The int8 file is only reported, never compared.
"""

import json
import os
import subprocess
import sys
from unittest import mock

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image
from tensorflow.core.protobuf import saved_model_pb2

from helpers import FLOAT32_PASS_TOLERANCE, REPO, random_values, scaled_model_def, \
    write_config
from common.errors import UserError
from dataset.records import encode_example, record_writer
from models.AdapNet_pp import AdapNet_pp
from models.architecture import OUTER_SCOPE, adapnet_pp
from models.model_def import load_masks, load_model_def, save_masks, save_model_def
from netcompress.jobs import export as export_lib
from netcompress.jobs import predict as predict_lib
from netcompress.graphs import serving
from netcompress.formats.checkpoints import checkpoint_key, model_variables, read_checkpoint, \
    restore_model, write_checkpoint
from netcompress.settings.config import load_config
from netcompress.graphs.inference import InferenceGraph
from netcompress.jobs.evaluate import evaluate
from netcompress.graphs.metrics import ConfusionMatrix

tf1 = tf.compat.v1
tf1.disable_eager_execution()

NUM_CLASSES, HEIGHT, WIDTH = 5, 32, 64
NUM_IMAGES = 4
TOLERANCE = FLOAT32_PASS_TOLERANCE
SESSION_CONFIG = tf1.ConfigProto()
SESSION_CONFIG.graph_options.rewrite_options.disable_meta_optimizer = True


def pruned_model_def():
    """Narrower convs, split halves and eASPP/decoder layers; three residual
    conv3s masked (an identity unit, a shortcut unit, an atrous block4 unit)."""
    model_def = scaled_model_def(16)
    params = model_def["params"]
    params["1"] = 3
    params["3"] = [3, 2, 10]
    params["5"] = [6, 5, 20, 32]
    params["8"], model_def["split"]["8"] = [5, 6, 32], [4, 2]
    params["16"], model_def["split"]["16"] = [20, 24, 100, 128], [16, 8]
    params["19"], params["23"], params["33"] = 3, 2, 12
    rng = np.random.default_rng(3)
    masks = {unit: (np.sort(rng.choice(width, kept, replace=False)), width)
             for unit, kept, width in (("block1/unit_2", 10, 16), ("block2/unit_1", 20, 32),
                                       ("block4/unit_2", 100, 128))}
    return model_def, masks


def calibrated_values(model_def, masks, images, seed):
    """Random weights whose moving statistics are ``images``' batch statistics."""
    graph = tf.Graph()
    # Training mode makes every batch norm use its batch statistics; no dropout.
    with graph.as_default(), mock.patch.object(tf1.nn, "dropout", lambda x, rate: x):
        AdapNet_pp(model_def, NUM_CLASSES, masks).build(
            tf.constant(images, tf.float32), training=True, aux=True)
        variables = model_variables(graph)
        norms = [op for op in graph.get_operations() if op.type.startswith("FusedBatchNorm")]
        scopes = []
        for op in norms:  # the gamma variable read by the op names its scope
            source = op.inputs[1].op
            while source.type not in ("VarHandleOp", "VariableV2"):
                source = source.inputs[0].op
            scopes.append(source.name.rsplit("/", 1)[0])
        values = random_values(variables, np.random.default_rng(seed))
        load = [v.initializer for v in variables]
        feed = {v.initializer.inputs[1]: values[checkpoint_key(v.name)] for v in variables}
        with tf1.Session(graph=graph, config=SESSION_CONFIG) as session:
            session.run(load, feed)
            statistics = session.run([(op.outputs[1], op.outputs[2]) for op in norms])
    for scope, (mean, variance) in zip(scopes, statistics):
        values[f"{scope}/moving_mean"] = mean.astype(np.float32)
        values[f"{scope}/moving_variance"] = np.maximum(variance, 1e-2).astype(np.float32)
    return values


def synthetic_images(count, seed):
    """Smooth colour fields with rectangles: varied, not white noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:HEIGHT, 0:WIDTH]
    images = []
    for _ in range(count):
        image = np.stack([rng.uniform(40, 200) + rng.uniform(-1, 1) * x + rng.uniform(-2, 2) * y
                          for _ in range(3)], axis=-1)
        for _ in range(3):
            top, left = rng.integers(0, HEIGHT - 8), rng.integers(0, WIDTH - 8)
            image[top:top + rng.integers(4, 16), left:left + rng.integers(4, 24)] = \
                rng.uniform(0, 255, 3)
        images.append(np.clip(image + rng.normal(0, 8, image.shape), 0, 255))
    return np.stack(images).astype(np.uint8)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("deploy")
    images = synthetic_images(NUM_IMAGES, seed=0)
    labels = np.random.default_rng(1).integers(0, NUM_CLASSES, images.shape[:3]).astype(np.uint8)
    records = str(root / "test.tfrecords")
    with record_writer(records) as writer:
        for image, label in zip(images, labels):
            writer.write(encode_example(image, label))
    configs = {}
    for name, (model_def, masks) in {"unpruned": (scaled_model_def(16), {}),
                                     "pruned": pruned_model_def()}.items():
        model_def_path = str(root / name / "model_def.json")
        save_model_def(model_def, model_def_path)
        mask_path = None
        if masks:
            mask_path = str(root / name / "mask.npy")
            save_masks(masks, mask_path)
        checkpoint = str(root / name / "train" / "model.ckpt")
        write_checkpoint(calibrated_values(model_def, masks, images, seed=len(configs)),
                         checkpoint)
        config_path = write_config(root / name / "test.config", dict(
            gpu_id="", model="AdapNet_pp", num_classes=NUM_CLASSES, checkpoint=checkpoint,
            test_data=records, batch_size=3, skip_step=1, height=HEIGHT, width=WIDTH,
            mask=mask_path, model_def=model_def_path))
        configs[name] = (config_path, load_config(config_path, "evaluate"))
    return root, images, records, configs


def reference_outputs(config, images):
    """The session graph as evaluate builds it (float input, the config's
    atrous path): logits and probabilities."""
    graph = tf.Graph()
    with graph.as_default():
        model = AdapNet_pp(load_model_def(config["model_def"]), NUM_CLASSES,
                           load_masks(config["mask"]))
        placeholder = tf1.placeholder(tf.float32, [None, HEIGHT, WIDTH, 3])
        outputs = model.build(placeholder, training=False, aux=False)
        saver = tf1.train.Saver(model_variables(graph))
    with tf1.Session(graph=graph, config=SESSION_CONFIG) as session:
        saver.restore(session, config["checkpoint"])
        return session.run([outputs.logits, outputs.probabilities],
                           {placeholder: images.astype(np.float32)})


def assert_same_function(logits, probabilities, class_map, other_probabilities, what):
    scale = max(1.0, float(np.max(np.abs(logits))))
    bound = TOLERANCE * scale
    difference = float(np.max(np.abs(probabilities - other_probabilities)))
    assert difference <= bound, (what, difference, bound)
    top2 = np.sort(logits, axis=-1)[..., -2:]
    decided = top2[..., 1] - top2[..., 0] > 2 * bound
    assert decided.mean() > 0.99, (what, "too many ties: the case tests little")
    assert np.array_equal(class_map[decided], np.argmax(logits, axis=-1)[decided]), what


@pytest.mark.parametrize("name", ["unpruned", "pruned"])
def test_exported_files_compute_the_session_graph(workspace, name, tmp_path):
    _, images, records, configs = workspace
    config = configs[name][1]
    pruned = name == "pruned"
    messages = []
    metadata = export_lib.export(config, str(tmp_path / "out"), int8=pruned, onnx=pruned,
                                 check_images=2, log=messages.append)
    out = tmp_path / "out"
    expected = {"saved_model", "model.tflite", "export.json"}
    if pruned:
        expected |= {"model_int8.tflite", "model.onnx"}
    assert set(os.listdir(out)) == expected
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".")], "staging left behind"

    logits, probabilities = reference_outputs(config, images)
    assert probabilities.max(axis=-1).mean() < 0.99, "saturated softmax: tests little"
    runners = [export_lib.SavedModelRunner(str(out / "saved_model")),
               export_lib.TFLiteRunner(out / "model.tflite")]
    if pruned:
        runners.append(export_lib.OnnxRunner(out / "model.onnx"))
    for runner in runners:
        try:
            class_map, other = runner(images)
            assert class_map.dtype == np.int32 and class_map.shape == images.shape[:3]
            assert other.dtype == np.float32 and other.shape == images.shape[:3] + (NUM_CLASSES,)
            assert_same_function(logits, probabilities, class_map, other, runner.name)
            # Another batch size on the same runner (TFLite resizes its input).
            class_map, other = runner(images[1:2])
            assert_same_function(logits[1:2], probabilities[1:2], class_map, other,
                                 runner.name + " batch 1")
        finally:
            runner.close()
    if pruned:
        assert_saved_model_holds_widened_kernels(config, out / "saved_model")
        # tf2onnx folds constants itself: every conv kernel is a stored tensor.
        import onnx
        onnx_graph = onnx.load(str(out / "model.onnx")).graph
        stored = {tensor.name for tensor in onnx_graph.initializer}
        assert all(node.input[1] in stored for node in onnx_graph.node
                   if node.op_type == "Conv")
        int8 = metadata["int8"]
        assert int8["size_bytes"]["int8"] < int8["size_bytes"]["float32"]
        assert any("int8 TFLite" in m for m in messages)
        masks = load_masks(config["mask"])
        assert masks and metadata["folded_masks"] == {
            conv3_kernel(unit): {"kept": [int(i) for i in kept], "width": width}
            for unit, (kept, width) in masks.items()}
    else:
        assert metadata["folded_masks"] == {}
    assert json.loads((out / "export.json").read_text())["folded_masks"] == \
        metadata["folded_masks"]


def conv3_kernel(unit_name):
    scope = {unit.name: unit.scope for unit in adapnet_pp().units}[unit_name]
    return f"{OUTER_SCOPE}/{scope}/conv3/weights"


def assert_saved_model_holds_widened_kernels(config, directory):
    """Each masked conv3 kernel is stored at the residual width (the narrow
    checkpoint kernel in its kept columns, zeros elsewhere), and the graph
    widens nothing per run."""
    masks = load_masks(config["mask"])
    narrow = read_checkpoint(config["checkpoint"])
    saved = tf.train.load_checkpoint(str(directory / "variables" / "variables"))
    for unit, (kept, width) in masks.items():
        name = conv3_kernel(unit)
        wide = saved.get_tensor(name)
        assert wide.shape == narrow[name].shape[:-1] + (width,)
        assert np.array_equal(wide[..., kept], narrow[name])
        assert not np.delete(wide, kept, axis=-1).any()
    saved_model = saved_model_pb2.SavedModel()
    saved_model.ParseFromString((directory / "saved_model.pb").read_bytes())
    (meta,) = saved_model.meta_graphs
    assert "GatherV2" not in {node.op for node in meta.graph_def.node}


def masked_model_graph(config, fold_masks):
    """(graph, image placeholder, logits, model) of evaluate's build of ``config``."""
    graph = tf.Graph()
    with graph.as_default():
        model = AdapNet_pp(load_model_def(config["model_def"]), NUM_CLASSES,
                           load_masks(config["mask"]), fold_masks=fold_masks)
        placeholder = tf1.placeholder(tf.float32, [None, HEIGHT, WIDTH, 3])
        logits = model.build(placeholder, training=False, aux=False).logits
    return graph, placeholder, logits, model


def test_folded_masks_compute_the_per_run_widened_graph(workspace):
    """fold_masks holds each masked conv3 kernel at the residual width,
    widened once at restore: no gather in the graph, and the very same
    logits as widening the narrow kernel on every run (the same kernel
    values reach the same conv)."""
    _, images, _, configs = workspace
    config = configs["pruned"][1]
    masks = load_masks(config["mask"])
    logits = {}
    for fold in (False, True):
        graph, placeholder, output, model = masked_model_graph(config, fold)
        gathers = [op for op in graph.get_operations() if op.type == "GatherV2"]
        assert len(gathers) == (0 if fold else len(masks))
        folded = model.folded_kernels()
        assert sorted(folded) == sorted(conv3_kernel(unit)
                                        for unit in masks) if fold else folded == {}
        with tf1.Session(graph=graph, config=SESSION_CONFIG) as session:
            restore_model(session, config["checkpoint"], model_variables(graph),
                          config["model_def"], model)
            logits[fold] = session.run(output, {placeholder: images.astype(np.float32)})
        shapes = {checkpoint_key(v.name): v.shape.as_list() for v in model_variables(graph)}
        for unit, (kept, width) in masks.items():
            name = conv3_kernel(unit)
            assert shapes[name][-1] == (width if fold else len(kept))
    assert np.array_equal(logits[True], logits[False])
    # The serving graph (predict, export) folds; the export test checks its outputs.
    assert "GatherV2" not in {op.type for op in
                              serving.ServingGraph(config).graph.get_operations()}

    with tf.Graph().as_default(), pytest.raises(ValueError, match="inference graphs only"):
        AdapNet_pp(load_model_def(config["model_def"]), NUM_CLASSES, masks,
                   fold_masks=True).build(tf1.placeholder(tf.float32, [1, HEIGHT, WIDTH, 3]),
                                          training=True)


def test_folded_graph_wants_the_narrow_kernel_in_the_checkpoint(workspace, tmp_path):
    """A checkpoint whose masked conv3 kernel is already at the residual width
    is refused in one line naming the narrow shape the mask needs."""
    config = workspace[3]["pruned"][1]
    values = read_checkpoint(config["checkpoint"])
    name = conv3_kernel("block1/unit_2")
    kept, width = load_masks(config["mask"])["block1/unit_2"]
    values[name] = np.zeros(values[name].shape[:-1] + (width,), np.float32)
    checkpoint = write_checkpoint(values, str(tmp_path / "wide" / "model.ckpt"))
    graph = serving.ServingGraph(dict(config, checkpoint=checkpoint))
    expected = (rf"{name} is \[1, 1, \d+, {width}\] in the checkpoint but "
                rf"\[1, 1, \d+, {len(kept)}\] in the model$")
    with pytest.raises(UserError, match=expected):
        graph.session()


def test_export_refuses_a_used_output_directory(workspace, tmp_path):
    root, _, _, configs = workspace
    config = configs["unpruned"][1]
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "file").write_text("x")
    with pytest.raises(UserError, match="is not empty"):
        export_lib.export(config, str(tmp_path / "old"))
    with pytest.raises(UserError, match="holds the input checkpoint"):
        export_lib.export(config, str(root / "unpruned"))


def test_predict_class_map_is_evaluate_argmax(workspace, tmp_path):
    _, images, records, configs = workspace
    config = configs["pruned"][1]
    result = predict_lib.predict(config, records, str(tmp_path), log=lambda _: None,
                                 progress=False)
    names = [f"test_{i:05d}" for i in range(NUM_IMAGES)]
    assert result == {"written": names, "skipped": []}
    expected = {"legend.png"} | {n + s for n in names for s in ("_label.png", "_overlay.png")}
    assert set(os.listdir(tmp_path)) == expected

    # Today's graph (the narrow kernels widened on every run) as reference.
    inference = InferenceGraph(config, records, fold_masks=False)
    assert "GatherV2" in {op.type for op in inference.graph.get_operations()}
    with inference.graph.as_default():
        fetches = [inference.predictions, inference.outputs.logits, inference.label_ids]
    with tf1.Session(graph=inference.graph) as session:
        inference.restore(session, config["checkpoint"], config["model_def"])
        session.run(inference.data_initializer)
        batches = [session.run(fetches) for _ in range(2)]  # 3 + 1 images
    predictions = np.concatenate([b[0] for b in batches])
    logits = np.concatenate([b[1] for b in batches])
    # evaluate folds the masks: the very same predictions, so the same matrix.
    expected = ConfusionMatrix(NUM_CLASSES)
    expected.update(np.concatenate([b[2] for b in batches]), predictions)
    matrix = evaluate(config, log=lambda _: None, progress=False)
    assert np.array_equal(matrix.matrix, expected.matrix) and matrix.matrix.sum() > 0
    scale = max(1.0, float(np.max(np.abs(logits))))
    top2 = np.sort(logits, axis=-1)[..., -2:]
    decided = top2[..., 1] - top2[..., 0] > 2 * TOLERANCE * scale
    for index, name in enumerate(names):
        with Image.open(tmp_path / f"{name}_label.png") as label:
            assert label.mode == "P" and label.size == (WIDTH, HEIGHT)
            class_map = np.asarray(label)
        assert np.array_equal(class_map[decided[index]], predictions[index][decided[index]])
        with Image.open(tmp_path / f"{name}_overlay.png") as overlay:
            assert overlay.mode == "RGB" and overlay.size == (WIDTH, HEIGHT)


def test_predict_script_on_a_directory(workspace, tmp_path):
    """Images of other sizes come back at their size; a broken file is
    skipped with a one-line warning, the others are written."""
    _, images, _, configs = workspace
    inputs = tmp_path / "in"
    inputs.mkdir()
    Image.fromarray(images[0][..., ::-1]).save(inputs / "same.png")
    Image.fromarray(images[1][..., ::-1]).resize((100, 45)).save(inputs / "other.jpg")
    Image.fromarray(images[2][:, :, 0]).save(inputs / "grey.png")
    (inputs / "broken.png").write_bytes(b"\x89PNG not really")
    (inputs / "notes.txt").write_text("not an image")
    palette = tmp_path / "palette.txt"
    palette.write_text("# R G B name\n0 0 0 void\n255 0 0 red\n0 255 0\n0 0 255 blue\n"
                       "255 255 0 yellow\n")
    out = tmp_path / "out"
    process = subprocess.run(
        [sys.executable, "predict.py", "-c", configs["unpruned"][0], "--input", str(inputs),
         "--output", str(out), "--palette", str(palette)],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert process.returncode == 0, process.stderr
    warnings = [line for line in process.stderr.splitlines() if line.startswith("warning")]
    assert len(warnings) == 1 and "broken.png" in warnings[0], process.stderr
    assert "wrote 3 prediction(s)" in process.stdout
    for name, size in (("same", (WIDTH, HEIGHT)), ("other", (100, 45)),
                       ("grey", (WIDTH, HEIGHT))):
        with Image.open(out / f"{name}_label.png") as label:
            assert label.size == size
            assert np.asarray(label).max() < NUM_CLASSES
            assert label.getpalette()[3:6] == [255, 0, 0]
    assert not (out / "broken_label.png").exists()
    assert (out / "legend.png").exists()


def test_predict_refuses_to_write_into_its_input(workspace, tmp_path):
    _, images, _, configs = workspace
    Image.fromarray(images[0]).save(tmp_path / "a.png")
    (tmp_path / "link").symlink_to(tmp_path)
    for output in (tmp_path, tmp_path / "link"):
        with pytest.raises(UserError, match="is the input directory"):
            predict_lib.predict(configs["unpruned"][1], str(tmp_path), str(output))
    assert sorted(os.listdir(tmp_path)) == ["a.png", "link"]


def test_export_script(workspace, tmp_path):
    config_path = workspace[3]["pruned"][0]
    process = subprocess.run(
        [sys.executable, "export.py", "-c", config_path, "--output", str(tmp_path / "out"),
         "--check_images", "1"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert process.returncode == 0, process.stderr
    assert "TFLite" in process.stdout and "class-map mismatches 0" in process.stdout
    assert process.stderr.strip() == "", process.stderr
    assert os.path.isfile(tmp_path / "out" / "model.tflite")

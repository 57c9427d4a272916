"""export.py: SavedModel, TFLite (and ONNX) files of a checkpoint, checked
against the session graph (docs/deploy.md).

The SavedModel is written from a graph-mode session (tf.compat.v1
SavedModelBuilder) holding ``serving.ServingGraph``; the TFLite files come
from it through TensorFlow's converter, the ONNX file from the same graph
frozen, through tf2onnx. Every file is run on images of ``test_data`` and
compared with the session graph before the output directory appears.
"""

import contextlib
import json
import logging
import os
import time

import numpy as np
import tensorflow as tf

from common.digests import checkpoint_line, records_line
from common.errors import UserError, error_line, one_line
from common.files import atomic_directory, make_directory
from common.outputs import real
from dataset.records import read_examples, require_record_file
from netcompress.graphs import serving
from netcompress.graphs.models import with_checkpoint_model
from netcompress.graphs.metrics import ConfusionMatrix

tf1 = tf.compat.v1

SIGNATURE_KEY = "serving_default"
SAVED_MODEL = "saved_model"
TFLITE = "model.tflite"
TFLITE_INT8 = "model_int8.tflite"
ONNX = "model.onnx"
METADATA = "export.json"
ONNX_OPSET = 17
# How far an exported file's probabilities may be from the session graph's,
# relative to the logits' largest magnitude (at least 1): the same float32
# function with other kernels (XNNPACK, ONNX Runtime) sums in another order,
# which moves each logit by a fraction of the magnitudes summed, and a
# softmax moves no probability by more than the largest logit change. The
# tiny test networks stay within 1e-4; the full network is deeper and
# wider, so the check allows 1e-3 (docs/deploy.md).
# (An absolute bound failed an untrained full network: its logits are large.)
EXPORT_TOLERANCE = 1e-3
OUTPUT_NAMES = (serving.CLASS_MAP_NAME, serving.PROBABILITIES_NAME)


@contextlib.contextmanager
def _stderr_silenced():
    """LiteRT and ONNX Runtime print C++ start-up lines (delegates created)
    straight to file descriptor 2, around a script's own output."""
    import sys
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


@contextlib.contextmanager
def _absl_quiet():
    # The converter logs "Invoking the TF1 implementation" through absl at
    # WARNING in graph mode; that is what we want, not news.
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


# ---- writing ---------------------------------------------------------------

def write_saved_model(graph, session, directory):
    """SavedModel of a ServingGraph: tag 'serve', signature 'serving_default'
    images (uint8 [N,H,W,3] BGR) -> class_map, probabilities."""
    signature = tf1.saved_model.signature_def_utils.predict_signature_def(
        inputs={serving.INPUT_NAME: graph.images},
        outputs={serving.CLASS_MAP_NAME: graph.class_map,
                 serving.PROBABILITIES_NAME: graph.probabilities})
    builder = tf1.saved_model.Builder(directory)
    with graph.graph.as_default():
        builder.add_meta_graph_and_variables(
            session, [tf1.saved_model.tag_constants.SERVING],
            signature_def_map={SIGNATURE_KEY: signature}, strip_default_attrs=True)
    builder.save()
    return directory


def convert_tflite(saved_model_dir, int8=False):
    """TFLite flatbuffer bytes (float32, or dynamic-range int8 weights).

    In graph mode TensorFlow's converter takes its TF1 path: the file has
    no signature, its tensors are named images / class_map / probabilities."""
    with _absl_quiet(), _stderr_silenced():
        converter = tf.lite.TFLiteConverter.from_saved_model(saved_model_dir)
        if int8:
            converter.optimizations = [tf.lite.Optimize.DEFAULT]
        return converter.convert()


def frozen_graph_def(graph, session):
    """The serving graph with its variables as constants (for tf2onnx)."""
    with graph.graph.as_default():
        return tf1.graph_util.convert_variables_to_constants(
            session, graph.graph.as_graph_def(), list(OUTPUT_NAMES))


def convert_onnx(graph_def):
    """ONNX model bytes of a frozen serving graph, through tf2onnx."""
    try:
        import tf2onnx
    except ImportError:
        raise UserError("--onnx needs tf2onnx and onnxruntime (pip install -r "
                        "requirements.txt)") from None
    with _absl_quiet(), _stderr_silenced():
        model, _ = tf2onnx.convert.from_graph_def(
            graph_def, input_names=[serving.INPUT_NAME + ":0"],
            output_names=[name + ":0" for name in OUTPUT_NAMES], opset=ONNX_OPSET)
    return model.SerializeToString()


# ---- running ---------------------------------------------------------------

class SavedModelRunner:
    """A SavedModel loaded into its own graph-mode session, run through its
    signature's tensor names."""

    name = "SavedModel"

    def __init__(self, directory, threads=0):
        self.graph = tf.Graph()
        config = tf1.ConfigProto(intra_op_parallelism_threads=threads,
                                 inter_op_parallelism_threads=threads)
        self.session = tf1.Session(graph=self.graph, config=config)
        with self.graph.as_default():
            meta = tf1.saved_model.loader.load(
                self.session, [tf1.saved_model.tag_constants.SERVING], directory)
        signature = meta.signature_def[SIGNATURE_KEY]
        self.input = signature.inputs[serving.INPUT_NAME].name
        self.outputs = [signature.outputs[name].name for name in OUTPUT_NAMES]

    def __call__(self, images):
        return self.session.run(self.outputs, {self.input: images})

    def close(self):
        self.session.close()


def litert_interpreter(model_path=None, model_content=None, threads=None):
    """LiteRT's interpreter (ai-edge-litert): TensorFlow 2.21's own
    tf.lite.Interpreter is deprecated in its favour."""
    from ai_edge_litert.interpreter import Interpreter
    with _stderr_silenced():
        return Interpreter(model_path=model_path, model_content=model_content,
                           num_threads=threads)


class TFLiteRunner:
    """A TFLite file run by LiteRT; the batch dimension is resized per call."""

    name = "TFLite"

    def __init__(self, path, threads=None):
        self.interpreter = litert_interpreter(model_path=str(path), threads=threads)
        inputs = self.interpreter.get_input_details()
        self.input = next(d["index"] for d in inputs if d["name"] == serving.INPUT_NAME)
        outputs = {d["name"]: d["index"] for d in self.interpreter.get_output_details()}
        self.outputs = [outputs[name] for name in OUTPUT_NAMES]
        self.shape = None

    def __call__(self, images):
        if self.shape != images.shape:
            with _stderr_silenced():
                self.interpreter.resize_tensor_input(self.input, images.shape)
                self.interpreter.allocate_tensors()
            self.shape = images.shape
        self.interpreter.set_tensor(self.input, images)
        self.interpreter.invoke()
        # Copies: the interpreter reuses its buffers on the next invoke.
        return [np.array(self.interpreter.get_tensor(i)) for i in self.outputs]

    def close(self):
        self.interpreter = None


class OnnxRunner:
    name = "ONNX"

    def __init__(self, path, threads=0):
        import onnxruntime
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        options.log_severity_level = 3  # errors only
        with _stderr_silenced():
            self.session = onnxruntime.InferenceSession(
                str(path), options, providers=["CPUExecutionProvider"])
        self.outputs = [name + ":0" for name in OUTPUT_NAMES]

    def __call__(self, images):
        return self.session.run(self.outputs, {serving.INPUT_NAME + ":0": images})

    def close(self):
        self.session = None


# ---- comparing -------------------------------------------------------------

def compare(reference, other, tolerance):
    """Differences between the reference's (class map, probabilities,
    logits) and another (class map, probabilities, ...).

    The bound on probability differences is ``tolerance`` times the logits'
    largest magnitude (at least 1); class-map pixels are compared where the
    reference's top two logits are more than twice the bound apart
    (elsewhere the argmax is a tie within rounding)."""
    class_map, probabilities, logits = reference
    other_map, other_probabilities = other[:2]
    bound = tolerance * max(1.0, float(np.max(np.abs(logits))))
    top2 = np.sort(logits, axis=-1)[..., -2:]
    decided = (top2[..., 1] - top2[..., 0]) > 2 * bound
    return {"max_probability_difference": float(np.max(np.abs(probabilities
                                                              - other_probabilities))),
            "bound": bound,
            "class_map_mismatches": int(np.sum((class_map != other_map) & decided)),
            "ties": int(np.sum(~decided))}


def network_images(images_bgr, height, width):
    """uint8 BGR images at the network's size, resized as predict.py resizes
    (bilinear, only when the size differs)."""
    from netcompress.jobs.predict import network_input

    return np.stack([network_input(np.ascontiguousarray(image[..., ::-1]), height, width)
                     for image in images_bgr])


def test_images(path, limit, height, width):
    """The first ``limit`` images of a record file at the network's size
    (uint8 BGR), and their labels at the records' size."""
    images, labels = [], []
    for image, label in read_examples(path):
        if len(images) >= limit:
            break
        images.append(image)
        labels.append(label)
    if not images:
        raise UserError(f"{path} holds no records to check the export on")
    return network_images(images, height, width), np.stack(labels)


def mean_iou(runner, path, num_classes, batch_size, height, width):
    """mIoU (percent) of ``runner`` over a whole record file: images resized
    to the network's size, class maps back to the labels' (as predict.py)."""
    from netcompress.jobs.predict import to_original_size

    matrix = ConfusionMatrix(num_classes)
    images, labels = [], []

    def flush():
        if images:
            maps = runner(network_images(images, height, width))[0]
            matrix.update(np.stack(labels), np.stack(
                [to_original_size(m, *label.shape) for m, label in zip(maps, labels)]))
            images.clear()
            labels.clear()
    for image, label in read_examples(path):
        images.append(image)
        labels.append(label)
        if len(images) == batch_size:
            flush()
    flush()
    return 100.0 * float(np.nan_to_num(matrix.mean_iou()))


# ---- the export ------------------------------------------------------------

def check_output_directory(output, inputs):
    """``output`` must be new or an empty directory (the export appears
    there whole or not at all) and must not hold an input."""
    if os.path.lexists(output) and not os.path.isdir(output):
        raise UserError(f"--output {output!r} exists and is not a directory")
    target = real(output)
    for key, path in inputs.items():
        if path and (real(path) == target or real(path).startswith(target + os.sep)):
            raise UserError(f"--output {output!r} holds the input {key} {path!r}: "
                            f"give a new or empty directory")
    if os.path.isdir(output) and os.listdir(output):
        raise UserError(f"--output {output!r} is not empty: give a new or empty directory "
                        f"(an export is never mixed with older files)")
    parent = os.path.dirname(os.path.abspath(output))
    make_directory(parent)
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"--output {output!r}: directory {parent!r} is not writable")


def export(config, output, int8=False, onnx=False, check_images=8, log=print):
    """Write ``output``/{saved_model/, model.tflite, [model_int8.tflite],
    [model.onnx], export.json}; returns the metadata written to export.json.

    Everything is written into a hidden directory beside ``output`` and
    renamed to it once every file is written and checked."""
    config = with_checkpoint_model(config)  # num_classes, model: the checkpoint's
    check_output_directory(output, {key: config.get(key) for key in
                                    ("checkpoint", "model_def", "mask", "test_data")})
    require_record_file(config["test_data"])
    images, _ = test_images(config["test_data"], check_images, config["height"],
                            config["width"])
    try:
        with atomic_directory(output) as staging:
            metadata = _export_into(config, staging, images, int8, onnx, log)
            metadata["files"] = sorted(os.listdir(staging)) + [METADATA]
            with open(os.path.join(staging, METADATA), "w") as f:
                json.dump(metadata, f, indent=1)
                f.write("\n")
    except OSError as exc:
        raise UserError(f"cannot write the export to {output}: {one_line(exc)}") from None
    log(f"exported to {output}: " + ", ".join(metadata["files"]))
    return metadata


def _export_into(config, directory, images, int8, onnx, log):
    graph = serving.ServingGraph(config)
    with tf1.Session(graph=graph.graph) as session:
        prefix = graph.restore(session)
        reference = session.run([graph.class_map, graph.probabilities, graph.logits],
                                {graph.images: images})
        try:
            saved_model = write_saved_model(graph, session,
                                            os.path.join(directory, SAVED_MODEL))
        except tf.errors.OpError as exc:  # TensorFlow's file writes: disk full, ...
            raise OSError(f"SavedModel: {error_line(exc)}") from None
        frozen = frozen_graph_def(graph, session) if onnx else None
    log(checkpoint_line(prefix))
    log(records_line("test_data", config["test_data"], len(images)) + " (the check images)")
    log("SavedModel written")

    files = [(SavedModelRunner, saved_model)]
    tflite = os.path.join(directory, TFLITE)
    with open(tflite, "wb") as f:
        f.write(convert_tflite(saved_model))
    files.append((TFLiteRunner, tflite))
    if onnx:
        path = os.path.join(directory, ONNX)
        with open(path, "wb") as f:
            f.write(convert_onnx(frozen))
        files.append((OnnxRunner, path))

    checks = {}
    log(f"check on {len(images)} image(s) of {config['test_data']} against the session "
        f"graph (probabilities within {EXPORT_TOLERANCE} x the logits' largest magnitude):")
    for runner_class, path in files:
        runner = runner_class(path)
        try:
            found = compare(reference, runner(images), EXPORT_TOLERANCE)
        finally:
            runner.close()
        checks[runner.name] = found
        log(f"  {runner.name:<10} max |probability difference| "
            f"{found['max_probability_difference']:.2e} (bound {found['bound']:.2e}), "
            f"class-map mismatches {found['class_map_mismatches']} (ties skipped: "
            f"{found['ties']})")
        if found["max_probability_difference"] > found["bound"] \
                or found["class_map_mismatches"]:
            raise UserError(f"the {runner.name} file does not compute what the session "
                            f"graph does (max probability difference "
                            f"{found['max_probability_difference']:.2e}, bound "
                            f"{found['bound']:.2e}, "
                            f"{found['class_map_mismatches']} class-map mismatches): "
                            f"nothing written")

    metadata = {
        "input": {"name": serving.INPUT_NAME, "dtype": "uint8",
                  "shape": [None, config["height"], config["width"], 3],
                  "channels": "BGR", "range": "0..255"},
        "outputs": {serving.CLASS_MAP_NAME: {"dtype": "int32",
                                             "shape": [None, config["height"],
                                                       config["width"]]},
                    serving.PROBABILITIES_NAME: {"dtype": "float32",
                                                 "shape": [None, config["height"],
                                                           config["width"],
                                                           config["num_classes"]]}},
        "num_classes": config["num_classes"],
        "signature": SIGNATURE_KEY,
        "source": {"checkpoint": prefix, "model_def": config["model_def"],
                   "mask": config.get("mask"), "model": config["model"]},
        # Masked conv3 kernels are held at the residual width, zero columns
        # where the mask removed a channel (docs/deploy.md, "Masks at inference").
        "folded_masks": {name: {"kept": [int(i) for i in kept], "width": int(width)}
                         for name, (kept, width) in sorted(graph.model.folded_kernels().items())},
        "checks": checks,
        "check_tolerance": EXPORT_TOLERANCE,
        "check_tolerance_times": "max(1, largest |logit|)",
    }
    if int8:
        metadata["int8"] = _export_int8(config, saved_model, directory, tflite, log)
    return metadata


def _export_int8(config, saved_model, directory, tflite, log):
    """Dynamic-range int8 weights: smaller, not equal; its mIoU change on
    ``test_data`` is reported (float TFLite vs int8 TFLite)."""
    path = os.path.join(directory, TFLITE_INT8)
    with open(path, "wb") as f:
        f.write(convert_tflite(saved_model, int8=True))
    log(f"int8 (dynamic range): mIoU over {config['test_data']} ...")
    results = {}
    for name, file in (("float32", tflite), ("int8", path)):
        runner = TFLiteRunner(file)
        start = time.perf_counter()
        results[name] = mean_iou(runner, config["test_data"], config["num_classes"],
                                 config["batch_size"], config["height"], config["width"])
        results[name + "_seconds"] = time.perf_counter() - start
        runner.close()
    results["change"] = results["int8"] - results["float32"]
    results["size_bytes"] = {"float32": os.path.getsize(tflite), "int8": os.path.getsize(path)}
    log(f"  mIoU float32 TFLite {results['float32']:.2f}, int8 TFLite {results['int8']:.2f} "
        f"(change {results['change']:+.2f}); size {results['size_bytes']['float32']:,} -> "
        f"{results['size_bytes']['int8']:,} bytes")
    return results

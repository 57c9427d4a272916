"""The inference network as deployed: uint8 BGR images in, class map and
probabilities out (docs/deploy.md).

One builder for predict.py, export.py's SavedModel and bench/deploy_latency.py,
so that every model_def + mask is served by the same graph: the model from
the config, built with training=False and aux=False (no auxiliary heads, no
dropout, batch norm on its moving statistics), restored strictly from the
checkpoint. Masked conv3 kernels are held at the residual width, widened
once at restore (fold_masks), so masks cost nothing per run.
"""

import tensorflow as tf

from models import atrous
from netcompress.formats import checkpoints
from netcompress.formats.checkpoint_paths import resolve_checkpoint
from netcompress.graphs.models import model_from_config, with_checkpoint_model

tf1 = tf.compat.v1

INPUT_NAME = "images"
CLASS_MAP_NAME = "class_map"
PROBABILITIES_NAME = "probabilities"


def serving_atrous_path(path):
    """Inference never needs gradient kernels, so `auto` means one dilated
    Conv2D: the form TFLite and ONNX have an op for (docs/atrous.md)."""
    return atrous.NATIVE if path in (None, atrous.AUTO) else path


class ServingGraph:
    """``images``: uint8 [N, height, width, 3] BGR placeholder (N free);
    ``class_map`` int32 [N, height, width]; ``probabilities`` float32
    [N, height, width, num_classes]; ``logits`` before the softmax."""

    def __init__(self, config, atrous_path=None, fold_masks=True):
        """``fold_masks=False`` widens masked kernels on every run, as the
        training graph does (bench/mask_folding.py compares the two)."""
        self.config = config = with_checkpoint_model(config)
        self.height, self.width = config["height"], config["width"]
        self.num_classes = config["num_classes"]
        served = dict(config, atrous_path=serving_atrous_path(
            atrous_path or config.get("atrous_path")))
        self.graph = tf.Graph()
        with self.graph.as_default():
            self.model = model = model_from_config(served, fold_masks=fold_masks)
            self.images = tf1.placeholder(tf.uint8, [None, self.height, self.width, 3],
                                          name=INPUT_NAME)
            outputs = model.build(tf.cast(self.images, tf.float32), training=False,
                                  aux=False)
            self.logits = outputs.logits
            self.probabilities = tf.identity(outputs.probabilities, name=PROBABILITIES_NAME)
            self.class_map = tf.argmax(outputs.logits, axis=3, output_type=tf.int32,
                                       name=CLASS_MAP_NAME)
            self.variables = checkpoints.model_variables(self.graph)

    def restore(self, session):
        """Restore the config's checkpoint; its aux heads (absent here) may be there."""
        prefix = resolve_checkpoint(self.config["checkpoint"])
        checkpoints.restore_model(session, prefix, self.variables,
                                  self.config.get("model_def"), self.model)
        return prefix

    def session(self, threads=0):
        """A session with the checkpoint restored."""
        config = tf1.ConfigProto(intra_op_parallelism_threads=threads,
                                 inter_op_parallelism_threads=threads)
        session = tf1.Session(graph=self.graph, config=config)
        try:
            self.restore(session)
        except BaseException:
            session.close()
            raise
        return session

"""Evaluation (evaluate.py): mIoU over one pass of the test records."""

import numpy as np
import tensorflow as tf
from tqdm import tqdm

from dataset.pipeline import eval_dataset
from dataset.records import count_records
from models.architecture import adapnet_pp
from netcompress import checkpoints, op_errors
from netcompress.metrics import ConfusionMatrix
from netcompress.models import model_from_config

tf1 = tf.compat.v1


class InferenceGraph:
    """Model in inference mode over a single pass of ``data_path``."""

    def __init__(self, config, data_path, aux=False, shard=None):
        self.graph = tf.Graph()
        with self.graph.as_default():
            self.model = model_from_config(config)
            dataset = eval_dataset(data_path, config["batch_size"], config["height"],
                                   config["width"], config["num_classes"], shard=shard)
            self.images, self.labels = tf1.data.make_one_shot_iterator(dataset).get_next()
            self.outputs = self.model.build(self.images, training=False, aux=aux)
            self.predictions = tf.argmax(self.outputs.logits, axis=3, output_type=tf.int32)
            self.label_ids = tf.argmax(self.labels, axis=3, output_type=tf.int32)
            self.model_variables = checkpoints.model_variables(self.graph)

    def restore(self, session, checkpoint, model_def_path):
        aux_heads = [c.scope for c in adapnet_pp().convs if c.aux]
        checkpoints.restore_strict(session, checkpoint, self.model_variables,
                                   model_name=f"model_def {model_def_path}",
                                   optional_scopes=aux_heads)


def iterate_batches(session, fetches, data_path):
    """Run ``fetches`` until the single-pass dataset is exhausted."""
    while True:
        try:
            with op_errors.reported(data_path, session.graph):
                batch = session.run(fetches)
        except tf.errors.OutOfRangeError:
            return
        yield batch


def evaluate(config, log=print, class_names=None, progress=True):
    """Returns the ConfusionMatrix; logs the per-class report, mIoU last."""
    data_path = config["test_data"]
    inference = InferenceGraph(config, data_path)
    total = count_records(data_path)
    matrix = ConfusionMatrix(config["num_classes"])
    with tf1.Session(graph=inference.graph) as session:
        inference.restore(session, config["checkpoint"], config["model_def"])
        bar = tqdm(total=total, desc="evaluate", unit="img", disable=not progress,
                   dynamic_ncols=True)
        batches = iterate_batches(session, [inference.label_ids, inference.predictions],
                                  data_path)
        with bar:  # closed (newline written) before any error message
            for batch, (labels, predictions) in enumerate(batches, start=1):
                matrix.update(labels, predictions)
                bar.update(labels.shape[0])
                if batch % config["skip_step"] == 0:
                    bar.set_postfix(mIoU=f"{100 * np.nan_to_num(matrix.mean_iou()):.2f}")
    log(f"checkpoint: {config['checkpoint']}")
    log(matrix.report(class_names))
    return matrix

"""Evaluation (evaluate.py): mIoU over one pass of the test records."""

import numpy as np

from common.digests import checkpoint_line, records_line
from dataset.records import count_records
from netcompress.formats.palette import config_class_names
from netcompress.graphs.inference import InferenceGraph
from netcompress.graphs.metrics import ConfusionMatrix
from netcompress.graphs.models import with_checkpoint_model


def evaluate(config, log=print, class_names=None, progress=True):
    """Returns the ConfusionMatrix; logs the per-class report, mIoU last.
    ``class_names`` default: the config's optional `classes` file."""
    config = with_checkpoint_model(config)
    if class_names is None:
        class_names = config_class_names(config)  # read before the pass
    data_path = config["test_data"]
    inference = InferenceGraph(config, data_path, fold_masks=True)
    matrix = ConfusionMatrix(config["num_classes"])
    batches = examples = 0

    def handle(fetched):
        nonlocal batches, examples
        labels, predictions = fetched
        matrix.update(labels, predictions)
        batches += 1
        examples += labels.shape[0]
        note = None
        if batches % config["skip_step"] == 0:
            note = f"mIoU={100 * np.nan_to_num(matrix.mean_iou()):.2f}"
        return labels.shape[0], note

    inference.run_pass(config, [inference.label_ids, inference.predictions], handle,
                       count_records(data_path), "evaluate", progress)
    log(checkpoint_line(inference.restored))
    log(records_line("test_data", data_path, examples))
    log(matrix.report(class_names))
    return matrix

"""Evaluation (evaluate.py): mIoU over one pass of the test records."""

import numpy as np

from common.digests import checkpoint_line, records_line
from dataset.records import count_records
from netcompress.formats.palette import config_class_names
from netcompress.graphs.inference import InferenceGraph
from netcompress.graphs.metrics import ConfusionMatrix
from netcompress.graphs.models import with_checkpoint_model


def evaluate(config, log=print, class_names=None, progress=True):
    """Returns the ConfusionMatrix of one pass over config's test_data; logs
    the per-class report, mIoU last. ``class_names`` default: the config's
    optional `classes` file."""
    with Evaluation(config, class_names) as evaluation:
        return evaluation.run(config["test_data"], log, progress)


class Evaluation:
    """One model's inference graph, restored once, for passes over several
    record files (compress.py validates a model, then tests it)."""

    def __init__(self, config, class_names=None):
        self.config = with_checkpoint_model(config)
        # Read before any pass.
        self.class_names = config_class_names(self.config) if class_names is None \
            else class_names
        self.inference = InferenceGraph(self.config, None, fold_masks=True)
        self.session = None

    def run(self, data_path, log=print, progress=True, role="test_data"):
        """The ConfusionMatrix of one pass over ``data_path``; logs the
        checkpoint restored, the records read (as ``role``) and the
        per-class report, mIoU last."""
        total = count_records(data_path)  # also checks the file
        if self.session is None:
            self.session = self.inference.open_session(self.config)
        inference, skip_step = self.inference, self.config["skip_step"]
        matrix = ConfusionMatrix(self.config["num_classes"])
        batches = examples = 0

        def handle(fetched):
            nonlocal batches, examples
            labels, predictions = fetched
            matrix.update(labels, predictions)
            batches += 1
            examples += labels.shape[0]
            note = None
            if batches % skip_step == 0:
                note = f"mIoU={100 * np.nan_to_num(matrix.mean_iou()):.2f}"
            return labels.shape[0], note

        inference.run_pass(self.config, [inference.label_ids, inference.predictions], handle,
                           total, "evaluate", progress, self.session, data_path)
        log(checkpoint_line(inference.restored))
        log(records_line(role, data_path, examples))
        log(matrix.report(self.class_names))
        return matrix

    def close(self):
        if self.session is not None:
            self.session.close()
            self.session = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

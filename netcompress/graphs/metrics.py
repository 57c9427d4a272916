"""Segmentation metric: mean IoU over classes 1..N-1 from a confusion matrix
accumulated over a whole data set (docs/metric.md).

Class 0 is void: pixels labelled 0 are ignored entirely (whatever was
predicted there). A prediction of 0 on a non-void pixel is a miss of the true
class: it stays in that class's row, so it lowers that class's IoU.
"""

import numpy as np

from common.errors import UserError

VOID_CLASS = 0


def confusion_matrix(labels, predictions, num_classes):
    """int64 [C, C] counts, rows = label class, columns = predicted class.

    `labels` and `predictions` are integer class-id arrays of the same shape.
    Pixels labelled void (0) are not counted, so row 0 is always zero.
    """
    labels = np.asarray(labels)
    predictions = np.asarray(predictions)
    if labels.shape != predictions.shape:
        raise ValueError("labels %s and predictions %s differ in shape"
                         % (labels.shape, predictions.shape))
    labels = labels.reshape(-1).astype(np.int64, copy=False)
    predictions = predictions.reshape(-1).astype(np.int64, copy=False)

    counted = labels != VOID_CLASS
    labels = labels[counted]
    predictions = predictions[counted]
    if labels.size:
        # Label ids come from the user's data set; a wrong num_classes in the
        # config shows up here.
        out_of_range = (labels < 0) | (labels >= num_classes)
        if out_of_range.any():
            raise UserError("label contains class id %d but num_classes is %d "
                            "(ids must be 0..%d)"
                            % (labels[out_of_range][0], num_classes, num_classes - 1))
        if predictions.min() < 0 or predictions.max() >= num_classes:
            raise ValueError("prediction ids outside 0..%d" % (num_classes - 1))
    flat = labels * num_classes + predictions
    counts = np.bincount(flat, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes).astype(np.int64, copy=False)


def iou_from_confusion(matrix):
    """Per-class IoU, indexed by class id; NaN for void and for classes with
    no pixels in labels nor predictions.

    IoU_c = TP / (pixels labelled c + non-void pixels predicted c - TP).
    """
    matrix = np.asarray(matrix, dtype=np.float64)
    true_positives = np.diag(matrix)
    labelled = matrix.sum(axis=1)
    predicted = matrix.sum(axis=0)  # row 0 is empty: void-labelled pixels excluded
    union = labelled + predicted - true_positives
    iou = np.full(matrix.shape[0], np.nan)
    defined = union > 0
    iou[defined] = true_positives[defined] / union[defined]
    iou[VOID_CLASS] = np.nan
    return iou


class ConfusionMatrix:
    """Accumulates a confusion matrix over batches and reports IoU.

    `update(labels, predictions)` takes integer class-id arrays of equal
    shape: [H, W] (one image) or [N, H, W, ...] (a batch of N images);
    `num_images` counts images that way (first axis when ndim >= 3, else 1).
    """

    def __init__(self, num_classes):
        if num_classes < 2:
            raise ValueError("num_classes must be >= 2 (void plus one class)")
        self.num_classes = int(num_classes)
        self.matrix = np.zeros((self.num_classes, self.num_classes), dtype=np.int64)
        self.num_images = 0

    def update(self, labels, predictions):
        labels = np.asarray(labels)
        self.matrix += confusion_matrix(labels, predictions, self.num_classes)
        self.num_images += labels.shape[0] if labels.ndim >= 3 else 1

    def class_iou(self):
        """float array [num_classes] indexed by class id; entry 0 (void) and
        classes that never appear are NaN."""
        return iou_from_confusion(self.matrix)

    def absent_classes(self):
        """Class ids 1..N-1 with no pixels in labels nor predictions."""
        iou = self.class_iou()
        return [c for c in range(1, self.num_classes) if np.isnan(iou[c])]

    def mean_iou(self):
        """Mean IoU (fraction, 0..1) over non-void classes that appear; NaN if
        none does."""
        iou = self.class_iou()[1:]
        defined = iou[~np.isnan(iou)]
        return float(defined.mean()) if defined.size else float("nan")

    def report(self, class_names=None):
        """Per-class table, image count, classes left out of the mean, and
        as last line `mIoU: <percent, 2 decimals>`.

        class_names: a sequence indexed by class id (length num_classes) or a
        mapping {class id: name}; missing names are left blank.
        """
        names = _name_lookup(class_names, self.num_classes)
        iou = self.class_iou()
        labelled = self.matrix.sum(axis=1)
        name_width = max([len("name")] + [len(names(c)) for c in range(self.num_classes)])
        lines = ["%5s  %-*s  %7s  %14s" % ("class", name_width, "name", "IoU %",
                                          "label pixels")]
        for c in range(1, self.num_classes):
            shown = "-" if np.isnan(iou[c]) else "%.2f" % (100.0 * iou[c])
            lines.append("%5d  %-*s  %7s  %14d" % (c, name_width, names(c), shown,
                                                  labelled[c]))
        lines.append("images: %d" % self.num_images)
        absent = self.absent_classes()
        if absent:
            listed = ", ".join(("%d (%s)" % (c, names(c))) if names(c) else str(c)
                               for c in absent)
            lines.append("left out of the mean (no pixels in labels or "
                         "predictions): %s" % listed)
        else:
            lines.append("left out of the mean: none (every class appears)")
        lines.append("mIoU: %.2f" % (100.0 * self.mean_iou()))
        return "\n".join(lines)


def _name_lookup(class_names, num_classes):
    if class_names is None:
        return lambda c: ""
    if hasattr(class_names, "get"):
        return lambda c: str(class_names.get(c, ""))
    class_names = list(class_names)
    if len(class_names) != num_classes:
        raise ValueError("class_names has %d entries; expected %d (one per class "
                         "id, void included)" % (len(class_names), num_classes))
    return lambda c: str(class_names[c])

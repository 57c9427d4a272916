import math

import numpy as np
import pytest

from common.errors import UserError
from netcompress.graphs.metrics import ConfusionMatrix, confusion_matrix

# 5 classes: 0 void, 1, 2, 3 (only ever predicted), 4 (never appears on a
# non-void pixel; predicted once on a void pixel, which must not count).
LABELS = np.array([[0, 0, 1, 1, 1],
                   [2, 2, 2, 1, 2]])
PREDICTIONS = np.array([[1, 4, 1, 0, 2],
                        [2, 2, 1, 3, 2]])
# Rows = label, columns = prediction, counted by hand from the non-void pixels:
# (1,1) (1,0) (1,2) (2,2) (2,2) (2,1) (1,3) (2,2)
EXPECTED_MATRIX = np.array([[0, 0, 0, 0, 0],
                            [1, 1, 1, 1, 0],
                            [0, 1, 3, 0, 0],
                            [0, 0, 0, 0, 0],
                            [0, 0, 0, 0, 0]])
# IoU = TP / (row + column - TP)
# class 1: 1 / (4 + 2 - 1) = 0.2   (the void prediction stays in its row)
# class 2: 3 / (4 + 4 - 3) = 0.6
# class 3: 0 / (0 + 1 - 0) = 0.0
# class 4: no pixels -> undefined, left out of the mean
EXPECTED_IOU = [0.2, 0.6, 0.0]
EXPECTED_MIOU = (0.2 + 0.6 + 0.0) / 3


def test_confusion_matrix_matches_hand_count():
    matrix = confusion_matrix(LABELS, PREDICTIONS, 5)
    assert matrix.dtype == np.int64
    np.testing.assert_array_equal(matrix, EXPECTED_MATRIX)


def test_class_iou_and_mean_iou_match_hand_values():
    metric = ConfusionMatrix(5)
    metric.update(LABELS, PREDICTIONS)
    iou = metric.class_iou()
    assert len(iou) == 5
    assert math.isnan(iou[0])
    np.testing.assert_allclose(iou[1:4], EXPECTED_IOU)
    assert math.isnan(iou[4])
    assert metric.absent_classes() == [4]
    assert metric.mean_iou() == pytest.approx(EXPECTED_MIOU)


def test_void_pixels_are_ignored_whatever_is_predicted():
    metric = ConfusionMatrix(3)
    labels = np.array([0, 0, 0, 1, 2])
    metric.update(labels, np.array([1, 2, 2, 1, 2]))
    other = ConfusionMatrix(3)
    other.update(labels, np.array([2, 1, 0, 1, 2]))
    np.testing.assert_array_equal(metric.matrix, other.matrix)
    assert metric.mean_iou() == pytest.approx(1.0)


def test_void_prediction_on_labelled_pixel_is_a_miss():
    metric = ConfusionMatrix(2)
    metric.update(np.array([1, 1, 1, 1]), np.array([1, 1, 0, 0]))
    assert metric.class_iou()[1] == pytest.approx(0.5)
    assert metric.mean_iou() == pytest.approx(0.5)


def test_accumulating_batches_equals_one_update_on_concatenation():
    rng = np.random.default_rng(0)
    batches = [(rng.integers(0, 6, size=(n, 8, 16)), rng.integers(0, 6, size=(n, 8, 16)))
               for n in (1, 3, 2)]
    accumulated = ConfusionMatrix(6)
    for labels, predictions in batches:
        accumulated.update(labels, predictions)
    whole = ConfusionMatrix(6)
    whole.update(np.concatenate([b[0] for b in batches]),
                 np.concatenate([b[1] for b in batches]))
    np.testing.assert_array_equal(accumulated.matrix, whole.matrix)
    assert accumulated.num_images == whole.num_images == 6
    assert accumulated.mean_iou() == pytest.approx(whole.mean_iou())

    # and both equal a plain per-pixel count
    labels = np.concatenate([b[0] for b in batches]).ravel()
    predictions = np.concatenate([b[1] for b in batches]).ravel()
    naive = np.zeros((6, 6), dtype=np.int64)
    for label, prediction in zip(labels, predictions):
        if label != 0:
            naive[label, prediction] += 1
    np.testing.assert_array_equal(whole.matrix, naive)


def test_num_images_counts_first_axis_of_batches_and_single_images():
    metric = ConfusionMatrix(3)
    metric.update(np.ones((4, 2, 2), np.uint8), np.ones((4, 2, 2), np.uint8))
    metric.update(np.ones((2, 2), np.uint8), np.ones((2, 2), np.uint8))
    assert metric.num_images == 5
    assert metric.matrix[1, 1] == 20


def test_report_lists_classes_and_ends_with_miou_line():
    metric = ConfusionMatrix(5)
    metric.update(LABELS[None], PREDICTIONS[None])
    text = metric.report(class_names=["void", "road", "car", "sign", "bike"])
    lines = text.splitlines()
    assert lines[-1] == "mIoU: 26.67"
    assert "images: 1" in lines
    left_out = [line for line in lines if line.startswith("left out of the mean")]
    assert len(left_out) == 1 and "4 (bike)" in left_out[0]
    assert "road" not in left_out[0]
    road = next(line for line in lines if "road" in line).split()
    assert road == ["1", "road", "20.00", "4"]
    sign = next(line for line in lines if "sign" in line).split()
    assert sign == ["3", "sign", "0.00", "0"]


def test_report_when_every_class_appears():
    metric = ConfusionMatrix(3)
    metric.update(np.array([[1, 2]]), np.array([[1, 1]]))
    lines = metric.report().splitlines()
    # class 1: 1/(1+2-1) = 0.5, class 2: 0/(1+0-0) = 0
    assert lines[-1] == "mIoU: 25.00"
    assert "left out of the mean: none" in lines[-2]


def test_label_id_beyond_num_classes_is_a_user_error():
    with pytest.raises(UserError, match="class id 7 .*num_classes is 3"):
        confusion_matrix(np.array([1, 7]), np.array([1, 1]), 3)


def test_shape_mismatch_is_rejected():
    with pytest.raises(ValueError):
        confusion_matrix(np.zeros((2, 2)), np.zeros((4,)), 3)

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.ensemble.metrics import (
    confusion_matrix,
    iou_per_class,
    iou_per_class_paper,
    jensen_shannon,
    label_counts,
    majority_vote,
    mean_iou,
    mean_iou_paper,
    pixel_accuracy,
    strict_confusion,
    top_decile_mean,
)


def test_iou_from_summed_confusion_excludes_ignore_pixels():
    truth = np.array([0, 0, 1, 1, 2, 255, 255])
    prediction = np.array([0, 1, 1, 1, 0, 2, 2])
    confusion = confusion_matrix(truth, prediction, 3, 255)
    assert confusion.sum() == 5  # the two ignore pixels are not counted
    np.testing.assert_allclose(iou_per_class(confusion), [1 / 3, 2 / 3, 0.0])
    assert mean_iou(confusion) == pytest.approx(1 / 3)
    assert pixel_accuracy(confusion) == pytest.approx(3 / 5)


def test_absent_class_is_left_out_of_the_mean():
    confusion = confusion_matrix(np.array([0, 1]), np.array([0, 1]), 3, 255)
    assert np.isnan(iou_per_class(confusion)[2]) and mean_iou(confusion) == 1.0


def test_predictions_outside_the_classes_are_an_error():
    with pytest.raises(ValueError, match="outside"):
        confusion_matrix(np.array([0]), np.array([7]), 3, 255)


def test_majority_vote_breaks_ties_like_torch_mode():
    members = torch.tensor([[2, 1, 0], [1, 1, 2], [2, 0, 1], [1, 0, 2]])
    expected = torch.mode(members, dim=0).values
    assert torch.equal(majority_vote(members, 3), expected)


def test_jensen_shannon_is_zero_for_agreement_and_positive_otherwise():
    same = torch.tensor([[[0.7, 0.3]], [[0.7, 0.3]]])
    assert jensen_shannon(same).abs().max() < 1e-6
    split = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]])
    assert jensen_shannon(split)[0] == pytest.approx(np.log(2), rel=1e-5)
    assert top_decile_mean(torch.arange(100.0)) == pytest.approx(94.5)


def test_ignore_label_inside_the_class_range_is_not_scored():
    truth = np.array([0, 1, 1, 2])
    prediction = np.array([1, 1, 1, 0])
    confusion = confusion_matrix(truth, prediction, 3, ignore_label=0)
    assert confusion.sum() == 3
    ious = iou_per_class(confusion, ignore_label=0)
    assert np.isnan(ious[0]) and ious[1] == 1.0 and ious[2] == 0.0
    assert mean_iou(confusion, ignore_label=0) == 0.5


def test_paper_protocol_keeps_ignore_pixels_in_unions_and_absent_classes_as_zero():
    # Two 2x3 "images"; 255 = ignore. Class 2 appears in neither truth nor prediction.
    truth = np.array([[0, 0, 1, 255, 255, 1], [0, 1, 1, 255, 0, 0]])
    prediction = np.array([[0, 1, 1, 1, 0, 1], [0, 1, 1, 0, 0, 0]])
    counts = sum(label_counts(t, p, 4) for t, p in zip(truth, prediction))  # summed over images
    # class 0: intersection 4 (truth 0 & pred 0); union = pred 0 (6, two of them on ignore) + truth 0 (5) - 4 = 7
    # class 1: intersection 4; union = pred 1 (6, one on ignore) + truth 1 (4) - 4 = 6
    # classes 2 and 3: absent everywhere -> 0, and they stay in the mean
    np.testing.assert_allclose(iou_per_class_paper(counts, 255), [4 / 7, 4 / 6, 0.0, 0.0])
    assert mean_iou_paper(counts, 255) == pytest.approx((4 / 7 + 4 / 6) / 4)
    # The strict protocol on the same pixels: ignore pixels leave every union, absent classes the mean.
    confusion = strict_confusion(counts, 255)
    np.testing.assert_allclose(iou_per_class(confusion)[:2], [4 / 5, 4 / 5])
    assert mean_iou(confusion) == pytest.approx(0.8)
    assert np.array_equal(confusion, confusion_matrix(truth, prediction, 4, 255))


def test_paper_protocol_skips_an_ignore_label_that_is_a_class_index():
    # bedroom_28: class 0 is the ignore label; predicting 1 on a 0 pixel still enlarges class 1's union.
    truth = np.array([0, 1, 1, 2])
    prediction = np.array([1, 1, 1, 0])
    ious = iou_per_class_paper(label_counts(truth, prediction, 3), ignore_label=0)
    assert np.isnan(ious[0]) and ious[1] == pytest.approx(2 / 3) and ious[2] == 0.0
    assert mean_iou_paper(label_counts(truth, prediction, 3), 0) == pytest.approx(1 / 3)


def test_score_reports_both_protocols_and_the_uncertainty_per_image():
    from pipeline.ensemble.evaluation import score

    truth = np.array([0, 0, 255, 1], np.uint8)
    prediction = np.array([0, 1, 1, 1], np.uint8)
    disagreement = np.array([0.0, 0.5, 0.1, 0.2], np.float32)
    metrics = score(truth, prediction, ["a", "b"], 255, disagreement, pixels_per_image=2)
    assert metrics["miou"] == pytest.approx((1 / 2 + 1 / 3) / 2)  # class b's union holds the ignore pixel
    assert metrics["miou_strict"] == pytest.approx((1 / 2 + 1 / 2) / 2)
    assert metrics["uncertainty"] == pytest.approx((0.5 + 0.2) / 2)  # top decile of each 2-pixel image = its max
    assert metrics["labeled_pixels"] == 3 and metrics["pixels"] == 4

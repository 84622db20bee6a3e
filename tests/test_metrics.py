from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.metrics import (confusion_matrix, iou_per_class, jensen_shannon, majority_vote, mean_iou,
                              pixel_accuracy, top_decile_mean)


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

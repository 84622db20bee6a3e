"""Segmentation metrics as pure functions of arrays (no printing, no files)."""
from __future__ import annotations

import numpy as np
import torch


def confusion_matrix(truth: np.ndarray, prediction: np.ndarray, num_classes: int, ignore_label: int) -> np.ndarray:
    """``[C, C] int64`` counts, rows = ground truth, columns = prediction; ignore pixels excluded."""
    truth = np.asarray(truth).reshape(-1).astype(np.int64)
    prediction = np.asarray(prediction).reshape(-1).astype(np.int64)
    keep = truth != ignore_label
    truth, prediction = truth[keep], prediction[keep]
    if truth.size and (truth.max() >= num_classes or prediction.max() >= num_classes or prediction.min() < 0):
        raise ValueError(f"labels outside [0, {num_classes}) that are not the ignore label {ignore_label}")
    return np.bincount(truth * num_classes + prediction, minlength=num_classes**2).reshape(num_classes, num_classes)


def iou_per_class(confusion: np.ndarray, ignore_label: int | None = None) -> np.ndarray:
    """IoU of every class from summed intersections and unions; NaN where a class is in neither, and
    for the ignore label when it is a class index (bedroom_28 ignores class 0)."""
    intersection = np.diag(confusion).astype(np.float64)
    union = confusion.sum(0) + confusion.sum(1) - intersection
    with np.errstate(invalid="ignore", divide="ignore"):
        ious = np.where(union > 0, intersection / np.maximum(union, 1), np.nan)
    if ignore_label is not None and ignore_label < len(ious):
        ious[ignore_label] = np.nan
    return ious


def mean_iou(confusion: np.ndarray, ignore_label: int | None = None) -> float:
    """Mean IoU over the scored classes that occur in ground truth or prediction."""
    return float(np.nanmean(iou_per_class(confusion, ignore_label)))


def pixel_accuracy(confusion: np.ndarray) -> float:
    total = confusion.sum()
    return float(np.trace(confusion) / total) if total else float("nan")


def majority_vote(member_predictions: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``[M, P]`` class indices -> ``[P]`` most frequent class (ties go to the lowest index, as torch.mode)."""
    votes = torch.nn.functional.one_hot(member_predictions.long(), num_classes).sum(0)
    return votes.argmax(dim=-1)


def jensen_shannon(probabilities: torch.Tensor) -> torch.Tensor:
    """Per-pixel ensemble disagreement ``[M, P, C] -> [P]``: H(mean_m p_m) - mean_m H(p_m) (in nats).

    ddpm-segmentation's uncertainty: entropy of the mean prediction minus the mean member entropy.
    """
    def entropy(p: torch.Tensor) -> torch.Tensor:
        return -(p * torch.log(p.clamp_min(1e-12))).sum(-1)

    return entropy(probabilities.mean(0)) - entropy(probabilities).mean(0)


def top_decile_mean(values: torch.Tensor) -> float:
    """Mean of the highest 10% of values: the paper's per-image uncertainty score."""
    count = max(1, values.numel() // 10)
    return float(values.reshape(-1).sort().values[-count:].mean())

"""Segmentation metrics as pure functions of arrays (no printing, no files)."""
from __future__ import annotations

import math

import numpy as np
import torch

from pipeline.errors import NumericsError


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


def label_counts(truth: np.ndarray, prediction: np.ndarray, num_classes: int) -> np.ndarray:
    """``[256, C] int64`` counts of (truth value, predicted class) over *all* pixels, ignore pixels included.

    Rows are the raw uint8 truth values (so the ignore label keeps its own row whatever its value);
    sums of these matrices over images are what both IoU protocols below are computed from.
    """
    truth = np.asarray(truth).reshape(-1).astype(np.int64)
    prediction = np.asarray(prediction).reshape(-1).astype(np.int64)
    if truth.size and (truth.min() < 0 or truth.max() > 255 or prediction.min() < 0 or prediction.max() >= num_classes):
        raise ValueError(f"truth outside [0, 255] or predictions outside [0, {num_classes})")
    return np.bincount(truth * num_classes + prediction, minlength=256 * num_classes).reshape(256, num_classes)


def iou_per_class_paper(counts: np.ndarray, ignore_label: int) -> np.ndarray:
    """IoU per class as the paper's evaluation computes it (ddpm-segmentation ``compute_iou``).

    From ``label_counts`` summed over the test images: for every class c in [0, C) other than the ignore
    label, intersection = #(pred = c and truth = c), union = #(pred = c or truth = c) over all pixels.
    Pixels whose truth is the ignore label are *not* masked out: predicting c there enlarges c's union.
    A class absent from both prediction and truth scores 0 (the official code divides 0 by 1e-8).
    The ignore label's own entry is NaN (it is no class to score).
    """
    num_classes = counts.shape[1]
    classes = np.arange(num_classes)
    intersection = counts[classes, classes].astype(np.float64)
    union = counts.sum(0)[:num_classes] + counts[:num_classes].sum(1) - intersection
    ious = np.where(union > 0, intersection / np.maximum(union, 1), 0.0)
    if ignore_label < num_classes:
        ious[ignore_label] = np.nan
    return ious


def mean_iou_paper(counts: np.ndarray, ignore_label: int) -> float:
    """The paper's mIoU: mean of ``iou_per_class_paper`` over every class but the ignore label."""
    return float(np.nanmean(iou_per_class_paper(counts, ignore_label)))


def strict_confusion(counts: np.ndarray, ignore_label: int) -> np.ndarray:
    """``[C, C]`` confusion (rows truth, columns prediction) without the ignore pixels, from ``label_counts``."""
    num_classes = counts.shape[1]
    confusion = counts[:num_classes].copy()
    if ignore_label < num_classes:
        confusion[ignore_label] = 0
    return confusion


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


def score(truth: np.ndarray, prediction: np.ndarray, class_names: list[str], ignore_label: int,
          disagreement: np.ndarray | None = None, pixels_per_image: int | None = None) -> dict:
    """The metrics dict: ``miou`` (the paper's protocol), ``miou_strict``, pixel accuracy (labeled pixels),
    per-class IoU under both protocols and, given the disagreement, the paper's uncertainty score (mean
    over images of the top-decile mean disagreement)."""
    counts = label_counts(truth, prediction, len(class_names))
    confusion = strict_confusion(counts, ignore_label)

    def rounded(values: np.ndarray) -> dict:
        return {name: (None if np.isnan(v) else round(float(v), 6)) for name, v in zip(class_names, values)}

    metrics = {
        "miou": round(mean_iou_paper(counts, ignore_label), 6),
        "miou_strict": round(mean_iou(confusion, ignore_label), 6),
        "pixel_accuracy": round(pixel_accuracy(confusion), 6),
    }
    if disagreement is not None:
        per_image = torch.from_numpy(disagreement).reshape(-1, pixels_per_image)
        metrics["uncertainty"] = round(float(np.mean([top_decile_mean(row) for row in per_image])), 6)
    metrics["per_class_iou"] = rounded(iou_per_class_paper(counts, ignore_label))
    metrics["per_class_iou_strict"] = rounded(iou_per_class(confusion, ignore_label))
    metrics["pixels"] = int(truth.size)
    metrics["labeled_pixels"] = int(confusion.sum())
    return metrics


def check_finite_metrics(metrics: dict, split: str, ignore_label: int, stage: str = "evaluate") -> None:
    """Refuse NaN/inf among a metrics dict's numbers (JSON has no NaN: ``dvc metrics`` could not read it)."""
    bad = [key for key, value in metrics.items() if isinstance(value, float) and not math.isfinite(value)]
    if bad:
        raise NumericsError(
            f"{stage}: {', '.join(bad)} of the {split} split came out as {metrics[bad[0]]}; likely cause: its masks hold "
            f"no labeled pixels ({metrics.get('labeled_pixels')} of {metrics.get('pixels')} are not the ignore label "
            f"{ignore_label}): check the {split} masks and dataset.ignore_label. No metrics were written")

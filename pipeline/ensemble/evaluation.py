"""From feature stores to scores: the one path that evaluate (and every benchmark) takes.

``predict_split`` runs the ensemble over a split's lazy feature matrix row-chunk by row-chunk and keeps
only per-pixel results (a uint8 class and a float32 disagreement per pixel), never the features.
``score`` turns predictions and truth into the metrics dict that DVC reads, with the paper's IoU
protocol as ``miou`` and the stricter one (ignore pixels out of every union, absent classes out of the
mean) as ``miou_strict``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import dask.array as da
import numpy as np
import torch

from pipeline.ensemble.fit import fit_ensemble
from pipeline.ensemble.metrics import (
    iou_per_class,
    iou_per_class_paper,
    label_counts,
    mean_iou,
    mean_iou_paper,
    pixel_accuracy,
    strict_confusion,
    top_decile_mean,
)
from pipeline.ensemble.model import EnsembleMLP
from pipeline.ensemble.predict import vote
from pipeline.enums import Autocast
from pipeline.errors import NumericsError
from pipeline.features.store import FeatureStore, lazy_matrix


@dataclass(frozen=True)
class SplitPrediction:
    """One split's per-pixel results, rows in store order (image by image, row-major pixels)."""

    stems: list[str]
    image_size: int
    truth: np.ndarray  # [P] uint8, the ignore label included
    prediction: np.ndarray  # [P] uint8 majority vote of the members
    disagreement: np.ndarray  # [P] float32 Jensen-Shannon disagreement of the members (nats)

    def image(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(truth, prediction, disagreement)`` of image ``index``, each ``[S, S]``."""
        pixels = self.image_size**2
        rows = slice(index * pixels, (index + 1) * pixels)
        shape = (self.image_size, self.image_size)
        return self.truth[rows].reshape(shape), self.prediction[rows].reshape(shape), self.disagreement[rows].reshape(shape)


def predict_split(model: EnsembleMLP, stores: Sequence[FeatureStore], split: str, *, batch_pixels: int,
                  device: torch.device, precision: Autocast = Autocast.NONE,
                  blocks: Sequence[int] | None = None) -> SplitPrediction:
    """The ensemble's vote on ``split`` of the stores (``blocks`` of each; None = all they hold)."""
    matrix, labels = lazy_matrix(stores, split, blocks)
    prediction, disagreement = vote(model, matrix, batch_pixels=batch_pixels, device=device, precision=precision)
    size = int(round(stores[0].pixels_per_image(split) ** 0.5))
    return SplitPrediction(stores[0].image_ids(split), size, labels.compute(), prediction, disagreement)


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


def check_finite_metrics(metrics: dict, split: str, ignore_label: int) -> None:
    """Refuse NaN/inf among a metrics dict's numbers (JSON has no NaN: ``dvc metrics`` could not read it)."""
    bad = [key for key, value in metrics.items() if isinstance(value, float) and not math.isfinite(value)]
    if bad:
        raise NumericsError(
            f"evaluate: {', '.join(bad)} of the {split} split came out as {metrics[bad[0]]}; likely cause: its masks hold "
            f"no labeled pixels ({metrics.get('labeled_pixels')} of {metrics.get('pixels')} are not the ignore label "
            f"{ignore_label}): check the {split} masks and dataset.ignore_label. No metrics were written")


def fit_and_score(train: tuple[np.ndarray, np.ndarray], scored: tuple[np.ndarray, np.ndarray], *, config,
                  class_names: list[str], ignore_label: int, chunk_rows: int, batch_pixels: int = 16384,
                  device: torch.device | None = None) -> dict:
    """Fit the ensemble on in-RAM ``(features [P, D], labels [P])`` and score it on another split's.

    For small probes (benchmarks on the built-in data) whose candidate features are not worth a store;
    the ensemble, the vote and the metrics are those of the fit and evaluate stages.
    """
    device = device or torch.device("cpu")
    model, history = fit_ensemble(da.from_array(train[0], chunks=(chunk_rows, -1)), da.from_array(train[1], chunks=chunk_rows),
                                  num_classes=len(class_names), ignore_label=ignore_label, config=config, device=device)
    prediction, _ = vote(model, da.from_array(scored[0], chunks=(chunk_rows, -1)), batch_pixels=batch_pixels,
                         device=device, precision=config.resolved().autocast)
    metrics = score(np.asarray(scored[1], dtype=np.uint8), prediction, class_names, ignore_label)
    metrics["epochs"] = max((stats.epoch for stats in history), default=0)
    return metrics

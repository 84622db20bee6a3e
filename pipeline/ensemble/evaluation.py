"""From feature stores to scores: the one path that evaluate (and every benchmark) takes.

``predict_split`` runs the ensemble over a split's lazy feature matrix row-chunk by row-chunk and keeps
only per-pixel results (a uint8 class and a float32 disagreement per pixel), never the features.
``score`` (``pipeline.ensemble.metrics``, shared with the distilled network's evaluate_segnet) turns
predictions and truth into the metrics dict that DVC reads, with the paper's IoU protocol as ``miou`` and
the stricter one (ignore pixels out of every union, absent classes out of the mean) as ``miou_strict``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import dask.array as da
import numpy as np
import torch

from pipeline.ensemble.fit import fit_ensemble
from pipeline.ensemble.metrics import check_finite_metrics, score  # noqa: F401 (evaluate's and benchmarks' names)
from pipeline.ensemble.model import EnsembleMLP
from pipeline.ensemble.predict import vote
from pipeline.enums import Autocast
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

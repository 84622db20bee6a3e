"""DatasetDDPM's labeling: sampled images segmented by the ensemble, ranked by uncertainty, the uncertain dropped.

Each image goes through the segment stage's path (``pipeline.api.Segmenter``: the one feature path
``features_for_images``, then ``pipeline.ensemble.predict.vote``, which gives the majority vote and the
per-pixel Jensen-Shannon disagreement of the members), batch by batch. An image's uncertainty is the mean of
its pixels' top decile of disagreement (``top_decile_mean``, as the paper's code and evaluate score it).
"""
from __future__ import annotations

import collections
from collections.abc import Iterable, Iterator, Sequence

import numpy as np
import torch

from pipeline.api import PreparedImage, Segmentation, Segmenter
from pipeline.config import dropped_count
from pipeline.ensemble.metrics import top_decile_mean


def sample_stem(index: int) -> str:
    """The file stem of sample ``index`` in data/synthetic (its index in the sample store, so stems stay put)."""
    return f"sample_{index:05d}"


def label_images(segmenter: Segmenter, images: Iterable[np.ndarray]) -> Iterator[tuple[np.ndarray, Segmentation, float]]:
    """``[S, S, 3] uint8`` images at the model's size (read lazily, in order) -> per image the image, its
    ``Segmentation`` (``mask`` ``[S, S] uint8`` classes, ``uncertainty`` ``[S, S] float32`` nats; ``name`` its
    stem) and its uncertainty score; ``segmenter.batch_size`` images in memory at once."""
    held: collections.deque[PreparedImage] = collections.deque()  # the batch being segmented, in order

    def prepared() -> Iterator[PreparedImage]:
        for index, image in enumerate(images):
            held.append(PreparedImage(sample_stem(index), image, image.shape[0], image.shape[1], (0, 0, image.shape[0])))
            yield held[-1]

    for result in segmenter.segment_prepared(prepared()):
        yield held.popleft().square, result, top_decile_mean(torch.from_numpy(result.uncertainty))


def uncertainty_ranks(uncertainty: Sequence[float]) -> np.ndarray:
    """``[N] int64`` each image's rank from the least uncertain (0); ties: the lower index ranks lower."""
    ranks = np.empty(len(uncertainty), dtype=np.int64)
    ranks[np.argsort(np.asarray(uncertainty, dtype=np.float64), kind="stable")] = np.arange(len(uncertainty))
    return ranks


def kept_by_uncertainty(uncertainty: Sequence[float], drop_uncertain: float, drop_least_uncertain: int = 0) -> np.ndarray:
    """``[N] bool``: which images stay. With f = ``drop_uncertain`` x N rounded down and k =
    ``drop_least_uncertain``, the images ranked from least to most uncertain (ties: the lower index first)
    keep ranks ``[k, N - f + k)``: k = 0 drops the f most uncertain; k > 0 is the official train_deeplab.py's
    ``idxs[k: -f + k]`` (k = 30 there), which drops the k least uncertain and only f - k of the most uncertain.
    k > f is refused (that window would run past the ranking; params refuse it at load)."""
    uncertainty = np.asarray(uncertainty, dtype=np.float64)
    count = len(uncertainty)
    dropped = dropped_count(drop_uncertain, count)
    if drop_least_uncertain > dropped:
        raise ValueError(f"drop_least_uncertain={drop_least_uncertain} is more than the {dropped} images "
                         f"drop_uncertain={drop_uncertain} drops of {count}")
    ranks = uncertainty_ranks(uncertainty)
    return (ranks >= drop_least_uncertain) & (ranks < count - dropped + drop_least_uncertain)


def summary(uncertainty: Sequence[float], keep: np.ndarray, drop_least_uncertain: int) -> dict:
    """metrics/label.json: counts kept and dropped, uncertainty quantiles of all, kept and dropped images."""
    uncertainty = np.asarray(uncertainty, dtype=np.float64)

    def quantiles(values: np.ndarray) -> dict:
        if not values.size:
            return {}
        points = {"min": 0, "q10": 0.1, "q25": 0.25, "median": 0.5, "q75": 0.75, "q90": 0.9, "max": 1}
        return {name: round(float(np.quantile(values, q)), 6) for name, q in points.items()} | {
            "mean": round(float(values.mean()), 6)}

    dropped = int((~keep).sum())
    return {"images": len(uncertainty), "kept": int(keep.sum()), "dropped": dropped,
            "dropped_most_uncertain": dropped - drop_least_uncertain, "dropped_least_uncertain": drop_least_uncertain,
            "uncertainty": quantiles(uncertainty), "uncertainty_kept": quantiles(uncertainty[keep]),
            "uncertainty_dropped": quantiles(uncertainty[~keep])}

"""The unlabeled images worth labeling next: the finished ensemble votes on a pool of unlabeled images, each
image is scored by its members' disagreement, and the highest-scored (optionally spread by greedy k-center
on the images' mean features) are suggested.

Pure parts: ``image_score`` (a disagreement map -> one number), ``ranked`` (scores -> order),
``k_center`` (points -> spread picks). ``score_pool`` streams the pool through the one feature path
(``pipeline.features.compute.features_for_images``, new images: shared noise, ``split`` None) and
``pipeline.ensemble.predict.vote``, one batch of images at a time, keeping only the ``keep`` best images'
maps: memory does not grow with the pool.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import dask.array as da
import numpy as np
import torch

from pipeline.config import Params
from pipeline.diffusion.gaussian import Diffusion
from pipeline.diffusion.unet import UNetModel
from pipeline.ensemble.metrics import top_decile_mean
from pipeline.ensemble.model import EnsembleMLP
from pipeline.ensemble.predict import vote
from pipeline.enums import SuggestScore
from pipeline.errors import DatasetError
from pipeline.features.compute import features_for_images
from pipeline.features.record import rows_per_chunk


def image_score(disagreement: np.ndarray, score: SuggestScore) -> float:
    """``[H, W]`` (or any shape) per-pixel disagreement in nats -> the image's score: the mean, or the mean
    of its highest 10% of pixels (``top_decile``, the paper's per-image uncertainty)."""
    values = np.asarray(disagreement, dtype=np.float32).reshape(-1)
    if SuggestScore(score) is SuggestScore.MEAN:
        return float(values.mean(dtype=np.float64))
    return top_decile_mean(torch.from_numpy(values))


def ranked(scores: Iterable[tuple[str, float]]) -> list[tuple[str, float]]:
    """``(image, score)`` pairs, highest score first; equal scores in image-name order, so the ranking does
    not depend on the order the pool was read in."""
    return sorted(scores, key=lambda item: (-item[1], item[0]))


def rank_maps(maps: Mapping[str, np.ndarray], score: SuggestScore) -> list[tuple[str, float]]:
    """Per-image disagreement maps -> ``[(image, score)]``, most worth labeling first (``ranked``)."""
    return ranked((name, image_score(values, score)) for name, values in maps.items())


def k_center(points: np.ndarray, k: int) -> list[int]:
    """Greedy k-center (Gonzalez 1985; the core-set selection of Sener & Savarese, ICLR 2018): ``[N, D]``
    points -> ``min(k, N)`` row indices. The first pick is row 0 (callers pass rows best-scored first), each
    next pick the row farthest (Euclidean) from every row picked so far; ties go to the lower row."""
    points = np.asarray(points, dtype=np.float64)
    if len(points) == 0 or k <= 0:
        return []
    picked = [0]
    distance = np.linalg.norm(points - points[0], axis=1)
    while len(picked) < min(k, len(points)):
        distance[picked] = -1.0  # never pick a row twice (duplicates have distance 0 and stay pickable)
        following = int(np.argmax(distance))  # argmax returns the first of equal values: the lower row
        picked.append(following)
        distance = np.minimum(distance, np.linalg.norm(points - points[following], axis=1))
    return picked


@dataclass(frozen=True)
class Scored:
    """One pool image's results: ``prediction`` ``[S, S] uint8`` classes (majority vote), ``disagreement``
    ``[S, S] float32`` nats, ``pooled`` ``[D] float32`` its mean feature vector (``[0]`` when not asked for)."""

    name: str
    path: Path
    score: float
    prediction: np.ndarray
    disagreement: np.ndarray
    pooled: np.ndarray


def pool_sample(paths: Sequence[Path], count: int, seed: int) -> list[Path]:
    """``count`` of ``paths`` (all if fewer), a seeded sample, in name order."""
    if not paths:
        raise DatasetError("the unlabeled pool holds no images; add images to data/prepared/unlabeled (prepare "
                           "copies the dataset's unlabeled/ folder there)")
    chosen = np.random.default_rng(seed).permutation(len(paths))[:count]
    return [paths[int(i)] for i in sorted(chosen)]


def mean_row(rows: torch.Tensor, chunk: int = 4096) -> np.ndarray:
    """``[P, D] float16`` rows -> ``[D] float32`` their mean, summed ``chunk`` rows at a time in float32 (a
    256² image of the paper's 8448 features would need 2.2 GB as one float32 copy)."""
    total = torch.zeros(rows.shape[1], dtype=torch.float64)
    for start in range(0, len(rows), chunk):
        total += rows[start : start + chunk].float().sum(0, dtype=torch.float64)
    return (total / max(1, len(rows))).float().numpy()


def score_pool(model: UNetModel, diffusion: Diffusion, ensemble: EnsembleMLP, params: Params, paths: Sequence[Path],
               keep: int, pooled: bool = False) -> tuple[list[Scored], int]:
    """Vote on every image of ``paths`` and keep the ``keep`` best-scored (``suggest.score``), ranked as
    ``ranked`` ranks them, with their mean feature vectors when ``pooled`` (else empty); returns them and how
    many images were scored.

    Features come one batch of images at a time (the feature path's cap) and are dropped once voted on;
    at most ``2 * keep`` images' maps are held, so memory is flat in the pool size."""
    size = params.dataset.image_size
    chunk = rows_per_chunk(params.features.chunk_pixels, size * size)
    device = next(ensemble.parameters()).device
    kept: list[Scored] = []
    scored = 0
    for index, rows in features_for_images(model, diffusion, list(paths), options=params.features,
                                           t_steps=params.t_steps, blocks=params.blocks, split=None,
                                           name_of=lambda index: str(paths[index])):
        prediction, disagreement = vote(ensemble, da.from_array(rows.numpy(), chunks=(chunk, -1)),
                                        batch_pixels=params.evaluate.batch_pixels, device=device,
                                        precision=params.ensemble.autocast)
        path = Path(paths[index])
        kept.append(Scored(path.name, path, image_score(disagreement, params.suggest.score),
                           prediction.reshape(size, size), disagreement.reshape(size, size),
                           mean_row(rows) if pooled else np.zeros(0, np.float32)))
        scored += 1
        if len(kept) >= 2 * keep:  # trim in batches of `keep`, so sorting costs O(log keep) per image
            kept = _best(kept, keep)
    return _best(kept, keep), scored


def _best(items: list[Scored], keep: int) -> list[Scored]:
    order = {name: position for position, (name, _) in enumerate(ranked((item.name, item.score) for item in items))}
    return sorted(items, key=lambda item: order[item.name])[:keep]


def choose(candidates: Sequence[Scored], count: int, diversity: bool) -> list[Scored]:
    """The suggestions among ``candidates`` (best-scored first): the first ``count``, or with ``diversity``
    ``count`` spread by ``k_center`` over their mean features (the best-scored is always first), each group
    in score order."""
    if not diversity:
        return list(candidates[:count])
    picks = k_center(np.stack([item.pooled for item in candidates]), count) if candidates else []
    return [candidates[i] for i in sorted(picks)]

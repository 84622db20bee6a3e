"""k-means of per-pixel features (the paper's figure of k = 5 clusters of decoder activations): pure maths on
tensors; the stage draws the maps. No dependency of the project clusters, and Lloyd's algorithm is short."""
from __future__ import annotations

import torch


def kmeans(points: torch.Tensor, k: int, iterations: int, seed: int) -> torch.Tensor:
    """``points [P, D]`` -> ``[P] int64`` cluster of each point in ``[0, k)``: k-means++ seeding from a generator
    seeded with ``seed``, then ``iterations`` Lloyd steps (an emptied cluster keeps its centre). Clusters are
    numbered by decreasing size, so maps of different images and blocks colour alike."""
    points = points.float()
    if not 1 <= k <= points.shape[0]:
        raise ValueError(f"k={k} must be in [1, {points.shape[0]}] (the number of points)")
    generator = torch.Generator().manual_seed(seed)
    centres = points[torch.randint(points.shape[0], (1,), generator=generator)]
    for _ in range(1, k):  # k-means++: the next centre with probability proportional to squared distance
        distance = torch.cdist(points, centres).min(dim=1).values.square()
        weights = distance if distance.sum() > 0 else torch.ones_like(distance)
        centres = torch.cat([centres, points[torch.multinomial(weights, 1, generator=generator)]])
    for _ in range(iterations):
        labels = torch.cdist(points, centres).argmin(dim=1)
        counts = torch.bincount(labels, minlength=k)
        sums = torch.zeros_like(centres).index_add_(0, labels, points)
        filled = counts > 0
        centres[filled] = sums[filled] / counts[filled, None]
    labels = torch.cdist(points, centres).argmin(dim=1)
    order = torch.argsort(torch.bincount(labels, minlength=k), descending=True, stable=True)
    return torch.argsort(order)[labels]

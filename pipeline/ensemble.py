"""The paper's pixel-classifier ensemble, trained by streaming chunks from the feature stores.

All members live in one module with stacked weights (``[M, in, out]``), so one pass over the data
feeds every member: each chunk read from the store is shuffled once per member and every member takes
its own batches from it. Adam and BatchNorm are per-element / per-channel, so this trains exactly M
independent MLPs of the paper's shape (D→128→ReLU→BN→32→ReLU→BN→C, or 256/128 for C ≥ 30), each
initialised from its own seed (``seed + i``) with the paper's N(0, 0.02) weights.
"""
from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterator

import dask
import dask.array as da
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config import EnsembleConfig
from pipeline.errors import DatasetError


def hidden_widths(num_classes: int) -> tuple[int, int]:
    """The paper's pixel_classifier widths: (128, 32) for fewer than 30 classes, else (256, 128)."""
    return (128, 32) if num_classes < 30 else (256, 128)


class EnsembleMLP(nn.Module):
    """M pixel classifiers. ``forward``: ``[B, D]`` (shared) or ``[M, B, D]`` -> logits ``[M, B, C]``."""

    def __init__(self, members: int, dim: int, num_classes: int, seed: int):
        super().__init__()
        self.members, self.dim, self.num_classes = members, dim, num_classes
        widths = (dim, *hidden_widths(num_classes), num_classes)
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        for fan_in, fan_out in zip(widths[:-1], widths[1:]):
            stacked = torch.empty(members, fan_in, fan_out)
            for member in range(members):
                generator = torch.Generator().manual_seed(seed + member)
                stacked[member] = torch.randn(fan_out, fan_in, generator=generator).T * 0.02
            self.weights.append(nn.Parameter(stacked))
            self.biases.append(nn.Parameter(torch.zeros(members, 1, fan_out)))
        # One BatchNorm over M*width channels is M independent BatchNorms of `width` channels.
        self.norms = nn.ModuleList([nn.BatchNorm1d(members * width) for width in widths[1:-1]])

    @classmethod
    def stack(cls, parts: list["EnsembleMLP"]) -> "EnsembleMLP":
        """Join ensembles trained in separate passes into one, members in order."""
        if len(parts) == 1:
            return parts[0]
        first = parts[0]
        joined = cls(0, first.dim, first.num_classes, seed=0)
        joined.members = sum(part.members for part in parts)
        with torch.no_grad():
            for layer in range(len(first.weights)):
                joined.weights[layer] = nn.Parameter(torch.cat([p.weights[layer].detach().cpu() for p in parts]))
                joined.biases[layer] = nn.Parameter(torch.cat([p.biases[layer].detach().cpu() for p in parts]))
            norms = []
            for layer, norm in enumerate(first.norms):
                merged = nn.BatchNorm1d(norm.num_features // first.members * joined.members)
                for name in ("weight", "bias", "running_mean", "running_var"):
                    getattr(merged, name).copy_(torch.cat([getattr(p.norms[layer], name).detach().cpu() for p in parts]))
                norms.append(merged)
            joined.norms = nn.ModuleList(norms)
        return joined

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 2:
            h = torch.einsum("bd,mdh->mbh", x, self.weights[0]) + self.biases[0]
        else:
            h = torch.baddbmm(self.biases[0], x, self.weights[0])
        for layer in range(1, len(self.weights)):
            h = F.relu(h)
            members, batch, width = h.shape
            h = self.norms[layer - 1](h.permute(1, 0, 2).reshape(batch, members * width))
            h = h.reshape(batch, members, width).permute(1, 0, 2)
            h = torch.baddbmm(self.biases[layer], h, self.weights[layer])
        return h


@dataclass
class EpochStats:
    epoch: int
    loss: float
    accuracy: float
    pixels: int
    first_member: int = 0


def _read_rows(matrix: da.Array, labels: da.Array, blocks: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Compute the given row-chunks (in the calling thread; the trainer keeps the other core busy)."""
    parts = da.compute(*[(matrix.blocks[b], labels.blocks[b]) for b in blocks], scheduler="synchronous")
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def stream_buffers(
    matrix: da.Array, labels: da.Array, buffer_chunks: int, rng: np.random.Generator, ignore_label: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """One epoch: row-chunks in random order, ``buffer_chunks`` at a time, with the next group prefetched.

    Yields ``([R, D] float16 features, [R] int64 labels, [K] int64 indices of the labeled rows)``. The
    buffer stays float16 and is not masked (batches are gathered from it and cast per step), so memory
    is about two groups of float16 chunks whatever the number of images.
    """
    if matrix.numblocks[1] != 1:
        matrix = matrix.rechunk({1: -1})
    labels = labels.rechunk((matrix.chunks[0],))
    order = rng.permutation(matrix.numblocks[0]).tolist()
    groups = [order[i : i + buffer_chunks] for i in range(0, len(order), buffer_chunks)]
    with ThreadPoolExecutor(max_workers=1) as pool:
        future = pool.submit(_read_rows, matrix, labels, groups[0]) if groups else None
        for index in range(len(groups)):
            features, targets = future.result()
            if index + 1 < len(groups):
                future = pool.submit(_read_rows, matrix, labels, groups[index + 1])
            labeled = np.flatnonzero(targets != ignore_label)
            yield torch.from_numpy(features), torch.from_numpy(targets.astype(np.int64)), torch.from_numpy(labeled)


def fit_ensemble(
    matrix: da.Array,
    labels: da.Array,
    *,
    num_classes: int,
    ignore_label: int,
    config: EnsembleConfig,
    device: torch.device,
    on_epoch: Callable[[EpochStats], None] | None = None,
) -> tuple[EnsembleMLP, list[EpochStats]]:
    """Train ``config.members`` classifiers on ``[P, D]`` features / ``[P]`` labels streamed from a store.

    Members train ``config.members_per_pass`` at a time (default: all in one pass over the data); each
    group's member i is seeded ``seed + i`` whatever the grouping. Each epoch visits every labeled pixel
    once per member. A group stops after ``config.epochs`` or when its mean loss has not improved by
    ``config.min_delta`` (relative) for ``config.patience`` epochs.
    """
    group = config.members_per_pass or config.members
    models, history = [], []
    for first in range(0, config.members, group):
        model, stats = _fit_members(matrix, labels, first, min(group, config.members - first), num_classes=num_classes,
                                    ignore_label=ignore_label, config=config, device=device, on_epoch=on_epoch)
        models.append(model)
        history.extend(stats)
    return EnsembleMLP.stack(models).eval(), history


def _fit_members(
    matrix: da.Array,
    labels: da.Array,
    first: int,
    members: int,
    *,
    num_classes: int,
    ignore_label: int,
    config: EnsembleConfig,
    device: torch.device,
    on_epoch: Callable[[EpochStats], None] | None,
) -> tuple[EnsembleMLP, list[EpochStats]]:
    seed = config.seed + first
    model = EnsembleMLP(members, matrix.shape[1], num_classes, seed).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    rng = np.random.default_rng(seed)
    generator = torch.Generator().manual_seed(seed)
    history: list[EpochStats] = []
    best, stale = math.inf, 0
    for epoch in range(1, config.epochs + 1):
        model.train()
        loss_sum = correct = pixels = 0.0
        for features, targets, labeled in stream_buffers(matrix, labels, config.buffer_chunks, rng, ignore_label):
            rows = len(labeled)
            if rows < 2:
                continue
            # Each member draws its own permutation of the buffer's labeled rows.
            order = labeled[torch.argsort(torch.rand(members, rows, generator=generator), dim=1)]
            features, targets = features.to(device), targets.to(device)
            for start in range(0, rows, config.batch_size):
                index = order[:, start : start + config.batch_size].to(device)
                if index.shape[1] < 2:  # BatchNorm needs two samples
                    break
                logits = model(features[index].float())
                target = targets[index]
                loss = F.cross_entropy(logits.reshape(-1, num_classes), target.reshape(-1), reduction="mean")
                optimizer.zero_grad(set_to_none=True)
                (loss * members).backward()  # each member's gradient is that of its own mean loss
                optimizer.step()
                count = target.numel()
                loss_sum += loss.item() * count
                correct += float((logits.argmax(-1) == target).sum())
                pixels += count
        if pixels == 0:
            raise DatasetError(
                "the training split has no labeled pixels (all are the ignore label); check the masks and dataset.ignore_label"
            )
        stats = EpochStats(epoch, loss_sum / pixels, correct / pixels, int(pixels // members), first)
        history.append(stats)
        if on_epoch is not None:
            on_epoch(stats)
        if stats.loss < best * (1 - config.min_delta):
            best, stale = stats.loss, 0
        else:
            stale += 1
            if stale >= config.patience:
                break
    return model.eval(), history


@torch.no_grad()
def predict_chunks(
    model: EnsembleMLP, matrix: da.Array, *, batch_pixels: int, device: torch.device
) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """For each row-chunk of ``matrix`` yield ``(first_row, member classes [M, R], member probs [M, R, C])``."""
    model.eval()
    if matrix.numblocks[1] != 1:
        matrix = matrix.rechunk({1: -1})
    offsets = np.cumsum((0,) + matrix.chunks[0])
    for block in range(matrix.numblocks[0]):
        (rows,) = dask.compute(matrix.blocks[block], scheduler="synchronous")
        rows = torch.from_numpy(rows.astype(np.float32))
        for start in range(0, len(rows), batch_pixels):
            probabilities = torch.softmax(model(rows[start : start + batch_pixels].to(device)), dim=-1).cpu()
            yield int(offsets[block]) + start, probabilities.argmax(-1), probabilities

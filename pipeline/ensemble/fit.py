"""The paper's pixel-classifier ensemble, trained by streaming chunks from the feature stores.

All members live in one module with stacked weights (``[M, in, out]``), so one pass over the data
feeds every member: every member takes its own permutation of the rows in the shuffle pool. Adam and
BatchNorm are per-element / per-channel, so this trains exactly M independent MLPs of the paper's shape
(D→128→ReLU→BN→32→ReLU→BN→C, or 256/128 for C ≥ 30), each initialised from its own seed (``seed + i``)
with the paper's N(0, 0.02) weights.

Rows reach the trainer through a shuffle pool of ``ensemble.buffer_mb`` MiB of labeled rows (or
``ensemble.buffer_rows`` rows; ``ShufflePool``):
when the whole labeled split fits, the store is read once and every epoch is a global shuffle, as in the
paper's in-RAM DataLoader; otherwise chunks stream through the pool and each batch mixes rows of many
chunks. Passes trained at once share one pool (``SharedPool``), so the store is read once per epoch
whatever their number. Memory is set by the pool's budget, never by the number of images.
"""
from __future__ import annotations

import itertools
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import dask.array as da
import numpy as np
import torch
import torch.nn.functional as F

from pipeline.config import EnsembleConfig
from pipeline.ensemble.model import EnsembleMLP
from pipeline.ensemble.pool import SharedPool, ShufflePool
from pipeline.enums import Stopping
from pipeline.errors import DatasetError, NumericsError
from pipeline.runtime import AUTOCAST_DTYPES, autocast


@dataclass
class EpochStats:
    epoch: int
    loss: float  # mean batch loss and accuracy of the members still training
    accuracy: float
    pixels: int  # labeled rows each member saw this epoch
    first_member: int = 0
    stopped: int = 0  # members of this pass stopped by the paper's rule by the end of this epoch


def member_passes(config: EnsembleConfig) -> list[tuple[int, int]]:
    """``(first member, members)`` of each pass of the fit, in order."""
    # members_per_pass null: the members split evenly over the passes that run at once.
    group = config.members_per_pass or math.ceil(config.members / config.parallel_passes)
    return [(first, min(group, config.members - first)) for first in range(0, config.members, group)]


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

    Members train ``config.members_per_pass`` at a time (null: ``members / parallel_passes``), with
    ``config.parallel_passes`` such passes at once on CPU threads; member i is seeded ``seed + i`` (init and row order) whatever the grouping. Each epoch visits every labeled pixel
    once per member, each member in its own order. Every member stops on its own and keeps the weights and
    BatchNorm buffers it had at its stop, so its weights do not depend on which members share its pass:
    ``config.stopping``: ``plateau`` stops a member after ``config.epochs`` or when its own mean epoch loss
    has not improved by ``config.min_delta`` (relative) for ``config.patience`` epochs; ``paper`` by the
    paper's batch-loss rule (``config.batch_patience``, ``config.warmup_epochs``). With ``config.steps`` set,
    every member trains exactly that many batches (optimizer steps), epoch after epoch over the pool as often as
    it takes, and no stopping rule runs. Keys left null take ``config.recipe``'s values (``resolved``).
    """
    config = config.resolved()
    passes = member_passes(config)
    # The pool holds rows as the first product takes them: float16 as stored, or bfloat16 under bf16 autocast
    # (the same rounding autocast would apply, done once per row read instead of once per member and batch).
    dtype = AUTOCAST_DTYPES[config.autocast] or torch.float16
    pool = ShufflePool(matrix, labels, config.pool_rows(matrix.shape[1], dtype.itemsize), ignore_label, dtype)
    if pool.total < 2:
        raise DatasetError(
            "the training split has fewer than two labeled pixels (all others are the ignore label); check the masks "
            "and dataset.ignore_label"
        )
    # Passes train parallel_passes at a time on Python threads, the passes of a wave reading one shared pool.
    # torch releases the GIL inside its kernels, and with one torch thread (the fit stage sets it) each pass's
    # arithmetic runs on its own thread alone; every pass sees the pool items it would see alone (SharedPool),
    # so the weights are those of the passes run one after another, whatever the core count, while the cores
    # share the work.
    workers = min(config.parallel_passes, len(passes)) if device.type == "cpu" else 1
    results = []
    for start in range(0, len(passes), workers):
        wave = passes[start : start + workers]
        # steps: epochs without end; each pass leaves the shared pool once its members have taken their steps.
        shared = SharedPool(pool, config.seed, config.epochs if config.steps is None else None, len(wave))

        def fit_pass(part: tuple[int, int], shared: SharedPool = shared) -> tuple[EnsembleMLP, list[EpochStats]]:
            with shared.reader() as epoch:
                return _fit_members(matrix.shape[1], epoch, *part, num_classes=num_classes, config=config,
                                    device=device, on_epoch=on_epoch)

        if len(wave) > 1:
            with ThreadPoolExecutor(max_workers=len(wave)) as threads:
                results += list(threads.map(fit_pass, wave))
        else:
            results.append(fit_pass(wave[0]))
    history = [stats for _, part_history in results for stats in part_history]
    return EnsembleMLP.stack([model for model, _ in results]).eval(), history


def check_finite_loss(losses: torch.Tensor, first: int, epoch: int, batch: int, lr: float) -> None:
    """Stop the fit at the first NaN/inf member loss (``losses [M]``), naming member, epoch, batch and a cause."""
    bad = (~torch.isfinite(losses)).nonzero().flatten().tolist()
    if bad:
        raise NumericsError(
            f"fit: the loss of ensemble member(s) {[first + member for member in bad]} became "
            f"{float(losses[bad[0]])} at epoch {epoch}, batch {batch}; likely cause: ensemble.lr={lr:g} is too "
            f"high for these features (try a 10x lower one). No ensemble was written")


def _fit_members(
    dim: int,
    epoch_items: Callable[[], Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]],
    first: int,
    members: int,
    *,
    num_classes: int,
    config: EnsembleConfig,
    device: torch.device,
    on_epoch: Callable[[EpochStats], None] | None,
) -> tuple[EnsembleMLP, list[EpochStats]]:
    """Members ``first .. first + members - 1`` trained on ``epoch_items()`` (one pool epoch per call)."""
    seed = config.seed + first
    model = EnsembleMLP(members, dim, num_classes, seed).to(device)
    # Fused Adam: the same update per element, in one kernel instead of ~10 passes over the weights;
    # with 10 members at D = 576 the unfused update took ~40% of a batch-64 step here.
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, fused=device.type in ("cpu", "cuda"))
    # Each member draws its row orders from its own generator, so a member trains alike in any grouping.
    generators = [torch.Generator().manual_seed(seed + member) for member in range(members)]
    autocast_on = AUTOCAST_DTYPES[config.autocast] is not None
    fixed_steps = config.steps is not None  # exactly config.steps batches, no stopping rule
    paper = config.stopping is Stopping.PAPER and not fixed_steps
    steps_taken, finished = 0, False  # finished: every member has taken its config.steps batches
    training = torch.ones(members, dtype=torch.bool)
    best_batch, stale_batches = torch.full((members,), math.inf), torch.zeros(members, dtype=torch.int64)
    stopped_states: dict[int, list[torch.Tensor]] = {}
    history: list[EpochStats] = []
    # plateau: each member's best epoch loss and epochs without a min_delta improvement on it
    best_epoch, stale_epochs = torch.full((members,), math.inf, dtype=torch.float64), torch.zeros(members, dtype=torch.int64)

    def stop(member: int) -> None:
        stopped_states[member] = model.member_state(member)  # Adam would keep moving it
        training[member] = False

    for epoch in (itertools.count(1) if fixed_steps else range(1, config.epochs + 1)):
        model.train()
        loss_sum = correct = visits = rows_seen = 0.0
        member_loss_sum = torch.zeros(members, dtype=torch.float64)
        for features, targets, rows in epoch_items():
            order = torch.stack([rows[torch.randperm(len(rows), generator=g)] for g in generators])
            for start in range(0, len(rows), config.batch_size):
                index = order[:, start : start + config.batch_size]
                batch = index.shape[1]
                if batch < 2:  # BatchNorm needs two samples
                    break
                target = targets[index].to(device)
                rows_in = features.index_select(0, index.reshape(-1)).view(members, batch, -1).to(device)
                with autocast(device, config.autocast):
                    logits = model(rows_in if autocast_on else rows_in.float()).float()
                member_loss = F.cross_entropy(logits.reshape(-1, num_classes), target.reshape(-1),
                                              reduction="none").view(members, batch).mean(1)
                optimizer.zero_grad(set_to_none=True)
                member_loss.sum().backward()  # each member's gradient is that of its own mean loss
                optimizer.step()
                losses = member_loss.detach().cpu()
                check_finite_loss(losses, first, epoch, rows_seen // config.batch_size + 1, config.lr)
                hits = (logits.detach().argmax(-1) == target).sum(1).cpu()
                live = training.clone()
                loss_sum += float(losses[live].sum()) * batch
                member_loss_sum += losses.double() * batch
                correct += float(hits[live].sum())
                visits += int(live.sum()) * batch
                rows_seen += batch
                steps_taken += 1
                if fixed_steps and steps_taken == config.steps:
                    finished = True
                    break
                if paper and epoch > config.warmup_epochs:
                    improved = losses < best_batch
                    best_batch = torch.where(improved, losses, best_batch)
                    stale_batches = torch.where(improved, 0, stale_batches + 1)
                    for member in (live & (stale_batches > config.batch_patience)).nonzero().flatten().tolist():
                        stop(member)
                    if not training.any():
                        break
            if finished or not training.any():
                break
        if not paper and not fixed_steps:
            epoch_loss = member_loss_sum / max(rows_seen, 1)
            improved = epoch_loss < best_epoch * (1 - config.min_delta)
            best_epoch = torch.where(improved, epoch_loss, best_epoch)
            stale_epochs = torch.where(improved, 0, stale_epochs + 1)
            for member in (training & (stale_epochs >= config.patience)).nonzero().flatten().tolist():
                stop(member)
        stats = EpochStats(epoch, loss_sum / max(visits, 1), correct / max(visits, 1), int(rows_seen), first,
                           members - int(training.sum()))
        history.append(stats)
        if on_epoch is not None:
            on_epoch(stats)
        if finished or not training.any():
            break
    for member, state in stopped_states.items():
        model.load_member_state(member, state)
    return model.eval(), history


def train_subset(images: int, count: int | None, seed: int) -> list[int]:
    """Sorted indices of ``count`` of ``images`` train images (``ensemble.train_images`` / ``train_subset_seed``):
    the first ``count`` of one permutation drawn by a generator seeded with ``seed``, so for one seed the subsets
    are nested (the 5 images hold the 2, which hold the 1) and a sample-efficiency curve varies only the number of
    labels. All of them when ``count`` is None."""
    if count is None:
        return list(range(images))
    if not 1 <= count <= images:
        raise DatasetError(f"ensemble.train_images={count} but the stores hold {images} train images; "
                           f"use a value in [1, {images}] or null for all")
    return sorted(int(i) for i in np.random.default_rng(seed).permutation(images)[:count])


def image_rows(matrix: da.Array, labels: da.Array, indices: Sequence[int], pixels_per_image: int) -> tuple[da.Array, da.Array]:
    """The rows of images ``indices`` (in that order) of an image-major ``[P, D]`` matrix and its ``[P]`` labels;
    lazy, each image's rows one slice."""
    slices = [slice(i * pixels_per_image, (i + 1) * pixels_per_image) for i in indices]
    return da.concatenate([matrix[s] for s in slices]), da.concatenate([labels[s] for s in slices])

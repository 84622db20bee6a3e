"""The paper's pixel-classifier ensemble, trained by streaming chunks from the feature stores.

All members live in one module with stacked weights (``[M, in, out]``), so one pass over the data
feeds every member: every member takes its own permutation of the rows in the shuffle pool. Adam and
BatchNorm are per-element / per-channel, so this trains exactly M independent MLPs of the paper's shape
(D→128→ReLU→BN→32→ReLU→BN→C, or 256/128 for C ≥ 30), each initialised from its own seed (``seed + i``)
with the paper's N(0, 0.02) weights.

Rows reach the trainer through a shuffle pool of ``ensemble.buffer_rows`` labeled rows (``ShufflePool``):
when the whole labeled split fits, the store is read once and every epoch is a global shuffle, as in the
paper's in-RAM DataLoader; otherwise chunks stream through the pool and each batch mixes rows of many
chunks. Passes trained at once share one pool (``SharedPool``), so the store is read once per epoch
whatever their number. Memory is set by ``buffer_rows`` x D, never by the number of images.
"""
from __future__ import annotations

import collections
import contextlib
import math
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import dask
import dask.array as da
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config import EnsembleConfig
from pipeline.enums import Autocast, Stopping
from pipeline.errors import DatasetError, EnsembleError, NumericsError
from pipeline.runtime import AUTOCAST_DTYPES, autocast
from pipeline.atomic import save_torch_atomic


def hidden_widths(num_classes: int) -> tuple[int, int]:
    """The paper's pixel_classifier widths: (128, 32) for fewer than 30 classes, else (256, 128)."""
    return (128, 32) if num_classes < 30 else (256, 128)


class EnsembleMLP(nn.Module):
    """M pixel classifiers. ``forward``: ``[B, D]`` (shared) or ``[M, B, D]`` -> logits ``[M, B, C]``."""

    def __init__(self, members: int, dim: int, num_classes: int, seed: int):
        super().__init__()
        self.members, self.dim, self.num_classes, self.seed = members, dim, num_classes, seed
        widths = (dim, *hidden_widths(num_classes), num_classes)
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        # One generator per member, drawing its layers one after another: every layer of every member is an
        # independent draw, as the paper's members initialise each nn.Linear on its own.
        generators = [torch.Generator().manual_seed(seed + member) for member in range(members)]
        for fan_in, fan_out in zip(widths[:-1], widths[1:]):
            stacked = torch.empty(members, fan_in, fan_out)
            for member, generator in enumerate(generators):
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
        joined = cls(0, first.dim, first.num_classes, seed=first.seed)  # members are seed + i in order
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

    def _member_views(self, member: int) -> list[torch.Tensor]:
        views = [w[member] for w in self.weights] + [b[member] for b in self.biases]
        for norm in self.norms:
            width = norm.num_features // self.members
            part = slice(member * width, (member + 1) * width)
            views += [norm.weight[part], norm.bias[part], norm.running_mean[part], norm.running_var[part]]
        return views

    def member_state(self, member: int) -> list[torch.Tensor]:
        """Copies of one member's weights, biases and BatchNorm affine parameters and running statistics."""
        return [view.detach().clone() for view in self._member_views(member)]

    @torch.no_grad()
    def load_member_state(self, member: int, state: list[torch.Tensor]) -> None:
        for view, saved in zip(self._member_views(member), state, strict=True):
            view.copy_(saved)

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
    loss: float  # mean batch loss and accuracy of the members still training
    accuracy: float
    pixels: int  # labeled rows each member saw this epoch
    first_member: int = 0
    stopped: int = 0  # members of this pass stopped by the paper's rule by the end of this epoch


def _labeled_rows(matrix: da.Array, labels: da.Array, blocks: list[int], ignore_label: int,
                  dtype: torch.dtype = torch.float16) -> tuple[torch.Tensor, torch.Tensor]:
    """The labeled rows of the given row-chunks: ``[K, D]`` features in ``dtype``, ``[K] int64`` labels."""
    parts = da.compute(*[(matrix.blocks[b], labels.blocks[b]) for b in blocks], scheduler="synchronous")
    features, targets = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    keep = targets != ignore_label
    return torch.from_numpy(features[keep]).to(dtype), torch.from_numpy(targets[keep].astype(np.int64))


class ShufflePool:
    """The labeled rows of ``[P, D]`` features / ``[P]`` labels, epoch by epoch, through a pool of
    ``capacity`` rows.

    ``epoch(rng)`` visits every labeled row once and yields ``(pool [R, D] float16, labels [R] int64,
    rows [K] int64)``: train on ``pool[rows]`` before asking for the next item. Chunks are read in a
    random order, a group of about ``capacity / 4`` rows at a time (the next group prefetched on a
    thread). The first groups fill the pool; after that each group evicts as many rows, drawn at random
    from the whole pool, which are yielded and then overwritten; the last item is what the pool holds.
    So each batch draws on all the chunks in the pool, not on one group. When every labeled row fits in
    the pool, the rows are read once and every epoch yields the whole pool: a global shuffle.
    Memory: the pool plus two groups, about 1.5 x capacity x D values of ``dtype`` (2 bytes), whatever P is.
    """

    def __init__(self, matrix: da.Array, labels: da.Array, capacity: int, ignore_label: int,
                 dtype: torch.dtype = torch.float16):
        if matrix.numblocks[1] != 1:
            matrix = matrix.rechunk({1: -1})
        self.matrix, self.labels = matrix, labels.rechunk((matrix.chunks[0],))
        self.ignore_label, self.dtype = ignore_label, dtype
        # One byte per pixel, read once to plan the groups and to size the pool.
        counts = [int((block != ignore_label).sum()) for block in da.compute(*self.labels.to_delayed().ravel(), scheduler="synchronous")]
        self.counts = np.asarray(counts, dtype=np.int64)
        self.total = int(self.counts.sum())
        self.size = min(capacity, self.total)
        self.resident = self.total <= capacity
        self._group_rows = self.total if self.resident else max(1, capacity // 4)
        self._cached: tuple[torch.Tensor, torch.Tensor] | None = None

    def _groups(self, rng: np.random.Generator) -> list[list[int]]:
        groups, current, rows = [], [], 0
        # A resident pool is permuted whole by every member, so its chunks are read in store order.
        blocks = range(len(self.counts)) if self.resident else rng.permutation(len(self.counts)).tolist()
        for block in blocks:
            if self.counts[block] == 0:
                continue
            current.append(block)
            rows += int(self.counts[block])
            if rows >= self._group_rows:
                groups.append(current)
                current, rows = [], 0
        return groups + [current] if current else groups

    def epoch(self, rng: np.random.Generator) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        if self._cached is not None:
            yield *self._cached, torch.arange(self.size)
            return
        pool = torch.empty((self.size, self.matrix.shape[1]), dtype=self.dtype)
        pool_labels = torch.empty(self.size, dtype=torch.int64)
        filled = 0
        groups = self._groups(rng)
        with ThreadPoolExecutor(max_workers=1) as reader:
            future = reader.submit(_labeled_rows, self.matrix, self.labels, groups[0], self.ignore_label, self.dtype) if groups else None
            for index in range(len(groups)):
                features, targets = future.result()
                if index + 1 < len(groups):
                    future = reader.submit(_labeled_rows, self.matrix, self.labels, groups[index + 1], self.ignore_label,
                                           self.dtype)
                offset = min(self.size - filled, len(targets))
                pool[filled : filled + offset], pool_labels[filled : filled + offset] = features[:offset], targets[:offset]
                filled += offset
                while offset < len(targets):
                    count = min(len(targets) - offset, self.size)
                    slots = torch.from_numpy(rng.choice(self.size, count, replace=False))
                    yield pool, pool_labels, slots
                    pool[slots], pool_labels[slots] = features[offset : offset + count], targets[offset : offset + count]
                    offset += count
                del features, targets
        if self.resident:
            self._cached = (pool, pool_labels)
        yield pool, pool_labels, torch.arange(filled)


def member_passes(config: EnsembleConfig) -> list[tuple[int, int]]:
    """``(first member, members)`` of each pass of the fit, in order."""
    # members_per_pass null: the members split evenly over the passes that run at once.
    group = config.members_per_pass or math.ceil(config.members / config.parallel_passes)
    return [(first, min(group, config.members - first)) for first in range(0, config.members, group)]


class SharedPool:
    """One ``ShufflePool`` read once for the passes that train at the same time.

    The pool's items, epoch after epoch (chunk order and evictions drawn from one generator seeded
    ``seed``), form one sequence that every pass reads through its own ``reader()``; the pool moves to its
    next item only when every pass still reading has finished training on the current one (the item's
    rows are then overwritten). So N passes at once decompress the store once, not N times, and each pass
    sees exactly the items it would see alone: the weights do not depend on which passes share.
    """

    _END = None  # marks the end of an epoch in the sequence

    def __init__(self, pool: ShufflePool, seed: int, epochs: int, readers: int):
        self._sequence = self._items(pool, np.random.default_rng(seed), epochs)
        self._changed = threading.Condition()
        self._active = readers
        self._index, self._item, self._pending = -1, self._END, 0
        with self._changed:
            self._next()

    @classmethod
    def _items(cls, pool: ShufflePool, rng: np.random.Generator, epochs: int):
        for _ in range(epochs):
            yield from pool.epoch(rng)
            yield cls._END

    def _next(self) -> None:  # with _changed held
        self._item = next(self._sequence, self._END)
        self._index += 1
        self._pending = self._active
        self._changed.notify_all()

    def _get(self, index: int):
        with self._changed:
            self._changed.wait_for(lambda: self._index >= index)
            return self._item

    def _release(self) -> None:
        with self._changed:
            self._pending -= 1
            if self._pending == 0 and self._active:
                self._next()

    def _leave(self, index: int) -> None:
        """A reader stops for good; ``index``: the item it would read next (or holds, unreleased)."""
        with self._changed:
            self._active -= 1
            if self._index >= index:
                self._pending -= 1
                if self._pending == 0 and self._active:
                    self._next()

    @contextlib.contextmanager
    def reader(self) -> Iterator[Callable[[], Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]]]:
        """``with shared.reader() as epoch:`` then ``for pool, labels, rows in epoch():`` once per epoch
        (as ``ShufflePool.epoch``). Leaving the block, however, lets the other readers go on."""
        cursor = [0]

        def epoch():
            while True:
                item = self._get(cursor[0])
                if item is self._END:
                    self._release()
                    cursor[0] += 1
                    return
                yield item  # a reader that stops here keeps the item until it leaves
                self._release()
                cursor[0] += 1

        try:
            yield epoch
        finally:
            self._leave(cursor[0])


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
    paper's batch-loss rule (``config.batch_patience``, ``config.warmup_epochs``).
    """
    passes = member_passes(config)
    # The pool holds rows as the first product takes them: float16 as stored, or bfloat16 under bf16 autocast
    # (the same rounding autocast would apply, done once per row read instead of once per member and batch).
    dtype = AUTOCAST_DTYPES[config.autocast] or torch.float16
    pool = ShufflePool(matrix, labels, config.buffer_rows, ignore_label, dtype)
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
        shared = SharedPool(pool, config.seed, config.epochs, len(wave))

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
    paper = config.stopping is Stopping.PAPER
    training = torch.ones(members, dtype=torch.bool)
    best_batch, stale_batches = torch.full((members,), math.inf), torch.zeros(members, dtype=torch.int64)
    stopped_states: dict[int, list[torch.Tensor]] = {}
    history: list[EpochStats] = []
    # plateau: each member's best epoch loss and epochs without a min_delta improvement on it
    best_epoch, stale_epochs = torch.full((members,), math.inf, dtype=torch.float64), torch.zeros(members, dtype=torch.int64)

    def stop(member: int) -> None:
        stopped_states[member] = model.member_state(member)  # Adam would keep moving it
        training[member] = False

    for epoch in range(1, config.epochs + 1):
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
                if paper and epoch > config.warmup_epochs:
                    improved = losses < best_batch
                    best_batch = torch.where(improved, losses, best_batch)
                    stale_batches = torch.where(improved, 0, stale_batches + 1)
                    for member in (live & (stale_batches > config.batch_patience)).nonzero().flatten().tolist():
                        stop(member)
                    if not training.any():
                        break
            if not training.any():
                break
        if not paper:
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
        if not training.any():
            break
    for member, state in stopped_states.items():
        model.load_member_state(member, state)
    return model.eval(), history


@torch.no_grad()
def predict_chunks(
    model: EnsembleMLP, matrix: da.Array, *, batch_pixels: int, device: torch.device, workers: int = 1,
    precision: Autocast = Autocast.NONE,
) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """For each row-chunk of ``matrix`` yield ``(first_row, member classes [M, R], member probs [M, R, C])``.

    On CPU, ``workers`` row-chunks are read and predicted at once on Python threads (torch releases the
    GIL in its kernels), yielded in row order; ``precision`` is ``ensemble.autocast``. A chunk's arithmetic is the same whichever thread runs it,
    so with one torch thread per op the results do not depend on ``workers`` or the core count.
    """
    model.eval()
    if matrix.numblocks[1] != 1:
        matrix = matrix.rechunk({1: -1})
    offsets = np.cumsum((0,) + matrix.chunks[0])
    dtype = AUTOCAST_DTYPES[precision] or torch.float32  # the rows as the products take them (as fit's pool holds them)

    @torch.no_grad()  # grad mode is per thread: the decorator above does not reach the workers
    def predict_block(block: int) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
        (rows,) = dask.compute(matrix.blocks[block], scheduler="synchronous")
        rows = torch.from_numpy(rows).to(dtype)
        results = []
        for start in range(0, len(rows), batch_pixels):
            with autocast(device, precision):
                logits = model(rows[start : start + batch_pixels].to(device)).float()
            probabilities = torch.softmax(logits, dim=-1).cpu()
            results.append((int(offsets[block]) + start, probabilities.argmax(-1), probabilities))
        return results

    for results in _in_order(predict_block, range(matrix.numblocks[0]), workers if device.type == "cpu" else 1):
        yield from results


def _in_order(function: Callable, items, workers: int) -> Iterator:
    """``map(function, items)`` with up to ``workers`` calls at once, results in order, at most
    ``workers + 1`` finished results held."""
    if workers <= 1:
        yield from map(function, items)
        return
    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending: collections.deque = collections.deque()
        for item in items:
            pending.append(pool.submit(function, item))
            if len(pending) > workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


# What save_ensemble writes; load_ensemble refuses any other (a future layout gets a new number). /2: the
# file carries the whole record of the features it was fit on (store.fit_record), not just steps and blocks.
ENSEMBLE_FORMAT = "ddpm-segmentation-ensemble/2"


def save_ensemble(path: Path, model: EnsembleMLP, *, features: dict,
                  train_image_ids: Sequence[str] | None = None) -> None:
    """The fitted ensemble with what it was fit on (``features``: ``store.fit_record``, i.e. steps, blocks,
    checkpoint sha256, noise, upsample, representation, ...) and the train images' ids, written atomically;
    ``load_ensemble`` reads it back and refuses it for other features."""
    save_torch_atomic({"format": ENSEMBLE_FORMAT, "state_dict": model.cpu().state_dict(), "members": model.members,
                       "dim": model.dim, "num_classes": model.num_classes, "seed": model.seed,
                       "features": dict(features),
                       "train_image_ids": None if train_image_ids is None else list(train_image_ids)}, path)


def load_ensemble(path: Path, features: dict) -> EnsembleMLP:
    """The ensemble that ``save_ensemble`` wrote, in eval mode on the CPU; an ``EnsembleError`` naming every
    differing key unless it is of this format and was fit on exactly the features ``features`` describes
    (``store.fit_record`` of the reader's params)."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"ensemble {path} does not exist; run the fit stage (`dvc repro fit`)")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # not a torch file, truncated, or a pickle of other objects
        raise EnsembleError(f"ensemble {path} cannot be read as an ensemble file ({type(error).__name__}: "
                            f"{str(error).splitlines()[0] if str(error) else ''}); rerun the fit stage (`dvc repro fit`)") from None
    found = payload.get("format") if isinstance(payload, dict) else None
    if found != ENSEMBLE_FORMAT:
        raise EnsembleError(f"ensemble {path} has format {found!r}, not {ENSEMBLE_FORMAT!r}; rerun the fit stage "
                            f"(`dvc repro fit`) with this version of the code")
    fit_on = payload.get("features") or {}
    differ = [f"{key} {fit_on.get(key)!r} (asked: {value!r})" for key, value in features.items() if fit_on.get(key) != value]
    differ += [f"{key} {value!r} (asked: nothing)" for key, value in fit_on.items() if key not in features]
    if differ:
        raise EnsembleError(f"ensemble {path} was fit on other features than the params ask for: {'; '.join(differ)}; "
                            f"rerun `dvc repro` (or fit with these params)")
    model = EnsembleMLP(payload["members"], payload["dim"], payload["num_classes"], payload["seed"])
    model.load_state_dict(payload["state_dict"])
    return model.eval()


def train_subset(images: int, count: int | None, seed: int) -> list[int]:
    """Sorted indices of ``count`` of ``images`` train images, drawn without replacement by a generator seeded
    with ``seed`` (``ensemble.train_images`` / ``train_subset_seed``); all of them when ``count`` is None."""
    if count is None:
        return list(range(images))
    if not 1 <= count <= images:
        raise DatasetError(f"ensemble.train_images={count} but the stores hold {images} train images; "
                           f"use a value in [1, {images}] or null for all")
    return sorted(int(i) for i in np.random.default_rng(seed).choice(images, size=count, replace=False))


def image_rows(matrix: da.Array, labels: da.Array, indices: Sequence[int], pixels_per_image: int) -> tuple[da.Array, da.Array]:
    """The rows of images ``indices`` (in that order) of an image-major ``[P, D]`` matrix and its ``[P]`` labels;
    lazy, each image's rows one slice."""
    slices = [slice(i * pixels_per_image, (i + 1) * pixels_per_image) for i in indices]
    return da.concatenate([matrix[s] for s in slices]), da.concatenate([labels[s] for s in slices])

"""Rows for the fit: a shuffle pool over the store's row-chunks, and one pool shared by the passes that train
at once."""
from __future__ import annotations

import contextlib
import itertools
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterator

import dask.array as da
import numpy as np
import torch


def _labeled_rows(matrix: da.Array, labels: da.Array, chunks: list[int], ignore_label: int,
                  dtype: torch.dtype = torch.float16) -> tuple[torch.Tensor, torch.Tensor]:
    """The labeled rows of the given row-chunks: ``[K, D]`` features in ``dtype``, ``[K] int64`` labels.

    Each column block (one per step store) of each chunk is computed on its own and cast straight into its place
    in the result: no concatenation of the steps, then of the chunks, then a cast, each a copy of the group (at
    256², D = 8448, those copies took longer than upsampling the rows)."""
    column_blocks = len(matrix.chunks[1])
    parts = da.compute(*[([matrix.blocks[chunk, j] for j in range(column_blocks)], labels.blocks[chunk])
                         for chunk in chunks], scheduler="synchronous")
    targets = np.concatenate([np.asarray(part[1]) for part in parts])
    features = torch.empty((len(targets), matrix.shape[1]), dtype=dtype)
    edges = np.cumsum((0,) + matrix.chunks[1])
    row = 0
    for pieces, chunk_targets in parts:
        for j, piece in enumerate(pieces):
            piece = np.asarray(piece)
            features[row : row + len(chunk_targets), edges[j] : edges[j + 1]] = torch.from_numpy(
                piece if piece.flags.writeable else piece.copy())
        row += len(chunk_targets)
    keep = targets != ignore_label
    if not keep.all():  # no copy of the group when every row is labeled
        features, targets = features[torch.from_numpy(keep)], targets[keep]
    return features, torch.from_numpy(targets.astype(np.int64))


class ShufflePool:
    """The labeled rows of ``[P, D]`` features / ``[P]`` labels, epoch by epoch, through a pool of
    ``capacity`` rows.

    ``epoch(rng)`` visits every labeled row once and yields ``(pool [R, D] float16, labels [R] int64,
    rows [K] int64)``: train on ``pool[rows]`` before asking for the next item. Chunks are read in a
    random order, a group of about ``capacity / 4`` rows at a time (the next group prefetched on a
    thread). The first groups fill the pool; after that each group evicts as many rows, drawn at random
    from the whole pool, which are yielded and then overwritten; the last item is what the pool holds.
    So each batch draws on all the chunks in the pool, not on one group. When every labeled row fits in
    the pool, the rows are read once (in groups of a quarter of them, in store order) and every epoch yields the
    whole pool: a global shuffle.
    Memory: the pool plus two groups, about 1.5 x min(capacity, labeled rows) x D values of ``dtype`` (2 bytes),
    whatever P is.
    """

    def __init__(self, matrix: da.Array, labels: da.Array, capacity: int, ignore_label: int,
                 dtype: torch.dtype = torch.float16):
        if matrix.numblocks[1] != 1:
            matrix = matrix.rechunk({1: -1})
        self.matrix, self.labels = matrix, labels.rechunk((matrix.chunks[0],))
        self.ignore_label, self.dtype = ignore_label, dtype
        # One byte per pixel, read once to plan the groups and to size the pool.
        counts = [int((chunk != ignore_label).sum())
                  for chunk in da.compute(*self.labels.to_delayed().ravel(), scheduler="synchronous")]
        self.counts = np.asarray(counts, dtype=np.int64)
        self.total = int(self.counts.sum())
        self.size = min(capacity, self.total)
        self.resident = self.total <= capacity
        # Resident or not, a group is a quarter of the pool: a global shuffle too is read group by group, so that it
        # never holds the whole split more than once (reading it as one group took ~4x the pool at 256²).
        self._group_rows = max(1, self.size // 4)
        self._cached: tuple[torch.Tensor, torch.Tensor] | None = None

    def _groups(self, rng: np.random.Generator) -> list[list[int]]:
        groups, current, rows = [], [], 0
        # A resident pool is permuted whole by every member, so its chunks are read in store order.
        chunks = range(len(self.counts)) if self.resident else rng.permutation(len(self.counts)).tolist()
        for chunk in chunks:  # row-chunks of the store (dask's "blocks"; not decoder blocks)
            if self.counts[chunk] == 0:
                continue
            current.append(chunk)
            rows += int(self.counts[chunk])
            if rows >= self._group_rows:
                groups.append(sorted(current))
                current, rows = [], 0
        # Each group is read in store order: its rows land in random slots of the pool all the same, and chunks of
        # one image come one after the other, so a native store decodes that image's maps once (its reader's cache).
        return groups + [sorted(current)] if current else groups

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


class SharedPool:
    """One ``ShufflePool`` read once for the passes that train at the same time.

    The pool's items, epoch after epoch (chunk order and evictions drawn from one generator seeded
    ``seed``), form one sequence that every pass reads through its own ``reader()``; the pool moves to its
    next item only when every pass still reading has finished training on the current one (the item's
    rows are then overwritten). So N passes at once decompress the store once, not N times, and each pass
    sees exactly the items it would see alone: the weights do not depend on which passes share.
    """

    _END = None  # marks the end of an epoch in the sequence

    def __init__(self, pool: ShufflePool, seed: int, epochs: int | None, readers: int):
        """``epochs``: how many epochs the sequence holds (None = without end: readers leave when done)."""
        self._sequence = self._items(pool, np.random.default_rng(seed), epochs)
        self._changed = threading.Condition()
        self._active = readers
        self._index, self._item, self._pending = -1, self._END, 0
        with self._changed:
            self._next()

    @classmethod
    def _items(cls, pool: ShufflePool, rng: np.random.Generator, epochs: int | None):
        for _ in (itertools.count() if epochs is None else range(epochs)):
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

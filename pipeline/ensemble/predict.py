"""The ensemble's predictions, row-chunk by row-chunk of a lazy feature matrix: each member's classes and
probabilities (``predict_chunks``), and their majority vote and disagreement (``vote``)."""
from __future__ import annotations

import collections
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterator

import dask
import dask.array as da
import numpy as np
import torch

from pipeline.ensemble.metrics import jensen_shannon, majority_vote
from pipeline.ensemble.model import EnsembleMLP
from pipeline.enums import Autocast
from pipeline.runtime import AUTOCAST_DTYPES, autocast


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
    def predict_chunk(chunk: int) -> list[tuple[int, torch.Tensor, torch.Tensor]]:  # a row-chunk (dask block)
        (rows,) = dask.compute(matrix.blocks[chunk], scheduler="synchronous")
        rows = torch.from_numpy(rows).to(dtype)
        results = []
        for start in range(0, len(rows), batch_pixels):
            with autocast(device, precision):
                logits = model(rows[start : start + batch_pixels].to(device)).float()
            probabilities = torch.softmax(logits, dim=-1).cpu()
            results.append((int(offsets[chunk]) + start, probabilities.argmax(-1), probabilities))
        return results

    for results in _in_order(predict_chunk, range(matrix.numblocks[0]), workers if device.type == "cpu" else 1):
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


def prediction_workers() -> int:
    """Row-chunks predicted at once: every core when torch runs one thread per op (as the evaluate and
    segment stages set it), so the cores share the work while each chunk's arithmetic stays on one thread and the
    results stay the same on any core count; else 1 (torch already uses the cores inside each op)."""
    return usable_cores() if torch.get_num_threads() == 1 else 1


def usable_cores() -> int:
    """The cores this process may run on: its CPU affinity where the OS has one (Linux), else every core
    (``os.sched_getaffinity`` exists only on Linux; macOS and Windows have no per-process affinity here)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def vote(model: EnsembleMLP, matrix: da.Array, *, batch_pixels: int, device: torch.device,
         workers: int | None = None, precision: Autocast = Autocast.NONE) -> tuple[np.ndarray, np.ndarray]:
    """``[P, D]`` lazy features -> ``([P] uint8`` majority vote, ``[P] float32`` Jensen-Shannon disagreement),
    row-chunk by row-chunk, ``workers`` chunks at once (null: ``prediction_workers()``), the MLPs' products
    in ``precision`` (``ensemble.autocast``)."""
    prediction = np.zeros(matrix.shape[0], dtype=np.uint8)
    disagreement = np.zeros(matrix.shape[0], dtype=np.float32)
    workers = prediction_workers() if workers is None else workers
    for first, classes, probabilities in predict_chunks(model, matrix, batch_pixels=batch_pixels, device=device,
                                                        workers=workers, precision=precision):
        rows = slice(first, first + classes.shape[1])
        prediction[rows] = majority_vote(classes, model.num_classes).numpy()
        disagreement[rows] = jensen_shannon(probabilities).numpy()
    return prediction, disagreement

"""Extraction jobs: one diffusion step's features for a set of images, written into the step's store.

``extract_images`` is the unit of work. It runs in the stage's own process (``features.workers: 0``)
or as a task on dask.distributed workers (a local cluster of ``features.workers`` processes, or the
cluster at ``features.scheduler``). Every image owns whole chunks of the store, so workers write their
images' rows into the shared unfinished store directly and never share a chunk; each image's done
flag is set after its rows, so an interrupted run resumes from whatever any worker finished.
"""
from __future__ import annotations

import contextlib
import functools
import os
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import torch

from pipeline.config import FeaturesConfig
from pipeline.diffusion.gaussian import Diffusion
from pipeline.enums import Representation
from pipeline.errors import ConfigError
from pipeline.features.compute import features_for_images, load_feature_model
from pipeline.features.store import StoreWriter, background_writes
from pipeline.runtime import pick_device


@dataclass(frozen=True)
class ExtractJob:
    """Everything a worker needs to extract and write images of one step (plain, picklable values)."""

    checkpoint: str
    store: str  # the final store path or URL; workers write into its staging location (pipeline.features.locations.staging)
    t: int
    blocks: tuple[int, ...]  # the blocks the store holds (features.store_blocks)
    features: FeaturesConfig  # the features section: noise, upsample, autocast, representation, batch size, layout
    device: str
    image_paths: dict[str, tuple[str, ...]]  # split -> image files in store order
    mask_paths: dict[str, tuple[str, ...]]
    encoder_checkpoint: str | None = None  # representation mae or swav: its pretraining stage's checkpoint


def worker_device(name: str) -> torch.device:
    """The device for this process; on a dask worker of a multi-GPU machine, GPU ``rank % count``."""
    device = pick_device(name)
    if device.type == "cuda" and device.index is None and torch.cuda.device_count() > 1:
        try:
            from distributed import get_worker

            rank = get_worker().name
        except (ImportError, ValueError):  # not running on a dask worker
            rank = 0
        if isinstance(rank, int):
            device = torch.device("cuda", rank % torch.cuda.device_count())
    return device


@functools.lru_cache(maxsize=2)
def loaded_model(checkpoint: str, device: str, encoder_checkpoint: str | None = None,
                 representation: str = "ddpm") -> tuple[torch.nn.Module, Diffusion | None]:
    """Each process (the stage, or a dask worker) loads a checkpoint once, then reuses it for every task
    (``load_feature_model``): the DDPM's UNet and diffusion, or for representation mae or swav the encoder of
    ``encoder_checkpoint`` and None.

    A ``use_fp16`` model runs in float16 on CUDA and in float32, with one warning, on a CPU
    (``pipeline.diffusion.unet.for_inference``)."""
    options = FeaturesConfig(representation=Representation(representation))
    return load_feature_model(options, checkpoint, encoder_checkpoint, torch.device(device))


def extract_images(job: ExtractJob, split: str, indices: list[int], on_image: Callable[[], None] | None = None) -> int:
    """Extract and write images ``indices`` of ``split`` (through ``features_for_images``, the one feature
    path); returns how many were written."""
    device = worker_device(job.device)
    model, diffusion = loaded_model(job.checkpoint, str(device), job.encoder_checkpoint,
                                     job.features.representation.value)
    writer = StoreWriter.reopen(job.store)
    images, masks = job.image_paths[split], job.mask_paths[split]
    features = features_for_images(model, diffusion, [images[i] for i in indices], options=job.features,
                                   t_steps=[job.t], blocks=job.blocks, split=split, indices=indices,
                                   layout=job.features.layout, name_of=lambda index: f"{split} image {images[index]}")
    written = 0
    with background_writes(writer) as submit:
        for index, values in features:
            values = [block.numpy() for block in values] if isinstance(values, list) else values.numpy()
            submit(split, index, values, np.load(masks[index]).reshape(-1))
            written += 1
            if on_image is not None:
                on_image()
    return written


@contextlib.contextmanager
def dask_client(workers: int, scheduler: str | None,
                tls_files: dict[str, str] | None = None) -> Iterator["distributed.Client"]:  # noqa: F821
    """A client of the cluster at ``scheduler`` (over TLS with ``tls_files``, dask ``Security`` arguments), or of
    a local cluster of ``workers`` single-threaded processes."""
    import dask
    from distributed import Client, LocalCluster
    from distributed.security import Security

    if scheduler:
        security = Security(**tls_files, require_encryption=True) if tls_files else None
        try:
            client = Client(scheduler, timeout="10s", security=security)
        except OSError as error:
            raise ConfigError(
                f"features.scheduler={scheduler!r}: cannot reach a dask scheduler there ({error}); start one "
                f"(`dask scheduler`) or set features.scheduler: null to use features.workers local processes"
            ) from None
        with client:
            yield client
        return
    # dask gives each worker process one BLAS/OpenMP thread; share the cores out instead, so that one
    # worker computes exactly what the stage computes in process (thread count changes the last bits).
    # These must be in the environment before the worker process starts (dask's pre-spawn-environ).
    threads = int(os.environ.get("DDPM_SEG_THREADS") or max(1, torch.get_num_threads() // workers))
    environ = {f"distributed.nanny.pre-spawn-environ.{name}": threads
               for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")}
    with dask.config.set(environ), LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                                                dashboard_address=None) as cluster:
        with Client(cluster) as client:
            yield client


@contextlib.contextmanager
def extraction_runner(workers: int, scheduler: str | None,
                      tls_files: dict[str, str] | None = None) -> Iterator[Callable[..., None]]:
    """Yields ``run(job, pending, on_images)`` that extracts every pending image (``{split: [index]}``).

    With no workers and no scheduler it runs in this process; otherwise it connects to the cluster first
    (so a wrong address fails before anything is written) and submits one task per batch of images.
    ``on_images(n)`` is called as images are written, for a progress bar.
    """
    if not workers and not scheduler:

        def run_here(job: ExtractJob, pending: dict[str, list[int]], on_images: Callable[[int], None]) -> None:
            for split, indices in pending.items():
                if indices:
                    extract_images(job, split, indices, on_image=lambda: on_images(1))

        yield run_here
        return
    from distributed import as_completed

    with dask_client(workers, scheduler, tls_files) as client:

        def run_on_cluster(job: ExtractJob, pending: dict[str, list[int]], on_images: Callable[[int], None]) -> None:
            futures = [client.submit(extract_images, job, split, indices[first : first + job.features.batch_size], pure=False)
                       for split, indices in pending.items()
                       for first in range(0, len(indices), job.features.batch_size)]
            for future in as_completed(futures):
                on_images(future.result())  # a worker's error (bad image, disk full) is raised here

        yield run_on_cluster

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

from pipeline.data.dataset import read_rgb, to_model_input
from pipeline.diffusion.gaussian import Diffusion
from pipeline.errors import ConfigError
from pipeline.features.activations import feature_dim, images_per_batch, iter_block_maps, iter_pixel_features, make_noise
from pipeline.runtime import AUTOCAST_DTYPES, pick_device
from pipeline.features.store import StoreWriter, background_writes
from pipeline.diffusion.train import load_checkpoint
from pipeline.diffusion.unet import UNetModel, for_inference


@dataclass(frozen=True)
class ExtractJob:
    """Everything a worker needs to extract and write images of one step (plain, picklable values)."""

    checkpoint: str
    store: str  # the final store path or URL; workers write into its staging location (pipeline.features.store.staging)
    t: int
    blocks: tuple[int, ...]  # the blocks the store holds (features.store_blocks)
    upsample: str
    noise_seed: int
    stochastic_noise: bool
    batch_size: int
    autocast: str
    device: str
    image_paths: dict[str, tuple[str, ...]]  # split -> image files in store order
    mask_paths: dict[str, tuple[str, ...]]
    representation: str = "ddpm"  # features.representation: ddpm, rgb or rgb_patch (patch_size)
    patch_size: int = 1
    noise_draws: int = 1
    layout: str = "pixels"  # pipeline.config.StoreLayout's value: what the writer is given per image


def noise_for(seed: int, split: str, index: int, t: int, image_size: int) -> torch.Tensor:
    """Per-image noise of the stochastic variant, reproducible from (seed, split, image, t)."""
    stream = {"train": 0, "test": 1, "val": 2}[split]  # train and test keep the streams they had before val
    state = np.random.SeedSequence([seed, stream, index, t]).generate_state(1)[0]
    return make_noise(int(state), image_size)


def batch_noise(seed: int, draws: int, stochastic: bool, split: str, indices: list[int], t: int,
                image_size: int) -> torch.Tensor:
    """The noise of one batch: ``[1, 3, S, S]`` shared (``make_noise(seed)``) or ``[B, 3, S, S]`` per image
    (``noise_for``); with ``draws`` > 1 the draws stacked, ``[draws, 1 or B, 3, S, S]``, draw j from seed + j."""
    def draw(draw_seed: int) -> torch.Tensor:
        if stochastic:
            return torch.cat([noise_for(draw_seed, split, i, t, image_size) for i in indices])
        return make_noise(draw_seed, image_size)

    if draws == 1:
        return draw(seed)
    return torch.stack([draw(seed + j) for j in range(draws)])


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
def loaded_model(checkpoint: str, device: str) -> tuple[UNetModel, Diffusion]:
    """Each process (the stage, or a dask worker) loads a checkpoint once, then reuses it for every task.

    A ``use_fp16`` model runs in float16 on CUDA and in float32, with one warning, on a CPU
    (``pipeline.diffusion.unet.for_inference``)."""
    model, diffusion, _ = load_checkpoint(checkpoint)
    return for_inference(model, device), diffusion


def extract_images(job: ExtractJob, split: str, indices: list[int], on_image: Callable[[], None] | None = None) -> int:
    """Extract and write images ``indices`` of ``split``; returns how many were written."""
    device = worker_device(job.device)
    model, diffusion = loaded_model(job.checkpoint, str(device))
    size = model.config.image_size
    writer = StoreWriter.reopen(job.store)
    images, masks = job.image_paths[split], job.mask_paths[split]
    # features.batch_size is an upper bound: at 256² the paper's blocks give 0.74 GB of float32 maps per
    # image, so the batch is cut to fit pipeline.features.activations.FEATURE_BATCH_BYTES (2 images there).
    batch_size = images_per_batch(job.batch_size, size, feature_dim(model, job.blocks))

    def batches() -> Iterator[tuple[list[int], torch.Tensor, torch.Tensor]]:
        for first in range(0, len(indices), batch_size):
            batch = indices[first : first + batch_size]
            x0 = to_model_input(np.stack([read_rgb(images[i]) for i in batch]))
            noise = batch_noise(job.noise_seed, job.noise_draws, job.stochastic_noise, split, batch, job.t, size)
            if device.type == "cuda":  # page-locked host memory lets the copy overlap the previous batch
                x0 = x0.pin_memory()
            yield batch, x0.to(device, non_blocking=True), noise.to(device)

    options = {"blocks": job.blocks, "autocast_dtype": AUTOCAST_DTYPES[job.autocast],
               "name_of": lambda index: f"{split} image {images[index]}"}
    if job.layout == "native":  # each block's maps as the UNet made them (features.representation ddpm); readers upsample
        features = ((index, [block.numpy() for block in maps])
                    for index, maps in iter_block_maps(model, diffusion, batches(), t=job.t, **options))
    else:
        features = ((index, rows.numpy()) for index, rows in
                    iter_pixel_features(model, diffusion, batches(), t_steps=[job.t], upsample=job.upsample,
                                        representation=job.representation, patch_size=job.patch_size, **options))
    written = 0
    with background_writes(writer) as submit:
        for index, values in features:
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
            futures = [client.submit(extract_images, job, split, indices[first : first + job.batch_size], pure=False)
                       for split, indices in pending.items() for first in range(0, len(indices), job.batch_size)]
            for future in as_completed(futures):
                on_images(future.result())  # a worker's error (bad image, disk full) is raised here

        yield run_on_cluster

"""Pretraining on several processes (torch.distributed, DDP): who this process is among the ranks, and the few
collectives pretraining needs beyond DDP's gradient all-reduce.

A launcher (``torchrun``) starts one process per device and tells each its place through the environment:
``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` (the rank on its machine), ``MASTER_ADDR`` and ``MASTER_PORT`` (where
rank 0 listens). Without ``WORLD_SIZE`` > 1 the process is the one-process run, and nothing here changes it.
Ranks talk over NCCL on CUDA GPUs (rank i of a machine uses GPU ``LOCAL_RANK``) and over gloo on CPUs. Every
collective waits at most ``DDPM_SEG_DIST_TIMEOUT`` seconds (600 by default), so a rank whose peer hangs stops
with an error instead of waiting for ever; a peer that dies is noticed at once (its sockets close).
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from pipeline.errors import ConfigError, PipelineError
from pipeline.runtime import pick_device

TIMEOUT_ENV = "DDPM_SEG_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 600  # above the longest pause between collectives: rank 0 writing a resumable state


class RankLostError(PipelineError):
    """A collective failed: another rank died, hung past the timeout, or lost its network."""


def is_collective_failure(error: BaseException) -> bool:
    """Whether ``error`` came from a collective whose peer went away (gloo and NCCL raise plain RuntimeErrors)."""
    if isinstance(error, torch.OutOfMemoryError):
        return False
    markers = ("gloo", "nccl", "connection", "timed out", "timeout", "peer", "process group")
    return isinstance(error, dist.DistError) or any(marker in str(error).lower() for marker in markers)


def first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


@dataclass(frozen=True)
class World:
    """This process's place among the ranks of a run (the one-process run: rank 0 of 1)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def main(self) -> bool:
        """Rank 0: the one rank that keeps the EMA and writes the checkpoint, the state and the curves."""
        return self.rank == 0

    def share(self, batch_size: int) -> slice:
        """This rank's positions in a global batch of ``batch_size``: equal, disjoint, in rank order."""
        per_rank = batch_size // self.size
        return slice(self.rank * per_rank, (self.rank + 1) * per_rank)


ONE_PROCESS = World()


def world_from_env(environ: Mapping[str, str] = os.environ) -> World:
    """The world a launcher describes in ``environ`` (torchrun's variables); rank 0 of 1 without them."""
    try:
        size = int(environ.get("WORLD_SIZE", "1"))
        rank = int(environ.get("RANK", "0"))
        local_rank = int(environ.get("LOCAL_RANK", str(rank)))
    except ValueError as error:
        raise ConfigError(f"RANK, WORLD_SIZE and LOCAL_RANK must be integers ({error}); launch with torchrun") from None
    if size < 1 or not 0 <= rank < size or local_rank < 0:
        raise ConfigError(f"RANK={rank} is not a rank of WORLD_SIZE={size} (LOCAL_RANK={local_rank}); launch with torchrun")
    if size > 1 and not (environ.get("MASTER_ADDR") and environ.get("MASTER_PORT")):
        raise ConfigError(f"WORLD_SIZE={size} but MASTER_ADDR/MASTER_PORT are not set: launch with torchrun "
                          f"(it sets them), or set them to rank 0's address and a free port")
    return World(rank, size, local_rank)


def timeout_s(environ: Mapping[str, str] = os.environ) -> float:
    value = environ.get(TIMEOUT_ENV) or str(DEFAULT_TIMEOUT_S)
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise ConfigError(f"{TIMEOUT_ENV}={value!r} is not a positive number of seconds; unset it for {DEFAULT_TIMEOUT_S}")
    return seconds


def start(world: World, device_name: str) -> torch.device:
    """This rank's device (``runtime.device``; on CUDA, GPU ``LOCAL_RANK``), with the process group joined when
    there are several ranks: NCCL between GPUs, gloo between CPUs."""
    device = pick_device(device_name)
    if not world.distributed:
        return device
    if device.type == "cuda":
        if device.index is not None:
            raise ConfigError(f"runtime.device={device_name!r} names one GPU, but each of the {world.size} ranks "
                              f"uses GPU LOCAL_RANK of its machine; set runtime.device to cuda or auto")
        device = torch.device("cuda", world.local_rank)
        torch.cuda.set_device(device)
    elif device.type != "cpu":
        raise ConfigError(f"runtime.device={device_name!r}: several ranks run on CUDA GPUs (NCCL) or CPUs (gloo) "
                          f"only; set runtime.device to cuda, cpu or auto")
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=world.rank, world_size=world.size,
                            timeout=timedelta(seconds=timeout_s()))
    return device


def stop(world: World) -> None:
    """Leave the process group (also after a failed collective, so the process exits instead of aborting)."""
    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()


def wrap(model: nn.Module, world: World, device: torch.device) -> nn.Module:
    """The module that computes the loss: ``model`` itself, or DDP around it, which averages the ranks' gradients
    during ``backward`` (every parameter takes part in each forward, so no unused-parameter search)."""
    if not world.distributed:
        return model
    return nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def sum_across(values: torch.Tensor, world: World) -> torch.Tensor:
    """``values`` summed over the ranks (a new tensor; every rank gets the sum)."""
    total = values.clone()
    if world.distributed:
        dist.all_reduce(total)
    return total


def gather(value: Any, world: World) -> list[Any]:
    """Every rank's ``value`` (picklable, small), in rank order, on every rank."""
    if not world.distributed:
        return [value]
    values: list[Any] = [None] * world.size
    dist.all_gather_object(values, value)
    return values

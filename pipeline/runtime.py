"""Effects at the edges: devices, threads, autocast, and a stage's command line (its params, and bad input
turned into exit code 2). Atomic writes live in ``pipeline.atomic``; model flags are checked by the stages
that build a UNet (``pipeline.diffusion.unet.check_model_builds``), so stages that build none do not
depend on the UNet's code."""
from __future__ import annotations

import argparse
import errno
import functools
import os
import sys
from pathlib import Path
from typing import Callable

import torch

from pipeline.config import Params, load_params
from pipeline.errors import ConfigError, PipelineError

# features.autocast / ensemble.autocast (values of config.Autocast, a str enum) -> the dtype autocast runs in.
AUTOCAST_DTYPES = {"none": None, "bfloat16": torch.bfloat16, "float16": torch.float16}


def autocast(device: torch.device, mode: str, key: str = "ensemble.autocast") -> torch.autocast:
    """The context that ``key`` = ``mode`` (none, bfloat16, float16) asks for on ``device``."""
    dtype = AUTOCAST_DTYPES[mode]
    if dtype is torch.bfloat16:
        check_bfloat16(device, key)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


@functools.lru_cache(maxsize=None)
def check_bfloat16(device: torch.device, key: str) -> None:
    """bf16 products where the hardware lacks them: an error on a GPU (autocast would refuse anyway), a
    warning on a CPU without native bf16 instructions (correct, but slower than float32 there)."""
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError(f"{key}: bfloat16 is not supported by {torch.cuda.get_device_name(device)}; "
                          f"set {key}: none (or float16)")
    if device.type == "cpu" and not _cpu_has_native_bf16():
        print(f"warning: {key}: bfloat16 runs emulated on this CPU (no avx512_bf16/amx_bf16/bf16 flag in "
              f"/proc/cpuinfo), slower than float32; set {key}: none for speed", file=sys.stderr)


def _cpu_has_native_bf16() -> bool:
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return True  # not Linux: unknown, so no warning
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


DEVICE_TYPES = ("cpu", "cuda", "mps")
# Overrides runtime.threads (not tracked by DVC: a count that changes no result of fit or evaluate, and
# of pretrain and extract only in the last bits).
THREADS_ENV = "DDPM_SEG_THREADS"


def pick_device(name: str, key: str = "runtime.device") -> torch.device:
    """The device ``key`` = ``name`` asks for on this machine (auto: the first CUDA GPU, else the CPU)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    check_device(name, key)
    return torch.device(name)


def check_device(name: str, key: str = "runtime.device") -> None:
    """Refuse a device name torch cannot parse, or one this machine does not have."""
    if name == "auto":
        return
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in DEVICE_TYPES:
        raise ConfigError(f"{key}={name!r} is not a device; use auto, cpu, cuda, cuda:<index> or mps")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"{key}={name!r}: this machine has no MPS device; use auto or cpu")
    count = torch.cuda.device_count() if device.type == "cuda" and torch.cuda.is_available() else 0
    if device.type == "cuda" and (count == 0 or (device.index or 0) >= count):
        raise ConfigError(f"{key}={name!r}: this machine has {count} CUDA device(s); use auto, cpu"
                          f"{f' or cuda:0..{count - 1}' if count else ''}")


def stage_parser(description: str | None) -> argparse.ArgumentParser:
    """A stage's command line: its docstring as the help text, and ``--params`` (params.yaml by default)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    return parser


def stage_params(path: str | Path, *, one_thread: bool = False) -> Params:
    """params.yaml as a stage reads it: ``load_params``, then what needs torch (runtime.device exists on
    this machine, unless a dask cluster's workers resolve it), and torch's thread count: ``runtime.threads``
    or ``DDPM_SEG_THREADS``, or one thread for the ensemble's stages (``one_thread``: each pass computes on
    one thread, so results do not depend on the core count)."""
    params = load_params(path)
    if params.features.scheduler is None:
        check_device(params.runtime.device)
    threads = 1 if one_thread else int(os.environ.get(THREADS_ENV) or 0) or params.runtime.threads
    if threads:
        torch.set_num_threads(threads)
    return params


def stage_main(function: Callable[[], None]) -> Callable[[], None]:
    """Run a stage; bad input exits with code 2 and one readable line instead of a traceback."""

    @functools.wraps(function)
    def wrapper() -> None:
        try:
            function()
        except (PipelineError, FileNotFoundError) as error:
            print(f"error: {str(error).strip(chr(34) + chr(39))}", file=sys.stderr)
            sys.exit(2)
        except OSError as error:
            if error.errno != errno.ENOSPC:
                raise
            print(f"error: disk full while writing ({error.filename or error}); free space and rerun the stage. "
                  f"Outputs were not moved into place; an interrupted extraction resumes where it stopped.",
                  file=sys.stderr)
            sys.exit(2)

    return wrapper

"""Effects at the edges: devices, threads, atomic writes, and turning bad input into exit code 2."""
from __future__ import annotations

import argparse
import contextlib
import errno
import functools
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Callable, Iterator

import torch

from pipeline.config import Params, load_params
from pipeline.errors import ConfigError, PipelineError
from pipeline.diffusion.unet import check_model_builds

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
    this machine, unless a dask cluster's workers resolve it; the model flags build a UNet), and torch's
    thread count: ``runtime.threads`` or ``DDPM_SEG_THREADS``, or one thread for the ensemble's stages
    (``one_thread``: each pass computes on one thread, so results do not depend on the core count)."""
    params = load_params(path)
    if params.features.scheduler is None:
        check_device(params.runtime.device)
    check_model_builds(params.unet_config())
    threads = 1 if one_thread else int(os.environ.get(THREADS_ENV) or 0) or params.runtime.threads
    if threads:
        torch.set_num_threads(threads)
    return params


@contextlib.contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """Yield ``<path>.tmp`` to write; it replaces ``path`` only if the block succeeds, else it is removed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    try:
        yield temporary
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    temporary.replace(path)


# torch's zip writer turns ENOSPC into a bare RuntimeError with this text (caffe2 inline_container.cc).
TORCH_WRITE_FAILED = ("file write failed", "failed writing file")


def save_torch_atomic(payload: object, path: Path) -> None:
    """``torch.save`` to ``<path>.tmp`` then rename; a failed write (disk full) leaves ``path`` as it was and
    is raised as ``OSError(ENOSPC)``, which ``stage_main`` reports in one line."""
    with atomic_file(path) as temporary:
        try:
            torch.save(payload, temporary)
        except RuntimeError as error:
            if not any(text in str(error) for text in TORCH_WRITE_FAILED):
                raise
            raise OSError(errno.ENOSPC, f"torch.save could not write its file ({error})", str(path)) from None


def write_json_atomic(data: dict, path: Path) -> None:
    with atomic_file(path) as temporary:
        temporary.write_text(json.dumps(data, indent=2, sort_keys=False, allow_nan=False) + "\n")  # NaN is no JSON


@contextlib.contextmanager
def building_dir(path: Path) -> Iterator[Path]:
    """Build a folder output in ``<path>.tmp`` and move it into place only if the block succeeds.

    On any error the temporary folder is removed and an existing ``path`` is left untouched.
    """
    temporary = path.with_name(path.name + ".tmp")
    if temporary.exists():
        shutil.rmtree(temporary)
    temporary.mkdir(parents=True)
    try:
        yield temporary
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    replace_dir(temporary, path)


def replace_dir(temporary: Path, path: Path) -> None:
    """Move a finished folder into place; the old one is removed only once the new one is in place."""
    if path.exists():
        old = path.with_name(path.name + ".old")
        if old.exists():
            shutil.rmtree(old)
        path.rename(old)
        temporary.rename(path)
        shutil.rmtree(old)
    else:
        temporary.rename(path)


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

"""Effects at the edges: devices, threads, atomic writes, and turning project errors into exit codes."""
from __future__ import annotations

import functools
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Callable

import torch

from pipeline.config import ConfigError
from pipeline.data import DatasetError
from pipeline.store import StoreError
from pipeline.unet import ModelFlagsError

USER_ERRORS = (ConfigError, DatasetError, StoreError, ModelFlagsError, FileNotFoundError)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} was asked for but CUDA is not available; use 'auto' or 'cpu'")
    return torch.device(name)


def write_json_atomic(data: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    temporary.replace(path)


def temporary_dir_for(path: Path) -> Path:
    """A fresh sibling ``<path>.tmp`` folder to build an output in before ``replace_dir``."""
    temporary = path.with_name(path.name + ".tmp")
    if temporary.exists():
        shutil.rmtree(temporary)
    temporary.mkdir(parents=True)
    return temporary


def replace_dir(temporary: Path, path: Path) -> None:
    """Move a finished folder into place; the old one is removed only once the new one is complete."""
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
    """Run a stage; a bad input exits with code 2 and one readable line instead of a traceback."""

    @functools.wraps(function)
    def wrapper() -> None:
        if os.environ.get("DDPM_SEG_THREADS"):
            torch.set_num_threads(int(os.environ["DDPM_SEG_THREADS"]))
        try:
            function()
        except USER_ERRORS as error:
            message = str(error).strip("'\"")
            print(f"error: {message}", file=sys.stderr)
            sys.exit(2)

    return wrapper

"""Effects at the edges: devices, threads, atomic writes, and turning bad input into exit code 2."""
from __future__ import annotations

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

from pipeline.errors import ConfigError, PipelineError


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} was asked for but CUDA is not available; use 'auto' or 'cpu'")
    return torch.device(name)


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


def write_json_atomic(data: dict, path: Path) -> None:
    with atomic_file(path) as temporary:
        temporary.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


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
        if os.environ.get("DDPM_SEG_THREADS"):
            torch.set_num_threads(int(os.environ["DDPM_SEG_THREADS"]))
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

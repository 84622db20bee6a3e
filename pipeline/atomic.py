"""Atomic writes: a file or folder output appears whole or not at all, and an existing one is replaced only
once its successor is complete (write to a temporary path, then rename)."""
from __future__ import annotations

import contextlib
import errno
import json
import shutil
from pathlib import Path
from typing import Iterator

import torch


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

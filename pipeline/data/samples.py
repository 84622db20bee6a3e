"""The store of images sampled from the DDPM (stage sample; read by stage label).

Layout of ``samples/images.zarr`` (zarr v3)::

    attrs: format, record (what made it: checkpoint sha256, steps, eta, sigma, seed, images, image size), complete
    images  [N, S, S, 3] uint8, chunks (1, S, S, 3): one chunk per image
    done    [N] uint8, chunks (1,): 1 once image i is written

It is written at ``<path>.partial`` and renamed to ``path`` only when every image is done; a rerun after a
kill resumes from the done flags when the record is the same (else it starts afresh), as the feature stores
do (pipeline/features/store.py). Local paths only.
"""
from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from pipeline.atomic import replace_dir
from pipeline.errors import StoreError

FORMAT = "ddpm-segmentation-samples/1"


def _ours(path: Path) -> bool:
    """True when ``path`` holds a sample store; False when nothing (or an empty folder) is there; anything
    else is a ``StoreError``: we never replace or delete what we did not write."""
    if not path.exists() or (path.is_dir() and not any(path.iterdir())):
        return False
    try:
        ours = zarr.open_group(path, mode="r").attrs.get("format") == FORMAT
    except Exception:  # not a zarr group at all (or an unreadable one): not ours
        ours = False
    if ours:
        return True
    raise StoreError(f"{path} exists but is not a sample store of this pipeline (no format {FORMAT!r}); nothing was "
                     f"deleted: move it away, or give the stage another --out")


class SampleWriter:
    """Writes images into ``<path>.partial``; ``finish`` marks the store complete and renames it into place."""

    def __init__(self, path: Path, group: zarr.Group):
        self.path, self.group = path, group
        self.partial = path.with_name(path.name + ".partial")

    def pending(self) -> list[int]:
        return [int(i) for i in np.flatnonzero(self.group["done"][:] == 0)]

    def write(self, indices: list[int], images: np.ndarray) -> None:
        """``images`` ``[len(indices), S, S, 3] uint8``: image ``indices[j]`` is ``images[j]``; each marked done
        after its pixels are written."""
        for index, image in zip(indices, images):
            self.group["images"][index] = image
            self.group["done"][index] = 1

    def finish(self) -> Path:
        missing = len(self.pending())
        if missing:
            raise StoreError(f"{self.partial}: {missing} images not yet written; cannot finish the store")
        _ours(self.path)
        self.group.attrs["complete"] = True
        replace_dir(self.partial, self.path)
        return self.path


def create_or_resume(path: Path, record: dict[str, Any], images: int, image_size: int) -> SampleWriter:
    """The unfinished store at ``<path>.partial`` when the same ``record`` started it, else a new one there."""
    path = Path(path)
    partial = path.with_name(path.name + ".partial")
    _ours(path)  # the final store is replaced at the end: it must be ours, or nothing
    if _ours(partial):
        group = zarr.open_group(partial, mode="r+")
        if dict(group.attrs.get("record", {})) == record:
            return SampleWriter(path, group)
        print(f"{partial}: not resuming the interrupted sampling, starting afresh: it was started with other "
              f"params or another checkpoint", file=sys.stderr)
        shutil.rmtree(partial)
    partial.parent.mkdir(parents=True, exist_ok=True)
    group = zarr.open_group(partial, mode="w", zarr_format=3,
                            attributes={"format": FORMAT, "record": record, "complete": False})
    group.create_array("images", shape=(images, image_size, image_size, 3), chunks=(1, image_size, image_size, 3),
                       dtype="uint8", fill_value=0)
    group.create_array("done", shape=(images,), chunks=(1,), dtype="uint8", compressors=None, fill_value=0)
    return SampleWriter(path, group)


def open_samples(path: Path) -> tuple[zarr.Array, dict[str, Any]]:
    """A finished store's ``images`` array (``[N, S, S, 3] uint8``, read image by image) and its record."""
    path = Path(path)
    if not path.exists():
        partial = path.with_name(path.name + ".partial")
        hint = " (an interrupted sampling left a .partial store: rerun the sample stage)" if partial.exists() else ""
        raise StoreError(f"sample store {path} does not exist{hint}; run `dvc repro sample`")
    try:
        group = zarr.open_group(path, mode="r")
        attrs = dict(group.attrs)
    except Exception as error:
        raise StoreError(f"sample store {path} is not a readable zarr group ({error}); rerun the sample stage") from None
    if attrs.get("format") != FORMAT:
        raise StoreError(f"{path} is not a sample store of this pipeline (format {attrs.get('format')!r})")
    if not attrs.get("complete") or (group["done"][:] == 0).any():
        raise StoreError(f"sample store {path} is incomplete (its writing was interrupted); rerun the sample stage")
    return group["images"], dict(attrs["record"])

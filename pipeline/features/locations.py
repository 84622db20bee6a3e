"""Where stores live: local paths or fsspec URLs, their staging location while written, and removing or setting
aside only stores of ours."""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Sequence

import fsspec
import zarr

from pipeline.atomic import replace_dir
from pipeline.errors import StoreError
from pipeline.features.record import FORMAT

Location = Path | str  # a local path, or an fsspec URL of a store on another filesystem


def as_location(location: str | Path) -> Location:
    """A local ``Path`` for plain paths and ``file://`` URLs; the URL string for any other protocol."""
    text = str(location)
    if text.startswith("file://"):
        return Path(text[len("file://"):])
    return text if "://" in text else Path(text)


def staging(location: Location) -> Location:
    """Where a store is written before it is complete: ``<path>.partial`` locally, in place on object stores."""
    return location.with_name(location.name + ".partial") if isinstance(location, Path) else location


def url_filesystem(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    try:
        return fsspec.core.url_to_fs(url)
    except (ImportError, ValueError) as error:
        raise StoreError(f"cannot open the store location {url!r}: {error}. Install the fsspec package for its "
                         f"protocol (s3fs for s3://, gcsfs for gs://, adlfs for az://) or give a local path") from None


def location_exists(location: Location) -> bool:
    if isinstance(location, Path):
        return location.exists()
    fs, path = url_filesystem(location)
    return fs.exists(f"{path}/zarr.json")


def remove_location(location: Location) -> None:
    """Delete a store; refused unless its metadata says it is one of ours (``check_ours_or_absent``)."""
    if not check_ours_or_absent(location):
        return
    if isinstance(location, Path):
        shutil.rmtree(location)
    else:
        fs, path = url_filesystem(location)
        fs.rm(path, recursive=True)


def _holds_anything(location: Location) -> bool:
    if isinstance(location, Path):
        return location.exists() and (not location.is_dir() or any(location.iterdir()))
    fs, path = url_filesystem(location)
    return fs.exists(path) and bool(fs.ls(path))


def is_our_store(location: Location) -> bool:
    """True when ``location`` is a zarr group whose attributes carry this pipeline's store format."""
    try:
        return zarr.open_group(location, mode="r").attrs.get("format") == FORMAT
    except Exception:  # not a zarr group at all (or an unreadable one): not ours
        return False


def check_ours_or_absent(location: Location) -> bool:
    """True when a store of ours is at ``location``, False when nothing (or an empty folder) is; anything
    else is a ``StoreError``: we never replace or delete what we did not write."""
    if not _holds_anything(location):
        return False
    if is_our_store(location):
        return True
    raise StoreError(f"{location} exists but is not a feature store of this pipeline (its zarr.json has no format "
                     f"{FORMAT!r}); nothing was deleted: move it away, or give the stage another --out")


def set_aside_unused_stores(pattern: str, t_steps: Sequence[int]) -> list[Path]:
    """Move this pipeline's stores of steps no longer in ``t_steps`` out of the stores' folder.

    ``pattern`` is the local store pattern the stage was given (``features/t{t}.zarr``). fit and evaluate
    depend on that folder (DVC cannot depend on a list of paths built from a param), so a store left
    by a removed step would change their hash and make results depend on the workspace's history.
    Such stores go to ``<folder>/unused/`` (git- and dvc-ignored); nothing is deleted, and only folders
    whose attributes say they are our stores are moved. Returns the new locations.
    """
    location = as_location(pattern.format(t=0))
    if not isinstance(location, Path):
        return []
    folder = location.parent
    prefix, _, suffix = Path(pattern).name.partition("{t}")
    moved = []
    for candidate in sorted(folder.glob(f"{prefix}*{suffix}")) if folder.is_dir() else []:
        step = candidate.name[len(prefix) : len(candidate.name) - len(suffix)]
        if not step.isdigit() or int(step) in t_steps or not (candidate / "zarr.json").is_file():
            continue
        try:
            ours = zarr.open_group(candidate, mode="r").attrs.get("format") == FORMAT
        except Exception:  # not a readable zarr group: not ours, leave it
            ours = False
        if ours:
            target = folder / "unused" / candidate.name
            target.parent.mkdir(exist_ok=True)
            replace_dir(candidate, target)
            moved.append(target)
    return moved

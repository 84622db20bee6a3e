"""Where stores live: local paths or fsspec URLs, their staging location while written, and removing or setting
aside only stores of ours."""
from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path

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


SET_ASIDE = "removed_steps"  # the extract stage keeps the stores of removed steps here (dvc-ignored)


def _steps_in_folder(pattern: str) -> tuple[Path, list[tuple[Path, int, bool]]] | None:
    """The local folder of ``pattern`` and its entries that name a step: ``(path, step, is a temporary)``."""
    location = as_location(pattern.format(t=0))
    if not isinstance(location, Path):
        return None
    folder = location.parent
    prefix, _, suffix = Path(pattern).name.partition("{t}")
    entries = []
    for candidate in sorted(folder.iterdir()) if folder.is_dir() else []:
        name = candidate.name
        for temporary in (".partial", ".old"):
            name = name.removesuffix(temporary)
        step = name[len(prefix) : len(name) - len(suffix)]
        if name.startswith(prefix) and name.endswith(suffix) and step.isdigit():
            entries.append((candidate, int(step), name != candidate.name))
    return folder, entries


def set_aside_stores_of_other_steps(pattern: str, t_steps: Sequence[int]) -> list[Path]:
    """Move this pipeline's stores of steps not in ``t_steps`` out of the folder of ``pattern``
    (``features/t{t}.zarr``) into its ``removed_steps/`` (dvc-ignored), and delete their interrupted writes.

    The extract stage owns that folder (a persisted DVC output) and calls this, so fit and evaluate, which
    depend on the folder (DVC cannot list paths built from a param), see exactly the stores of ``t_steps``;
    a step that comes back takes its store back (``take_back_set_aside_store``) instead of computing it again.
    Only folders whose attributes say they are our stores are touched; object-store patterns are left as they
    are. Returns the stores' new locations and the deleted temporaries.
    """
    found = _steps_in_folder(pattern)
    changed = []
    for path, step, temporary in found[1] if found else []:
        if step in t_steps or not is_our_store(path):
            continue
        if temporary:
            shutil.rmtree(path)
            changed.append(path)
        else:
            target = found[0] / SET_ASIDE / path.name
            target.parent.mkdir(exist_ok=True)
            replace_dir(path, target)
            changed.append(target)
    return changed


def take_back_set_aside_store(pattern: str, t: int) -> bool:
    """Move the store of step ``t`` set aside by ``set_aside_stores_of_other_steps`` back to its place, if there is
    one and its place is free; True when it did. The caller still checks that it is current."""
    location = as_location(pattern.format(t=t))
    if not isinstance(location, Path) or location.exists():
        return False
    kept = location.parent / SET_ASIDE / location.name
    if not is_our_store(kept):
        return False
    replace_dir(kept, location)
    return True

"""Feature stores: one zarr v3 group per diffusion step, holding per-pixel features of each split: the writer
(``create_or_resume``, ``StoreWriter``) and the reader (``open_store``, ``FeatureStore``, ``lazy_matrix``).
What a store records is in ``pipeline.features.record``; where stores live, in ``pipeline.features.locations``.

Layout of ``features/t<t>.zarr``::

    attrs: format, record (what made it: t, blocks, their channels and map sizes, layout, upsample, noise seed,
           checkpoint hash, ...), complete
    <split>/features  [N*H*W, D_t] float16 (layout pixels; split: train, val, test; val may hold no images),
                      chunks (rows_per_chunk, D_t), Blosc/zstd + bit-shuffle
    <split>/block<b>  [N, C_b, h_b, w_b] float16 (layout native: block b's map as the UNet made it, one per
                      stored block), chunks (1, C_b, h_b, w_b), same codecs
    <split>/labels    [N*H*W] uint8, chunks (rows_per_chunk,)  (255 = ignore)
    <split>/done      [N] uint8, chunks (1,): 1 once image i's rows are written
    <split> attrs: image_ids (stems, in row order), pixels_per_image

Either layout reads back as the same lazy ``[N*H*W, D]`` float16 matrix (``FeatureStore.features``): a
native store upsamples each row-chunk when it is read (``pipeline.features.upsample.upsample_rows``), which equals
the pixels layout to float16 rounding of the maps. A store may hold more blocks than an experiment uses;
readers select ``blocks`` among the record's.

``rows_per_chunk`` divides H*W, so each image owns whole chunks and concurrent writers never share one.
A store's location is a local path (``file://`` URLs count as local) or an fsspec URL such as
``s3://bucket/features/t50.zarr``, so that the workers of a dask cluster on other machines can write
to one place. Locally, writing goes to ``<path>.partial`` and the store is renamed to its final path
only when every image is written. Object stores have no atomic rename, so there the store is written in
place and only its ``complete`` flag, set last, makes it readable. Either way an interrupted extraction
resumes from the done flags, and readers refuse incomplete stores and stores whose record does not
match what the params ask for.
"""
from __future__ import annotations

import collections
import contextlib
import functools
import math
import sys
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np
import torch
import zarr
import zarr.codecs
from zarr.core.sync import sync

from pipeline.atomic import replace_dir
from pipeline.errors import NumericsError, PipelineError, StoreError
from pipeline.features.locations import (
    Location,
    as_location,
    check_ours_or_absent,
    is_our_store,
    location_exists,
    remove_location,
    staging,
)
from pipeline.features.record import FORMAT, LAYOUTS, StoreRecord, check_blocks_stored, params_record, rows_per_chunk
from pipeline.features.upsample import upsample_rows


def make_compressors(codec: str, clevel: int) -> list:
    if codec == "none":
        return []
    if codec == "zlib":
        return [zarr.codecs.GzipCodec(level=clevel)]
    # Bit-shuffle groups float16 exponent bits together. benchmarks/store_codecs.py on the built-in
    # model's activations: zstd-3 + bit-shuffle 1.17x at ~180 MB/s write, lz4 + bit-shuffle 1.12x at
    # ~280-430 MB/s, byte-shuffle zstd-3 1.10x; activations are close to incompressible.
    return [zarr.codecs.BloscCodec(cname=codec, clevel=clevel, shuffle=zarr.codecs.BloscShuffle.bitshuffle, typesize=2)]


class StoreWriter:
    """Writes a store image by image at ``staging(path)``; ``finish`` marks it complete and, for a local
    path, renames ``<path>.partial`` into place."""

    def __init__(self, path: Location, group: zarr.Group):
        self.path = path
        self.partial = staging(path)
        self.group = group
        self.record = StoreRecord.from_attrs(dict(group.attrs["record"]))

    @classmethod
    def reopen(cls, path: str | Path) -> StoreWriter:
        """Open the store that ``create_or_resume`` is writing (in another process, e.g. a dask worker)."""
        path = as_location(path)
        return cls(path, zarr.open_group(staging(path), mode="r+"))

    def pending(self, split: str) -> list[int]:
        done = self.group[f"{split}/done"][:]
        return [int(i) for i in np.flatnonzero(done == 0)]

    def image_ids(self, split: str) -> list[str]:
        return list(self.group[split].attrs["image_ids"])

    def write(self, split: str, index: int, features: np.ndarray | Sequence[np.ndarray], labels: np.ndarray) -> None:
        """Write image ``index``, then mark it done. ``features``: layout pixels, the rows ``[H*W, D] float16``;
        layout native, one map ``[C_b, h_b, w_b] float16`` per stored block, in the record's block order.
        ``labels [H*W] uint8``."""
        pixels = int(self.group[split].attrs["pixels_per_image"])
        rows = slice(index * pixels, (index + 1) * pixels)
        if self.record.layout == "native":
            if len(features) != len(self.record.blocks):
                raise StoreError(f"{self.partial}: {len(features)} maps for the {len(self.record.blocks)} stored "
                                 f"blocks {list(self.record.blocks)}")
            checked = [self._as_float16(block, split, index) for block in features]  # all checked before any write
            arrays = {f"block{block}": (index, maps) for block, maps in zip(self.record.blocks, checked)}
        else:
            arrays = {"features": (rows, self._as_float16(features, split, index))}
        arrays["labels"] = (rows, np.asarray(labels, dtype=np.uint8).reshape(-1))
        with zarr.config.set({"array.write_empty_chunks": True}):  # a runtime setting, taken when an array is opened
            for name, (where, values) in arrays.items():
                self.group[f"{split}/{name}"][where] = values
        self.group[f"{split}/done"][index] = 1

    def _as_float16(self, features: np.ndarray, split: str, index: int) -> np.ndarray:
        """The rows as float16; NaN, inf or values past float16's +-65504 (which would become inf) are refused."""
        with np.errstate(over="ignore"):
            rows = np.asarray(features, dtype=np.float16)
        if rows.size and not (np.isfinite(rows.max()) and np.isfinite(rows.min())):  # max/min carry NaN and inf
            source = np.asarray(features)
            overflow = bool(np.isfinite(source.max()) and np.isfinite(source.min()))
            what = (f"values up to {float(np.abs(source).max()):.4g}, beyond float16's 65504" if overflow
                    else "NaN or infinite values")
            raise NumericsError(f"store {self.partial}: {split} image {index} "
                                f"({self.image_ids(split)[index]}) has {what}; nothing of it was written. Likely "
                                f"cause: a checkpoint whose activations are not normalised or hold NaN (check its "
                                f"flags and pretraining loss)")
        return rows

    def finish(self) -> Location:
        missing = {split: len(self.pending(split)) for split in self.group.group_keys()}
        if any(missing.values()):
            raise StoreError(f"{self.partial}: images not yet written {missing}; cannot finish the store")
        if isinstance(self.path, Path):
            check_ours_or_absent(self.path)
        self.group.attrs["complete"] = True
        if isinstance(self.path, Path):
            replace_dir(self.partial, self.path)
        return self.path


@contextlib.contextmanager
def background_writes(writer: StoreWriter, depth: int = 2) -> Iterator[Callable[[str, int, np.ndarray, np.ndarray], None]]:
    """Compress and write images on one worker thread while the caller computes the next ones.

    Yields ``submit(split, index, features, labels)``; at most ``depth`` images wait in memory, and an
    error in a write (disk full) is raised in the caller at the next submit or on exit.
    """
    pending: collections.deque[Future] = collections.deque()
    with ThreadPoolExecutor(max_workers=1) as pool:

        def submit(split: str, index: int, features: np.ndarray, labels: np.ndarray) -> None:
            pending.append(pool.submit(writer.write, split, index, features, labels))
            while len(pending) > depth:
                pending.popleft().result()

        try:
            yield submit
        finally:
            while pending:
                pending.popleft().result()


def _why_not_resumable(group: zarr.Group, path: Location, record: StoreRecord,
                       image_ids: dict[str, Sequence[str]]) -> str | None:
    """None when the unfinished store in ``group`` was started with this record and these images, else why not."""
    try:
        if not isinstance(path, Path) and group.attrs.get("complete"):
            return "it is a finished store, and its stage is being rerun"
        started = StoreRecord.from_attrs(dict(group.attrs["record"]))
        same_but_inputs = replace(started, inputs_sha256="") == replace(record, inputs_sha256="")
        if started.inputs_sha256 != record.inputs_sha256 and same_but_inputs:
            return ("the images or masks changed since it was started (inputs_sha256 differs)" if started.inputs_sha256
                    else "it was started before stores recorded a digest of their inputs")
        if started != record:
            changed = [f.name for f in fields(StoreRecord) if getattr(started, f.name) != getattr(record, f.name)]
            return f"it was started with other {', '.join(changed)}"
        if sorted(group.group_keys()) != sorted(image_ids) or any(
                list(group[split].attrs["image_ids"]) != list(ids) for split, ids in image_ids.items()):
            return "it was started for other images"
    except (KeyError, TypeError, ValueError) as error:
        return f"its record cannot be read ({error!r})"
    return None


def finished_store_is_current(path: str | Path, record: StoreRecord, image_ids: dict[str, Sequence[str]],
                              provenance: str) -> bool:
    """True when a finished, undamaged store of ours at ``path`` was made with this record, these images and
    this ``provenance`` (a digest of the extraction code and every setting that changes the stored bytes), so
    the extract stage may keep it instead of computing it again."""
    path = as_location(path)
    if not provenance or not location_exists(path) or not is_our_store(path):
        return False
    group = zarr.open_group(path, mode="r")
    if not group.attrs.get("complete") or group.attrs.get("provenance") != provenance:
        return False
    if _why_not_resumable(group, Path(), record, image_ids) is not None:
        return False
    try:
        check_chunks(group, path)
    except StoreError:
        return False
    return all((group[f"{split}/done"][:] != 0).all() for split in image_ids)


def create_or_resume(
    path: str | Path,
    record: StoreRecord,
    image_ids: dict[str, Sequence[str]],
    *,
    chunk_pixels: int,
    codec: str,
    clevel: int,
    provenance: str = "",
) -> StoreWriter:
    """Open the unfinished store at ``staging(path)`` to resume if the same record, images and ``provenance``
    (``finished_store_is_current``) made it, else start afresh (a finished store at a URL is rewritten: its
    stage is being rerun)."""
    path = as_location(path)
    partial = staging(path)
    pixels = record.image_size**2
    if isinstance(path, Path):
        check_ours_or_absent(path)  # the final store is replaced at the end: it must be ours, or nothing
    if check_ours_or_absent(partial):
        group = zarr.open_group(partial, mode="r+")
        reason = _why_not_resumable(group, path, record, image_ids)
        if reason is None and group.attrs.get("provenance", "") != provenance:
            reason = "it was started by other extraction code or settings (its provenance differs)"
        if reason is None:
            return StoreWriter(path, group)
        print(f"{partial}: not resuming the interrupted extraction, starting afresh: {reason}", file=sys.stderr)
        remove_location(partial)
    # The attributes come with the group's first metadata write, so a leftover of ours always says it is ours.
    group = zarr.open_group(partial, mode="w", zarr_format=3, attributes={
        "format": FORMAT, "record": record.to_attrs(), "complete": False, "all_chunks_stored": True,
        "provenance": provenance})
    chunk_rows = rows_per_chunk(chunk_pixels, pixels)
    compressors = make_compressors(codec, clevel)
    if record.layout not in LAYOUTS:
        raise StoreError(f"store layout {record.layout!r} is not one of {list(LAYOUTS)}")
    if record.layout == "native" and not (len(record.block_channels) == len(record.block_sizes) == len(record.blocks)):
        raise StoreError(f"a native store needs every stored block's channels and map size; record {record}")
    for split, ids in image_ids.items():
        sub = group.create_group(split)
        sub.attrs.update({"image_ids": list(ids), "pixels_per_image": pixels})
        rows = len(ids) * pixels
        # StoreWriter.write stores every chunk, even an all-zero one, so a chunk missing from a finished store is
        # damage (zarr would read it back as zeros); open_store checks.
        if record.layout == "native":
            for block, channels, side in zip(record.blocks, record.block_channels, record.block_sizes):
                sub.create_array(f"block{block}", shape=(len(ids), channels, side, side), chunks=(1, channels, side, side),
                                 dtype="float16", compressors=compressors, fill_value=0)
        else:
            sub.create_array("features", shape=(rows, record.feature_dim), chunks=(chunk_rows, record.feature_dim),
                             dtype="float16", compressors=compressors, fill_value=0)
        sub.create_array("labels", shape=(rows,), chunks=(chunk_rows,), dtype="uint8", compressors=compressors,
                         fill_value=0)
        sub.create_array("done", shape=(len(ids),), chunks=(1,), dtype="uint8", compressors=None, fill_value=0)
    return StoreWriter(path, group)


class CheckedChunks:
    """A zarr array whose reads name the store and chunk when a chunk cannot be decoded (a damaged file)."""

    def __init__(self, array: zarr.Array, path: Location, name: str):
        self.array, self.path, self.name = array, path, name
        self.shape, self.dtype, self.ndim = array.shape, array.dtype, array.ndim

    def __getitem__(self, selection: Any) -> np.ndarray:
        try:
            return self.array[selection]
        except PipelineError:
            raise
        except Exception as error:  # codecs raise RuntimeError, ValueError, zlib.error, ...: all mean damage here
            raise StoreError(f"feature store {self.path}: chunk {self._chunk_key(selection)} of {self.name} cannot be "
                             f"decoded ({type(error).__name__}: {error}); the store is damaged: delete it and rerun "
                             f"its extract stage") from None

    def _chunk_key(self, selection: Any) -> str:
        """The key of the (first) chunk a read touches: dask reads chunk by chunk, so it is that chunk."""
        first = selection[0] if isinstance(selection, tuple) else selection
        start = (first.start or 0) if isinstance(first, slice) else int(first)
        return f"c/{start // self.array.chunks[0]}" + "/0" * (self.ndim - 1)


def missing_chunks(array: zarr.Array) -> list[str]:
    """Chunk keys of ``array`` that its store does not hold (zarr would read them back as the fill value)."""
    if array.nchunks_initialized == array.nchunks:
        return []
    grid = [math.ceil(size / chunk) for size, chunk in zip(array.shape, array.chunks)]
    keys = ["c/" + "/".join(map(str, coords)) for coords in np.ndindex(*grid)]
    return [key for key in keys if not sync(array.store.exists(f"{array.path}/{key}"))]


def check_chunks(group: zarr.Group, path: Location) -> None:
    """Every chunk of a finished store must be stored (stores made since ``all_chunks_stored`` write all-zero ones)."""
    if not group.attrs.get("all_chunks_stored"):
        return
    for split in group.group_keys():
        for name in sorted(set(group[split].array_keys()) - {"done"}):  # features or block<b>, and labels
            missing = missing_chunks(group[f"{split}/{name}"])
            if missing:
                raise StoreError(f"feature store {path} is damaged: {len(missing)} chunk(s) of {split}/{name} are "
                                 f"missing ({', '.join(missing[:5])}), which zarr would read as zeros; delete the store "
                                 f"and rerun its extract stage")


class FeatureStore:
    """A complete store opened for reading; arrays come back as lazy dask arrays."""

    def __init__(self, path: Location, group: zarr.Group):
        self.path = path
        self.group = group
        self.record = StoreRecord.from_attrs(dict(group.attrs["record"]))

    def features(self, split: str, blocks: Sequence[int] | None = None) -> da.Array:
        """The lazy ``[N*H*W, D] float16`` matrix of ``split``, of ``blocks`` (a subset of the stored blocks, in
        any order; None = all stored ones), chunks of ``rows_per_chunk`` rows in either layout."""
        # An RGB baseline's columns are pixel colours, not blocks (it records no block channels): it is read whole
        # whatever blocks asks. The DDPM's, the MAE's and SwAV's stores hold blocks, and give those asked.
        whole_store = blocks is None or not self.record.block_channels
        blocks = self.record.blocks if whole_store else tuple(blocks)
        check_blocks_stored(self.record, blocks, self.path)
        if self.record.layout == "native":
            matrix = NativeMatrix(self, split, blocks)
            return da.from_array(matrix, chunks=(self.group[f"{split}/labels"].chunks[0], matrix.shape[1]),
                                 name=f"store-{self.path}-{split}-native-{'-'.join(map(str, blocks))}", lock=False,
                                 asarray=True)
        whole = self._lazy(f"{split}/features")
        if blocks == self.record.blocks:
            return whole
        columns = self.record.columns()
        return da.concatenate([whole[:, slice(*columns[block])] for block in blocks], axis=1)

    def labels(self, split: str) -> da.Array:
        return self._lazy(f"{split}/labels")

    def _lazy(self, name: str) -> da.Array:
        array = self.group[name]
        return da.from_array(CheckedChunks(array, self.path, name), chunks=array.chunks, name=f"store-{self.path}-{name}",
                             lock=False, asarray=True)

    def image_ids(self, split: str) -> list[str]:
        return list(self.group[split].attrs["image_ids"])

    def pixels_per_image(self, split: str) -> int:
        return int(self.group[split].attrs["pixels_per_image"])


class NativeMatrix:
    """A native store's split as the array-like ``[N*H*W, D] float16`` matrix that the pixels layout stores:
    ``__getitem__`` reads the maps of the images a row range touches and upsamples only those rows. The last
    images' maps stay decoded (a few MB each), since consecutive chunks usually come from one image."""

    def __init__(self, store: FeatureStore, split: str, blocks: tuple[int, ...]):
        self.store, self.split, self.blocks = store, split, blocks
        self.arrays = [CheckedChunks(store.group[f"{split}/block{block}"], store.path, f"{split}/block{block}")
                       for block in blocks]
        self.size = store.record.image_size
        self.pixels = store.pixels_per_image(split)
        self.images = len(store.image_ids(split))
        widths = dict(zip(store.record.blocks, store.record.block_channels))
        self.shape = (self.images * self.pixels, sum(widths[block] for block in blocks))
        self.dtype, self.ndim = np.dtype("float16"), 2
        self.maps = functools.lru_cache(maxsize=2)(self._maps)

    def _maps(self, image: int) -> list[torch.Tensor]:
        return [torch.from_numpy(np.asarray(array[image])) for array in self.arrays]

    def __getitem__(self, selection: Any) -> np.ndarray:
        rows, columns = selection if isinstance(selection, tuple) else (selection, slice(None))
        start, stop, step = rows.indices(self.shape[0]) if isinstance(rows, slice) else (int(rows), int(rows) + 1, 1)
        parts = [np.zeros((0, self.shape[1]), np.float16)]
        for image in range(start // self.pixels, -(-stop // self.pixels) if stop > start else 0):
            first, last = max(start, image * self.pixels) - image * self.pixels, min(stop, (image + 1) * self.pixels) - image * self.pixels
            top, bottom = first // self.size, -(-last // self.size)
            strip = upsample_rows(self.maps(image), self.size, top, bottom, self.store.record.upsample, torch.float16)
            parts.append(strip[first - top * self.size : last - top * self.size].numpy())
        out = (parts[1] if len(parts) == 2 else np.concatenate(parts))[::step]  # one image's rows: no copy
        return out[0][columns] if not isinstance(rows, slice) else out[:, columns]


def open_store(path: str | Path, expected: dict[str, Any]) -> FeatureStore:
    """Open a finished store and check its record against ``expected`` (a subset of StoreRecord fields)."""
    path = as_location(path)
    if not location_exists(path):
        hint = (" (an interrupted extraction left a .partial store: rerun the extract stage)"
                if isinstance(path, Path) and staging(path).exists() else "")
        raise StoreError(f"feature store {path} does not exist{hint}; run `dvc repro` to extract features")
    try:
        group = zarr.open_group(path, mode="r")
        attrs = dict(group.attrs)
    except Exception as error:
        raise StoreError(f"feature store {path} is not a readable zarr group ({error}); rerun its extract stage") from None
    if attrs.get("format") != FORMAT:
        raise StoreError(f"{path} is not a feature store of this pipeline (format {attrs.get('format')!r})")
    if not attrs.get("complete") or any((group[f"{s}/done"][:] == 0).any() for s in group.group_keys()):
        raise StoreError(f"feature store {path} is incomplete (its writing was interrupted); rerun its extract stage")
    check_chunks(group, path)
    store = FeatureStore(path, group)
    actual = store.record.to_attrs()
    for key, value in expected.items():
        want = list(value) if isinstance(value, tuple) else value
        if actual[key] != want:
            raise StoreError(
                f"feature store {path} was made with {key}={actual[key]!r} but the params ask for {want!r}; "
                f"rerun `dvc repro` so the extract stage rebuilds it"
            )
    return store


def open_step_stores(pattern: str, params) -> list[FeatureStore]:
    """The stores of ``params.t_steps`` at ``pattern`` (e.g. ``features/t{t}.zarr``), each checked against what
    ``params`` ask of it (``params_record``): what fit and evaluate read, touching nothing."""
    return [open_store(pattern.format(t=t), params_record(params, t)) for t in params.t_steps]


def lazy_matrix(stores: Sequence[FeatureStore], split: str,
                blocks: Sequence[int] | None = None) -> tuple[da.Array, da.Array]:
    """Per-step stores -> one lazy ``[pixels, sum D_t]`` float16 matrix (steps in the given order, ``blocks`` of
    each: None = all the stores hold) and labels."""
    if not stores:
        raise StoreError("no feature stores given")
    first = stores[0]
    for store in stores[1:]:
        if store.image_ids(split) != first.image_ids(split):
            raise StoreError(f"{store.path} and {first.path} hold different {split} images; rerun `dvc repro`")
        if store.record.checkpoint_sha256 != first.record.checkpoint_sha256:
            raise StoreError(f"{store.path} and {first.path} come from different checkpoints; rerun `dvc repro`")
    matrix = da.concatenate([store.features(split, blocks) for store in stores], axis=1)
    return matrix, first.labels(split)



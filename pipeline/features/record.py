"""What a feature store records about how it was made (``StoreRecord``), what readers demand of it
(``params_record``), what an ensemble fit on stores records (``fit_record``), and the row chunking every
store shares."""
from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import StoreError
from pipeline.hashing import file_sha256

FORMAT = "ddpm-segmentation-features/1"


SPLITS = ("train", "val", "test")


LAYOUTS = ("pixels", "native")


@dataclass(frozen=True)
class StoreRecord:
    """What made a store; compared field by field against the params a reader expects."""

    t: int
    blocks: tuple[int, ...]
    upsample: str
    noise_seed: int
    stochastic_noise: bool
    # sha256 of the checkpoint whose weights made the features (pipeline.features.compute.feature_checkpoint):
    # the DDPM's, or for representation mae or swav its pretraining stage's encoder (the RGB baselines record the DDPM's)
    checkpoint_sha256: str
    image_size: int
    feature_dim: int
    # sha256 over the split, stem, image bytes and mask bytes of every image (``inputs_sha256``): a resume
    # after the images or masks changed starts afresh. "" = not recorded (stores made before it existed).
    inputs_sha256: str = ""
    # FeaturesConfig.representation_id() (ddpm, rgb, rgb_patch<k>, mae, swav) and noise_draws; stores made before they
    # existed hold one draw of the DDPM's features.
    representation: str = "ddpm"
    noise_draws: int = 1
    layout: str = "pixels"  # pipeline.config.StoreLayout's value
    # Per stored block (in ``blocks`` order): its channels, i.e. its columns' width in the matrix, and the side
    # of its map. () = not recorded (stores made before them): only the whole matrix can be read then.
    block_channels: tuple[int, ...] = ()
    block_sizes: tuple[int, ...] = ()

    def to_attrs(self) -> dict[str, Any]:
        out = asdict(self)
        for name in TUPLE_FIELDS:
            out[name] = list(out[name])
        return out

    @classmethod
    def from_attrs(cls, attrs: dict[str, Any]) -> StoreRecord:
        values = {f.name: attrs[f.name] if f.default is MISSING else attrs.get(f.name, f.default) for f in fields(cls)}
        for name in TUPLE_FIELDS:
            values[name] = tuple(values[name])
        return cls(**values)

    def columns(self) -> dict[int, tuple[int, int]]:
        """Each stored block's column range ``(start, stop)`` in this store's ``[pixels, feature_dim]`` matrix."""
        stops = np.cumsum(self.block_channels, dtype=np.int64)
        return {block: (int(stop) - width, int(stop)) for block, width, stop in zip(self.blocks, self.block_channels, stops)}


TUPLE_FIELDS = ("blocks", "block_channels", "block_sizes")


def params_record(params, t: int) -> dict[str, Any]:
    """The record fields that ``params`` (a ``pipeline.config.Params``) set for the store of step ``t``: the
    writer makes its record from them (``StoreRecord(**params_record(params, t), ...)``), and a reader
    demands exactly them of a store it opens, so the two can never disagree about what a store must be."""
    features = params.features
    return {"t": t, "blocks": tuple(features.store_blocks), "upsample": features.upsample.value,
            "noise_seed": features.noise_seed, "stochastic_noise": features.stochastic_noise,
            "image_size": params.dataset.image_size, "layout": features.layout.value,
            "representation": features.representation_id(), "noise_draws": features.noise_draws}


def fit_record(params, checkpoint_sha256: str) -> dict[str, Any]:
    """What an ensemble is fit on, and what every reader of it demands (``save_ensemble`` /
    ``load_ensemble``): the steps and blocks of its columns, the checkpoint, and every store-record field that
    changes the feature values (upsample, noise, representation, image size). Not the layout or store_blocks:
    they change where the same values are kept, not the values."""
    record = params_record(params, 0)
    for key in ("t", "blocks", "layout"):
        del record[key]
    return {"t_steps": list(params.t_steps), "blocks": list(params.blocks), "checkpoint_sha256": checkpoint_sha256,
            **record}


def check_blocks_stored(record: StoreRecord, blocks: Sequence[int], path: Path | str) -> None:
    """``StoreError`` naming both lists when ``blocks`` are not all among the blocks the store holds."""
    missing = [block for block in blocks if block not in record.blocks]
    if missing:
        raise StoreError(
            f"feature store {path} holds blocks {list(record.blocks)} (features.store_blocks) but blocks "
            f"{list(blocks)} asks for {missing} too; choose blocks within {list(record.blocks)}, or set "
            f"features.store_blocks to {sorted(set(record.blocks) | set(blocks))} and rerun `dvc repro` (re-extracts)")
    if tuple(blocks) != record.blocks and not record.block_channels:
        raise StoreError(f"feature store {path} does not record its blocks' channels (an older store), so blocks "
                         f"{list(blocks)} cannot be selected from its {list(record.blocks)}; rerun its extract stage")


def rows_per_chunk(chunk_pixels: int, pixels_per_image: int) -> int:
    """The largest row count <= chunk_pixels that divides an image's pixel count (each image owns its chunks)."""
    return math.gcd(chunk_pixels, pixels_per_image)


def inputs_sha256(files: dict[str, Sequence[tuple[str, Path, Path | None]]]) -> str:
    """One sha256 over ``{split: [(stem, image path, mask path or None)]}``: split names, stems and file bytes."""
    digest = hashlib.sha256()
    for split in sorted(files):
        for stem, image, mask in files[split]:
            digest.update(f"{split}/{stem}:{file_sha256(image)}:{file_sha256(mask) if mask else '-'};".encode())
    return digest.hexdigest()


# Settings of the features section that only place the work (where, with which credentials): a store is the same
# whichever they are, so they are left out of its provenance.
PLACEMENT_KEYS = ("workers", "scheduler", "tls_ca_file", "tls_cert", "tls_key")


def extraction_provenance(params, record: StoreRecord, code_sha256: str) -> str:
    """A digest of everything that makes a store's bytes: its record but the step (checkpoint and inputs
    included), every setting of the features section but placement, the device, and the extraction code
    (``code_sha256``, the hash of the extract stage's import closure). The extract stage keeps a finished
    store only when this is unchanged, so a rerun for another ``t_steps`` reuses stores, and a rerun for
    changed code or settings rebuilds them."""
    features = {key: value for key, value in params.features.model_dump(mode="json").items()
                if key not in PLACEMENT_KEYS}
    content = {"record": {**record.to_attrs(), "t": None}, "features": features,
               "device": params.runtime.device, "code": code_sha256}
    return hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()

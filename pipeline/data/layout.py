"""The paper's dataset layout: listing, writing and loading it.

Layout (as ddpm-segmentation's ``datasets.tar.gz``)::

    <root>/real/train/<stem>.png|jpg   + <stem>.npy  (H x W integer mask, 255 = ignore)
                                         (or masks/<stem>.png, or a COCO file: ``dataset.labels``, pipeline/data/labels.py)
    <root>/real/val/...     (optional: validation images; else ``dataset.val_images`` are held out of train)
    <root>/real/test/...
    <root>/unlabeled/<stem>.png|jpg    (optional: images for DDPM pretraining)

Images are returned as ``[H, W, 3] uint8``; ``to_model_input`` maps them to ``[N, 3, H, W] float32`` in
[-1, 1] (``x / 127.5 - 1``, the paper's normalisation). Masks are ``[H, W] uint8``.
"""
from __future__ import annotations

import enum
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from pipeline.data.images import read_rgb
from pipeline.enums import LabelFormat
from pipeline.errors import DatasetError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
MASK_FOLDER = "masks"  # dataset.labels png: real/<split>/masks/<stem>.png beside real/<split>/<stem>.jpg


def png_mask_path(image_path: Path) -> Path:
    """Where the PNG mask of ``real/<split>/<stem>.jpg`` lives: ``real/<split>/masks/<stem>.png``."""
    return image_path.parent / MASK_FOLDER / f"{image_path.stem}.png"


class Split(str, enum.Enum):
    """train fits the ensemble; val scores every choice (blocks, steps, epochs, defaults); test is scored
    by the evaluate stage alone, for the final number."""

    TRAIN = "train"
    VAL = "val"
    TEST = "test"


@dataclass(frozen=True)
class Example:
    stem: str
    image_path: Path
    mask_path: Path | None


def split_dir(root: Path, split: Split | str) -> Path:
    return Path(root) / "real" / Split(split).value


def list_images(folder: Path) -> list[Path]:
    """The images of a folder, sorted; two images for one stem (``a.png`` and ``a.jpg``) are an error, since
    masks, store rows and predictions are keyed by stem."""
    paths = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    by_stem: dict[str, list[Path]] = {}
    for path in paths:
        by_stem.setdefault(path.stem, []).append(path)
    clashes = [names for names in by_stem.values() if len(names) > 1]
    if clashes:
        shown = "; ".join(" and ".join(str(p) for p in names) for names in clashes[:5])
        raise DatasetError(f"{len(clashes)} stem(s) of {folder} have more than one image: {shown}; each image needs "
                           f"its own stem (its mask is <stem>.npy): remove or rename all but one")
    return paths


def list_examples(root: Path, split: Split | str, *, with_masks: bool = True, allow_empty: bool = False,
                  labels: LabelFormat = LabelFormat.NPY, coco_file: Path | None = None) -> list[Example]:
    """The images of a split (sorted by name) with their masks; ``allow_empty`` accepts a missing or
    empty folder (a prepared dataset's val split may hold no images). A mask is ``<stem>.npy`` (the
    prepared layout), ``masks/<stem>.png`` (``labels`` png) or ``coco_file`` (coco; its entries are
    checked against the folder by ``coco_files``)."""
    folder, labels = split_dir(root, split), LabelFormat(labels)
    if allow_empty and not folder.is_dir():
        return []
    if not folder.is_dir():
        raise DatasetError(
            f"{folder} does not exist; a dataset needs real/train and real/test folders of images with "
            f"same-stem .npy masks (set dataset.root to such a folder)"
        )
    examples = []
    for image_path in list_images(folder):
        mask_path = {LabelFormat.NPY: image_path.with_suffix(".npy"), LabelFormat.PNG: png_mask_path(image_path),
                     LabelFormat.COCO: coco_file}[labels]
        if with_masks and labels is LabelFormat.COCO and not (coco_file and coco_file.is_file()):
            raise DatasetError(f"COCO file {coco_file} does not exist; put it there or set dataset.coco_file (relative "
                               f"to dataset.root, {{split}} for one file per split): the masks of {folder}'s images")
        if with_masks and not mask_path.is_file():
            raise DatasetError(
                f"image {image_path} has no mask {mask_path.relative_to(folder)}; add it or remove the image from {folder}"
            )
        examples.append(Example(image_path.stem, image_path, mask_path if with_masks else None))
    if not examples and not allow_empty:
        raise DatasetError(f"{folder} holds no images (.png/.jpg); put the split's images and masks there")
    return examples


def write_example(folder: Path, stem: str, image: np.ndarray, mask: np.ndarray | None) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(folder / f"{stem}.png")
    if mask is not None:
        np.save(folder / f"{stem}.npy", mask.astype(np.uint8))


def load_split(root: Path, split: Split | str) -> tuple[list[str], np.ndarray, np.ndarray]:
    """A prepared split: stems, ``[N, S, S, 3] uint8`` images and ``[N, S, S] uint8`` masks."""
    examples = list_examples(root, split)
    images = np.stack([read_rgb(e.image_path) for e in examples])
    masks = np.stack([np.load(e.mask_path) for e in examples])
    return [e.stem for e in examples], images, masks


class ImageFiles:
    """Same-size images of a folder, read from disk when indexed: nothing but the paths stays in RAM.

    ``images[indices]`` -> ``[B, H, W, 3] uint8`` in the order given, decoded by a few threads (PIL's
    decoders release the GIL). Pretraining draws its batches from this, so the unlabeled set can be far
    larger than memory.
    """

    def __init__(self, paths: Sequence[Path], threads: int = 4):
        self.paths = list(paths)
        self.threads = threads
        self._pool: ThreadPoolExecutor | None = None

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, indices: Sequence[int] | np.ndarray) -> np.ndarray:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=self.threads)
        arrays = list(self._pool.map(read_rgb, [self.paths[int(i)] for i in indices]))
        shapes = {array.shape for array in arrays}
        if len(shapes) > 1:
            raise DatasetError(f"images of {self.paths[0].parent} differ in size {sorted(shapes)}; rerun the prepare stage")
        return np.stack(arrays)


def load_unlabeled(root: Path) -> ImageFiles:
    """The prepared unlabeled images (``<root>/unlabeled``), read lazily."""
    folder = root / "unlabeled"
    paths = list_images(folder) if folder.is_dir() else []
    if not paths:
        raise DatasetError(
            f"{folder} holds no images to pretrain the DDPM on; add unlabeled images there, "
            f"or import a trained model with ddpm.checkpoint"
        )
    return ImageFiles(paths)

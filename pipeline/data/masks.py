"""Mask files to class arrays: .npy masks read safely, checked against their image (size, class range), small
classes dropped."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.data.images import TRANSPOSING_ORIENTATIONS, crop_square, displayed_size
from pipeline.enums import NonSquarePolicy
from pipeline.errors import DatasetError


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
    mask = crop_square(mask.astype(np.uint8), path, non_square)
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

"""Image files to arrays: every mode, bit depth and EXIF orientation people's files come in, read as [H, W, 3]
uint8; prepare's square rule; arrays to the model's input."""
from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from pipeline.enums import NonSquarePolicy
from pipeline.errors import DatasetError

EXIF_ORIENTATION = 0x0112


TRANSPOSING_ORIENTATIONS = (5, 6, 7, 8)  # these swap width and height


def crop_square(array: np.ndarray, path: Path, policy: NonSquarePolicy) -> np.ndarray:
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
    image = crop_square(read_rgb(path), path, non_square)
    if image.shape[0] != image_size:
        image = np.asarray(Image.fromarray(image).resize((image_size, image_size), Image.BICUBIC))
    return image


def to_model_input(images: np.ndarray) -> torch.Tensor:
    """``[N, H, W, 3] uint8`` -> ``[N, 3, H, W] float32`` in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1

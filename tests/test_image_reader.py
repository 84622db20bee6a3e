"""The image and mask readers over what people keep: every Pillow mode, EXIF-rotated photos, 16-bit
PNGs, two images for one stem, masks in other containers and dtypes (property tests with hypothesis)."""
from __future__ import annotations

import io
import pickle
import struct
import tempfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from PIL import Image

from pipeline.data import images as data
from pipeline.data.images import read_rgb, rgb_array
from pipeline.data.layout import list_images
from pipeline.data.masks import load_mask, read_npy
from pipeline.enums import NonSquarePolicy
from pipeline.errors import DatasetError

SIZES = st.tuples(st.integers(1, 9), st.integers(1, 9))  # (height, width)
FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def image_of(mode: str, values: np.ndarray) -> Image.Image:
    """A Pillow image of ``mode`` holding ``values`` ([H, W] or [H, W, C], the mode's own value range)."""
    if mode == "1":
        return Image.fromarray(values.astype(bool))
    if mode == "P":  # palette: index i is the colour (i, 255 - i, i // 2)
        image = Image.frombytes("P", values.shape[::-1], values.astype(np.uint8).tobytes())
        image.putpalette([channel for i in range(256) for channel in (i, 255 - i, i // 2)])
        return image
    if mode == "CMYK":
        return Image.frombytes("CMYK", values.shape[1::-1], values.astype(np.uint8).tobytes())
    dtypes = {"I;16": np.uint16, "I": np.int32, "F": np.float32}
    return Image.fromarray(values.astype(dtypes.get(mode, np.uint8)), None if mode in dtypes else mode)


CHANNELS = {"1": 0, "L": 0, "LA": 2, "P": 0, "RGB": 3, "RGBA": 4, "CMYK": 4, "I;16": 0, "I": 0, "F": 0}
TOPS = {"I;16": 65535, "I": 65535, "F": 1.0}


@st.composite
def mode_images(draw):
    mode = draw(st.sampled_from(list(CHANNELS)))
    height, width = draw(SIZES)
    shape = (height, width, CHANNELS[mode]) if CHANNELS[mode] else (height, width)
    if mode == "F":
        values = draw(arrays(np.float32, shape, elements=st.floats(0, 1, width=32)))
    else:
        values = draw(arrays(np.int64, shape, elements=st.integers(0, TOPS.get(mode, 255))))
    return mode, values


def expected_rgb(mode: str, values: np.ndarray) -> np.ndarray:
    """What each mode should read as, computed independently of the reader."""
    if mode in ("I;16", "I"):
        grey = np.floor(values / 257 + 0.5)
    elif mode == "F":
        grey = np.floor(values.astype(np.float64) * 255 + 0.5)
    elif mode == "1":
        grey = np.where(values > 0, 255, 0)
    elif mode == "L":
        grey = values
    elif mode == "LA":
        grey = values[..., 0]
    elif mode == "P":
        return np.stack([values, 255 - values, values // 2], axis=-1).astype(np.uint8)
    elif mode in ("RGB", "RGBA"):
        return values[..., :3].astype(np.uint8)
    else:  # CMYK: each ink and the black multiply, (255 - ink) * (255 - k) / 255
        inks, black = values[..., :3].astype(np.float64), values[..., 3:].astype(np.float64)
        return np.floor((255 - inks) * (255 - black) / 255 + 0.5).astype(np.uint8)
    return np.repeat(grey.astype(np.uint8)[..., None], 3, axis=-1)


@FAST
@given(mode_images())
def test_every_pillow_mode_reads_as_8bit_rgb_with_the_expected_values(case):
    mode, values = case
    image = image_of(mode, values)
    assert image.mode == mode
    rgb = rgb_array(image, f"x.{mode}")
    assert rgb.dtype == np.uint8 and rgb.shape == (*values.shape[:2], 3)
    np.testing.assert_array_equal(rgb, expected_rgb(mode, values))


SAVABLE = {"1": "png", "L": "png", "LA": "png", "P": "png", "RGB": "png", "RGBA": "png", "I;16": "png", "CMYK": "tiff"}


@FAST
@given(mode_images().filter(lambda case: case[0] in SAVABLE))
def test_files_in_every_savable_mode_read_back_as_their_values(case):
    mode, values = case
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"x.{SAVABLE[mode]}"
        image_of(mode, values).save(path)
        np.testing.assert_array_equal(read_rgb(path), expected_rgb(mode, values))


def test_eight_bit_values_stretched_to_16_bits_come_back_exactly():
    values = np.arange(256, dtype=np.uint16).reshape(16, 16)
    np.testing.assert_array_equal(rgb_array(Image.fromarray(values * 257))[..., 0], values)


@pytest.mark.parametrize("mode, values, message", [
    ("I", np.array([[0, 70000]]), "holds values in [0, 70000]"),
    ("I", np.array([[-1, 3]]), "holds values in [-1, 3]"),
    ("F", np.array([[0.0, np.nan]]), "holds NaN or infinite values"),
    ("F", np.array([[0.0, 300.0]]), "holds values in [0, 300]"),
])
def test_wide_images_outside_a_known_range_are_refused(mode, values, message):
    with pytest.raises(DatasetError, match=message.replace("[", r"\[").replace("]", r"\]")):
        rgb_array(image_of(mode, values), "x.tif")


def test_each_kind_of_conversion_is_said_once(capsys, monkeypatch):
    monkeypatch.setattr(data, "_said", set())
    for _ in range(3):
        rgb_array(Image.fromarray(np.zeros((2, 2), np.uint16)), "a.png")
        rgb_array(Image.new("L", (2, 2)), "b.png")
    err = capsys.readouterr().err
    assert err.count("16-bit greyscale images (I;16) are scaled") == 1 and err.count("greyscale (L)") == 1


def exif_jpeg(path: Path, pixels: np.ndarray, orientation: int) -> None:
    image = Image.fromarray(pixels)
    exif = image.getexif()
    exif[data.EXIF_ORIENTATION] = orientation
    image.save(path, quality=100, subsampling=0, exif=exif)


def test_exif_rotation_is_applied_and_masks_are_checked_against_the_displayed_size(tmp_path):
    stored = np.zeros((8, 16, 3), np.uint8)
    stored[:, :8] = 255  # the left half is white as stored; orientation 6 shows it rotated 90 degrees clockwise
    exif_jpeg(tmp_path / "a.jpg", stored, orientation=6)
    shown = read_rgb(tmp_path / "a.jpg")
    assert shown.shape == (16, 8, 3)
    assert shown[:8].mean() > 200 and shown[8:].mean() < 50  # the white half is now on top
    np.save(tmp_path / "a.npy", np.zeros((16, 8), np.uint8))
    assert load_mask(tmp_path / "a.npy", tmp_path / "a.jpg", 8, 2, 255, NonSquarePolicy.CENTER_CROP).shape == (8, 8)
    np.save(tmp_path / "a.npy", np.zeros((8, 16), np.uint8))
    with pytest.raises(DatasetError, match="fits the image as stored, before its EXIF orientation 6"):
        load_mask(tmp_path / "a.npy", tmp_path / "a.jpg", 8, 2, 255, NonSquarePolicy.CENTER_CROP)


def huge_header_png(path: Path, width: int = 100_000, height: int = 100_000) -> None:
    """A valid 1x1 PNG whose IHDR (with a correct CRC) claims ``width x height`` pixels."""
    buffer = io.BytesIO()
    Image.new("L", (1, 1)).save(buffer, "png")
    raw = bytearray(buffer.getvalue())
    raw[16:24] = struct.pack(">II", width, height)
    raw[29:33] = struct.pack(">I", zlib.crc32(bytes(raw[12:29])))
    path.write_bytes(bytes(raw))


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # Pillow warns before our error
@pytest.mark.parametrize("side", [10_000, 100_000])  # above MAX_IMAGE_PIXELS (a warning in Pillow) and above 2x (its error)
def test_a_header_claiming_a_huge_size_is_refused_naming_the_file(tmp_path, side):
    huge_header_png(tmp_path / "big.png", side, side)
    with pytest.raises(DatasetError, match="big.png is too large to decode safely") as error:
        read_rgb(tmp_path / "big.png")
    detail = f"its header claims {side}x{side} pixels" if side == 10_000 else "its header claims more than twice the limit"
    assert detail in str(error.value) and "the limit is 89478485 pixels" in str(error.value)


@pytest.mark.parametrize("other", ["a.jpg", "a.PNG", "a.jpeg"])
def test_two_images_for_one_stem_are_refused_naming_both(tmp_path, other):
    for name in ("a.png", other, "b.png"):
        (tmp_path / name).write_bytes(b"")
    with pytest.raises(DatasetError) as error:
        list_images(tmp_path)
    assert str(tmp_path / "a.png") in str(error.value) and str(tmp_path / other) in str(error.value)
    assert "b.png" not in str(error.value)


MASK_DTYPES = [np.uint8, np.int8, np.uint16, np.int16, np.int32, np.uint32, np.int64, np.uint64, np.float16, np.float32,
               np.float64, np.bool_]


@FAST
@given(st.sampled_from(MASK_DTYPES), SIZES, st.booleans(), st.data())
def test_masks_of_any_numeric_dtype_read_as_their_class_values(dtype, size, channel_axis, draw):
    top = 1 if dtype is np.bool_ else 2
    values = draw.draw(arrays(np.int64, size, elements=st.integers(0, top)))
    mask = values.astype(dtype)[..., None] if channel_axis else values.astype(dtype)
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        Image.new("RGB", (size[1], size[0])).save(folder / "a.png")
        np.save(folder / "a.npy", mask)
        side = min(size)
        loaded = load_mask(folder / "a.npy", folder / "a.png", side, 3, 255, NonSquarePolicy.CENTER_CROP)
    top_row, left = (size[0] - side) // 2, (size[1] - side) // 2
    np.testing.assert_array_equal(loaded, values[top_row : top_row + side, left : left + side])
    assert loaded.dtype == np.uint8


@FAST
@given(st.sampled_from([np.float32, np.float64]), st.sampled_from([0.5, np.nan, np.inf, -3.0, 1e12]))
def test_float_masks_with_non_class_values_are_refused(dtype, bad):
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        Image.new("RGB", (2, 2)).save(folder / "a.png")
        np.save(folder / "a.npy", np.array([[0, 1], [1, bad]], dtype))
        with pytest.raises(DatasetError, match="a.npy holds"):
            load_mask(folder / "a.npy", folder / "a.png", 2, 3, 255)


class Evil:
    def __reduce__(self):
        return (print, ("EXECUTED",))


def write_container(path: Path, kind: str) -> None:
    mask = np.zeros((2, 2), np.uint8)
    if kind == "npz":
        with open(path, "wb") as handle:
            np.savez(handle, mask=mask)
    elif kind == "pickle":
        path.write_bytes(pickle.dumps(Evil()))
    elif kind == "object npy":
        np.save(path, np.array([[Evil(), 1], [1, 1]], dtype=object), allow_pickle=True)
    elif kind == "png":
        Image.fromarray(mask).save(path, "png")
    elif kind == "text":
        path.write_text("0 1\n1 0\n")
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated":
        np.save(path, mask)
        path.write_bytes(path.read_bytes()[:-2])


@pytest.mark.parametrize("kind, message", [
    ("npz", "is a zip archive (an .npz renamed .npy?), not a .npy array"),
    ("pickle", "is a Python pickle, not a .npy array"),
    ("object npy", "is not a readable .npy array"),
    ("png", "is a PNG image, not a .npy array"),
    ("text", "is not .npy data, not a .npy array"),
    ("empty", "is not .npy data"),
    ("truncated", "is not a readable .npy array"),
])
def test_masks_in_other_containers_are_refused_and_never_unpickled(tmp_path, capsys, kind, message):
    write_container(tmp_path / "a.npy", kind)
    with pytest.raises(DatasetError, match=message.replace("(", r"\(").replace(")", r"\)").replace("?", r"\?")):
        read_npy(tmp_path / "a.npy")
    assert "EXECUTED" not in capsys.readouterr().out

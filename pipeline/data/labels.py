"""Mask readers for ``dataset.labels``: each turns one annotation file into an ``[H, W] uint8`` class mask.

prepare (pipeline/data/prepare.py) calls them once per image and writes the prepared layout's ``.npy``
masks, so nothing after prepare knows which format the masks came in. The readers are pure: a file and
the class mapping in, a mask out; the checks against the image (size, class range) stay in masks.py (``fit_mask``),
the same for every format.

- ``png``: ``real/<split>/masks/<stem>.png`` (a subfolder, since an image may itself be ``<stem>.png``).
  Indexed (P, as VOC's ``SegmentationClass``) or greyscale (L) masks hold the class of each pixel (and
  the ignore label, VOC's 255 border); with ``class_colors`` every mask is read by colour instead.
- ``coco``: a COCO JSON file of polygons and RLE segmentations, rasterised by pycocotools.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from pipeline.data.layout import MASK_FOLDER
from pipeline.errors import DatasetError

# Modes whose values are class indices. LA / PA keep their first band (the grey value / palette index).
INDEX_MODES = {"1", "L", "P", "LA", "PA"}
COLOUR_MODES = {"RGB", "RGBA"}
SHOWN = 5  # unknown colours or categories named in one message


def _packed(rgb: np.ndarray) -> np.ndarray:
    """``[..., 3] uint8`` -> ``[...] int64`` (r << 16 | g << 8 | b), one number per colour."""
    rgb = rgb.astype(np.int64)
    return (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]


def colours_to_classes(rgb: np.ndarray, class_colors: Sequence[Sequence[int]], path: Path,
                       ignore_color: Sequence[int] | None = None, ignore_label: int = 255) -> np.ndarray:
    """``[H, W, 3] uint8`` colours -> ``[H, W] uint8`` classes: colour i of ``class_colors`` is class i,
    ``ignore_color`` is ``ignore_label``; any other colour is a ``DatasetError`` naming the file, the colour
    and how many pixels have it."""
    table = {int(key): index for index, key in enumerate(_packed(np.asarray(class_colors, dtype=np.uint8)))}
    if ignore_color is not None:
        table[int(_packed(np.asarray(ignore_color, dtype=np.uint8)))] = ignore_label
    values, inverse, counts = np.unique(_packed(rgb).ravel(), return_inverse=True, return_counts=True)
    unknown = [(int(value), int(count)) for value, count in zip(values, counts) if int(value) not in table]
    if unknown:
        unknown.sort(key=lambda item: -item[1])
        shown = ", ".join(f"[{v >> 16}, {(v >> 8) & 255}, {v & 255}] ({count} pixels)" for v, count in unknown[:SHOWN])
        more = f" and {len(unknown) - SHOWN} more" if len(unknown) > SHOWN else ""
        raise DatasetError(f"mask {path} holds colour(s) {shown}{more} that dataset.class_colors does not list; add "
                           f"them to dataset.class_colors (or dataset.ignore_color), or fix the mask (anti-aliased "
                           f"edges make new colours: export masks without smoothing)")
    lookup = np.asarray([table[int(value)] for value in values], dtype=np.uint8)
    return lookup[inverse].reshape(rgb.shape[:2])


def read_png_mask(path: Path, class_colors: Sequence[Sequence[int]] | None = None,
                  ignore_color: Sequence[int] | None = None, ignore_label: int = 255) -> np.ndarray:
    """A PNG mask -> ``[H, W] uint8``. Without ``class_colors``: the pixel values of an indexed (P) or
    greyscale (L, 1) PNG, which are checked as classes by the caller. With them: the class of each pixel's
    colour (any mode converted to RGB, palettes looked up; see ``colours_to_classes``)."""
    try:
        with Image.open(path) as image:
            image.load()
    except FileNotFoundError:
        raise DatasetError(f"mask {path} does not exist; add it (masks of dataset.labels: png are "
                           f"real/<split>/{MASK_FOLDER}/<stem>.png) or remove its image") from None
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError, ValueError) as error:
        raise DatasetError(f"mask {path} cannot be read as a PNG ({error}); re-save it as a PNG") from None
    if image.format != "PNG":
        raise DatasetError(f"mask {path} is a {image.format} file, not a PNG; lossy formats change the class values "
                           f"at edges: save the mask as a PNG")
    if class_colors is not None:
        rgb = np.asarray(image.convert("RGBA" if image.mode == "P" and "transparency" in image.info else "RGB")
                         .convert("RGB"))
        return colours_to_classes(rgb, class_colors, path, ignore_color, ignore_label)
    if image.mode in COLOUR_MODES:
        raise DatasetError(f"mask {path} is a colour ({image.mode}) PNG; set dataset.class_colors to the [r, g, b] of "
                           f"each class, or save masks as indexed (P) or greyscale (L) PNGs whose values are classes")
    if image.mode not in INDEX_MODES:
        raise DatasetError(f"mask {path} has pixel mode {image.mode}; save it as an 8-bit indexed (P) or greyscale (L) "
                           f"PNG whose values are class indices")
    values = np.asarray(image)
    return (values[..., 0] if values.ndim == 3 else values).astype(np.uint8)


# ---------------------------------------------------------------------------------------------
# COCO
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CocoImage:
    file_name: str  # as the JSON gives it (may hold a folder); matched to disk by its last part
    height: int
    width: int
    annotations: tuple[dict, ...]  # in the file's order


@dataclass(frozen=True)
class CocoFile:
    path: Path
    images: dict[str, CocoImage]  # by base name (``a.jpg``)
    category_names: dict[int, str]


def _field(record: Any, key: str, kind: type | tuple[type, ...], path: Path, what: str) -> Any:
    if not isinstance(record, dict) or not isinstance(record.get(key), kind) or isinstance(record.get(key), bool):
        got = record.get(key) if isinstance(record, dict) else record
        raise DatasetError(f"COCO file {path}: {what} has no valid {key!r} (got {got!r}); it does not follow the COCO "
                           f"format (https://cocodataset.org/#format-data): re-export it as COCO")
    return record[key]


def read_coco(path: Path, categories: Mapping[int, int]) -> CocoFile:
    """Parse a COCO file: its images (``id``, ``file_name``, ``height``, ``width``) with their annotations.
    A category an annotation uses that ``categories`` (``dataset.coco_categories``) does not map is a
    ``DatasetError`` naming the file, the id, its name and how many annotations use it."""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise DatasetError(f"COCO file {path} does not exist; put it there or set dataset.coco_file (relative to "
                           f"dataset.root, {{split}} for one file per split)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DatasetError(f"COCO file {path} is not readable JSON ({error}); re-export it") from None
    images, by_id, ids = {}, {}, {}
    for record in _field(data, "images", list, path, "the file"):
        image_id = _field(record, "id", int, path, "an image")
        name = _field(record, "file_name", str, path, f"image {image_id}")
        base = Path(name.replace("\\", "/")).name
        if base in images:
            raise DatasetError(f"COCO file {path} lists two images named {base} ({images[base].file_name} and {name}); "
                               f"images are matched to the split folders by file name: rename one")
        if image_id in by_id:
            raise DatasetError(f"COCO file {path} gives image id {image_id} to {by_id[image_id].file_name} and {name}; "
                               f"image ids must be unique: re-export the file")
        height = _field(record, "height", int, path, f"image {name}")
        width = _field(record, "width", int, path, f"image {name}")
        images[base] = by_id[image_id] = CocoImage(name, height, width, ())
        ids[base] = image_id
    annotations: dict[int, list[dict]] = {image_id: [] for image_id in by_id}
    unmapped: dict[int, int] = {}
    for record in _field(data, "annotations", list, path, "the file"):
        image_id = _field(record, "image_id", int, path, "an annotation")
        category = _field(record, "category_id", int, path, f"an annotation of image {image_id}")
        if image_id not in by_id:
            raise DatasetError(f"COCO file {path}: annotation {record.get('id')} refers to image_id {image_id}, which "
                               f"its images list does not hold; re-export the file")
        if "segmentation" not in record:
            raise DatasetError(f"COCO file {path}: annotation {record.get('id')} of {by_id[image_id].file_name} has no "
                               f"segmentation; semantic masks need polygons or RLE, not only boxes")
        if category not in categories:
            unmapped[category] = unmapped.get(category, 0) + 1
        annotations[image_id].append(record)
    names = {}
    for record in data.get("categories", []) if isinstance(data.get("categories"), list) else []:
        if isinstance(record, dict) and isinstance(record.get("id"), int):
            names[record["id"]] = str(record.get("name", ""))
    if unmapped:
        shown = ", ".join(f"{category} ({names.get(category, 'no name')!r}, {count} annotations)"
                          for category, count in sorted(unmapped.items()))
        raise DatasetError(f"COCO file {path} uses category id(s) {shown} that dataset.coco_categories does not map; "
                           f"map each to a class index (or the ignore label), e.g. -S "
                           f"'dataset.coco_categories={{{', '.join(f'{c}: <class>' for c in sorted(unmapped))}}}'")
    images = {base: CocoImage(image.file_name, image.height, image.width, tuple(annotations[ids[base]]))
              for base, image in images.items()}
    return CocoFile(Path(path), images, names)


def _annotation_mask(record: dict, image: CocoImage, path: Path) -> np.ndarray:
    """One annotation's segmentation -> ``[H, W] uint8`` 0/1, by pycocotools (polygons, RLE, compressed RLE)."""
    from pycocotools import mask as mask_utils  # only the coco format needs it

    height, width, segmentation = image.height, image.width, record["segmentation"]
    where = f"COCO file {path}: annotation {record.get('id')} of {image.file_name}"
    if isinstance(segmentation, list):  # polygons [x1, y1, x2, y2, ...] in pixel-edge coordinates
        if any(not isinstance(p, list) or len(p) % 2 for p in segmentation):
            raise DatasetError(f"{where} has a polygon that is not a flat list of x, y pairs; re-export it")
        polygons = [[float(v) for v in p] for p in segmentation if len(p) >= 6]  # < 3 points cover nothing
        if not polygons:
            return np.zeros((height, width), dtype=np.uint8)
        rle = mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))
    elif isinstance(segmentation, dict) and "counts" in segmentation and "size" in segmentation:
        if list(segmentation["size"]) != [height, width]:
            raise DatasetError(f"{where} has an RLE of size {list(segmentation['size'])} (height, width) but its image "
                               f"entry says {height}x{width} (height x width); re-export the file")
        # counts as a list: uncompressed RLE (iscrowd); as a string: COCO's compressed RLE.
        rle = mask_utils.frPyObjects(segmentation, height, width) if isinstance(segmentation["counts"], list) else segmentation
    else:
        raise DatasetError(f"{where} has a segmentation that is neither polygons nor RLE; re-export it")
    return np.ascontiguousarray(mask_utils.decode(rle), dtype=np.uint8)


def coco_mask(coco: CocoFile, base_name: str, categories: Mapping[int, int], background: int) -> np.ndarray:
    """The ``[H, W] uint8`` class mask of image ``base_name`` (H, W from its entry): pixels no annotation
    covers are ``background``. Overlaps: annotations are painted largest first, so the smaller one wins
    (a window drawn on a wall keeps its pixels); of two the same size, the later one in the file wins."""
    image = coco.images[base_name]
    mask = np.full((image.height, image.width), background, dtype=np.uint8)
    shapes = [(_annotation_mask(record, image, coco.path), categories[record["category_id"]])
              for record in image.annotations]
    order = sorted(range(len(shapes)), key=lambda index: -int(shapes[index][0].sum()))  # stable: file order on ties
    for index in order:
        covered, label = shapes[index]
        mask[covered.astype(bool)] = label
    return mask

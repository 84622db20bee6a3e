"""The segment stage's files for one image, each written to a temporary name and then renamed."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.api import Segmentation
from pipeline.atomic import atomic_file
from pipeline.data.images import read_rgb
from pipeline.outputs.figures import overlay_figure, save_figure


def save_png(picture: Image.Image, path: Path) -> None:
    with atomic_file(path) as temporary:
        picture.save(temporary, format="PNG")  # the temporary's suffix is .tmp: name the format


def save_npy(array: np.ndarray, path: Path) -> None:
    with atomic_file(path) as temporary, open(temporary, "wb") as handle:  # a path would get ".npy" appended
        np.save(handle, array)


def uncertainty_picture(uncertainty: np.ndarray) -> Image.Image:
    """Grey levels: 0 = the members agree, 255 = ln 2 nats or more (members split evenly between two
    classes; the built-in run's digit pixels sit near 0.1-0.4, which a ln(members) scale shows as near
    black); NaN (cut away by a centre crop) is 0."""
    grey = np.nan_to_num(np.clip(uncertainty / math.log(2), 0, 1), nan=0.0)
    return Image.fromarray((grey * 255).round().astype(np.uint8), mode="L")


def write_outputs(folder: Path, result: Segmentation, image_path: Path, colours: np.ndarray, class_names: list[str],
                  ignore_label: int) -> None:
    """``<stem>.png`` (classes, single channel), ``<stem>.overlay.png`` (image | prediction over it |
    uncertainty with its colour bar, the class names in their colours), ``<stem>.uncertainty.npy``
    (``[H, W] float32`` nats, as evaluate writes its predictions) and ``<stem>.uncertainty.png``."""
    save_png(Image.fromarray(result.mask, mode="L"), folder / f"{result.name}.png")
    save_figure(overlay_figure(read_rgb(image_path), None, result.mask, result.uncertainty, colours, class_names,
                               ignore_label, title=result.name, blend=0.5), folder / f"{result.name}.overlay.png")
    save_npy(result.uncertainty, folder / f"{result.name}.uncertainty.npy")
    save_png(uncertainty_picture(result.uncertainty), folder / f"{result.name}.uncertainty.png")


def summary_row(result: Segmentation, class_names: list[str]) -> dict:
    """image, size, mean uncertainty over the segmented pixels and each class's pixel count."""
    counts = np.bincount(result.mask.reshape(-1), minlength=256)
    row = {"image": result.name, "width": result.mask.shape[1], "height": result.mask.shape[0],
           "mean_uncertainty": round(float(np.nanmean(result.uncertainty)), 6)}
    row.update({f"pixels_{name}": int(counts[index]) for index, name in enumerate(class_names)})
    return row

"""Evaluation artifacts for DVC: metrics dict, per-class table, confusion rows, overlay images."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from pipeline.metrics import iou_per_class, mean_iou, pixel_accuracy
from pipeline.runtime import atomic_file


def metrics_dict(confusion: np.ndarray, class_names: list[str], ignore_label: int, uncertainty: float,
                 images: int) -> dict:
    """The JSON DVC reads: mIoU (fraction, mean over classes present), pixel accuracy, per-class IoU."""
    ious = iou_per_class(confusion, ignore_label)
    return {
        "miou": round(mean_iou(confusion, ignore_label), 6),
        "pixel_accuracy": round(pixel_accuracy(confusion), 6),
        "uncertainty": round(uncertainty, 6),
        "per_class_iou": {name: (None if np.isnan(iou) else round(float(iou), 6)) for name, iou in zip(class_names, ious)},
        "test_images": images,
        "test_pixels": int(confusion.sum()),
    }


def per_class_table(confusion: np.ndarray, class_names: list[str], ignore_label: int) -> pd.DataFrame:
    ious = iou_per_class(confusion, ignore_label)
    return pd.DataFrame(
        {
            "class": class_names,
            "iou": np.round(ious, 6),
            "truth_pixels": confusion.sum(1),
            "predicted_pixels": confusion.sum(0),
        }
    )


def confusion_rows(truth: np.ndarray, prediction: np.ndarray, class_names: list[str], ignore_label: int,
                   max_rows: int, seed: int = 0) -> pd.DataFrame:
    """One row per test pixel (``actual``, ``predicted`` names) for DVC's confusion template.

    Beyond ``max_rows`` pixels a seeded uniform sample is written (the exact counts are in the table).
    """
    keep = np.flatnonzero(truth != ignore_label)
    if len(keep) > max_rows:
        keep = np.sort(np.random.default_rng(seed).choice(keep, size=max_rows, replace=False))
    names = np.asarray(class_names, dtype=object)
    return pd.DataFrame({"actual": names[truth[keep]], "predicted": names[prediction[keep]]})


def palette(num_classes: int, ignore_label: int) -> np.ndarray:
    """``[256, 3] uint8`` colours: black background, distinct hues per class, white for ignore."""
    import matplotlib

    colours = np.zeros((256, 3), dtype=np.uint8)
    cmap = matplotlib.colormaps["tab20"]
    for index in range(1, num_classes):
        colours[index] = (np.array(cmap((index - 1) % 20)[:3]) * 255).astype(np.uint8)
    colours[ignore_label] = 255
    return colours


def overlay(image: np.ndarray, truth: np.ndarray, prediction: np.ndarray, colours: np.ndarray, scale: int) -> Image.Image:
    """Image | ground truth | prediction side by side, each upscaled ``scale`` times (nearest)."""
    strip = np.concatenate([image, colours[truth], colours[prediction]], axis=1)
    picture = Image.fromarray(strip)
    return picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST)


def write_csv_atomic(frame: pd.DataFrame, path: Path) -> None:
    with atomic_file(path) as temporary:
        frame.to_csv(temporary, index=False)

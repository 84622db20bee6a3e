"""Evaluation artifacts for DVC: per-class table, confusion rows, overlay images, prediction files."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from pipeline.atomic import atomic_file
from pipeline.ensemble.metrics import (
    iou_per_class,
    iou_per_class_paper,
    strict_confusion,
)


def per_class_table(counts: np.ndarray, class_names: list[str], ignore_label: int) -> pd.DataFrame:
    """One row per class from ``label_counts``: IoU under the paper's protocol and the strict one, and
    pixel counts (truth counts labeled pixels only; predicted counts every pixel, as the paper's unions do)."""
    confusion = strict_confusion(counts, ignore_label)
    return pd.DataFrame(
        {
            "class": class_names,
            "iou": np.round(iou_per_class_paper(counts, ignore_label), 6),
            "iou_strict": np.round(iou_per_class(confusion, ignore_label), 6),
            "truth_pixels": confusion.sum(1),
            "predicted_pixels": counts.sum(0),
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


def write_prediction(folder: Path, stem: str, prediction: np.ndarray, disagreement: np.ndarray) -> None:
    """``<stem>.png``: single-channel PNG of class indices; ``<stem>.uncertainty.npy``: ``[S, S] float32``
    Jensen-Shannon disagreement of the members (nats), so any metric can be recomputed from files."""
    Image.fromarray(np.asarray(prediction, dtype=np.uint8), mode="L").save(folder / f"{stem}.png")
    np.save(folder / f"{stem}.uncertainty.npy", np.asarray(disagreement, dtype=np.float32))


def write_csv_atomic(frame: pd.DataFrame, path: Path) -> None:
    with atomic_file(path) as temporary:
        frame.to_csv(temporary, index=False)

"""Evaluation artifacts for DVC: per-class table, confusion rows, labelled figures, prediction files.

Figures are drawn on ``matplotlib.figure.Figure`` objects (no pyplot state, no display backend), so a
stage or a test can read their panel titles and legend texts back before they are saved.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
from PIL import Image

from pipeline.atomic import atomic_file
from pipeline.ensemble.metrics import iou_per_class, iou_per_class_paper, strict_confusion


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


# Colour-bar top of the uncertainty panels: ln 2 nats is members split evenly between two classes; a fixed
# scale keeps images comparable (pipeline/outputs/segment.py's grey maps use the same one).
UNCERTAINTY_MAX = math.log(2)


def overlay_figure(image: np.ndarray, truth: np.ndarray | None, prediction: np.ndarray, disagreement: np.ndarray,
                   colours: np.ndarray, class_names: Sequence[str], ignore_label: int, title: str = "",
                   blend: float = 1.0):
    """Panels ``image | ground truth | prediction | uncertainty`` (``truth`` None: no ground-truth panel), a
    legend of the class names in their colours (the classes shown, plus ``ignore`` where a mask has it) and a
    colour bar of the per-pixel Jensen-Shannon disagreement of the members (nats, 0 to ln 2 and above).

    ``image`` ``[S, S, 3] uint8``; ``truth``, ``prediction`` ``[S, S]`` class indices; ``disagreement``
    ``[S, S] float32`` (NaN where nothing was predicted). ``blend`` < 1 draws the prediction's colours over
    the image at that opacity (segment: new images have no ground truth to compare with, so the prediction is
    shown on the picture). Returns a ``matplotlib.figure.Figure``.
    """
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    panels = [("image", image)]
    if truth is not None:
        panels.append(("ground truth", colours[truth]))
    painted = colours[prediction] if blend >= 1 else ((1 - blend) * image + blend * colours[prediction]).round().astype(np.uint8)
    panels.append(("prediction", painted))
    figure = Figure(figsize=(2.2 * (len(panels) + 1) + 0.6, 3.1), layout="constrained")
    axes = figure.subplots(1, len(panels) + 1)
    for axis, (name, picture) in zip(axes, panels):
        axis.imshow(picture, interpolation="nearest")
        axis.set_title(name, fontsize=9)
    shown = axes[-1].imshow(disagreement, cmap="magma", vmin=0.0, vmax=UNCERTAINTY_MAX, interpolation="nearest")
    axes[-1].set_title("uncertainty", fontsize=9)
    bar = figure.colorbar(shown, ax=axes[-1], fraction=0.046, pad=0.04, extend="max")
    bar.set_label("members' disagreement (JS, nats)", fontsize=7)
    bar.ax.tick_params(labelsize=7)
    for axis in axes:
        axis.set_xticks([])
        axis.set_yticks([])
    present = {int(value) for mask in (truth, prediction) if mask is not None for value in np.unique(mask)}
    handles = [Patch(facecolor=colours[index] / 255, edgecolor="0.5", label=name)
               for index, name in enumerate(class_names) if index in present]
    if ignore_label in present:
        handles.append(Patch(facecolor=colours[ignore_label] / 255, edgecolor="0.5", label="ignore"))
    figure.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 7), fontsize=7, frameon=False)
    if title:
        figure.suptitle(title, fontsize=9)
    return figure


def corruption_figure(images: Sequence[np.ndarray], levels: Sequence[tuple[str, int]]):
    """One panel per ``[S, S, 3] uint8`` image, its corruption name and severity written under it
    (severity 0 reads ``clean``). Returns a ``matplotlib.figure.Figure``."""
    from matplotlib.figure import Figure

    if len(images) != len(levels):
        raise ValueError(f"corruption_figure: {len(images)} images but {len(levels)} (corruption, severity) labels")
    figure = Figure(figsize=(1.3 * len(images), 1.9), layout="constrained")
    axes = np.atleast_1d(figure.subplots(1, len(images)))
    for axis, image, (corruption, severity) in zip(axes, images, levels):
        axis.imshow(image, interpolation="nearest")
        axis.set_xticks([])
        axis.set_yticks([])
        axis.set_xlabel("clean" if severity == 0 else f"{corruption.replace('_', ' ')}\nseverity {severity}", fontsize=7)
    return figure


def save_figure(figure, path: Path, dpi: int = 110) -> None:
    """``figure`` as a PNG at ``path``, written to a temporary name and renamed (no version or date
    metadata, so the same figure gives the same bytes)."""
    with atomic_file(path) as temporary:
        figure.savefig(temporary, format="png", dpi=dpi, metadata={"Software": None})


def write_prediction(folder: Path, stem: str, prediction: np.ndarray, disagreement: np.ndarray) -> None:
    """``<stem>.png``: single-channel PNG of class indices; ``<stem>.uncertainty.npy``: ``[S, S] float32``
    Jensen-Shannon disagreement of the members (nats), so any metric can be recomputed from files."""
    Image.fromarray(np.asarray(prediction, dtype=np.uint8), mode="L").save(folder / f"{stem}.png")
    np.save(folder / f"{stem}.uncertainty.npy", np.asarray(disagreement, dtype=np.float32))


def write_csv_atomic(frame: pd.DataFrame, path: Path) -> None:
    with atomic_file(path) as temporary:
        frame.to_csv(temporary, index=False)


def samples_figure(kept: Sequence[tuple], dropped: Sequence[tuple], colours: np.ndarray, class_names: Sequence[str],
                   ignore_label: int, title: str = ""):
    """DatasetDDPM's samples, kept (left) and dropped (right) side by side: per image a row of ``image |
    label over it | uncertainty``, named with its stem and uncertainty score. Each entry of ``kept`` and
    ``dropped`` is ``(stem, score, image [S, S, 3] uint8, mask [S, S] classes, disagreement [S, S] float32)``;
    the uncertainty panels share one colour scale (0 to ln 2 nats). Returns a ``matplotlib.figure.Figure``."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    rows = max(len(kept), len(dropped), 1)
    figure = Figure(figsize=(8.6, 1.15 * rows + 1.3), layout="constrained")
    sides = figure.subfigures(1, 2, wspace=0.04)
    shown, present = None, set()
    for side, (name, entries) in zip(sides, (("kept", kept), ("dropped (most uncertain first)", dropped))):
        side.suptitle(f"{name}: {len(entries)} shown", fontsize=9)
        axes = np.atleast_2d(side.subplots(rows, 3))
        for row, axis_row in enumerate(axes):
            for axis in axis_row:
                axis.set_xticks([])
                axis.set_yticks([])
                axis.set_frame_on(row < len(entries))
            if row >= len(entries):
                continue
            stem, score, image, mask, disagreement = entries[row]
            present |= {int(value) for value in np.unique(mask)}
            axis_row[0].imshow(image, interpolation="nearest")
            axis_row[0].set_ylabel(f"{stem}\n{score:.3f}", fontsize=7)
            axis_row[1].imshow((0.5 * image + 0.5 * colours[mask]).round().astype(np.uint8), interpolation="nearest")
            shown = axis_row[2].imshow(disagreement, cmap="magma", vmin=0.0, vmax=UNCERTAINTY_MAX, interpolation="nearest")
            if row == 0:
                for axis, label in zip(axis_row, ("image", "label", "uncertainty")):
                    axis.set_title(label, fontsize=8)
    if shown is not None:
        bar = figure.colorbar(shown, ax=sides[1].axes, fraction=0.05, pad=0.02, extend="max", shrink=0.6)
        bar.set_label("members' disagreement (JS, nats)", fontsize=7)
        bar.ax.tick_params(labelsize=7)
    handles = [Patch(facecolor=colours[index] / 255, edgecolor="0.5", label=name)
               for index, name in enumerate(class_names) if index in present]
    if ignore_label in present:
        handles.append(Patch(facecolor=colours[ignore_label] / 255, edgecolor="0.5", label="ignore"))
    if handles:
        figure.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 6), fontsize=7, frameon=False)
    if title:
        figure.suptitle(title, fontsize=9)
    return figure

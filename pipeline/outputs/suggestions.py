"""The suggest stage's files: the ranked table, the images for an annotator, Label Studio tasks with the
current predictions as pre-annotations, and a figure of the suggested images with their uncertainty maps.

Label Studio (https://labelstud.io/guide/predictions, https://labelstud.io/tags/polygonlabels): a task is
``{"data": {"image": URL}, "predictions": [{"model_version", "score", "result": [...]}]}``; each result of
type ``polygonlabels`` holds ``value.points``, ``[[x, y], ...]`` in percent (0-100) of the image's width and
height, and ``value.polygonlabels``, the class name. The polygons are traced from the predicted mask per class
(contourpy, matplotlib's contouring library) along the pixel edges' midpoints, so a traced region covers the
class's pixels up to half a pixel at its corners. Label Studio polygons have no holes: a region's holes are
dropped (its polygon covers them), and class 0 (background) gets no polygon (it is what no polygon covers).
"""
from __future__ import annotations

import math
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.analysis.suggest import Scored
from pipeline.atomic import write_json_atomic
from pipeline.data.images import read_rgb
from pipeline.outputs.figures import UNCERTAINTY_MAX, save_figure, write_csv_atomic

# The names the tasks' results point at: the labeling config must use them (docs/labeling.md shows one).
FROM_NAME, TO_NAME = "label", "image"


def class_polygons(mask: np.ndarray, class_index: int) -> list[list[list[float]]]:
    """``[H, W]`` class indices -> the outlines of ``class_index``'s regions (holes dropped), each
    ``[[x, y], ...]`` in pixel units of the image (pixel (r, c) spans x in [c, c + 1], y in [r, r + 1]),
    not closed (Label Studio closes them), at least 3 points."""
    import contourpy

    height, width = mask.shape
    inside = np.pad((mask == class_index).astype(np.float64), 1)  # padded, so regions at the border close
    polygons = []
    for line in contourpy.contour_generator(z=inside, line_type="Separate").lines(0.5):
        x, y = line[:, 0] - 0.5, line[:, 1] - 0.5  # padded pixel centres -> image coordinates
        area = 0.5 * float(np.sum(x[:-1] * y[1:] - x[1:] * y[:-1]))
        if area <= 0:  # contourpy walks outer boundaries one way and holes the other (tested)
            continue
        points = np.stack([np.clip(x, 0, width), np.clip(y, 0, height)], axis=1)
        if len(points) > 1 and np.array_equal(points[0], points[-1]):
            points = points[:-1]
        if len(points) >= 3:
            polygons.append(points.tolist())
    return polygons


def label_studio_task(image_url: str, prediction: np.ndarray, class_names: Sequence[str], ignore_label: int,
                      score: float, model_version: str) -> dict:
    """One Label Studio task: the image's URL and the predicted mask as ``polygonlabels`` pre-annotations
    (every class present but 0, background, and the ignore label), ``score`` the image's uncertainty."""
    height, width = prediction.shape
    results = []
    for index in sorted(int(value) for value in np.unique(prediction)):
        if index == 0 or index == ignore_label:
            continue
        for polygon in class_polygons(prediction, index):
            points = [[round(100 * x / width, 4), round(100 * y / height, 4)] for x, y in polygon]
            results.append({"id": f"{index}_{len(results)}", "from_name": FROM_NAME, "to_name": TO_NAME,
                            "type": "polygonlabels", "original_width": width, "original_height": height,
                            "image_rotation": 0, "value": {"points": points, "polygonlabels": [class_names[index]]}})
    return {"data": {TO_NAME: image_url},
            "predictions": [{"model_version": model_version, "score": round(float(score), 6), "result": results}]}


def labeling_config(class_names: Sequence[str]) -> str:
    """A Label Studio labeling config the tasks fit (polygons per class, background left out)."""
    labels = "\n".join(f'    <Label value="{name}"/>' for name in class_names[1:])
    return (f'<View>\n  <Image name="{TO_NAME}" value="${TO_NAME}" zoom="true"/>\n'
            f'  <PolygonLabels name="{FROM_NAME}" toName="{TO_NAME}">\n{labels}\n  </PolygonLabels>\n</View>\n')


def classes_present(prediction: np.ndarray, class_names: Sequence[str], ignore_label: int) -> str:
    """The predicted classes' names, in class order, separated by spaces."""
    return " ".join(class_names[int(i)] for i in np.unique(prediction) if int(i) != ignore_label)


def suggestion_table(suggestions: Sequence[Scored], class_names: Sequence[str], ignore_label: int) -> pd.DataFrame:
    return pd.DataFrame([{"rank": rank, "image": item.name, "score": round(item.score, 6),
                          "classes": classes_present(item.prediction, class_names, ignore_label)}
                         for rank, item in enumerate(suggestions, start=1)], columns=["rank", "image", "score", "classes"])


def write_suggestions(folder: Path, suggestions: Sequence[Scored], class_names: Sequence[str], ignore_label: int,
                      image_url: str, model_version: str) -> None:
    """Into ``folder`` (a fresh one: the stage builds it with ``building_dir``): ``suggestions.csv`` (rank,
    image, score, classes), ``images/`` (the suggested files, copied byte for byte),
    ``label_studio_tasks.json`` (a list of tasks; ``image_url`` with ``{name}`` for the file's name) and
    ``label_studio_config.xml`` (a labeling config they fit)."""
    write_csv_atomic(suggestion_table(suggestions, class_names, ignore_label), folder / "suggestions.csv")
    (folder / "images").mkdir(exist_ok=True)
    for item in suggestions:
        shutil.copyfile(item.path, folder / "images" / item.name)
    tasks = [label_studio_task(image_url.format(name=item.name), item.prediction, class_names, ignore_label,
                               item.score, model_version) for item in suggestions]
    write_json_atomic(tasks, folder / "label_studio_tasks.json")
    (folder / "label_studio_config.xml").write_text(labeling_config(class_names))


def suggestions_figure(suggestions: Sequence[Scored], colours: np.ndarray, class_names: Sequence[str], score_name: str):
    """Columns = suggestions in rank order; rows: the image (titled ``#rank score``), the predicted classes
    over it (a legend of the classes shown), the members' disagreement (magma, 0 to ln 2 nats, one colour
    bar). A ``matplotlib`` Figure."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    columns = max(1, len(suggestions))
    figure = Figure(figsize=(1.45 * columns + 1.0, 4.6), layout="constrained")
    axes = np.asarray(figure.subplots(3, columns, squeeze=False))
    shown = None
    for column, item in enumerate(suggestions):
        image = read_rgb(item.path)
        painted = (0.5 * image + 0.5 * colours[item.prediction]).round().astype(np.uint8)
        axes[0, column].imshow(image, interpolation="nearest")
        axes[0, column].set_title(f"#{column + 1}  {item.score:.3f}", fontsize=8)
        axes[1, column].imshow(painted, interpolation="nearest")
        shown = axes[2, column].imshow(item.disagreement, cmap="magma", vmin=0.0, vmax=UNCERTAINTY_MAX,
                                       interpolation="nearest")
    for axis in axes.reshape(-1):
        axis.set_xticks([])
        axis.set_yticks([])
    for row, name in enumerate(("image", "prediction", "uncertainty")):
        axes[row, 0].set_ylabel(name, fontsize=8)
    if not suggestions:
        axes[1, 0].text(0.5, 0.5, "no unlabeled images", ha="center", va="center", fontsize=8)
    if shown is not None:
        bar = figure.colorbar(shown, ax=axes[2, :].tolist(), fraction=0.05, pad=0.02, extend="max")
        bar.set_label("JS, nats", fontsize=7)
        bar.ax.tick_params(labelsize=7)
    present = sorted({int(value) for item in suggestions for value in np.unique(item.prediction)})
    handles = [Patch(facecolor=colours[index] / 255, edgecolor="0.5", label=class_names[index] if index < len(class_names)
                     else "ignore") for index in present]
    if handles:
        figure.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 8), fontsize=7, frameon=False)
    figure.suptitle(f"images worth labeling next (score: {score_name} of the members' disagreement; "
                    f"ln 2 = {math.log(2):.2f})", fontsize=8)
    return figure


def write_figure(path: Path, suggestions: Sequence[Scored], colours: np.ndarray, class_names: Sequence[str],
                 score_name: str) -> None:
    save_figure(suggestions_figure(suggestions, colours, class_names, score_name), path)

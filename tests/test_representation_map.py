"""The representation map: one light classifier per (decoder block, step) on that block's features, scored on val,
with classes split by their area in the training masks; its stores are reused on a rerun."""
from __future__ import annotations

import numpy as np

from analyses.representation_map import (
    class_areas,
    extract_stores,
    group_miou,
    plot_map,
    representation_map,
    split_by_area,
)
from tests.conftest import REPO
from tests.helpers import make_project


def test_classes_split_at_the_median_area_of_the_classes_in_the_train_masks():
    labels = np.array([0] * 16 + [1] * 2 + [2] + [3] + [255] * 5, dtype=np.uint8)
    areas = class_areas(labels, num_classes=5, ignore_label=255)
    assert np.allclose(areas, [0.8, 0.1, 0.05, 0.05, 0.0])
    assert split_by_area(areas, ["bg", "a", "b", "c", "absent"]) == {"small": ["b", "c"], "large": ["bg", "a"]}
    assert group_miou({"a": 0.5, "b": None, "c": 0.25}, ["a", "b", "c"]) == 0.375
    assert group_miou({"a": None}, ["a"]) is None


def test_the_map_scores_every_cell_on_val_and_reuses_its_stores(tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    monkeypatch.setenv("DDPM_SEG_THREADS", "1")
    paths = make_project(tmp_path)
    stores = str(tmp_path / "stores" / "t{t}.zarr")
    run_params, printed = extract_stores(paths["params"], [50, 150], stores, paths["data"], paths["checkpoint"])
    assert "is complete and current" not in printed
    result = representation_map(run_params, stores, [50, 150], [0, 3], members=1, fit_steps=3, seed=0)
    assert result["split"] == "val" and result["steps"] == [50, 150] and result["blocks"] == [0, 3]
    assert [(c["t"], c["block"]) for c in result["cells"]] == [(50, 0), (50, 3), (150, 0), (150, 3)]
    assert all(0 <= c["miou_all"] <= 1 for c in result["cells"])
    small, large = result["classes"]["small"], result["classes"]["large"]
    assert small and large and not set(small) & set(large) and "background" in large
    figure = tmp_path / "map.png"
    plot_map(result, figure)
    assert figure.stat().st_size > 10_000 and figure.read_bytes()[:4] == b"\x89PNG"
    _, again = extract_stores(paths["params"], [50, 150], stores, paths["data"], paths["checkpoint"])
    assert again.count("is complete and current") == 2  # no extraction the second time


def test_the_report_draws_the_map_and_tables_it_by_block_and_step(tmp_path):
    from analyses.report import representation_map_section

    cells = [{"t": t, "block": b, "features": 8, "miou_all": 0.1 * b + t / 1000, "miou_small": 0.05, "miou_large": None,
              "per_class_iou": {}, "seconds": 1.0} for t in (50, 250) for b in (0, 2)]
    record = {"split": "val", "steps": [50, 250], "blocks": [0, 2], "classes": {"small": ["a"], "large": ["bg"]},
              "classifier": {"members": 2, "optimizer_steps": 300, "seed": 0, "recipe": "fast"},
              "train_images": 50, "val_images": 50, "cells": cells}
    text = "\n".join(representation_map_section(record, tmp_path))
    assert (tmp_path / "representation_map.png").is_file() and "](representation_map.png)" in text
    assert "| block | t=50 | t=250 |" in text and "Best cell: block 2 at t=250 (val mIoU 0.450)" in text

"""Active learning against random picks: both start from the same images, each round labels images the pool still
holds, uncertainty picks the most-disagreed images, and only val is scored."""
from __future__ import annotations

import numpy as np

from analyses.active_learning import pick_uncertain, run, summary
from analyses.report import active_learning_section
from pipeline.config import load_params
from tests.helpers import make_project, run_stage


def test_uncertainty_picks_the_images_with_the_highest_top_decile_disagreement():
    pixels = 10
    disagreement = np.zeros(4 * pixels, dtype=np.float32)
    disagreement[1 * pixels] = 5.0  # one very uncertain pixel in candidate 1 (its top decile)
    disagreement[3 * pixels:4 * pixels] = 0.3  # candidate 3 uniformly a little uncertain
    assert pick_uncertain(disagreement, [7, 8, 9, 12], 1, pixels, "top_decile") == [8]
    assert pick_uncertain(disagreement, [7, 8, 9, 12], 2, pixels, "top_decile") == [8, 12]
    assert pick_uncertain(disagreement, [7, 8, 9, 12], 1, pixels, "mean") == [8]  # 0.5 mean against 0.3


def test_both_strategies_grow_from_the_same_start_and_score_val(tmp_path):
    paths = make_project(tmp_path)
    result = run_stage("extract", "--params", paths["params"], "--stores", tmp_path / "features" / "t{t}.zarr",
                       "--data", paths["data"], "--checkpoint", paths["checkpoint"])
    assert result.returncode == 0, result.stderr
    record = run(load_params(paths["params"]), str(tmp_path / "features" / "t{t}.zarr"), start=2, add=2, rounds=2,
                 seeds=[0], members=2, fit_steps=2)
    assert record["split"] == "val" and record["pool_images"] == 6
    curves = {s: [c for c in record["curves"] if c["strategy"] == s] for s in ("uncertainty", "random")}
    assert curves["uncertainty"][0]["images"] == curves["random"][0]["images"]  # the same start
    for curve in curves.values():
        assert [c["labeled"] for c in curve] == [2, 4, 6]
        assert all(set(a["images"]) < set(b["images"]) for a, b in zip(curve, curve[1:]))  # nested, new images only
        assert all(0 <= c["val_miou"] <= 1 for c in curve)
    table = summary(record)
    assert list(table["labeled"]) == [2, 4, 6, 2, 4, 6] and (table["seeds"] == 1).all()
    text = "\n".join(active_learning_section(record, tmp_path))
    assert (tmp_path / "active_learning.png").is_file() and "| labeled |" in text

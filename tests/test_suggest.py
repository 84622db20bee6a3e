"""The suggest stage: ranking by uncertainty, the k-center pick, the Label Studio polygons, and the stage
end to end on a tiny project (prepared digits, untrained DDPM, random ensemble)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from pipeline.analysis.suggest import Scored, choose, image_score, k_center, mean_row, pool_sample, rank_maps, ranked
from pipeline.config import load_params, params_from_dict
from pipeline.enums import SuggestScore
from pipeline.errors import ConfigError
from pipeline.outputs.suggestions import class_polygons, label_studio_task
from tests.helpers import make_project, run_stage, write_params
from tests.test_segment import save_random_ensemble


def test_both_scores_of_a_hand_made_map():
    values = np.zeros((10, 10), np.float32)
    values[0, :] = 0.5  # the top decile: 10 of 100 pixels
    assert image_score(values, SuggestScore.MEAN) == pytest.approx(0.05)
    assert image_score(values, SuggestScore.TOP_DECILE) == pytest.approx(0.5)


def test_the_two_scores_rank_differently_and_ties_go_by_name():
    spread = np.full((10, 10), 0.1, np.float32)  # mean 0.1, top decile 0.1
    peaked = np.zeros((10, 10), np.float32)
    peaked[:2, :] = 0.4  # mean 0.08, top decile 0.4
    calm = np.zeros((10, 10), np.float32)
    maps = {"c.png": calm, "peaked.png": peaked, "b_spread.png": spread, "a_spread.png": spread.copy()}
    by_mean = rank_maps(maps, SuggestScore.MEAN)
    assert [name for name, _ in by_mean] == ["a_spread.png", "b_spread.png", "peaked.png", "c.png"]
    by_top = rank_maps(maps, SuggestScore.TOP_DECILE)
    assert [name for name, _ in by_top] == ["peaked.png", "a_spread.png", "b_spread.png", "c.png"]
    assert by_top[0][1] == pytest.approx(0.4)
    # the order the pool came in does not matter
    assert ranked(reversed(by_mean)) == by_mean


def test_k_center_picks_one_point_per_cluster():
    rng = np.random.default_rng(0)
    centres = np.array([[0, 0], [10, 0], [0, 10], [10, 10]], dtype=float)
    # rows best-scored first: the first six all from cluster 0, then the others
    points = np.concatenate([centres[0] + rng.normal(0, 0.1, (6, 2))] +
                            [centre + rng.normal(0, 0.1, (3, 2)) for centre in centres[1:]])
    cluster = np.array([0] * 6 + [1] * 3 + [2] * 3 + [3] * 3)
    picks = k_center(points, 4)
    assert picks[0] == 0
    assert sorted(cluster[picks]) == [0, 1, 2, 3]
    assert k_center(points, 100) == k_center(points, len(points))  # never more picks than points
    assert len(set(k_center(points, len(points)))) == len(points)
    # as suggestions: without diversity the best-scored four (all of cluster 0), with it one per cluster, in
    # score order
    items = [Scored(f"{i:02d}.png", Path(f"{i:02d}.png"), 1.0 - i / 100, np.zeros((1, 1), np.uint8),
                    np.zeros((1, 1), np.float32), point) for i, point in enumerate(points)]
    assert {cluster[int(item.name[:2])] for item in choose(items, 4, diversity=False)} == {0}
    spread = choose(items, 4, diversity=True)
    assert sorted(cluster[int(item.name[:2])] for item in spread) == [0, 1, 2, 3]
    assert [item.score for item in spread] == sorted((item.score for item in spread), reverse=True)


def test_k_center_ties_go_to_the_better_scored_row():
    points = np.array([[0.0], [1.0], [-1.0], [1.0]])
    assert k_center(points, 2) == [0, 1]
    assert k_center(np.zeros((3, 2)), 3) == [0, 1, 2]  # duplicates: still distinct rows, in score order


def test_diversity_needs_at_least_count_candidates():
    with pytest.raises(ConfigError, match="suggest.candidates=5 must be >= suggest.count=10"):
        params_from_dict({"suggest": {"diversity": True, "candidates": 5, "count": 10}})
    params_from_dict({"suggest": {"diversity": False, "candidates": 5, "count": 10}})  # candidates unused


def test_the_mean_row_is_the_mean_in_chunks():
    rows = torch.from_numpy(np.random.default_rng(0).normal(size=(1000, 5)).astype(np.float16))
    np.testing.assert_allclose(mean_row(rows, chunk=64), rows.float().mean(0).numpy(), atol=1e-5)


def test_the_pool_sample_is_seeded_and_in_name_order(tmp_path):
    paths = [tmp_path / f"{i:03d}.png" for i in range(50)]
    first = pool_sample(paths, 10, seed=0)
    assert first == pool_sample(paths, 10, seed=0) and first == sorted(first)
    assert first != pool_sample(paths, 10, seed=1)
    assert pool_sample(paths, 500, seed=0) == paths


def test_polygons_trace_each_region_without_its_holes():
    mask = np.zeros((8, 8), np.uint8)
    mask[1:6, 1:6] = 3  # a ring: its hole is background
    mask[3, 3] = 0
    mask[7, 6:8] = 3  # a second region, at the border
    polygons = class_polygons(mask, 3)
    assert len(polygons) == 2
    for polygon in polygons:
        points = np.array(polygon)
        assert points.min() >= 0 and points[:, 0].max() <= 8 and points[:, 1].max() <= 8
    ring = max(polygons, key=len)
    xs, ys = np.array(ring).T
    assert (xs.min(), xs.max(), ys.min(), ys.max()) == (1.0, 6.0, 1.0, 6.0)  # the pixel edges of [1, 6)
    task = label_studio_task("/x/a.png", mask, [f"c{i}" for i in range(4)], 255, 0.25, "v")
    results = task["predictions"][0]["result"]
    assert task["data"] == {"image": "/x/a.png"} and len(results) == 2
    assert {r["type"] for r in results} == {"polygonlabels"} and results[0]["value"]["polygonlabels"] == ["c3"]
    assert all(0 <= v <= 100 for r in results for point in r["value"]["points"] for v in point)
    assert results[0]["original_width"] == 8


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    paths = make_project(tmp_path_factory.mktemp("project"), {"dataset.unlabeled_images": 12})
    paths["ensemble"] = paths["params"].parent / "ensemble.pt"
    save_random_ensemble(paths["ensemble"], load_params(paths["params"]), paths["checkpoint"])
    return paths


def suggest(project, tmp_path, suggest_params: dict, out, plot):
    params = write_params(tmp_path / "params.yaml", {"dataset.unlabeled_images": 12, "suggest": suggest_params})
    return run_stage("suggest", "--params", params, "--checkpoint", project["checkpoint"], "--ensemble",
                     project["ensemble"], "--data", project["data"], "--out", out, "--plot", plot)


def test_the_stage_writes_the_table_images_tasks_and_figure(project, tmp_path):
    out, plot = tmp_path / "suggestions", tmp_path / "plots" / "suggestions.png"
    result = suggest(project, tmp_path, {"pool_images": 8, "count": 3, "diversity": True, "candidates": 5}, out, plot)
    assert result.returncode == 0, result.stderr
    assert "3 of 8 unlabeled images" in result.stdout
    table = pd.read_csv(out / "suggestions.csv")
    assert list(table.columns) == ["rank", "image", "score", "classes"] and list(table["rank"]) == [1, 2, 3]
    assert (table["score"] > 0).all() and (table["score"] <= math.log(3) + 1e-6).all()  # JS of 3 members <= ln 3
    assert sorted(p.name for p in (out / "images").iterdir()) == sorted(table["image"])
    for name in table["image"]:
        assert (out / "images" / name).read_bytes() == (project["data"] / "unlabeled" / name).read_bytes()
    tasks = json.loads((out / "label_studio_tasks.json").read_text())
    assert [t["data"]["image"] for t in tasks] == [f"/data/local-files/?d=suggestions/images/{n}" for n in table["image"]]
    assert [t["predictions"][0]["score"] for t in tasks] == pytest.approx(list(table["score"]), abs=1e-6)
    assert any(t["predictions"][0]["result"] for t in tasks)  # a random ensemble predicts classes besides 0
    assert "<PolygonLabels" in (out / "label_studio_config.xml").read_text()
    assert Image.open(plot).size[0] > 200


def test_without_diversity_the_top_scored_are_suggested_and_a_larger_pool_finds_no_less(project, tmp_path):
    tables = []
    for pool in (6, 12):
        out = tmp_path / f"out{pool}"
        result = suggest(project, tmp_path, {"pool_images": pool, "count": 2, "score": "mean"}, out, out / "s.png")
        assert result.returncode == 0, result.stderr
        tables.append(pd.read_csv(out / "suggestions.csv"))
    # the whole pool (12 images) holds the sample of 6: its best scores at least as high
    assert tables[1]["score"].iloc[0] >= tables[0]["score"].iloc[0]
    assert list(tables[0]["score"]) == sorted(tables[0]["score"], reverse=True)


def test_no_unlabeled_images_gives_empty_outputs_not_a_failure(project, tmp_path):
    data = tmp_path / "prepared"
    (data / "unlabeled").mkdir(parents=True)  # a dataset without unlabeled images (an imported checkpoint)
    params = write_params(tmp_path / "params.yaml", {"dataset.unlabeled_images": 12})
    out = tmp_path / "suggestions"
    result = run_stage("suggest", "--params", params, "--checkpoint", project["checkpoint"], "--ensemble",
                       project["ensemble"], "--data", data, "--out", out, "--plot", tmp_path / "s.png")
    assert result.returncode == 0, result.stderr
    assert "holds no images" in result.stderr
    assert len(pd.read_csv(out / "suggestions.csv")) == 0 and json.loads((out / "label_studio_tasks.json").read_text()) == []
    assert (out / "images").is_dir() and (tmp_path / "s.png").is_file()

"""Stage label (DatasetDDPM): samples segmented by the ensemble, ranked by uncertainty, the uncertain dropped."""
from __future__ import annotations

import json
import sys

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from pipeline.api import Segmenter
from pipeline.config import load_params, params_from_dict
from pipeline.data.samples import open_samples
from pipeline.datasetddpm.label import kept_by_uncertainty
from pipeline.errors import ConfigError
from stages import label as label_stage
from stages import sample as sample_stage
from tests.helpers import exit_code_2_stderr, save_random_ensemble, tiny_checkpoint, write_params

# seven images, uncertainty by hand; ranked from least to most uncertain: 4, 1, 6, 0, 5, 2, 3 (1 and 6 tie)
UNCERTAINTY = [0.30, 0.10, 0.50, 0.90, 0.05, 0.40, 0.10]


@pytest.mark.parametrize("drop_uncertain, drop_least, kept", [
    (0.0, 0, [0, 1, 2, 3, 4, 5, 6]),
    (0.1, 0, [0, 1, 2, 3, 4, 5, 6]),  # 0.7 images rounds down to none
    (0.3, 0, [0, 1, 4, 5, 6]),        # 2.1 -> 2: the two most uncertain, 3 and 2
    (0.43, 0, [0, 1, 4, 6]),          # 3.01 -> 3: 3, 2 and 5
    (0.43, 1, [0, 1, 5, 6]),          # the official window idxs[1:-3+1]: 4 (least) and only 3, 2 (most) go
    (0.43, 3, [0, 2, 3, 5]),          # idxs[3:]: the three least uncertain, none of the most
    (0.86, 0, [4]),                   # 6.02 -> 6: only the least uncertain stays
])
def test_the_filter_keeps_exactly_the_documented_images(drop_uncertain, drop_least, kept):
    keep = kept_by_uncertainty(UNCERTAINTY, drop_uncertain, drop_least)
    assert np.flatnonzero(keep).tolist() == kept


def test_the_filter_ranks_ties_by_index_and_refuses_a_window_past_the_ranking():
    # 1 and 6 tie at 0.10: 1 ranks as less uncertain, so dropping the 3 least uncertain takes 4, 1, 6 (all three)
    # and dropping 2 takes 4 and 1
    assert np.flatnonzero(~kept_by_uncertainty(UNCERTAINTY, 0.3, 2)).tolist() == [1, 4]
    with pytest.raises(ValueError, match="drop_least_uncertain=3 is more than the 2 images"):
        kept_by_uncertainty(UNCERTAINTY, 0.3, 3)
    with pytest.raises(ConfigError, match="datasetddpm.drop_least_uncertain=4 is more than the 3 images"):
        params_from_dict({"sample": {"images": 32}, "datasetddpm": {"drop_least_uncertain": 4}})
    with pytest.raises(ConfigError, match="datasetddpm.drop_uncertain must be < 1"):
        params_from_dict({"datasetddpm": {"drop_uncertain": 1.0}})


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = tmp_path_factory.mktemp("label")
    params = write_params(root / "params.yaml", {"sample.images": 6, "sample.batch_size": 3, "sample.steps": 2,
                                                 "datasetddpm.drop_uncertain": 0.5, "datasetddpm.grid_images": 2})
    checkpoint = tiny_checkpoint(root, params)
    save_random_ensemble(root / "ensemble.pt", load_params(params), checkpoint)
    return root, params, checkpoint


def run(monkeypatch, main, *argv):
    monkeypatch.setenv("DDPM_SEG_THREADS", "1")
    monkeypatch.setattr(sys, "argv", ["stage", *map(str, argv)])
    main()


def label_args(root, params, checkpoint, out):
    return ("--params", params, "--samples", root / "images.zarr", "--checkpoint", checkpoint, "--ensemble",
            root / "ensemble.pt", "--out", out / "synthetic", "--metrics", out / "label.json", "--table",
            out / "uncertainty.csv", "--figure", out / "samples.png")


def test_label_writes_the_kept_samples_with_the_segment_path_masks(project, monkeypatch, tmp_path):
    root, params, checkpoint = project
    run(monkeypatch, sample_stage.main, "--params", params, "--checkpoint", checkpoint, "--out", root / "images.zarr")
    run(monkeypatch, label_stage.main, *label_args(root, params, checkpoint, tmp_path))
    table = pd.read_csv(tmp_path / "uncertainty.csv")
    assert table["image"].tolist() == [f"sample_{i:05d}" for i in range(6)]
    expected = kept_by_uncertainty(table["uncertainty"].to_numpy(), 0.5)
    assert table["kept"].tolist() == expected.tolist() and expected.sum() == 3
    assert table["rank"].tolist() == np.argsort(np.argsort(table["uncertainty"], kind="stable"), kind="stable").tolist()
    kept = table.loc[table["kept"], "image"].tolist()
    assert sorted(path.name for path in (tmp_path / "synthetic").iterdir()) == sorted(
        [f"{stem}.png" for stem in kept] + [f"{stem}.npy" for stem in kept])
    metrics = json.loads((tmp_path / "label.json").read_text())
    assert (metrics["images"], metrics["kept"], metrics["dropped"], metrics["dropped_most_uncertain"]) == (6, 3, 3, 3)
    assert metrics["uncertainty"]["max"] == pytest.approx(table["uncertainty"].max(), abs=1e-6)
    assert metrics["uncertainty_dropped"]["min"] >= metrics["uncertainty_kept"]["max"]
    # the masks and scores are what the segment path (Segmenter, features_for_images + vote) gives these images
    images, _ = open_samples(root / "images.zarr")
    results = Segmenter.load(load_params(params), checkpoint, root / "ensemble.pt").predict(list(images[:]))
    for index, result in enumerate(results):
        stem = f"sample_{index:05d}"
        if stem in kept:
            assert np.array_equal(np.load(tmp_path / "synthetic" / f"{stem}.npy"), result.mask)
            assert np.array_equal(np.asarray(Image.open(tmp_path / "synthetic" / f"{stem}.png")), images[index])
        top = np.sort(result.uncertainty.reshape(-1))[-102:]  # 1024 pixels: the top 102
        assert table["uncertainty"][index] == pytest.approx(float(top.mean()), abs=1e-6)
    figure = Image.open(tmp_path / "samples.png")
    assert figure.width > 600 and figure.height > 200


def test_label_refuses_samples_of_another_checkpoint(project, monkeypatch, capsys, tmp_path):
    root, params, checkpoint = project
    if not (root / "images.zarr").exists():
        run(monkeypatch, sample_stage.main, "--params", params, "--checkpoint", checkpoint, "--out", root / "images.zarr")
    other = tiny_checkpoint(tmp_path, params)
    payload = torch.load(other, weights_only=True)
    payload["source"] = {"kind": "another"}  # same weights, another file: the store records the sampled file's hash
    torch.save(payload, other)
    stderr = exit_code_2_stderr(label_stage.main, ["label", *label_args(root, params, other, tmp_path)], monkeypatch,
                                capsys)
    assert "was sampled from another checkpoint" in stderr and not (tmp_path / "synthetic").exists()

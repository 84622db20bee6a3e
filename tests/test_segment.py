"""The segment stage and the Python API on a tiny project (prepared digits, untrained DDPM, random ensemble)."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pipeline.api import Segmenter
from pipeline.config import load_params
from pipeline.data.digits import compose_digit_split, load_mnist_5k, split_digit_pools
from tests.helpers import make_project, run_stage, save_random_ensemble, write_params


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    paths = make_project(tmp_path_factory.mktemp("project"))
    paths["ensemble"] = paths["params"].parent / "ensemble.pt"
    save_random_ensemble(paths["ensemble"], load_params(paths["params"]), paths["checkpoint"])
    return paths


def new_canvases(count: int, size: int = 32) -> list[np.ndarray]:
    """Canvases of digits from the unlabeled pool: in neither the labeled train nor the test split."""
    digits, labels = load_mnist_5k()
    pool = split_digit_pools(len(digits), seed=0)["unlabeled"]
    return [image for image, _ in compose_digit_split(digits, labels, pool, count, size, 24, seed=123)]


def segment(project, images, out, params=None, ensemble=None):
    return run_stage("segment", "--params", params or project["params"], "--checkpoint", project["checkpoint"],
                     "--ensemble", ensemble or project["ensemble"], "--images", images, "--out", out)


def test_extract_evaluate_and_segment_give_the_same_test_masks(project, tmp_path):
    params = load_params(project["params"])
    for t in params.t_steps:
        result = run_stage("extract", "--params", project["params"], "--t", t, "--data", project["data"],
                           "--checkpoint", project["checkpoint"], "--out", tmp_path / f"t{t}.zarr")
        assert result.returncode == 0, result.stderr
    outputs = {name: tmp_path / name for name in ("m.json", "v.json", "c.csv", "k.csv", "overlays", "predictions")}
    result = run_stage("evaluate", "--params", project["params"], "--stores", tmp_path / "t{t}.zarr",
                       "--ensemble", project["ensemble"], "--data", project["data"], "--metrics", outputs["m.json"],
                       "--val-metrics", outputs["v.json"], "--per-class", outputs["c.csv"], "--confusion",
                       outputs["k.csv"], "--overlays", outputs["overlays"], "--predictions", outputs["predictions"])
    assert result.returncode == 0, result.stderr
    result = segment(project, project["data"] / "real" / "test", tmp_path / "segmented")
    assert result.returncode == 0, result.stderr
    stems = sorted(p.stem for p in (project["data"] / "real" / "test").glob("*.png"))
    assert len(stems) == 4
    for stem in stems:
        evaluated = np.asarray(Image.open(outputs["predictions"] / f"{stem}.png"))
        segmented = np.asarray(Image.open(tmp_path / "segmented" / f"{stem}.png"))
        assert len(np.unique(evaluated)) > 1  # a mask of one class would make the comparison weak
        np.testing.assert_array_equal(segmented, evaluated)
        np.testing.assert_allclose(np.load(tmp_path / "segmented" / f"{stem}.uncertainty.npy"),
                                   np.load(outputs["predictions"] / f"{stem}.uncertainty.npy"), atol=1e-4)


def test_a_folder_of_new_images_with_bad_ones(project, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    canvases = new_canvases(3)
    Image.fromarray(canvases[0]).save(images / "small.png")
    Image.fromarray(canvases[1]).resize((48, 48), Image.BICUBIC).save(images / "larger.png")
    Image.fromarray(np.zeros((32, 40, 3), np.uint8)).save(images / "wide.png")  # non_square: error
    (images / "broken.png").write_bytes(Image.fromarray(canvases[2]).tobytes()[:50])
    (images / "notes.txt").write_text("not an image")
    result = segment(project, images, tmp_path / "out")
    assert result.returncode == 2, result.stderr
    assert "wide.png is 40x32, not square; crop it, or set dataset.non_square: center_crop" in result.stderr
    assert "broken.png cannot be read" in result.stderr and "2 of 4 images could not be segmented" in result.stderr
    assert "Traceback" not in result.stderr
    out = tmp_path / "out"
    for stem, size in (("small", 32), ("larger", 48)):
        assert np.asarray(Image.open(out / f"{stem}.png")).shape == (size, size)
        assert np.load(out / f"{stem}.uncertainty.npy").shape == (size, size)
        assert Image.open(out / f"{stem}.overlay.png").format == "PNG"  # image | prediction | uncertainty figure
        assert (out / f"{stem}.uncertainty.png").is_file()
    assert not list(out.glob("wide*")) and not list(out.glob("broken*")) and not list(out.glob("*.tmp"))
    summary = pd.read_csv(out / "summary.csv")
    assert sorted(summary["image"]) == ["larger", "small"]
    small = summary.set_index("image").loc["small"]
    mask = np.asarray(Image.open(out / "small.png"))
    assert small["pixels_background"] == (mask == 0).sum() and small["pixels_digit_3"] == (mask == 4).sum()
    assert small["mean_uncertainty"] == pytest.approx(np.load(out / "small.uncertainty.npy").mean(), abs=1e-6)


def test_api_maps_results_back_to_the_input_size(project, tmp_path):
    segmenter = Segmenter.load(project["params"], project["checkpoint"], project["ensemble"])
    canvas = new_canvases(1)[0]
    larger = np.asarray(Image.fromarray(canvas).resize((64, 64), Image.BICUBIC))
    prepared = np.asarray(Image.fromarray(larger).resize((32, 32), Image.BICUBIC))  # prepare's rule
    big, small = segmenter.predict([larger, prepared])
    assert big.mask.shape == (64, 64) and big.mask.dtype == np.uint8 and big.uncertainty.dtype == np.float32
    np.testing.assert_array_equal(big.mask, np.asarray(Image.fromarray(small.mask).resize((64, 64), Image.NEAREST)))
    np.testing.assert_array_equal(big.uncertainty, small.uncertainty.repeat(2, 0).repeat(2, 1))
    assert len(np.unique(small.mask)) > 1


def test_center_crop_marks_the_cut_away_pixels(project, tmp_path):
    params = write_params(tmp_path / "params.yaml", {"dataset.non_square": "center_crop"})
    segmenter = Segmenter.load(params, project["checkpoint"], project["ensemble"])
    canvas = new_canvases(1)[0]
    wide = np.concatenate([np.zeros((32, 4, 3), np.uint8), canvas, np.zeros((32, 4, 3), np.uint8)], axis=1)
    (cropped,) = segmenter.predict([wide])
    (square,) = segmenter.predict([canvas])
    assert cropped.mask.shape == (32, 40)
    np.testing.assert_array_equal(cropped.mask[:, 4:36], square.mask)
    assert (cropped.mask[:, :4] == 255).all() and (cropped.mask[:, 36:] == 255).all()
    assert np.isnan(cropped.uncertainty[:, :4]).all() and not np.isnan(cropped.uncertainty[:, 4:36]).any()


def test_an_ensemble_of_another_run_is_refused(project, tmp_path):
    params = write_params(tmp_path / "params.yaml", {"t_steps": [50]})
    result = segment(project, project["data"] / "real" / "test", tmp_path / "out", params=params)
    assert result.returncode == 2 and "was fit on other features than the params ask for" in result.stderr
    result = run_stage("segment", "--params", project["params"], "--checkpoint", project["checkpoint"], "--ensemble",
                       tmp_path / "none.pt", "--images", project["data"] / "real" / "test", "--out", tmp_path / "out")
    assert result.returncode == 2 and "none.pt does not exist; run the fit stage" in result.stderr


def test_stochastic_noise_is_refused_when_there_is_something_to_segment(project, tmp_path):
    params = write_params(tmp_path / "params.yaml", {"features.stochastic_noise": True})
    ensemble = tmp_path / "ensemble.pt"  # a run fit on stochastic noise: its ensemble records it
    save_random_ensemble(ensemble, load_params(params), project["checkpoint"])
    (tmp_path / "empty").mkdir()
    result = segment(project, tmp_path / "empty", tmp_path / "out", params=params, ensemble=ensemble)
    assert result.returncode == 0, result.stderr  # a run with nothing to segment (the dvc stage's default) passes
    result = segment(project, project["data"] / "real" / "test", tmp_path / "out", params=params, ensemble=ensemble)
    assert result.returncode == 2 and "features.stochastic_noise: true" in result.stderr
    result = segment(project, project["data"] / "real" / "test", tmp_path / "out2", params=params)
    assert result.returncode == 2 and "stochastic_noise False (asked: True)" in result.stderr  # fit on other noise

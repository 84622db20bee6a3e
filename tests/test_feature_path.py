"""One feature path: every caller that makes features of images without a store (segment and the API,
robustness, kmeans) gets exactly the bytes the extract stage stores for the same images."""
from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
import zarr

from pipeline.config import load_params
from pipeline.data.images import read_rgb
from pipeline.data.layout import Split, list_examples
from pipeline.ensemble.model import EnsembleMLP
from pipeline.features.compute import features_for_images
from pipeline.features.extraction import loaded_model
from pipeline.features.record import params_record
from pipeline.features.store import lazy_matrix, open_store
from tests.helpers import make_project, run_stage, write_params


@pytest.fixture(autouse=True)
def one_thread():
    """The stages run on one torch thread here (tests.helpers.run_stage); the UNet's float32 sums depend on it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = tmp_path_factory.mktemp("feature_path")
    paths = make_project(root, {"kmeans.t_steps": [50], "kmeans.blocks": [1, 3], "kmeans.images": 3})
    for t in (50, 150):
        result = run_stage("extract", "--params", paths["params"], "--t", t, "--data", paths["data"],
                           "--checkpoint", paths["checkpoint"], "--out", root / f"t{t}.zarr")
        assert result.returncode == 0, result.stderr
    paths["native_params"] = write_params(root / "native.yaml", {"features.layout": "native"})
    result = run_stage("extract", "--params", paths["native_params"], "--t", 150, "--data", paths["data"],
                       "--checkpoint", paths["checkpoint"], "--out", root / "native150.zarr")
    assert result.returncode == 0, result.stderr
    paths["root"] = root
    return paths


def stored_test_rows(project, blocks=None) -> np.ndarray:
    params = load_params(project["params"])
    stores = [open_store(project["root"] / f"t{t}.zarr", params_record(params, t)) for t in params.t_steps]
    matrix, _ = lazy_matrix(stores, "test", params.blocks if blocks is None else blocks)
    return matrix.compute()


def capture_votes(monkeypatch, module) -> list[np.ndarray]:
    """Replace ``module.vote`` by one that keeps the feature rows it is given (and votes class 0)."""
    seen = []

    def keep(model, matrix, **options):
        seen.append(np.asarray(matrix.compute()))
        return np.zeros(matrix.shape[0], np.uint8), np.zeros(matrix.shape[0], np.float32)

    monkeypatch.setattr(module, "vote", keep)
    return seen


def test_segment_and_the_api_vote_on_the_bytes_extract_stored(project, monkeypatch):
    import pipeline.api
    from pipeline.api import Segmenter

    params = load_params(project["params"])
    model, diffusion = loaded_model(str(project["checkpoint"]), "cpu")
    stored = stored_test_rows(project)
    segmenter = Segmenter(params, model, diffusion, EnsembleMLP(2, stored.shape[1], 11, seed=0))
    seen = capture_votes(monkeypatch, pipeline.api)
    files = [example.image_path for example in list_examples(project["data"], Split.TEST)]
    assert len(segmenter.predict(files)) == len(files) == 4
    assert np.concatenate(seen).tobytes() == stored.tobytes()


def test_robustness_votes_on_the_bytes_extract_stored(project, monkeypatch):
    import pipeline.analysis.robustness as robustness

    params = load_params(project["params"])
    model, diffusion = loaded_model(str(project["checkpoint"]), "cpu")
    stored = stored_test_rows(project)
    seen = capture_votes(monkeypatch, robustness)
    images = np.stack([read_rgb(e.image_path) for e in list_examples(project["data"], Split.TEST)])
    robustness.vote_on_images(model, diffusion, EnsembleMLP(2, stored.shape[1], 11, seed=0), params, images)
    assert np.concatenate(seen).tobytes() == stored.tobytes()


def test_kmeans_clusters_the_bytes_extract_stored(project, monkeypatch, tmp_path):
    import stages.kmeans

    seen = {}
    real_kmeans = stages.kmeans.kmeans

    def keep(points, k, iterations, seed):
        seen.setdefault("points", []).append(points.clone())
        return real_kmeans(points, k, iterations, seed)

    monkeypatch.setattr(stages.kmeans, "kmeans", keep)
    monkeypatch.setattr(sys, "argv", ["kmeans", "--params", str(project["params"]), "--checkpoint",
                                      str(project["checkpoint"]), "--data", str(project["data"]), "--out", str(tmp_path / "k")])
    stages.kmeans.main()
    pixels = 32 * 32
    for position, block in enumerate((1, 3)):  # kmeans.t_steps [50] x blocks [1, 3], 3 images each
        stored = stored_test_rows(project, [block])[:, : stored_test_rows(project, [block]).shape[1] // 2]  # t = 50
        points = torch.cat(seen["points"][position * 3 : position * 3 + 3]).numpy()
        assert np.array_equal(points, stored[: 3 * pixels].astype(np.float32)), block


def test_native_maps_are_the_bytes_of_a_native_store(project):
    params = load_params(project["native_params"])
    model, diffusion = loaded_model(str(project["checkpoint"]), "cpu")
    files = [example.image_path for example in list_examples(project["data"], Split.TEST)]
    group = zarr.open_group(str(project["root"] / "native150.zarr"), mode="r")
    blocks = params.features.store_blocks
    for index, maps in features_for_images(model, diffusion, files, options=params.features, t_steps=[150],
                                           blocks=blocks, split="test", layout=params.features.layout):
        for block, values in zip(blocks, maps):
            assert values.numpy().tobytes() == np.asarray(group[f"test/block{block}"][index]).tobytes()


def test_new_images_refuse_the_stochastic_noise_and_stored_ones_take_theirs(project):
    params = load_params(write_params(project["root"] / "stochastic.yaml", {"features.stochastic_noise": True}))
    model, diffusion = loaded_model(str(project["checkpoint"]), "cpu")
    image = read_rgb(list_examples(project["data"], Split.TEST)[0].image_path)
    options = dict(options=params.features, t_steps=[50], blocks=[1])
    with pytest.raises(Exception, match="features.stochastic_noise: true"):
        next(features_for_images(model, diffusion, [image], **options))
    (_, first), = features_for_images(model, diffusion, [image], split="test", indices=[0], **options)
    (_, second), = features_for_images(model, diffusion, [image], split="test", indices=[1], **options)
    assert not torch.equal(first, second)  # each stored image index has its own noise


def test_robustness_holds_one_capped_batch_of_images_at_a_time(project, monkeypatch):
    """robustness' own copy concatenated every step's rows of features.batch_size images with no cap; through
    the feature path a batch is cut to fit FEATURE_BATCH_BYTES, and the votes do not change."""
    import pipeline.analysis.robustness as robustness
    import pipeline.features.compute as compute

    params = load_params(write_params(project["root"] / "batch4.yaml", {"features.batch_size": 4}))
    model, diffusion = loaded_model(str(project["checkpoint"]), "cpu")
    images = np.stack([read_rgb(e.image_path) for e in list_examples(project["data"], Split.TEST)])
    ensemble = EnsembleMLP(2, stored_test_rows(project).shape[1], 11, seed=0)
    seen = []
    real_feature_maps = compute.feature_maps

    def keep(model, diffusion, x0, **options):
        seen.append(x0.shape[0])
        return real_feature_maps(model, diffusion, x0, **options)

    monkeypatch.setattr(compute, "feature_maps", keep)
    whole = robustness.vote_on_images(model, diffusion, ensemble, params, images)
    assert seen == [4, 4]  # one batch of the 4 images per step
    per_image = 32 * 32 * stored_test_rows(project).shape[1] * 4  # float32 bytes of one image's maps, both steps
    real_images_per_batch = compute.images_per_batch
    monkeypatch.setattr(compute, "images_per_batch", lambda requested, size, dim: real_images_per_batch(
        requested, size, dim, budget_bytes=2 * per_image))
    seen.clear()
    capped = robustness.vote_on_images(model, diffusion, ensemble, params, images)
    assert seen == [2, 2, 2, 2]  # two images per batch under the cap, each step
    assert np.array_equal(capped, whole)


def test_images_larger_than_the_model_get_noise_and_maps_of_their_own_size(project):
    """The UNet is convolutional: 64 px images through the 32 px digits model draw 64 px noise (the shared noise of
    a 64 px model: the same seed at that size) and give 64 x 64 rows; an image of another size is refused by name."""
    import dataclasses

    params = load_params(project["params"])
    model, diffusion = loaded_model(str(project["checkpoint"]), "cpu")
    small = read_rgb(list_examples(project["data"], Split.TEST)[0].image_path)
    large = np.kron(small, np.ones((2, 2, 1), dtype=np.uint8))  # 64 x 64
    options = dict(options=params.features, t_steps=[50], blocks=[1, 3])
    (_, rows), = features_for_images(model, diffusion, [large], **options)
    assert rows.shape[0] == 64 * 64
    told = dataclasses.replace(model.config, image_size=64)  # what the benchmark once had to tell the model
    real = model.config
    model.config = told
    try:
        (_, expected), = features_for_images(model, diffusion, [large], **options)
    finally:
        model.config = real
    assert torch.equal(rows, expected)
    (_, own), = features_for_images(model, diffusion, [small], **options)
    assert own.shape[0] == 32 * 32
    with pytest.raises(Exception, match="image 1 is 32x32 px, but the first image is 64x64"):
        list(features_for_images(model, diffusion, [large, small], **{**options, "options": params.features.model_copy(
            update={"batch_size": 1})}))
    with pytest.raises(Exception, match="image 1 is 32x32 px, but the first image is 64x64"):  # within one batch too
        list(features_for_images(model, diffusion, [large, small], **options))
    files = [example.image_path for example in list_examples(project["data"], Split.TEST)][:2]
    (_, from_file), _ = features_for_images(model, diffusion, files, **options)  # the size from the file's header
    assert from_file.shape[0] == 32 * 32

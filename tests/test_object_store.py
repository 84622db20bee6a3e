"""Feature stores on object storage: the stages against a local S3 endpoint (moto's server), compared with local stores."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import zarr

from pipeline.features.record import StoreRecord
from pipeline.features.store import StoreError, create_or_resume, open_store
from tests.helpers import make_project, run_stage, write_params

pytestmark = pytest.mark.slow

SIZES = {"dataset.train_images": 6, "dataset.test_images": 4, "features.batch_size": 2}
BUCKET = "features"


@pytest.fixture(scope="module")
def s3():
    """A local S3 endpoint that the stages' subprocesses (and dask workers) reach through fsspec's env config."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    with pytest.MonkeyPatch.context() as patch:
        for name, value in {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
                            "FSSPEC_S3_ENDPOINT_URL": f"http://{host}:{port}"}.items():
            patch.setenv(name, value)
        import fsspec.config

        # fsspec reads FSSPEC_S3_* when it is imported: subprocesses see the env, this process needs the conf
        patch.setitem(fsspec.config.conf, "s3", {"endpoint_url": f"http://{host}:{port}"})
        fsspec.filesystem("s3", skip_instance_cache=True).mkdir(BUCKET)
        yield f"s3://{BUCKET}"
    server.stop()


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    return make_project(tmp_path_factory.mktemp("objstore"), SIZES)


def extract(project, params, t, out):
    result = run_stage("extract", "--params", params, "--t", t, "--data", project["data"],
                       "--checkpoint", project["checkpoint"], "--out", out)
    assert result.returncode == 0, result.stderr
    return result


def fit_and_evaluate(project, params, stores, out):
    out.mkdir()
    fitted = run_stage("fit", "--params", params, "--stores", stores, "--out", out / "ensemble.pt", "--curves", out / "fit.csv")
    assert fitted.returncode == 0, fitted.stderr
    evaluated = run_stage("evaluate", "--params", params, "--stores", stores, "--ensemble", out / "ensemble.pt",
                          "--data", project["data"], "--metrics", out / "eval.json", "--per-class", out / "per_class.csv",
                          "--confusion", out / "confusion.csv", "--overlays", out / "overlays",
                          "--val-metrics", out / "val.json", "--predictions", out / "predictions")
    assert evaluated.returncode == 0, evaluated.stderr
    return json.loads((out / "eval.json").read_text()), torch.load(out / "ensemble.pt", weights_only=True)["state_dict"]


def test_stages_on_s3_stores_give_what_local_stores_give(project, s3, tmp_path):
    """extract writes the store to S3 from the stage itself (from a dask worker: the native test below), and fit and
    evaluate read it there to the same weights and metrics as from a local store."""
    params = write_params(tmp_path / "p.yaml", {**SIZES, "t_steps": [50]})
    extract(project, params, 50, tmp_path / "t50.zarr")
    extract(project, params, 50, f"{s3}/run/t50.zarr")
    remote, local = zarr.open_group(f"{s3}/run/t50.zarr", mode="r"), zarr.open_group(tmp_path / "t50.zarr", mode="r")
    for name in ("train/features", "train/labels", "val/features", "test/features", "test/labels"):
        assert np.array_equal(remote[name][:], local[name][:]), name
    assert dict(remote.attrs) == dict(local.attrs) and remote.attrs["complete"] is True
    local_metrics, local_weights = fit_and_evaluate(project, params, str(tmp_path / "t{t}.zarr"), tmp_path / "local")
    remote_metrics, remote_weights = fit_and_evaluate(project, params, f"{s3}/run/t{{t}}.zarr", tmp_path / "remote")
    assert remote_metrics == local_metrics
    assert all(torch.equal(remote_weights[key], local_weights[key]) for key in local_weights)


def test_a_native_store_on_s3_from_a_dask_worker_is_the_local_one(project, s3, tmp_path):
    native = {**SIZES, "features.layout": "native", "blocks": [3, 1]}
    params = write_params(tmp_path / "p.yaml", native)
    extract(project, params, 50, tmp_path / "t50.zarr")
    on_cluster = write_params(tmp_path / "cluster.yaml", {**native, "features.workers": 1})
    assert "(1 dask workers)" in extract(project, on_cluster, 50, f"{s3}/native/t50.zarr").stdout
    remote, local = zarr.open_group(f"{s3}/native/t50.zarr", mode="r"), zarr.open_group(tmp_path / "t50.zarr", mode="r")
    assert sorted(local["train"].array_keys()) == ["block0", "block1", "block2", "block3", "done", "labels"]
    for split in ("train", "val", "test"):
        for name in local[split].array_keys():
            assert np.array_equal(remote[f"{split}/{name}"][:], local[f"{split}/{name}"][:]), (split, name)
    assert dict(remote.attrs) == dict(local.attrs) and remote.attrs["complete"] is True
    read = [open_store(where, {"layout": "native"}).features("test", [3, 1]).compute()
            for where in (f"{s3}/native/t50.zarr", tmp_path / "t50.zarr")]
    assert np.array_equal(*read) and read[0].shape == (4 * 32 * 32, 32 + 64)


RECORD = StoreRecord(t=50, blocks=(1,), upsample="bilinear", noise_seed=0, stochastic_noise=False,
                     checkpoint_sha256="abc", image_size=4, feature_dim=3)


def test_an_interrupted_s3_store_is_refused_then_resumed(s3):
    url = f"{s3}/interrupted/t50.zarr"
    writer = create_or_resume(url, RECORD, {"train": ["a", "b"], "test": ["c"]}, chunk_pixels=16, codec="zstd", clevel=3)
    writer.write("train", 0, np.ones((16, 3), np.float16), np.zeros(16, np.uint8))
    with pytest.raises(StoreError, match="is incomplete"):  # written in place: only the complete flag guards it
        open_store(url, {"t": 50})
    resumed = create_or_resume(url, RECORD, {"train": ["a", "b"], "test": ["c"]}, chunk_pixels=16, codec="zstd", clevel=3)
    assert resumed.pending("train") == [1] and resumed.pending("test") == [0]
    resumed.write("train", 1, np.full((16, 3), 2, np.float16), np.ones(16, np.uint8))
    resumed.write("test", 0, np.full((16, 3), 3, np.float16), np.ones(16, np.uint8))
    assert resumed.finish() == url
    features = open_store(url, {"t": 50}).features("train").compute()
    assert features[:16].min() == 1 and features[16:].min() == 2
    # rerunning the stage on a finished store starts afresh rather than keeping the old rows
    again = create_or_resume(url, RECORD, {"train": ["a", "b"], "test": ["c"]}, chunk_pixels=16, codec="zstd", clevel=3)
    assert again.pending("train") == [0, 1] and not again.group.attrs["complete"]


def test_a_url_without_its_fsspec_package_is_a_clear_error(project, tmp_path):
    params = write_params(tmp_path / "p.yaml", SIZES)
    result = run_stage("extract", "--params", params, "--t", 50, "--data", project["data"],
                       "--checkpoint", project["checkpoint"], "--out", "nosuch://bucket/t50.zarr")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "cannot open the store location 'nosuch://bucket/t50.zarr'" in result.stderr

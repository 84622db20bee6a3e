"""Extraction fanned out over dask.distributed: the same store as in process, and clear errors."""
from __future__ import annotations

import numpy as np
import pytest
import zarr

from tests.helpers import make_project, run_stage, write_params

pytestmark = pytest.mark.slow

SIZES = {"dataset.train_images": 12, "dataset.test_images": 8, "features.batch_size": 2}


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    return make_project(tmp_path_factory.mktemp("distributed"), SIZES)


def extract(project, params, out):
    return run_stage("extract", "--params", params, "--t", "50", "--data", project["data"],
                     "--checkpoint", project["checkpoint"], "--out", out)


def test_two_local_workers_write_the_same_store_as_one_process(project, tmp_path):
    here = extract(project, write_params(tmp_path / "here.yaml", SIZES), tmp_path / "here.zarr")
    assert here.returncode == 0, here.stderr
    fanned = extract(project, write_params(tmp_path / "dask.yaml", {**SIZES, "features.workers": 2}),
                     tmp_path / "dask.zarr")
    assert fanned.returncode == 0, fanned.stderr
    assert "(2 dask workers)" in fanned.stdout
    ours, reference = zarr.open_group(tmp_path / "dask.zarr", mode="r"), zarr.open_group(tmp_path / "here.zarr", mode="r")
    for name in ("train/features", "train/labels", "test/features", "test/labels", "train/done", "test/done"):
        assert np.array_equal(ours[name][:], reference[name][:]), name
    assert ours["train/features"][:].any()
    assert dict(ours.attrs) == dict(reference.attrs)
    assert not (tmp_path / "dask.zarr.partial").exists()


def test_unreachable_scheduler_names_the_param_and_writes_nothing(project, tmp_path):
    params = write_params(tmp_path / "p.yaml", {**SIZES, "features.scheduler": "tcp://127.0.0.1:9"})
    result = extract(project, params, tmp_path / "t50.zarr")
    assert result.returncode == 2
    assert "features.scheduler='tcp://127.0.0.1:9': cannot reach a dask scheduler" in result.stderr
    assert not (tmp_path / "t50.zarr").exists() and not (tmp_path / "t50.zarr.partial").exists()


def test_negative_workers_is_a_params_error(tmp_path):
    params = write_params(tmp_path / "p.yaml", {"features.workers": -1})
    result = run_stage("prepare", "--params", params, "--out", tmp_path / "prepared")
    assert result.returncode == 2 and "features.workers must be >= 0" in result.stderr


def test_a_tls_scheduler_is_reached_with_the_certificate_params(project, tmp_path, monkeypatch):
    from distributed import LocalCluster
    from distributed.security import Security

    from tests.conftest import REPO

    monkeypatch.setenv("PYTHONPATH", str(REPO))  # the cluster's worker processes import pipeline
    security = Security.temporary()  # a throwaway CA-signed certificate, PEM text
    files = {}
    for key, text in (("ca", security.tls_ca_file), ("cert", security.tls_client_cert), ("key", security.tls_client_key)):
        files[key] = tmp_path / f"{key}.pem"
        files[key].write_text(text)
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, protocol="tls://", security=security,
                      dashboard_address=None) as cluster:
        assert cluster.scheduler_address.startswith("tls://")
        settings = {**SIZES, "features.scheduler": cluster.scheduler_address, "features.tls_ca_file": str(files["ca"]),
                    "features.tls_cert": str(files["cert"]), "features.tls_key": str(files["key"])}
        result = extract(project, write_params(tmp_path / "tls.yaml", settings), tmp_path / "tls.zarr")
        assert result.returncode == 0, result.stderr
        assert f"(dask scheduler {cluster.scheduler_address})" in result.stdout
        plain = extract(project, write_params(tmp_path / "plain.yaml", {**SIZES, "features.scheduler":
                                                                       cluster.scheduler_address.replace("tls://", "tcp://")}),
                        tmp_path / "plain.zarr")
        assert plain.returncode == 2 and "cannot reach a dask scheduler there" in plain.stderr  # no TLS, no entry
    assert zarr.open_group(tmp_path / "tls.zarr", mode="r").attrs["complete"]

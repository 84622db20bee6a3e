"""Stage sample: a zarr store of uint8 images, resumable after a kill, refusing bad params by key."""
from __future__ import annotations

import sys

import numpy as np
import pytest
import zarr

from pipeline.data.samples import SampleWriter, open_samples
from pipeline.errors import StoreError
from stages import sample as sample_stage
from tests.helpers import exit_code_2_stderr, tiny_checkpoint, write_params

SAMPLE = {"sample.images": 5, "sample.batch_size": 2, "sample.steps": 3}


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = tmp_path_factory.mktemp("sample")
    params = write_params(root / "params.yaml", SAMPLE)
    return root, params, tiny_checkpoint(root, params)


def run(monkeypatch, params, checkpoint, out):
    monkeypatch.setenv("DDPM_SEG_THREADS", "1")
    monkeypatch.setattr(sys, "argv", ["sample", "--params", str(params), "--checkpoint", str(checkpoint), "--out", str(out)])
    sample_stage.main()


def test_a_run_killed_after_its_first_batch_resumes_to_the_same_bytes(project, monkeypatch):
    root, params, checkpoint = project
    run(monkeypatch, params, checkpoint, root / "unbroken.zarr")
    unbroken, record = open_samples(root / "unbroken.zarr")
    assert unbroken.shape == (5, 32, 32, 3) and unbroken.dtype == np.uint8 and unbroken.chunks == (1, 32, 32, 3)
    assert record["steps"] == 3 and record["eta"] is None and len(np.unique(unbroken[:])) > 10

    real_write, calls = SampleWriter.write, []

    def killed_after_first_batch(self, indices, images):
        if calls:
            raise KeyboardInterrupt  # as a kill between batches
        calls.append(indices)
        real_write(self, indices, images)

    monkeypatch.setattr(SampleWriter, "write", killed_after_first_batch)
    with pytest.raises(KeyboardInterrupt):
        run(monkeypatch, params, checkpoint, root / "resumed.zarr")
    partial = zarr.open_group(root / "resumed.zarr.partial", mode="r")
    assert partial["done"][:].tolist() == [1, 1, 0, 0, 0] and not (root / "resumed.zarr").exists()
    with pytest.raises(StoreError, match="interrupted sampling left a .partial store"):
        open_samples(root / "resumed.zarr")

    monkeypatch.setattr(SampleWriter, "write", real_write)
    resumed_batches = []
    monkeypatch.setattr(SampleWriter, "write", lambda self, indices, images: (resumed_batches.append(indices),
                                                                             real_write(self, indices, images)))
    run(monkeypatch, params, checkpoint, root / "resumed.zarr")
    assert resumed_batches == [[2, 3], [4]]  # only the pending images were sampled
    resumed, _ = open_samples(root / "resumed.zarr")
    assert resumed[:].tobytes() == unbroken[:].tobytes()
    assert not (root / "resumed.zarr.partial").exists()


def test_the_bytes_do_not_depend_on_the_batch_size(project, monkeypatch, tmp_path):
    root, _, checkpoint = project
    run(monkeypatch, write_params(tmp_path / "params.yaml", {**SAMPLE, "sample.batch_size": 5}), checkpoint,
        tmp_path / "one_batch.zarr")
    if not (root / "unbroken.zarr").exists():
        run(monkeypatch, root / "params.yaml", checkpoint, root / "unbroken.zarr")
    assert open_samples(tmp_path / "one_batch.zarr")[0][:].tobytes() == open_samples(root / "unbroken.zarr")[0][:].tobytes()


@pytest.mark.parametrize("override, message", [
    ({"sample.steps": 2000}, "sample.steps=2000 is more than ddpm.diffusion_steps=1000"),
    ({"sample.eta": -0.5}, "sample.eta must be >= 0"),
    ({"sample.eta": 1.5}, "sample.eta must be <= 1"),
    ({"sample.steps": "ddim999"}, "sample.steps='ddim999' is not a respacing"),
])
def test_bad_params_are_refused_at_load_naming_the_key(project, monkeypatch, capsys, tmp_path, override, message):
    _, _, checkpoint = project
    params = write_params(tmp_path / "params.yaml", {**SAMPLE, **override})
    stderr = exit_code_2_stderr(sample_stage.main, ["sample", "--params", params, "--checkpoint", checkpoint,
                                                    "--out", tmp_path / "out.zarr"], monkeypatch, capsys)
    assert message in stderr and not (tmp_path / "out.zarr.partial").exists()

"""SIGKILL in the middle of extract and of fit, then rerun: same result as an uninterrupted run."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import yaml
import zarr

from tests.conftest import REPO
from tests.helpers import make_project

pytestmark = pytest.mark.slow

ENV = dict(os.environ, PYTHONPATH=str(REPO), DDPM_SEG_THREADS="1")


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    return make_project(tmp_path_factory.mktemp("crash"), {"dataset.train_images": 40, "dataset.val_images": 0, "dataset.test_images": 20,
                                                           "ensemble.epochs": 40, "ensemble.patience": 40})


def extract_command(project, out):
    return [sys.executable, "-m", "stages.extract", "--params", str(project["params"]), "--t", "50",
            "--data", str(project["data"]), "--checkpoint", str(project["checkpoint"]), "--out", str(out)]


def done_count(partial):
    try:
        group = zarr.open_group(partial, mode="r")
        return int(group["train/done"][:].sum())
    except Exception:
        return 0


def test_killed_extraction_resumes_to_the_same_store(project, tmp_path):
    reference = tmp_path / "reference.zarr"
    assert subprocess.run(extract_command(project, reference), env=ENV, cwd=REPO, capture_output=True).returncode == 0
    out = tmp_path / "t50.zarr"
    partial = out.with_name("t50.zarr.partial")
    process = subprocess.Popen(extract_command(project, out), env=ENV, cwd=REPO, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while done_count(partial) < 3 and time.time() < deadline and process.poll() is None:
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait()
    written = done_count(partial)
    assert 3 <= written < 40, f"the kill landed after {written} images; expected mid-extraction"
    assert not out.exists()  # a killed run never leaves a store that looks complete
    result = subprocess.run(extract_command(project, out), env=ENV, cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    remaining = 40 - written + 20  # the missing train images and the 20 test images
    assert f"{remaining}/{remaining}" in result.stderr  # only images not yet written were extracted
    resumed, whole = zarr.open_group(out, mode="r"), zarr.open_group(reference, mode="r")
    for name in ("train/features", "train/labels", "test/features", "test/labels"):
        assert np.array_equal(resumed[name][:], whole[name][:]), name
    assert dict(resumed.attrs) == dict(whole.attrs)


def test_killed_fit_leaves_no_output_and_reruns_identically(project, tmp_path):
    store = tmp_path / "t50.zarr"
    assert subprocess.run(extract_command(project, store), env=ENV, cwd=REPO, capture_output=True).returncode == 0
    params = tmp_path / "params.yaml"
    settings = yaml.safe_load(project["params"].read_text())
    settings["t_steps"] = [50]
    settings["ensemble"].update(epochs=5, patience=5)  # the kill lands in epoch 2 or 3 of 5; two whole fits follow
    params.write_text(yaml.safe_dump(settings))

    def command(out):
        return [sys.executable, "-m", "stages.fit", "--params", str(params), "--stores", str(tmp_path / "t{t}.zarr"),
                "--out", str(out), "--curves", str(tmp_path / f"{out.stem}.csv")]

    out = tmp_path / "ensemble.pt"
    process = subprocess.Popen(command(out), env=ENV, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    for line in process.stdout:
        if "epoch 2:" in line:
            break
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not out.exists()
    for target in (out, tmp_path / "uninterrupted.pt"):
        result = subprocess.run(command(target), env=ENV, cwd=REPO, capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
    first = torch.load(out, weights_only=True)["state_dict"]
    second = torch.load(tmp_path / "uninterrupted.pt", weights_only=True)["state_dict"]
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def test_fit_gives_the_same_weights_whatever_thread_count_the_process_is_given(project, tmp_path):
    """The fit stage computes on one thread per pass, so DDPM_SEG_THREADS (and runtime.threads) do not
    change its weights. The control: the same fit in this process with two threads against one differs,
    so the first check could fail."""
    from pipeline.config import load_params
    from pipeline.ensemble.fit import fit_ensemble
    from pipeline.features.store import lazy_matrix, open_store

    store = tmp_path / "t50.zarr"
    assert subprocess.run(extract_command(project, store), env=ENV, cwd=REPO, capture_output=True).returncode == 0
    settings = yaml.safe_load(project["params"].read_text())
    settings["t_steps"] = [50]
    settings["ensemble"].update(epochs=2, patience=2)
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(settings))
    weights = {}
    for process_threads in ("2", "1"):
        out = tmp_path / f"ensemble-{process_threads}.pt"
        result = subprocess.run([sys.executable, "-m", "stages.fit", "--params", str(params), "--stores",
                                 str(tmp_path / "t{t}.zarr"), "--out", str(out), "--curves", str(tmp_path / "f")],
                                env=dict(ENV, DDPM_SEG_THREADS=process_threads), cwd=REPO, capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
        state = torch.load(out, weights_only=True)["state_dict"]
        weights[process_threads] = b"".join(state[k].numpy().tobytes() for k in sorted(state))
    assert weights["2"] == weights["1"]
    loaded = load_params(params)
    matrix, labels = lazy_matrix([open_store(store, {})], "train")
    control, before = {}, torch.get_num_threads()
    try:
        for threads in (2, 1):
            torch.set_num_threads(threads)
            model, _ = fit_ensemble(matrix, labels, num_classes=loaded.dataset.num_classes,
                                    ignore_label=loaded.dataset.ignore_label,
                                    config=loaded.ensemble.model_copy(update={"parallel_passes": 1}),
                                    device=torch.device("cpu"))
            control[threads] = b"".join(v.numpy().tobytes() for _, v in sorted(model.state_dict().items()))
    finally:
        torch.set_num_threads(before)
    assert control[2] != control[1]

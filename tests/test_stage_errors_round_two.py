"""Issue 13 through the real stage CLIs: non-finite numbers stop the stage that made them, damaged or
foreign stores are refused, a resume after the inputs changed starts afresh, disk full in fit. Each
asserts exit code 2 (or 0 where the stage recovers), the message, no traceback, nothing half-written
and an earlier complete output kept."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from pipeline.diffusion.train import load_checkpoint, save_checkpoint
from tests.helpers import exit_code_2_stderr, full_disk_save, make_project, run_stage, write_params


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = tmp_path_factory.mktemp("numbers")
    project = make_project(root)
    project["one_step"] = write_params(root / "one_step.yaml", {"t_steps": [50]})
    assert extract(project, root / "t50.zarr").returncode == 0
    assert fit(project, root / "t{t}.zarr", root / "ensemble.pt").returncode == 0
    return project


def extract(project, out, checkpoint=None):
    return run_stage("extract", "--params", project["one_step"], "--t", 50, "--data", project["data"],
                     "--checkpoint", checkpoint or project["checkpoint"], "--out", out)


def fit(project, stores, out, params=None):
    return run_stage("fit", "--params", params or project["one_step"], "--stores", stores, "--out", out,
                     "--curves", out.with_suffix(".csv"))


def changed_checkpoint(project, path, change):
    model, diffusion, _ = load_checkpoint(project["checkpoint"])
    with torch.no_grad():
        change(model)
    save_checkpoint(path, model, diffusion, {"kind": "test"})
    return path


def nan_weight(model):
    model.input_blocks[0][0].weight[0, 0, 0, 0] = float("nan")


def huge_input(model):
    model.input_blocks[0][0].weight.mul_(1e6)  # the skip connections carry it to every decoder block


def copy_store(source, target):
    shutil.copytree(source, target)
    return target


@pytest.mark.parametrize("change, message", [
    (nan_weight, "gave NaN or infinite features; likely cause: the checkpoint holds NaN/inf weights"),
    (huge_input, "beyond the 65504 a float16 store holds (they would become inf)"),
])
def test_extract_stops_at_non_finite_or_float16_overflowing_features(project, tmp_path, change, message):
    checkpoint = changed_checkpoint(project, tmp_path / "bad.pt", change)
    out = copy_store(project["data"].parent / "t50.zarr", tmp_path / "t50.zarr")  # an earlier complete store
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    result = extract(project, out, checkpoint)
    assert result.returncode == 2, result.stderr
    assert "extract t=[50]: train image " in result.stderr and message in result.stderr
    assert "Traceback" not in result.stderr
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before  # the complete store is untouched
    import zarr

    partial = zarr.open_group(out.with_name("t50.zarr.partial"), mode="r")
    assert partial["train/done"][:].sum() == 0  # no image of the bad run was marked written


@pytest.mark.parametrize("value, message", [(70000.0, "has values up to 7e\\+04, beyond float16's 65504"),
                                            (-70000.0, "has values up to 7e\\+04, beyond float16's 65504"),
                                            (float("nan"), "has NaN or infinite values"),
                                            (float("-inf"), "has NaN or infinite values")])
def test_store_writer_refuses_values_float16_cannot_hold(tmp_path, value, message):
    from pipeline.errors import NumericsError
    from pipeline.features.record import StoreRecord
    from pipeline.features.store import create_or_resume

    record = StoreRecord(t=1, blocks=(1,), upsample="bilinear", noise_seed=0, stochastic_noise=False,
                         checkpoint_sha256="x", image_size=2, feature_dim=3)
    writer = create_or_resume(tmp_path / "s.zarr", record, {"train": ["a"]}, chunk_pixels=4, codec="zstd", clevel=3)
    rows = np.ones((4, 3), np.float32)
    rows[2, 1] = value
    with pytest.raises(NumericsError, match="train image 0 \\(a\\) " + message):
        writer.write("train", 0, rows, np.zeros(4, np.uint8))
    assert writer.pending("train") == [0]


@pytest.mark.parametrize("value, message", [(float("nan"), "image 3 gave NaN or infinite features"),
                                            (float("inf"), "image 3 gave NaN or infinite features"),
                                            (-1e6, "image 3 gave features up to 1e\\+06, beyond the 65504")])
def test_feature_check_names_the_image_of_the_batch_that_went_wrong(value, message):
    from pipeline.errors import NumericsError
    from pipeline.features.activations import check_feature_values

    maps = torch.zeros(3, 4, 2, 2)
    maps[1, 2, 1, 0] = value
    check_feature_values(torch.zeros(3, 4, 2, 2), [2, 3, 4], [50], lambda index: f"image {index}")
    with pytest.raises(NumericsError, match=message):
        check_feature_values(maps, [2, 3, 4], [50], lambda index: f"image {index}")


def test_fit_stops_when_the_loss_goes_nan_and_keeps_the_last_ensemble(project, tmp_path):
    out = tmp_path / "ensemble.pt"
    shutil.copy(project["data"].parent / "ensemble.pt", out)
    before = out.read_bytes()
    params = write_params(tmp_path / "p.yaml", {"t_steps": [50], "ensemble.lr": 1e30})
    result = fit(project, project["data"].parent / "t{t}.zarr", out, params)
    assert result.returncode == 2, result.stderr
    assert "fit: the loss of ensemble member(s) [" in result.stderr
    assert "likely cause: ensemble.lr=1e+30 is too high for these features" in result.stderr
    assert "Traceback" not in result.stderr
    assert out.read_bytes() == before and not out.with_name("ensemble.pt.tmp").exists()


def test_evaluate_refuses_nan_metrics_and_writes_no_json(project, tmp_path):
    data = tmp_path / "prepared"
    shutil.copytree(project["data"], data)
    for mask in (data / "real" / "test").glob("*.npy"):  # every test pixel is the ignore label
        np.save(mask, np.full(np.load(mask).shape, 255, np.uint8))
    out = tmp_path / "t50.zarr"
    assert run_stage("extract", "--params", project["one_step"], "--t", 50, "--data", data, "--checkpoint",
                     project["checkpoint"], "--out", out).returncode == 0
    ensemble = tmp_path / "ensemble.pt"
    assert fit(project, tmp_path / "t{t}.zarr", ensemble).returncode == 0
    metrics = tmp_path / "eval.json"
    metrics.write_text('{"miou": 0.5}\n')  # an earlier run's metrics
    result = run_stage("evaluate", "--params", project["one_step"], "--stores", tmp_path / "t{t}.zarr", "--ensemble",
                       ensemble, "--data", data, "--metrics", metrics, "--val-metrics", tmp_path / "val.json",
                       "--per-class", tmp_path / "c.csv", "--confusion", tmp_path / "m.csv", "--overlays",
                       tmp_path / "overlays", "--predictions", tmp_path / "predictions")
    assert result.returncode == 2, result.stderr
    assert "evaluate: miou_strict, pixel_accuracy of the test split came out as nan" in result.stderr
    assert "its masks hold no labeled pixels (0 of" in result.stderr and "Traceback" not in result.stderr
    assert json.loads(metrics.read_text()) == {"miou": 0.5} and not (tmp_path / "predictions").exists()


def fit_fails(project, tmp_path, store):
    out = tmp_path / "ensemble.pt"
    result = fit(project, store.parent / "t{t}.zarr", out)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and not out.exists() and not out.with_name("ensemble.pt.tmp").exists()
    return result.stderr


def test_a_missing_chunk_is_an_error_naming_the_store_and_chunk(project, tmp_path):
    store = copy_store(project["data"].parent / "t50.zarr", tmp_path / "t50.zarr")
    (store / "train" / "labels" / "c" / "3").unlink()  # zarr would read these rows back as label 0
    message = fit_fails(project, tmp_path, store)
    assert f"feature store {store} is damaged: 1 chunk(s) of train/labels are missing (c/3)" in message
    assert "delete the store and rerun its extract stage" in message


def test_a_corrupt_chunk_names_the_store_and_chunk(project, tmp_path):
    store = copy_store(project["data"].parent / "t50.zarr", tmp_path / "t50.zarr")
    (store / "train" / "features" / "c" / "2" / "0").write_bytes(b"not a blosc frame at all")
    message = fit_fails(project, tmp_path, store)
    assert f"feature store {store}: chunk c/2/0 of train/features cannot be decoded (RuntimeError" in message
    assert "the store is damaged: delete it and rerun its extract stage" in message


def interrupted(store):
    """Make a finished store look like an extraction killed after its first images."""
    import zarr

    partial = store.rename(store.with_name(store.name + ".partial"))
    group = zarr.open_group(partial, mode="r+")
    group.attrs["complete"] = False
    done = group["train/done"]
    done[2:] = 0
    return partial


def test_a_resume_after_the_masks_changed_starts_afresh_and_says_why(project, tmp_path):
    import zarr

    data = tmp_path / "prepared"
    shutil.copytree(project["data"], data)
    out = tmp_path / "t50.zarr"
    extract_data = ("extract", "--params", project["one_step"], "--t", 50, "--data", data, "--checkpoint",
                    project["checkpoint"], "--out", out)
    assert run_stage(*extract_data).returncode == 0
    interrupted(out)
    first_mask = sorted((data / "real" / "train").glob("*.npy"))[0]
    fixed = np.load(first_mask)
    fixed[:4] = 255  # the user fixes a mask of an image the interrupted run had already written
    np.save(first_mask, fixed)
    result = run_stage(*extract_data)
    assert result.returncode == 0, result.stderr
    assert "not resuming the interrupted extraction, starting afresh: the images or masks changed since it was " \
           "started (inputs_sha256 differs)" in result.stderr
    labels = zarr.open_group(out, mode="r")["train/labels"][: fixed.size]
    np.testing.assert_array_equal(labels, fixed.reshape(-1))  # the old rows of that image are gone


def test_a_resume_with_the_same_inputs_says_nothing_and_resumes(project, tmp_path):
    out = copy_store(project["data"].parent / "t50.zarr", tmp_path / "t50.zarr")
    interrupted(out)
    result = extract(project, out)
    assert result.returncode == 0, result.stderr
    assert "starting afresh" not in result.stderr and " 4/4 [" in result.stderr  # only the 4 unwritten images


@pytest.mark.parametrize("where", ["t50.zarr", "t50.zarr.partial"])
def test_a_location_that_is_not_our_store_is_never_replaced(project, tmp_path, where):
    foreign = tmp_path / where
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("years of work")
    out = tmp_path / "t50.zarr"
    result = extract(project, out)
    assert result.returncode == 2, result.stderr
    assert f"{foreign} exists but is not a feature store of this pipeline" in result.stderr
    assert "nothing was deleted: move it away, or give the stage another --out" in result.stderr
    assert "Traceback" not in result.stderr and (foreign / "thesis.tex").read_text() == "years of work"


def test_disk_full_while_saving_the_ensemble_keeps_the_last_one(project, tmp_path, monkeypatch, capsys):
    import stages.fit

    out = tmp_path / "ensemble.pt"
    shutil.copy(project["data"].parent / "ensemble.pt", out)
    before = out.read_bytes()
    monkeypatch.setattr(torch, "save", full_disk_save(torch.save))
    err = exit_code_2_stderr(stages.fit.main, ["fit", "--params", project["one_step"], "--stores",
                                               project["data"].parent / "t{t}.zarr", "--out", out, "--curves",
                                               tmp_path / "fit_curves"], monkeypatch, capsys)
    assert f"disk full while writing ({out}" in err and "free space and rerun the stage" in err
    assert out.read_bytes() == before and not out.with_name("ensemble.pt.tmp").exists()
    # The curves are a progress log, written as the members train: the epochs before the failed save.
    assert json.loads((tmp_path / "fit_curves" / "metrics.json").read_text())["step"] >= 1

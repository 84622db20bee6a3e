"""Bad input through the real stage CLIs: exit code 2, a message naming the problem, nothing left behind."""
from __future__ import annotations

import errno
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from tests.helpers import make_project, run_stage, write_params


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    return make_project(tmp_path_factory.mktemp("project"))


def paper_layout(root, count=3, size=(16, 16)):
    for split in ("train", "test"):
        folder = root / "real" / split
        folder.mkdir(parents=True, exist_ok=True)
        for index in range(count):
            Image.fromarray(np.zeros((size[1], size[0], 3), np.uint8)).save(folder / f"im{index}.png")
            np.save(folder / f"im{index}.npy", np.zeros((size[1], size[0]), np.uint8))
    return root


def break_missing_mask(root):
    (root / "real" / "train" / "im1.npy").unlink()


def break_mask_size(root):
    np.save(root / "real" / "train" / "im1.npy", np.zeros((8, 8), np.uint8))


def break_mask_values(root):
    np.save(root / "real" / "test" / "im0.npy", np.full((16, 16), 9, np.uint8))


def break_truncated(root):
    path = root / "real" / "train" / "im2.png"
    path.write_bytes(path.read_bytes()[:30])


def break_non_square(root):
    Image.fromarray(np.zeros((16, 20, 3), np.uint8)).save(root / "real" / "train" / "im0.png")
    np.save(root / "real" / "train" / "im0.npy", np.zeros((16, 20), np.uint8))


def break_empty_split(root):
    shutil.rmtree(root / "real" / "test")
    (root / "real" / "test").mkdir()


CASES = {
    "missing mask": (break_missing_mask, {}, "im1.png has no mask im1.npy; add it or remove the image"),
    "mask size": (break_mask_size, {}, "im1.npy is 8x8 but its image im1.png is 16x16"),
    "mask values": (break_mask_values, {}, "holds value(s) [9] that are neither a class in [0, 3) nor the ignore label 255"),
    "truncated image": (break_truncated, {}, "im2.png cannot be read"),
    "non-square": (break_non_square, {}, "is 20x16, not square; crop it, or set dataset.non_square: center_crop"),
    "empty split": (break_empty_split, {}, "holds no images (.png/.jpg)"),
    "too few images": (lambda root: None, {"dataset.train_images": 5}, "has 3 images but dataset.train_images asks for 5"),
    "too few for val": (lambda root: None, {"dataset.val_images": 1},
                        "real/train has 3 images, 3 for training, but dataset.val_images asks for 1 validation images"),
    "unknown key": (lambda root: None, {"dataset.num_clases": 3}, "unknown params key(s) dataset.num_clases"),
    "t_steps range": (lambda root: None, {"t_steps": [50, 1000]}, "t_steps contains 1000, outside [0, 1000)"),
    "t_steps type": (lambda root: None, {"t_steps": "50,150"}, "t_steps must be a YAML list"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_prepare_rejects_bad_dataset_and_leaves_nothing(tmp_path, case):
    breaker, overrides, message = CASES[case]
    root = paper_layout(tmp_path / "mydata")
    breaker(root)
    settings = {"dataset.name": "mydata", "dataset.root": str(root), "dataset.image_size": 16,
                "dataset.num_classes": 3, "dataset.train_images": 3, "dataset.val_images": 0, "dataset.test_images": 3,
                "ddpm.model.channel_mult": [1, 2]}
    settings.update(overrides)
    params = write_params(tmp_path / "params.yaml", settings)
    out = tmp_path / "prepared"
    result = run_stage("prepare", "--params", params, "--out", out)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr
    assert not out.exists() and not out.with_name("prepared.tmp").exists()


def test_block_out_of_range(project, tmp_path):
    params = write_params(tmp_path / "p.yaml", {"blocks": [1, 9]})
    out = tmp_path / "t50.zarr"
    result = run_stage("extract", "--params", params, "--t", 50, "--data", project["data"],
                       "--checkpoint", project["checkpoint"], "--out", out)
    assert result.returncode == 2
    assert "blocks contains 9, but this model has decoder blocks 0..3" in result.stderr
    assert not out.exists() and not out.with_name("t50.zarr.partial").exists()


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "checkpoint {path} does not exist; set ddpm.checkpoint to an existing .pt file"),
        (b"not a pickle at all", "could not be loaded as a weights-only state dict"),
        ("list", "is not a state dict (a mapping of names to tensors)"),
        ("wrong flags", "out.2.weight has 6 output channels; set ddpm.model.learn_sigma: true"),
    ],
)
def test_bad_checkpoints(project, tmp_path, reference, content, message):
    path = tmp_path / "model.pt"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content == "list":
        torch.save([torch.zeros(1)], path)
    elif content == "wrong flags":
        shutil.copy(reference / "tiny32.pt", path)
    flags = {"num_channels": 32, "num_res_blocks": 2, "channel_mult": [1, 2, 2], "attention_resolutions": [16, 8],
             "num_head_channels": 16, "use_scale_shift_norm": True, "resblock_updown": True, "learn_sigma": False,
             "dropout": 0.1}
    params = write_params(tmp_path / "p.yaml", {"ddpm.checkpoint": str(path), "ddpm.model": flags})
    out = tmp_path / "ddpm.pt"
    result = run_stage("pretrain", "--params", params, "--data", project["data"], "--out", out, "--plot", tmp_path / "l.csv")
    assert result.returncode == 2, result.stderr
    assert message.format(path=path) in result.stderr and "Traceback" not in result.stderr
    assert not out.exists()


def test_evil_pickle_is_never_executed(project, tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("EXECUTED",))

    path = tmp_path / "evil.pt"
    torch.save({"weight": Evil()}, path)
    params = write_params(tmp_path / "p.yaml", {"ddpm.checkpoint": str(path)})
    result = run_stage("pretrain", "--params", params, "--data", project["data"], "--out", tmp_path / "o.pt",
                       "--plot", tmp_path / "l.csv")
    assert result.returncode == 2 and "EXECUTED" not in result.stdout + result.stderr
    assert "weights-only" in result.stderr


def extract(project, out, params=None):
    return run_stage("extract", "--params", params or project["params"], "--t", 50, "--data", project["data"],
                     "--checkpoint", project["checkpoint"], "--out", out)


def test_store_made_with_other_params_is_refused(project, tmp_path):
    assert extract(project, tmp_path / "t50.zarr").returncode == 0
    other = write_params(tmp_path / "other.yaml", {"t_steps": [50], "features.noise_seed": 3})
    result = run_stage("fit", "--params", other, "--stores", tmp_path / "t{t}.zarr", "--out", tmp_path / "e.pt",
                       "--plot", tmp_path / "f.csv")
    assert result.returncode == 2
    assert "was made with noise_seed=0 but the params ask for 3" in result.stderr
    assert not (tmp_path / "e.pt").exists()


def test_interrupted_store_is_refused(project, tmp_path):
    assert extract(project, tmp_path / "t50.zarr").returncode == 0
    (tmp_path / "t50.zarr").rename(tmp_path / "t50.zarr.partial")
    params = write_params(tmp_path / "p.yaml", {"t_steps": [50]})
    result = run_stage("fit", "--params", params, "--stores", tmp_path / "t{t}.zarr", "--out", tmp_path / "e.pt",
                       "--plot", tmp_path / "f.csv")
    assert result.returncode == 2
    assert "an interrupted extraction left a .partial store: rerun the extract stage" in result.stderr


def test_disk_full_while_writing_keeps_nothing_half_written(project, tmp_path, monkeypatch, capsys):
    import sys

    import stages.extract
    from pipeline import store

    calls = {"count": 0}
    original = store.StoreWriter.write

    def failing_write(self, split, index, features, labels):
        calls["count"] += 1
        if calls["count"] == 3:
            raise OSError(errno.ENOSPC, "No space left on device", str(self.partial))
        original(self, split, index, features, labels)

    monkeypatch.setattr(store.StoreWriter, "write", failing_write)
    out = tmp_path / "t50.zarr"
    monkeypatch.setattr(sys, "argv", ["extract", "--params", str(project["params"]), "--t", "50", "--data",
                                      str(project["data"]), "--checkpoint", str(project["checkpoint"]), "--out", str(out)])
    with pytest.raises(SystemExit) as exit_info:
        stages.extract.main()
    assert exit_info.value.code == 2
    assert "disk full while writing" in capsys.readouterr().err
    assert not out.exists()  # the final store never appears half-written
    monkeypatch.setattr(store.StoreWriter, "write", original)
    stages.extract.main()  # the rerun resumes from the two images already written and finishes
    assert out.exists() and not out.with_name("t50.zarr.partial").exists()

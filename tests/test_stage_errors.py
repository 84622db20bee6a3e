"""Bad input through the real stage CLIs: exit code 2, a message naming the problem, nothing left behind."""
from __future__ import annotations

import errno
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from tests.helpers import exit_code_2_stderr, make_project, run_stage, write_params


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


def break_two_images_one_stem(root):
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(root / "real" / "train" / "im1.jpg")


def break_two_unlabeled_one_stem(root):
    (root / "unlabeled").mkdir()
    for name in ("u0.png", "u0.jpeg"):
        Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(root / "unlabeled" / name)


def break_npz_mask(root):
    with open(root / "real" / "train" / "im1.npy", "wb") as handle:
        np.savez(handle, mask=np.zeros((16, 16), np.uint8))


def break_pickled_mask(root):
    import pickle

    (root / "real" / "test" / "im2.npy").write_bytes(pickle.dumps({"mask": np.zeros((16, 16), np.uint8)}))


def break_huge_header(root):
    from tests.test_image_reader import huge_header_png

    huge_header_png(root / "real" / "test" / "im0.png")


def break_yaml_duplicate(root):
    params = root.parent / "params.yaml"
    text = params.read_text()
    params.write_text(text.replace("dataset:\n", "dataset:\n  image_size: 16\n", 1))


# Issue 13 (files people keep, params that load but fail later): each also keeps an earlier complete output.
INPUT_CASES = {
    "two images for one stem": (break_two_images_one_stem, {}, "real/train/im1.jpg"),
    "two unlabeled images for one stem": (break_two_unlabeled_one_stem, {}, "unlabeled/u0.jpeg"),
    "npz renamed .npy": (break_npz_mask, {}, "im1.npy is a zip archive (an .npz renamed .npy?), not a .npy array; "
                                            "save the mask with numpy.save"),
    "pickled mask": (break_pickled_mask, {}, "im2.npy is a Python pickle, not a .npy array"),
    "huge PNG header": (break_huge_header, {}, "im0.png is too large to decode safely (its header claims more than "
                                               "twice the limit; the limit is 89478485 pixels)"),
    "num_classes over 255": (lambda root: None, {"dataset.num_classes": 300},
                             "dataset.num_classes=300: masks, labels and predictions are uint8"),
    "channels vs group-norm groups": (lambda root: None, {"ddpm.model.num_channels": 48},
                                      "ddpm.model flags do not build a UNet (num_channels (48) must be divisible by num_groups (32))"),
    "dropout 1.5": (lambda root: None, {"ddpm.model.dropout": 1.5}, "ddpm.model.dropout must be < 1, got 1.5 (a probability"),
    "device name": (lambda root: None, {"runtime.device": "gpu"}, "runtime.device='gpu' is not a device; use auto"),
    "device not here": (lambda root: None, {"runtime.device": "cuda:7"}, "runtime.device='cuda:7': this machine has"),
    "negative seed": (lambda root: None, {"features.noise_seed": -1}, "features.noise_seed must be >= 0, got -1 (seeds must "
                                                                      "be in [0, 2**63)"),
    "codec level": (lambda root: None, {"features.clevel": 12}, "features.clevel=12 is outside [1, 9], the levels of "
                                                                "features.codec=zstd"),
    "batch size 1": (lambda root: None, {"ensemble.batch_size": 1}, "ensemble.batch_size must be >= 2, got 1 (BatchNorm "
                                                                    "needs two rows per batch)"),
    "duplicated YAML key": (break_yaml_duplicate, {}, "params.yaml: key 'image_size' appears twice in one section, on "
                                                      "line 6 and line 13; delete one of them"),
    "tls scheduler without certificates": (lambda root: None, {"features.scheduler": "tls://10.0.0.5:8786"},
                                           "is a TLS address, so features.tls_ca_file must be an existing PEM file, got None"),
    "certificates for a plain tcp scheduler": (lambda root: None, {"features.scheduler": "tcp://10.0.0.5:8786",
                                                                   "features.tls_cert": "client.pem"},
                                               "features.tls_cert given but features.scheduler='tcp://10.0.0.5:8786' is "
                                               "not a tls:// address"),
    "beta leaves (0, 1)": (lambda root: None, {"ddpm.diffusion_steps": 10, "t_steps": [5]},
                           "ddpm.diffusion_steps=10 with ddpm.noise_schedule=linear gives beta=1.11556 at step 5, outside (0, 1)"),
}


def prepare_settings(root, overrides):
    settings = {"dataset.name": "mydata", "dataset.root": str(root), "dataset.image_size": 16,
                "dataset.num_classes": 3, "dataset.train_images": 3, "dataset.val_images": 0, "dataset.test_images": 3,
                "ddpm.model.channel_mult": [1, 2]}
    return {**settings, **overrides}


@pytest.mark.parametrize("case", list(CASES))
def test_prepare_rejects_bad_dataset_and_leaves_nothing(tmp_path, case):
    breaker, overrides, message = CASES[case]
    root = paper_layout(tmp_path / "mydata")
    breaker(root)
    params = write_params(tmp_path / "params.yaml", prepare_settings(root, overrides))
    out = tmp_path / "prepared"
    result = run_stage("prepare", "--params", params, "--out", out)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr
    assert not out.exists() and not out.with_name("prepared.tmp").exists()


@pytest.mark.parametrize("case", list(INPUT_CASES))
def test_prepare_rejects_files_people_keep_and_keeps_the_last_good_output(tmp_path, case):
    breaker, overrides, message = INPUT_CASES[case]
    root = paper_layout(tmp_path / "mydata")
    params = write_params(tmp_path / "params.yaml", prepare_settings(root, overrides))
    out = tmp_path / "prepared"
    out.mkdir()
    (out / "dataset.json").write_text("{}")  # an earlier complete output
    breaker(root)
    result = run_stage("prepare", "--params", params, "--out", out)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr
    assert (out / "dataset.json").read_text() == "{}" and not out.with_name("prepared.tmp").exists()


def exif_rotated_jpeg(path, pixels, orientation):
    image = Image.fromarray(pixels)
    exif = image.getexif()
    exif[0x0112] = orientation
    image.save(path, quality=100, subsampling=0, exif=exif)


def test_prepare_converts_16_bit_palette_and_exif_rotated_images_and_says_so_once(tmp_path):
    root = paper_layout(tmp_path / "mydata")
    train = root / "real" / "train"
    for index in range(3):  # three 16-bit PNGs: one note for the kind, not one per file
        Image.fromarray(np.full((16, 16), 257 * (10 + index), np.uint16)).save(train / f"im{index}.png")
    stored = np.zeros((16, 20, 3), np.uint8)
    stored[:, :10] = 255  # left half white as stored; EXIF 8 shows it rotated 90 degrees anticlockwise: white below
    (root / "real" / "test" / "im0.png").unlink()
    exif_rotated_jpeg(root / "real" / "test" / "im0.jpg", stored, orientation=8)
    mask = np.zeros((20, 16), np.uint8)
    mask[10:] = 1  # annotated on the image as displayed
    np.save(root / "real" / "test" / "im0.npy", mask)
    palette = Image.fromarray(np.full((16, 16), 2, np.uint8)).convert("P")
    palette.save(root / "real" / "test" / "im1.png")
    params = write_params(tmp_path / "params.yaml", prepare_settings(root, {"dataset.non_square": "center_crop"}))
    result = run_stage("prepare", "--params", params, "--out", tmp_path / "prepared")
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("16-bit greyscale images (I;16) are scaled to 8 bits") == 1
    assert result.stderr.count("EXIF orientation is applied") == 1 and result.stderr.count("palette (P)") == 1
    prepared = tmp_path / "prepared" / "real"
    assert np.asarray(Image.open(prepared / "train" / "im2.png"))[0, 0].tolist() == [12, 12, 12]
    image, prepared_mask = np.asarray(Image.open(prepared / "test" / "im0.png")), np.load(prepared / "test" / "im0.npy")
    assert image[8:].mean() > 200 and image[:6].mean() < 50  # centre-cropped to 16x16: rows 2..17 of the displayed
    np.testing.assert_array_equal(prepared_mask, mask[2:18])  # the mask, cropped alike, lines up with the white rows


def test_block_out_of_range(project, tmp_path):
    params = write_params(tmp_path / "p.yaml", {"blocks": [1, 9], "features.store_blocks": [1, 9]})
    out = tmp_path / "t50.zarr"
    result = run_stage("extract", "--params", params, "--t", 50, "--data", project["data"],
                       "--checkpoint", project["checkpoint"], "--out", out)
    assert result.returncode == 2
    assert "features.store_blocks [1, 9] (null = ddpm.preset's blocks): blocks contains 9, but this model has " \
           "decoder blocks 0..3" in result.stderr
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
    result = run_stage("pretrain", "--params", params, "--data", project["data"], "--out", out, "--curves", tmp_path / "l.csv")
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
                       "--curves", tmp_path / "l.csv")
    assert result.returncode == 2 and "EXECUTED" not in result.stdout + result.stderr
    assert "weights-only" in result.stderr


def extract(project, out, params=None):
    return run_stage("extract", "--params", params or project["params"], "--t", 50, "--data", project["data"],
                     "--checkpoint", project["checkpoint"], "--out", out)


def test_store_made_with_other_params_is_refused(project, tmp_path):
    assert extract(project, tmp_path / "t50.zarr").returncode == 0
    other = write_params(tmp_path / "other.yaml", {"t_steps": [50], "features.noise_seed": 3})
    result = run_stage("fit", "--params", other, "--stores", tmp_path / "t{t}.zarr", "--out", tmp_path / "e.pt",
                       "--curves", tmp_path / "f.csv")
    assert result.returncode == 2
    assert "was made with noise_seed=0 but the params ask for 3" in result.stderr
    assert not (tmp_path / "e.pt").exists()


def test_interrupted_store_is_refused(project, tmp_path):
    assert extract(project, tmp_path / "t50.zarr").returncode == 0
    (tmp_path / "t50.zarr").rename(tmp_path / "t50.zarr.partial")
    params = write_params(tmp_path / "p.yaml", {"t_steps": [50]})
    result = run_stage("fit", "--params", params, "--stores", tmp_path / "t{t}.zarr", "--out", tmp_path / "e.pt",
                       "--curves", tmp_path / "f.csv")
    assert result.returncode == 2
    assert "an interrupted extraction left a .partial store: rerun the extract stage" in result.stderr


def test_disk_full_while_writing_keeps_nothing_half_written(project, tmp_path, monkeypatch, capsys):
    import stages.extract
    from pipeline.features import store

    calls = {"count": 0}
    original = store.StoreWriter.write

    def failing_write(self, split, index, features, labels):
        calls["count"] += 1
        if calls["count"] == 3:
            raise OSError(errno.ENOSPC, "No space left on device", str(self.partial))
        original(self, split, index, features, labels)

    monkeypatch.setattr(store.StoreWriter, "write", failing_write)
    out = tmp_path / "t50.zarr"
    err = exit_code_2_stderr(stages.extract.main, ["extract", "--params", project["params"], "--t", "50", "--data",
                                                   project["data"], "--checkpoint", project["checkpoint"], "--out", out],
                             monkeypatch, capsys)
    assert "disk full while writing" in err
    assert not out.exists()  # the final store never appears half-written
    monkeypatch.setattr(store.StoreWriter, "write", original)
    stages.extract.main()  # the rerun resumes from the two images already written and finishes
    assert out.exists() and not out.with_name("t50.zarr.partial").exists()

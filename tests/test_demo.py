"""prepare's demo folder: images for the segment stage that no split holds."""
from __future__ import annotations

import numpy as np
from PIL import Image

from pipeline.config import DatasetConfig
from pipeline.data.images import read_rgb
from pipeline.data.layout import Split, list_examples, list_images
from pipeline.data.prepare import folder_demo
from tests.helpers import run_stage, write_params


def test_prepare_writes_demo_canvases_that_are_no_train_val_or_test_canvas(tmp_path):
    params = write_params(tmp_path / "params.yaml", {"dataset.train_images": 50, "dataset.val_images": 50,
                                                     "dataset.test_images": 50, "dataset.demo_images": 5})
    result = run_stage("prepare", "--params", params, "--out", tmp_path / "prepared", "--demo", tmp_path / "demo")
    assert result.returncode == 0, result.stderr
    assert "5 demo images" in result.stdout
    demo = list_images(tmp_path / "demo")
    assert [path.name for path in demo] == [f"demo_{index:05d}.png" for index in range(5)]
    assert not list((tmp_path / "demo").glob("*.npy"))  # nothing to score them with: no masks
    labeled = [read_rgb(example.image_path) for split in Split for example in list_examples(tmp_path / "prepared", split)]
    assert len(labeled) == 150
    pictures = [read_rgb(path) for path in demo]
    assert all(picture.shape == (32, 32, 3) and picture.max() > 0 for picture in pictures)
    assert not any(np.array_equal(picture, canvas) for picture in pictures for canvas in labeled)
    assert len({picture.tobytes() for picture in pictures}) == 5
    # the demo folder is prepare's second output: the prepared dataset does not list it
    assert not (tmp_path / "prepared" / "demo").exists()


def test_no_demo_images_and_a_folder_datasets_unlabeled_images(tmp_path):
    params = write_params(tmp_path / "params.yaml", {"dataset.demo_images": 0})
    result = run_stage("prepare", "--params", params, "--out", tmp_path / "prepared", "--demo", tmp_path / "demo")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "demo").is_dir() and not list((tmp_path / "demo").iterdir())
    (tmp_path / "root" / "unlabeled").mkdir(parents=True)
    for name in ("c", "a", "b"):
        Image.fromarray(np.full((40, 40, 3), ord(name), np.uint8)).save(tmp_path / "root" / "unlabeled" / f"{name}.png")
    config = DatasetConfig(name="mine", image_size=32, num_classes=2, ignore_label=255, train_images=1,
                           val_images=0, test_images=1, min_class_pixels=0, demo_images=2)
    assert folder_demo(config, tmp_path / "root", tmp_path / "mine") == 2
    assert [path.name for path in list_images(tmp_path / "mine")] == ["a.png", "b.png"]  # the first, by name
    assert read_rgb(tmp_path / "mine" / "a.png").shape == (32, 32, 3)
    assert folder_demo(config, tmp_path / "no_unlabeled", tmp_path / "none") == 0

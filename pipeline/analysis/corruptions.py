"""Test-image corruptions for the robustness analysis: ``[H, W, 3] uint8`` -> ``[H, W, 3] uint8``.

Severities 1..5 use CIFAR-10-C's constants (Hendrycks & Dietterich, ICLR 2019, ``make_cifar_c.py``),
which were made for 32 px images as the built-in digits are: Gaussian noise of std c (images in [0, 1]),
Gaussian blur of std c pixels, JPEG at quality c, contrast (x - mean) * c + mean per channel.
"""
from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageFilter

from pipeline.enums import Corruption

SEVERITY_CONSTANTS = {
    Corruption.GAUSSIAN_NOISE: (0.04, 0.06, 0.08, 0.09, 0.10),
    Corruption.BLUR: (0.4, 0.6, 0.7, 0.8, 1.0),
    Corruption.JPEG: (80, 65, 58, 50, 40),
    Corruption.CONTRAST: (0.75, 0.5, 0.4, 0.3, 0.15),
}


def corrupt(image: np.ndarray, corruption: Corruption | str, severity: int, rng: np.random.Generator) -> np.ndarray:
    """``image`` corrupted at ``severity`` (1..5); ``rng`` draws the Gaussian noise (unused by the others)."""
    corruption = Corruption(corruption)
    if not 1 <= severity <= 5:
        raise ValueError(f"severity {severity} is outside 1..5")
    constant = SEVERITY_CONSTANTS[corruption][severity - 1]
    if corruption is Corruption.GAUSSIAN_NOISE:
        values = image / 255.0 + rng.normal(scale=constant, size=image.shape)
    elif corruption is Corruption.CONTRAST:
        values = image / 255.0
        means = values.mean(axis=(0, 1), keepdims=True)
        values = (values - means) * constant + means
    elif corruption is Corruption.BLUR:
        return np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(radius=constant)))
    else:
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="JPEG", quality=constant)
        buffer.seek(0)
        return np.asarray(Image.open(buffer).convert("RGB"))
    return (np.clip(values, 0, 1) * 255).round().astype(np.uint8)

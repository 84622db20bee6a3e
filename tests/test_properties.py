"""Property tests: the params loader and the dataset reader never crash on generated input; they
either accept it or raise the project's error naming what is wrong."""
from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from pipeline.config import ConfigError, Params, params_from_dict
from pipeline.data.images import load_image
from pipeline.data.layout import DatasetError
from pipeline.data.masks import load_mask

SECTIONS = {
    "dataset": ["name", "image_size", "num_classes", "ignore_label", "train_images", "val_images", "test_images", "non_square",
                "class_names", "min_class_pixels"],
    "features": ["upsample", "noise_seed", "batch_size", "chunk_pixels", "codec", "clevel", "stochastic_noise"],
    "ensemble": ["members", "lr", "batch_size", "epochs", "patience", "min_delta", "buffer_rows", "buffer_mb", "stopping", "seed"],
    "evaluate": ["overlays", "confusion_max_pixels", "batch_pixels"],
    "runtime": ["device", "threads"],
}
values = st.one_of(
    st.none(), st.booleans(), st.integers(-5, 3000), st.floats(allow_nan=False, allow_infinity=False, width=32),
    st.text(max_size=8), st.lists(st.integers(-3, 1200), max_size=4),
    st.sampled_from(["bilinear", "nearest", "zstd", "center_crop", "error", "ffhq_34", "digits", "cpu", "cuda:1", "auto"]),
)


@st.composite
def params_documents(draw):
    document = {}
    for section, keys in SECTIONS.items():
        if draw(st.booleans()):
            chosen = draw(st.lists(st.sampled_from(keys + ["not_a_key"]), unique=True, max_size=3))
            document[section] = {key: draw(values) for key in chosen}
    if draw(st.booleans()):
        document["t_steps"] = draw(values)
    if draw(st.booleans()):
        document["blocks"] = draw(values)
    return document


@settings(max_examples=300, deadline=None)
@given(params_documents())
def test_params_loader_accepts_or_names_the_key(document):
    try:
        params = params_from_dict(document)
    except ConfigError as error:
        message = str(error)
        named = [f"{s}.{k}" for s, keys in document.items() if isinstance(keys, dict) for k in keys] + list(document)
        assert any(name in message for name in named) or "ddpm.model" in message, message
    else:
        assert isinstance(params, Params)
        assert all(isinstance(t, int) and 0 <= t < 1000 for t in params.t_steps)
        assert len(params.dataset.names()) == params.dataset.num_classes


masks = st.builds(
    lambda shape, dtype, high, seed: np.random.default_rng(seed).integers(0, high, size=shape).astype(dtype),
    st.sampled_from([(8, 8), (8, 6), (4, 4), (8, 8, 1), (2, 8, 8), (8,)]),
    st.sampled_from([np.uint8, np.int32, np.int64, np.float32, np.uint16]),
    st.integers(1, 300), st.integers(0, 2**16),
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(masks, st.integers(2, 6))
def test_mask_reader_returns_valid_labels_or_a_dataset_error(mask, num_classes):
    with tempfile.TemporaryDirectory() as folder:
        image_path, mask_path = Path(folder) / "a.png", Path(folder) / "a.npy"
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(image_path)
        np.save(mask_path, mask)
        try:
            loaded = load_mask(mask_path, image_path, 8, num_classes, 255)
        except DatasetError as error:
            assert "a.npy" in str(error)
        else:
            assert loaded.shape == (8, 8) and loaded.dtype == np.uint8
            assert set(np.unique(loaded).tolist()) <= set(range(num_classes)) | {255}


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=200))
def test_image_reader_rejects_garbage_with_a_dataset_error(payload):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "broken.png"
        path.write_bytes(payload)
        try:
            image = load_image(path, 8)
        except DatasetError as error:
            assert "broken.png" in str(error)
        else:
            assert image.shape == (8, 8, 3)

from __future__ import annotations

import numpy as np
import pytest
import zarr

from pipeline.features.locations import staging
from pipeline.features.record import StoreRecord
from pipeline.features.store import StoreError, create_or_resume, lazy_matrix, open_store

PIXELS = 16 * 16


def record(t=50, dim=6, **overrides):
    values = dict(t=t, blocks=(2, 3), upsample="bilinear", noise_seed=0, stochastic_noise=False,
                  checkpoint_sha256="abc", image_size=16, feature_dim=dim)
    values.update(overrides)
    return StoreRecord(**values)


def rows(index, dim=6, t=50):
    return np.full((PIXELS, dim), index + t / 1000, np.float16), np.full(PIXELS, index % 3, np.uint8)


def write_store(path, t=50, images=3, dim=6):
    writer = create_or_resume(path, record(t, dim), {"train": [f"i{k}" for k in range(images)], "test": ["j0"]},
                              chunk_pixels=100, codec="zstd", clevel=3)
    for split, count in (("train", images), ("test", 1)):
        for index in writer.pending(split):
            writer.write(split, index, *rows(index, dim, t))
    return writer.finish()


def test_round_trip_layout_and_chunks(tmp_path):
    path = write_store(tmp_path / "t50.zarr")
    group = zarr.open_group(path, mode="r")
    features = group["train/features"]
    assert features.shape == (3 * PIXELS, 6) and features.dtype == np.float16
    assert features.chunks == (4, 6)  # gcd(100, 256): every image owns whole chunks
    assert group["train"].attrs["image_ids"] == ["i0", "i1", "i2"]
    store = open_store(path, {"t": 50, "blocks": (2, 3)})
    matrix = store.features("train").compute()
    assert np.allclose(matrix[PIXELS : 2 * PIXELS], 1.05, atol=1e-3)
    assert not staging(path).exists()


def test_lazy_matrix_concatenates_steps_in_order(tmp_path):
    stores = [open_store(write_store(tmp_path / f"t{t}.zarr", t=t, dim=dim), {"t": t}) for t, dim in ((50, 6), (150, 4))]
    matrix, labels = lazy_matrix(stores, "train")
    assert matrix.shape == (3 * PIXELS, 10)
    values = matrix.compute()
    assert np.allclose(values[0, :6], 0.05, atol=1e-3) and np.allclose(values[0, 6:], 0.15, atol=1e-3)
    assert labels.compute()[PIXELS] == 1


def test_reader_refuses_a_store_made_with_other_params(tmp_path):
    path = write_store(tmp_path / "t50.zarr")
    with pytest.raises(StoreError, match=r"was made with blocks=\[2, 3\] but the params ask for \[5, 6\]"):
        open_store(path, {"blocks": (5, 6)})


def test_interrupted_store_is_refused_then_resumed(tmp_path):
    path = tmp_path / "t50.zarr"
    ids = {"train": ["i0", "i1", "i2"], "test": ["j0"]}
    writer = create_or_resume(path, record(), ids, chunk_pixels=100, codec="zstd", clevel=3)
    writer.write("train", 0, *rows(0))
    with pytest.raises(StoreError, match="interrupted"):
        open_store(path, {})
    resumed = create_or_resume(path, record(), ids, chunk_pixels=100, codec="zstd", clevel=3)
    assert resumed.pending("train") == [1, 2] and resumed.pending("test") == [0]
    # A different record starts afresh instead of mixing features.
    fresh = create_or_resume(path, record(noise_seed=1), ids, chunk_pixels=100, codec="zstd", clevel=3)
    assert fresh.pending("train") == [0, 1, 2]

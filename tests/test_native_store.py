"""features.layout: native (each block's map at its own resolution, upsampled on read) against the pixels
layout, and stores that hold more blocks (features.store_blocks) than an experiment reads (blocks)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import yaml
import zarr

from pipeline.config import ConfigError, params_from_dict
from pipeline.features.record import StoreRecord, params_record
from pipeline.features.store import StoreError, create_or_resume, lazy_matrix, open_store
from tests.helpers import make_project, run_stage

STEPS = (50, 150, 250)


def float16_bound(expected: np.ndarray, pixels_per_image: int) -> np.ndarray:
    """How far a native read may be from the pixels layout: each is float16 rounding of a convex combination of
    the maps, so 3 float16 half-ulps (2^-11 relative) of the largest magnitude in that image's column."""
    per_image = np.abs(expected.astype(np.float32)).reshape(-1, pixels_per_image, expected.shape[1]).max(axis=1)
    return np.repeat(3 * 2.0**-11 * per_image, pixels_per_image, axis=0) + 1e-6


def write(path, record: StoreRecord, images: dict[str, list], labels: dict[str, np.ndarray], chunk_pixels=256):
    writer = create_or_resume(path, record, {split: [f"{split}{i}" for i in range(len(values))]
                                             for split, values in images.items()},
                              chunk_pixels=chunk_pixels, codec="zstd", clevel=3)
    for split, values in images.items():
        for index in writer.pending(split):
            writer.write(split, index, values[index], labels[split][index])
    return writer.finish()


@pytest.fixture(scope="module")
def tiny32(reference):
    meta = json.loads((reference / "tiny32.json").read_text())
    return meta, np.load(reference / "tiny32.npz")


def reference_stores(tmp_path, tiny32, blocks):
    """The tiny32 reference's stored maps written as a native store and its pixel features as a pixels store,
    per step; returns {layout: [paths]}."""
    meta, data = tiny32
    shapes = {int(b): shape for b, shape in meta["output_block_shapes"].items()}
    labels = {"train": [np.arange(32 * 32, dtype=np.uint8) % 3 for _ in range(2)], "val": []}
    pixel_features = data["pixel_features"].reshape(2, 32 * 32, len(STEPS), -1)
    paths = {"pixels": [], "native": []}
    for position, t in enumerate(STEPS):
        common = dict(t=t, blocks=tuple(blocks), upsample="bilinear", noise_seed=0, stochastic_noise=False,
                      checkpoint_sha256="ref", image_size=32, feature_dim=sum(shapes[b][0] for b in blocks),
                      block_channels=tuple(shapes[b][0] for b in blocks), block_sizes=tuple(shapes[b][1] for b in blocks))
        rows = [pixel_features[i, :, position].astype(np.float16) for i in range(2)]
        paths["pixels"].append(write(tmp_path / f"pixels{t}.zarr", StoreRecord(**common), {"train": rows, "val": []},
                                     labels))
        maps = [[data[f"block{b}_t{t}"][i].astype(np.float16) for b in blocks] for i in range(2)]
        paths["native"].append(write(tmp_path / f"native{t}.zarr", StoreRecord(**common, layout="native"),
                                     {"train": maps, "val": []}, labels))
    return paths


def test_native_store_reads_as_the_reference_pixel_features(tmp_path, tiny32):
    meta, data = tiny32
    blocks = meta["extraction"]["blocks"]
    paths = reference_stores(tmp_path, tiny32, blocks)
    pixels, pixel_labels = lazy_matrix([open_store(p, {}) for p in paths["pixels"]], "train")
    native, native_labels = lazy_matrix([open_store(p, {"layout": "native"}) for p in paths["native"]], "train")
    assert native.shape == pixels.shape == (2 * 32 * 32, 864) and native.dtype == np.float16
    assert native.chunks[0] == pixels.chunks[0] == (256,) * 8  # the same row-chunks in either layout
    expected = pixels.compute()
    got = native.compute()
    assert np.all(np.abs(got.astype(np.float32) - expected) <= float16_bound(expected, 32 * 32))
    assert not np.array_equal(got, expected)  # really recomputed, not a copy of the pixels
    assert np.array_equal(native_labels.compute(), pixel_labels.compute())
    # Disk: the native store keeps 64x8x8 ... maps, the pixels store each at 32x32.
    assert sum(f.stat().st_size for f in paths["native"][0].rglob("*") if f.is_file()) < \
        0.6 * sum(f.stat().st_size for f in paths["pixels"][0].rglob("*") if f.is_file())


def test_any_row_range_of_a_native_store_matches_the_whole_read(tmp_path, tiny32):
    paths = reference_stores(tmp_path, tiny32, [2, 5, 6])
    native = open_store(paths["native"][0], {}).features("train")
    whole = native.compute()
    for rows in (slice(0, 1), slice(31, 97), slice(1000, 1100), slice(5, 2048, 7)):  # across rows and images
        assert np.array_equal(native[rows].compute(), whole[rows]), rows
    assert np.array_equal(native[1500, 70:90].compute(), whole[1500, 70:90])


@pytest.mark.parametrize("mode", ["bilinear", "nearest"])
def test_upsampled_rows_equal_the_rows_of_the_whole_upsampled_image(mode):
    """upsample_rows (pixel-major, from only the source rows a strip uses) against F.interpolate of the whole
    maps: every strip, maps of several resolutions (square and not, float16 as stores hold them), both dtypes."""
    import torch

    from pipeline.features.upsample import upsample_concat, upsample_rows

    generator = torch.Generator().manual_seed(0)
    maps = [torch.randn(channels, height, width, generator=generator).half()
            for channels, height, width in ((5, 4, 4), (3, 8, 8), (2, 16, 16), (4, 32, 32), (3, 6, 10))]
    size = 32
    whole = upsample_concat([m[None] for m in maps], size, mode)[0].permute(1, 2, 0).reshape(size * size, -1)
    for first, stop in ((0, 1), (0, 32), (3, 9), (31, 32), (17, 30)):
        rows = upsample_rows(maps, size, first, stop, mode)
        assert rows.dtype == torch.float32 and rows.shape == (((stop - first) * size), whole.shape[1])
        torch.testing.assert_close(rows, whole[first * size : stop * size], atol=1e-5, rtol=1e-5)
        half = upsample_rows(maps, size, first, stop, mode, torch.float16)
        assert half.dtype == torch.float16 and torch.equal(half, rows.half())
    assert upsample_rows(maps, size, 5, 5, mode).shape == (0, whole.shape[1])


@pytest.mark.parametrize("layout", ["pixels", "native"])
def test_blocks_are_selected_from_a_store_that_holds_more(tmp_path, tiny32, layout):
    meta, data = tiny32
    paths = reference_stores(tmp_path, tiny32, [2, 3, 4, 5, 6])
    store = open_store(paths[layout][1], {"blocks": (2, 3, 4, 5, 6)})
    whole = store.features("train").compute()
    assert store.record.columns() == {2: (0, 64), 3: (64, 128), 4: (128, 192), 5: (192, 256), 6: (256, 288)}
    chosen = store.features("train", [6, 3]).compute()
    assert np.array_equal(chosen, np.concatenate([whole[:, 256:288], whole[:, 64:128]], axis=1))
    with pytest.raises(StoreError, match=r"holds blocks \[2, 3, 4, 5, 6\] \(features.store_blocks\) but blocks "
                                         r"\[3, 7\] asks for \[7\] too; choose blocks within .* or set "
                                         r"features.store_blocks to \[2, 3, 4, 5, 6, 7\]"):
        store.features("train", [3, 7])


def test_store_blocks_default_to_the_preset_and_must_hold_blocks():
    params = params_from_dict({"blocks": [1, 2]})
    assert params.features.store_blocks == (0, 1, 2, 3)  # the digits preset's blocks, not `blocks`
    assert params_record(params, 50)["blocks"] == (0, 1, 2, 3) and params_record(params, 50)["layout"] == "pixels"
    with pytest.raises(ConfigError, match=r"blocks \[1, 4\] asks for block\(s\) \[4\] that features.store_blocks "
                                          r"\[0, 1, 2, 3\] does not store; set features.store_blocks to a list "
                                          r"holding them, e.g. \[0, 1, 2, 3, 4\]"):
        params_from_dict({"blocks": [1, 4]})
    assert params_from_dict({"blocks": [1, 4], "features": {"store_blocks": [4, 1], "layout": "native"}}).features \
        .store_blocks == (4, 1)
    with pytest.raises(ConfigError, match=r"features.layout='rows' is not one of \['pixels', 'native'\]"):
        params_from_dict({"features": {"layout": "rows"}})


def test_native_extract_stage_on_the_builtin_data_equals_the_pixels_one(tmp_path):
    """The real extract stage on the built-in digits, both layouts, a store holding more blocks than read."""
    project = make_project(tmp_path, {"t_steps": [150], "features.store_blocks": [0, 1, 2, 3], "blocks": [3, 1],
                                      "features.chunk_pixels": 512})
    paths = {}
    for layout in ("pixels", "native"):
        params = tmp_path / f"{layout}.yaml"
        params.write_text(project["params"].read_text().replace("features:\n", f"features:\n  layout: {layout}\n", 1))
        paths[layout] = tmp_path / f"{layout}.zarr"
        result = run_stage("extract", "--params", params, "--t", 150, "--data", project["data"],
                           "--checkpoint", project["checkpoint"], "--out", paths[layout])
        assert result.returncode == 0, result.stderr
        expected = params_record(params_from_dict(yaml.safe_load(params.read_text())), 150)
        assert open_store(paths[layout], expected).record.layout == layout
    group = zarr.open_group(paths["native"], mode="r")
    assert group["train/block0"].shape == (6, 64, 16, 16) and group["train/block0"].chunks == (1, 64, 16, 16)
    assert group["train/block3"].shape == (6, 32, 32, 32) and "features" not in group["train"]
    for split in ("train", "val", "test"):
        pixels = open_store(paths["pixels"], {}).features(split, [3, 1]).compute()
        native = open_store(paths["native"], {}).features(split, [3, 1])
        assert native.shape == pixels.shape == (len(group[split].attrs["image_ids"]) * 1024, 32 + 64)
        assert np.all(np.abs(native.compute().astype(np.float32) - pixels) <= float16_bound(pixels, 1024)), split
    record = open_store(paths["native"], {}).record
    assert record.blocks == (0, 1, 2, 3) and record.block_channels == (64, 64, 32, 32)
    assert record.block_sizes == (16, 32, 32, 32) and record.feature_dim == 192


def test_an_interrupted_native_store_resumes_and_a_layout_change_starts_afresh(tmp_path, capsys):
    record = StoreRecord(t=50, blocks=(4, 1), upsample="bilinear", noise_seed=0, stochastic_noise=False,
                         checkpoint_sha256="abc", image_size=8, feature_dim=5, layout="native", block_channels=(2, 3),
                         block_sizes=(4, 8))
    ids = {"train": ["a", "b"]}
    maps = [[np.full((2, 4, 4), i + 1, np.float16), np.full((3, 8, 8), -i, np.float16)] for i in range(2)]
    labels = np.zeros(64, np.uint8)
    writer = create_or_resume(tmp_path / "t50.zarr", record, ids, chunk_pixels=32, codec="zstd", clevel=3)
    writer.write("train", 0, maps[0], labels)
    with pytest.raises(StoreError, match=r"1 maps for the 2 stored blocks \[4, 1\]"):  # wrong count of maps: nothing written
        writer.write("train", 1, maps[1][:1], labels)
    resumed = create_or_resume(tmp_path / "t50.zarr", record, ids, chunk_pixels=32, codec="zstd", clevel=3)
    assert resumed.pending("train") == [1]
    resumed.write("train", 1, maps[1], labels)
    matrix = open_store(resumed.finish(), {"layout": "native"}).features("train").compute()
    assert matrix.shape == (128, 5) and np.all(matrix[:64, :2] == 1) and np.all(matrix[64:, :2] == 2)
    assert np.all(matrix[64:, 2:] == -1) and np.all(matrix[:64, 2:] == 0)
    pixels = create_or_resume(tmp_path / "t150.zarr", record, ids, chunk_pixels=32, codec="zstd", clevel=3)
    pixels.write("train", 0, maps[0], labels)
    from dataclasses import replace

    create_or_resume(tmp_path / "t150.zarr", replace(record, layout="pixels"), ids, chunk_pixels=32, codec="zstd", clevel=3)
    assert "it was started with other layout" in capsys.readouterr().err

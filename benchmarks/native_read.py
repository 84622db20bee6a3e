"""What reading a native-layout store costs the streamed fit, and where: decoding an image's maps against
upsampling a row-chunk, with this version's ``upsample_rows`` (pixel-major GEMMs from the source rows a strip
uses) against the previous channel-major formulation (written out below), and a group of row-chunks read in a
random order against the same chunks in store order (how ``ShufflePool`` now reads a group).

On benchmarks/paper_geometry.py's 256² stores (adm256 blocks [5, 6, 7, 8, 12], D = 2816 a step), alone:

    python benchmarks/native_read.py --stores '/tmp/paper_geometry/repo/features/t{t}.zarr' \
        --out benchmarks/results/native_read.json

One thread, as the fit's reader thread runs; times are the median of --repeats.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from pipeline.ensemble.pool import _labeled_rows
from pipeline.features.store import NativeMatrix, lazy_matrix, open_store
from pipeline.features.upsample import interpolation_weights, upsample_rows


def channel_major_rows(maps, size, first_row, stop_row, mode):
    """The previous upsample_rows: per block, (rows @ map) @ columns.T on [C, h, w], then a permuted copy."""
    parts = []
    for block in maps:
        rows = interpolation_weights(block.shape[-2], size, mode)[first_row:stop_row]
        columns = interpolation_weights(block.shape[-1], size, mode)
        strip = torch.matmul(torch.matmul(rows, block.float()), columns.T)
        parts.append(strip.permute(1, 2, 0).reshape(-1, block.shape[0]))
    return torch.cat(parts, dim=1).to(torch.float16)


def median_seconds(function, repeats: int) -> float:
    function()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stores", required=True, help="pattern with {t}")
    parser.add_argument("--steps", type=int, nargs="+", default=[50, 150, 250])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--groups", type=int, default=8, help="groups of 4 row-chunks, random against store order")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    stores = [open_store(args.stores.format(t=t), {}) for t in args.steps]
    first = stores[0]
    native = NativeMatrix(first, "train", tuple(first.record.blocks))
    size, mode = native.size, first.record.upsample
    maps = native._maps(0)
    rows_per_chunk = first.group["train/labels"].chunks[0] // size
    result = {
        "stores": args.stores, "blocks": list(first.record.blocks), "image_size": size,
        "map_shapes": [list(m.shape) for m in maps], "rows_per_chunk": rows_per_chunk,
        "decode_image_seconds": median_seconds(lambda: native._maps(0), args.repeats),
    }
    for name, function in (("channel_major", channel_major_rows), ("pixel_major", upsample_rows)):
        result[f"upsample_chunk_seconds_{name}"] = median_seconds(
            lambda function=function: function(maps, size, 0, rows_per_chunk, mode).to(torch.float16), args.repeats)
    baseline = channel_major_rows(maps, size, 0, rows_per_chunk, mode).float()
    ours = upsample_rows(maps, size, 0, rows_per_chunk, mode, torch.float16).float()
    result["max_abs_difference_float16"] = float((ours - baseline).abs().max())
    result["upsample_speedup"] = result["upsample_chunk_seconds_channel_major"] / result["upsample_chunk_seconds_pixel_major"]

    chunks = len(lazy_matrix(stores, "train")[0].chunks[0])
    rng = np.random.default_rng(0)
    draws = [rng.choice(chunks, 4, replace=False).tolist() for _ in range(args.groups)]
    for order, key in (("random", lambda group: group), ("store_order", sorted)):
        matrix, labels = lazy_matrix(stores, "train")  # new readers: each order starts with empty decode caches
        start = time.perf_counter()
        for group in draws:
            _labeled_rows(matrix, labels, key(group), -1, torch.bfloat16)
        result[f"group_read_seconds_per_chunk_{order}"] = (time.perf_counter() - start) / (4 * args.groups)
    result["chunks_in_split"] = chunks
    print(json.dumps(result, indent=1))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()

"""Write/read throughput and compression ratio of feature-store codecs on real decoder activations.

Features come from a checkpoint on the prepared train images (default: the pipeline's own), at the
given steps and blocks, as float16 rows. Each codec x chunk size is written to a fresh zarr v3 array
and read back, timed with perf_counter; run alone (other jobs skew the MB/s).

    python benchmarks/store_codecs.py --checkpoint checkpoints/ddpm.pt --out benchmarks/results/store_codecs.json
"""
from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import zarr
import zarr.codecs

from pipeline.config import FeaturesConfig
from pipeline.data.layout import Split, load_split
from pipeline.diffusion.train import load_checkpoint
from pipeline.features.compute import features_for_images

CODECS = {
    "none": lambda: [],
    "lz4+shuffle": lambda: [zarr.codecs.BloscCodec(cname="lz4", clevel=5, shuffle="shuffle", typesize=2)],
    "zstd1+shuffle": lambda: [zarr.codecs.BloscCodec(cname="zstd", clevel=1, shuffle="shuffle", typesize=2)],
    "zstd3+shuffle": lambda: [zarr.codecs.BloscCodec(cname="zstd", clevel=3, shuffle="shuffle", typesize=2)],
    "zstd3+bitshuffle": lambda: [zarr.codecs.BloscCodec(cname="zstd", clevel=3, shuffle="bitshuffle", typesize=2)],
    "lz4+bitshuffle": lambda: [zarr.codecs.BloscCodec(cname="lz4", clevel=5, shuffle="bitshuffle", typesize=2)],
    "gzip6": lambda: [zarr.codecs.GzipCodec(level=6)],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, default=Path("checkpoints/ddpm.pt"))
    parser.add_argument("--data", type=Path, default=Path("data/prepared"))
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--steps", type=int, nargs="+", default=[50, 150, 250])
    parser.add_argument("--blocks", type=int, nargs="+", default=None, help="default: every decoder block")
    parser.add_argument("--chunks", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    model, diffusion, _ = load_checkpoint(args.checkpoint)
    blocks = args.blocks or list(range(model.num_decoder_blocks))
    images = load_split(args.data, Split.TRAIN)[1][: args.images]
    features = np.concatenate([rows.numpy() for _, rows in features_for_images(  # the extract stage's rows
        model, diffusion, list(images), options=FeaturesConfig(), t_steps=args.steps, blocks=blocks, split="train")])
    megabytes = features.nbytes / 2**20
    print(f"{features.shape[0]} pixels x {features.shape[1]} features = {megabytes:.0f} MB float16")
    results = []
    work = Path(tempfile.mkdtemp())
    try:
        for chunk in args.chunks:
            for name, codec in CODECS.items():
                path = work / f"{name}_{chunk}.zarr"
                array = zarr.create_array(path, shape=features.shape, chunks=(chunk, features.shape[1]),
                                          dtype="float16", compressors=codec(), fill_value=0)
                start = time.perf_counter()
                for row in range(0, len(features), chunk):
                    array[row : row + chunk] = features[row : row + chunk]
                write = time.perf_counter() - start
                stored = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
                start = time.perf_counter()
                reopened = zarr.open_array(path, mode="r")
                for row in range(0, len(features), chunk):
                    reopened[row : row + chunk]
                read = time.perf_counter() - start
                results.append({"codec": name, "chunk_rows": chunk, "ratio": round(features.nbytes / stored, 3),
                                "write_mb_s": round(megabytes / write, 1), "read_mb_s": round(megabytes / read, 1)})
                print(results[-1], flush=True)
                shutil.rmtree(path)
    finally:
        shutil.rmtree(work)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"pixels": int(features.shape[0]), "feature_dim": int(features.shape[1]),
                                        "checkpoint": str(args.checkpoint), "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()

"""Pretraining input: all unlabeled images stacked in RAM (the old way) vs ``ImageFiles`` read per batch.

Writes N synthetic PNGs (smooth random blobs, so they compress like photos rather than noise), then in a
fresh process per mode measures peak RSS after building the source and drawing ``--batches`` batches
through ``infinite_batches``, and the batch rate. Run alone.

    python benchmarks/unlabeled_loading.py --images 4000 --size 128 --out benchmarks/results/unlabeled_loading.json
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


def measure(folder: Path, mode: str, batch_size: int, batches: int) -> dict:

    from pipeline.data.layout import load_unlabeled
    from pipeline.diffusion.train import batch_at

    files = load_unlabeled(folder)
    source = files[range(len(files))] if mode == "in_ram" else files
    start = time.perf_counter()
    checksum = 0.0
    for step in range(1, batches + 1):
        checksum += float(batch_at(source, batch_size, 0, step)[:, :, 0, 0].sum())
    seconds = time.perf_counter() - start
    return {"mode": mode, "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "batches_per_s": round(batches / seconds, 1), "checksum": checksum}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=4000)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--batches", type=int, default=100)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--measure", nargs=2, metavar=("FOLDER", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(Path(args.measure[0]), args.measure[1], args.batch_size, args.batches)))
        return
    with tempfile.TemporaryDirectory(prefix="unlabeled_") as work:
        folder = Path(work) / "unlabeled"
        folder.mkdir()
        rng = np.random.default_rng(0)
        for index in range(args.images):
            small = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
            Image.fromarray(small).resize((args.size, args.size), Image.BILINEAR).save(folder / f"u_{index:05d}.png")
        rows = []
        for mode in ("in_ram", "files"):
            result = subprocess.run([sys.executable, __file__, "--measure", work, mode, "--batch-size",
                                     str(args.batch_size), "--batches", str(args.batches)],
                                    cwd=REPO, capture_output=True, text=True, check=True)
            rows.append(json.loads(result.stdout))
            print(json.dumps(rows[-1]), flush=True)
    assert rows[0]["checksum"] == rows[1]["checksum"], "the two modes drew different batches"
    stacked_mb = args.images * args.size * args.size * 3 / 1e6
    print(f"{args.images} images of {args.size}px ({stacked_mb:.0f} MB as uint8): peak RSS "
          f"{rows[0]['peak_rss_mb']} MB in RAM vs {rows[1]['peak_rss_mb']} MB from files "
          f"({rows[0]['peak_rss_mb'] / rows[1]['peak_rss_mb']:.2f}x); batches/s {rows[0]['batches_per_s']} vs "
          f"{rows[1]['batches_per_s']}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"images": args.images, "size": args.size, "batch_size": args.batch_size,
                                        "stacked_mb": round(stacked_mb, 1), "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()

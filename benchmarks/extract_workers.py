"""Extraction in process vs fanned out over a local dask.distributed cluster: time and equality.

Runs the real stage (``python -m stages.extract``) on the prepared data with the pipeline's checkpoint
once per ``features.workers`` value, timing the whole command (process start, cluster start, model
loads, extraction, compression, writes) and comparing each store with the in-process one byte for byte.
Run it alone: a second torch job on the same cores skews the times.

    python benchmarks/extract_workers.py --workers 0 1 2 --out benchmarks/results/extract_workers.json
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml
import zarr

REPO = Path(__file__).resolve().parents[1]
ARRAYS = ("train/features", "train/labels", "test/features", "test/labels")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=Path, default=REPO / "params.yaml")
    parser.add_argument("--data", type=Path, default=REPO / "data/prepared")
    parser.add_argument("--checkpoint", type=Path, default=REPO / "checkpoints/ddpm.pt")
    parser.add_argument("--t", type=int, default=50)
    parser.add_argument("--blocks", type=int, nargs="*", help="override params' blocks (more blocks = more bytes per image)")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--repeats", type=int, default=2, help="runs per setting; the fastest is reported")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    settings = yaml.safe_load(args.params.read_text())
    if args.blocks:
        settings["blocks"] = args.blocks
    work = Path(tempfile.mkdtemp(prefix="extract_workers_"))
    rows = []
    try:
        reference = None
        for workers in args.workers:
            settings["features"]["workers"] = workers
            params = work / f"params_{workers}.yaml"
            params.write_text(yaml.safe_dump(settings, sort_keys=False))
            times = []
            for repeat in range(args.repeats):
                store = work / f"w{workers}_{repeat}.zarr"
                command = [sys.executable, "-m", "stages.extract", "--params", str(params), "--t", str(args.t),
                           "--data", str(args.data), "--checkpoint", str(args.checkpoint), "--out", str(store)]
                start = time.perf_counter()
                result = subprocess.run(command, cwd=REPO, capture_output=True, text=True,
                                        env=dict(os.environ, PYTHONPATH=str(REPO)))
                times.append(time.perf_counter() - start)
                if result.returncode:
                    sys.exit(f"workers={workers} failed:\n{result.stderr}")
            group = zarr.open_group(store, mode="r")
            images = sum(len(group[s].attrs["image_ids"]) for s in ("train", "test"))
            megabytes = sum(group[f"{s}/features"].nbytes for s in ("train", "test")) / 1e6
            if reference is None:
                reference = group
            differing, largest = 0, 0.0
            for name in ARRAYS:  # thread counts per process change the last float16 bit of a few values
                difference = np.abs(group[name][:].astype(np.float32) - reference[name][:].astype(np.float32))
                differing, largest = differing + int((difference > 0).sum()), max(largest, float(difference.max()))
            identical = differing == 0
            best = min(times)
            rows.append({"workers": workers, "images": images, "feature_dim": group["train/features"].shape[1],
                         "seconds": round(best, 2), "all_seconds": [round(x, 2) for x in times],
                         "images_per_s": round(images / best, 1), "features_mb": round(megabytes, 1),
                         "identical_to_in_process": identical, "differing_values": differing,
                         "max_abs_difference": largest})
            print(json.dumps(rows[-1]), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    base = rows[0]["seconds"]
    for row in rows:
        row["speedup_vs_first"] = round(base / row["seconds"], 2)
    print(f"{'workers':>7} {'s':>7} {'img/s':>7} {'speedup':>7} differing values (max abs)")
    for row in rows:
        print(f"{row['workers']:>7} {row['seconds']:>7} {row['images_per_s']:>7} {row['speedup_vs_first']:>7} "
              f"{row['differing_values']} ({row['max_abs_difference']})")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"t": args.t, "blocks": settings["blocks"], "cpu_count": os.cpu_count(),
                                        "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()

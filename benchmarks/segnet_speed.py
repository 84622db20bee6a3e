"""Segmenting new images: the DDPM-feature ensemble against DatasetDDPM's distilled network, images/s and peak RSS.

Each segmenter runs in its own process (so ``ru_maxrss`` is its own peak) through the API users call
(``pipeline.api.Segmenter``: the ensemble's ``from_run`` path, and ``load_segnet``), on the same images:
the run's test images, repeated up to ``--images``. Loading the models is timed apart from segmenting;
one warm-up image is segmented before the clock starts.

    python benchmarks/segnet_speed.py --run . --segnet segnet/segnet.pt --images 50 \\
        --out benchmarks/results/segnet_speed.json

Prints the ratio of the two rates, measured in the same invocation.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path


def measure(model: str, run: Path, segnet: Path, images: int) -> dict:
    """In this process: load one segmenter, segment ``images`` test images, report time and peak RSS."""
    import numpy as np

    from pipeline.api import Segmenter
    from pipeline.data.images import read_rgb
    from pipeline.data.layout import Split, list_examples
    from pipeline.runtime import stage_params

    params = stage_params(run / "params.yaml", one_thread=model == "ensemble")  # as the segment stage sets threads
    start = time.perf_counter()
    if model == "segnet":
        segmenter = Segmenter.load_segnet(params, segnet)
    else:
        segmenter = Segmenter.load(params, run / "checkpoints" / "ddpm.pt", run / "ensemble" / "ensemble.pt")
    load_s = time.perf_counter() - start
    examples = list_examples(run / "data" / "prepared", Split.TEST)
    arrays = [read_rgb(examples[index % len(examples)].image_path) for index in range(images)]
    segmenter.predict(arrays[:1])  # warm-up: first-call allocations are not the steady rate
    start = time.perf_counter()
    results = segmenter.predict(arrays)
    seconds = time.perf_counter() - start
    classes = np.stack([result.mask for result in results])
    return {"model": model, "images": images, "image_size": int(arrays[0].shape[0]), "load_s": round(load_s, 3),
            "segment_s": round(seconds, 3), "images_per_s": round(images / seconds, 3),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "mask_classes": sorted(int(value) for value in np.unique(classes))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, default=Path("."), help="a finished run: params.yaml, checkpoints/, "
                                                                   "ensemble/, data/prepared/")
    parser.add_argument("--segnet", type=Path, default=Path("segnet/segnet.pt"))
    parser.add_argument("--images", type=int, default=50)
    parser.add_argument("--out", type=Path, default=None, help="JSON file for the results")
    parser.add_argument("--child", choices=("ensemble", "segnet"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args.run, args.segnet, args.images)))
        return
    rows = {}
    for model in ("ensemble", "segnet"):
        result = subprocess.run([sys.executable, __file__, "--child", model, "--run", str(args.run), "--segnet",
                                 str(args.segnet), "--images", str(args.images)], capture_output=True, text=True)
        if result.returncode != 0:
            sys.exit(f"{model} failed:\n{result.stderr}")
        rows[model] = json.loads(result.stdout.strip().splitlines()[-1])
        print(json.dumps(rows[model]))
    speedup = rows["segnet"]["images_per_s"] / rows["ensemble"]["images_per_s"]
    memory = rows["ensemble"]["peak_rss_mb"] / rows["segnet"]["peak_rss_mb"]
    print(f"segnet: {speedup:.1f}x the ensemble's images/s, {memory:.2f}x less peak RSS "
          f"({rows['segnet']['images_per_s']} against {rows['ensemble']['images_per_s']} images/s at "
          f"{rows['segnet']['image_size']} px)")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"rows": rows, "speedup": round(speedup, 2), "rss_ratio": round(memory, 2)},
                                       indent=2) + "\n")


if __name__ == "__main__":
    main()

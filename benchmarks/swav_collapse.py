"""Does SwAV learn on the built-in digits, or collapse? Pretraining loss of a few ``swav`` recipes, each
``--steps`` steps on the first 1024 unlabeled images, as the mean of each 25-step window against ln(prototypes):
the loss of uniform predictions, where SwAV sits once it has collapsed (every crop's prediction uniform, so the
swapped prediction carries no signal and the features stop changing).

    python benchmarks/swav_collapse.py --out benchmarks/results/swav_collapse.json

One torch thread per recipe; run alone. Measured here it chose ``swav.jitter: 0`` (README, SwAV section).
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from pipeline.config import load_params
from pipeline.data.layout import load_unlabeled
from pipeline.selfsup.swav import train_swav

RECIPES = {"SwAV's colour jitter (1.0)": {"jitter": 1.0}, "jitter 0.4": {"jitter": 0.4},
           "jitter 1.0, no flips": {"jitter": 1.0, "flip": False}, "no jitter": {"jitter": 0.0},
           "no jitter, no flips": {"jitter": 0.0, "flip": False}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--data", type=Path, default=Path("data/prepared"))
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/swav_collapse.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    params = load_params(args.params)
    images = load_unlabeled(args.data)[np.arange(1024)]
    results = {}
    for name, overrides in RECIPES.items():
        config = params.swav.model_copy(update={"steps": args.steps, **overrides})
        start = time.perf_counter()
        _, history = train_swav(config, params.dataset.image_size, images, device=torch.device("cpu"))
        losses = [row["loss"] for row in history]
        windows = [round(float(np.mean(losses[i : i + 25])), 3) for i in range(0, args.steps, 25)]
        uniform = math.log(config.prototypes)
        results[name] = {"overrides": overrides, "loss_per_25_steps": windows, "ln_prototypes": round(uniform, 3),
                         "collapsed": windows[-1] >= uniform - 0.01, "seconds": round(time.perf_counter() - start)}
        print(name, results[name], flush=True)
    args.out.write_text(json.dumps({"steps": args.steps, "images": 1024, "recipes": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()

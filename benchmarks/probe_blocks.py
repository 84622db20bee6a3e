"""Which decoder blocks and steps make good features for a trained checkpoint? (built-in scale only)

Extracts every decoder block at each candidate step for the prepared train and val images, then fits
the ensemble on each (steps, blocks) candidate and prints val mIoU (the paper's protocol). It never
reads the test split: choices are made on val. Holds features in RAM, so it is for small datasets (the
built-in 32x32 digits); the pipeline itself streams from zarr.

    python benchmarks/probe_blocks.py --checkpoint checkpoints/ddpm.pt --data data/prepared \
        --steps 50 150 250 --sets all 2,3,4,5,6 0,1,2,3,4 0,1,2 --out benchmarks/results/probe_blocks.json
"""
from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

import numpy as np

from pipeline.config import FeaturesConfig, load_params
from pipeline.data.layout import Split, load_split
from pipeline.diffusion.train import load_checkpoint
from pipeline.ensemble.evaluation import fit_and_score
from pipeline.features.compute import features_for_images


def block_rows(model, diffusion, images, t, noise_seed=0, batch=25) -> list[np.ndarray]:
    """Per decoder block, the ``[N*H*W, C_b] float16`` pixel rows of ``images`` at step ``t`` (image-major),
    made by the one feature path the extract stage writes with (``features_for_images``)."""
    options = FeaturesConfig(noise_seed=noise_seed, batch_size=batch)
    return [np.concatenate([rows.numpy() for _, rows in features_for_images(
                model, diffusion, list(images), options=options, t_steps=[t], blocks=[block], split="train")])
            for block in range(model.num_decoder_blocks)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--data", type=Path, default=Path("data/prepared"))
    parser.add_argument("--steps", type=int, nargs="+", default=[50, 150, 250])
    parser.add_argument("--sets", nargs="+", default=["all"])
    parser.add_argument("--step-sets", nargs="+", default=None, help="e.g. 50,150,250 50 150")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"), help="ensemble and dataset settings")
    parser.add_argument("--members", type=int, default=None, help="override ensemble.members (fewer = faster probe)")
    parser.add_argument("--out", type=Path, default=None, help="JSON file for the results")
    args = parser.parse_args()
    model, diffusion, _ = load_checkpoint(args.checkpoint)
    _, train_images, train_masks = load_split(args.data, Split.TRAIN)
    _, val_images, val_masks = load_split(args.data, Split.VAL)
    params = load_params(args.params)
    features = {}
    for t in args.steps:
        features[t] = (block_rows(model, diffusion, train_images, t), block_rows(model, diffusion, val_images, t))
    config = params.ensemble if args.members is None else params.ensemble.model_copy(update={"members": args.members})
    step_sets = [tuple(int(s) for s in spec.split(",")) for spec in args.step_sets] if args.step_sets else [tuple(args.steps)]
    results = []
    for steps, spec in itertools.product(step_sets, args.sets):
        blocks = list(range(model.num_decoder_blocks)) if spec == "all" else [int(b) for b in spec.split(",")]
        start = time.perf_counter()
        train_x = np.concatenate([features[t][0][b] for t in steps for b in blocks], axis=1)
        val_x = np.concatenate([features[t][1][b] for t in steps for b in blocks], axis=1)
        metrics = fit_and_score((train_x, train_masks.reshape(-1)), (val_x, val_masks.reshape(-1)), config=config,
                                class_names=params.dataset.names(), ignore_label=params.dataset.ignore_label,
                                chunk_rows=params.dataset.image_size**2)
        seconds = time.perf_counter() - start
        results.append({"steps": list(steps), "blocks": blocks, "dim": train_x.shape[1], "val_miou": metrics["miou"],
                        "val_miou_strict": metrics["miou_strict"], "epochs": metrics["epochs"], "seconds": round(seconds, 1)})
        print(f"steps {list(steps)} blocks {blocks} D={train_x.shape[1]}: val mIoU {metrics['miou']:.4f} "
              f"(strict {metrics['miou_strict']:.4f}, {metrics['epochs']} epochs, {seconds:.0f}s)", flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"checkpoint": str(args.checkpoint), "split": "val",
                                        "ensemble": config.model_dump(mode="json"), "results": results},
                                       indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()

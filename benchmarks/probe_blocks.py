"""Which decoder blocks and steps make good features for a trained checkpoint? (built-in scale only)

Extracts every decoder block at each candidate step for the prepared train/test images, then fits a
small ensemble on each (steps, blocks) candidate and prints test mIoU. Holds features in RAM, so it is
for small datasets (the built-in 32x32 digits); the pipeline itself streams from zarr.

    python benchmarks/probe_blocks.py --checkpoint checkpoints/ddpm.pt --data data/prepared \
        --steps 50 150 250 --sets all 2,3,4,5,6 0,1,2,3,4 3,4,5 --members 5 --epochs 4
"""
from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

import dask.array as da
import numpy as np
import torch

from pipeline.config import EnsembleConfig
from pipeline.data import Split, load_split, to_model_input
from pipeline.ensemble import fit_ensemble, predict_chunks
from pipeline.features import feature_maps, make_noise
from pipeline.metrics import confusion_matrix, majority_vote, mean_iou
from pipeline.train_ddpm import load_checkpoint


def block_maps(model, diffusion, images, t, noise, batch=25):
    maps = []
    for start in range(0, len(images), batch):
        x0 = to_model_input(images[start : start + batch])
        per_block = [feature_maps(model, diffusion, x0, t_steps=[t], blocks=[b], noise=noise)
                     for b in range(model.num_decoder_blocks)]
        maps.append(per_block)
    # -> list over blocks of [N*H*W, C_b] float16
    out = []
    for b in range(model.num_decoder_blocks):
        m = torch.cat([chunk[b] for chunk in maps])
        out.append(m.permute(0, 2, 3, 1).reshape(-1, m.shape[1]).half().numpy())
    return out


def evaluate(train_x, train_y, test_x, test_y, config, num_classes=11):
    rows = 1024
    model, history = fit_ensemble(da.from_array(train_x, chunks=(rows, -1)), da.from_array(train_y, chunks=rows),
                                  num_classes=num_classes, ignore_label=255, config=config, device=torch.device("cpu"))
    prediction = np.zeros(len(test_y), dtype=np.int64)
    for first, classes, _ in predict_chunks(model, da.from_array(test_x, chunks=(rows, -1)), batch_pixels=16384,
                                            device=torch.device("cpu")):
        prediction[first : first + classes.shape[1]] = majority_vote(classes, num_classes).numpy()
    return mean_iou(confusion_matrix(test_y, prediction, num_classes, 255))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--data", type=Path, default=Path("data/prepared"))
    parser.add_argument("--steps", type=int, nargs="+", default=[50, 150, 250])
    parser.add_argument("--sets", nargs="+", default=["all"])
    parser.add_argument("--step-sets", nargs="+", default=None, help="e.g. 50,150,250 50 150")
    parser.add_argument("--members", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--out", type=Path, default=None, help="JSON file for the results")
    args = parser.parse_args()
    model, diffusion, _ = load_checkpoint(args.checkpoint)
    _, train_images, train_masks = load_split(args.data, Split.TRAIN)
    _, test_images, test_masks = load_split(args.data, Split.TEST)
    noise = make_noise(0, model.config.image_size)
    features = {}
    for t in args.steps:
        features[t] = (block_maps(model, diffusion, train_images, t, noise), block_maps(model, diffusion, test_images, t, noise))
    config = EnsembleConfig(members=args.members, epochs=args.epochs)
    step_sets = [tuple(int(s) for s in spec.split(",")) for spec in args.step_sets] if args.step_sets else [tuple(args.steps)]
    results = []
    for steps, spec in itertools.product(step_sets, args.sets):
        blocks = list(range(model.num_decoder_blocks)) if spec == "all" else [int(b) for b in spec.split(",")]
        start = time.perf_counter()
        train_x = np.concatenate([features[t][0][b] for t in steps for b in blocks], axis=1)
        test_x = np.concatenate([features[t][1][b] for t in steps for b in blocks], axis=1)
        miou = evaluate(train_x, train_masks.reshape(-1), test_x, test_masks.reshape(-1), config)
        results.append({"steps": list(steps), "blocks": blocks, "dim": train_x.shape[1], "miou": round(miou, 4)})
        print(f"steps {list(steps)} blocks {blocks} D={train_x.shape[1]}: mIoU {miou:.4f} ({time.perf_counter() - start:.0f}s)", flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"checkpoint": str(args.checkpoint), "members": args.members,
                                        "epochs": args.epochs, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()

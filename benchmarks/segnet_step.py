"""Seconds per train_segnet optimizer step on this machine, by option: torch threads (1 or 2) and the products'
dtype (float32, or bf16 autocast). The default run's train_segnet is 2320 such steps (issue 29 item 4: the
default run's time), so this says what each option would save.

    python benchmarks/segnet_step.py --out benchmarks/results/segnet_step.json

Reads the default run's synthetic set (data/synthetic, from `dvc repro`) and params.yaml; every variant trains the
same freshly seeded network on the same batches, after a warm-up, in one process, one after another (run it alone).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as functional

from pipeline.config import load_params
from pipeline.data.images import to_model_input
from pipeline.segnet.network import build_network, class_logits, segformer_config
from pipeline.segnet.train import LabeledFolder


def time_steps(params, train: LabeledFolder, threads: int, dtype: torch.dtype | None, steps: int, warmup: int) -> dict:
    torch.set_num_threads(threads)
    network = build_network(segformer_config(params.segnet, params.dataset.num_classes), seed=0).train()
    optimizer = torch.optim.Adam(network.parameters(), lr=params.segnet.lr)
    generator = torch.Generator().manual_seed(0)
    batch = params.segnet.batch_size
    batches = []
    for _ in range(steps + warmup):
        images, masks = train.batch(torch.randint(len(train), (batch,), generator=generator).tolist())
        batches.append((to_model_input(images), torch.from_numpy(masks).long()))
    losses = []
    for index, (images, masks) in enumerate(batches):
        if index == warmup:
            start = time.perf_counter()
        with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
            logits = class_logits(network, images)
        loss = functional.cross_entropy(logits.float(), masks, ignore_index=params.dataset.ignore_label)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    seconds = (time.perf_counter() - start) / steps
    return {"threads": threads, "autocast": "none" if dtype is None else str(dtype).removeprefix("torch."),
            "seconds_per_step": round(seconds, 5), "loss_last_10": round(sum(losses[-10:]) / 10, 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--synthetic", type=Path, default=Path("data/synthetic"))
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    params = load_params(args.params)
    train = LabeledFolder(args.synthetic, params.dataset.image_size)
    rows = [time_steps(params, train, threads, dtype, args.steps, args.warmup)
            for threads in (2, 1) for dtype in (None, torch.bfloat16)]
    baseline = rows[0]["seconds_per_step"]
    for row in rows:
        row["speedup_vs_2_threads_float32"] = round(baseline / row["seconds_per_step"], 3)
        print(row)
    result = {"command": "python benchmarks/segnet_step.py " + " ".join(
                  f"--{k} {v}" for k, v in vars(args).items() if v is not None),
              "cpu_count": os.cpu_count(), "machine": platform.processor() or platform.machine(),
              "torch": torch.__version__, "synthetic_images": len(train), "steps_timed": args.steps, "rows": rows}
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()

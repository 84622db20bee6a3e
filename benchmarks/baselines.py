"""Pipeline mIoU against baselines on the same labeled pixels and the same val and test canvases.

It selects nothing: the table reports the finished default run beside simpler representations.

Run after `dvc repro` (it reads data/prepared and metrics/eval.json of the workspace):

    python benchmarks/baselines.py --out benchmarks/results/baselines.json

Rows:
- pipeline: metrics/eval.json as `dvc repro` wrote it (trained DDPM features).
- random-init UNet: the same stages (pretrain with ddpm.train.steps: 0, extract, fit, evaluate) into a
  temporary folder, i.e. the same network, steps, blocks and ensemble without DDPM training.
- RGB pixel MLP: the same ensemble on each pixel's 3 colour values.
- 5x5 pixel MLP: the same ensemble on each pixel's 5x5 RGB neighbourhood (75 values).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch.nn.functional as F
import yaml

from pipeline.config import load_params
from pipeline.data import Split, load_split, to_model_input
from pipeline.evaluation import fit_and_score


def neighbourhood_features(images: np.ndarray, size: int) -> np.ndarray:
    """``[N, H, W, 3] uint8`` -> ``[N*H*W, 3*size*size] float16``: each pixel's size x size RGB patch."""
    x = to_model_input(images)
    patches = F.unfold(F.pad(x, [size // 2] * 4, mode="replicate"), kernel_size=size)  # [N, 3*s*s, H*W]
    return patches.permute(0, 2, 1).reshape(-1, patches.shape[1]).half().numpy()


def pixel_mlp_miou(params, train: tuple, scored: tuple, size: int) -> float:
    """The paper's mIoU of the stages' ensemble on each pixel's size x size RGB patch."""
    metrics = fit_and_score((neighbourhood_features(train[0], size), train[1].reshape(-1)),
                            (neighbourhood_features(scored[0], size), scored[1].reshape(-1)), config=params.ensemble,
                            class_names=params.dataset.names(), ignore_label=params.dataset.ignore_label,
                            chunk_rows=params.dataset.image_size**2)
    return metrics["miou"]


def random_init_miou(params_path: Path, data: Path, work: Path) -> dict[str, float]:
    """The real stages on an untrained UNet (same flags and init seed as pretraining starts from)."""
    params = yaml.safe_load(params_path.read_text())
    params["ddpm"]["train"]["steps"] = 0
    override = work / "params.yaml"
    override.write_text(yaml.safe_dump(params, sort_keys=False))
    stores = str(work / "t{t}.zarr")

    def stage(name: str, *args: str) -> None:
        subprocess.run([sys.executable, "-m", f"stages.{name}", "--params", str(override), *args], check=True)

    stage("pretrain", "--data", str(data), "--out", str(work / "ddpm.pt"), "--curves", str(work / "pretrain_curves"))
    for t in params["t_steps"]:
        stage("extract", "--t", str(t), "--data", str(data), "--checkpoint", str(work / "ddpm.pt"),
              "--out", stores.format(t=t))
    stage("fit", "--stores", stores, "--out", str(work / "ensemble.pt"), "--curves", str(work / "fit_curves"))
    stage("evaluate", "--stores", stores, "--ensemble", str(work / "ensemble.pt"), "--data", str(data),
          "--metrics", str(work / "eval.json"), "--per-class", str(work / "iou.csv"),
          "--confusion", str(work / "confusion.csv"), "--overlays", str(work / "overlays"),
          "--val-metrics", str(work / "val.json"), "--predictions", str(work / "predictions"))
    return {split: json.loads((work / name).read_text())["miou"] for split, name in (("val", "val.json"), ("test", "eval.json"))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--data", type=Path, default=Path("data/prepared"))
    parser.add_argument("--metrics", type=Path, default=Path("metrics/eval.json"))
    parser.add_argument("--val-metrics", type=Path, default=Path("metrics/val.json"))
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    params = load_params(args.params)
    train = load_split(args.data, Split.TRAIN)[1:]
    splits = {"val": load_split(args.data, Split.VAL)[1:], "test": load_split(args.data, Split.TEST)[1:]}
    rows = {"pipeline (trained DDPM)": {"val": json.loads(args.val_metrics.read_text())["miou"],
                                        "test": json.loads(args.metrics.read_text())["miou"]}}
    timings = {}
    with tempfile.TemporaryDirectory() as work:
        start = time.perf_counter()
        rows["random-init UNet"] = random_init_miou(args.params, args.data, Path(work))
        timings["random-init UNet"] = time.perf_counter() - start
    for name, size in (("RGB pixel MLP", 1), ("5x5 pixel MLP", 5)):
        start = time.perf_counter()
        rows[name] = {split: pixel_mlp_miou(params, train, scored, size) for split, scored in splits.items()}
        timings[name] = time.perf_counter() - start
    print("| method | val mIoU | test mIoU |\n|---|---|---|")
    for name, miou in rows.items():
        print(f"| {name} | {miou['val']:.3f} | {miou['test']:.3f} |")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"miou": {k: {s: round(m, 4) for s, m in v.items()} for k, v in rows.items()},
                                        "seconds": {k: round(v, 1) for k, v in timings.items()},
                                        "train_images": params.dataset.train_images,
                                        "test_images": params.dataset.test_images}, indent=2) + "\n")


if __name__ == "__main__":
    main()

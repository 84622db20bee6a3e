"""Val mIoU of the whole pipeline against DDPM pretraining steps, for one or more pretraining recipes.

Each recipe is params.yaml's ``ddpm.train`` with a few keys overridden (or, dotted, other keys of
``ddpm``: ``model.num_channels=16`` compares model shapes). It trains once up to the largest
step count and snapshots the EMA at each listed step; every snapshot then goes through the same feature
extraction (params' t_steps, blocks, noise) and the same ensemble fit, scored on the val split (never
test). A snapshot at step k equals a k-step run only when nothing in the recipe depends on the total
step count, so a recipe with ``lr_schedule=cosine`` is trained once per listed step instead.

    python benchmarks/learning_curve.py --steps 200 400 800 1600 \\
        --recipe "lr2e-4: lr=2e-4 warmup_steps=0" --recipe "min-snr: loss_weighting=min_snr" \\
        --out benchmarks/results/learning_curve.json --plot docs/learning_curve.png

Run alone (it uses both cores). Minutes per point are wall-clock on the machine that ran it.
"""
from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from pipeline.config import LrSchedule, Params, params_from_dict
from pipeline.data.images import to_model_input
from pipeline.data.layout import Split, load_split, load_unlabeled
from pipeline.diffusion.gaussian import Diffusion
from pipeline.diffusion.train import train_ddpm
from pipeline.diffusion.unet import create_unet
from pipeline.ensemble.evaluation import fit_and_score
from pipeline.features.activations import make_noise, pixel_features


def parse_recipe(spec: str) -> tuple[str, dict]:
    """``"name: key=value key=value"`` -> (name, {key: value}) with YAML-typed values."""
    name, _, rest = spec.partition(":")
    overrides = {}
    for item in rest.split():
        key, _, value = item.partition("=")
        overrides[key] = yaml.safe_load(value)
        if isinstance(overrides[key], str):  # YAML 1.1 reads 1e-3 as a string
            try:
                overrides[key] = float(overrides[key])
            except ValueError:
                pass
    return name.strip(), overrides


def recipe_params(base: dict, overrides: dict, steps: int) -> Params:
    """params.yaml with ``overrides`` applied: a plain key is one of ``ddpm.train``, a dotted one a path
    under ``ddpm`` (``model.num_channels=16``)."""
    data = copy.deepcopy(base)
    data["ddpm"]["train"]["steps"] = steps
    for key, value in overrides.items():
        *path, last = ("train." + key if "." not in key else key).split(".")
        section = data["ddpm"]
        for part in path:
            section = section.setdefault(part, {})
        section[last] = value
    return params_from_dict(data)  # validated as params.yaml would be


def pixel_rows(model, images: np.ndarray, params: Params, batch: int = 25) -> np.ndarray:
    """``[N*H*W, D] float16`` features of the images, rows as a store holds them."""
    noise = make_noise(params.features.noise_seed, params.dataset.image_size)
    ddpm = params.ddpm
    return np.concatenate([
        pixel_features(model, to_model_input(images[start : start + batch]), t_steps=list(params.t_steps),
                       blocks=list(params.blocks), noise=noise, noise_schedule=ddpm.noise_schedule,
                       diffusion_steps=ddpm.diffusion_steps, upsample=params.features.upsample,
                       rescale_timesteps=ddpm.rescale_timesteps).half().numpy()
        for start in range(0, len(images), batch)])


def score_snapshot(ema, params: Params, splits: dict) -> dict:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the fit stage: one thread per pass
    try:
        with torch.no_grad():
            features = {name: pixel_rows(ema, images, params) for name, (images, _) in splits.items()}
        labels = {name: masks.reshape(-1) for name, (_, masks) in splits.items()}
        return fit_and_score((features["train"], labels["train"]), (features["val"], labels["val"]), config=params.ensemble,
                             class_names=params.dataset.names(), ignore_label=params.dataset.ignore_label,
                             chunk_rows=params.dataset.image_size**2)
    finally:
        torch.set_num_threads(threads)


def run_recipe(name: str, params: Params, points: list[int], images, splits: dict, save) -> list[dict]:
    """Train to ``params.ddpm.train.steps``, scoring the EMA at each step in ``points``; ``save(row)`` keeps
    each row as it comes (a long run stopped early keeps its points)."""
    ddpm = params.ddpm
    diffusion = Diffusion(ddpm.noise_schedule, ddpm.diffusion_steps, ddpm.rescale_timesteps)
    torch.manual_seed(ddpm.train.seed)
    model = create_unet(params.unet_config())
    results, clock = [], {"train": 0.0, "since": time.perf_counter()}
    window: list[float] = []

    def on_ema(step: int, ema) -> None:
        if step not in points:
            return
        clock["train"] += time.perf_counter() - clock["since"]
        start = time.perf_counter()
        metrics = score_snapshot(copy.deepcopy(ema).eval(), params, splits)
        row = {"recipe": name, "step": step, "val_miou": metrics["miou"], "val_miou_strict": metrics["miou_strict"],
               "train_minutes": round(clock["train"] / 60, 2), "score_minutes": round((time.perf_counter() - start) / 60, 2),
               "loss_last_50": round(float(np.mean(window[-50:])), 5)}
        results.append(row)
        save(row)
        print(json.dumps(row), flush=True)
        clock["since"] = time.perf_counter()

    train_ddpm(model, diffusion, images, ddpm.train, device=torch.device("cpu"),
               on_step=lambda step, losses: window.append(losses["loss"]), on_ema=on_ema)
    return results


def plot(rows: list[dict], path: Path) -> None:
    """val mIoU against pretraining steps, one line per recipe (``train_minutes`` is in the JSON: every
    recipe here costs the same per step, so steps are the fair axis)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(9.5, 4.2))
    for recipe in dict.fromkeys(row["recipe"] for row in rows):
        mine = sorted((row for row in rows if row["recipe"] == recipe), key=lambda row: row["step"])
        label = recipe + (" (one run per point)" if mine[0]["overrides"].get("lr_schedule") == "cosine" else "")
        axis.plot([r["step"] for r in mine], [r["val_miou"] for r in mine], marker="o", label=label)
    axis.set(xlabel="DDPM pretraining steps (batch 32 unless said)", ylabel="val mIoU (paper protocol)",
             xscale="log", title="Built-in digits: val mIoU against pretraining")
    steps = sorted({row["step"] for row in rows})
    axis.set_xticks(steps, [str(step) for step in steps])
    axis.minorticks_off()
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside: the lines cross the corners
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--data", type=Path, default=Path("data/prepared"))
    parser.add_argument("--steps", type=int, nargs="+", default=[200, 400, 800, 1600])
    parser.add_argument("--recipe", action="append", default=[], help='"name: key=value ..." over ddpm.train; none: only plot the JSON')
    parser.add_argument("--out", type=Path, required=True, help="JSON results (rows are appended per recipe)")
    parser.add_argument("--plot", type=Path, default=None)
    args = parser.parse_args()
    base = yaml.safe_load(args.params.read_text())
    images = load_unlabeled(args.data)
    splits = {split.value: load_split(args.data, split)[1:] for split in (Split.TRAIN, Split.VAL)}
    rows = json.loads(args.out.read_text())["rows"] if args.out.exists() else []

    def save(row: dict) -> None:
        rows.append(row)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"command": "python benchmarks/learning_curve.py", "rows": rows}, indent=1) + "\n")

    for spec in args.recipe:
        name, overrides = parse_recipe(spec)
        rows[:] = [row for row in rows if row["recipe"] != name]
        keep = lambda row, overrides=overrides: save({**row, "overrides": overrides, "threads": torch.get_num_threads()})
        params = recipe_params(base, overrides, max(args.steps))
        if params.ddpm.train.lr_schedule is LrSchedule.COSINE:  # the schedule depends on the total: one run per point
            for steps in args.steps:
                run_recipe(name, recipe_params(base, overrides, steps), [steps], images, splits, keep)
        else:
            run_recipe(name, params, args.steps, images, splits, keep)
    if args.plot:
        plot(rows, args.plot)


if __name__ == "__main__":
    main()

"""The competitors' pretraining budget: seconds a step of the DDPM (params.yaml's ``ddpm.train``), the MAE
(``mae``) and SwAV (``swav``) on the prepared unlabeled images, measured in one run, and how many MAE and SwAV
steps fit in the DDPM's ``ddpm.train.steps`` (issue 26: each competitor pretrains for the DDPM's wall-clock time).

    python benchmarks/pretraining_budget.py --data data/prepared --out benchmarks/results/pretraining_budget.json

Run alone (it uses both cores). Each model trains ``--steps`` steps after ``--warmup`` untimed ones (the first
steps pay for allocations and kornia's/transformers' first calls).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from pipeline.config import load_params
from pipeline.data.layout import load_unlabeled
from pipeline.diffusion.gaussian import Diffusion
from pipeline.diffusion.train import train_ddpm
from pipeline.diffusion.unet import create_unet
from pipeline.selfsup.mae import train_mae
from pipeline.selfsup.swav import train_swav


def seconds_per_step(train, steps: int, warmup: int) -> float:
    """``train(n)`` runs n steps from scratch; the time of ``steps`` steps after ``warmup`` of them, per step."""
    times: dict[int, float] = {}

    def on_step(step: int, _losses) -> None:
        times[step] = time.perf_counter()

    train(warmup + steps, on_step)
    return (times[warmup + steps] - times[warmup]) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--data", type=Path, default=Path("data/prepared"))
    parser.add_argument("--steps", type=int, default=60, help="timed steps of each model")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/pretraining_budget.json"))
    args = parser.parse_args()
    params = load_params(args.params)
    images, size, cpu = load_unlabeled(args.data), params.dataset.image_size, torch.device("cpu")
    ddpm = params.ddpm

    def ddpm_run(steps, on_step):
        torch.manual_seed(ddpm.train.seed)
        model = create_unet(params.unet_config(), init=ddpm.train.init.value)
        diffusion = Diffusion(ddpm.noise_schedule, ddpm.diffusion_steps, ddpm.rescale_timesteps)
        config = ddpm.train.model_copy(update={"steps": steps, "state_every": 0})
        train_ddpm(model, diffusion, images, config, device=cpu, on_step=on_step)

    def mae_run(steps, on_step):
        train_mae(params.mae.model_copy(update={"steps": steps}), size, images, device=cpu, on_step=on_step)

    def swav_run(steps, on_step):
        train_swav(params.swav.model_copy(update={"steps": steps}), size, images, device=cpu, on_step=on_step)

    seconds = {name: seconds_per_step(run, args.steps, args.warmup)
               for name, run in (("ddpm", ddpm_run), ("mae", mae_run), ("swav", swav_run))}
    budget = ddpm.train.steps * seconds["ddpm"]
    result = {
        "threads": torch.get_num_threads(), "timed_steps": args.steps,
        "seconds_per_step": {name: round(value, 4) for name, value in seconds.items()},
        "ddpm_steps": ddpm.train.steps, "ddpm_budget_seconds": round(budget, 1),
        "steps_in_the_ddpm_budget": {name: int(budget / seconds[name]) for name in ("mae", "swav")},
        "configured_steps": {"mae": params.mae.steps, "swav": params.swav.steps},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

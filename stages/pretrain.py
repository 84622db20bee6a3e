"""Stage pretrain: train the DDPM on the unlabeled images, or import a guided-diffusion checkpoint."""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

import pipeline.data
import pipeline.diffusion
import pipeline.train_ddpm
import pipeline.unet
from pipeline.config import load_params
from pipeline.data import load_unlabeled
from pipeline.diffusers_unet import import_diffusers_folder
from pipeline.diffusion import Diffusion
from pipeline.report import write_csv_atomic
from pipeline.runtime import pick_device, stage_main
from pipeline.store import file_sha256
from pipeline.train_ddpm import save_checkpoint, train_ddpm
from pipeline.unet import create_unet, load_guided_diffusion


# The default ddpm.checkpoint: a placeholder file meaning "train, import nothing". dvc.yaml depends on
# ${ddpm.checkpoint}, and DVC cannot depend on a null path, so "no checkpoint" has to be a real file.
SCRATCH = "models/scratch"


@stage_main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--data", type=Path, required=True, help="prepared dataset (its unlabeled/ folder)")
    parser.add_argument("--out", type=Path, required=True, help="checkpoint to write")
    parser.add_argument("--plot", type=Path, required=True, help="loss curve CSV")
    args = parser.parse_args()
    params = load_params(args.params)
    ddpm = params.ddpm
    diffusion = Diffusion(ddpm.noise_schedule, ddpm.diffusion_steps, ddpm.rescale_timesteps)
    if ddpm.checkpoint not in (None, SCRATCH) and Path(ddpm.checkpoint).is_dir():
        model, diffusion, source = import_diffusers_folder(Path(ddpm.checkpoint), diffusion, params.dataset.image_size)
        save_checkpoint(args.out, model, diffusion, source)
        write_csv_atomic(pd.DataFrame(columns=["step", "loss", "mse", "vb"]), args.plot)
        print(f"imported diffusers UNet2DModel {ddpm.checkpoint} ({model.num_decoder_blocks} decoder blocks) -> {args.out}")
        return
    flags = params.unet_config()
    if ddpm.checkpoint not in (None, SCRATCH):
        model = load_guided_diffusion(ddpm.checkpoint, flags.to_dict())
        save_checkpoint(args.out, model, diffusion, {"kind": "imported", "path": ddpm.checkpoint,
                                                     "sha256": file_sha256(ddpm.checkpoint)})
        write_csv_atomic(pd.DataFrame(columns=["step", "loss", "mse", "vb"]), args.plot)
        print(f"imported {ddpm.checkpoint} -> {args.out}")
        return
    images = load_unlabeled(args.data)
    device = pick_device("auto")
    if ddpm.train.threads:
        torch.set_num_threads(ddpm.train.threads)
    torch.manual_seed(ddpm.train.seed)  # module init (the UNet's random weights)
    model = create_unet(flags)
    start = time.perf_counter()
    bar = tqdm(total=ddpm.train.steps, desc="pretrain", unit="step", mininterval=5)
    state_path = args.out.with_name(args.out.name + ".state")
    ema, history = train_ddpm(model, diffusion, images, ddpm.train, device=device,
                              on_step=lambda step, losses: bar.update(1), state_path=state_path,
                              fingerprint=run_fingerprint(ddpm, flags.to_dict(), images))
    bar.close()
    save_checkpoint(args.out, ema, diffusion, {"kind": "trained", "steps": ddpm.train.steps,
                                               "unlabeled_images": len(images), "ema_rate": ddpm.train.ema_rate})
    write_csv_atomic(loss_curve(history, ddpm.train.log_every), args.plot)
    state_path.unlink(missing_ok=True)
    print(f"trained {ddpm.train.steps} steps on {len(images)} images in {time.perf_counter() - start:.0f}s -> {args.out}")


def run_fingerprint(ddpm, model_flags: dict, images) -> str:
    """What a resumable state must share with this run to be continued: the recipe, model, schedule, the
    training code and the unlabeled images' bytes (logging knobs excluded)."""
    train = {k: v for k, v in dataclasses.asdict(ddpm.train).items() if k not in ("log_every", "state_every")}
    digest = hashlib.sha256(json.dumps({"train": train, "model": model_flags, "steps": ddpm.diffusion_steps,
                                        "schedule": ddpm.noise_schedule, "rescale": ddpm.rescale_timesteps},
                                       sort_keys=True, default=str).encode())
    for module in (pipeline.train_ddpm, pipeline.unet, pipeline.diffusion, pipeline.data):
        digest.update(Path(module.__file__).read_bytes())
    for path in images.paths:
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def loss_curve(history: list[dict[str, float]], every: int) -> pd.DataFrame:
    """Mean losses over windows of ``every`` steps, one row per window (the last one may be shorter)."""
    frame = pd.DataFrame(history).reindex(columns=["loss", "mse", "vb"]).fillna(0.0)
    frame["step"] = np.arange(1, len(frame) + 1)
    windows = frame.groupby((frame["step"] - 1) // every).agg({"step": "max", "loss": "mean", "mse": "mean", "vb": "mean"})
    return windows[["step", "loss", "mse", "vb"]].reset_index(drop=True)


if __name__ == "__main__":
    main()

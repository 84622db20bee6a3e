"""Stage pretrain: train the DDPM on the unlabeled images, or import a guided-diffusion checkpoint."""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import pandas as pd
import torch
from tqdm import tqdm

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
        write_csv_atomic(pd.DataFrame(columns=["step", "loss", "mse", "vb", "seconds"]), args.plot)
        print(f"imported diffusers UNet2DModel {ddpm.checkpoint} ({model.num_decoder_blocks} decoder blocks) -> {args.out}")
        return
    flags = params.unet_config()
    if ddpm.checkpoint not in (None, SCRATCH):
        model = load_guided_diffusion(ddpm.checkpoint, flags.to_dict())
        save_checkpoint(args.out, model, diffusion, {"kind": "imported", "path": ddpm.checkpoint,
                                                     "sha256": file_sha256(ddpm.checkpoint)})
        write_csv_atomic(pd.DataFrame(columns=["step", "loss", "mse", "vb", "seconds"]), args.plot)
        print(f"imported {ddpm.checkpoint} -> {args.out}")
        return
    images = load_unlabeled(args.data)
    device = pick_device("auto")
    if ddpm.train.threads:
        torch.set_num_threads(ddpm.train.threads)
    torch.manual_seed(ddpm.train.seed)  # module init (the UNet's random weights)
    model = create_unet(flags)
    rows, window = [], []
    start = time.perf_counter()
    bar = tqdm(total=ddpm.train.steps, desc="pretrain", unit="step", mininterval=5)

    def on_step(step: int, losses: dict[str, float]) -> None:
        window.append(losses)
        bar.update(1)
        if step % ddpm.train.log_every == 0 or step == ddpm.train.steps:
            mean = {key: sum(w[key] for w in window) / len(window) for key in window[0]}
            rows.append({"step": step, "loss": mean["loss"], "mse": mean["mse"], "vb": mean.get("vb", 0.0),
                         "seconds": round(time.perf_counter() - start, 2)})
            bar.set_postfix(loss=f"{mean['loss']:.4f}")
            window.clear()

    ema = train_ddpm(model, diffusion, images, ddpm.train, device=device, on_step=on_step)
    bar.close()
    save_checkpoint(args.out, ema, diffusion, {"kind": "trained", "steps": ddpm.train.steps,
                                               "unlabeled_images": len(images), "ema_rate": ddpm.train.ema_rate})
    write_csv_atomic(pd.DataFrame(rows), args.plot)
    print(f"trained {ddpm.train.steps} steps on {len(images)} images in {time.perf_counter() - start:.0f}s -> {args.out}")


if __name__ == "__main__":
    main()

"""DDPM pretraining (ε-prediction, plus the learned-variance bound when learn_sigma), and checkpoints.

A checkpoint is a plain dict loadable with ``torch.load(weights_only=True)``: format, model flags,
diffusion schedule, the EMA state dict used for features, and where it came from.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from torch import nn

from pipeline.config import TrainConfig
from pipeline.data import ImageFiles, to_model_input
from pipeline.diffusion import Diffusion, NoiseSchedule
from pipeline.errors import DatasetError
from pipeline.runtime import atomic_file
from pipeline.unet import ModelFlagsError, UNetConfig, UNetModel, check_state_dict, config_from_flags, create_unet

CHECKPOINT_FORMAT = "ddpm-segmentation-checkpoint/1"
GUIDED_DIFFUSION = "guided-diffusion.UNetModel"  # checkpoints without an "architecture" key are these


def ema_rate_at(step: int, target: float) -> float:
    """EMA decay at optimizer step ``step`` (1-based): ramps as (1+k)/(10+k) up to ``target``."""
    return min(target, (1 + step) / (10 + step))


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, rate: float) -> None:
    for ema_param, param in zip(ema.parameters(), model.parameters()):
        ema_param.mul_(rate).add_(param.detach(), alpha=1 - rate)


def infinite_batches(images: np.ndarray | ImageFiles, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Reshuffled epochs over ``[N, H, W, 3] uint8`` images (an array, or files read per batch), as
    ``[B, 3, H, W] float32`` in [-1, 1]."""
    while True:
        order = torch.randperm(len(images), generator=generator).numpy()
        for start in range(0, len(order) - batch_size + 1, batch_size):
            yield to_model_input(images[order[start : start + batch_size]])


def train_ddpm(
    model: UNetModel,
    diffusion: Diffusion,
    images: np.ndarray | ImageFiles,
    config: TrainConfig,
    *,
    device: torch.device,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
) -> UNetModel:
    """Train ``model`` for ``config.steps`` Adam steps on ``[N, H, W, 3] uint8`` images (an array or
    ``ImageFiles``, which give the same batches); return the EMA model.

    Timesteps are drawn uniformly; the noise and batch order come from generators seeded with
    ``config.seed``. ``on_step(step, losses)`` receives the batch-mean losses after each step.
    """
    if len(images) < config.batch_size:
        raise DatasetError(
            f"{len(images)} unlabeled images are fewer than ddpm.train.batch_size={config.batch_size}; "
            f"add images or lower the batch size"
        )
    generator = torch.Generator().manual_seed(config.seed)
    model.to(device).train()
    ema = copy.deepcopy(model).eval()
    for param in ema.parameters():
        param.requires_grad_(False)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    batches = infinite_batches(images, config.batch_size, generator)
    for step in range(1, config.steps + 1):
        x_start = next(batches).to(device)
        t = torch.randint(0, diffusion.num_timesteps, (x_start.shape[0],), generator=generator).to(device)
        noise = torch.randn(x_start.shape, generator=generator).to(device)
        x_t = diffusion.q_sample(x_start, t, noise)
        terms = diffusion.training_losses(model(x_t, diffusion.model_timesteps(t)), x_start, x_t, t, noise)
        loss = terms["loss"].mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        update_ema(ema, model, ema_rate_at(step, config.ema_rate))
        if on_step is not None:
            on_step(step, {name: value.detach().mean().item() for name, value in terms.items()})
    return ema.cpu()


def save_checkpoint(path: Path, model: UNetModel, diffusion: Diffusion, source: dict) -> None:
    """Write atomically (temp file then rename) so an interrupted run leaves no half-written checkpoint."""
    payload = {
        "format": CHECKPOINT_FORMAT,
        "model_flags": model.config.to_dict(),
        "diffusion": {"steps": diffusion.num_timesteps, "noise_schedule": diffusion.schedule.value,
                      "rescale_timesteps": diffusion.rescale_timesteps,
                      **({"betas": diffusion.betas.tolist()} if diffusion.explicit_betas else {})},
        "state_dict": {key: value.detach().cpu() for key, value in model.state_dict().items()},
        "source": source,
    }
    if getattr(model, "architecture", GUIDED_DIFFUSION) != GUIDED_DIFFUSION:  # guided-diffusion files stay as they were
        payload["architecture"] = model.architecture
    with atomic_file(path) as temporary:
        torch.save(payload, temporary)


def load_checkpoint(path: str | Path) -> tuple[UNetModel, Diffusion, dict]:
    """Load a checkpoint written by ``save_checkpoint`` (weights only) -> eval-mode model, schedule, payload."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist; run the pretrain stage (`dvc repro pretrain`)")
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise ModelFlagsError(
            f"{path} is not a checkpoint of this pipeline; import guided-diffusion .pt files with ddpm.checkpoint"
        )
    model = build_model(payload, path)
    schedule = payload["diffusion"]
    betas = np.asarray(schedule["betas"], dtype=np.float64) if "betas" in schedule else None
    diffusion = Diffusion(NoiseSchedule(schedule["noise_schedule"]), int(schedule["steps"]),
                          bool(schedule.get("rescale_timesteps", False)), betas=betas)
    return model.eval(), diffusion, payload


def build_model(payload: dict, path: Path) -> nn.Module:
    """The checkpoint's network with its weights: a guided-diffusion UNet, or a diffusers UNet2DModel
    (imported by the pretrain stage; needs the diffusers extra)."""
    if payload.get("architecture", GUIDED_DIFFUSION) != GUIDED_DIFFUSION:
        from pipeline.diffusers_unet import build_unet

        model = build_unet(payload["model_flags"]["diffusers"])
        model.load_state_dict(payload["state_dict"])
        return model
    config: UNetConfig = config_from_flags(payload["model_flags"])
    model = create_unet(config)
    check_state_dict(model, payload["state_dict"], f"checkpoint {path}")
    model.load_state_dict(payload["state_dict"])
    return model

"""DDPM pretraining (ε-prediction, plus the learned-variance bound when learn_sigma), and checkpoints.

The recipe's options (``ddpm.train``): the ε-MSE weighting (uniform or Min-SNR-γ), the learning-rate
schedule (linear warm-up, then constant or cosine) and the batch size. A run writes a resumable state
every ``state_every`` steps, so a killed run continues instead of starting again.

The same function trains on several processes (``pipeline.diffusion.distributed``, launched by torchrun): the
global batch ``batch_size`` is split into equal, disjoint shares, one per rank, DDP averages the ranks'
gradients, and rank 0 alone keeps the EMA and writes the states. Every rank draws the whole batch's timesteps
and noise from the one seeded generator and keeps its share, so the run computes what one process computes on
the same batches, up to the order of float sums (docs/scaling.md).

A checkpoint is a plain dict loadable with ``torch.load(weights_only=True)``: format, model flags,
diffusion schedule, the EMA state dict used for features, and where it came from.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from pipeline.atomic import save_torch_atomic
from pipeline.config import TrainConfig
from pipeline.data.images import to_model_input
from pipeline.data.layout import ImageFiles
from pipeline.diffusion import distributed
from pipeline.diffusion.distributed import ONE_PROCESS, World
from pipeline.diffusion.flags import UNetConfig, config_from_flags
from pipeline.diffusion.gaussian import Diffusion
from pipeline.diffusion.unet import UNetModel, check_state_dict, create_unet
from pipeline.enums import LossWeighting, LrSchedule, NoiseSchedule
from pipeline.errors import ConfigError, DatasetError, ModelFlagsError, NumericsError
from pipeline.resume import load_resumable_state
from pipeline.runtime import autocast

CHECKPOINT_FORMAT = "ddpm-segmentation-checkpoint/1"
STATE_FORMAT = "ddpm-segmentation-pretrain-state/1"
GUIDED_DIFFUSION = "guided-diffusion.UNetModel"  # checkpoints without an "architecture" key are these


def ema_rate_at(step: int, target: float) -> float:
    """EMA decay at optimizer step ``step`` (1-based): ramps as (1+k)/(10+k) up to ``target``."""
    return min(target, (1 + step) / (10 + step))


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, rate: float) -> None:
    ema_params, params = list(ema.parameters()), [param.detach() for param in model.parameters()]
    torch._foreach_mul_(ema_params, rate)  # the same arithmetic as a loop of mul_ / add_, in a few kernels
    torch._foreach_add_(ema_params, params, alpha=1 - rate)


def epoch_order(count: int, seed: int, epoch: int) -> np.ndarray:
    """The image order of one epoch: a permutation drawn from a generator seeded by ``(seed, epoch)``, so
    step k's batch depends on the seed and k only, and a resumed run draws the batches an unbroken one does."""
    epoch_seed = int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])
    return torch.randperm(count, generator=torch.Generator().manual_seed(epoch_seed)).numpy()


def batch_at(images: np.ndarray | ImageFiles, batch_size: int, seed: int, step: int,
             share: slice = slice(None)) -> torch.Tensor:
    """Step ``step``'s (1-based) batch as ``[B, 3, H, W] float32`` in [-1, 1]; epochs drop the last partial batch.
    ``share``: the positions of the batch to read (a rank's share of the global batch; all of it by default)."""
    per_epoch = len(images) // batch_size
    epoch, position = divmod(step - 1, per_epoch)
    order = epoch_order(len(images), seed, epoch)
    return to_model_input(images[order[position * batch_size : (position + 1) * batch_size][share]])


def lr_at(step: int, config: TrainConfig) -> float:
    """Learning rate of step ``step`` (1-based): linear warm-up over ``warmup_steps``, then constant or a
    half-cosine that reaches 0 just after the last step."""
    if step <= config.warmup_steps:
        return config.lr * step / config.warmup_steps
    if config.lr_schedule is LrSchedule.COSINE:
        progress = (step - 1 - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
        return config.lr * 0.5 * (1 + math.cos(math.pi * progress))
    return config.lr


def mse_weights(diffusion: Diffusion, config: TrainConfig) -> torch.Tensor:
    """Per-timestep weight ``[T]`` of the ε-MSE. Min-SNR-γ (Hang et al., 2023) caps the signal-to-noise
    ratio SNR(t) = ᾱ_t / (1 - ᾱ_t) at γ: for ε-prediction the weight is min(SNR, γ) / SNR, so the nearly
    noise-free steps, whose ε is hard to see and easy to overfit, stop dominating the gradient."""
    if config.loss_weighting is LossWeighting.UNIFORM:
        return torch.ones(diffusion.num_timesteps)
    snr = diffusion.alphas_cumprod / (1.0 - diffusion.alphas_cumprod)
    return torch.from_numpy(np.minimum(snr, config.min_snr_gamma) / snr).float()


@dataclass
class Trainer:
    """The mutable state of a pretraining run: what a resumable state file holds."""

    model: UNetModel
    ema: UNetModel | None  # rank 0's only
    optimizer: torch.optim.Optimizer
    generator: torch.Generator  # timesteps and noise, the same on every rank
    step: int = 0
    history: list[dict[str, float]] = field(default_factory=list)  # batch-mean losses of every step so far
    world: World = ONE_PROCESS

    def state(self, fingerprint: str) -> dict | None:
        """The resumable state, on rank 0 (None on the others). With several ranks, every rank must call it:
        each rank's global generator (dropout) is gathered into ``rank_torch_rng``."""
        rank_rngs = distributed.gather(torch.get_rng_state(), self.world) if self.world.distributed else None
        if not self.world.main:
            return None
        state = {"format": STATE_FORMAT, "fingerprint": fingerprint, "step": self.step, "history": self.history,
                 "model": self.model.state_dict(), "ema": self.ema.state_dict(),
                 "optimizer": self.optimizer.state_dict(), "generator": self.generator.get_state(),
                 "torch_rng": torch.get_rng_state()}
        if rank_rngs is not None:
            state["rank_torch_rng"] = rank_rngs
        return state

    def restore(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"])
        # Dropout draws from each rank's global generator. A state written by another number of ranks restores
        # all but those draws (rank 0 takes the saved rank 0's, the others a seed of their own).
        rank_rngs = state.get("rank_torch_rng") or [state["torch_rng"]]
        if len(rank_rngs) == self.world.size:
            torch.set_rng_state(rank_rngs[self.world.rank])
        elif self.world.main:
            torch.set_rng_state(rank_rngs[0])
        else:
            seed_rank_dropout(int(state["step"]), self.world)
        self.step, self.history = int(state["step"]), list(state["history"])


def seed_rank_dropout(seed: int, world: World) -> None:
    """Seed the global generator of a rank other than 0, so that its dropout masks differ from rank 0's."""
    torch.manual_seed(int(np.random.SeedSequence([seed, world.rank]).generate_state(1)[0]))


def load_state(path: Path, fingerprint: str, quiet: bool = False) -> dict | None:
    """The resumable state at ``path`` if it belongs to this run (same fingerprint), else None with a note
    (none when ``quiet``: ranks other than 0 say nothing)."""
    def progress(state: dict) -> str:
        return f"from step {state['step']}"

    return load_resumable_state(path, STATE_FORMAT, fingerprint, "pretrain", progress,
                                say=(lambda message: None) if quiet else print)


def train_ddpm(
    model: UNetModel,
    diffusion: Diffusion,
    images: np.ndarray | ImageFiles,
    config: TrainConfig,
    *,
    device: torch.device,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
    on_ema: Callable[[int, UNetModel], None] | None = None,
    state_path: Path | None = None,
    fingerprint: str = "",
    world: World = ONE_PROCESS,
) -> tuple[UNetModel | None, list[dict[str, float]]]:
    """Train ``model`` for ``config.steps`` Adam steps on ``[N, H, W, 3] uint8`` images (an array or
    ``ImageFiles``, which give the same batches); return the EMA model and every step's batch-mean losses.

    Timesteps are drawn uniformly and the ε-MSE weighted per ``config.loss_weighting``; the noise and the
    batch order come from generators seeded with ``config.seed``. ``on_step(step, losses)`` follows each
    step and ``on_ema(step, ema)`` too (e.g. to snapshot the EMA). With ``state_path``, a resumable state
    is written there every ``config.state_every`` steps and a run whose state matches ``fingerprint``
    continues from it; the result equals an unbroken run's bit for bit.

    With ``world`` of several ranks (the process group joined, ``distributed.start``) each rank computes its
    share of every global batch of ``config.batch_size``; every rank returns the same history, rank 0 the EMA
    model (the others None), and only rank 0 calls ``on_ema`` and writes the state.
    """
    if len(images) < config.batch_size:
        raise DatasetError(
            f"{len(images)} unlabeled images are fewer than ddpm.train.batch_size={config.batch_size}; "
            f"add images or lower the batch size"
        )
    if config.batch_size % world.size:
        raise ConfigError(
            f"ddpm.train.batch_size={config.batch_size} does not split evenly across {world.size} ranks; use a "
            f"multiple of {world.size} (it is the global batch: the recipe does not change with the rank count)")
    model.to(device).train()
    ema = None
    if world.main:
        ema = copy.deepcopy(model).eval()
        for param in ema.parameters():
            param.requires_grad_(False)
    trainer = Trainer(model, ema, torch.optim.Adam(model.parameters(), lr=config.lr),
                      torch.Generator().manual_seed(config.seed), world=world)
    state = load_state(state_path, fingerprint, quiet=not world.main) if state_path is not None else None
    check_same_start(state, state_path, world)
    if state is not None:
        trainer.restore(state)
    elif not world.main:
        seed_rank_dropout(config.seed, world)
    network = distributed.wrap(model, world, device)  # after restore: DDP starts every rank from rank 0's weights
    weights = mse_weights(diffusion, config).to(device)  # per-timestep ε-MSE weights, moved once
    share = world.share(config.batch_size)
    precision = autocast(device, config.autocast.value, "ddpm.train.autocast")  # refused here, before any step
    while trainer.step < config.steps:
        trainer.step += 1
        batch = batch_at(images, config.batch_size, config.seed, trainer.step, share).to(device)
        losses = _train_step(trainer, network, diffusion, batch, weights, lr_at(trainer.step, config), config.ema_rate,
                             precision)
        trainer.history.append(losses)
        if on_step is not None:
            on_step(trainer.step, losses)
        if on_ema is not None and ema is not None:
            on_ema(trainer.step, ema)
        if state_path is not None and config.state_every and trainer.step % config.state_every == 0 and trainer.step < config.steps:
            state = trainer.state(fingerprint)
            if state is not None:
                save_torch_atomic(state, state_path)
    return (ema.cpu() if ema is not None else None), trainer.history


def check_same_start(state: dict | None, path: Path | None, world: World) -> None:
    """Every rank must resume from the same step: each reads the state file, so it must be on a filesystem
    every machine shares (or absent on all)."""
    if not world.distributed:
        return
    steps = distributed.gather(0 if state is None else int(state["step"]), world)
    if len(set(steps)) > 1:
        raise ConfigError(
            f"the ranks found different resumable states at {path} (steps by rank: {steps}, 0 = none); put the "
            f"checkpoint's folder on a filesystem every machine shares, or delete the state files to start afresh")


def _train_step(trainer: Trainer, network: nn.Module, diffusion: Diffusion, x_start: torch.Tensor, weights: torch.Tensor,
                lr: float, ema_rate: float, precision: torch.autocast) -> dict[str, float]:
    """One Adam step on this rank's share ``x_start`` of the global batch, the UNet's forward under ``precision``
    (the loss in float32); returns the global batch's mean losses."""
    device, world = x_start.device, trainer.world
    # The whole global batch's timesteps and noise, of which this rank keeps its share (all of it in one process).
    share = slice(world.rank * x_start.shape[0], (world.rank + 1) * x_start.shape[0])
    full = x_start.shape[0] * world.size
    t = torch.randint(0, diffusion.num_timesteps, (full,), generator=trainer.generator)[share]
    noise = torch.randn((full, *x_start.shape[1:]), generator=trainer.generator)[share].to(device)
    t = t.to(device)
    x_t = diffusion.q_sample(x_start, t, noise)
    with precision:
        output = network(x_t, diffusion.model_timesteps(t))
    terms = diffusion.training_losses(output.float(), x_start, x_t, t, noise)
    per_image = terms["loss"] + (weights[t] - 1) * terms["mse"]  # weighted mse + vb
    loss = per_image.mean()  # with DDP's gradient average, the global batch's mean (the shares are equal)
    losses = None
    if world.distributed:  # the global batch's means, so that every rank logs and checks the same numbers
        sums = torch.stack([per_image.detach().sum(), *(value.detach().sum() for value in terms.values())])
        means = (distributed.sum_across(sums, world) / full).tolist()
        checked, losses = torch.tensor(means[0]), dict(zip(terms, means[1:]))
    else:
        checked = loss
    if not torch.isfinite(checked):
        raise NumericsError(
            f"pretrain: the loss became {checked.item()} at step {trainer.step}; likely cause: ddpm.train.lr="
            f"{lr:g} is too high (try a lower one or warmup_steps), or the images hold extreme values. "
            f"No checkpoint was written; the last resumable state (if any) is kept")
    for group in trainer.optimizer.param_groups:
        group["lr"] = lr
    trainer.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    trainer.optimizer.step()
    if trainer.ema is not None:
        update_ema(trainer.ema, trainer.model, ema_rate_at(trainer.step, ema_rate))
    if losses is not None:
        return losses
    return {name: value.detach().mean().item() for name, value in terms.items()}


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
    save_torch_atomic(payload, path)


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
        from pipeline.diffusion.diffusers_unet import build_unet

        model = build_unet(payload["model_flags"]["diffusers"])
        model.load_state_dict(payload["state_dict"])
        return model
    config: UNetConfig = config_from_flags(payload["model_flags"])
    model = create_unet(config)
    check_state_dict(model, payload["state_dict"], f"checkpoint {path}")
    model.load_state_dict(payload["state_dict"])
    return model

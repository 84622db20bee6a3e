"""SwAV (Caron et al. 2020) as a competing representation: a ResNet (transformers' ``ResNetModel``) trained
from random weights on the unlabeled images the DDPM is pretrained on (``features.representation: swav``).

Pretraining (``train_swav``, the pretrain_swav stage), as SwAV defines it: each image gives two global crops
and ``swav.local_crops`` small ones (multi-crop; kornia's random resized crops, flips, colour jitter and
grayscale); the backbone's pooled output goes through a projection MLP, is L2-normalised and scored against
``swav.prototypes`` learnable, L2-normalised prototype vectors. Each global crop's scores are turned into
soft codes by Sinkhorn-Knopp (equal partition of the batch over the prototypes, ``sinkhorn_epsilon``,
``sinkhorn_iterations``), and every other crop predicts them (the swapped prediction: cross-entropy against
the softmax of its scores at ``temperature``). The prototypes stay fixed for ``freeze_prototypes_steps``.
AdamW with a linear warm-up and a half-cosine decay, as the MAE's.

The loss and Sinkhorn are written here: lightly, the kept library that has them, depends on torchvision, whose
wheels fail to import beside this project's torch 2.13 (``operator torchvision::nms does not exist``).

Batches are the DDPM's (``pipeline.diffusion.train.batch_at``: step k's batch depends on the seed and k only)
and step k's crops come from torch's generator seeded with (``swav.seed``, k), so a run resumed from its
state file equals an unbroken one bit for bit.

Features (``block_maps``), as the paper's ``FeatureExtractorSwAV`` takes them: the outputs of every other
residual block of each ResNet stage (``layer[::2]``); ``blocks`` indexes that list (``hooked_blocks``).
A checkpoint is a plain dict (``torch.load(weights_only=True)``): format, the ``ResNetConfig`` arguments, the
backbone's weights (the projection head and prototypes are dropped) and where it came from.
transformers and kornia are imported inside the functions that use them: the DDPM's stages never load them.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.config import SwavConfig
from pipeline.data.layout import ImageFiles
from pipeline.diffusion.train import batch_at
from pipeline.errors import ConfigError, DatasetError
from pipeline.selfsup.steps import pretraining_steps, read_encoder, save_encoder, save_unused

if TYPE_CHECKING:
    from transformers import ResNetModel

SWAV_FORMAT = "ddpm-segmentation-swav/1"
STATE_FORMAT = "ddpm-segmentation-swav-state/1"


class SwavNetwork(torch.nn.Module):
    """The backbone, SwAV's projection head (Linear, BatchNorm, ReLU, Linear) and the prototypes (a Linear
    without bias over L2-normalised embeddings)."""

    def __init__(self, config: SwavConfig):
        super().__init__()
        from transformers import ResNetConfig, ResNetModel

        self.backbone = ResNetModel(ResNetConfig(**config.resnet_config()))
        width, hidden = config.hidden_sizes[-1], config.projection_hidden
        self.projection = torch.nn.Sequential(
            torch.nn.Linear(width, hidden), torch.nn.BatchNorm1d(hidden), torch.nn.ReLU(inplace=True),
            torch.nn.Linear(hidden, config.projection_dim))
        self.prototypes = torch.nn.Linear(config.projection_dim, config.prototypes, bias=False)

    def normalise_prototypes(self) -> None:
        with torch.no_grad():
            self.prototypes.weight.copy_(F.normalize(self.prototypes.weight, dim=1))

    def forward(self, crops: Sequence[torch.Tensor]) -> torch.Tensor:
        """Prototype scores ``[sum of crop batches, prototypes]``: crops of one size go through the backbone
        together (its pooling takes any size), then the head sees them all at once (one BatchNorm batch)."""
        pooled, first = [], 0
        while first < len(crops):
            last = first
            while last < len(crops) and crops[last].shape[-1] == crops[first].shape[-1]:
                last += 1
            pooled.append(self.backbone(pixel_values=torch.cat(crops[first:last])).pooler_output.flatten(1))
            first = last
        embeddings = F.normalize(self.projection(torch.cat(pooled)), dim=1)
        return self.prototypes(embeddings)


def sinkhorn(scores: torch.Tensor, epsilon: float, iterations: int) -> torch.Tensor:
    """SwAV's soft codes ``[B, K]`` of scores ``[B, K]`` (cosine similarities, in [-1, 1]): exp(scores / epsilon)
    scaled so that the batch is spread equally over the K prototypes, each row a distribution (Sinkhorn-Knopp,
    ``iterations`` rounds). In float64, so that exp(-2 / epsilon) does not underflow to a prototype of zeros."""
    codes = torch.exp((scores.double() - scores.max()) / epsilon).t()  # [K, B]; the max shift cancels in the scaling
    codes /= codes.sum()
    prototypes, batch = codes.shape
    for _ in range(iterations):
        codes /= codes.sum(dim=1, keepdim=True)
        codes /= prototypes
        codes /= codes.sum(dim=0, keepdim=True)
        codes /= batch
    return (codes * batch).t().to(scores.dtype)


def swapped_prediction_loss(scores: torch.Tensor, batch: int, global_crops: int, config: SwavConfig) -> torch.Tensor:
    """SwAV's loss over crops stacked in ``scores [crops * batch, K]`` (the global crops first): each global
    crop's Sinkhorn codes are predicted by every other crop, averaged over the pairs."""
    crops = scores.shape[0] // batch
    views = scores.float().split(batch)
    log_probabilities = [F.log_softmax(view / config.temperature, dim=1) for view in views]
    total = scores.new_zeros(())
    for code_view in range(global_crops):
        with torch.no_grad():
            codes = sinkhorn(views[code_view].detach(), config.sinkhorn_epsilon, config.sinkhorn_iterations)
        others = [view for view in range(crops) if view != code_view]
        total = total + sum(-(codes * log_probabilities[view]).sum(dim=1).mean() for view in others) / len(others)
    return total / global_crops


def multi_crop(config: SwavConfig, image_size: int) -> tuple[torch.nn.Module, torch.nn.Module]:
    """Kornia augmentations of ``[B, 3, S, S]`` images in [0, 1]: (global crop, local crop), each a random
    resized crop (SwAV's scales), a horizontal flip, colour jitter and grayscale."""
    import kornia.augmentation as K

    def crop(size: int, scale: tuple[float, float]) -> torch.nn.Module:
        return K.AugmentationSequential(
            K.RandomResizedCrop((size, size), scale=scale),
            K.RandomHorizontalFlip(p=0.5 if config.flip else 0.0),
            K.ColorJitter(0.8 * config.jitter, 0.8 * config.jitter, 0.8 * config.jitter, 0.2 * config.jitter, p=0.8),
            K.RandomGrayscale(p=0.2))

    local = config.local_crop_size or image_size // 2
    return (crop(image_size, (config.global_crop_scale, 1.0)),
            crop(local, (config.local_crop_scale, config.global_crop_scale)))


def _optimizer(model: torch.nn.Module, config: SwavConfig) -> torch.optim.Optimizer:
    """AdamW; biases and norms (1-D parameters) without weight decay."""
    trained = [param for param in model.parameters() if param.requires_grad]
    groups = [{"params": [p for p in trained if p.ndim > 1], "weight_decay": config.weight_decay},
              {"params": [p for p in trained if p.ndim <= 1], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=config.lr)


def _step_seed(seed: int, step: int) -> int:
    return int(np.random.SeedSequence([seed, step]).generate_state(1)[0])


def train_swav(
    config: SwavConfig,
    image_size: int,
    images: np.ndarray | ImageFiles,
    *,
    device: torch.device,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
    state_path: Path | None = None,
    fingerprint: str = "",
) -> tuple["ResNetModel", list[dict[str, float]]]:
    """Pretrain SwAV for ``config.steps`` steps on ``[N, S, S, 3] uint8`` images (an array or ``ImageFiles``);
    return its backbone (eval mode, CPU) and every step's loss ``{"loss": ...}``.

    ``on_step(step, losses)`` follows each step. With ``state_path`` a resumable state is written there every
    ``config.state_every`` steps and a run whose state matches ``fingerprint`` continues from it.
    """
    from transformers import get_cosine_schedule_with_warmup

    if len(images) < config.batch_size:
        raise DatasetError(f"{len(images)} unlabeled images are fewer than swav.batch_size={config.batch_size}; "
                           f"add images or lower the batch size")
    torch.manual_seed(config.seed)
    model = SwavNetwork(config).to(device).train()
    optimizer = _optimizer(model, config)
    schedule = get_cosine_schedule_with_warmup(optimizer, config.warmup_steps, max(1, config.steps))
    global_crop, local_crop = multi_crop(config, image_size)

    def loss_at(step: int) -> torch.Tensor:
        pixels = (batch_at(images, config.batch_size, config.seed, step) + 1) / 2  # kornia's [0, 1]
        torch.manual_seed(_step_seed(config.seed, step))  # the crops of step k depend on (seed, k) only
        crops = [global_crop(pixels) for _ in range(2)] + [local_crop(pixels) for _ in range(config.local_crops)]
        model.normalise_prototypes()
        scores = model([crop.to(device) * 2 - 1 for crop in crops])
        return swapped_prediction_loss(scores, pixels.shape[0], 2, config)

    def freeze_prototypes(step: int) -> None:
        if step <= config.freeze_prototypes_steps:
            model.prototypes.weight.grad = None

    history = pretraining_steps(
        config.steps, config.state_every, {"model": model, "optimizer": optimizer, "schedule": schedule}, loss_at,
        stage="pretrain_swav", state_format=STATE_FORMAT, after_backward=freeze_prototypes,
        likely_cause=lambda: (f"swav.lr={schedule.get_last_lr()[0]:g} is too high or swav.sinkhorn_epsilon="
                              f"{config.sinkhorn_epsilon:g} too low"),
        on_step=on_step, state_path=state_path, fingerprint=fingerprint)
    return model.backbone.cpu().eval(), history


def save_swav(path: Path, backbone: "ResNetModel", config: SwavConfig, image_size: int, source: dict) -> None:
    """The backbone's weights with the ``ResNetConfig`` arguments that rebuild it and the image size it was
    trained at, written atomically."""
    save_encoder(path, SWAV_FORMAT, backbone, source, resnet_config=config.resnet_config(), image_size=image_size)


def unused_checkpoint(path: Path) -> None:
    """The placeholder the stage writes when the representation is not swav (``save_unused``)."""
    save_unused(path, SWAV_FORMAT)


def load_swav(path: str | Path) -> "ResNetModel":
    """The backbone ``save_swav`` wrote, in eval mode on the CPU, with ``config.image_size`` the size it was
    trained at (where the feature path reads a model's image size)."""
    from transformers import ResNetConfig, ResNetModel

    payload = read_encoder(path, SWAV_FORMAT, "swav", "SwAV")
    model = ResNetModel(ResNetConfig(**payload["resnet_config"]))
    model.load_state_dict(payload["state_dict"])
    model.config.image_size = int(payload["image_size"])
    return model.eval()


def hooked_blocks(model: "ResNetModel") -> list[torch.nn.Module]:
    """The residual blocks whose outputs are features, in order: every other block of each stage (the paper's
    ``layer[::2]``); ``blocks`` indexes this list."""
    return [layer for stage in model.encoder.stages for layer in list(stage.layers)[::2]]


def check_blocks(model: "ResNetModel", blocks: Sequence[int]) -> None:
    count = len(hooked_blocks(model))
    beyond = [block for block in blocks if not 0 <= block < count]
    if beyond:
        raise ConfigError(f"blocks {list(blocks)} asks for SwAV feature block(s) {beyond}, but its ResNet has "
                          f"{count} (0 to {count - 1}: every other residual block of each stage); choose blocks "
                          f"within them")


def block_shapes(model: "ResNetModel", blocks: Sequence[int]) -> list[tuple[int, int]]:
    """Each chosen block's (channels, map side) at the model's image size."""
    size = model.config.image_size
    with torch.no_grad():
        maps = block_maps(model, torch.zeros(1, 3, size, size, device=next(model.parameters()).device), blocks)
    return [(block.shape[1], block.shape[-1]) for block in maps]


def block_maps(model: "ResNetModel", x0: torch.Tensor, blocks: Sequence[int]) -> list[torch.Tensor]:
    """The outputs ``[N, C_b, h_b, w_b]`` of the chosen hooked blocks for ``x0 [N, 3, S, S]`` in [-1, 1]."""
    check_blocks(model, blocks)
    chosen = hooked_blocks(model)
    outputs: dict[int, torch.Tensor] = {}
    handles = [chosen[block].register_forward_hook(
        lambda module, inputs, output, block=block: outputs.__setitem__(block, output)) for block in blocks]
    try:
        model(pixel_values=x0)
    finally:
        for handle in handles:
            handle.remove()
    return [outputs[block] for block in blocks]

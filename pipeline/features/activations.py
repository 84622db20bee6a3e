"""Per-pixel diffusion features: decoder activations at chosen steps, upsampled and concatenated.

The paper's extraction (ddpm-segmentation's ``collect_features``): for each step t (outer) noise the
image with ``q_sample``, run the UNet at integer t, take ``output_blocks[b]`` for each chosen b (inner),
upsample each to the image size and concatenate along channels. Rows are image-major, then row-major
pixels.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from pipeline.diffusion.gaussian import Diffusion
from pipeline.diffusion.unet import UNetModel
from pipeline.enums import NoiseSchedule, Representation, UpsampleMode
from pipeline.errors import NumericsError, check_decoder_blocks, check_timesteps
from pipeline.features.upsample import upsample_concat
from pipeline.selfsup.encoders import encoder_block_shapes, is_self_supervised


def make_noise(seed: int, image_size: int, channels: int = 3) -> torch.Tensor:
    """The shared noise ``[1, C, S, S] float32`` of one extraction, from a seeded CPU generator."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn((1, channels, image_size, image_size), generator=generator)


def feature_dim(model: UNetModel, blocks: Sequence[int], num_steps: int = 1) -> int:
    shapes = model.decoder_block_shapes()
    check_decoder_blocks(blocks, len(shapes))
    return num_steps * sum(shapes[block][0] for block in blocks)


def representation_dim(model: UNetModel, blocks: Sequence[int], representation: Representation | str,
                       patch_size: int) -> int:
    """Features per pixel and step of ``features.representation``: the blocks' channels, 3, 3 x patch_size², or
    for mae and swav (``model`` their encoder) the channels of its chosen blocks."""
    representation = Representation(representation)
    if representation is Representation.DDPM:
        return feature_dim(model, blocks)
    if is_self_supervised(representation):
        return sum(channels for channels, _ in encoder_block_shapes(representation, model, blocks))
    return 3 * (patch_size**2 if representation is Representation.RGB_PATCH else 1)


def rgb_maps(x0: torch.Tensor, patch_size: int = 1) -> torch.Tensor:
    """The RGB baselines' features: ``x0 [N, 3, H, W]`` in [-1, 1] -> ``[N, 3 * patch_size², H, W] float32``,
    each pixel's patch_size x patch_size neighbourhood (edges replicate-padded; channel-major, as F.unfold)."""
    if patch_size == 1:
        return x0.float()
    pad = patch_size // 2
    patches = F.unfold(F.pad(x0.float(), [pad] * 4, mode="replicate"), kernel_size=patch_size)  # [N, 3*k*k, H*W]
    return patches.reshape(x0.shape[0], -1, *x0.shape[-2:])


# Cap on one extraction batch's float32 feature maps ([B, D, H, W] x 4 bytes; upsample_concat holds them
# about twice while concatenating, and the rows are copied once more to float16). 2 GiB keeps the paper's
# 256² blocks [5, 6, 7, 8, 12] (D = 2816 per step, 0.74 GB per image) at 2 images per batch, as the
# README recipe used to set by hand, and leaves the built-in digits (0.8 MB per image) at features.batch_size.
FEATURE_BATCH_BYTES = 2 * 1024**3


def images_per_batch(requested: int, image_size: int, dim: int, budget_bytes: int = FEATURE_BATCH_BYTES) -> int:
    """``features.batch_size`` lowered so one batch's ``[B, dim, image_size, image_size]`` float32 maps
    fit in ``budget_bytes`` (at least 1 image)."""
    per_image = image_size * image_size * dim * 4
    return max(1, min(requested, budget_bytes // per_image))


def decoder_activations(
    model: UNetModel,
    diffusion: Diffusion,
    x0: torch.Tensor,
    t: int,
    blocks: Sequence[int],
    noise: torch.Tensor,
    autocast_dtype: torch.dtype | None = None,
) -> list[torch.Tensor]:
    """The maps ``[N, C_b, h_b, w_b]`` of decoder blocks ``blocks`` for ``x0`` noised to step ``t`` with
    ``noise`` ``[1 or N, 3, H, W]``; or ``[draws, 1 or N, 3, H, W]``: then each block's mean over the draws, in
    float32 (``features.noise_draws``)."""
    if noise.dim() == 5:
        total = None
        for draw in noise:
            maps = [block.float() for block in decoder_activations(model, diffusion, x0, t, blocks, draw, autocast_dtype)]
            total = maps if total is None else [sum_.add_(block) for sum_, block in zip(total, maps)]
        return [sum_.div_(noise.shape[0]) for sum_ in total]
    timesteps = torch.full((x0.shape[0],), t, dtype=torch.long, device=x0.device)
    noisy = diffusion.q_sample(x0, timesteps, noise.to(x0.device))
    with torch.autocast(x0.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        _, activations = model(noisy, diffusion.model_timesteps(timesteps), return_blocks=list(blocks))
    return activations


@torch.no_grad()
def feature_maps(
    model: UNetModel,
    diffusion: Diffusion,
    x0: torch.Tensor,
    *,
    t_steps: Sequence[int],
    blocks: Sequence[int],
    noise: torch.Tensor,
    upsample: UpsampleMode | str = UpsampleMode.BILINEAR,
    autocast_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """``x0`` ``[N, 3, H, W]`` in [-1, 1] -> ``[N, D, H, W] float32``, steps outer and blocks inner.

    ``noise`` is ``[1, 3, H, W]`` (shared by all images) or ``[N, 3, H, W]``; or ``[draws, 1 or N, 3, H, W]``:
    then the mean of the draws' maps (``features.noise_draws``; ``decoder_activations``).
    """
    check_timesteps(list(t_steps), diffusion.num_timesteps)
    feature_dim(model, blocks)  # validates block indices with a readable error
    maps = []
    for t in t_steps:
        activations = decoder_activations(model, diffusion, x0, t, blocks, noise, autocast_dtype)
        maps.append(upsample_concat(activations, x0.shape[-1], upsample))
    return torch.cat(maps, dim=1)


def pixel_features(
    model: UNetModel,
    x0: torch.Tensor,
    *,
    t_steps: Sequence[int],
    blocks: Sequence[int],
    noise: torch.Tensor,
    noise_schedule: NoiseSchedule | str = "linear",
    diffusion_steps: int = 1000,
    upsample: UpsampleMode | str = UpsampleMode.BILINEAR,
    rescale_timesteps: bool = False,
) -> torch.Tensor:
    """The paper's per-pixel feature matrix ``[N*H*W, D] float32`` (rows image-major, row-major pixels)."""
    maps = feature_maps(
        model, Diffusion(noise_schedule, diffusion_steps, rescale_timesteps), x0, t_steps=t_steps, blocks=blocks, noise=noise, upsample=upsample
    )
    return maps.permute(0, 2, 3, 1).reshape(-1, maps.shape[1])


FLOAT16_MAX = 65504.0  # the largest finite float16: stores keep features as float16


def check_feature_values(maps: torch.Tensor, indices: Sequence[int], t_steps: Sequence[int],
                         name_of: Callable[[int], str]) -> None:
    """``maps [N, D, H, W]``: raise ``NumericsError`` for NaN/inf, or for values beyond float16's range."""
    # Two reductions per image, no copy of the maps (0.74 GB per image at 256²): max and min carry any NaN or inf.
    flat = maps.detach().flatten(1)
    high, low = flat.amax(1).cpu(), flat.amin(1).cpu()
    finite = torch.isfinite(high) & torch.isfinite(low)
    if not finite.all():
        first = indices[int((~finite).nonzero()[0])]
        raise NumericsError(
            f"extract t={list(t_steps)}: {name_of(first)} gave NaN or infinite features; likely cause: the checkpoint "
            f"holds NaN/inf weights (a diverged pretraining: check its loss curve) or features.autocast overflowed "
            f"inside the UNet (set features.autocast: none). Nothing of this image was written")
    peak = torch.maximum(high, -low)
    if (peak > FLOAT16_MAX).any():
        position = int((peak > FLOAT16_MAX).nonzero()[0])
        raise NumericsError(
            f"extract t={list(t_steps)}: {name_of(indices[position])} gave features up to {float(peak[position]):.4g}, "
            f"beyond the {FLOAT16_MAX:g} a float16 store holds (they would become inf); likely cause: a checkpoint "
            f"whose activations are not normalised (wrong ddpm.model flags, or a diverged pretraining)")

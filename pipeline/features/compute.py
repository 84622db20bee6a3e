"""The one feature path: features of images, batch by batch, for every caller.

extract (into a store), segment and the API (new images), robustness (corrupted test images), kmeans, and
any later stage that labels images all call ``features_for_images``, so they share one memory cap
(``images_per_batch``), one autocast rule (``features.autocast``), one set of noise variants
(``batch_noise``: one shared noise, per-image noise of the stochastic variant, the mean of
``noise_draws`` draws), the representations (ddpm, rgb, rgb_patch, mae, swav) and both store layouts. A store's
rows and a caller's rows for the same images are the same bytes.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch

from pipeline.config import FeaturesConfig
from pipeline.data.images import displayed_size, read_rgb, to_model_input
from pipeline.diffusion.gaussian import Diffusion
from pipeline.diffusion.train import load_checkpoint
from pipeline.diffusion.unet import UNetModel, for_inference
from pipeline.enums import Representation, StoreLayout
from pipeline.errors import ConfigError, DatasetError, check_timesteps
from pipeline.features.activations import (
    check_feature_values,
    decoder_activations,
    feature_maps,
    images_per_batch,
    make_noise,
    representation_dim,
    rgb_maps,
)
from pipeline.features.upsample import upsample_concat
from pipeline.runtime import AUTOCAST_DTYPES
from pipeline.selfsup.encoders import encoder_maps, is_self_supervised, load_encoder

ImageSource = str | Path | np.ndarray  # an image file, or an [S, S, 3] uint8 array; one S for all images of a call


def image_side(image: ImageSource) -> int:
    """The displayed height of an image file (its header only) or of an ``[H, W, 3]`` array: the side of the square
    images a call takes."""
    return displayed_size(image)[1] if isinstance(image, (str, Path)) else np.asarray(image).shape[0]


def noise_for(seed: int, split: str, index: int, t: int, image_size: int) -> torch.Tensor:
    """Per-image noise of the stochastic variant, reproducible from (seed, split, image, t)."""
    stream = {"train": 0, "test": 1, "val": 2}[split]  # train and test keep the streams they had before val
    state = np.random.SeedSequence([seed, stream, index, t]).generate_state(1)[0]
    return make_noise(int(state), image_size)


def batch_noise(seed: int, draws: int, stochastic: bool, split: str, indices: list[int], t: int,
                image_size: int) -> torch.Tensor:
    """The noise of one batch: ``[1, 3, S, S]`` shared (``make_noise(seed)``) or ``[B, 3, S, S]`` per image
    (``noise_for``); with ``draws`` > 1 the draws stacked, ``[draws, 1 or B, 3, S, S]``, draw j from seed + j."""
    def draw(draw_seed: int) -> torch.Tensor:
        if stochastic:
            return torch.cat([noise_for(draw_seed, split, i, t, image_size) for i in indices])
        return make_noise(draw_seed, image_size)

    if draws == 1:
        return draw(seed)
    return torch.stack([draw(seed + j) for j in range(draws)])


def feature_checkpoint(options: FeaturesConfig, checkpoint: str | Path, encoder_checkpoint: str | Path | None) -> Path:
    """The checkpoint whose weights make the features: a self-supervised representation's (pretrain_mae's,
    pretrain_swav's: ``encoder_checkpoint``), else the DDPM's (which the RGB baselines record too). Stores and
    ensembles record its sha256, so an ensemble fit on one representation's features is refused on another's."""
    if is_self_supervised(options.representation):
        name = options.representation.value
        if encoder_checkpoint is None:
            raise ConfigError(f"features.representation={name} takes its features from the checkpoint of the "
                              f"pretrain_{name} stage, and none was given (--{name} checkpoints/{name}.pt)")
        return Path(encoder_checkpoint)
    return Path(checkpoint)


def load_feature_model(options: FeaturesConfig, checkpoint: str | Path, encoder_checkpoint: str | Path | None,
                       device: torch.device) -> tuple[torch.nn.Module, Diffusion | None]:
    """What ``features_for_images`` takes as ``model, diffusion``: for mae and swav their encoder (no diffusion),
    else the DDPM's UNet and its diffusion, ready for inference on ``device``."""
    if is_self_supervised(options.representation):
        path = feature_checkpoint(options, checkpoint, encoder_checkpoint)
        return load_encoder(options.representation, path).to(device), None
    model, diffusion, _ = load_checkpoint(checkpoint)
    return for_inference(model, device), diffusion


def features_for_images(
    model: UNetModel | torch.nn.Module,
    diffusion: Diffusion | None,
    images: Sequence[ImageSource],
    *,
    options: FeaturesConfig,
    t_steps: Sequence[int],
    blocks: Sequence[int],
    split: str | None = None,
    indices: Sequence[int] | None = None,
    layout: StoreLayout = StoreLayout.PIXELS,
    name_of: Callable[[int], str] | None = None,
) -> Iterator[tuple[int, torch.Tensor | list[torch.Tensor]]]:
    """The features of ``images``, image by image in order, as ``(index, values)`` on the CPU:

    - layout pixels: ``[S*S, D] float16`` rows (row-major pixels), D = the steps' features, steps outer and
      blocks inner (the paper's order), as a store of each step holds them side by side;
    - layout native (one step): ``[C_b, h_b, w_b] float16`` per block, the maps as the UNet made them.

    ``model, diffusion`` are ``load_feature_model``'s: the UNet and its diffusion, or for representations mae and
    swav their encoder and None (its features are the same at every step: t is not used).
    ``options`` is the ``features`` params section (noise seed, draws and variant, upsample, autocast,
    representation, patch size, batch size). ``indices`` are the images' positions in ``split`` of the
    stores (default 0..N-1): the stochastic variant draws each image's noise from (seed, split, index, t),
    so new images (``split`` None) have none and it is refused. At most ``features.batch_size`` images,
    lowered so their float32 maps fit ``FEATURE_BATCH_BYTES``, are in memory at once. Non-finite values,
    or values float16 cannot hold, raise ``NumericsError`` naming ``name_of(index)``.
    """
    indices = list(range(len(images))) if indices is None else list(indices)
    if len(indices) != len(images):
        raise ValueError(f"{len(images)} images but {len(indices)} indices")
    if options.stochastic_noise and split is None:
        raise ConfigError("features.stochastic_noise: true draws noise per stored image index, which new images do not "
                          "have; their features use the shared noise only (set it to false)")
    encoder = is_self_supervised(options.representation)
    if not encoder:
        check_timesteps(list(t_steps), diffusion.num_timesteps)
    native = StoreLayout(layout) is StoreLayout.NATIVE
    if native and (len(t_steps) != 1 or options.representation is not Representation.DDPM):
        raise ValueError("the native layout holds one step of the DDPM's maps")
    # The images' own size (square, as every split is), not the model's: a UNet is convolutional, so a benchmark or a
    # user may feed it larger images, and the noise and the upsampled maps must match them.
    size = image_side(images[0]) if len(images) else model.config.image_size
    dim = representation_dim(model, blocks, options.representation, options.patch_size)  # checks the blocks
    batch_size = images_per_batch(options.batch_size, size, dim * len(t_steps))
    autocast_dtype = AUTOCAST_DTYPES[options.autocast.value]
    device = next(model.parameters()).device
    name_of = name_of or (lambda index: f"{split} image {index}" if split else f"image {index}")
    for first in range(0, len(indices), batch_size):
        positions = range(first, min(first + batch_size, len(indices)))
        batch = [indices[position] for position in positions]
        arrays = [read_rgb(images[p]) if isinstance(images[p], (str, Path)) else images[p] for p in positions]
        for index, array in zip(batch, arrays):  # each image named, within a batch as across batches
            if array.shape[:2] != (size, size):
                raise DatasetError(f"{name_of(index)} is {array.shape[1]}x{array.shape[0]} px, but the first image is "
                                   f"{size}x{size}: one call takes images of one square size (resize them, or set "
                                   f"dataset.non_square: center_crop)")
        x0 = to_model_input(np.stack(arrays))
        if device.type == "cuda":  # page-locked host memory lets the copy overlap the previous batch
            x0 = x0.pin_memory()
        x0 = x0.to(device, non_blocking=True)
        per_step = []
        for t in t_steps:  # one step at a time: the stochastic variant's noise depends on t
            noise = batch_noise(options.noise_seed, options.noise_draws, options.stochastic_noise, split or "test",
                                batch, t, size).to(device)
            if native:
                with torch.no_grad():
                    activations = decoder_activations(model, diffusion, x0, t, blocks, noise, autocast_dtype)
                for block in activations:  # upsampling only averages values: within float16's range stays within
                    check_feature_values(block, batch, [t], name_of)
                maps = [block.to(torch.float16).cpu() for block in activations]
                for position, index in enumerate(batch):
                    yield index, [block[position] for block in maps]
                continue
            if options.representation is Representation.DDPM:
                maps = feature_maps(model, diffusion, x0, t_steps=[t], blocks=blocks, noise=noise,
                                    upsample=options.upsample, autocast_dtype=autocast_dtype)
            elif encoder:  # the MAE's patch tokens, SwAV's block outputs: upsampled as the DDPM's maps are
                enabled = autocast_dtype is not None
                with torch.no_grad(), torch.autocast(device.type, dtype=autocast_dtype, enabled=enabled):
                    blocks_maps = encoder_maps(options.representation, model, x0, blocks)
                maps = upsample_concat(blocks_maps, size, options.upsample)
            else:  # the RGB baselines: the pixels' colours (no UNet runs)
                patch = options.patch_size if options.representation is Representation.RGB_PATCH else 1
                maps = rgb_maps(x0, patch)
            check_feature_values(maps, batch, [t], name_of)
            per_step.append(maps.permute(0, 2, 3, 1).reshape(len(batch), -1, maps.shape[1]).to(torch.float16).cpu())
            del maps
        if per_step:
            rows = per_step[0] if len(per_step) == 1 else torch.cat(per_step, dim=2)
            for position, index in enumerate(batch):
                yield index, rows[position]

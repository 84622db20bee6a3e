"""Every closed choice a params key offers, in one table: str enums whose values are the YAML spellings
and whose members are those spellings in capitals (``Autocast.BFLOAT16 == "bfloat16"``)."""
from __future__ import annotations

import enum


def _choice(name: str, key: str, *values: str) -> type[enum.Enum]:
    choice = enum.Enum(name, [(value.upper(), value) for value in values], type=str, module=__name__, qualname=name)
    choice.__doc__ = f"``{key}``: {' | '.join(values)}."
    return choice


# How decoder maps reach the image's resolution.
UpsampleMode = _choice("UpsampleMode", "features.upsample", "bilinear", "nearest")
# What a feature store keeps on disk (pipeline/features/store.py): pixels = the upsampled [pixels, D] float16 matrix,
# as the paper's code holds it; native = each block's map at the resolution the UNet made it, upsampled when read.
StoreLayout = _choice("StoreLayout", "features.layout", "pixels", "native")
NonSquarePolicy = _choice("NonSquarePolicy", "dataset.non_square", "error", "center_crop")
# How a user dataset's masks come (pipeline/data/labels.py; docs/paper.md, "Your own data"): npy = <stem>.npy beside
# each image; png = masks/<stem>.png (indexed, greyscale, or colours with dataset.class_colors); coco = a COCO JSON
# file (dataset.coco_file) of polygons and RLE. prepare turns each into the prepared layout's .npy masks.
LabelFormat = _choice("LabelFormat", "dataset.labels", "npy", "png", "coco")
# Model flags and default blocks of pipeline/presets.py MODEL_PRESETS: the built-in 32-channel UNet for the
# digits (image_size = dataset.image_size); the paper's 256x256 guided-diffusion checkpoints (lsun_*.pt, ffhq.pt).
ModelPreset = _choice("ModelPreset", "ddpm.preset", "digits", "adm256")
# guided-diffusion's named beta schedules (pipeline/diffusion/schedule.py).
NoiseSchedule = _choice("NoiseSchedule", "ddpm.noise_schedule", "linear", "cosine")
# How the ε-MSE of each example is weighted by its timestep: uniform = Ho et al.'s simple loss; min_snr =
# Hang et al. 2023 (Min-SNR-γ), weight min(SNR(t), γ) / SNR(t).
LossWeighting = _choice("LossWeighting", "ddpm.train.loss_weighting", "uniform", "min_snr")
# After warmup_steps of linear warm-up: constant, or a half-cosine from lr to 0 at the last step
# (Loshchilov & Hutter, without restarts).
LrSchedule = _choice("LrSchedule", "ddpm.train.lr_schedule", "constant", "cosine")
# What fit and evaluate learn from (docs/analyses.md, the baselines): ddpm = the decoder activations of
# ddpm.checkpoint at each t (the method); rgb = each pixel's 3 colour values in [-1, 1] (t, blocks and the
# checkpoint's weights unused); rgb_patch = its features.patch_size x patch_size RGB neighbourhood (replicate-padded);
# mae = the patch tokens of a masked autoencoder's encoder blocks (the pretrain_mae stage, params section mae);
# swav = the residual blocks' outputs of a SwAV ResNet (the pretrain_swav stage, params section swav).
Representation = _choice("Representation", "features.representation", "ddpm", "rgb", "rgb_patch", "mae", "swav")
# Test-image corruptions of the robustness stage (pipeline/analysis/corruptions.py holds each one's severities).
Corruption = _choice("Corruption", "robustness.corruptions", "gaussian_noise", "blur", "jpeg", "contrast")
# Which published severity constants the robustness corruptions use (pipeline/analysis/corruptions.py): auto =
# ImageNet-C's for images of 128 px and more, CIFAR-10-C's below; or one of them whatever the size.
CorruptionConstants = _choice("CorruptionConstants", "robustness.constants", "auto", "cifar10c", "imagenetc")
# features.autocast / ensemble.autocast: the dtype of matrix products under torch.autocast.
Autocast = _choice("Autocast", "autocast", "none", "bfloat16", "float16")
# plateau: a member group stops when its epoch loss has not improved by min_delta for `patience` epochs.
# paper: ddpm-segmentation's train_interpreter.py, from epoch index `warmup_epochs` on every member stops
# on its own once `batch_patience` batches in a row have not beaten its best batch loss.
Stopping = _choice("Stopping", "ensemble.stopping", "plateau", "paper")
# The values ensemble.lr, batch_size, epochs, stopping and autocast take when left null (pipeline/presets.py
# ENSEMBLE_RECIPES): fast = chosen on the digits' val split; paper = ddpm-segmentation's train_interpreter.py.
Recipe = _choice("Recipe", "ensemble.recipe", "fast", "paper")
# How a UNet made from scratch (ddpm.checkpoint: models/scratch) is initialised: guided = guided-diffusion's init,
# whose zero_module leaves every ResBlock's last conv, every attention proj_out and the output conv at zero; dense =
# those layers drawn too, with PyTorch's default nn.Conv init like every other layer (a fair random network).
UNetInit = _choice("UNetInit", "ddpm.train.init", "guided", "dense")
# Blosc's compressors (bit-shuffled), zlib, or none.
Codec = _choice("Codec", "features.codec", "zstd", "lz4", "blosclz", "zlib", "none")
# The sampler's variance for models without a learned sigma (pipeline/diffusion/sample.py): large = beta_t
# (guided-diffusion's FIXED_LARGE, its default), small = the posterior variance (FIXED_SMALL).
FixedSigma = _choice("FixedSigma", "sample.fixed_sigma", "large", "small")
# How the suggest stage scores an unlabeled image from its per-pixel disagreement: mean = the mean over its pixels;
# top_decile = the mean of its highest 10% (the paper's DatasetDDPM filter, pipeline.ensemble.metrics.top_decile_mean).
SuggestScore = _choice("SuggestScore", "suggest.score", "mean", "top_decile")

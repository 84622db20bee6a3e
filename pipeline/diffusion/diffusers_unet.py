"""diffusers ``UNet2DModel`` checkpoints behind the feature interface of ``pipeline.diffusion.unet.UNetModel``.

``ddpm.checkpoint`` may name a local diffusers folder: ``config.json`` + ``diffusion_pytorch_model.safetensors``
of a ``UNet2DModel`` (e.g. the unconditional DDPM models of LSUN bedroom, cat, church and CelebA-HQ at
256²), with an optional ``scheduler_config.json`` in it, beside it or in ``../scheduler/``. The
pretrain stage wraps it in ``DiffusersUNet`` and saves it as the run's checkpoint; from there on every
stage sees what a guided-diffusion model gives it: ``forward(x, t, return_blocks)``,
``decoder_block_shapes()`` and ``config.image_size``.

Decoder blocks are numbered as guided-diffusion's ``output_blocks``: one per resnet unit of the up path
(a resnet, and the attention after it in an ``AttnUpBlock2D``), deepest first; an up block's upsampler
counts with its last unit. A model with ``layers_per_block: 2`` and 4 resolutions has 12 blocks.
The features are taken by running the up path unit by unit (no hooks), with diffusers' own modules.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from pipeline.diffusion.gaussian import Diffusion
from pipeline.enums import NoiseSchedule
from pipeline.errors import ConfigError, ModelFlagsError, check_decoder_blocks
from pipeline.hashing import file_sha256

ARCHITECTURE = "diffusers.UNet2DModel"
WEIGHTS = "diffusion_pytorch_model.safetensors"
LEGACY_WEIGHTS = "diffusion_pytorch_model.bin"  # older hub folders (google/ddpm-ema-bedroom-256) ship only this
SUPPORTED_UP_BLOCKS = ("UpBlock2D", "AttnUpBlock2D")
INSTALL = "pip install '.[diffusers]'"


def import_diffusers():
    try:
        import diffusers
    except ImportError:
        raise ModelFlagsError(f"loading a diffusers checkpoint needs the diffusers package: {INSTALL}") from None
    return diffusers


@dataclass(frozen=True)
class DiffusersConfig:
    """What the pipeline reads of a model's config (``image_size``, ``use_fp16``) plus the diffusers
    config that rebuilds it."""

    image_size: int
    diffusers: dict = field(default_factory=dict)
    use_fp16: bool = False  # diffusers models are stored and run in float32 here

    def to_dict(self) -> dict[str, Any]:
        return {"architecture": ARCHITECTURE, "image_size": self.image_size, "diffusers": dict(self.diffusers)}


class DiffusersUNet(nn.Module):
    """A ``UNet2DModel`` whose ``forward`` can return decoder blocks like ``UNetModel.forward``."""

    architecture = ARCHITECTURE

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet
        self.config = DiffusersConfig(int(unet.config.sample_size), dict(unet.config))

    def units(self) -> list[tuple[int, int]]:
        """``(up block, resnet)`` of each decoder block, in guided-diffusion's order."""
        return [(b, j) for b, block in enumerate(self.unet.up_blocks) for j in range(len(block.resnets))]

    @property
    def num_decoder_blocks(self) -> int:
        return len(self.units())

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.conv_in.weight.dtype

    def decoder_block_shapes(self) -> list[tuple[int, int, int]]:
        """``[C, H, W]`` of each decoder block's output, from the module tree (nothing is run)."""
        size = self.config.image_size // 2 ** sum(block.downsamplers is not None for block in self.unet.down_blocks)
        shapes = []
        for b, j in self.units():
            block = self.unet.up_blocks[b]
            if j == len(block.resnets) - 1 and block.upsamplers is not None:
                size *= 2
            shapes.append((block.resnets[j].out_channels, size, size))
        return shapes

    def _encode(self, x: torch.Tensor, timesteps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """diffusers' UNet2DModel.forward up to the up path: (h, embedding, skip activations)."""
        unet = self.unet
        if unet.config.center_input_sample:
            x = 2 * x - 1.0
        emb = unet.time_embedding(unet.time_proj(timesteps.expand(x.shape[0])).to(self.dtype))
        h = unet.conv_in(x.to(self.dtype))
        skips = [h]
        for block in unet.down_blocks:
            h, residuals = block(hidden_states=h, temb=emb)
            skips.extend(residuals)
        if unet.mid_block is not None:
            h = unet.mid_block(h, emb)
        return h, emb, skips

    def _unit(self, b: int, j: int, h: torch.Tensor, skip: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """One decoder block: as UpBlock2D / AttnUpBlock2D.forward do for resnet ``j`` (and, for the last
        one, the block's upsamplers)."""
        block = self.unet.up_blocks[b]
        h = block.resnets[j](torch.cat([h, skip], dim=1), emb)
        if getattr(block, "attentions", None) is not None:
            h = block.attentions[j](h)
        if j == len(block.resnets) - 1 and block.upsamplers is not None:
            for upsampler in block.upsamplers:
                h = upsampler(h, temb=emb) if getattr(block, "upsample_type", "conv") == "resnet" else upsampler(h)
        return h

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, return_blocks: Sequence[int] | None = None):
        """``x`` ``[N, 3, H, W]`` in [-1, 1] at ``timesteps`` ``[N]`` -> ε prediction (None when only blocks
        are asked for: the pass stops after the last one needed) and, with ``return_blocks``, their outputs."""
        wanted = list(return_blocks) if return_blocks is not None else None
        check_decoder_blocks(wanted or [], self.num_decoder_blocks)
        h, emb, skips = self._encode(x, timesteps)
        captured: dict[int, torch.Tensor] = {}
        for index, (b, j) in enumerate(self.units()):
            h = self._unit(b, j, h, skips.pop(), emb)
            if wanted is not None and index in wanted:
                captured[index] = h
                if len(captured) == len(set(wanted)):
                    return None, [captured[i] for i in wanted]
        out = self.unet.conv_out(self.unet.conv_act(self.unet.conv_norm_out(h)))
        if self.unet.config.time_embedding_type == "fourier":  # as diffusers (score models predict over sigma)
            out = out / timesteps.reshape(-1, 1, 1, 1)
        return out if wanted is None else (out, [captured[i] for i in wanted])


def check_config(folder: Path, config: dict) -> None:
    """Refuse what the feature path does not support, naming the folder, the key and what to use."""
    where = f"diffusers checkpoint {folder}"
    if config.get("_class_name") != "UNet2DModel":
        raise ModelFlagsError(f"{where}: config.json is a {config.get('_class_name')!r}, but only UNet2DModel (the "
                              f"unconditional DDPM UNet) is supported; point ddpm.checkpoint at a UNet2DModel folder")
    unsupported = [name for name in config.get("up_block_types", ()) if name not in SUPPORTED_UP_BLOCKS]
    unsupported += [name for name in config.get("down_block_types", ()) if "Skip" in name]
    if unsupported:
        raise ModelFlagsError(f"{where}: block types {unsupported} are not supported (up blocks: "
                              f"{', '.join(SUPPORTED_UP_BLOCKS)}; no Skip blocks); use another checkpoint")
    if config.get("class_embed_type") is not None or config.get("num_class_embeds") is not None:
        raise ModelFlagsError(f"{where} is class-conditional (class_embed_type / num_class_embeds); use an "
                              f"unconditional model")
    if not isinstance(config.get("sample_size"), int):
        raise ModelFlagsError(f"{where}: sample_size {config.get('sample_size')!r} is not one square size; "
                              f"only square models are supported")


def not_a_unet_folder(folder: Path) -> ModelFlagsError:
    return ModelFlagsError(f"ddpm.checkpoint {folder} is a folder but not a diffusers UNet2DModel: it needs "
                           f"config.json and {WEIGHTS} (for a pipeline folder, name its unet/ subfolder)")


def weights_file(folder: Path) -> Path:
    for name in (WEIGHTS, LEGACY_WEIGHTS):
        if (folder / name).is_file():
            return folder / name
    raise not_a_unet_folder(folder)


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """safetensors, or a legacy .bin read with ``weights_only=True`` (a pickle is never executed)."""
    if path.name == WEIGHTS:
        from safetensors.torch import load_file

        return load_file(path)
    return torch.load(path, map_location="cpu", weights_only=True)


def read_config(folder: Path) -> dict:
    path = folder / "config.json"
    if not path.is_file():
        raise not_a_unet_folder(folder)
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ModelFlagsError(f"{path} is not valid JSON ({error}); re-save it with save_pretrained") from None


def build_unet(config: dict) -> DiffusersUNet:
    """An untrained ``DiffusersUNet`` from a diffusers config (checked first)."""
    diffusers = import_diffusers()
    return DiffusersUNet(diffusers.UNet2DModel.from_config(config)).eval()


def load_diffusers_unet(folder: str | Path) -> DiffusersUNet:
    """The model of a diffusers folder, float32, eval mode, on the CPU; weights read with safetensors."""
    folder = Path(folder)
    config = read_config(folder)
    check_config(folder, config)
    path = weights_file(folder)
    model = build_unet(config)
    result = model.unet.load_state_dict({key: value.float() for key, value in read_weights(path).items()}, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ModelFlagsError(f"{path} does not match its config.json: missing {result.missing_keys[:5]}, "
                              f"unexpected {result.unexpected_keys[:5]}; re-save the model with save_pretrained")
    return model


def scheduler_config(folder: Path) -> tuple[Path, dict] | None:
    """The ``scheduler_config.json`` in the model folder, beside it, or in ``../scheduler/`` (a pipeline)."""
    for candidate in (folder, folder.parent, folder.parent / "scheduler"):
        path = candidate / "scheduler_config.json"
        if path.is_file():
            return path, json.loads(path.read_text())
    return None


def scheduler_betas(path: Path, config: dict) -> tuple[NoiseSchedule, np.ndarray]:
    """``[num_train_timesteps] float64`` betas as diffusers' DDPMScheduler defines them (it computes in
    float32), and the schedule family they belong to."""
    steps = int(config.get("num_train_timesteps", 1000))
    start, end = float(config.get("beta_start", 0.0001)), float(config.get("beta_end", 0.02))
    name = config.get("beta_schedule", "linear")
    if config.get("trained_betas") is not None:
        return NoiseSchedule.LINEAR, np.asarray(config["trained_betas"], dtype=np.float64)
    if name == "linear":
        return NoiseSchedule.LINEAR, np.linspace(start, end, steps, dtype=np.float64)
    if name == "scaled_linear":
        return NoiseSchedule.LINEAR, np.linspace(start**0.5, end**0.5, steps, dtype=np.float64) ** 2
    if name == "squaredcos_cap_v2":  # the same alpha-bar cosine, capped at 0.999, as guided-diffusion's
        return NoiseSchedule.COSINE, Diffusion(NoiseSchedule.COSINE, steps).betas
    raise ModelFlagsError(f"{path}: beta_schedule {name!r} is not supported (linear, scaled_linear, "
                          f"squaredcos_cap_v2 or trained_betas); edit it or remove the file to use ddpm.noise_schedule")


def diffusion_for(folder: str | Path, default: Diffusion) -> Diffusion:
    """The checkpoint's own schedule when it has a scheduler config, else ``default`` (from params).
    diffusers' UNets are called with the integer step, so timesteps are never rescaled."""
    found = scheduler_config(Path(folder))
    if found is None:
        return Diffusion(default.schedule, default.num_timesteps, rescale_timesteps=False)
    schedule, betas = scheduler_betas(*found)
    return Diffusion(schedule, len(betas), rescale_timesteps=False, betas=betas)


def import_diffusers_folder(folder: Path, default: Diffusion, image_size: int) -> tuple[DiffusersUNet, Diffusion, dict]:
    """The pretrain stage's import: model, schedule and the source record its checkpoint keeps."""
    model = load_diffusers_unet(folder)
    if model.config.image_size != image_size:
        raise ConfigError(f"diffusers checkpoint {folder} is a {model.config.image_size} px model but "
                          f"dataset.image_size={image_size}; set dataset.image_size: {model.config.image_size}")
    found = scheduler_config(folder)
    source = {"kind": "imported-diffusers", "path": str(folder), "sha256": file_sha256(weights_file(folder)),
              "scheduler_config": str(found[0]) if found else None}
    return model, diffusion_for(folder, default), source

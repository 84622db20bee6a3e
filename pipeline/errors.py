"""Errors for people: each names the file, key or value and how to fix it. Stages exit 2 on these."""
from __future__ import annotations

from typing import Sequence


class PipelineError(ValueError):
    """Bad input to the pipeline (params, data, checkpoint, store)."""


class ConfigError(PipelineError):
    """A params file that cannot be used."""


class DatasetError(PipelineError):
    """A dataset folder or file that cannot be used."""


class ModelFlagsError(PipelineError):
    """Model flags that cannot build a UNet, or a checkpoint that does not match them."""


class NumericsError(PipelineError):
    """NaN, infinity or overflow made by a stage: it stops there, naming the step, the stage and a likely cause."""


class EnsembleError(PipelineError):
    """An ensemble file that is not one, is of another format, or was fit on other features than asked for."""


class StoreError(PipelineError):
    """A feature store that is missing, incomplete, or made with other params than the ones asked for."""


class SegnetError(PipelineError):
    """A segnet file (DatasetDDPM's distilled network) that is not one, or was trained for other params."""


def check_decoder_blocks(blocks: Sequence[int], num_decoder_blocks: int) -> None:
    """The one range check of decoder block indices (``output_blocks[i]``), for every UNet and reader."""
    for block in blocks:
        if not 0 <= block < num_decoder_blocks:
            raise ModelFlagsError(
                f"blocks contains {block}, but this model has decoder blocks 0..{num_decoder_blocks - 1}; "
                f"choose blocks within that range"
            )


def check_timesteps(t_steps: Sequence[int], num_timesteps: int) -> None:
    """The one range check of diffusion steps ``t``: integers in ``[0, num_timesteps)``."""
    for t in t_steps:
        if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < num_timesteps:
            raise ConfigError(
                f"t_steps contains {t!r}, outside [0, {num_timesteps}) (ddpm.diffusion_steps); "
                f"use steps such as [50, 150, 250]"
            )

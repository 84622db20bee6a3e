"""Noise schedules as guided-diffusion names them, in float64 numpy (no torch, so params can be checked
against them when they load)."""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from pipeline.enums import NoiseSchedule
from pipeline.errors import ConfigError


def betas_for_schedule(schedule: NoiseSchedule | str, diffusion_steps: int) -> np.ndarray:
    """``[diffusion_steps] float64`` betas of guided-diffusion's named schedules."""
    schedule = NoiseSchedule(schedule)
    if diffusion_steps < 1:
        raise ConfigError(f"ddpm.diffusion_steps must be >= 1, got {diffusion_steps}")
    if schedule is NoiseSchedule.LINEAR:
        # Ho et al.'s 1e-4..0.02 for 1000 steps, rescaled so other step counts keep the same endpoints.
        scale = 1000 / diffusion_steps
        return _checked(np.linspace(scale * 0.0001, scale * 0.02, diffusion_steps, dtype=np.float64), schedule)

    def alpha_bar(time: float) -> float:
        return math.cos((time + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = [
        min(1 - alpha_bar((i + 1) / diffusion_steps) / alpha_bar(i / diffusion_steps), 0.999)
        for i in range(diffusion_steps)
    ]
    return _checked(np.array(betas, dtype=np.float64), schedule)


def _checked(betas: np.ndarray, schedule: NoiseSchedule) -> np.ndarray:
    """Betas must lie in (0, 1): beta = 1 zeroes alpha-bar (division by zero: NaN features), beta > 1 a negative one."""
    bad = np.flatnonzero(~((betas > 0) & (betas < 1)))
    if bad.size:
        minimum = 21 if schedule is NoiseSchedule.LINEAR else 2
        raise ConfigError(
            f"ddpm.diffusion_steps={len(betas)} with ddpm.noise_schedule={schedule.value} gives beta={betas[bad[0]]:g} at "
            f"step {bad[0]}, outside (0, 1) (every later number would be NaN); use ddpm.diffusion_steps >= {minimum}"
        )
    return betas


def space_timesteps(num_timesteps: int, section_counts: str | int | Sequence[int]) -> set[int]:
    """The steps of the original process that a respaced sampler keeps: guided-diffusion's ``space_timesteps``.

    ``section_counts`` is a count per equal portion of the ``num_timesteps`` steps, e.g. ``[10, 15, 20]`` over
    300 steps strides the first 100 steps to 10, the next 100 to 15 and the last 100 to 20 (a string
    ``"10,15,20"``, or one count, ``50`` / ``"50"``, says the same); ``"ddimN"`` is the DDIM paper's fixed
    integer stride, ``range(0, num_timesteps, stride)`` with exactly N steps. A count a portion cannot hold,
    or an N no integer stride gives, is a ``ConfigError``.
    """
    if isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            desired = int(section_counts[len("ddim"):])
            for stride in range(1, num_timesteps):
                if len(range(0, num_timesteps, stride)) == desired:
                    return set(range(0, num_timesteps, stride))
            raise ConfigError(f"{section_counts}: no integer stride gives exactly {desired} of {num_timesteps} steps")
        section_counts = [int(part) for part in section_counts.split(",")]
    if isinstance(section_counts, int):
        section_counts = [section_counts]
    size_per, extra = divmod(num_timesteps, len(section_counts))
    start, kept = 0, []
    for index, count in enumerate(section_counts):
        size = size_per + (1 if index < extra else 0)
        if size < count:
            raise ConfigError(f"cannot divide a section of {size} steps into {count} (of {num_timesteps} steps)")
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        position = 0.0
        for _ in range(count):
            kept.append(start + round(position))  # Python's round, half to even, as guided-diffusion's
            position += stride
        start += size
    return set(kept)


def respaced_betas(alphas_cumprod: np.ndarray, kept: Sequence[int]) -> np.ndarray:
    """``[len(kept)] float64`` betas of the process over the ``kept`` steps only (guided-diffusion's
    ``SpacedDiffusion``): ``1 - ᾱ[t] / ᾱ[t_prev]`` with t_prev the kept step before t (ᾱ = 1 before the first)."""
    kept = sorted(kept)
    previous = np.append(1.0, alphas_cumprod[kept][:-1])
    return 1.0 - alphas_cumprod[kept] / previous

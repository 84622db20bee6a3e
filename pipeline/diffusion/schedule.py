"""Noise schedules as guided-diffusion names them, in float64 numpy (no torch, so params can be checked
against them when they load)."""
from __future__ import annotations

import math

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

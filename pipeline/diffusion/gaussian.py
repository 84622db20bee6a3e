"""Gaussian diffusion maths as guided-diffusion defines it: schedules, ``q_sample`` and the training loss.

Everything here is a pure function of arrays; seeding and devices belong to the caller.
Schedules are computed in float64 (as guided-diffusion does) and cast when indexed.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from pipeline.diffusion.schedule import betas_for_schedule
from pipeline.enums import NoiseSchedule
from pipeline.errors import ConfigError


class Diffusion:
    """Precomputed float64 schedule quantities for one schedule and step count.

    ``rescale_timesteps``: the network sees ``t * 1000 / diffusion_steps`` instead of ``t``, as
    improved-diffusion's models do by default (its ``rescale_timesteps=True``); guided-diffusion's
    models see ``t`` itself. The two agree when ``diffusion_steps`` is 1000.

    ``betas`` (``[diffusion_steps]`` in (0, 1)) replace the named schedule's for checkpoints that bring
    their own (a diffusers ``scheduler_config.json``); ``schedule`` then only names their family.
    """

    def __init__(self, schedule: NoiseSchedule | str, diffusion_steps: int, rescale_timesteps: bool = False,
                 betas: np.ndarray | None = None):
        self.schedule = NoiseSchedule(schedule)
        self.num_timesteps = diffusion_steps
        self.rescale_timesteps = bool(rescale_timesteps)
        self.explicit_betas = betas is not None
        self.betas = betas_for_schedule(schedule, diffusion_steps) if betas is None else np.asarray(betas, np.float64)
        if self.betas.shape != (diffusion_steps,) or not ((self.betas > 0) & (self.betas < 1)).all():
            raise ConfigError(f"a noise schedule needs {diffusion_steps} betas in (0, 1), got shape {self.betas.shape}")
        self.alphas_cumprod = np.cumprod(1.0 - self.betas)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1)
        self.posterior_variance = self.betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        # The posterior variance is 0 at t = 0; guided-diffusion clips the log with the t = 1 value.
        self.posterior_log_variance_clipped = np.log(np.append(self.posterior_variance[1], self.posterior_variance[1:]))
        self.posterior_mean_coef1 = self.betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * np.sqrt(1.0 - self.betas) / (1.0 - self.alphas_cumprod)

    def model_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        """The timestep values the network is called with for schedule steps ``t`` ``[N]``."""
        if self.rescale_timesteps:
            return t.float() * (1000.0 / self.num_timesteps)
        return t

    def q_sample(self, x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Sample ``x_t ~ q(x_t | x_0)``: ``sqrt(ᾱ_t) x0 + sqrt(1-ᾱ_t) ε``; ``t`` is ``[N]`` int, noise broadcasts."""
        return (
            _extract(self.sqrt_alphas_cumprod, t, x_start.shape) * x_start
            + _extract(self.sqrt_one_minus_alphas_cumprod, t, x_start.shape) * noise
        )

    def q_posterior(self, x_start: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean = _extract(self.posterior_mean_coef1, t, x_t.shape) * x_start + _extract(
            self.posterior_mean_coef2, t, x_t.shape
        ) * x_t
        return mean, _extract(self.posterior_log_variance_clipped, t, x_t.shape)

    def training_losses(
        self, model_output: torch.Tensor, x_start: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, noise: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Per-example losses ``[N]`` of guided-diffusion's default objective.

        ``mse`` on ε; with a learned variance (``model_output`` has 2x channels) also ``vb``, the
        variational bound in bits/dim computed with the mean detached (Nichol & Dhariwal's hybrid loss,
        guided-diffusion's LossType.MSE without rescaling). ``loss`` is their sum.
        """
        channels = x_start.shape[1]
        eps, variance_values = model_output[:, :channels], model_output[:, channels:]
        terms = {"mse": ((noise - eps) ** 2).mean(dim=list(range(1, x_start.ndim)))}
        if variance_values.shape[1] == channels:
            terms["vb"] = self._variational_bound(eps.detach(), variance_values, x_start, x_t, t)
            terms["loss"] = terms["mse"] + terms["vb"]
        else:
            terms["loss"] = terms["mse"]
        return terms

    def _variational_bound(
        self, eps: torch.Tensor, variance_values: torch.Tensor, x_start: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
    ) -> torch.Tensor:
        min_log = _extract(self.posterior_log_variance_clipped, t, x_t.shape)
        max_log = _extract(np.log(self.betas), t, x_t.shape)
        fraction = (variance_values + 1) / 2  # the model predicts in [-1, 1]
        model_log_variance = fraction * max_log + (1 - fraction) * min_log
        pred_xstart = _extract(self.sqrt_recip_alphas_cumprod, t, x_t.shape) * x_t - _extract(
            self.sqrt_recipm1_alphas_cumprod, t, x_t.shape
        ) * eps
        model_mean, _ = self.q_posterior(pred_xstart, x_t, t)
        true_mean, true_log_variance = self.q_posterior(x_start, x_t, t)
        kl = normal_kl(true_mean, true_log_variance, model_mean, model_log_variance)
        kl = kl.mean(dim=list(range(1, kl.ndim))) / math.log(2.0)
        nll = -discretized_gaussian_log_likelihood(x_start, model_mean, 0.5 * model_log_variance)
        nll = nll.mean(dim=list(range(1, nll.ndim))) / math.log(2.0)
        return torch.where(t == 0, nll, kl)


def _extract(array: np.ndarray, t: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    values = torch.from_numpy(array).to(device=t.device)[t].float()
    return values.reshape(-1, *([1] * (len(shape) - 1)))


def normal_kl(mean1: torch.Tensor, logvar1: torch.Tensor, mean2: torch.Tensor, logvar2: torch.Tensor) -> torch.Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def _approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def discretized_gaussian_log_likelihood(x: torch.Tensor, means: torch.Tensor, log_scales: torch.Tensor) -> torch.Tensor:
    """Log-likelihood of ``x`` (uint8 images scaled to [-1, 1]) under a Gaussian discretised to 256 bins."""
    centered = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = _approx_standard_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = _approx_standard_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    cdf_delta = cdf_plus - cdf_min
    return torch.where(
        x < -0.999,
        log_cdf_plus,
        torch.where(x > 0.999, log_one_minus_cdf_min, torch.log(cdf_delta.clamp(min=1e-12))),
    )

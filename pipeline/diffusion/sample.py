"""Sampling from the DDPM as guided-diffusion samples: its ancestral sampler (``p_sample_loop``) and DDIM
(``ddim_sample_loop``), over respaced steps (``SpacedDiffusion``).

The maths is guided-diffusion's ``GaussianDiffusion.p_mean_variance``: the network predicts ε; x0 is read off
x_t and ε and clipped to [-1, 1] (``clip_denoised``); the step's mean is the posterior mean of
q(x_{t-1} | x_t, x0). Its variance is fixed (``fixed_sigma``: ``large`` = β_t, the first step's replaced by
the posterior variance, guided-diffusion's FIXED_LARGE and its default; ``small`` = the posterior variance,
FIXED_SMALL) or learned, when the network returns 2C channels (``learn_sigma``): the log variance is
interpolated between the two by the second half of the output (LEARNED_RANGE).

Respacing keeps the steps ``space_timesteps`` gives and redefines β over them as 1 - ᾱ[t] / ᾱ[t_prev]; the
network is still called with the ORIGINAL step index of each kept step (guided-diffusion's ``_WrappedModel``),
times 1000 / diffusion_steps when the checkpoint rescales timesteps (``Diffusion.model_timesteps``).

Randomness comes from one ``torch.Generator`` per image (``image_generator``): x_T and every step's noise of
image i are drawn from its own generator, so an image's sample does not depend on which others share its batch.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import nn

from pipeline.diffusion.gaussian import Diffusion, _extract
from pipeline.diffusion.schedule import respaced_betas, space_timesteps
from pipeline.errors import ConfigError

FIXED_SIGMAS = ("large", "small")


def image_generator(seed: int, index: int) -> torch.Generator:
    """The CPU generator of image ``index`` of a run seeded ``seed`` (independent streams per image)."""
    state = np.random.SeedSequence([seed, index]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


def draw(generators: Sequence[torch.Generator], shape: Sequence[int]) -> torch.Tensor:
    """``[len(generators), *shape] float32`` standard normal values, row i from ``generators[i]`` (on the CPU)."""
    return torch.stack([torch.randn(tuple(shape), generator=generator) for generator in generators])


class Sampler:
    """guided-diffusion's samplers for ``diffusion`` (the checkpoint's schedule) over the steps that
    ``respacing`` keeps (``space_timesteps``' section counts: ``50``, ``"50"``, ``"ddim50"``, ``[10, 15, 20]``;
    None = every step)."""

    def __init__(self, diffusion: Diffusion, respacing: str | int | Sequence[int] | None = None,
                 fixed_sigma: str = "large"):
        if fixed_sigma not in FIXED_SIGMAS:
            raise ConfigError(f"fixed_sigma={fixed_sigma!r} is not one of {list(FIXED_SIGMAS)}")
        steps = diffusion.num_timesteps
        kept = sorted(space_timesteps(steps, respacing)) if respacing is not None else list(range(steps))
        self.base = diffusion
        self.timestep_map = np.asarray(kept, dtype=np.int64)  # spaced step i -> original step
        # The respaced process: every schedule array (posterior coefficients, variances) over the kept steps.
        self.spaced = Diffusion(diffusion.schedule, len(kept), betas=respaced_betas(diffusion.alphas_cumprod, kept))
        self.fixed_sigma = fixed_sigma
        betas = self.spaced.betas
        # guided-diffusion's FIXED_LARGE: β_t, the first replaced by the posterior variance (a better decoder NLL)
        large = np.append(self.spaced.posterior_variance[1], betas[1:]) if len(betas) > 1 else betas
        self.fixed_log_variance = np.log(large) if fixed_sigma == "large" else self.spaced.posterior_log_variance_clipped

    @property
    def num_steps(self) -> int:
        return len(self.timestep_map)

    def model_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        """What the network is called with at spaced steps ``t`` ``[N]``: the original step index (rescaled
        to 1000 steps when the checkpoint's ``rescale_timesteps`` says so)."""
        original = torch.from_numpy(self.timestep_map).to(t.device)[t]
        return self.base.model_timesteps(original)

    def p_mean_variance(self, model: nn.Module | Callable, x: torch.Tensor, t: torch.Tensor,
                        clip_denoised: bool = True) -> dict[str, torch.Tensor]:
        """p(x_{t-1} | x_t) at spaced steps ``t`` ``[N]`` for ``x`` ``[N, C, H, W] float32``: ``mean``,
        ``log_variance`` (broadcastable to x) and ``pred_xstart`` (clipped to [-1, 1] with ``clip_denoised``)."""
        output = model(x, self.model_timesteps(t)).float()
        channels = x.shape[1]
        eps = output[:, :channels]
        if output.shape[1] == 2 * channels:  # learn_sigma: LEARNED_RANGE between the posterior variance and β
            min_log = _extract(self.spaced.posterior_log_variance_clipped, t, x.shape)
            max_log = _extract(np.log(self.spaced.betas), t, x.shape)
            fraction = (output[:, channels:] + 1) / 2
            log_variance = fraction * max_log + (1 - fraction) * min_log
        elif output.shape[1] == channels:
            log_variance = _extract(self.fixed_log_variance, t, x.shape)
        else:
            raise ValueError(f"the network returned {output.shape[1]} channels for {channels}-channel images")
        pred_xstart = self.predict_xstart(x, t, eps)
        if clip_denoised:
            pred_xstart = pred_xstart.clamp(-1, 1)
        mean, _ = self.spaced.q_posterior(pred_xstart, x, t)
        return {"mean": mean, "log_variance": log_variance, "pred_xstart": pred_xstart}

    def predict_xstart(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        return (_extract(self.spaced.sqrt_recip_alphas_cumprod, t, x_t.shape) * x_t
                - _extract(self.spaced.sqrt_recipm1_alphas_cumprod, t, x_t.shape) * eps)

    def predict_eps(self, x_t: torch.Tensor, t: torch.Tensor, pred_xstart: torch.Tensor) -> torch.Tensor:
        return ((_extract(self.spaced.sqrt_recip_alphas_cumprod, t, x_t.shape) * x_t - pred_xstart)
                / _extract(self.spaced.sqrt_recipm1_alphas_cumprod, t, x_t.shape))

    def ancestral_step(self, model, x: torch.Tensor, t: torch.Tensor, noise: torch.Tensor,
                       clip_denoised: bool = True) -> torch.Tensor:
        """guided-diffusion's ``p_sample``: mean + σ z, no noise at step 0."""
        out = self.p_mean_variance(model, x, t, clip_denoised)
        nonzero = (t != 0).float().reshape(-1, *([1] * (x.ndim - 1)))
        return out["mean"] + nonzero * torch.exp(0.5 * out["log_variance"]) * noise

    def ddim_step(self, model, x: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, eta: float,
                  clip_denoised: bool = True) -> torch.Tensor:
        """guided-diffusion's ``ddim_sample`` (Song et al. eq. 12): ε re-derived from the clipped x0,
        σ = eta sqrt((1 - ᾱ_prev) / (1 - ᾱ)) sqrt(1 - ᾱ / ᾱ_prev); eta = 0 is deterministic."""
        out = self.p_mean_variance(model, x, t, clip_denoised)
        eps = self.predict_eps(x, t, out["pred_xstart"])
        alpha_bar = _extract(self.spaced.alphas_cumprod, t, x.shape)
        alpha_bar_prev = _extract(self.spaced.alphas_cumprod_prev, t, x.shape)
        sigma = eta * torch.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar)) * torch.sqrt(1 - alpha_bar / alpha_bar_prev)
        mean = out["pred_xstart"] * torch.sqrt(alpha_bar_prev) + torch.sqrt(1 - alpha_bar_prev - sigma**2) * eps
        nonzero = (t != 0).float().reshape(-1, *([1] * (x.ndim - 1)))
        return mean + nonzero * sigma * noise

    @torch.no_grad()
    def sample(self, model, x_T: torch.Tensor, generators: Sequence[torch.Generator], eta: float | None = None,
               clip_denoised: bool = True) -> torch.Tensor:
        """x_0 ``[N, C, H, W] float32`` from ``x_T`` (on the model's device) through every kept step, last to
        first: ancestral (``eta`` None) or DDIM with ``eta`` in [0, 1]. Step noise of image i comes from
        ``generators[i]`` (drawn on the CPU, also where eta = 0 or t = 0 make no use of it, so the streams
        stay aligned whatever the method)."""
        if eta is not None and not 0 <= eta <= 1:
            raise ConfigError(f"eta={eta} must be in [0, 1] (DDIM; above 1 its sqrt(1 - ᾱ_prev - σ²) is of a "
                              f"negative number) or null for ancestral sampling")
        x = x_T.float()
        for step in reversed(range(self.num_steps)):
            t = torch.full((x.shape[0],), step, dtype=torch.long, device=x.device)
            noise = draw(generators, x.shape[1:]).to(x.device)
            if eta is None:
                x = self.ancestral_step(model, x, t, noise, clip_denoised)
            else:
                x = self.ddim_step(model, x, t, noise, eta, clip_denoised)
        return x


def to_uint8(samples: torch.Tensor) -> np.ndarray:
    """``[N, 3, H, W]`` in [-1, 1] -> ``[N, H, W, 3] uint8`` as guided-diffusion's image_sample.py writes
    them: ``((x + 1) * 127.5).clamp(0, 255)`` truncated to integers."""
    return ((samples.float() + 1) * 127.5).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()

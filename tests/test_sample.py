"""The sampler (pipeline/diffusion/sample.py) against closed-form maths and guided-diffusion's respacing rule."""
from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch

from pipeline.diffusion.gaussian import Diffusion
from pipeline.diffusion.sample import Sampler, draw, image_generator, to_uint8
from pipeline.diffusion.schedule import respaced_betas, space_timesteps
from pipeline.diffusion.unet import load_guided_diffusion
from pipeline.errors import ConfigError

BETAS = np.linspace(0.01, 0.3, 12)  # a small schedule of 12 steps, float64


def small(rescale: bool = False) -> Diffusion:
    return Diffusion("linear", len(BETAS), rescale_timesteps=rescale, betas=BETAS)


class FixedEps:
    """A stand-in network: returns ``eps`` (and ``v`` as the variance half when given), recording timesteps."""

    def __init__(self, eps: torch.Tensor, v: torch.Tensor | None = None):
        self.eps, self.v, self.calls = eps, v, []

    def __call__(self, x, timesteps):
        self.calls.append(timesteps.clone())
        return self.eps if self.v is None else torch.cat([self.eps, self.v], dim=1)


def test_space_timesteps_documented_examples():
    assert space_timesteps(1000, "ddim50") == set(range(0, 1000, 20))
    assert space_timesteps(1000, "ddim250") == set(range(0, 1000, 4))
    # the docstring's example: 300 steps, [10, 15, 20] = 10 of the first 100, 15 of the next, 20 of the last
    kept = sorted(space_timesteps(300, [10, 15, 20]))
    assert kept == sorted(space_timesteps(300, "10,15,20"))
    for start, count in ((0, 10), (100, 15), (200, 20)):
        section = [t for t in kept if start <= t < start + 100]
        assert len(section) == count and section[0] == start and section[-1] == start + 99
        assert np.ptp(np.diff(section)) <= 1  # evenly strided up to rounding
    assert sorted(space_timesteps(300, [10, 15, 20]))[:10] == list(range(0, 100, 11))  # stride 99 / 9 = 11
    assert space_timesteps(10, "4") == {0, 3, 6, 9}
    assert space_timesteps(10, "3") == {0, 4, 9}  # 4.5 rounds half to even, as Python's round in the original
    assert space_timesteps(1000, 1000) == set(range(1000))
    assert space_timesteps(10, [1]) == {0}
    with pytest.raises(ConfigError, match="cannot divide"):
        space_timesteps(10, 11)
    with pytest.raises(ConfigError, match="no integer stride"):
        space_timesteps(1000, "ddim999")


def test_respaced_betas_give_the_kept_steps_alpha_bar():
    diffusion = small()
    kept = sorted(space_timesteps(12, "5"))
    betas = respaced_betas(diffusion.alphas_cumprod, kept)
    expected = [1 - diffusion.alphas_cumprod[kept[0]]] + [
        1 - diffusion.alphas_cumprod[t] / diffusion.alphas_cumprod[s] for s, t in itertools.pairwise(kept)]
    np.testing.assert_allclose(betas, expected, rtol=0, atol=1e-15)
    np.testing.assert_allclose(np.cumprod(1 - betas), diffusion.alphas_cumprod[kept], rtol=1e-13)
    np.testing.assert_array_equal(Sampler(diffusion, "5").spaced.betas, betas)
    np.testing.assert_allclose(Sampler(diffusion).spaced.betas, diffusion.betas, rtol=1e-14)  # no respacing: the schedule


def bayes_posterior(alpha_bar_prev: float, alpha: float, x0: float, x_t: float) -> tuple[float, float]:
    """q(x_{t-1} | x_t, x0) by multiplying q(x_{t-1} | x0) = N(sqrt(ᾱ') x0, 1 - ᾱ') and
    q(x_t | x_{t-1}) = N(sqrt(α) x_{t-1}, 1 - α) as Gaussians in x_{t-1}."""
    precision = 1 / (1 - alpha_bar_prev) + alpha / (1 - alpha)
    mean = (np.sqrt(alpha_bar_prev) * x0 / (1 - alpha_bar_prev) + np.sqrt(alpha) * x_t / (1 - alpha)) / precision
    return mean, 1 / precision


@pytest.mark.parametrize("respacing", [None, "5", [2, 3]])
def test_posterior_mean_and_variance_match_the_closed_form(respacing):
    sampler = Sampler(small(), respacing)
    spaced = sampler.spaced
    alpha_bar = np.cumprod(1 - spaced.betas)
    for step in range(1, sampler.num_steps):  # step 0's posterior is a point mass (variance 0)
        mean, variance = bayes_posterior(alpha_bar[step - 1], 1 - spaced.betas[step], 0.3, -0.7)
        assert spaced.posterior_mean_coef1[step] * 0.3 + spaced.posterior_mean_coef2[step] * -0.7 == pytest.approx(mean, abs=1e-12)
        assert spaced.posterior_variance[step] == pytest.approx(variance, rel=1e-12)


@pytest.mark.parametrize("fixed_sigma", ["large", "small", "learned"])
def test_p_mean_variance_predicts_clipped_x0_and_the_posterior(fixed_sigma):
    sampler = Sampler(small(), "6", fixed_sigma="large" if fixed_sigma == "learned" else fixed_sigma)
    spaced = sampler.spaced
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 4, 4, generator=generator, dtype=torch.float64) * 2
    eps = torch.randn(2, 3, 4, 4, generator=generator, dtype=torch.float64)
    v = torch.rand(2, 3, 4, 4, generator=generator, dtype=torch.float64) * 2 - 1
    model = FixedEps(eps.float(), v.float() if fixed_sigma == "learned" else None)
    for step in range(sampler.num_steps):
        t = torch.full((2,), step)
        out = sampler.p_mean_variance(model, x.float(), t)
        alpha_bar = np.cumprod(1 - spaced.betas)
        x0 = ((x - np.sqrt(1 - alpha_bar[step]) * eps) / np.sqrt(alpha_bar[step])).clamp(-1, 1)
        assert torch.allclose(out["pred_xstart"].double(), x0, atol=1e-5)
        assert out["pred_xstart"].abs().max() <= 1
        if step:
            mean, posterior = bayes_posterior(alpha_bar[step - 1], 1 - spaced.betas[step], x0, x)
            assert torch.allclose(out["mean"].double(), mean, atol=1e-5)
        posterior_1 = bayes_posterior(alpha_bar[0], 1 - spaced.betas[1], 0, 0)[1]  # the clip at t = 0
        small_log = np.log(posterior if step else posterior_1)
        large_log = np.log(spaced.betas[step] if step else posterior_1)
        expected = {"large": large_log, "small": small_log,
                    "learned": (v + 1) / 2 * np.log(spaced.betas[step]) + (1 - v) / 2 * small_log}[fixed_sigma]
        assert torch.allclose(out["log_variance"].double().expand_as(x), torch.as_tensor(expected).expand_as(x),
                              atol=1e-5)


@pytest.mark.parametrize("rescale", [False, True])
def test_the_network_sees_the_original_step_indices(rescale):
    sampler = Sampler(small(rescale), "4")  # keeps 0, 4, 7, 11 of 12
    model = FixedEps(torch.zeros(1, 3, 2, 2))
    sampler.sample(model, torch.zeros(1, 3, 2, 2), [image_generator(0, 0)])
    seen = [float(call[0]) for call in model.calls]
    original = [11, 7, 4, 0]
    assert seen == pytest.approx([t * 1000 / 12 for t in original] if rescale else original, rel=1e-6)
    assert sorted(sampler.timestep_map) == [0, 4, 7, 11]


@pytest.fixture(scope="module")
def tiny(reference):
    meta = json.loads((reference / "tiny32.json").read_text())
    return load_guided_diffusion(reference / "tiny32.pt", meta["model_flags"])  # learn_sigma: 6 channels


def x_T(seed: int, count: int) -> tuple[torch.Tensor, list[torch.Generator]]:
    generators = [image_generator(seed, index) for index in range(count)]
    return draw(generators, (3, 32, 32)), generators


def test_ddim_with_eta_0_is_deterministic_given_x_T(tiny):
    sampler = Sampler(Diffusion("linear", 1000), "ddim3")  # steps 0, 334, 668
    start, _ = x_T(0, 1)
    first = sampler.sample(tiny, start, [image_generator(1, 0)], eta=0.0)
    second = sampler.sample(tiny, start, [image_generator(2, 0)], eta=0.0)
    assert torch.equal(first, second)
    noisy = sampler.sample(tiny, start, [image_generator(2, 0)], eta=1.0)
    assert not torch.equal(first, noisy)  # the step noise is used once eta > 0


@pytest.mark.parametrize("eta", [None, 0.5])
def test_a_sample_of_a_random_unet_is_finite_and_in_range(tiny, eta):
    start, generators = x_T(0, 2)
    samples = Sampler(Diffusion("linear", 1000), "5").sample(tiny, start, generators, eta=eta)
    assert samples.shape == (2, 3, 32, 32) and torch.isfinite(samples).all()
    assert samples.min() >= -1 and samples.max() <= 1
    images = to_uint8(samples)
    assert images.shape == (2, 32, 32, 3) and images.dtype == np.uint8


def test_an_image_sample_does_not_depend_on_its_batch(tiny):
    sampler = Sampler(Diffusion("linear", 1000), "4")
    start, generators = x_T(3, 3)
    together = sampler.sample(tiny, start, generators)
    start, generators = x_T(3, 3)
    alone = sampler.sample(tiny, start[2:], generators[2:])
    assert np.array_equal(to_uint8(together)[2], to_uint8(alone)[0])


def test_to_uint8_truncates_as_guided_diffusion():
    values = torch.tensor([-1.0, -0.999, 0.0, 0.999, 1.0, 1.5]).reshape(1, 1, 1, 6).expand(1, 3, 1, 6)
    assert to_uint8(values)[0, 0, :, 0].tolist() == [0, 0, 127, 254, 255, 255]


def test_eta_outside_0_1_is_refused():
    with pytest.raises(ConfigError, match="eta"):
        Sampler(small(), "3").sample(FixedEps(torch.zeros(1, 3, 2, 2)), torch.zeros(1, 3, 2, 2),
                                     [image_generator(0, 0)], eta=1.5)


class ExactEps:
    """The exact ε of data that is one image ``c``: x_t = sqrt(ᾱ) c + sqrt(1 - ᾱ) ε, with ᾱ at the ORIGINAL step."""

    def __init__(self, diffusion: Diffusion, c: torch.Tensor):
        self.diffusion, self.c = diffusion, c

    def __call__(self, x, timesteps):
        alpha_bar = torch.from_numpy(self.diffusion.alphas_cumprod)[timesteps.long()].float().reshape(-1, 1, 1, 1)
        return (x - alpha_bar.sqrt() * self.c) / (1 - alpha_bar).sqrt()


@pytest.mark.parametrize("respacing, eta", [(None, None), ("5", None), ("ddim4", 0.0), ("4", 1.0), (None, 0.0)])
def test_a_perfect_denoiser_of_one_image_samples_that_image(respacing, eta):
    """Every method ends at the data when the network knows it exactly: the loop's steps, ᾱ_prev and the
    original-index timesteps all have to agree for this to hold."""
    diffusion = small()
    c = torch.linspace(-0.8, 0.8, 3 * 4 * 4).reshape(1, 3, 4, 4)
    generators = [image_generator(5, 0)]
    sampler, model = Sampler(diffusion, respacing), ExactEps(diffusion, c)
    sample = sampler.sample(model, draw(generators, (3, 4, 4)), generators, eta=eta)
    assert torch.allclose(sample, c, atol=1e-5)
    for step in range(1, sampler.num_steps):  # at every kept step, not only the last (which ends at x0 anyway)
        alpha_bar = float(np.cumprod(1 - sampler.spaced.betas)[step])
        x_t = np.sqrt(alpha_bar) * c + np.sqrt(1 - alpha_bar) * draw(generators, (3, 4, 4))
        assert torch.allclose(sampler.p_mean_variance(model, x_t, torch.tensor([step]))["pred_xstart"], c, atol=1e-4)

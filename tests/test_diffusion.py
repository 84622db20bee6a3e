from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.config import TrainConfig
from pipeline.data.layout import ImageFiles, load_unlabeled
from pipeline.diffusion.gaussian import Diffusion, betas_for_schedule
from pipeline.diffusion.train import ema_rate_at, load_checkpoint, save_checkpoint, train_ddpm
from pipeline.diffusion.unet import create_unet
from pipeline.errors import DatasetError, check_timesteps

TINY = {"image_size": 16, "num_channels": 32, "num_res_blocks": 1, "channel_mult": [1, 2],
        "attention_resolutions": [8], "num_head_channels": 32}


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_schedules_are_valid(schedule):
    betas = betas_for_schedule(schedule, 1000)
    assert betas.shape == (1000,) and np.all(betas > 0) and np.all(betas <= 0.999)
    alphas = np.cumprod(1 - betas)
    assert np.all(np.diff(alphas) < 0) and alphas[0] > 0.99 and alphas[-1] < 0.01


def test_linear_schedule_keeps_endpoints_when_rescaled():
    betas = betas_for_schedule("linear", 250)
    assert betas[0] == pytest.approx(4e-4) and betas[-1] == pytest.approx(0.08)


def test_timestep_check_names_the_range():
    with pytest.raises(ValueError, match=r"outside \[0, 1000\)"):
        check_timesteps([1000], Diffusion("linear", 1000).num_timesteps)


def test_learned_sigma_loss_adds_a_finite_variational_bound():
    diffusion = Diffusion("linear", 1000)
    generator = torch.Generator().manual_seed(0)
    x0 = torch.rand(4, 3, 8, 8, generator=generator) * 2 - 1
    noise = torch.randn(4, 3, 8, 8, generator=generator)
    t = torch.tensor([0, 10, 500, 999])
    x_t = diffusion.q_sample(x0, t, noise)
    output = torch.cat([noise + 0.1, torch.zeros_like(noise)], dim=1)
    terms = diffusion.training_losses(output, x0, x_t, t, noise)
    assert torch.allclose(terms["mse"], torch.full((4,), 0.01))
    assert torch.isfinite(terms["vb"]).all() and (terms["vb"][1:] >= 0).all()
    assert torch.allclose(terms["loss"], terms["mse"] + terms["vb"])


def test_ema_warms_up_then_holds_the_target():
    assert ema_rate_at(1, 0.999) == pytest.approx(2 / 11)
    assert ema_rate_at(100000, 0.999) == 0.999


def test_short_training_lowers_the_loss_and_round_trips(tmp_path):
    torch.manual_seed(0)
    model = create_unet(dict(TINY, learn_sigma=True))
    images = (np.random.default_rng(0).random((64, 16, 16, 3)) > 0.7).astype(np.uint8) * 255
    losses = []
    ema, history = train_ddpm(model, Diffusion("linear", 1000), images, TrainConfig(steps=30, batch_size=16, lr=1e-3, warmup_steps=0),
                              device=torch.device("cpu"), on_step=lambda step, terms: losses.append(terms["loss"]))
    assert [row["loss"] for row in history] == losses
    assert len(losses) == 30 and np.mean(losses[-5:]) < np.mean(losses[:5])
    path = tmp_path / "ddpm.pt"
    save_checkpoint(path, ema, Diffusion("cosine", 500), {"kind": "trained"})
    loaded, diffusion, payload = load_checkpoint(path)
    assert diffusion.num_timesteps == 500 and diffusion.schedule.value == "cosine"
    assert payload["model_flags"]["learn_sigma"] is True
    for key, value in ema.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value)


def test_training_from_image_files_equals_training_from_an_array(tmp_path):
    images = (np.random.default_rng(1).random((24, 16, 16, 3)) * 255).astype(np.uint8)
    for index, image in enumerate(images):
        Image.fromarray(image).save(tmp_path / f"u_{index:03d}.png")
    files = ImageFiles(sorted(tmp_path.glob("*.png")))
    assert len(files) == 24 and np.array_equal(files[[3, 0, 3]], images[[3, 0, 3]])
    weights = []
    for source in (images, files):
        torch.manual_seed(0)
        model = create_unet(TINY)
        ema, _ = train_ddpm(model, Diffusion("linear", 1000), source, TrainConfig(steps=4, batch_size=8, lr=1e-3),
                            device=torch.device("cpu"))
        weights.append(ema.state_dict())
    assert all(torch.equal(weights[0][key], weights[1][key]) for key in weights[0])


def test_unreadable_unlabeled_image_names_the_file(tmp_path):
    (tmp_path / "unlabeled").mkdir()
    (tmp_path / "unlabeled" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    files = load_unlabeled(tmp_path)
    with pytest.raises(DatasetError, match=r"broken.png cannot be read .*replace or remove the file"):
        files[[0]]

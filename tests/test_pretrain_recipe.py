"""The pretraining recipe's options (lr schedule, Min-SNR-γ weighting, batch order) and resumable runs."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.config import Autocast, LossWeighting, LrSchedule, TrainConfig
from pipeline.diffusion.gaussian import Diffusion
from pipeline.diffusion.train import batch_at, lr_at, mse_weights, train_ddpm
from pipeline.diffusion.unet import create_unet
from tests.conftest import REPO
from tests.helpers import exit_code_2_stderr, full_disk_save, killed_and_resumed, make_project

TINY = {"image_size": 16, "num_channels": 32, "num_res_blocks": 1, "channel_mult": [1, 2],
        "attention_resolutions": [], "num_head_channels": 32, "use_scale_shift_norm": True,
        "resblock_updown": False, "learn_sigma": False, "dropout": 0.0}
IMAGES = (np.random.default_rng(0).random((24, 16, 16, 3)) > 0.6).astype(np.uint8) * 255


def train(config: TrainConfig, **kwargs):
    torch.manual_seed(0)
    return train_ddpm(create_unet(TINY), Diffusion("linear", 1000), IMAGES, config, device=torch.device("cpu"), **kwargs)


def test_warm_up_ramps_linearly_then_cosine_decays_towards_zero():
    config = TrainConfig(steps=110, lr=1e-3, warmup_steps=10, lr_schedule=LrSchedule.COSINE)
    assert lr_at(1, config) == pytest.approx(1e-4) and lr_at(10, config) == pytest.approx(1e-3)
    assert lr_at(11, config) == pytest.approx(1e-3)  # the first step after warm-up starts the cosine at lr
    assert lr_at(61, config) == pytest.approx(5e-4)  # half way
    assert 0 < lr_at(110, config) < 1e-6
    decay = [lr_at(step, config) for step in range(11, 111)]
    assert all(later < earlier for earlier, later in zip(decay, decay[1:]))
    constant = config.model_copy(update={"lr_schedule": LrSchedule.CONSTANT})
    assert lr_at(11, constant) == lr_at(110, constant) == 1e-3


def test_min_snr_weights_cap_the_signal_to_noise_ratio_at_gamma():
    diffusion = Diffusion("linear", 1000)
    snr = diffusion.alphas_cumprod / (1 - diffusion.alphas_cumprod)
    uniform = mse_weights(diffusion, TrainConfig())
    weights = mse_weights(diffusion, TrainConfig(loss_weighting=LossWeighting.MIN_SNR, min_snr_gamma=5.0))
    assert torch.equal(uniform, torch.ones(1000))
    noisy = snr <= 5.0
    assert noisy.any() and (~noisy).any()
    assert torch.all(weights[torch.from_numpy(noisy)] == 1.0)
    expected = torch.from_numpy(5.0 / snr[~noisy]).float()
    assert torch.allclose(weights[torch.from_numpy(~noisy)], expected)
    assert weights[0] < 1e-3  # the nearly clean step: SNR ~ 1e4


def test_min_snr_changes_training_and_a_gamma_above_every_snr_is_the_uniform_loss():
    base = TrainConfig(steps=3, batch_size=8, lr=1e-3)
    uniform, _ = train(base)
    capped, _ = train(base.model_copy(update={"loss_weighting": LossWeighting.MIN_SNR, "min_snr_gamma": 1e9}))
    weighted, _ = train(base.model_copy(update={"loss_weighting": LossWeighting.MIN_SNR, "min_snr_gamma": 5.0}))
    key = "out.2.weight"
    assert torch.equal(uniform.state_dict()[key], capped.state_dict()[key])
    assert not torch.equal(uniform.state_dict()[key], weighted.state_dict()[key])


def test_bfloat16_autocast_trains_float32_weights_close_to_the_float32_run_and_resumes_bit_for_bit(tmp_path):
    base = TrainConfig(steps=4, batch_size=8, lr=1e-3, warmup_steps=0, state_every=2, autocast=Autocast.NONE)
    bf16 = base.model_copy(update={"autocast": Autocast.BFLOAT16})
    full, full_history = train(base)
    half, half_history = train(bf16)
    assert all(value.dtype == torch.float32 for value in half.state_dict().values())  # EMA and master weights
    assert all(np.isfinite(step["loss"]) for step in half_history)
    key = "out.2.weight"
    assert not torch.equal(full.state_dict()[key], half.state_dict()[key])  # the products did run in bf16
    losses = np.array([[step["loss"] for step in history] for history in (full_history, half_history)])
    assert np.allclose(losses[0], losses[1], rtol=0.05), losses  # same batches and noise, bf16 rounding only
    state = tmp_path / "ddpm.pt.state"
    with pytest.raises(Interrupted):
        train(bf16, on_step=lambda step, losses: (_ for _ in ()).throw(Interrupted) if step == 3 else None,
              state_path=state, fingerprint="run")
    resumed, history = train(bf16, state_path=state, fingerprint="run")
    assert history == half_history
    for key, value in half.state_dict().items():
        assert torch.equal(resumed.state_dict()[key], value), key


def test_batches_are_a_function_of_seed_and_step_covering_each_epoch_once():
    per_epoch = len(IMAGES) // 8
    first_epoch = torch.cat([batch_at(IMAGES, 8, 0, step) for step in range(1, per_epoch + 1)])
    every_image = torch.from_numpy(IMAGES).permute(0, 3, 1, 2).float() / 127.5 - 1
    assert sorted(map(tuple, first_epoch.flatten(1).tolist())) == sorted(map(tuple, every_image.flatten(1).tolist()))
    assert torch.equal(batch_at(IMAGES, 8, 0, 5), batch_at(IMAGES, 8, 0, 5))
    assert not torch.equal(batch_at(IMAGES, 8, 0, 1), batch_at(IMAGES, 8, 0, per_epoch + 1))  # a new order
    assert not torch.equal(batch_at(IMAGES, 8, 0, 1), batch_at(IMAGES, 8, 1, 1))


class Interrupted(Exception):
    pass


def test_an_interrupted_run_resumes_to_the_unbroken_runs_weights(tmp_path):
    config = TrainConfig(steps=7, batch_size=8, lr=1e-3, state_every=2, warmup_steps=2, lr_schedule=LrSchedule.COSINE,
                         loss_weighting=LossWeighting.MIN_SNR)
    whole, whole_history = train(config)
    state = tmp_path / "ddpm.pt.state"

    def stop_at_five(step, losses):
        if step == 5:
            raise Interrupted

    with pytest.raises(Interrupted):
        train(config, on_step=stop_at_five, state_path=state, fingerprint="run")
    assert torch.load(state, weights_only=True)["step"] == 4
    resumed_steps = []
    resumed, history = train(config, on_step=lambda step, losses: resumed_steps.append(step), state_path=state,
                             fingerprint="run")
    assert resumed_steps == [5, 6, 7]
    assert history == whole_history
    for key, value in whole.state_dict().items():
        assert torch.equal(resumed.state_dict()[key], value), key


def test_a_state_of_other_params_is_not_resumed(tmp_path, capsys):
    config = TrainConfig(steps=4, batch_size=8, lr=1e-3, warmup_steps=0, state_every=2)
    state = tmp_path / "ddpm.pt.state"
    with pytest.raises(Interrupted):
        train(config, on_step=lambda step, losses: (_ for _ in ()).throw(Interrupted) if step == 3 else None,
              state_path=state, fingerprint="old params")
    steps = []
    train(config, on_step=lambda step, losses: steps.append(step), state_path=state, fingerprint="new params")
    assert steps == [1, 2, 3, 4]
    assert "written for other params" in capsys.readouterr().out
    state.write_bytes(b"not a torch file")
    steps.clear()
    train(config, on_step=lambda step, losses: steps.append(step), state_path=state, fingerprint="new params")
    assert steps == [1, 2, 3, 4]


def files_under(directory: Path) -> dict[str, bytes]:
    return {path.relative_to(directory).as_posix(): path.read_bytes() for path in sorted(directory.rglob("*"))
            if path.is_file()}


@pytest.mark.slow
def test_killed_pretraining_resumes_to_a_byte_identical_checkpoint(tmp_path):
    project = make_project(tmp_path, {"dataset.unlabeled_images": 32, "ddpm.train.steps": 40,
                                      "ddpm.train.state_every": 10, "ddpm.train.batch_size": 8})
    env = dict(os.environ, PYTHONPATH=str(REPO), DDPM_SEG_THREADS="1")

    def command(out):
        return [sys.executable, "-m", "stages.pretrain", "--params", str(project["params"]), "--data",
                str(project["data"]), "--out", str(out), "--curves", str(out.with_suffix(".curves"))]

    whole = tmp_path / "unbroken" / "resumed.pt"  # torch.save records the file's name in its archive
    whole.parent.mkdir()
    assert subprocess.run(command(whole), env=env, cwd=REPO, capture_output=True).returncode == 0
    out = tmp_path / "resumed.pt"
    state = tmp_path / "resumed.pt.state"
    assert 10 <= killed_and_resumed(command(out), out, state, env) < 40
    assert out.read_bytes() == whole.read_bytes()
    curves = files_under(whole.with_suffix(".curves"))
    assert "plots/metrics/loss.tsv" in curves and files_under(out.with_suffix(".curves")) == curves  # whole history
    assert not state.exists()  # a finished run leaves no state behind


def test_a_non_finite_loss_stops_pretraining_naming_the_step_and_the_lr():
    from pipeline.errors import NumericsError

    with pytest.raises(NumericsError, match=r"loss became (nan|inf) at step 2; likely cause: ddpm.train.lr=1e\+30"):
        train(TrainConfig(steps=3, batch_size=8, lr=1e30, warmup_steps=0), on_step=None)


def test_disk_full_while_saving_the_checkpoint_keeps_the_last_one_and_the_state(tmp_path, monkeypatch, capsys):
    import shutil

    import stages.pretrain

    project = make_project(tmp_path, {"dataset.unlabeled_images": 16, "ddpm.train.steps": 3, "ddpm.train.batch_size": 8,
                                      "ddpm.train.state_every": 2})
    out = tmp_path / "trained.pt"
    shutil.copy(project["checkpoint"], out)
    before = out.read_bytes()
    monkeypatch.setattr(torch, "save", full_disk_save(torch.save, "trained.pt.tmp"))  # the resumable states still save
    err = exit_code_2_stderr(stages.pretrain.main, ["pretrain", "--params", project["params"], "--data", project["data"],
                                                    "--out", out, "--curves", tmp_path / "loss.csv"], monkeypatch, capsys)
    assert f"disk full while writing ({out}" in err and "free space and rerun the stage" in err
    assert out.read_bytes() == before and not out.with_name("trained.pt.tmp").exists()
    assert torch.load(out.with_name("trained.pt.state"), weights_only=True)["step"] == 2  # the rerun resumes from it

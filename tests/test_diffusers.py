"""diffusers UNet2DModel folders as ddpm.checkpoint: parity with diffusers' own forward, schedules, errors."""
from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch

from pipeline.config import load_params
from pipeline.diffusion.diffusers_unet import diffusion_for, load_diffusers_unet
from pipeline.diffusion.gaussian import Diffusion
from pipeline.diffusion.train import load_checkpoint, save_checkpoint
from pipeline.errors import ModelFlagsError
from pipeline.features.activations import feature_maps, make_noise
from pipeline.features.store import open_store
from tests.helpers import make_project, run_stage
from tests.test_segment import save_random_ensemble

diffusers = pytest.importorskip("diffusers")

TINY_UNET = {"sample_size": 32, "block_out_channels": (32, 64, 64), "layers_per_block": 1, "norm_num_groups": 8,
             "down_block_types": ("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
             "up_block_types": ("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"), "attention_head_dim": 8}


def saved_unet(folder, seed=0, **overrides):
    torch.manual_seed(seed)
    unet = diffusers.UNet2DModel(**{**TINY_UNET, **overrides}).eval()
    with torch.no_grad():  # diffusers zero-initialises nothing we read, but make every weight matter
        for parameter in unet.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    unet.save_pretrained(folder)
    return unet


def hooked_blocks(unet, x, t):
    """diffusers' own forward; each decoder block's output taken with forward hooks on its last module
    (the upsampler of an up block's last unit, else the unit's attention, else its resnet)."""
    modules = []
    for block in unet.up_blocks:
        for j, resnet in enumerate(block.resnets):
            last = resnet
            if getattr(block, "attentions", None) is not None:
                last = block.attentions[j]
            if j == len(block.resnets) - 1 and block.upsamplers is not None:
                last = block.upsamplers[-1]
            modules.append(last)
    outputs = {}
    handles = [m.register_forward_hook(lambda module, inputs, output, i=i: outputs.__setitem__(i, output))
               for i, m in enumerate(modules)]
    try:
        with torch.no_grad():
            prediction = unet(x, t).sample
    finally:
        for handle in handles:
            handle.remove()
    return prediction, [outputs[i] for i in range(len(modules))]


@pytest.mark.parametrize("variant", [{}, {"upsample_type": "resnet", "resnet_time_scale_shift": "scale_shift",
                                         "center_input_sample": True}])
def test_decoder_blocks_match_diffusers_forward_with_hooks(tmp_path, variant):
    unet = saved_unet(tmp_path / "unet", **variant)
    model = load_diffusers_unet(tmp_path / "unet")
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([50, 250])
    expected_prediction, expected = hooked_blocks(unet, x, t)
    blocks = list(range(model.num_decoder_blocks))
    assert len(blocks) == 3 * 2  # one per resnet unit: 3 up blocks x (layers_per_block + 1)
    with torch.no_grad():
        stopped, actual = model(x, t, return_blocks=blocks)
        _, some = model(x, t, return_blocks=[3, 1])
        prediction = model(x, t)
    assert stopped is None  # as UNetModel: the pass stops after the last block asked for
    assert (prediction - expected_prediction).abs().max() <= 1e-5
    for index, (ours, theirs) in enumerate(zip(actual, expected)):
        assert ours.shape == theirs.shape, index
        assert (ours - theirs).abs().max() <= 1e-5, index
    assert [tuple(a.shape[1:]) for a in actual] == model.decoder_block_shapes()
    assert [s[1] for s in model.decoder_block_shapes()] == [8, 16, 16, 32, 32, 32]  # the upsampler counts with the unit before it
    assert torch.equal(some[0], actual[3]) and torch.equal(some[1], actual[1])


def test_a_saved_diffusers_checkpoint_gives_the_same_features(tmp_path):
    saved_unet(tmp_path / "unet")
    model = load_diffusers_unet(tmp_path / "unet")
    diffusion = diffusion_for(tmp_path / "unet", Diffusion("linear", 1000))
    save_checkpoint(tmp_path / "ddpm.pt", model, diffusion, {"kind": "test"})
    loaded, loaded_diffusion, payload = load_checkpoint(tmp_path / "ddpm.pt")
    assert payload["architecture"] == "diffusers.UNet2DModel"
    x0 = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(2)) * 2 - 1
    options = {"t_steps": [50, 150], "blocks": [1, 4], "noise": make_noise(0, 32)}
    expected = feature_maps(model, diffusion, x0, **options)
    assert torch.equal(feature_maps(loaded, loaded_diffusion, x0, **options), expected)
    assert expected.shape == (2, 2 * (64 + 32), 32, 32)


@pytest.mark.parametrize("schedule", ["linear", "scaled_linear", "squaredcos_cap_v2"])
@pytest.mark.parametrize("where", ["in", "beside"])
def test_the_schedule_comes_from_scheduler_config(tmp_path, schedule, where):
    saved_unet(tmp_path / "model" / "unet")
    scheduler = diffusers.DDPMScheduler(num_train_timesteps=500, beta_schedule=schedule, beta_start=0.0002, beta_end=0.03)
    scheduler.save_pretrained(tmp_path / "model" / ("unet" if where == "in" else "scheduler"))
    diffusion = diffusion_for(tmp_path / "model" / "unet", Diffusion("linear", 1000))
    assert diffusion.num_timesteps == 500 and not diffusion.rescale_timesteps
    np.testing.assert_allclose(diffusion.alphas_cumprod, scheduler.alphas_cumprod.numpy(), rtol=1e-5, atol=1e-6)


def test_a_legacy_bin_weights_file_loads_like_safetensors(tmp_path):
    unet = saved_unet(tmp_path / "unet")
    (tmp_path / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    torch.save(unet.state_dict(), tmp_path / "unet" / "diffusion_pytorch_model.bin")
    model = load_diffusers_unet(tmp_path / "unet")
    x, t = torch.randn(1, 3, 32, 32), torch.tensor([10])
    with torch.no_grad():
        assert (model(x, t) - unet(x, t).sample).abs().max() <= 1e-5


def test_without_scheduler_config_the_params_schedule_is_used(tmp_path):
    saved_unet(tmp_path / "unet")
    diffusion = diffusion_for(tmp_path / "unet", Diffusion("cosine", 400))
    np.testing.assert_array_equal(diffusion.betas, Diffusion("cosine", 400).betas)


def test_wrong_folders_get_clear_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelFlagsError, match=r"empty is a folder but not a diffusers UNet2DModel: it needs config.json"):
        load_diffusers_unet(tmp_path / "empty")
    saved_unet(tmp_path / "conditional", num_class_embeds=4)
    with pytest.raises(ModelFlagsError, match="conditional is class-conditional"):
        load_diffusers_unet(tmp_path / "conditional")
    saved_unet(tmp_path / "skip", up_block_types=("SkipUpBlock2D", "AttnSkipUpBlock2D", "SkipUpBlock2D"),
               down_block_types=("SkipDownBlock2D", "AttnSkipDownBlock2D", "SkipDownBlock2D"))
    with pytest.raises(ModelFlagsError, match=r"skip: block types \['SkipUpBlock2D'.* are not supported"):
        load_diffusers_unet(tmp_path / "skip")
    saved_unet(tmp_path / "other")
    config = json.loads((tmp_path / "other" / "config.json").read_text())
    (tmp_path / "other" / "config.json").write_text(json.dumps({**config, "_class_name": "UNet2DConditionModel"}))
    with pytest.raises(ModelFlagsError, match="other: config.json is a 'UNet2DConditionModel', but only UNet2DModel"):
        load_diffusers_unet(tmp_path / "other")
    (tmp_path / "other" / "scheduler_config.json").write_text(json.dumps({"beta_schedule": "sigmoid"}))
    with pytest.raises(ModelFlagsError, match="beta_schedule 'sigmoid' is not supported"):
        diffusion_for(tmp_path / "other", Diffusion("linear", 1000))


def test_without_diffusers_the_error_says_how_to_install(tmp_path, monkeypatch):
    saved_unet(tmp_path / "unet")
    monkeypatch.setitem(sys.modules, "diffusers", None)  # `import diffusers` now raises ImportError
    with pytest.raises(ModelFlagsError, match=r"needs the diffusers package: pip install '\.\[diffusers\]'"):
        load_diffusers_unet(tmp_path / "unet")


@pytest.mark.slow  # pretrain, extract, fit, evaluate and segment as subprocesses: ~35 s
def test_pretrain_imports_a_folder_and_the_later_stages_do_not_care(tmp_path):
    saved_unet(tmp_path / "models" / "unet")
    project = make_project(tmp_path, {"ddpm.checkpoint": str(tmp_path / "models" / "unet"), "blocks": [1, 3, 4],
                                       "features.store_blocks": [1, 3, 4]})
    checkpoint = tmp_path / "imported.pt"
    result = run_stage("pretrain", "--params", project["params"], "--data", project["data"], "--out", checkpoint,
                       "--curves", tmp_path / "loss.csv")
    assert result.returncode == 0, result.stderr
    assert "imported diffusers UNet2DModel" in result.stdout and "(6 decoder blocks)" in result.stdout
    params = load_params(project["params"])
    result = run_stage("extract", "--params", project["params"], "--stores", tmp_path / "t{t}.zarr", "--data",
                       project["data"], "--checkpoint", checkpoint)  # every step of t_steps in one process
    assert result.returncode == 0, result.stderr
    store = open_store(tmp_path / "t50.zarr", {"blocks": (1, 3, 4)})
    assert store.record.feature_dim == 64 + 64 + 32  # up blocks at 64, 64, 32 channels
    save_random_ensemble(tmp_path / "ensemble.pt", params, checkpoint)
    result = run_stage("segment", "--params", project["params"], "--checkpoint", checkpoint, "--ensemble",
                       tmp_path / "ensemble.pt", "--images", project["data"] / "real" / "test", "--out", tmp_path / "out")
    assert result.returncode == 0, result.stderr
    assert len(list((tmp_path / "out").glob("*.overlay.png"))) == 4


def test_a_model_of_another_size_is_refused_by_pretrain(tmp_path):
    saved_unet(tmp_path / "unet", sample_size=64)
    project = make_project(tmp_path, {"ddpm.checkpoint": str(tmp_path / "unet")})
    result = run_stage("pretrain", "--params", project["params"], "--data", project["data"], "--out",
                       tmp_path / "x.pt", "--curves", tmp_path / "loss.csv")
    assert result.returncode == 2
    assert "is a 64 px model but dataset.image_size=32; set dataset.image_size: 64" in result.stderr
    assert not (tmp_path / "x.pt").exists()

"""improved-diffusion checkpoints: its flag set, head-count attention and rescaled timesteps.

improved-diffusion (Nichol & Dhariwal) is guided-diffusion's predecessor: the same state-dict keys with
``resblock_updown`` and ``use_new_attention_order`` off, attention heads set by ``num_heads`` only, a
32 px channel_mult default of (1, 2, 2, 2), and models that see ``t * 1000 / diffusion_steps``.
No improved-diffusion checkpoint is available offline, so these tests check each of those facts
against an independent computation instead.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pipeline.diffusion.gaussian import Diffusion
from pipeline.diffusion.unet import (
    AttentionBlock,
    ModelFlagsError,
    config_from_flags,
    create_unet,
    load_guided_diffusion,
)
from pipeline.features.activations import feature_maps

# improved-diffusion's CIFAR-10 MODEL_FLAGS (its README), in the dict form its scripts build.
CIFAR10_FLAGS = {"image_size": 32, "num_channels": 128, "num_res_blocks": 3, "learn_sigma": True, "dropout": 0.3,
                 "num_heads": 4, "num_heads_upsample": -1, "attention_resolutions": "16,8", "class_cond": False,
                 "use_checkpoint": False, "use_scale_shift_norm": True}


def perturb(model: torch.nn.Module) -> torch.nn.Module:
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    return model


def reference_attention(block: AttentionBlock, x: torch.Tensor, heads: int, new_order: bool) -> torch.Tensor:
    """Multi-head self-attention over the pixels of ``x`` with torch's SDPA and explicit head layouts."""
    batch, channels, height, width = x.shape
    tokens = x.reshape(batch, channels, -1)
    qkv = block.qkv(block.norm(tokens))  # [B, 3C, T]
    head_channels = channels // heads
    if new_order:  # q, k, v are the three thirds; each third is split into heads
        q, k, v = (part.reshape(batch, heads, head_channels, -1) for part in qkv.chunk(3, dim=1))
    else:  # legacy: qkv is split into heads first; each head holds its own q, k, v
        q, k, v = qkv.reshape(batch, heads, 3 * head_channels, -1).split(head_channels, dim=2)
    out = F.scaled_dot_product_attention(q.transpose(2, 3), k.transpose(2, 3), v.transpose(2, 3))  # [B, h, T, c]
    out = out.transpose(2, 3).reshape(batch, channels, -1)
    return (tokens + block.proj_out(out)).reshape(x.shape)


@pytest.mark.parametrize("new_order", [False, True])
def test_attention_heads_match_an_independent_multi_head_attention(new_order):
    torch.manual_seed(0)
    block = AttentionBlock(64, num_heads=4, num_head_channels=None, new_order=new_order)
    torch.nn.init.normal_(block.proj_out.weight, std=0.2)  # zero-initialised in the model; make it count here
    x = torch.randn(2, 64, 8, 8)
    with torch.no_grad():
        expected = reference_attention(block, x, heads=4, new_order=new_order)
        wrong_layout = reference_attention(block, x, heads=4, new_order=not new_order)
        ours = block(x)
    assert (ours - expected).abs().max() < 1e-5
    assert (ours - wrong_layout).abs().max() > 1e-3  # the test can tell the two head layouts apart


def test_improved_diffusion_cifar10_flags_build_its_network():
    config = config_from_flags(CIFAR10_FLAGS)
    assert config.resolved_channel_mult == (1, 2, 2, 2)
    assert config.attention_downsample_rates == (2, 4)
    with torch.device("meta"):
        model = create_unet(CIFAR10_FLAGS)
    attention = [m for m in model.modules() if isinstance(m, AttentionBlock)]
    # 3 res blocks at ds 2 and 4 down, 4 each up, plus the middle block
    assert len(attention) == 3 + 3 + 4 + 4 + 1
    assert all(m.num_heads == 4 and not m.new_order for m in attention)
    assert model.num_decoder_blocks == 4 * (3 + 1)
    assert model.out[-1].out_channels == 6
    # No resblock_updown: each of the 3 resolution drops is a plain strided conv (`input_blocks.<i>.0.op`),
    # where resblock_updown would put a ResBlock (`input_blocks.<i>.0.in_layers...`, no `.op.`) instead.
    keys = model.state_dict().keys()
    downsamples = {key.split(".op.")[0] for key in keys if ".op." in key}
    assert downsamples == {"input_blocks.4.0", "input_blocks.8.0", "input_blocks.12.0"}
    assert not any(key.startswith(f"{prefix}.in_layers") for prefix in downsamples for key in keys)
    with torch.device("meta"):
        updown = create_unet(dict(CIFAR10_FLAGS, resblock_updown=True)).state_dict().keys()
    assert not any(".op." in key for key in updown)
    assert all(f"{prefix}.in_layers.2.weight" in updown for prefix in downsamples)


def test_improved_diffusion_state_dict_round_trips_through_the_loader(tmp_path):
    torch.manual_seed(1)
    flags = dict(CIFAR10_FLAGS, num_channels=32, num_res_blocks=1)
    source = perturb(create_unet(flags).eval())  # so the output is not the zero of a fresh model
    path = tmp_path / "improved.pt"
    torch.save(source.state_dict(), path)  # improved-diffusion saves a bare state dict, as guided-diffusion does
    loaded = load_guided_diffusion(path, flags)
    x, t = torch.randn(1, 3, 32, 32), torch.tensor([10])
    with torch.no_grad():
        expected = source(x, t)
        assert expected.abs().max() > 1e-2 and torch.equal(loaded(x, t), expected)


@pytest.mark.parametrize("name", ["diffusion_steps", "noise_schedule", "rescale_timesteps", "timestep_respacing"])
def test_diffusion_flags_in_model_flags_say_where_they_go(name):
    with pytest.raises(ModelFlagsError, match=f"{name} is a diffusion flag, not a model flag"):
        config_from_flags(dict(CIFAR10_FLAGS, **{name: 4000}))


def test_rescaled_timesteps_feed_the_network_t_times_1000_over_steps():
    torch.manual_seed(2)
    model = create_unet({"image_size": 32, "num_channels": 32, "num_res_blocks": 1, "channel_mult": [1, 2],
                         "attention_resolutions": []}).eval()
    perturb(model)  # fresh models zero their residual outputs, which would hide the timestep
    x0, noise = torch.rand(1, 3, 32, 32) * 2 - 1, torch.randn(1, 3, 32, 32)
    improved = Diffusion("cosine", 4000, rescale_timesteps=True)
    features = feature_maps(model, improved, x0, t_steps=[400], blocks=[1], noise=noise)
    noisy = improved.q_sample(x0, torch.tensor([400]), noise)
    with torch.no_grad():
        _, (direct,) = model(noisy, torch.tensor([100.0]), return_blocks=[1])
        _, (unscaled,) = model(noisy, torch.tensor([400]), return_blocks=[1])
    upsampled = F.interpolate(direct, size=(32, 32), mode="bilinear", align_corners=False)
    assert (features - upsampled).abs().max() < 1e-6
    assert (features - F.interpolate(unscaled, size=(32, 32), mode="bilinear", align_corners=False)).abs().max() > 1e-3
    # at 1000 steps the two conventions agree, so guided-diffusion checkpoints are unaffected
    guided, rescaled = Diffusion("linear", 1000), Diffusion("linear", 1000, rescale_timesteps=True)
    assert torch.equal(feature_maps(model, guided, x0, t_steps=[50], blocks=[1], noise=noise),
                       feature_maps(model, rescaled, x0, t_steps=[50], blocks=[1], noise=noise))

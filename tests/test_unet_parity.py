"""Parity with OpenAI guided-diffusion and ddpm-segmentation on the shared reference fixtures."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from pipeline.config import params_from_dict
from pipeline.diffusion.gaussian import Diffusion
from pipeline.diffusion.unet import (
    ModelFlagsError,
    check_state_dict,
    config_from_flags,
    create_unet,
    load_guided_diffusion,
)
from pipeline.features.activations import feature_dim, images_per_batch, pixel_features
from pipeline.presets import PAPER_BLOCKS, PAPER_T_STEPS

TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def tiny(reference):
    meta = json.loads((reference / "tiny32.json").read_text())
    model = load_guided_diffusion(reference / "tiny32.pt", meta["model_flags"])
    return model, meta, np.load(reference / "tiny32.npz")


def test_schedule_and_q_sample_match_reference(tiny):
    _, _, arrays = tiny
    diffusion = Diffusion("linear", 1000)
    np.testing.assert_allclose(diffusion.alphas_cumprod, arrays["alphas_cumprod"], rtol=0, atol=1e-12)
    for t in (50, 150, 250):
        noisy = diffusion.q_sample(torch.from_numpy(arrays["x0"]), torch.full((2,), t), torch.from_numpy(arrays["noise"]))
        assert (noisy - torch.from_numpy(arrays[f"x_t{t}"])).abs().max() <= TOLERANCE


@pytest.mark.parametrize("t", [50, 150, 250])
def test_every_decoder_block_and_output_match_reference(tiny, t):
    model, meta, arrays = tiny
    assert model.num_decoder_blocks == meta["num_output_blocks"]
    assert [list(s) for s in model.decoder_block_shapes()] == [meta["output_block_shapes"][str(i)] for i in range(9)]
    x_t = torch.from_numpy(arrays[f"x_t{t}"])
    with torch.no_grad():
        output, blocks = model(x_t, torch.full((2,), t), return_blocks=list(range(9)))
        assert output is None  # stops after the last requested block
        full = model(x_t, torch.full((2,), t))
    assert (full - torch.from_numpy(arrays[f"out_t{t}"])).abs().max() <= TOLERANCE
    for index, block in enumerate(blocks):
        assert (block - torch.from_numpy(arrays[f"block{index}_t{t}"])).abs().max() <= TOLERANCE, index


def test_pixel_features_match_reference(tiny):
    model, meta, arrays = tiny
    extraction = meta["extraction"]
    features = pixel_features(model, torch.from_numpy(arrays["x0"]), t_steps=extraction["steps"],
                              blocks=extraction["blocks"], noise=torch.from_numpy(arrays["noise"]))
    assert features.shape == (2 * 32 * 32, meta["feature_dim"])
    assert (features - torch.from_numpy(arrays["pixel_features"])).abs().max() <= TOLERANCE


def test_string_and_list_flags_build_the_same_network(tiny):
    model, meta, _ = tiny
    as_lists = dict(meta["model_flags"], channel_mult=[1, 2, 2], attention_resolutions=[16, 8])
    other = create_unet(as_lists)
    assert {k: v.shape for k, v in other.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}
    assert sum(p.numel() for p in model.parameters()) == meta["param_count"]


def test_paper_256_configuration_matches_keys_shapes_and_feature_dim(reference):
    paper = json.loads((reference / "adm256_paper_keys.json").read_text())
    with torch.device("meta"):
        model = create_unet(paper["model_flags"])  # channel_mult "" -> the 256 default
    shapes = {key: list(value.shape) for key, value in model.state_dict().items()}
    assert shapes == paper["state_dict_shapes"]
    assert sum(p.numel() for p in model.parameters()) == paper["num_parameters"]
    assert [list(s) for s in model.decoder_block_shapes()] == [paper["output_block_shapes"][str(i)] for i in range(18)]
    assert feature_dim(model, [5, 6, 7, 8, 12], num_steps=3) == paper["paper_feature_dim_blocks_5_6_7_8_12_steps_50_150_250"] == 8448


def test_adm256_preset_is_the_reference_paper_model_with_8448_features(reference):
    """ddpm.preset: adm256 with blocks: null is the paper's setup (built on the meta device: no 2.2 GB)."""
    paper = json.loads((reference / "adm256_paper_keys.json").read_text())
    params = params_from_dict({"ddpm": {"preset": "adm256"}, "dataset": {"name": "ffhq_34"}, "blocks": None})
    config = params.unet_config()
    # The reference file was made with use_fp16 false; the paper ran these checkpoints with use_fp16 true.
    assert config.use_fp16 and dataclasses.replace(config, use_fp16=False) == config_from_flags(paper["model_flags"])
    assert params.blocks == tuple(PAPER_BLOCKS) == (5, 6, 7, 8, 12) and params.t_steps == tuple(PAPER_T_STEPS)
    with torch.device("meta"):
        model = create_unet(config)
    assert {key: list(value.shape) for key, value in model.state_dict().items()} == paper["state_dict_shapes"]
    assert feature_dim(model, params.blocks, num_steps=len(params.t_steps)) == 8448
    # Extraction batches at 256²: 0.74 GB of float32 maps per image and step, so 2 images per batch.
    assert images_per_batch(params.features.batch_size, 256, feature_dim(model, params.blocks)) == 2
    assert images_per_batch(16, 32, 192) == 16 and images_per_batch(16, 512, 8448) == 1


def test_mismatched_learn_sigma_names_the_flag(reference, tmp_path):
    meta = json.loads((reference / "tiny32.json").read_text())
    with pytest.raises(ModelFlagsError, match=r"learn_sigma: out.2.weight has 6 output channels; set ddpm.model.learn_sigma: true"):
        load_guided_diffusion(reference / "tiny32.pt", dict(meta["model_flags"], learn_sigma=False))


def test_mismatched_num_channels_names_the_flag(reference):
    meta = json.loads((reference / "tiny32.json").read_text())
    with pytest.raises(ModelFlagsError, match=r"num_channels"):
        load_guided_diffusion(reference / "tiny32.pt", dict(meta["model_flags"], num_channels=64))


def test_block_out_of_range_is_a_clear_error(tiny):
    model, _, arrays = tiny
    with pytest.raises(ValueError, match=r"blocks contains 9, but this model has decoder blocks 0..8"):
        pixel_features(model, torch.from_numpy(arrays["x0"]), t_steps=[50], blocks=[9], noise=torch.from_numpy(arrays["noise"]))


def test_class_cond_is_refused():
    with pytest.raises(ModelFlagsError, match="class_cond"):
        create_unet({"image_size": 32, "num_channels": 32, "class_cond": True})


def test_fp16_checkpoint_loads_and_matches(reference, tmp_path, tiny):
    model, meta, arrays = tiny
    state = torch.load(reference / "tiny32.pt", weights_only=True)
    half = tmp_path / "fp16.pt"
    torch.save({key: value.half() for key, value in state.items()}, half)
    loaded = load_guided_diffusion(half, meta["model_flags"])
    assert all(value.dtype == torch.float32 for value in loaded.state_dict().values())
    x_t = torch.from_numpy(arrays["x_t50"])
    with torch.no_grad():
        _, ours = loaded(x_t, torch.full((2,), 50), return_blocks=[4])
        _, full = model(x_t, torch.full((2,), 50), return_blocks=[4])
    # Only the float16 rounding of the weights (relative 2^-11) differs; measured 4.4e-4 of the block's
    # max |value|, so 2^-9 (1.95e-3) would catch a wrong weight or a lost bias.
    assert (ours[0] - full[0]).abs().max() <= 2.0**-9 * full[0].abs().max()


@pytest.mark.parametrize("size", [64, 128])
def test_other_resolutions_extract_with_computed_feature_dim(size):
    torch.manual_seed(0)
    model = create_unet({"image_size": size, "num_channels": 32, "num_res_blocks": 1,
                         "attention_resolutions": [], "channel_mult": ""}).eval()
    blocks = [1, model.num_decoder_blocks - 1]
    noise = torch.randn(1, 3, size, size)
    x0 = torch.rand(1, 3, size, size) * 2 - 1
    features = pixel_features(model, x0, t_steps=[50], blocks=blocks, noise=noise)
    assert features.shape == (size * size, feature_dim(model, blocks))
    # Row r is pixel (r // size, r % size), its columns each block's channels upsampled to the image: an
    # independent bilinear upsampling of the blocks, read at a few pixels.
    x_t = Diffusion("linear", 1000).q_sample(x0, torch.tensor([50]), noise)
    with torch.no_grad():
        _, activations = model(x_t, torch.tensor([50]), return_blocks=blocks)
    maps = torch.cat([torch.nn.functional.interpolate(a, size=(size, size), mode="bilinear", align_corners=False)
                      for a in activations], dim=1)[0]
    assert activations[0].shape[-1] < size  # block 1 is coarser than the image: upsampling is tested
    for row, column in ((0, 0), (0, size - 1), (size - 1, 3), (size // 2, size // 3)):
        torch.testing.assert_close(features[row * size + column], maps[:, row, column], rtol=0, atol=1e-6)


@pytest.mark.parametrize("size", [256, 512])
def test_large_resolutions_build_with_guided_diffusion_defaults(size):
    with torch.device("meta"):
        model = create_unet({"image_size": size, "num_channels": 64, "channel_mult": "", "attention_resolutions": "32,16,8",
                             "num_head_channels": 64})
    shapes = model.decoder_block_shapes()
    assert shapes[-1][1:] == (size, size) and shapes[0][1:] == (size // 2 ** (len(shapes) // 3 - 1),) * 2


def test_paper_weights_with_the_digits_preset_point_at_ddpm_preset(reference):
    paper = json.loads((reference / "adm256_paper_keys.json").read_text())
    weights = {key: torch.empty(shape, device="meta") for key, shape in paper["state_dict_shapes"].items()}
    digits = params_from_dict({"dataset": {"name": "ffhq_34"}})  # ddpm.preset: digits, the default
    with torch.device("meta"):
        model = create_unet(digits.unet_config())
    with pytest.raises(ModelFlagsError, match=r"most likely wrong flag: these are the paper's 256x256 guided-diffusion "
                                              r"weights: set ddpm.preset: adm256 \(and drop"):
        check_state_dict(model, weights, "checkpoint models/ffhq.pt")
    tiny = torch.load(reference / "tiny32.pt", weights_only=True)  # other weights keep the per-flag hints
    with pytest.raises(ModelFlagsError, match=r"most likely wrong flag: learn_sigma"):
        check_state_dict(create_unet(digits.unet_config()), tiny, "checkpoint tiny32.pt")

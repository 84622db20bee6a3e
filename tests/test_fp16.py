"""ddpm.model.use_fp16 as guided-diffusion runs it: conv weights of the blocks in float16, the timestep
embedding, normalisation, softmax and output head in float32; float16 on CUDA, float32 plus one warning
on a CPU."""
from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from pipeline.config import FeaturesConfig
from pipeline.data.images import to_model_input
from pipeline.diffusion.gaussian import Diffusion
from pipeline.diffusion.train import save_checkpoint
from pipeline.diffusion.unet import GroupNorm32, for_inference, load_guided_diffusion
from pipeline.features.activations import feature_maps, make_noise
from pipeline.features.compute import features_for_images
from pipeline.features.extraction import loaded_model
from pipeline.features.upsample import upsample_concat

# Tolerance of a float16 forward against the float32 reference, relative to each block's scale. float16
# keeps 11 significant bits (spacing 2^-10 of a value's magnitude), and every conv of the ~30 layers rounds
# its input and weights to it; measured on the tiny32 reference at t = 50, 150, 250 on this CPU (torch
# 2.13): max |error| <= 1.16e-3 x the block's max |value| (about one float16 spacing of the largest
# value) and relative L2 error <= 7.3e-4. The bounds allow 4 spacings (2^-8) and ~2.7x the L2 error.
MAX_ERROR_OF_SCALE = 2.0**-8
RELATIVE_L2 = 2e-3
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.fixture(scope="module")
def tiny(reference):
    meta = json.loads((reference / "tiny32.json").read_text())
    return reference, dict(meta["model_flags"], use_fp16=True), np.load(reference / "tiny32.npz")


def relative_errors(ours: torch.Tensor, reference: torch.Tensor) -> tuple[float, float]:
    difference = ours.float().cpu() - reference
    return ((difference.abs().max() / reference.abs().max()).item(),
            (torch.linalg.norm(difference) / torch.linalg.norm(reference)).item())


def test_convert_to_fp16_converts_the_blocks_convs_and_nothing_else(tiny):
    reference, flags, _ = tiny
    model = load_guided_diffusion(reference / "tiny32.pt", flags)
    assert model.dtype == torch.float32  # loading never converts: checkpoints and training stay float32
    model.convert_to_fp16()
    assert model.dtype == torch.float16
    convs = [m for part in (model.input_blocks, model.middle_block, model.output_blocks)
             for m in part.modules() if isinstance(m, (nn.Conv1d, nn.Conv2d))]
    assert len(convs) > 20 and all(c.weight.dtype == c.bias.dtype == torch.float16 for c in convs)
    kept = [model.time_embed, model.out] + [m for m in model.modules() if isinstance(m, (nn.Linear, GroupNorm32))]
    assert all(p.dtype == torch.float32 for module in kept for p in module.parameters())
    model.convert_to_fp32()
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_half_weights_load_from_an_fp32_checkpoint(tiny):
    reference, flags, _ = tiny
    state = torch.load(reference / "tiny32.pt", weights_only=True)
    assert {value.dtype for value in state.values()} == {torch.float32}  # as the paper's .pt files
    converted = load_guided_diffusion(reference / "tiny32.pt", flags).convert_to_fp16()
    # Also the other order: load the float32 state dict into an already converted model.
    preconverted = load_guided_diffusion(reference / "tiny32.pt", flags).convert_to_fp16()
    preconverted.load_state_dict(state)
    for model in (converted, preconverted):
        loaded = model.state_dict()
        assert loaded.keys() == state.keys()
        for key, value in state.items():
            expected = value.half() if loaded[key].dtype == torch.float16 else value
            assert torch.equal(loaded[key], expected), key
    assert sum(v.dtype == torch.float16 for v in converted.state_dict().values()) > 40


def fp16_forward_matches_fp32(tiny, device: str) -> None:
    reference, flags, arrays = tiny
    model = load_guided_diffusion(reference / "tiny32.pt", flags)
    model = for_inference(model, device) if device == "cuda" else model.convert_to_fp16()
    assert model.dtype == torch.float16
    images = 1 if device == "cpu" else 2  # CPU float16 convs are slow; one image keeps this test short
    timesteps = {t: torch.full((images,), t, device=device) for t in (50, 250)}
    x_t = {t: torch.from_numpy(arrays[f"x_t{t}"][:images]).to(device) for t in timesteps}
    with torch.no_grad():
        output = model(x_t[250], timesteps[250])
    assert output.dtype == torch.float32  # the head runs on h cast back to the input's dtype
    max_error, l2_error = relative_errors(output, torch.from_numpy(arrays["out_t250"][:images]))
    assert max_error <= MAX_ERROR_OF_SCALE and l2_error <= RELATIVE_L2, (max_error, l2_error)
    for t in timesteps:
        with torch.no_grad():
            _, blocks = model(x_t[t], timesteps[t], return_blocks=list(range(9)))
        for index, block in enumerate(blocks):
            assert block.dtype == torch.float16
            max_error, l2_error = relative_errors(block, torch.from_numpy(arrays[f"block{index}_t{t}"][:images]))
            # > 0: the blocks really ran in half precision (a float32 run matches to ~1e-7)
            assert 0 < max_error <= MAX_ERROR_OF_SCALE and l2_error <= RELATIVE_L2, (t, index, max_error, l2_error)


def test_fp16_forward_on_cpu_matches_the_fp32_reference(tiny):
    # torch 2.13's CPU kernels run the converted model (conv, group_norm, softmax in float16), only slower
    # than float32, so the half-precision maths is checked here; the pipeline runs CPUs in float32.
    fp16_forward_matches_fp32(tiny, "cpu")


@CUDA
def test_fp16_forward_on_cuda_matches_the_fp32_reference(tiny):
    fp16_forward_matches_fp32(tiny, "cuda")


def test_on_cpu_use_fp16_runs_float32_with_one_warning_naming_the_flag(tiny, tmp_path):
    reference, flags, arrays = tiny
    path = tmp_path / "fp16.pt"
    save_checkpoint(path, load_guided_diffusion(reference / "tiny32.pt", flags), Diffusion("linear", 1000), {"kind": "test"})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model, _ = loaded_model(str(path), "cpu")
        again, _ = loaded_model(str(path), "cpu")  # every task of a process reuses the loaded model
    assert again is model and model.dtype == torch.float32
    flagged = [str(w.message) for w in caught if "ddpm.model.use_fp16" in str(w.message)]
    assert len(flagged) == 1 and "float32" in flagged[0], [str(w.message) for w in caught]
    plain = load_guided_diffusion(reference / "tiny32.pt", dict(flags, use_fp16=False))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for_inference(plain, "cpu")  # no flag, no warning
    x_t = torch.from_numpy(arrays["x_t50"])
    with torch.no_grad():
        _, ours = model(x_t, torch.full((2,), 50), return_blocks=[4])
        _, expected = plain(x_t, torch.full((2,), 50), return_blocks=[4])
    assert torch.equal(ours[0], expected[0])  # really float32, the same numbers as without the flag


def test_features_of_the_fp16_model_reach_the_store_as_float16_rows(tiny):
    reference, flags, arrays = tiny
    fp32 = load_guided_diffusion(reference / "tiny32.pt", flags)
    fp16 = load_guided_diffusion(reference / "tiny32.pt", flags).convert_to_fp16()
    diffusion = Diffusion("linear", 1000)
    x0, noise = torch.from_numpy(arrays["x0"][:1]), torch.from_numpy(arrays["noise"])
    half_maps = [torch.ones(1, 4, 8, 8, dtype=torch.float16)]
    assert upsample_concat(half_maps, 32, "bilinear").dtype == torch.float32  # float16 activations upsample in float32
    image = ((x0[0].permute(1, 2, 0) + 1) * 127.5).round().to(torch.uint8).numpy()  # x0 as an image file holds it
    x0 = to_model_input(image[None])
    options = FeaturesConfig(noise_seed=0)
    ((index, rows),) = features_for_images(fp16, diffusion, [image], options=options, t_steps=[50], blocks=[2, 5, 8],
                                           split="test", indices=[7])
    noise = make_noise(0, 32)
    assert index == 7 and rows.dtype == torch.float16 and rows.shape == (32 * 32, 64 + 64 + 32)
    expected = feature_maps(fp32, diffusion, x0, t_steps=[50], blocks=[2, 5, 8], noise=noise)
    max_error, l2_error = relative_errors(rows, expected.permute(0, 2, 3, 1).reshape(32 * 32, -1))
    assert max_error <= MAX_ERROR_OF_SCALE and l2_error <= RELATIVE_L2, (max_error, l2_error)

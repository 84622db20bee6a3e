"""features.representation: swav: SwAV's Sinkhorn codes and swapped prediction, its pretraining (resumable),
the paper's hooked blocks through the one feature path, its params refused with the key named, and a store of
it that fit reads unchanged."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

from pipeline.config import ConfigError, SwavConfig, params_from_dict
from pipeline.ensemble.files import load_ensemble
from pipeline.features.record import fit_record
from pipeline.features.store import open_store
from pipeline.hashing import file_sha256
from pipeline.selfsup.swav import (
    block_maps,
    block_shapes,
    hooked_blocks,
    load_swav,
    save_swav,
    sinkhorn,
    swapped_prediction_loss,
    train_swav,
    unused_checkpoint,
)
from tests.helpers import (
    assert_feature_path_upsamples,
    assert_placeholder_is_constant_and_refused,
    make_project,
    run_here,
)

TINY = SwavConfig(embedding_size=8, hidden_sizes=(8, 16), depths=(1, 3), projection_hidden=16, projection_dim=8,
                  prototypes=6, local_crops=2, steps=6, batch_size=8, warmup_steps=2, freeze_prototypes_steps=2,
                  state_every=2)
TINY_PARAMS = {key: value for key, value in TINY.model_dump().items()}
IMAGES = (np.random.default_rng(0).random((24, 16, 16, 3)) * 255).astype(np.uint8)
CPU = torch.device("cpu")


def tiny_backbone(tmp_path, steps: int = 0):
    config = TINY.model_copy(update={"steps": steps})
    backbone, _ = train_swav(config, 16, IMAGES, device=CPU)
    save_swav(tmp_path / "swav.pt", backbone, config, 16, {"kind": "test"})
    return load_swav(tmp_path / "swav.pt")


def test_sinkhorn_codes_are_distributions_that_spread_the_batch_equally_over_the_prototypes():
    scores = torch.rand(12, 4, generator=torch.Generator().manual_seed(0)) * 2 - 1  # cosine similarities
    codes = sinkhorn(scores, epsilon=0.05, iterations=50)
    torch.testing.assert_close(codes.sum(dim=1), torch.ones(12))  # each image's code is a distribution
    torch.testing.assert_close(codes.sum(dim=0), torch.full((4,), 3.0), atol=0.02, rtol=0)  # 12 images / 4 prototypes
    lopsided = torch.zeros(12, 4)
    lopsided[:, 0] = 1  # every image prefers prototype 0: the codes still use all four
    assert (sinkhorn(lopsided, 0.05, 3).sum(dim=0) > 2).all()
    torch.testing.assert_close(sinkhorn(scores, 0.05, 3), sinkhorn(scores + 7, 0.05, 3))  # a shift changes nothing


def test_the_swapped_prediction_is_each_global_crop_s_codes_predicted_by_every_other_crop():
    generator = torch.Generator().manual_seed(1)
    scores = torch.randn(4 * 5, 6, generator=generator, requires_grad=True)  # 2 global + 2 local crops of 5 images
    loss = swapped_prediction_loss(scores, 5, 2, TINY)
    views = scores.detach().split(5)
    expected = 0.0
    for code_view in (0, 1):
        codes = sinkhorn(views[code_view], TINY.sinkhorn_epsilon, TINY.sinkhorn_iterations)
        others = [view for view in range(4) if view != code_view]
        expected += sum(-(codes * F.log_softmax(views[v] / TINY.temperature, dim=1)).sum(1).mean() for v in others) / 3
    torch.testing.assert_close(loss, expected / 2)
    loss.backward()  # the codes are targets: no gradient flows through Sinkhorn
    assert scores.grad is not None and torch.isfinite(scores.grad).all()


def test_the_hooked_blocks_are_every_other_residual_block_of_each_stage(tmp_path):
    model = tiny_backbone(tmp_path)
    stages = [list(stage.layers) for stage in model.encoder.stages]
    assert hooked_blocks(model) == [stages[0][0], stages[1][0], stages[1][2]]
    assert block_shapes(model, [0, 1, 2]) == [(8, 4), (16, 2), (16, 2)]  # a 1/4 stem, then stage 2 halves
    x0 = torch.from_numpy(IMAGES[:2]).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        maps = block_maps(model, x0, [2, 0])
        stage_outputs = model(pixel_values=x0, output_hidden_states=True).hidden_states
    torch.testing.assert_close(maps[0], stage_outputs[2])  # stage 2's last block is its output
    torch.testing.assert_close(maps[1], stage_outputs[1])  # stage 1 has one block
    with pytest.raises(ConfigError, match=r"SwAV feature block\(s\) \[3\].*0 to 2"):
        block_maps(model, x0, [3])


def test_the_feature_path_gives_the_block_maps_bilinearly_upsampled(tmp_path):
    model = tiny_backbone(tmp_path, steps=2)
    assert_feature_path_upsamples(model, "swav", IMAGES[:3], block_maps, [1, 0], 24)


def test_pretraining_learns_and_a_run_killed_after_a_state_resumes_to_the_unbroken_checkpoint(tmp_path):
    torch.set_num_threads(1)
    whole, whole_history = train_swav(TINY, 16, IMAGES, device=CPU)
    (tmp_path / "unbroken").mkdir()
    save_swav(tmp_path / "unbroken" / "swav.pt", whole, TINY, 16, {"kind": "test"})
    untrained, _ = train_swav(TINY.model_copy(update={"steps": 0}), 16, IMAGES, device=CPU)
    assert not all(torch.equal(a, b) for a, b in zip(whole.state_dict().values(), untrained.state_dict().values()))

    state = tmp_path / "swav.pt.state"

    def killed_at_5(step, _):
        if step == 5:
            raise KeyboardInterrupt  # as a kill: after the state of step 4, before the end
    with pytest.raises(KeyboardInterrupt):
        train_swav(TINY, 16, IMAGES, device=CPU, on_step=killed_at_5, state_path=state, fingerprint="run")
    assert torch.load(state, weights_only=True)["step"] == 4
    torch.manual_seed(123)  # a new process's global generator: each step's crops are seeded from (seed, step)
    resumed, history = train_swav(TINY, 16, IMAGES, device=CPU, state_path=state, fingerprint="run")
    save_swav(tmp_path / "swav.pt", resumed, TINY, 16, {"kind": "test"})
    assert history == whole_history and len(history) == 6
    assert (tmp_path / "swav.pt").read_bytes() == (tmp_path / "unbroken" / "swav.pt").read_bytes()


@pytest.mark.parametrize("override, message", [
    ({"swav": {"depths": [2, 2, 2]}}, r"swav.hidden_sizes \[32, 64, 128, 256\] and swav.depths \[2, 2, 2\]"),
    ({"swav": {"local_crop_scale": 0.2}}, r"swav.local_crop_scale=0.2 must be below swav.global_crop_scale=0.14"),
    ({"swav": {"global_crop_scale": 1.0}}, r"swav.global_crop_scale"),
    ({"swav": {"local_crop_size": 40}}, r"swav.local_crop_size=40 is larger than dataset.image_size=32"),
    ({"swav": {"batch_size": 1}}, r"swav.batch_size=1"),
    ({"swav": {"layer_type": "wide"}}, r"swav.layer_type"),
    ({"swav": {"temperature": 0}}, r"swav.temperature"),
    ({"features": {"representation": "swav"}, "swav": {"depths": [1, 1, 1], "hidden_sizes": [8, 8, 8]}},
     r"blocks \[0, 1, 2, 3\] .* block\(s\) \[3\], .* SwAV's .* 0 to 2; .*swav.depths"),
    ({"features": {"representation": "swav", "store_blocks": [0, 1, 5]}, "blocks": [0, 1]},
     r"features.store_blocks \[0, 1, 5\] .* block\(s\) \[5\]"),
    ({"features": {"representation": "swav", "layout": "native"}}, r"features.layout=native .* SwAV's block outputs"),
])
def test_bad_swav_params_are_refused_naming_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        params_from_dict(override)


def test_the_default_swav_blocks_are_the_paper_s_hooks_and_its_params_are_ignored_by_other_representations():
    assert params_from_dict({"features": {"representation": "swav"}}).swav.feature_blocks() == 4  # blocks [0..3]
    assert params_from_dict({"swav": {"depths": [1], "hidden_sizes": [8]}, "blocks": [0, 1]}).blocks == (0, 1)


def test_the_unused_placeholder_is_the_same_bytes_whatever_the_params(tmp_path):
    assert_placeholder_is_constant_and_refused(tmp_path, unused_checkpoint, load_swav, "swav")


@pytest.fixture(scope="module")
def swav_run(tmp_path_factory):
    """A SwAV project: the pretrain_swav stage, its extract@50 store and the ensemble fit reads from it."""
    root = tmp_path_factory.mktemp("swav")
    project = make_project(root, {"features.representation": "swav", "t_steps": [50], "blocks": [0, 2],
                                  "features.store_blocks": [0, 1, 2], "dataset.unlabeled_images": 16,
                                  "swav": {**TINY_PARAMS, "steps": 3, "state_every": 0}})
    project.update(swav=root / "swav.pt", stores=root / "t{t}.zarr", ensemble=root / "ensemble.pt")
    run_here("pretrain_swav", "--params", project["params"], "--data", project["data"], "--out", project["swav"],
             "--curves", root / "curves")
    assert (root / "curves" / "plots" / "metrics" / "loss.tsv").is_file()
    run_here("extract", "--params", project["params"], "--t", "50", "--data", project["data"],
             "--checkpoint", project["checkpoint"], "--mae", root / "absent.pt", "--swav", project["swav"],
             "--out", root / "t50.zarr")
    run_here("fit", "--params", project["params"], "--stores", project["stores"], "--out", project["ensemble"],
             "--curves", root / "fit")
    return project


def test_a_swav_store_records_its_checkpoint_and_fit_and_the_api_read_it(swav_run):
    from pipeline.api import Segmenter

    params = params_from_dict(yaml.safe_load(swav_run["params"].read_text()))
    opened = open_store(str(swav_run["stores"]).format(t=50), {"representation": "swav"})
    assert opened.record.representation == "swav" and opened.record.checkpoint_sha256 == file_sha256(swav_run["swav"])
    assert opened.record.block_channels == (8, 16, 16) and opened.record.block_sizes == (8, 4, 4)
    assert opened.features("train").shape == (6 * 32 * 32, 40)
    assert load_ensemble(swav_run["ensemble"], fit_record(params, file_sha256(swav_run["swav"]))).dim == 24
    segmenter = Segmenter.load(params, swav_run["checkpoint"], swav_run["ensemble"], swav_checkpoint=swav_run["swav"])
    result = segmenter.predict(IMAGES[0].repeat(2, axis=0).repeat(2, axis=1))[0]  # a 32 px image
    assert result.mask.shape == (32, 32)
    with pytest.raises(ConfigError, match="the checkpoint of the pretrain_swav stage"):
        Segmenter.load(params, swav_run["checkpoint"], swav_run["ensemble"], mae_checkpoint=swav_run["swav"])

"""features.representation: mae: the ViTMAE pretraining (resumable), its features in patch-grid order through the
one feature path, its params refused with the key named, and a store of it that fit reads unchanged."""
from __future__ import annotations

import os
import sys

import numpy as np
import pytest
import torch
import yaml

from pipeline.config import ConfigError, MaeConfig, params_from_dict
from pipeline.ensemble.files import load_ensemble
from pipeline.enums import Representation
from pipeline.errors import EnsembleError
from pipeline.features.record import fit_record
from pipeline.features.store import open_store
from pipeline.hashing import file_sha256
from pipeline.selfsup.mae import encoder_tokens, load_mae, save_mae, token_maps, train_mae, unused_checkpoint
from tests.conftest import REPO
from tests.helpers import (
    assert_feature_path_upsamples,
    assert_placeholder_is_constant_and_refused,
    killed_and_resumed,
    make_project,
    run_here,
)

TINY = MaeConfig(patch_size=4, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                 decoder_hidden_size=16, decoder_num_hidden_layers=1, decoder_num_attention_heads=2,
                 decoder_intermediate_size=32, steps=6, batch_size=8, warmup_steps=2, state_every=2)
TINY_PARAMS = {key: value for key, value in TINY.model_dump().items()}
IMAGES = (np.random.default_rng(0).random((24, 16, 16, 3)) * 255).astype(np.uint8)
CPU = torch.device("cpu")


def tiny_encoder(tmp_path, steps: int = 0):
    config = TINY.model_copy(update={"steps": steps})
    encoder, _ = train_mae(config, 16, IMAGES, device=CPU)
    save_mae(tmp_path / "mae.pt", encoder, config, 16, {"kind": "test"})
    return load_mae(tmp_path / "mae.pt")


def test_a_new_mae_has_mae_s_sine_cosine_positions_in_encoder_and_decoder():
    """transformers 5.x leaves them at zero when it builds a ViTMAE from a config; without them pretraining
    collapsed to predicting zeros (pipeline.selfsup.mae._init_as_mae)."""
    from pipeline.selfsup.mae import build_pretraining_model

    model = build_pretraining_model(TINY, 16)
    for table in (model.vit.embeddings.position_embeddings, model.decoder.decoder_pos_embed):
        patches = table[0, 1:]  # [16 patches, width]; row 0 is the CLS token's
        assert not table.requires_grad and float(patches.abs().max()) == pytest.approx(1.0)
        assert torch.cdist(patches, patches).add(torch.eye(16)).min() > 0.1  # every patch its own position
    again = build_pretraining_model(TINY, 16)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))


def test_token_maps_are_one_map_per_block_on_the_patch_grid(tmp_path):
    model = tiny_encoder(tmp_path)
    assert model.config.mask_ratio == 0  # features see every patch
    maps = token_maps(model, torch.rand(3, 3, 16, 16) * 2 - 1, [0, 1])
    assert [tuple(block.shape) for block in maps] == [(3, 32, 4, 4)] * 2
    with pytest.raises(ConfigError, match=r"blocks \[0, 2\] asks for MAE encoder block\(s\) \[2\]"):
        token_maps(model, torch.zeros(1, 3, 16, 16), [0, 2])


def test_unshuffled_tokens_are_in_patch_grid_order_whatever_the_shuffle(tmp_path):
    model = tiny_encoder(tmp_path)
    x0 = torch.rand(2, 3, 16, 16) * 2 - 1
    shuffle = torch.rand(2, 16)  # ViTMAE orders the patches by argsort(noise) even at mask ratio 0
    with torch.no_grad():
        embedded, block = encoder_tokens(model, x0, [0, 2], noise=shuffle)
        # the embeddings in grid order, made directly: the patch conv's [N, C, 4, 4] output, row-major, plus positions
        grid = model.embeddings.patch_embeddings.projection(x0).flatten(2).transpose(1, 2)
        expected = grid + model.embeddings.position_embeddings[:, 1:]
        in_order = encoder_tokens(model, x0, [2])[0]
    torch.testing.assert_close(embedded, expected)
    assert not torch.equal(torch.argsort(shuffle[0]), torch.arange(16))  # the shuffle did move patches
    torch.testing.assert_close(block, in_order, atol=1e-5, rtol=1e-5)  # the blocks' tokens do not depend on it


def test_the_feature_path_gives_the_token_maps_bilinearly_upsampled(tmp_path):
    model = tiny_encoder(tmp_path)
    assert_feature_path_upsamples(model, "mae", IMAGES[:3], token_maps, [1, 0], 64)


def test_pretraining_killed_after_a_state_resumes_to_the_unbroken_checkpoint(tmp_path):
    torch.set_num_threads(1)
    whole, whole_history = train_mae(TINY, 16, IMAGES, device=CPU)
    (tmp_path / "unbroken").mkdir()
    save_mae(tmp_path / "unbroken" / "mae.pt", whole, TINY, 16, {"kind": "test"})

    state = tmp_path / "mae.pt.state"

    def killed_at_5(step, _):
        if step == 5:
            raise KeyboardInterrupt  # as a kill: after the state of step 4, before the end
    with pytest.raises(KeyboardInterrupt):
        train_mae(TINY, 16, IMAGES, device=CPU, on_step=killed_at_5, state_path=state, fingerprint="run")
    assert torch.load(state, weights_only=True)["step"] == 4
    torch.manual_seed(123)  # a new process's global generator: the state restores it
    resumed, history = train_mae(TINY, 16, IMAGES, device=CPU, state_path=state, fingerprint="run")
    save_mae(tmp_path / "mae.pt", resumed, TINY, 16, {"kind": "test"})
    assert history == whole_history and len(history) == 6
    assert (tmp_path / "mae.pt").read_bytes() == (tmp_path / "unbroken" / "mae.pt").read_bytes()
    other, _ = train_mae(TINY, 16, IMAGES, device=CPU, state_path=state, fingerprint="other params")
    assert all(torch.equal(a, b) for a, b in zip(other.state_dict().values(), whole.state_dict().values()))


@pytest.mark.parametrize("override, message", [
    ({"mae": {"patch_size": 5}}, r"mae.patch_size=5 does not divide dataset.image_size=32"),
    ({"mae": {"mask_ratio": 0.0}}, r"mae.mask_ratio"),
    ({"mae": {"mask_ratio": 1.0}}, r"mae.mask_ratio"),
    ({"mae": {"hidden_size": 30}}, r"mae.hidden_size=30 is not a multiple of mae.num_attention_heads=4"),
    ({"features": {"representation": "mae"}, "mae": {"num_hidden_layers": 3}},
     r"blocks \[0, 1, 2, 3\] .* block\(s\) \[3\], .* the MAE encoder.s, .* mae.num_hidden_layers"),
    ({"features": {"representation": "mae", "store_blocks": [0, 1, 5]}, "blocks": [0, 1]},
     r"features.store_blocks \[0, 1, 5\] .* block\(s\) \[5\]"),
    ({"features": {"representation": "mae", "layout": "native"}}, r"features.layout=native .* the MAE's patch tokens"),
])
def test_bad_mae_params_are_refused_naming_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        params_from_dict(override)


def test_mae_params_are_ignored_when_the_representation_is_not_mae():
    assert params_from_dict({"mae": {"num_hidden_layers": 1}}).blocks == (0, 1, 2, 3)


def test_the_unused_placeholder_is_the_same_bytes_whatever_the_params(tmp_path):
    assert_placeholder_is_constant_and_refused(tmp_path, unused_checkpoint, load_mae, "mae")


@pytest.fixture(scope="module")
def mae_project(tmp_path_factory):
    root = tmp_path_factory.mktemp("mae")
    project = make_project(root, {"features.representation": "mae", "t_steps": [50], "blocks": [0, 1],
                                  "features.store_blocks": [0, 1], "dataset.unlabeled_images": 16,
                                  "mae": {**TINY_PARAMS, "patch_size": 8, "steps": 3, "state_every": 0}})
    project["mae"] = root / "mae.pt"
    run_here("pretrain_mae", "--params", project["params"], "--data", project["data"], "--out", project["mae"],
             "--curves", root / "curves")
    assert (root / "curves" / "plots" / "metrics" / "loss.tsv").is_file()
    return project


@pytest.fixture(scope="module")
def mae_run(mae_project, tmp_path_factory):
    """The MAE project's extract@50 store and the ensemble fit reads from it, both made by the stages."""
    root = tmp_path_factory.mktemp("mae_run")
    project = {**mae_project, "stores": root / "t{t}.zarr", "ensemble": root / "ensemble.pt"}
    run_here("extract", "--params", project["params"], "--t", "50", "--data", project["data"],
             "--checkpoint", project["checkpoint"], "--mae", project["mae"], "--out", root / "t50.zarr")
    run_here("fit", "--params", project["params"], "--stores", project["stores"], "--out", project["ensemble"],
             "--curves", root / "fit")
    return project


def test_a_mae_store_records_its_checkpoint_and_fit_reads_it_unchanged(mae_run):
    params = params_from_dict(yaml.safe_load(mae_run["params"].read_text()))
    opened = open_store(str(mae_run["stores"]).format(t=50), {"representation": "mae"})
    assert opened.record.representation == "mae" and opened.record.checkpoint_sha256 == file_sha256(mae_run["mae"])
    assert opened.record.feature_dim == 64 and opened.record.block_channels == (32, 32)
    assert opened.features("train").shape == (6 * 32 * 32, 64)
    assert load_ensemble(mae_run["ensemble"], fit_record(params, file_sha256(mae_run["mae"]))).dim == 64
    ddpm_features = params.features.model_copy(update={"representation": Representation.DDPM})
    ddpm = params.model_copy(update={"features": ddpm_features})
    with pytest.raises(EnsembleError, match=r"checkpoint_sha256 .*representation 'mae' \(asked: 'ddpm'\)"):
        load_ensemble(mae_run["ensemble"], fit_record(ddpm, file_sha256(mae_run["checkpoint"])))


def test_segment_and_the_api_vote_on_the_bytes_the_mae_store_holds(mae_run, monkeypatch):
    import pipeline.api
    from pipeline.api import Segmenter
    from pipeline.data.layout import Split, list_examples
    from pipeline.features.record import params_record
    from pipeline.features.store import lazy_matrix

    params = params_from_dict(yaml.safe_load(mae_run["params"].read_text()))
    store = open_store(str(mae_run["stores"]).format(t=50), params_record(params, 50))
    stored = lazy_matrix([store], "test", params.blocks)[0].compute()
    segmenter = Segmenter.load(params, mae_run["checkpoint"], mae_run["ensemble"], mae_run["mae"])
    seen = []

    def keep(model, matrix, **options):
        seen.append(np.asarray(matrix.compute()))
        return np.zeros(matrix.shape[0], np.uint8), np.zeros(matrix.shape[0], np.float32)

    monkeypatch.setattr(pipeline.api, "vote", keep)
    files = [example.image_path for example in list_examples(mae_run["data"], Split.TEST)]
    assert len(segmenter.predict(files)) == len(files) == 4
    assert np.concatenate(seen).tobytes() == stored.tobytes()
    with pytest.raises(ConfigError, match="the checkpoint of the pretrain_mae stage"):
        Segmenter.load(params, mae_run["checkpoint"], mae_run["ensemble"])


def test_the_stage_writes_the_placeholder_when_the_representation_is_not_mae(mae_project, tmp_path):
    data = yaml.safe_load(mae_project["params"].read_text())
    data["features"]["representation"] = "ddpm"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(data))
    run_here("pretrain_mae", "--params", tmp_path / "params.yaml", "--data", mae_project["data"],
             "--out", tmp_path / "mae.pt", "--curves", tmp_path / "curves")
    (tmp_path / "unused").mkdir()
    unused_checkpoint(tmp_path / "unused" / "mae.pt")
    assert (tmp_path / "mae.pt").read_bytes() == (tmp_path / "unused" / "mae.pt").read_bytes()
    assert not (tmp_path / "curves" / "plots").exists()


@pytest.mark.slow
def test_the_stage_killed_mid_training_resumes_to_a_byte_identical_checkpoint(mae_project, tmp_path):
    params = tmp_path / "params.yaml"
    data = yaml.safe_load(mae_project["params"].read_text())
    data["mae"].update({"steps": 40, "state_every": 10})
    params.write_text(yaml.safe_dump(data))
    env = dict(os.environ, PYTHONPATH=str(REPO), DDPM_SEG_THREADS="1")

    def command(out):
        return [sys.executable, "-m", "stages.pretrain_mae", "--params", str(params), "--data",
                str(mae_project["data"]), "--out", str(out), "--curves", str(out.with_suffix(".curves"))]

    whole = tmp_path / "unbroken" / "mae.pt"  # torch.save records the file's name in its archive
    whole.parent.mkdir()
    run_here("pretrain_mae", *command(whole)[3:])  # the unbroken run in this process, one thread as the stage's
    out, state = tmp_path / "mae.pt", tmp_path / "mae.pt.state"
    killed_and_resumed(command(out), out, state, env)
    assert out.read_bytes() == whole.read_bytes() and not state.exists()

"""The real pipeline on other inputs, in its own temporary copy of the repository (so that pytest-xdist runs it beside
tests/test_pipeline_e2e.py): a dataset in the paper's layout with an imported guided-diffusion checkpoint, the MAE
representation, and a stage's refusal of bad params."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import yaml
import zarr
from PIL import Image

from tests.e2e import ALL_STAGES, DVC, make_workspace, run, settings_args, stages_run

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return make_workspace(tmp_path_factory)


def test_stage_rejects_bad_params_with_a_clear_message(workspace):
    root, env = workspace
    bad = yaml.safe_load((root / "params.yaml").read_text())
    bad["ensemble"]["learning_rate"] = 0.1
    path = root / "bad_params.yaml"
    path.write_text(yaml.safe_dump(bad))
    result = subprocess.run([sys.executable, "-m", "stages.fit", "--params", str(path), "--stores", "features/t{t}.zarr",
                             "--out", "x.pt", "--curves", "x"], cwd=root, env=env, capture_output=True, text=True)
    assert result.returncode == 2
    assert "unknown params key(s) ensemble.learning_rate" in result.stderr and "Traceback" not in result.stderr
    assert not (root / "x.pt").exists()


def test_paper_layout_dataset_with_an_imported_guided_diffusion_checkpoint(workspace, reference):
    root, env = workspace
    rng = np.random.default_rng(0)
    dataset = root / "data" / "datasets" / "mini"
    for split, count in (("train", 3), ("test", 2)):
        folder = dataset / "real" / split
        folder.mkdir(parents=True)
        for index in range(count):
            mask = np.zeros((32, 32), np.uint8)
            top, left = rng.integers(0, 16, size=2)
            mask[top : top + 12, left : left + 12] = 1 + index % 2
            mask[top, left : left + 12] = 255
            image = np.stack([mask * 100, 255 - mask * 100, rng.integers(0, 40, (32, 32))], -1).astype(np.uint8)
            Image.fromarray(image).save(folder / f"{split}{index}.png")
            np.save(folder / f"{split}{index}.npy", mask)
    shutil.copy(reference / "tiny32.pt", root / "models" / "mini.pt")
    run(["git", "add", "-A"], root, env)
    run(["git", "commit", "-qm", "add a dataset and a checkpoint"], root, env)
    settings = ["dataset.name=mini", "dataset.root=data/datasets/mini", "dataset.image_size=32",
                "dataset.num_classes=3", "dataset.train_images=2", "dataset.val_images=1", "dataset.test_images=2",
                "ddpm.checkpoint=models/mini.pt", "ddpm.model.attention_resolutions=[16,8]",
                "ddpm.model.num_head_channels=16", "ddpm.model.learn_sigma=true", "ddpm.model.dropout=0.1",
                "blocks=[2,3,4,5,6]", "features.store_blocks=[2,3,4,5,6]", "features.layout=native",
                "t_steps=[50,150,250]"]
    output = run([DVC, "exp", "run", *settings_args(settings)], root, env)
    assert stages_run(output) == ALL_STAGES
    assert "imported models/mini.pt" in output
    metrics = json.loads((root / "metrics" / "eval.json").read_text())
    assert set(metrics["per_class_iou"]) == {"class_0", "class_1", "class_2"} and metrics["images"] == 2
    # No real/val folder: the train image after the two training ones is held out for validation.
    assert json.loads((root / "metrics" / "val.json").read_text())["images"] == 1
    assert [p.name for p in (root / "data" / "prepared" / "real" / "val").glob("*.png")] == ["train2.png"]
    import torch

    checkpoint = torch.load(root / "checkpoints" / "ddpm.pt", weights_only=True)
    assert checkpoint["source"]["kind"] == "imported" and checkpoint["model_flags"]["learn_sigma"] is True
    store = zarr.open_group(root / "features" / "t50.zarr", mode="r")  # the native layout, through DVC
    assert store.attrs["record"]["layout"] == "native" and store["train/block2"].shape == (2, 64, 16, 16)


def test_the_mae_representation_runs_through_the_same_stages(workspace):
    """`dvc exp run -S features.representation=mae`: pretrain_mae trains (a tiny ViTMAE), every stage after it runs on
    the MAE's features, and the store, ensemble and robustness results say so."""
    root, env = workspace
    run(["git", "checkout", "HEAD", "--", "params.yaml"], root, env)  # the tiny digits params, whatever ran before
    settings = ["features.representation=mae", "t_steps=[50]", "mae.hidden_size=32", "mae.intermediate_size=64",
                "mae.decoder_hidden_size=16", "mae.decoder_intermediate_size=32", "mae.steps=4", "mae.batch_size=8",
                "mae.log_every=1"]
    # the stages that read the MAE's features through the store (fit, evaluate) or the feature path (robustness,
    # suggest); segment's MAE path is tests/test_mae.py's, and the DatasetDDPM stages are left out for time
    output = run([DVC, "exp", "run", *settings_args(settings), "evaluate", "robustness",
                  "suggest"], root, env)
    ran = stages_run(output)
    assert {"pretrain_mae", "extract", "fit", "evaluate", "robustness", "suggest"} <= set(ran)
    assert not {"label", "train_segnet", "kmeans", "segment"} & set(ran)
    assert "pretrain_mae: trained 4 steps" in output
    record = zarr.open_group(root / "features" / "t50.zarr", mode="r").attrs["record"]
    assert record["representation"] == "mae" and record["feature_dim"] == 4 * 32
    assert json.loads((root / "metrics" / "robustness.json").read_text())["representation"] == "mae"
    assert 0 <= json.loads((root / "metrics" / "val.json").read_text())["miou"] <= 1
    curve = pd.read_csv(root / "dvclive" / "pretrain_mae" / "plots" / "metrics" / "loss.tsv", sep="\t")
    assert list(curve["step"]) == [1, 2, 3, 4]

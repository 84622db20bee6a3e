"""The real pipeline: `dvc repro` and `dvc exp run` in a temporary copy of the repository. (Other inputs run in
tests/test_pipeline_e2e_datasets.py, on their own copy, so that pytest-xdist runs both files at once.)"""
from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
import zarr
from PIL import Image

from pipeline.data.digits import compose_digit_split, load_mnist_5k, split_digit_pools
from pipeline.ensemble.metrics import label_counts, mean_iou, mean_iou_paper, strict_confusion
from tests.conftest import REPO
from tests.e2e import ALL_STAGES, DVC, make_workspace, run, stages_run

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return make_workspace(tmp_path_factory)


def ignored_pixels(root: Path) -> int:
    """Test pixels whose truth is the ignore label (the confusion plot holds every other one)."""
    return sum(int((np.load(path) == 255).sum()) for path in (root / "data" / "prepared" / "real" / "test").glob("*.npy"))


@pytest.fixture(scope="module")
def reproduced(workspace):
    """The workspace after one `dvc repro`, committed as the baseline, so that every test that needs a finished
    run also passes alone: (root, env, the repro's output, fit's `features` hash then)."""
    root, env = workspace
    output = run([DVC, "repro"], root, env)
    run(["git", "add", "-A"], root, env)
    run(["git", "commit", "-qm", "baseline"], root, env)
    return root, env, output, fit_features_hash(root)


def test_repro_writes_metrics_plots_and_stores(reproduced):
    root, env, output, _ = reproduced
    assert stages_run(output) == ALL_STAGES
    # segment.images defaults to prepare's demo canvases (dataset.demo_images: 6)
    assert sorted(pd.read_csv(root / "segmentations" / "summary.csv")["image"]) == [f"demo_{i:05d}" for i in range(6)]
    metrics = json.loads((root / "metrics" / "eval.json").read_text())
    assert set(metrics["per_class_iou"]) == {"background", *[f"digit_{d}" for d in range(10)]}
    assert metrics["split"] == "test" and metrics["images"] == 4 and metrics["uncertainty"] >= 0
    val = json.loads((root / "metrics" / "val.json").read_text())
    assert val["split"] == "val" and val["images"] == 3 and val["pixels"] == 3 * 32 * 32
    assert sorted(p.name for p in (root / "data" / "prepared" / "real" / "val").glob("*.png")) == \
        [f"val_{i:05d}.png" for i in range(3)]
    # The written test predictions reproduce the metric: the paper's mIoU recomputed from the files.
    counts = 0
    for mask_path in sorted((root / "data" / "prepared" / "real" / "test").glob("*.npy")):
        predicted = np.asarray(Image.open(root / "predictions" / f"{mask_path.stem}.png"))
        assert predicted.shape == (32, 32) and predicted.dtype == np.uint8
        uncertainty = np.load(root / "predictions" / f"{mask_path.stem}.uncertainty.npy")
        assert uncertainty.shape == (32, 32) and (uncertainty >= -1e-6).all()
        counts = counts + label_counts(np.load(mask_path), predicted, 11)
    assert round(mean_iou_paper(counts, 255), 6) == metrics["miou"]
    assert round(mean_iou(strict_confusion(counts, 255), 255), 6) == metrics["miou_strict"]
    for path in ("plots/per_class_iou.csv", "plots/confusion.csv"):
        assert (root / path).stat().st_size > 0, path
    # dvclive's curves: every pretraining step (log_every 1 of 3 steps), both epochs of each pass of members
    # (3 members as 2 passes: members 0-1 and 2), and metrics.json holding the last point.
    pretrain = pd.read_csv(root / "dvclive" / "pretrain" / "plots" / "metrics" / "loss.tsv", sep="\t")
    assert list(pretrain["step"]) == [1, 2, 3] and (pretrain["loss"] > 0).all()
    latest = json.loads((root / "dvclive" / "pretrain" / "metrics.json").read_text())
    assert latest["step"] == 3 and latest["loss"] == pretrain["loss"].iloc[-1]
    for index in (0, 1):
        fit = pd.read_csv(root / "dvclive" / "fit" / "plots" / "metrics" / f"pass_{index}" / "loss.tsv", sep="\t")
        assert list(fit["step"]) == [1, 2] and (fit["loss"] > 0).all(), index
    # dvc.yaml's top-level plots all render with data (`dvc plots show --json`: plot id -> renderers).
    shown = subprocess.run([DVC, "plots", "show", "--json"], cwd=root, env=env,
                           capture_output=True, text=True)
    assert shown.returncode == 0, shown.stderr
    plots = json.loads(shown.stdout)
    assert "errors" not in plots, plots["errors"]  # e.g. a file the plots name that no stage wrote
    images = ("plots/overlays", "plots/corruptions.png", "plots/kmeans", "plots/samples.png", "plots/suggestions.png")
    drawn = {plot_id: renderers for plot_id, renderers in plots["data"].items() if not plot_id.startswith(images)}
    assert {plot_id: len(renderers[0]["content"]["data"]["values"]) for plot_id, renderers in drawn.items()} == {
        "DDPM pretraining loss (mean of each ddpm.train.log_every steps)": 3 * 2,  # loss and mse
        "Ensemble fit loss per epoch (mean over each pass's members still training)": 2 * 2,
        "Per-class IoU on the test split (paper protocol)": 11,
        "Confusion on the test split (a seeded sample of labeled pixels)": 4 * 32 * 32 - ignored_pixels(root),
        "Test mIoU under corruptions (robustness stage; severity 0 = clean)": 4 * 4,  # severities 0, 1, 3, 5 x 4 corruptions
        "Per-image uncertainty of the DatasetDDPM samples, least to most uncertain (label stage; kept = true)": 4,
        "DatasetDDPM segnet training loss per epoch (train_segnet; cross-entropy on the ensemble's labels of the samples)": 2,
        "DatasetDDPM segnet val mIoU per epoch (paper protocol; the best epoch is kept)": 2}
    # DatasetDDPM's network, chosen on val, scored on test beside the ensemble
    segnet = json.loads((root / "metrics" / "datasetddpm.json").read_text())
    assert segnet["split"] == "test" and segnet["images"] == 4 and segnet["synthetic_images"] == 3
    assert segnet["epoch"] in (1, 2) and segnet["epoch_chosen_on"] == "val" and 0 <= segnet["miou"] <= 1
    assert len(list((root / "plots" / "overlays").glob("*.png"))) == 2
    assert (root / "features" / "t150.zarr" / "zarr.json").is_file()


def test_segment_gives_evaluates_test_masks_and_segments_new_canvases(reproduced, tmp_path):
    root, env, *_ = reproduced
    test_images = root / "data" / "prepared" / "real" / "test"
    run([sys.executable, "-m", "stages.segment", "--images", str(test_images), "--out", str(tmp_path / "test")], root, env)
    stems = sorted(p.stem for p in test_images.glob("*.png"))
    assert len(stems) == 4
    for stem in stems:
        np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "test" / f"{stem}.png")),
                                      np.asarray(Image.open(root / "predictions" / f"{stem}.png")))
        np.testing.assert_allclose(np.load(tmp_path / "test" / f"{stem}.uncertainty.npy"),
                                   np.load(root / "predictions" / f"{stem}.uncertainty.npy"), atol=1e-4)
    # New canvases: digits of the unlabeled pool (in neither train nor test), one at twice the size.
    digits, labels = load_mnist_5k()
    pool = split_digit_pools(len(digits), seed=0)["unlabeled"]
    new = tmp_path / "new"
    new.mkdir()
    for index, (image, _) in enumerate(compose_digit_split(digits, labels, pool, 3, 32, 24, seed=99)):
        picture = Image.fromarray(image)
        (picture.resize((64, 64), Image.BICUBIC) if index == 2 else picture).save(new / f"new{index}.png")
    run([sys.executable, "-m", "stages.segment", "--images", str(new), "--out", str(tmp_path / "out")], root, env)
    for index, size in ((0, 32), (1, 32), (2, 64)):
        assert np.asarray(Image.open(tmp_path / "out" / f"new{index}.png")).shape == (size, size)
        assert np.load(tmp_path / "out" / f"new{index}.uncertainty.npy").shape == (size, size)
        assert (tmp_path / "out" / f"new{index}.overlay.png").is_file()
    assert list(pd.read_csv(tmp_path / "out" / "summary.csv")["image"]) == ["new0", "new1", "new2"]


def readme_example() -> str:
    """The Python block of the README's "Segment new images" section."""
    section = (REPO / "README.md").read_text().split("## Segment new images", 1)[1].split("\n## ", 1)[0]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_readme_api_example_runs_in_a_finished_run(reproduced):
    root, env, *_ = reproduced
    code = readme_example()
    assert len(code.strip().splitlines()) <= 5
    output = run([sys.executable, "-c", code], root, env)
    assert re.search(r"^\(32, 32\) \d\.\d+", output, re.M), output


def fit_features_hash(root: Path) -> str:
    """The hash of fit's `features` dependency as dvc.lock records it."""
    lock = yaml.safe_load((root / "dvc.lock").read_text())
    return next(dep["md5"] for dep in lock["stages"]["fit"]["deps"] if dep["path"] == "features")


def dvc_status(root: Path, env) -> dict:
    """`dvc status --json`: stale stages by name ({} when everything is up to date)."""
    result = subprocess.run([DVC, "status", "--json"], cwd=root, env=env,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_leftover_temporaries_change_no_stage_status(reproduced):
    root, env, *_ = reproduced
    features = root / "features"
    shutil.copytree(features / "t50.zarr", features / "t50.zarr.partial")  # an interrupted rewrite
    shutil.copytree(features / "t150.zarr", features / "t150.zarr.old")  # a replace cut short
    (features / "removed_steps").mkdir()
    shutil.copytree(features / "t250.zarr", features / "removed_steps" / "t450.zarr")  # a set-aside store
    try:
        assert dvc_status(root, env) == {}
    finally:
        for leftover in ("t50.zarr.partial", "t150.zarr.old", "removed_steps"):
            shutil.rmtree(features / leftover)


def test_changed_diffusion_code_makes_the_extract_stage_stale(reproduced):
    root, env, *_ = reproduced
    path = root / "pipeline" / "diffusion" / "gaussian.py"
    original = path.read_text()
    assert "def q_sample" in original
    path.write_text(original.replace("def q_sample", "def q_sample_changed_by_the_test(self):\n        return None\n\n    def q_sample", 1))
    try:
        stale = dvc_status(root, env)
    finally:
        path.write_text(original)
    assert "extract" in stale
    assert dvc_status(root, env) == {}


# Each stage's outputs, in pipeline order; the training curves too, which must hold no wall-clock values.
STAGE_OUTPUTS = {"prepare": ["data/prepared", "data/demo"], "pretrain": ["checkpoints/ddpm.pt", "dvclive/pretrain"],
                 "pretrain_mae": ["checkpoints/mae.pt", "dvclive/pretrain_mae"],
                 "pretrain_swav": ["checkpoints/swav.pt", "dvclive/pretrain_swav"],
                 "extract": ["features"],
                 "fit": ["ensemble/ensemble.pt", "dvclive/fit"],
                 "sample": ["samples/images.zarr"],
                 "label": ["data/synthetic", "metrics/label.json", "plots/sample_uncertainty.csv", "plots/samples.png"],
                 "train_segnet": ["segnet/segnet.pt", "dvclive/train_segnet"],
                 "evaluate_segnet": ["metrics/datasetddpm.json"],
                 "evaluate": ["metrics/eval.json", "metrics/val.json", "predictions", "plots/per_class_iou.csv",
                              "plots/confusion.csv"],
                 "robustness": ["metrics/robustness.json", "plots/robustness.csv", "plots/corruptions.png"],
                 "kmeans": ["plots/kmeans"],
                 "segment": ["segmentations"], "suggest": ["suggestions", "plots/suggestions.png"]}


def output_digests(root: Path) -> dict[str, str]:
    """sha256 over every file (relative name and bytes) each stage wrote."""
    digests = {}
    for stage, outputs in STAGE_OUTPUTS.items():
        digest = hashlib.sha256()
        for output in outputs:
            path = root / output
            for file in sorted(path.rglob("*")) if path.is_dir() else [path]:
                if file.is_file():
                    digest.update(str(file.relative_to(root)).encode())
                    digest.update(file.read_bytes())
        digests[stage] = digest.hexdigest()
    return digests


def test_same_params_give_the_same_metrics_twice(reproduced):
    root, env, *_ = reproduced
    first, first_digests = (root / "metrics" / "eval.json").read_text(), output_digests(root)
    shutil.rmtree(root / "features")  # extract keeps current stores (a persisted output): make it compute them
    output = run([DVC, "repro", "--force"], root, env)
    assert stages_run(output) == list(STAGE_OUTPUTS)
    # Name the first stage whose outputs changed, so a failure says where determinism broke.
    second_digests = output_digests(root)
    changed = [stage for stage in STAGE_OUTPUTS if first_digests[stage] != second_digests[stage]]
    assert not changed, f"outputs differ on the second run, first in stage {changed[0]}: {changed}"
    assert (root / "metrics" / "eval.json").read_text() == first


def test_changing_t_steps_reruns_only_what_it_affects(reproduced):
    """One more step computes that step only; back to the first steps sets it aside and nothing is stale. (Fewer
    steps, and a set-aside store taken back, are tests/test_extract_stores.py's, on the same extract code.) The
    experiment runs up to evaluate; `dvc status` names the other stages it made stale."""
    root, env, _, first_features_hash = reproduced
    more = run([DVC, "exp", "run", "-S", "t_steps=[50,150,250,350]", "evaluate"], root, env)
    # extract reruns (t_steps is its param) but computes t=350 only, keeping the three current stores
    assert stages_run(more) == ["extract", "fit", "evaluate"]
    assert "t=350: " in more and "computed" in more and more.count("is complete and current") == 3
    # every other stage that reads t_steps, and nothing else, is stale (DatasetDDPM's network follows label)
    assert sorted(dvc_status(root, env)) == ["label", "robustness", "segment", "suggest"]
    # `dvc metrics diff` compares the committed baseline's mIoU with this experiment's workspace mIoU.
    diff = subprocess.run([DVC, "metrics", "diff", "--all", "--json"], cwd=root, env=env, capture_output=True, text=True)
    miou = json.loads(diff.stdout)["metrics/eval.json"]["miou"]
    baseline = json.loads(subprocess.run(["git", "show", "HEAD:metrics/eval.json"], cwd=root, env=env,
                                         capture_output=True, text=True, check=True).stdout)["miou"]
    assert miou["old"] == baseline and miou["new"] == json.loads((root / "metrics" / "eval.json").read_text())["miou"]
    # Back to the first steps by editing params.yaml and `dvc repro`: extract sets the t350 store aside (into
    # its own folder's dvc-ignored removed_steps/), so fit's inputs hash as in the first run, its ensemble is the
    # baseline's again, and no stage of the whole pipeline is stale.
    params = yaml.safe_load((root / "params.yaml").read_text())
    (root / "params.yaml").write_text(yaml.safe_dump({**params, "t_steps": [50, 150, 250]}, sort_keys=False))
    back = run([DVC, "repro", "evaluate"], root, env)
    assert stages_run(back) == ["extract", "fit", "evaluate"] and back.count("is complete and current") == 3
    assert "t350.zarr: not a step of t_steps" in back
    assert not (root / "features" / "t350.zarr").exists()
    assert (root / "features" / "removed_steps" / "t350.zarr").is_dir()
    assert fit_features_hash(root) == first_features_hash
    assert dvc_status(root, env) == {}


def test_changing_blocks_within_the_stored_blocks_reruns_no_extract_stage(reproduced):
    root, env, *_ = reproduced
    stored = zarr.open_group(root / "features" / "t50.zarr", mode="r").attrs["record"]
    assert stored["blocks"] == [0, 1, 2, 3]  # store_blocks: null = the digits preset's blocks
    channels = dict(zip(stored["blocks"], stored["block_channels"]))
    fewer = run([DVC, "exp", "run", "-S", "blocks=[3,1]", "evaluate"], root, env)
    assert stages_run(fewer) == ["fit", "evaluate"]
    # robustness, segment and suggest compute their features from blocks themselves; kmeans has blocks of its own
    assert sorted(dvc_status(root, env)) == ["label", "robustness", "segment", "suggest"]
    import torch

    ensemble = torch.load(root / "ensemble" / "ensemble.pt", weights_only=True)
    assert ensemble["features"]["blocks"] == [3, 1] and ensemble["dim"] == 3 * (channels[3] + channels[1])
    assert json.loads((root / "metrics" / "eval.json").read_text())["images"] == 4
    # Back to every stored block: again no extract stage, the baseline's ensemble byte for byte, nothing stale.
    params = yaml.safe_load((root / "params.yaml").read_text())
    (root / "params.yaml").write_text(yaml.safe_dump({**params, "blocks": None}, sort_keys=False))
    back = run([DVC, "repro", "evaluate"], root, env)
    assert stages_run(back) == ["fit", "evaluate"]
    baseline = subprocess.run(["git", "show", "HEAD:dvc.lock"], cwd=root, env=env, capture_output=True, text=True,
                              check=True).stdout
    assert yaml.safe_load(baseline)["stages"]["fit"]["outs"] == yaml.safe_load((root / "dvc.lock").read_text())["stages"]["fit"]["outs"]
    assert dvc_status(root, env) == {}

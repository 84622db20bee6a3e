"""The analyses (docs/analyses.md) on tiny inputs: representations, noise draws, the train subset, corruptions,
k-means, the stages that run them, which stages a sweep reruns, and the report from recorded runs."""
from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import dask.array as da
import numpy as np
import pandas as pd
import pytest
import torch
import yaml
import zarr
from PIL import Image

from analyses.experiments import ANALYSES, AT_64PX, FIT_SEEDS, SWAV_STEPS, seed_of
from analyses.report import build_report
from analyses.results import datasetddpm_table, experiment_rows, sample_efficiency_table, split_table
from pipeline.analysis.corruptions import corrupt
from pipeline.analysis.kmeans import kmeans
from pipeline.api import Segmenter
from pipeline.config import ConfigError, Corruption, load_params, params_from_dict
from pipeline.data.images import read_rgb, to_model_input
from pipeline.data.layout import Split, list_examples
from pipeline.diffusion.gaussian import Diffusion
from pipeline.diffusion.unet import create_unet
from pipeline.ensemble.fit import image_rows, train_subset
from pipeline.errors import DatasetError
from pipeline.features.activations import feature_maps, make_noise, rgb_maps
from pipeline.features.compute import batch_noise
from pipeline.presets import DIGITS_MODEL_FLAGS, PRESETS
from tests.conftest import REPO
from tests.helpers import TINY_PARAMS, make_project, run_stage, write_params
from tests.test_segment import new_canvases, save_random_ensemble

FIXTURES = Path(__file__).parent / "data" / "analyses"


def test_rgb_maps_hold_each_pixels_replicate_padded_neighbourhood():
    x0 = torch.rand(2, 3, 5, 5) * 2 - 1
    maps = rgb_maps(x0, 3)
    assert maps.shape == (2, 27, 5, 5) and maps.dtype == torch.float32
    assert torch.equal(maps[:, [4, 13, 22]], x0)  # the patch centre (offset 0, 0) of each channel is the pixel
    assert torch.equal(maps[:, 0, 2, 2], x0[:, 0, 1, 1])  # offset (-1, -1) of the red channel
    assert torch.equal(maps[:, 0, 0, 0], x0[:, 0, 0, 0])  # replicate padding at the corner
    assert torch.equal(rgb_maps(x0, 1), x0)


def test_noise_draws_average_the_features_of_each_draw():
    params = params_from_dict(TINY_PARAMS)
    torch.manual_seed(0)
    model, diffusion = create_unet(params.unet_config()).eval(), Diffusion("linear", 1000)
    x0 = torch.rand(2, 3, 32, 32) * 2 - 1
    noises = batch_noise(0, 3, False, "test", [0, 1], 50, 32)
    assert noises.shape == (3, 1, 3, 32, 32)
    assert torch.equal(batch_noise(0, 1, False, "test", [0, 1], 50, 32), make_noise(0, 32))  # 1 draw = the default
    assert torch.equal(noises[1], make_noise(1, 32))  # draw j is seed noise_seed + j
    assert batch_noise(0, 2, True, "test", [0, 1], 50, 32).shape == (2, 2, 3, 32, 32)  # per image with stochastic
    options = {"t_steps": [50], "blocks": [1, 2]}
    averaged = feature_maps(model, diffusion, x0, noise=noises, **options)
    expected = sum(feature_maps(model, diffusion, x0, noise=draw, **options) for draw in noises) / 3
    torch.testing.assert_close(averaged, expected)
    assert not torch.allclose(averaged, feature_maps(model, diffusion, x0, noise=noises[0], **options))


def test_train_subset_is_a_seeded_draw_of_whole_images():
    assert train_subset(50, None, 0) == list(range(50))
    first = train_subset(50, 5, 0)
    assert first == train_subset(50, 5, 0) == sorted(first) and len(set(first)) == 5
    assert first != train_subset(50, 5, 1)
    for seed in range(6):  # nested: for one seed each count's images hold the smaller counts' images
        subsets = [set(train_subset(50, count, seed)) for count in (1, 2, 5, 10, 20, 50)]
        assert all(small < large for small, large in zip(subsets, subsets[1:])), seed
    assert len({tuple(train_subset(50, 1, seed)) for seed in range(5)}) > 1  # the draws differ between seeds
    with pytest.raises(DatasetError, match="ensemble.train_images=51"):
        train_subset(50, 51, 0)
    matrix = da.from_array(np.arange(16 * 2).reshape(16, 2), chunks=(4, -1))  # 4 images of 4 pixels
    rows, labels = image_rows(matrix, da.arange(16, chunks=4), [1, 3], 4)
    np.testing.assert_array_equal(labels.compute(), [4, 5, 6, 7, 12, 13, 14, 15])
    np.testing.assert_array_equal(rows.compute(), np.arange(32).reshape(16, 2)[[4, 5, 6, 7, 12, 13, 14, 15]])


@pytest.mark.parametrize("key, value, message", [
    ("features.patch_size", 4, "features.patch_size=4 must be an odd"),
    ("features.noise_draws", 0, "features.noise_draws must be >= 1"),
    ("features.representation", "hog", "features.representation='hog' is not one of"),
    ("ensemble.train_images", 7, r"ensemble.train_images=7 must be null \(all\) or in \[1, dataset.train_images=6\]"),
    ("robustness.severities", [0, 6], "robustness.severities"),
    ("robustness.corruptions", ["snow"], "robustness.corruptions"),
    ("kmeans.k", 0, "kmeans.k must be > 0, got 0"),
])
def test_analysis_keys_refuse_bad_values_naming_the_key(key, value, message):
    data = yaml.safe_load(yaml.safe_dump(TINY_PARAMS))
    section, name = key.split(".")
    data.setdefault(section, {})[name] = value
    with pytest.raises(ConfigError, match=message):
        params_from_dict(data)


def test_corruptions_keep_the_image_format_and_grow_with_severity():
    image = new_canvases(1)[0]  # a real digit canvas: black background, grey strokes
    for corruption in Corruption:
        mild = corrupt(image, corruption, 1, np.random.default_rng(0))
        strong = corrupt(image, corruption, 5, np.random.default_rng(0))
        assert mild.shape == strong.shape == image.shape and strong.dtype == np.uint8
        change = [np.abs(out.astype(int) - image).mean() for out in (mild, strong)]
        assert 0 < change[0] < change[1], (corruption, change)
    with pytest.raises(ValueError, match="severity 6"):
        corrupt(image, "blur", 6, np.random.default_rng(0))


def test_kmeans_finds_separated_clusters_numbered_by_size():
    generator = torch.Generator().manual_seed(0)
    points = torch.cat([torch.randn(50, 4, generator=generator), torch.randn(30, 4, generator=generator) + 10,
                        torch.randn(20, 4, generator=generator) - 10])
    labels = kmeans(points, 3, 10, seed=0)
    assert labels.shape == (100,) and labels.dtype == torch.int64
    assert (labels[:50] == 0).all() and (labels[50:80] == 1).all() and (labels[80:] == 2).all()
    assert torch.equal(kmeans(points, 3, 10, seed=0), labels)


def test_the_sample_efficiency_sweep_reruns_no_stage_before_fit():
    """``ensemble.*`` is read by fit (and what runs on its ensemble), by no stage that makes data, checkpoints
    or stores, so `-S ensemble.train_images=...` reruns fit and evaluate and reuses every store."""
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]

    def reads(stage: dict, key: str) -> bool:
        params = stage.get("do", stage).get("params", [])
        return any(key == p or key.startswith(f"{p}.") for p in params if isinstance(p, str))

    for key in ("ensemble.train_images", "ensemble.train_subset_seed"):
        assert [name for name in ("prepare", "pretrain", "extract") if reads(stages[name], key)] == []
        assert reads(stages["fit"], key)
    sweep = ANALYSES["sample_efficiency"]
    assert sweep.targets == ("evaluate",)
    assert all(o.startswith(("ensemble.train_", "ensemble.steps=")) for e in sweep.experiments for o in e.overrides)
    counts = {o for e in sweep.experiments for o in e.overrides if "train_images" in o}
    assert counts == {f"ensemble.train_images={n}" for n in (1, 2, 5, 10, 20, 50)}


def test_the_sample_efficiency_sweep_trains_equal_steps_and_draws_five_subsets_below_ten_images():
    from analyses.experiments import EQUAL_STEPS

    runs: dict[int, list[int]] = {}
    for experiment in ANALYSES["sample_efficiency"].experiments:
        given = dict(o.split("=", 1) for o in experiment.overrides)
        assert given["ensemble.steps"] == str(EQUAL_STEPS), experiment.name  # the same Adam steps at every count
        runs.setdefault(int(given["ensemble.train_images"]), []).append(int(given["ensemble.train_subset_seed"]))
        params_from_dict({"ensemble": {k.split(".")[1]: int(v) for k, v in given.items()}})  # valid params
    assert all(len(set(seeds)) == len(seeds) for seeds in runs.values())
    assert all(len(runs[count]) >= 5 for count in runs if count < 10), runs
    assert runs[50] == [0]  # all the images: every seed draws the same ones
    # the same seeds at every count, so the draws are nested curves (seed s: 1 image within its 2, within its 5)
    assert all(runs[count] == runs[1][: len(runs[count])] for count in runs)


def test_the_datasetddpm_size_sweep_trains_equal_segnet_steps_and_varies_the_set_alone():
    from analyses.experiments import PAPER_EPOCHS, SEGNET_STEPS

    sweeps: dict[str, dict[str, dict[str, str]]] = {"steps": {}, "epochs": {}}
    for experiment in ANALYSES["datasetddpm"].experiments:
        given = dict(o.split("=", 1) for o in experiment.overrides)
        for key, value in given.items():  # each override alone is valid
            *parents, leaf = key.split(".")
            nested = {leaf: yaml.safe_load(value)}
            for parent in reversed(parents):
                nested = {parent: nested}
            params_from_dict(nested)
        if "ddpm.train.steps" in given:  # the pretraining runs: at the paper's epochs, named so
            assert given["segnet.steps"] == "null" and experiment.name.endswith("-e20"), experiment
            continue
        # the sweep at fixed steps, and the same sweep at the paper's 20 epochs (names ending -e20[-fs<seed>])
        sweep = "epochs" if "-e20" in experiment.name else "steps"
        assert given["segnet.steps"] == (str(SEGNET_STEPS) if sweep == "steps" else PAPER_EPOCHS.split("=")[1])
        sweeps[sweep][experiment.name] = given
    for runs in sweeps.values():
        sizes = {int(given["sample.images"]) for given in runs.values()}
        assert len(sizes) >= 3
        # Within a sweep only the set (its size, the filter) and the segnet seed change.
        assert {key for given in runs.values() for key in given} <= {
            "sample.images", "segnet.steps", "segnet.seed", "datasetddpm.drop_uncertain"}
        assert {seed_of(name) for name in runs} == set(FIT_SEEDS)
    # the two sweeps are the same sets, one trained by steps, one by epochs
    assert {name.replace("-e20", "") for name in sweeps["epochs"]} == set(sweeps["steps"])


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    paths = make_project(tmp_path_factory.mktemp("analyses"), {
        "robustness": {"corruptions": ["gaussian_noise", "contrast"], "severities": [1, 5]},
        "kmeans": {"images": 2, "k": 3, "t_steps": [50], "blocks": [1, 2], "iterations": 5}})
    paths["stores"] = paths["params"].parent / "t{t}.zarr"
    for t in load_params(paths["params"]).t_steps:
        result = run_stage("extract", "--params", paths["params"], "--t", t, "--data", paths["data"],
                           "--checkpoint", paths["checkpoint"], "--out", str(paths["stores"]).format(t=t))
        assert result.returncode == 0, result.stderr
    return paths


def evaluate(paths: dict, params: Path, ensemble: Path, out: Path) -> dict:
    result = run_stage("evaluate", "--params", params, "--stores", paths["stores"], "--ensemble", ensemble,
                       "--data", paths["data"], "--metrics", out / "m.json", "--val-metrics", out / "v.json",
                       "--per-class", out / "c.csv", "--confusion", out / "k.csv", "--overlays", out / "overlays",
                       "--predictions", out / "predictions")
    assert result.returncode == 0, result.stderr
    return json.loads((out / "m.json").read_text())


def test_fit_on_a_seeded_subset_of_the_stored_train_images(project, tmp_path):
    params = write_params(tmp_path / "params.yaml", {"ensemble.train_images": 2, "ensemble.train_subset_seed": 3})
    result = run_stage("fit", "--params", params, "--stores", project["stores"], "--out", tmp_path / "e.pt",
                       "--curves", tmp_path / "curves")
    assert result.returncode == 0, result.stderr
    stems = [e.stem for e in list_examples(project["data"], Split.TRAIN)]
    payload = torch.load(tmp_path / "e.pt", weights_only=True)
    assert payload["train_image_ids"] == [stems[i] for i in train_subset(len(stems), 2, 3)]
    assert "fit: 2048 pixels" in result.stdout  # 2 images of 32 x 32
    assert evaluate(project, params, tmp_path / "e.pt", tmp_path)["images"] == 4


def test_robustness_clean_level_is_evaluates_test_score(project, tmp_path):
    ensemble = tmp_path / "ensemble.pt"
    save_random_ensemble(ensemble, load_params(project["params"]), project["checkpoint"])
    evaluated = evaluate(project, project["params"], ensemble, tmp_path)
    result = run_stage("robustness", "--params", project["params"], "--checkpoint", project["checkpoint"],
                       "--ensemble", ensemble, "--data", project["data"], "--metrics", tmp_path / "r.json",
                       "--table", tmp_path / "r.csv", "--examples", tmp_path / "r.png")
    assert result.returncode == 0, result.stderr
    robust = json.loads((tmp_path / "r.json").read_text())
    assert robust["clean"] == evaluated["miou"]  # the same features, the same vote: the stores' path and this one
    assert set(robust) == {"clean", "representation", "constants", "gaussian_noise", "contrast"}
    assert set(robust["contrast"]) == {"1", "5"} and robust["representation"] == "ddpm"
    assert robust["constants"] == "CIFAR-10-C"  # 32 px images: CIFAR-10-C's constants under auto
    with Image.open(tmp_path / "r.png") as strip:  # clean + 4 corrupted side by side, labelled (tests/test_figures.py)
        assert strip.format == "PNG" and strip.width > 3 * strip.height
    table = pd.read_csv(tmp_path / "r.csv")
    assert list(table.columns) == ["severity", "gaussian_noise", "contrast"] and list(table["severity"]) == [0, 1, 5]
    assert (table.loc[0, ["gaussian_noise", "contrast"]] == robust["clean"]).all()
    assert table.loc[2, "contrast"] == robust["contrast"]["5"]


def test_rgb_patch_stores_have_the_stores_format_and_fit_and_evaluate_take_them(project, tmp_path):
    params = write_params(tmp_path / "params.yaml", {"features.representation": "rgb_patch", "features.patch_size": 3,
                                                     "t_steps": [50]})
    result = run_stage("extract", "--params", params, "--t", 50, "--data", project["data"],
                       "--checkpoint", project["checkpoint"], "--out", tmp_path / "t50.zarr")
    assert result.returncode == 0, result.stderr
    store = zarr.open_group(tmp_path / "t50.zarr", mode="r")
    record = store.attrs["record"]
    assert record["representation"] == "rgb_patch3" and record["feature_dim"] == 27
    first = list_examples(project["data"], Split.TEST)[0]
    expected = rgb_maps(to_model_input(np.array(read_rgb(first.image_path))[None]), 3)[0].flatten(1).T.half().numpy()
    np.testing.assert_array_equal(store["test/features"][: 32 * 32], expected)
    paths = {**project, "stores": tmp_path / "t{t}.zarr"}
    result = run_stage("fit", "--params", params, "--stores", paths["stores"], "--out", tmp_path / "e.pt",
                       "--curves", tmp_path / "curves")
    assert result.returncode == 0, result.stderr
    assert 0 <= evaluate(paths, params, tmp_path / "e.pt", tmp_path)["miou"] <= 1
    # segment takes the baseline through the one feature path too: its mask is evaluate's prediction
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the stages ran (the ensemble's arithmetic is per thread)
    try:
        (result,) = Segmenter.load(params, project["checkpoint"], tmp_path / "e.pt").predict([read_rgb(first.image_path)])
    finally:
        torch.set_num_threads(threads)
    np.testing.assert_array_equal(result.mask, np.asarray(Image.open(tmp_path / "predictions" / f"{first.stem}.png")))
    # the DDPM's stores are refused under rgb_patch params: the record names what made them
    result = run_stage("fit", "--params", params, "--stores", project["stores"], "--out", tmp_path / "x.pt",
                       "--curves", tmp_path / "curves2")
    assert result.returncode != 0 and "representation='ddpm'" in result.stderr


def test_kmeans_stage_saves_one_map_figure_per_image(project, tmp_path):
    result = run_stage("kmeans", "--params", project["params"], "--checkpoint", project["checkpoint"],
                       "--data", project["data"], "--out", tmp_path / "kmeans")
    assert result.returncode == 0, result.stderr
    stems = [e.stem for e in list_examples(project["data"], Split.TEST)[:2]]
    assert sorted(p.name for p in (tmp_path / "kmeans").iterdir()) == sorted(f"{s}.png" for s in stems)
    assert Image.open(tmp_path / "kmeans" / f"{stems[0]}.png").size[0] > 3 * 100  # the image and 2 maps


def test_experiment_rows_read_dvc_exp_show_json():
    exp_show = json.loads((FIXTURES / "exp_show.json").read_text())
    rows = experiment_rows(exp_show, ["bl-rgb", "bl-ddpm", "absent"])
    assert set(rows) == {"bl-rgb", "bl-ddpm"}
    assert rows["bl-rgb"]["params"]["features"]["representation"] == "rgb"
    assert 0 < rows["bl-rgb"]["metrics"]["metrics/eval.json"]["miou"] < rows["bl-ddpm"]["metrics"]["metrics/eval.json"]["miou"]


def test_report_builds_from_recorded_runs(tmp_path):
    results = tmp_path / "results"
    shutil.copytree(FIXTURES / "results", results)
    kmeans_maps = tmp_path / "kmeans"
    kmeans_maps.mkdir()
    Image.new("RGB", (40, 20)).save(kmeans_maps / "test_00000.png")
    text = build_report(results, tmp_path / "report" / "report.md", kmeans_maps)
    assert (tmp_path / "report" / "report.md").read_text() == text
    for heading in ("## Baselines", "## Sample efficiency", "## DatasetDDPM", "## Noise variants",
                    "## Corruption robustness", "## K-means", "## Run times"):
        assert heading in text
    assert "No recorded runs" not in text
    for figure in ("sample_efficiency.png", "robustness.png", "kmeans/test_00000.png"):
        assert (tmp_path / "report" / figure).is_file() and f"]({figure})" in text
    recorded = json.loads((results / "baselines.json").read_text())["experiments"]["bl-rgb"]
    assert f"{recorded['metrics']['metrics/eval.json']['miou']:.3f}" in text  # the table's numbers are the runs'
    summary = sample_efficiency_table(json.loads((results / "sample_efficiency.json").read_text()))
    assert list(summary["images"]) == sorted(summary["images"]) and (summary["seeds"] >= 1).all()
    assert set(summary["steps"]) == {"by epochs"}  # the recorded fixture ran before ensemble.steps
    assert "trained by epochs: the optimizer steps grow with the images (confounded)" in text


def test_the_datasetddpm_table_groups_segnet_seeds_under_their_synthetic_set_after_the_ensemble():
    from analyses.report import labels_of

    record = json.loads((FIXTURES / "results" / "datasetddpm.json").read_text())
    table = datasetddpm_table(record, labels_of("datasetddpm"))
    assert table.iloc[0]["run"].startswith("ensemble") and table.iloc[0]["val mIoU"] == 0.361
    assert (table["ensemble val"] == 0.361).all()  # every set here was labeled by the default DDPM's ensemble
    filtered = table[table["run"] == "32 samples, 10% most uncertain dropped, 2320 segnet steps"].iloc[0]
    assert (filtered["seeds"], filtered["samples"], filtered["kept"], filtered["epochs chosen"]) == (2, 32, 29, "1, 3")
    assert filtered["val mIoU"] == pytest.approx(0.11) and filtered["test std"] == pytest.approx(0.0141421, rel=1e-4)
    unfiltered = table[table["run"] == "128 samples, none dropped, 2320 segnet steps"].iloc[0]
    assert unfiltered["seeds"] == 1 and unfiltered["kept"] == 128 and unfiltered["val std"] != unfiltered["val std"]
    assert len(table) == 3  # the ensemble, then the two synthetic sets recorded (the others were not run)


def test_the_sample_efficiency_table_says_the_steps_and_keeps_mean_and_spread():
    def run(images, seed, miou):
        return {"params": {"ensemble": {"train_images": images, "train_subset_seed": seed, "steps": 400}},
                "metrics": {"metrics/val.json": {"miou": miou}, "metrics/eval.json": {"miou": miou + 0.1}}}

    record = {"experiments": {f"r{i}": run(images, seed, miou) for i, (images, seed, miou) in enumerate(
        [(1, 0, 0.1), (1, 1, 0.3), (1, 2, 0.2), (5, 0, 0.4), (5, 1, 0.4)])}}
    summary = sample_efficiency_table(record)
    one = summary[summary["images"] == 1].iloc[0]
    assert (one["steps"], one["seeds"]) == ("400", 3)
    assert one["val_mean"] == pytest.approx(0.2) and one["val_std"] == pytest.approx(0.1)
    assert one["test_mean"] == pytest.approx(0.3)
    from analyses.report import steps_caption

    assert steps_caption(summary) == "400 optimizer steps per member at every count"


def _exp_range(name: str, state: str | None) -> dict:
    executor = None if state is None else {"state": state, "name": "dvc-task", "local": None}
    return {"revs": [{"rev": f"{name}-rev", "name": name, "data": {}, "error": None, "experiments": None}],
            "executor": executor, "name": name}


def test_experiment_states_read_the_executor_of_each_named_experiment():
    exp_show = [{"rev": "workspace", "name": None, "data": {}, "error": None, "experiments": None},
                {"rev": "abc", "name": "main", "data": {}, "error": None,
                 "experiments": [_exp_range("se-1", "running"), _exp_range("se-2", "queued"),
                                 _exp_range("se-3", "failed"), _exp_range("se-4", None),
                                 _exp_range("someone-elses", "failed")]}]
    from analyses.results import experiment_states

    assert experiment_states(exp_show, ["se-1", "se-2", "se-3", "se-4", "absent"]) == {
        "se-1": "running", "se-2": "queued", "se-3": "failed", "se-4": "success"}
    states = experiment_states(json.loads((FIXTURES / "exp_show.json").read_text()), ["bl-rgb", "bl-ddpm"])
    assert states == {"bl-rgb": "success", "bl-ddpm": "success"}  # a real `dvc exp show --json`


def test_an_analysis_run_removes_and_waits_on_its_own_experiments_only(monkeypatch, tmp_path):
    """It ran `dvc queue remove --failed --success`, deleting every finished task of the repository, and
    parsed the human-readable `dvc queue status` table."""
    import analyses.run as run

    calls = []
    names = [e.name for e in run.ANALYSES["noise"].experiments]

    def fake_dvc(*args, check=True):
        calls.append(args)
        if args[:2] == ("exp", "show"):
            return json.dumps([{"rev": "abc", "name": "main", "data": {}, "error": None,
                                "experiments": [_exp_range(name, None) for name in names]
                                + [_exp_range("someone-elses", "failed")]}])
        return ""

    monkeypatch.setattr(run, "dvc", fake_dvc)
    monkeypatch.setattr(run, "untracked_files", lambda: [])
    monkeypatch.setattr("sys.argv", ["run", "noise", "--out", str(tmp_path / "noise.json")])
    run.main()
    removals = [call for call in calls if call[1] == "remove"]
    assert removals == [("exp", "remove", *names), ("queue", "remove", *names)]
    assert not any(call[:2] == ("queue", "status") for call in calls)
    assert json.loads((tmp_path / "noise.json").read_text())["analysis"] == "noise"


def test_the_baselines_hold_both_random_unets_each_named_for_its_init():
    rows = {e.name: e for e in ANALYSES["baselines"].experiments}
    guided, dense = rows["bl-random-unet"], rows["bl-random-unet-dense"]
    assert guided.overrides == ("ddpm.train.steps=0",)  # today's row: guided-diffusion's init, its zero layers
    assert set(dense.overrides) == {"ddpm.train.steps=0", "ddpm.train.init=dense"}
    assert "zero layers" in guided.label and "all layers drawn" in dense.label
    for experiment in (guided, dense):
        params_from_dict({"ddpm": {"train": {k.split(".")[2]: (int(v) if v.isdigit() else v)
                                             for k, v in (o.split("=") for o in experiment.overrides)}}})
    names = [e.name for e in ANALYSES["baselines"].experiments]
    assert names.index("bl-random-unet-dense") == names.index("bl-random-unet") + len(FIT_SEEDS)  # beside each other


def test_every_queued_experiment_sets_params_that_params_yaml_accepts():
    """Each analysis' ``-S key=value`` applied to params.yaml validates (a typo'd key fails here, not after an hour)."""
    base = yaml.safe_load((REPO / "params.yaml").read_text())
    for analysis in ANALYSES.values():
        for experiment in analysis.experiments:
            data = copy.deepcopy(base)
            for override in experiment.overrides:
                key, _, value = override.partition("=")
                *path, last = key.split(".")
                section = data
                for part in path:
                    section = section[part]
                assert last in section, f"{experiment.name}: {key} is not a params.yaml key"
                section[last] = yaml.safe_load(value)
            params_from_dict(data)
    mae = {e.name: e for e in ANALYSES["baselines"].experiments}["bl-mae"]
    assert "features.representation=mae" in mae.overrides and base["mae"]["steps"] == 3000  # the DDPM's budget
    swav = {e.name: e for e in ANALYSES["baselines"].experiments}["bl-swav"]
    assert "features.representation=swav" in swav.overrides and base["swav"]["steps"] == SWAV_STEPS  # the same


def test_every_baseline_runs_three_fit_seeds_and_its_row_has_their_spread():
    experiments = ANALYSES["baselines"].experiments
    labels = {e.label for e in experiments}
    once = [e.name for e in experiments if sum(other.label == e.label for other in experiments) == 1]
    # their pretraining reruns per seed (10-20 min each): one fit seed, their labels say so
    assert once == ["bl-mae-6000", f"bl-swav-{2 * SWAV_STEPS}", "bl-mae-12000", "bl-mae-lr3e-4", "bl-mae-lr3e-3",
                    "bl-mae-ps1", "bl-mae-ps2", "bl-ddpm-1600", "bl-ddpm-3200", "bl-ddpm-6400", "bl-mae-24000"]
    assert all("one fit seed" in e.label for e in experiments[-len(once):])
    assert len(experiments) == (len(labels) - len(once)) * 3 + len(once) and FIT_SEEDS == (0, 1, 2)
    seeded = {e.name: e for e in experiments}["bl-rgb-fs2"]
    assert seeded.overrides[-1] == "ensemble.seed=2" and seeded.label == "raw RGB pixels"
    assert seed_of("bl-rgb-fs2") == 2 and seed_of("bl-rgb") == 0 and seed_of("bl-ddpm-200") == 0

    def row(val, test):
        return {"params": {}, "metrics": {"metrics/val.json": {"miou": val}, "metrics/eval.json": {"miou": test}}}

    record = {"experiments": {"bl-rgb": row(0.1, 0.2), "bl-rgb-fs1": row(0.2, 0.3), "bl-rgb-fs2": row(0.3, 0.4),
                              "bl-ddpm": row(0.5, 0.6)}}
    table = split_table(record, {e.name: e.label for e in experiments})
    rgb = table.set_index("run").loc["raw RGB pixels"]
    assert rgb["seeds"] == 3 and abs(rgb["val mIoU"] - 0.2) < 1e-12 and abs(rgb["val std"] - 0.1) < 1e-12
    assert rgb["experiment"] == "bl-rgb"
    ddpm = table.set_index("run").loc["DDPM features (the pipeline's default)"]
    assert ddpm["seeds"] == 1 and ddpm["val std"] != ddpm["val std"]  # NaN: one seed has no spread


def test_robustness_lines_are_told_apart_however_many_runs(tmp_path, monkeypatch):
    """With matplotlib's 10-colour cycle the baselines' 20 rows shared colours two by two (the 4x DDPM and the 1x MAE
    drew the same pink line); every run now has its own colour, line style and marker, in the plot too."""
    import matplotlib.pyplot as plt
    import pandas as pd

    from analyses.report import plot_robustness, run_styles

    runs = [f"run {i}" for i in range(34)]
    styles = run_styles(runs)
    assert len({(s["color"], s["linestyle"]) for s in styles.values()}) == 34
    table = pd.DataFrame([{"run": run, "corruption": corruption, "0": 0.3, "1": 0.2}
                          for corruption in ("blur", "jpeg") for run in runs[:25]])
    drawn = []
    real_plot = plt.Axes.plot

    def keep(self, *args, **kwargs):
        drawn.append((kwargs["label"], kwargs["color"], kwargs["linestyle"]))
        return real_plot(self, *args, **kwargs)

    monkeypatch.setattr(plt.Axes, "plot", keep)
    plot_robustness(table, tmp_path / "robustness.png")
    assert (tmp_path / "robustness.png").stat().st_size > 0
    assert len(set(drawn)) == 25 and len({(colour, style) for _, colour, style in drawn}) == 25


def test_the_second_datasets_rows_are_the_first_datasets_at_64_px_with_nothing_retuned():
    """baselines_64px runs the 32 px baselines' own overrides (representation, init, steps) plus the 64 px canvases
    and the UNet's attention at the same relative resolution, so the two tables differ in the dataset alone."""
    at_32 = {e.name: e for e in ANALYSES["baselines"].experiments}
    rows = ANALYSES["baselines_64px"].experiments
    assert ANALYSES["baselines_64px"].targets == ("evaluate",)
    for experiment in rows:
        assert experiment.overrides[:len(AT_64PX)] == AT_64PX and experiment.name.startswith("b64-")
        twin = at_32["bl-" + experiment.name.removeprefix("b64-")]
        assert experiment.overrides[len(AT_64PX):] == twin.overrides, experiment.name
    assert AT_64PX == ("dataset.image_size=64", "ddpm.model.attention_resolutions=[16]")
    # attention at a quarter of the image side, as the digits preset's is at its 32 px
    (attention,) = DIGITS_MODEL_FLAGS["attention_resolutions"]
    assert PRESETS["digits"]["image_size"] / attention == 64 / 16
    assert {e.name for e in rows if "representation=mae" in " ".join(e.overrides)} == {"b64-mae"}  # one fit seed
    assert sum(e.label.startswith("64 px: DDPM") for e in rows) == len(FIT_SEEDS)

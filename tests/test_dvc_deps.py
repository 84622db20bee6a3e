"""dvc.yaml's code deps are each stage's import closure, and stray files change no stage's inputs."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import yaml

from pipeline.code_closure import import_closure, imported_modules, module_file
from pipeline.features.locations import set_aside_stores_of_other_steps, take_back_set_aside_store
from pipeline.features.record import StoreRecord
from pipeline.features.store import create_or_resume
from tests.conftest import REPO
from tests.dvc_deps import missing_and_extra, stage_code_deps


def test_every_stage_depends_on_exactly_the_code_it_imports():
    report = missing_and_extra(REPO)
    problems = {stage: {"missing": sorted(missing), "not imported": sorted(extra)}
                for stage, (missing, extra) in report.items() if missing or extra}
    assert not problems, f"dvc.yaml code deps differ from the stages' import closures: {problems}"
    assert {"prepare", "pretrain", "extract", "fit", "evaluate", "segment"} <= set(report)


def test_the_closure_check_names_a_file_removed_from_a_stage(tmp_path):
    for folder in ("pipeline", "stages"):
        shutil.copytree(REPO / folder, tmp_path / folder)
    dvc_yaml = yaml.safe_load((REPO / "dvc.yaml").read_text())
    dvc_yaml["stages"]["extract"]["deps"].remove("pipeline/diffusion/gaussian.py")
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump(dvc_yaml))
    missing, extra = missing_and_extra(tmp_path)["extract"]
    assert missing == {"pipeline/diffusion/gaussian.py"} and not extra


def test_lazy_imports_inside_functions_count(tmp_path):
    (tmp_path / "pipeline").mkdir()
    (tmp_path / "pipeline" / "__init__.py").write_text("")
    (tmp_path / "pipeline" / "a.py").write_text("def f():\n    from pipeline import b\n    return b\n")
    (tmp_path / "pipeline" / "b.py").write_text("import numpy\n")
    assert import_closure(tmp_path, "pipeline.a") == {"pipeline/__init__.py", "pipeline/a.py", "pipeline/b.py"}


def test_pretrain_depends_on_the_imported_checkpoint_not_the_models_folder():
    from stages.pretrain import SCRATCH

    pretrain = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]["pretrain"]
    assert "models" not in pretrain["deps"] and "${ddpm.checkpoint}" in pretrain["deps"]
    assert yaml.safe_load((REPO / "params.yaml").read_text())["ddpm"]["checkpoint"] == SCRATCH
    assert (REPO / SCRATCH).is_file()  # DVC needs the placeholder to exist


def test_train_segnet_depends_on_the_segnet_weights_file_not_the_models_folder():
    from pipeline.config import SCRATCH

    train_segnet = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]["train_segnet"]
    assert "models" not in train_segnet["deps"] and "${segnet.weights}" in train_segnet["deps"]
    assert yaml.safe_load((REPO / "params.yaml").read_text())["segnet"]["weights"] == SCRATCH  # a random init


def _store(path: Path, t: int) -> None:
    record = StoreRecord(t=t, blocks=(0,), upsample="bilinear", noise_seed=0, stochastic_noise=False,
                         checkpoint_sha256="x", image_size=2, feature_dim=1)
    writer = create_or_resume(path, record, {"train": ["a"]}, chunk_pixels=4, codec="zstd", clevel=1)
    writer.write("train", 0, np.zeros((4, 1), np.float16), np.zeros(4, np.uint8))
    writer.finish()


def test_stores_of_removed_steps_are_set_aside_and_taken_back_and_nothing_else_moves(tmp_path):
    features = tmp_path / "features"
    for t in (50, 150, 350):
        _store(features / f"t{t}.zarr", t)
    _store(features / "t450.zarr.partial", 450)  # an interrupted write of a removed step: deleted
    (features / "t999.zarr").mkdir()  # not one of our stores: never touched
    (features / "t999.zarr" / "notes.txt").write_text("mine")
    moved = set_aside_stores_of_other_steps(str(features / "t{t}.zarr"), [50, 150])
    assert moved == [features / "removed_steps" / "t350.zarr", features / "t450.zarr.partial"]
    assert sorted(p.name for p in features.iterdir()) == ["removed_steps", "t150.zarr", "t50.zarr", "t999.zarr"]
    assert set_aside_stores_of_other_steps("s3://bucket/t{t}.zarr", [50]) == []  # object stores are left as they are
    assert not take_back_set_aside_store(str(features / "t{t}.zarr"), 250)  # nothing set aside for 250
    assert take_back_set_aside_store(str(features / "t{t}.zarr"), 350)
    assert (features / "t350.zarr" / "zarr.json").is_file() and not any((features / "removed_steps").iterdir())


def test_dvcignore_covers_temporaries():
    patterns = (REPO / ".dvcignore").read_text().split()
    assert {"*.partial", "*.tmp", "*.old", "/features/removed_steps"} <= set(patterns)


def test_extract_owns_the_stores_folder_and_fit_and_evaluate_only_read_it():
    """No stage writes into its inputs: the one extract stage outputs features/ (persisted, so a rerun for other
    t_steps keeps the current stores) and fit and evaluate depend on it."""
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    assert stages["extract"]["outs"] == [{"features": {"persist": True}}]
    assert "t_steps" in stages["extract"]["params"]
    for name in ("fit", "evaluate"):
        assert "features" in stages[name]["deps"]
        assert not any(str(out if isinstance(out, str) else next(iter(out))).startswith("features")
                       for out in stages[name].get("outs", []))


# The pipeline's layers, bottom up: a module may import from its own layer and the layers below it, never
# from above (docs/layout.md draws it). Listed by path prefix under pipeline/.
LAYERS = [
    ("errors.py", "enums.py", "hashing.py", "atomic.py", "code_closure.py", "resume.py"),
    ("diffusion/flags.py", "diffusion/schedule.py", "presets.py"),
    ("config.py", "config_messages.py"),
    ("runtime.py", "outputs/live.py"),
    ("data/",),
    ("diffusion/", "selfsup/"),
    ("features/",),
    ("ensemble/",),
    ("segnet/",),
    ("analysis/", "outputs/", "api.py", "datasetddpm/"),
]


def layer_of(path: str) -> int:
    relative = path.removeprefix("pipeline/")
    matches = [(len(prefix), index) for index, layer in enumerate(LAYERS) for prefix in layer
               if relative == prefix or (prefix.endswith("/") and relative.startswith(prefix))]
    assert matches, f"{path} is in no layer of LAYERS: add it"
    return max(matches)[1]  # the longest prefix decides: diffusion/flags.py sits below diffusion/


def test_pipeline_imports_point_down_the_layers():
    upward = []
    for path in sorted(REPO.glob("pipeline/**/*.py")):
        if path.name == "__init__.py":
            assert not imported_modules(path) - {"os"}, f"{path} imports: package __init__ files stay empty"
            continue
        relative = path.relative_to(REPO).as_posix()
        for name in imported_modules(path):
            target = module_file(REPO, name)
            if target is None or target.name == "__init__.py":
                continue
            target_path = target.relative_to(REPO).as_posix()
            if layer_of(target_path) > layer_of(relative):
                upward.append(f"{relative} -> {target_path}")
    assert not upward, f"imports that point up the layers: {upward}"


# What each stage may run, beyond the bottom layers every stage shares: editing extraction or store code
# never reruns pretraining, and prepare and fit never depend on the UNet.
SHARED = {"pipeline/errors.py", "pipeline/enums.py", "pipeline/hashing.py", "pipeline/atomic.py", "pipeline/config.py",
          "pipeline/config_messages.py", "pipeline/resume.py",
          "pipeline/presets.py", "pipeline/runtime.py", "pipeline/diffusion/flags.py", "pipeline/diffusion/schedule.py"}
MAY_IMPORT = {
    "prepare": {"pipeline/data/"},
    # both fingerprint their resumable states with their import closure (code_closure.run_fingerprint)
    "pretrain": {"pipeline/data/", "pipeline/diffusion/", "pipeline/outputs/live.py", "pipeline/code_closure.py"},
    # the MAE's and SwAV's batches are the DDPM's (pipeline.diffusion.train.batch_at), hence diffusion/; neither
    # runs the other's code
    "pretrain_mae": {"pipeline/data/", "pipeline/diffusion/", "pipeline/selfsup/mae.py", "pipeline/selfsup/steps.py",
                     "pipeline/selfsup/pretraining.py", "pipeline/outputs/live.py", "pipeline/code_closure.py"},
    "pretrain_swav": {"pipeline/data/", "pipeline/diffusion/", "pipeline/selfsup/swav.py", "pipeline/selfsup/steps.py",
                      "pipeline/selfsup/pretraining.py", "pipeline/outputs/live.py", "pipeline/code_closure.py"},
    "extract": {"pipeline/data/", "pipeline/diffusion/", "pipeline/selfsup/", "pipeline/features/",
                "pipeline/code_closure.py"},
    "fit": {"pipeline/features/store.py", "pipeline/features/record.py", "pipeline/features/locations.py",
            "pipeline/features/upsample.py", "pipeline/ensemble/fit.py",
            "pipeline/ensemble/model.py", "pipeline/ensemble/pool.py", "pipeline/ensemble/files.py",
            "pipeline/outputs/live.py"},
    "evaluate": {"pipeline/data/", "pipeline/features/store.py", "pipeline/features/record.py",
                 "pipeline/features/locations.py", "pipeline/features/upsample.py", "pipeline/ensemble/",
                 "pipeline/outputs/figures.py"},
    "robustness": {"pipeline/data/", "pipeline/diffusion/", "pipeline/selfsup/", "pipeline/features/",
                   "pipeline/ensemble/", "pipeline/analysis/corruptions.py", "pipeline/analysis/robustness.py",
                   "pipeline/outputs/figures.py"},
    "kmeans": {"pipeline/data/", "pipeline/diffusion/", "pipeline/selfsup/", "pipeline/features/",
               "pipeline/analysis/kmeans.py"},
    "sample": {"pipeline/data/", "pipeline/diffusion/"},
    "label": {"pipeline/data/", "pipeline/diffusion/", "pipeline/selfsup/", "pipeline/features/", "pipeline/ensemble/",
              "pipeline/api.py", "pipeline/datasetddpm/", "pipeline/outputs/figures.py", "pipeline/segnet/network.py"},
    # the network alone, never its training code: DatasetDDPM's distilled network is something segment can run
    "train_segnet": {"pipeline/data/", "pipeline/ensemble/metrics.py", "pipeline/segnet/", "pipeline/outputs/live.py"},
    "evaluate_segnet": {"pipeline/data/", "pipeline/ensemble/metrics.py", "pipeline/segnet/network.py"},
    "segment": {"pipeline/data/", "pipeline/diffusion/", "pipeline/selfsup/", "pipeline/features/", "pipeline/ensemble/",
                "pipeline/api.py", "pipeline/outputs/", "pipeline/segnet/network.py"},
    "suggest": {"pipeline/data/", "pipeline/diffusion/", "pipeline/selfsup/", "pipeline/features/", "pipeline/ensemble/",
                "pipeline/analysis/suggest.py", "pipeline/outputs/figures.py", "pipeline/outputs/suggestions.py"},
}


def test_each_stage_imports_only_the_pipeline_modules_it_may():
    stages = stage_code_deps(REPO)
    assert set(MAY_IMPORT) == set(stages), "a stage was added or removed: say what it may import"
    for stage, (module, _) in stages.items():
        allowed = SHARED | MAY_IMPORT[stage]
        extra = sorted(path for path in import_closure(REPO, module)
                       if path.startswith("pipeline/") and not path.endswith("__init__.py")
                       and not any(path == rule or (rule.endswith("/") and path.startswith(rule)) for rule in allowed))
        assert not extra, f"stage {stage} runs {extra}, outside what it may import"

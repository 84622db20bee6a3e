"""The extract stage owns the stores' folder: a rerun keeps the stores that are complete and current, computes only
what is missing, deletes the stores of removed steps, and rebuilds a store whose settings or code changed."""
from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from pipeline.config import load_params
from pipeline.features.record import StoreRecord, extraction_provenance
from tests.helpers import make_project, run_stage, write_params


def extract(project, params: Path, stores: Path):
    result = run_stage("extract", "--params", params, "--stores", stores / "t{t}.zarr", "--data", project["data"],
                       "--checkpoint", project["checkpoint"])
    assert result.returncode == 0, result.stderr
    return result.stdout


def digest(store: Path) -> str:
    sha = hashlib.sha256()
    for file in sorted(store.rglob("*")):
        if file.is_file():
            sha.update(str(file.relative_to(store)).encode() + file.read_bytes())
    return sha.hexdigest()


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = tmp_path_factory.mktemp("extract_stores")
    paths = make_project(root, {"t_steps": [50, 150]})
    paths["root"] = root
    return paths


def test_a_rerun_keeps_current_stores_computes_new_steps_and_deletes_removed_ones(project):
    root, stores = project["root"], project["root"] / "features"
    out = extract(project, project["params"], stores)
    assert "t=50:" in out and "t=150:" in out and "kept" not in out
    (stores / "t999.zarr").mkdir()
    (stores / "t999.zarr" / "notes.txt").write_text("not a store of ours: never touched")
    first = {t: digest(stores / f"t{t}.zarr") for t in (50, 150)}

    again = extract(project, project["params"], stores)
    assert again.count("is complete and current") == 2
    assert {t: digest(stores / f"t{t}.zarr") for t in (50, 150)} == first

    other = extract(project, write_params(root / "other.yaml", {"t_steps": [50, 250]}), stores)
    assert "t=50: " in other and f"{stores / 't50.zarr'} is complete and current" in other
    assert "t=250: " in other and "set aside" in other
    assert sorted(p.name for p in stores.iterdir()) == ["removed_steps", "t250.zarr", "t50.zarr", "t999.zarr"]
    assert digest(stores / "t50.zarr") == first[50]

    # Back to the first steps: t150 is taken back from where it was set aside, not computed again.
    back = extract(project, project["params"], stores)
    assert "t=150: " in back and "taken back" in back and back.count("is complete and current") == 2
    assert {t: digest(stores / f"t{t}.zarr") for t in (50, 150)} == first

    # A setting that changes the stored bytes but not the record (the float32 batches) rebuilds the store.
    batch = extract(project, write_params(root / "batch.yaml", {"features.batch_size": 3}),
                    stores)
    assert "is complete and current" not in batch and "t=50: " in batch


def test_the_provenance_follows_the_code_and_settings_but_not_the_placement(project):
    params = load_params(project["params"])
    record = StoreRecord(t=50, blocks=(0,), upsample="bilinear", noise_seed=0, stochastic_noise=False,
                         checkpoint_sha256="x", image_size=32, feature_dim=8)
    base = extraction_provenance(params, record, "code-a")
    assert extraction_provenance(params, record, "code-b") != base
    assert extraction_provenance(params, StoreRecord(**{**record.__dict__, "t": 150}), "code-a") == base
    placed = params.model_copy(update={"features": params.features.model_copy(update={"workers": 2})})
    assert extraction_provenance(placed, record, "code-a") == base
    other = params.model_copy(update={"features": params.features.model_copy(update={"clevel": 9})})
    assert extraction_provenance(other, record, "code-a") != base


def test_stores_without_a_step_placeholder_are_refused(project):
    result = run_stage("extract", "--params", project["params"], "--stores", project["root"] / "features.zarr",
                       "--data", project["data"], "--checkpoint", project["checkpoint"])
    assert result.returncode == 2 and "{t}" in result.stderr

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def reference_dir() -> Path:
    """shared/reference/guided_diffusion beside the repository (CI lays shared/ next to the clone)."""
    candidates = [Path(os.environ["DDPM_SEG_REFERENCE"])] if os.environ.get("DDPM_SEG_REFERENCE") else []
    candidates += [REPO.parent / "shared" / "reference" / "guided_diffusion"]
    for candidate in candidates:
        if (candidate / "tiny32.pt").is_file():
            return candidate
    raise FileNotFoundError(
        f"reference fixtures not found in {[str(c) for c in candidates]}; put shared/ beside the repository "
        f"or set DDPM_SEG_REFERENCE to its reference/guided_diffusion folder"
    )


@pytest.fixture(scope="session")
def reference() -> Path:
    return reference_dir()


# The files of `dvc repro` / `dvc exp run` runs, the longest by far: collected first, so that pytest-xdist
# (`--dist loadfile` hands out files in collection order) starts each on its own worker at once and spreads
# the short files around them, instead of starting a long one last.
LONGEST_FILES = ("test_pipeline_e2e.py", "test_pipeline_e2e_datasets.py")


def pytest_collection_modifyitems(items):
    items.sort(key=lambda item: item.path.name not in LONGEST_FILES)  # stable: the order within each group stays

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


# The longest file (one `dvc repro` and several experiments on its module fixture) is collected first, so that under
# `--dist loadfile` one xdist worker starts it at once while the other works through everything else; collected in
# alphabetical order it started halfway and set the suite's wall time alone.
LONGEST_FIRST = ("test_pipeline_e2e.py",)


def pytest_collection_modifyitems(session, config, items):
    items.sort(key=lambda item: item.path.name not in LONGEST_FIRST)  # a stable sort: each file keeps its order

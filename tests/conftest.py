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


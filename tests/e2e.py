"""What the end-to-end files share: the tiny params, a temporary copy of the repository as git would commit it,
and reading which stages a DVC command ran."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from tests.conftest import REPO

TINY = {
    "dataset": {"train_images": 4, "val_images": 3, "test_images": 4, "unlabeled_images": 48},
    "ddpm": {"train": {"steps": 3, "batch_size": 8, "log_every": 1}},
    "ensemble": {"members": 3, "epochs": 2},
    "evaluate": {"overlays": 2},
    "sample": {"images": 4, "batch_size": 2, "steps": 5},
    "datasetddpm": {"drop_uncertain": 0.25},
    "segnet": {"epochs": 2, "steps": None},
}
DVC = str(Path(sys.executable).parent / "dvc")
# Every stage of the default pipeline, in the order `dvc repro` runs them.
ALL_STAGES = ["prepare", "pretrain", "pretrain_mae", "pretrain_swav", "extract", "fit", "sample", "label", "train_segnet",
              "evaluate_segnet", "evaluate", "robustness", "kmeans", "segment", "suggest"]


def merge(base: dict, override: dict) -> dict:
    for key, value in override.items():
        base[key] = merge(base[key], value) if isinstance(value, dict) else value
    return base


def run(args, cwd, env):
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    assert result.returncode == 0, f"{' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout + result.stderr


def make_workspace(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """A git repository holding the working tree as it would be committed, with the tiny params and no dvc.lock:
    (its root, the environment to run git and DVC in)."""
    root = tmp_path_factory.mktemp("repo")
    # tracked and untracked-but-not-ignored files: the working tree as it would be committed
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                           capture_output=True, text=True, check=True).stdout
    for name in filter(None, files.split("\0")):
        if not (REPO / name).exists():  # deleted in the working tree: not part of what would be committed
            continue
        target = root / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, target)
    params = merge(yaml.safe_load((root / "params.yaml").read_text()), TINY)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (root / "dvc.lock").unlink(missing_ok=True)
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
               DVC_NO_ANALYTICS="1", GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t",
               GIT_COMMITTER_EMAIL="t@t")
    for command in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "copy"]):
        run(command, root, env)
    return root, env


def stages_run(output: str) -> list[str]:
    return re.findall(r"Running stage '([^']+)'", output)


def settings_args(settings: list[str]) -> list[str]:
    """``-S key=value`` for each of ``settings``, as `dvc exp run` takes them."""
    return [arg for setting in settings for arg in ("-S", setting)]

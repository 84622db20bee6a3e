"""What each DVC stage runs: the import closure of its stage module inside this repository.

Used by tests/test_dvc_deps.py to hold dvc.yaml's code deps to exactly what the code imports, so a new
module (or a new import) cannot leave a stage stale.
"""
from __future__ import annotations

import re
from pathlib import Path

import yaml

from pipeline.code_closure import import_closure


def stage_code_deps(root: Path) -> dict[str, tuple[str, set[str]]]:
    """``{stage: (module its cmd runs, the .py deps dvc.yaml declares)}`` (foreach stages by their name)."""
    stages = yaml.safe_load((root / "dvc.yaml").read_text())["stages"]
    out = {}
    for name, stage in stages.items():
        body = stage.get("do", stage)
        match = re.search(r"python -m ([\w.]+)", body["cmd"])
        assert match, f"stage {name} does not run `python -m <module>`"
        out[name] = (match.group(1), {dep for dep in body.get("deps", []) if str(dep).endswith(".py")})
    return out


def missing_and_extra(root: Path) -> dict[str, tuple[set[str], set[str]]]:
    """Per stage: code files its module imports but dvc.yaml does not list, and listed files it never imports."""
    report = {}
    for name, (module, declared) in stage_code_deps(root).items():
        closure = import_closure(root, module)
        report[name] = (closure - declared, declared - closure)
    return report

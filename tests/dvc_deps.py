"""What each DVC stage runs: the import closure of its stage module inside this repository.

Used by tests/test_dvc_deps.py to hold dvc.yaml's code deps to exactly what the code imports, so a new
module (or a new import) cannot leave a stage stale.
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

import yaml

LOCAL_PACKAGES = ("pipeline", "stages")


def module_file(root: Path, name: str) -> Path | None:
    """``pipeline.features.store`` -> ``pipeline/features/store.py`` (or a package's ``__init__.py``); None if not ours."""
    if name.split(".")[0] not in LOCAL_PACKAGES:
        return None
    base = root.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports, at top level or inside functions (lazy imports run too)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)  # `from pipeline import store`
    return names


def import_closure(root: Path, module: str) -> set[str]:
    """Repository-relative paths of the files that running ``python -m <module>`` imports from this repo,
    the packages' ``__init__.py`` files included (Python runs them first)."""
    pending, seen = [module], set()
    files: set[Path] = set()
    while pending:
        name = pending.pop()
        if name in seen:
            continue
        seen.add(name)
        parts = name.split(".")
        for depth in range(1, len(parts)):  # parent packages' __init__.py
            pending.append(".".join(parts[:depth]))
        path = module_file(root, name)
        if path is None or path in files:
            continue
        files.add(path)
        pending.extend(imported_modules(path))
    return {path.relative_to(root).as_posix() for path in files}


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

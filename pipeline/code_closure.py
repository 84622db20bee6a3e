"""The code a stage runs: the import closure of its module inside this repository, and a hash of it.

tests/test_dvc_deps.py holds dvc.yaml's code deps equal to these closures; the extract stage records the
hash of its own closure in each store, so that a store written by other extraction code is never reused, and
pretrain and pretrain_mae put it in the fingerprint of their resumable states (run_fingerprint).
"""
from __future__ import annotations

import ast
import hashlib
import json
from collections.abc import Iterable
from pathlib import Path

LOCAL_PACKAGES = ("pipeline", "stages")
REPOSITORY = Path(__file__).resolve().parents[1]


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


def closure_sha256(module: str, root: Path = REPOSITORY) -> str:
    """One sha256 over the relative path and bytes of every file in ``module``'s import closure."""
    digest = hashlib.sha256()
    for name in sorted(import_closure(root, module)):
        digest.update(f"{name}\0".encode())
        digest.update((root / name).read_bytes())
        digest.update(b"\0")
    return digest.hexdigest()


def run_fingerprint(recipe: dict, stage: str, image_paths: Iterable[Path]) -> str:
    """What a resumable state must share with the run that continues it: the ``recipe`` (the params that shape
    training, logging knobs left out), the code ``python -m <stage>`` runs (its import closure, the same files
    dvc.yaml lists as the stage's deps) and the training images' names and bytes."""
    digest = hashlib.sha256(json.dumps(recipe, sort_keys=True, default=str).encode())
    digest.update(closure_sha256(stage).encode())
    for path in image_paths:
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()

"""File hashes: what records (checkpoints, stores, ensembles) use to say which file made them."""
from __future__ import annotations

import hashlib
from pathlib import Path


def file_sha256(path: str | Path, block_size: int = 1 << 20) -> str:
    """The sha256 hex digest of a file's bytes, read ``block_size`` bytes at a time."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(block_size):
            digest.update(chunk)
    return digest.hexdigest()


def path_sha256(path: str | Path) -> str:
    """``file_sha256`` of a file; of a folder, the sha256 of its files' relative paths and sha256s, in sorted
    order, so any renamed, added, removed or edited file below it changes the digest."""
    path = Path(path)
    if not path.is_dir():
        return file_sha256(path)
    digest = hashlib.sha256()
    for file in sorted(item for item in path.rglob("*") if item.is_file()):
        digest.update(f"{file.relative_to(path).as_posix()}:{file_sha256(file)}\n".encode())
    return digest.hexdigest()

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

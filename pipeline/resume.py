"""Resumable training states: what pretrain, train_segnet and pretrain_mae write every so often, and read back
only when the state belongs to the same run."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch


def load_resumable_state(path: Path, state_format: str, fingerprint: str, who: str, progress: Callable[[dict], str],
                         say: Callable[[str], None] = print) -> dict | None:
    """The state at ``path`` if it has ``state_format`` and ``fingerprint`` (a digest of the run's params, code and
    data), else None; ``who`` (the stage) says which, ``progress(state)`` where it resumes. A damaged or foreign
    state costs a restart, never the run."""
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 (any unreadable file: start afresh)
        say(f"{who}: ignoring unreadable resumable state {path} ({type(error).__name__}); starting afresh")
        return None
    if not isinstance(state, dict) or state.get("format") != state_format or state.get("fingerprint") != fingerprint:
        say(f"{who}: {path} was written for other params, code or data; starting afresh")
        return None
    say(f"{who}: resuming {progress(state)} ({path})")
    return state

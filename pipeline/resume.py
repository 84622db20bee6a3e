"""Resumable training states: what pretrain, train_segnet, pretrain_mae and pretrain_swav write every so often, and
read back only when the state belongs to the same run."""
from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

import torch

# Names torch's global generator among a training's parts (``trainer_state``): dropout, drop-path and augmentation
# draws come from it.
GLOBAL_RNG = object()


def trainer_state(parts: Mapping[str, object]) -> dict:
    """The resumable state of a training's moving parts, by name: a module, optimizer or learning-rate schedule by
    its ``state_dict``, a ``torch.Generator`` by its state, ``GLOBAL_RNG`` by torch's global generator's state."""
    state = {}
    for name, part in parts.items():
        if part is GLOBAL_RNG:
            state[name] = torch.get_rng_state()
        elif isinstance(part, torch.Generator):
            state[name] = part.get_state()
        else:
            state[name] = part.state_dict()
    return state


def restore_trainer_state(state: dict, parts: Mapping[str, object]) -> None:
    """Put ``trainer_state``'s values back into the same parts."""
    for name, part in parts.items():
        if part is GLOBAL_RNG:
            torch.set_rng_state(state[name])
        elif isinstance(part, torch.Generator):
            part.set_state(state[name])
        else:
            part.load_state_dict(state[name])


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

"""What the MAE's and SwAV's pretraining share. The step loop: resume from a matching state, then for each step its
loss, a check that it is finite, the optimizer and schedule steps, the history, and a resumable state every
``state_every`` steps; each caller says how a step's loss is computed and what follows its backward pass. Their
checkpoint files: an encoder's weights with what rebuilds it, the placeholder of an unused representation, and
reading one back with the errors that say what to run."""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Mapping

import torch

from pipeline.atomic import save_torch_atomic
from pipeline.errors import ConfigError, ModelFlagsError, NumericsError
from pipeline.resume import load_resumable_state, restore_trainer_state, trainer_state


def pretraining_steps(
    steps: int,
    state_every: int,
    parts: Mapping[str, object],
    loss_at: Callable[[int], torch.Tensor],
    *,
    stage: str,
    state_format: str,
    likely_cause: Callable[[], str],
    after_backward: Callable[[int], None] | None = None,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
    state_path: Path | None = None,
    fingerprint: str = "",
) -> list[dict[str, float]]:
    """Train ``parts`` (named as ``trainer_state`` takes them; ``optimizer`` and ``schedule`` among them) for
    ``steps`` steps of ``loss_at(step)`` (1-based); returns every step's ``{"loss": ...}``. A non-finite loss
    raises ``NumericsError`` naming ``stage`` and ``likely_cause()``; nothing is written for that step."""
    optimizer, schedule = parts["optimizer"], parts["schedule"]
    step, history = 0, []
    state = load_resumable_state(state_path, state_format, fingerprint, stage,
                                 lambda state: f"from step {state['step']}") if state_path is not None else None
    if state is not None:
        restore_trainer_state(state, parts)
        step, history = int(state["step"]), list(state["history"])
    while step < steps:
        step += 1
        loss = loss_at(step)
        if not torch.isfinite(loss):
            raise NumericsError(f"{stage}: the loss became {loss.item()} at step {step}; likely cause: "
                                f"{likely_cause()}. No checkpoint was written; the last resumable state (if any) is kept")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if after_backward is not None:
            after_backward(step)
        optimizer.step()
        schedule.step()
        history.append({"loss": loss.item()})
        if on_step is not None:
            on_step(step, history[-1])
        if state_path is not None and state_every and step % state_every == 0 and step < steps:
            save_torch_atomic({"format": state_format, "fingerprint": fingerprint, "step": step, "history": history,
                               **trainer_state(parts)}, state_path)
    return history


def save_encoder(path: Path, file_format: str, encoder: torch.nn.Module, source: dict, **fields) -> None:
    """An encoder's weights (on the CPU) with ``fields`` (what rebuilds it) and where it came from, atomically."""
    save_torch_atomic({"format": file_format, **fields,
                       "state_dict": {key: value.detach().cpu() for key, value in encoder.state_dict().items()},
                       "source": source}, path)


def save_unused(path: Path, file_format: str) -> None:
    """The placeholder a pretraining stage writes when its representation is not chosen: the same bytes whatever
    the params, so the stages that depend on it do not rerun."""
    save_torch_atomic({"format": file_format, "unused": True}, path)


def read_encoder(path: str | Path, file_format: str, name: str, what: str) -> dict:
    """What ``save_encoder`` wrote at ``path`` for representation ``name`` (its stage: pretrain_<name>); a missing
    file, another file or the placeholder is refused, saying what to run."""
    path = Path(path)
    stage = f"pretrain_{name}"
    if not path.is_file():
        raise FileNotFoundError(f"{what} checkpoint {path} does not exist; run the {stage} stage (`dvc repro {stage}`)")
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != file_format:
        raise ModelFlagsError(f"{path} is not {'an' if what[0] in 'AEIOU' else 'a'} {what} checkpoint of this "
                              f"pipeline; the {stage} stage writes them")
    if payload.get("unused"):
        raise ConfigError(f"{path} is the placeholder {stage} writes while features.representation is not {name}; "
                          f"rerun it with features.representation: {name} (`dvc repro {stage}`)")
    return payload

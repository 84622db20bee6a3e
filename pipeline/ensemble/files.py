"""The ensemble file: the fitted members with the record of the features they were fit on."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from pipeline.atomic import save_torch_atomic
from pipeline.ensemble.model import EnsembleMLP
from pipeline.errors import EnsembleError

# What save_ensemble writes; load_ensemble refuses any other (a future layout gets a new number). /2: the
# file carries the whole record of the features it was fit on (store.fit_record), not just steps and blocks.
ENSEMBLE_FORMAT = "ddpm-segmentation-ensemble/2"


def save_ensemble(path: Path, model: EnsembleMLP, *, features: dict,
                  train_image_ids: Sequence[str] | None = None) -> None:
    """The fitted ensemble with what it was fit on (``features``: ``store.fit_record``, i.e. steps, blocks,
    checkpoint sha256, noise, upsample, representation, ...) and the train images' ids, written atomically;
    ``load_ensemble`` reads it back and refuses it for other features."""
    save_torch_atomic({"format": ENSEMBLE_FORMAT, "state_dict": model.cpu().state_dict(), "members": model.members,
                       "dim": model.dim, "num_classes": model.num_classes, "seed": model.seed,
                       "features": dict(features),
                       "train_image_ids": None if train_image_ids is None else list(train_image_ids)}, path)


def load_ensemble(path: Path, features: dict) -> EnsembleMLP:
    """The ensemble that ``save_ensemble`` wrote, in eval mode on the CPU; an ``EnsembleError`` naming every
    differing key unless it is of this format and was fit on exactly the features ``features`` describes
    (``store.fit_record`` of the reader's params)."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"ensemble {path} does not exist; run the fit stage (`dvc repro fit`)")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # not a torch file, truncated, or a pickle of other objects
        raise EnsembleError(f"ensemble {path} cannot be read as an ensemble file ({type(error).__name__}: "
                            f"{str(error).splitlines()[0] if str(error) else ''}); rerun the fit stage (`dvc repro fit`)") from None
    found = payload.get("format") if isinstance(payload, dict) else None
    if found != ENSEMBLE_FORMAT:
        raise EnsembleError(f"ensemble {path} has format {found!r}, not {ENSEMBLE_FORMAT!r}; rerun the fit stage "
                            f"(`dvc repro fit`) with this version of the code")
    fit_on = payload.get("features") or {}
    differ = [f"{key} {fit_on.get(key)!r} (asked: {value!r})" for key, value in features.items() if fit_on.get(key) != value]
    differ += [f"{key} {value!r} (asked: nothing)" for key, value in fit_on.items() if key not in features]
    if differ:
        raise EnsembleError(f"ensemble {path} was fit on other features than the params ask for: {'; '.join(differ)}; "
                            f"rerun `dvc repro` (or fit with these params)")
    model = EnsembleMLP(payload["members"], payload["dim"], payload["num_classes"], payload["seed"])
    model.load_state_dict(payload["state_dict"])
    return model.eval()

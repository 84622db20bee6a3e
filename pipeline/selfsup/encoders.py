"""The self-supervised representations (``features.representation``: mae, swav) behind one interface, so the
one feature path, extract and every stage that reads features treat them alike: which stage's checkpoint a
representation reads (``encoder_checkpoint``), loading it (``load_encoder``), its blocks' shapes and its
feature maps before upsampling (``encoder_block_shapes``, ``encoder_maps``)."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

import torch

from pipeline.enums import Representation
from pipeline.selfsup import mae, swav

SELF_SUPERVISED = {Representation.MAE: "pretrain_mae", Representation.SWAV: "pretrain_swav"}  # -> its stage


def is_self_supervised(representation: Representation | str) -> bool:
    return Representation(representation) in SELF_SUPERVISED


def add_encoder_arguments(parser: argparse.ArgumentParser, default_folder: Path | None = None) -> None:
    """A stage's ``--mae`` and ``--swav``: the pretraining stages' checkpoints (each read only with its
    representation), defaulting to ``default_folder``/{mae,swav}.pt when given."""
    for representation, stage in SELF_SUPERVISED.items():
        name = representation.value
        default = default_folder / f"{name}.pt" if default_folder is not None else None
        parser.add_argument(f"--{name}", type=Path, default=default,
                            help=f"the {stage} stage's checkpoint (read with features.representation: {name})")


def encoder_checkpoint(representation: Representation | str, mae_checkpoint: str | Path | None,
                       swav_checkpoint: str | Path | None) -> str | None:
    """The checkpoint the representation's features come from: ``mae_checkpoint`` for mae, ``swav_checkpoint``
    for swav, None for the DDPM and the RGB baselines."""
    representation = Representation(representation)
    path = {Representation.MAE: mae_checkpoint, Representation.SWAV: swav_checkpoint}.get(representation)
    return None if path is None else str(path)


def load_encoder(representation: Representation | str, path: str | Path) -> torch.nn.Module:
    """The encoder of a self-supervised representation from its stage's checkpoint, eval mode on the CPU."""
    return mae.load_mae(path) if Representation(representation) is Representation.MAE else swav.load_swav(path)


def encoder_block_shapes(representation: Representation | str, model: torch.nn.Module,
                         blocks: Sequence[int]) -> list[tuple[int, int]]:
    """(channels, map side) of each chosen block; refuses blocks the encoder does not have."""
    if Representation(representation) is Representation.MAE:
        mae.check_encoder_blocks(model, blocks)
        return [(model.config.hidden_size, model.config.image_size // model.config.patch_size)] * len(blocks)
    return swav.block_shapes(model, blocks)


def encoder_maps(representation: Representation | str, model: torch.nn.Module, x0: torch.Tensor,
                 blocks: Sequence[int]) -> list[torch.Tensor]:
    """The chosen blocks' maps ``[N, C_b, h_b, w_b]`` for ``x0 [N, 3, S, S]`` in [-1, 1]."""
    if Representation(representation) is Representation.MAE:
        return mae.token_maps(model, x0, blocks)
    return swav.block_maps(model, x0, blocks)

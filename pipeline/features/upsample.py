"""Upsampling decoder maps to the image size: whole maps (``upsample_concat``, as the paper's extraction does)
or only the pixel rows a reader needs (``upsample_rows``, for native-layout stores). Pure torch; no model code,
so the store readers depend on this and not on the UNet."""
from __future__ import annotations

import functools
from typing import Sequence

import torch
import torch.nn.functional as F

from pipeline.enums import UpsampleMode


def upsample_concat(activations: Sequence[torch.Tensor], size: int, mode: UpsampleMode | str) -> torch.Tensor:
    """``[N, C_i, h_i, w_i]`` maps -> ``[N, sum C_i, size, size]``; bilinear uses align_corners=False."""
    mode = UpsampleMode(mode)
    options = {"align_corners": False} if mode is UpsampleMode.BILINEAR else {}
    return torch.cat([F.interpolate(a.float(), size=(size, size), mode=mode.value, **options) for a in activations], dim=1)


@functools.lru_cache(maxsize=64)
def interpolation_weights(size_in: int, size_out: int, mode: UpsampleMode | str) -> torch.Tensor:
    """``[size_out, size_in] float32``: 1-D resampling as ``upsample_concat`` does it along one axis (for
    bilinear, linear with align_corners=False), so that 2-D upsampling is ``W @ map @ W.T``. Built by
    resampling the identity with ``F.interpolate`` itself."""
    mode = UpsampleMode(mode)
    options = {"mode": "linear", "align_corners": False} if mode is UpsampleMode.BILINEAR else {"mode": "nearest"}
    impulses = torch.eye(size_in).unsqueeze(1)  # [size_in, 1, size_in]: one unit impulse per input position
    return F.interpolate(impulses, size=size_out, **options)[:, 0, :].T.contiguous()


def upsample_rows(maps: Sequence[torch.Tensor], size: int, first_row: int, stop_row: int,
                  mode: UpsampleMode | str) -> torch.Tensor:
    """Rows ``first_row:stop_row`` of ``upsample_concat`` of one image, as pixel rows ``[(stop-first)*size,
    sum C_i] float32``: ``maps`` are ``[C_i, h_i, w_i]``. Only the needed output rows are computed (separable
    weights), so a reader can make a chunk of rows without upsampling the whole image. Equal to
    ``upsample_concat`` up to float32 rounding (the sums run in another order)."""
    parts = []
    for block in maps:
        rows = interpolation_weights(block.shape[-2], size, mode)[first_row:stop_row]
        columns = interpolation_weights(block.shape[-1], size, mode)
        strip = torch.matmul(torch.matmul(rows, block.float()), columns.T)  # [C, stop-first, size]
        parts.append(strip.permute(1, 2, 0).reshape(-1, block.shape[0]))
    return torch.cat(parts, dim=1)

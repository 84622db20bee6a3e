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
                  mode: UpsampleMode | str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Rows ``first_row:stop_row`` of ``upsample_concat`` of one image, as pixel rows ``[(stop-first)*size,
    sum C_i]`` of ``dtype`` (computed in float32): ``maps`` are ``[C_i, h_i, w_i]``. Only the needed output rows
    are computed (separable weights), from only the source rows they use, so a reader can make a chunk of rows
    without upsampling the whole image. Equal to ``upsample_concat`` up to float32 rounding (the sums run in
    another order). Pixel-major throughout: the source rows are taken channels-last, so both products are
    plain GEMMs and each block's result is written straight into its columns (faster than channel-major
    products and a permuted copy: benchmarks/native_read.py)."""
    rows_out = max(stop_row - first_row, 0)
    out = torch.empty((rows_out * size, sum(block.shape[0] for block in maps)), dtype=dtype)
    if rows_out == 0:
        return out
    column = 0
    for block in maps:
        channels, height, width = block.shape
        rows = interpolation_weights(height, size, mode)[first_row:stop_row]
        used = torch.nonzero(rows.any(dim=0)).flatten()
        low, high = int(used[0]), int(used[-1]) + 1
        source = block[:, low:high].permute(1, 2, 0).to(torch.float32, memory_format=torch.contiguous_format)
        strip = (rows[:, low:high] @ source.reshape(high - low, width * channels)).reshape(rows_out, width, channels)
        columns = interpolation_weights(width, size, mode)
        out[:, column : column + channels] = torch.matmul(columns, strip).reshape(rows_out * size, channels)
        column += channels
    return out

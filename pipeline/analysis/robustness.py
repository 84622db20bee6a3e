"""Predictions for images that have no store (the robustness analysis' corrupted test images): features made
batch by batch exactly as extract makes them (``iter_pixel_features``, the test split's noise of
``batch_noise``), voted on by the ensemble as evaluate votes (``pipeline.ensemble.evaluation.vote``)."""
from __future__ import annotations

import dask.array as da
import numpy as np
import torch

from pipeline.config import Params
from pipeline.data.dataset import to_model_input
from pipeline.diffusion.gaussian import Diffusion
from pipeline.ensemble.fit import EnsembleMLP
from pipeline.ensemble.evaluation import vote
from pipeline.features.extraction import batch_noise
from pipeline.features.activations import iter_pixel_features
from pipeline.runtime import AUTOCAST_DTYPES
from pipeline.features.store import rows_per_chunk
from pipeline.diffusion.unet import UNetModel


def split_prediction(model: UNetModel, diffusion: Diffusion, ensemble: EnsembleMLP, params: Params,
                     images: np.ndarray, split: str = "test") -> np.ndarray:
    """``images [N, S, S, 3] uint8`` in store order of ``split`` -> ``[N*S*S] uint8`` majority vote; the features
    of one batch of ``features.batch_size`` images at a time, never the split's."""
    options, size = params.features, images.shape[1]
    device = next(model.parameters()).device
    predictions = []
    for first in range(0, len(images), options.batch_size):
        indices = list(range(first, min(first + options.batch_size, len(images))))
        x0 = to_model_input(images[indices]).to(device)
        per_step = []
        for t in params.t_steps:  # one step at a time, as extract@t (its noise depends on t when stochastic)
            noise = batch_noise(options.noise_seed, options.noise_draws, options.stochastic_noise, split, indices, t, size)
            rows = iter_pixel_features(model, diffusion, iter([(indices, x0, noise.to(device))]), t_steps=[t],
                                       blocks=params.blocks, upsample=options.upsample,
                                       autocast_dtype=AUTOCAST_DTYPES[options.autocast.value],
                                       representation=options.representation, patch_size=options.patch_size)
            per_step.append(torch.cat([r for _, r in rows]))
        matrix = da.from_array(torch.cat(per_step, dim=1).numpy(), chunks=(rows_per_chunk(options.chunk_pixels, size * size), -1))
        prediction, _ = vote(ensemble, matrix, batch_pixels=params.evaluate.batch_pixels,
                             device=next(ensemble.parameters()).device, precision=params.ensemble.autocast)
        predictions.append(prediction)
    return np.concatenate(predictions)

"""Predictions for images that have no store (the robustness analysis' corrupted test images): their
features through the one feature path (``pipeline.features.compute.features_for_images``, the test split's
noise), voted on image by image as evaluate votes (``pipeline.ensemble.predict.vote``)."""
from __future__ import annotations

import dask.array as da
import numpy as np

from pipeline.config import Params
from pipeline.diffusion.gaussian import Diffusion
from pipeline.diffusion.unet import UNetModel
from pipeline.ensemble.model import EnsembleMLP
from pipeline.ensemble.predict import vote
from pipeline.features.compute import features_for_images
from pipeline.features.record import rows_per_chunk


def vote_on_images(model: UNetModel, diffusion: Diffusion, ensemble: EnsembleMLP, params: Params,
                   images: np.ndarray, split: str = "test") -> np.ndarray:
    """``images [N, S, S, 3] uint8`` in store order of ``split`` -> ``[N*S*S] uint8`` majority vote; one batch of
    images' features in memory at a time (the feature path's cap), each image's rows voted row-chunk by
    row-chunk as a store's."""
    size = images.shape[1]
    chunk = rows_per_chunk(params.features.chunk_pixels, size * size)
    device = next(ensemble.parameters()).device
    predictions = []
    for _, rows in features_for_images(model, diffusion, list(images), options=params.features,
                                       t_steps=params.t_steps, blocks=params.blocks, split=split):
        prediction, _ = vote(ensemble, da.from_array(rows.numpy(), chunks=(chunk, -1)),
                             batch_pixels=params.evaluate.batch_pixels, device=device, precision=params.ensemble.autocast)
        predictions.append(prediction)
    return np.concatenate(predictions)

"""Segment new images with a finished run: one code path for the segment stage and for notebooks.

    from pipeline.api import Segmenter
    segmenter = Segmenter.from_run(".")          # params.yaml, checkpoints/{ddpm,mae,swav}.pt, ensemble/ensemble.pt
    results = segmenter.predict(["a.png", image_array])
    results[0].mask, results[0].uncertainty      # [H, W] uint8 classes, [H, W] float32 nats
    distilled = Segmenter.from_run(".", model="segnet")  # DatasetDDPM's network (segnet/segnet.pt): one forward pass

An image goes through prepare's rule (``dataset.non_square``: an error, or a centre crop; then a bicubic
resize to ``dataset.image_size``), its features come from the one feature path extract writes its stores with
(``pipeline.features.compute.features_for_images``: same noise, steps, blocks, upsampling and float16 rows), and the ensemble votes
through ``pipeline.ensemble.predict.vote``, the function evaluate scores with, row-chunk by row-chunk as
evaluate reads them from a store. So on the test images ``mask`` equals evaluate's predictions.
Results are mapped back to the input's own size (nearest); pixels a centre crop cut away get the
ignore label and NaN uncertainty. Memory is set by one batch of images, never by how many are given.

``model="segnet"`` (``SegnetSegmenter``) runs DatasetDDPM's distilled SegFormer instead: the same image
preparation and result mapping, but one forward pass of the network per batch (no DDPM, no features, no
ensemble); its ``uncertainty`` is the entropy of the network's softmax (nats), not an ensemble's disagreement.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import dask.array as da
import numpy as np
import torch
from PIL import Image

from pipeline.config import Params, load_params
from pipeline.data.images import crop_square, read_rgb
from pipeline.diffusion.gaussian import Diffusion
from pipeline.diffusion.unet import UNetModel
from pipeline.ensemble.files import load_ensemble
from pipeline.ensemble.model import EnsembleMLP
from pipeline.ensemble.predict import vote
from pipeline.enums import NonSquarePolicy
from pipeline.errors import PipelineError
from pipeline.features.compute import feature_checkpoint, features_for_images, load_feature_model
from pipeline.features.record import fit_record, rows_per_chunk
from pipeline.hashing import file_sha256
from pipeline.runtime import pick_device
from pipeline.segnet.network import load_segnet, segment_images, segnet_record
from pipeline.selfsup.encoders import encoder_checkpoint

ImageInput = str | Path | np.ndarray  # a file, or an [H, W, 3] uint8 array


@dataclass(frozen=True)
class Segmentation:
    """One image's result at the input's own size."""

    name: str
    mask: np.ndarray  # [H, W] uint8 class indices (the ignore label where a centre crop cut the image)
    uncertainty: np.ndarray  # [H, W] float32 Jensen-Shannon disagreement of the members (nats), NaN where cut


@dataclass(frozen=True)
class PreparedImage:
    """An input after prepare's rule: ``square`` is ``[S, S, 3] uint8``; ``box`` is (top, left, side)
    of the square in the original ``height`` x ``width`` image."""

    name: str
    square: np.ndarray
    height: int
    width: int
    box: tuple[int, int, int]


def prepare_image(image: ImageInput, image_size: int, non_square: NonSquarePolicy, name: str | None = None) -> PreparedImage:
    """Read (a file: prepare's ``DatasetError`` when unreadable), crop and resize as prepare does."""
    if isinstance(image, (str, Path)):
        array, name = read_rgb(image), name or Path(image).stem
        where = Path(image)
    else:
        array, name = _as_rgb(image, name), name or "image"
        where = Path(name)
    height, width = array.shape[:2]
    # The crop box comes from cropping pixel coordinates with prepare's own function, so the box used to
    # map results back can never disagree with the crop the features were computed on.
    corner = crop_square(np.indices((height, width)).transpose(1, 2, 0), where, non_square)
    box = (int(corner[0, 0, 0]), int(corner[0, 0, 1]), int(corner.shape[0]))
    square = array[box[0] : box[0] + box[2], box[1] : box[1] + box[2]]
    if square.shape[0] != image_size:  # as pipeline.data.images.load_image resizes
        square = np.asarray(Image.fromarray(square).resize((image_size, image_size), Image.BICUBIC))
    return PreparedImage(name, square, height, width, box)


def _as_rgb(image: np.ndarray, name: str | None) -> np.ndarray:
    array = np.asarray(image)
    if array.ndim != 3 or array.shape[-1] != 3 or array.dtype != np.uint8:
        raise PipelineError(f"image {name or ''} is {array.dtype} {array.shape}; pass [H, W, 3] uint8 RGB arrays or files")
    return array


def back_to_input_size(prepared: PreparedImage, mask: np.ndarray, uncertainty: np.ndarray,
                       ignore_label: int) -> Segmentation:
    """``[S, S]`` results -> the input's ``[H, W]`` (nearest), outside the crop box ignore / NaN."""
    top, left, side = prepared.box
    full_mask = np.full((prepared.height, prepared.width), ignore_label, dtype=np.uint8)
    full_uncertainty = np.full((prepared.height, prepared.width), np.nan, dtype=np.float32)
    full_mask[top : top + side, left : left + side] = _resize_nearest(mask, side)
    full_uncertainty[top : top + side, left : left + side] = _resize_nearest(uncertainty, side)
    return Segmentation(prepared.name, full_mask, full_uncertainty)


def _resize_nearest(values: np.ndarray, side: int) -> np.ndarray:
    if values.shape[0] == side:
        return values
    return np.asarray(Image.fromarray(values).resize((side, side), Image.NEAREST))


class Segmenter:
    """A finished run's feature model (the DDPM, or the MAE or SwAV encoder of representation mae or swav) and
    ensemble, applied to new images."""

    def __init__(self, params: Params, model: UNetModel, diffusion: Diffusion | None, ensemble: EnsembleMLP):
        self.params, self.model, self.diffusion = params, model, diffusion
        self.device = pick_device(params.runtime.device)
        self.ensemble = ensemble.to(self.device)
        size = params.dataset.image_size
        self.batch_size = params.features.batch_size  # images read at once; the feature path may cut it further
        self.chunk_rows = rows_per_chunk(params.features.chunk_pixels, size * size)  # a store's row chunk

    @classmethod
    def load(cls, params: str | Path | Params, checkpoint: str | Path, ensemble: str | Path,
             mae_checkpoint: str | Path | None = None, swav_checkpoint: str | Path | None = None) -> "Segmenter":
        """From the files of a run (the paths dvc.yaml gives the segment stage; ``mae_checkpoint`` and
        ``swav_checkpoint`` are read only with features.representation mae and swav); ``params`` a file or loaded
        params."""
        loaded = params if isinstance(params, Params) else load_params(params)
        encoder = encoder_checkpoint(loaded.features.representation, mae_checkpoint, swav_checkpoint)
        # not extract's cache: a notebook may see a new file
        model, diffusion = load_feature_model(loaded.features, checkpoint, encoder, pick_device(loaded.runtime.device))
        members = load_ensemble(Path(ensemble),
                                fit_record(loaded, file_sha256(feature_checkpoint(loaded.features, checkpoint, encoder))))
        return cls(loaded, model, diffusion, members)

    @classmethod
    def load_segnet(cls, params: str | Path | Params, segnet: str | Path) -> "SegnetSegmenter":
        """DatasetDDPM's distilled network (train_segnet's file), checked against ``params``' segnet and dataset keys."""
        loaded = params if isinstance(params, Params) else load_params(params)
        dataset = loaded.dataset
        network, _ = load_segnet(Path(segnet), segnet_record(loaded.segnet, num_classes=dataset.num_classes,
                                                             image_size=dataset.image_size,
                                                             ignore_label=dataset.ignore_label))
        return SegnetSegmenter(loaded, network)

    @classmethod
    def from_run(cls, run: str | Path = ".", model: str = "ensemble") -> "Segmenter":
        """A finished run's folder: its params.yaml with checkpoints/ddpm.pt (mae.pt, swav.pt) and ensemble/ensemble.pt
        (``model="ensemble"``), or with segnet/segnet.pt (``model="segnet"``) (dvc.yaml's outs)."""
        run = Path(run)
        if model == "segnet":
            return cls.load_segnet(run / "params.yaml", run / "segnet" / "segnet.pt")
        if model != "ensemble":
            raise PipelineError(f"model={model!r} is not a model of a run; use ensemble or segnet")
        return cls.load(run / "params.yaml", run / "checkpoints" / "ddpm.pt", run / "ensemble" / "ensemble.pt",
                        run / "checkpoints" / "mae.pt", run / "checkpoints" / "swav.pt")

    def predict(self, images: ImageInput | Sequence[ImageInput]) -> list[Segmentation]:
        """Files or ``[H, W, 3] uint8`` arrays -> one ``Segmentation`` each; a bad image raises its error."""
        if isinstance(images, (str, Path)) or isinstance(images, np.ndarray) and images.ndim == 3:
            images = [images]
        dataset = self.params.dataset
        prepared = [prepare_image(image, dataset.image_size, dataset.non_square,
                                  None if isinstance(image, (str, Path)) else f"image {index}")
                    for index, image in enumerate(images)]
        return list(self.segment_prepared(prepared))

    def segment_prepared(self, prepared: Iterable[PreparedImage]) -> Iterator[Segmentation]:
        """Prepared images -> results in the same order, computed one batch of images at a time."""
        batch: list[PreparedImage] = []
        for item in prepared:
            batch.append(item)
            if len(batch) == self.batch_size:
                yield from self._segment_batch(batch)
                batch = []
        if batch:
            yield from self._segment_batch(batch)

    def _segment_batch(self, batch: list[PreparedImage]) -> list[Segmentation]:
        params = self.params
        size = params.dataset.image_size
        features = features_for_images(self.model, self.diffusion, [item.square for item in batch],
                                       options=params.features, t_steps=params.t_steps, blocks=params.blocks,
                                       name_of=lambda index: batch[index].name)
        results = []
        for index, rows in features:
            prediction, disagreement = vote(self.ensemble, da.from_array(rows.numpy(), chunks=(self.chunk_rows, -1)),
                                            batch_pixels=params.evaluate.batch_pixels, device=self.device,
                                            precision=params.ensemble.autocast)
            results.append(back_to_input_size(batch[index], prediction.reshape(size, size),
                                              disagreement.reshape(size, size), params.dataset.ignore_label))
        return results


class SegnetSegmenter(Segmenter):
    """DatasetDDPM's distilled SegFormer applied to new images: ``predict`` and ``segment_prepared`` as the
    ensemble's, one forward pass per batch of ``segnet.batch_size`` images; ``uncertainty`` = softmax entropy (nats)."""

    def __init__(self, params: Params, network: torch.nn.Module):  # noqa: D107 (no DDPM, no ensemble: not super's)
        self.params = params
        self.device = pick_device(params.runtime.device)
        self.network = network.to(self.device).eval()
        self.batch_size = params.segnet.batch_size

    def _segment_batch(self, batch: list[PreparedImage]) -> list[Segmentation]:
        masks, entropy = segment_images(self.network, np.stack([item.square for item in batch]),
                                        batch_size=len(batch), device=self.device)
        return [back_to_input_size(item, mask, uncertainty, self.params.dataset.ignore_label)
                for item, mask, uncertainty in zip(batch, masks, entropy)]

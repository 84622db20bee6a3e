"""Training DatasetDDPM's network on the labeled samples, the epoch chosen on the val split.

As the official ``train_deeplab.py``: cross-entropy on the ensemble's labels, Adam (``segnet.lr``), batch
``segnet.batch_size``, ``segnet.epochs`` epochs (or as many as make ``segnet.steps`` steps), no augmentation.
Unlike it, the epoch kept is the one with the best val mIoU (the paper's protocol, ``pipeline.ensemble.metrics``)
on the real val split: never on test, never on the labeled train images (the official code picks on those). Ties
go to the earlier epoch.

After every epoch that val scores (each one, or every ``ceil(epochs / MAX_CHECKS)``-th and the last) a resumable
state (network, optimiser, RNG, history, the best epoch's weights so far) is written; a rerun whose fingerprint
matches continues after the epoch of that state and ends with the same weights as an unbroken run. Images are read from their files batch by batch: memory does not grow with the
number of samples.
"""
from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as functional

from pipeline.atomic import save_torch_atomic
from pipeline.config import SegnetConfig
from pipeline.data.images import read_rgb, to_model_input
from pipeline.data.layout import list_images
from pipeline.ensemble.metrics import label_counts, mean_iou_paper
from pipeline.errors import DatasetError
from pipeline.resume import GLOBAL_RNG, load_resumable_state, restore_trainer_state, trainer_state
from pipeline.segnet.network import class_logits, segment_images

STATE_FORMAT = "ddpm-segmentation-segnet-state/1"


@dataclass(frozen=True)
class EpochRecord:
    epoch: int  # 1-based
    loss: float  # mean cross-entropy of the epoch's batches
    val_miou: float | None  # the paper's mIoU on the val split after the epoch; None without val images


@dataclass
class TrainedSegnet:
    state_dict: dict  # the chosen epoch's weights
    epoch: int
    history: list[EpochRecord]


class LabeledFolder:
    """A flat folder of ``<stem>.png`` images with ``<stem>.npy`` class masks (the label stage's output),
    read from disk when a batch is asked for."""

    def __init__(self, folder: Path, image_size: int):
        self.folder = Path(folder)
        self.paths = list_images(self.folder) if self.folder.is_dir() else []
        if not self.paths:
            raise DatasetError(f"{self.folder} holds no labeled images to train the segnet on; run the label stage, "
                               f"or keep more samples (sample.images, datasetddpm.drop_uncertain)")
        missing = [path.name for path in self.paths if not path.with_suffix(".npy").is_file()]
        if missing:
            raise DatasetError(f"{self.folder}: image(s) {missing[:5]} have no .npy mask; rerun the label stage")
        self.image_size = image_size

    def __len__(self) -> int:
        return len(self.paths)

    def batch(self, indices: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """``[B, S, S, 3] uint8`` images and ``[B, S, S] uint8`` masks, in the order of ``indices``."""
        images = np.stack([read_rgb(self.paths[index]) for index in indices])
        masks = np.stack([np.load(self.paths[index].with_suffix(".npy")) for index in indices])
        if images.shape[1:3] != (self.image_size, self.image_size) or masks.shape[1:] != images.shape[1:3]:
            raise DatasetError(f"{self.folder}: images {images.shape[1:3]} / masks {masks.shape[1:]} are not "
                               f"dataset.image_size={self.image_size} squares; rerun the sample and label stages")
        return images, masks


def paper_miou(network: torch.nn.Module, images: np.ndarray, masks: np.ndarray, num_classes: int, ignore_label: int,
               device: torch.device) -> float:
    """The paper's mIoU (``mean_iou_paper``, as evaluate scores the ensemble) of the network's argmax."""
    prediction, _ = segment_images(network, images, device=device)
    return mean_iou_paper(label_counts(masks, prediction, num_classes), ignore_label)


def choose_epoch(history: Sequence[EpochRecord]) -> int:
    """The epoch with the best val mIoU (the earliest of ties); the last epoch when there is no val score."""
    scored = [record for record in history if record.val_miou is not None]
    if not scored:
        return history[-1].epoch
    return max(scored, key=lambda record: (record.val_miou, -record.epoch)).epoch


def load_state(path: Path, fingerprint: str) -> dict | None:
    """The resumable state at ``path`` if it belongs to this run (same fingerprint), else None with a note."""
    return load_resumable_state(path, STATE_FORMAT, fingerprint, "train_segnet",
                                lambda state: f"after epoch {state['epoch']}")


# With many short epochs (segnet.steps on a small synthetic set: 580 epochs of 4 batches at the defaults) scoring val
# and writing the state after each would take most of the time: both happen every ceil(epochs / MAX_CHECKS) epochs.
MAX_CHECKS = 100


def train_segnet(network: torch.nn.Module, train: LabeledFolder, config: SegnetConfig, *, ignore_label: int,
                 validate: Callable[[torch.nn.Module], float] | None, device: torch.device,
                 state_path: Path | None = None, fingerprint: str = "",
                 on_epoch: Callable[[EpochRecord], None] | None = None) -> TrainedSegnet:
    """Train ``network`` (freshly built and seeded) for ``config.epochs_for(len(train))`` epochs (``segnet.epochs``,
    or enough for ``segnet.steps`` optimizer steps) and return the weights of the
    epoch ``choose_epoch`` picks. ``validate(network)`` scores the network on the val split (None: no val
    images, the last epoch is kept); it runs after every ``ceil(epochs / MAX_CHECKS)``-th epoch and the last. With
    ``state_path`` a state is written after those same epochs and a matching one (``fingerprint``) is resumed.
    ``on_epoch`` is called after each epoch (and its state, if any) is written."""
    network.to(device).train()
    optimizer = torch.optim.Adam(network.parameters(), lr=config.lr)
    generator = torch.Generator().manual_seed(config.seed)  # the batches' order
    torch.manual_seed(config.seed)  # drop-path and dropout draws
    history: list[EpochRecord] = []
    best: tuple[int, dict] | None = None
    parts = {"network": network, "optimizer": optimizer, "generator": generator, "torch_rng": GLOBAL_RNG}
    state = load_state(state_path, fingerprint) if state_path is not None else None
    if state is not None:
        restore_trainer_state(state, parts)
        history = [EpochRecord(**record) for record in state["history"]]
        best = (int(state["best_epoch"]), state["best_network"])
    epochs = config.epochs_for(len(train))
    every = -(-epochs // MAX_CHECKS)  # val (and the resumable state) at most MAX_CHECKS times, and after the last epoch
    for epoch in range(len(history) + 1, epochs + 1):
        network.train()
        order = torch.randperm(len(train), generator=generator).tolist()
        losses = []
        for start in range(0, len(order), config.batch_size):
            images, masks = train.batch(order[start : start + config.batch_size])
            logits = class_logits(network, to_model_input(images).to(device))
            loss = functional.cross_entropy(logits, torch.from_numpy(masks).long().to(device), ignore_index=ignore_label)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
        checked = epoch % every == 0 or epoch == epochs
        val_miou = None if validate is None or not checked else round(float(validate(network)), 6)
        record = EpochRecord(epoch, round(float(np.mean(losses)), 6), val_miou)
        history.append(record)
        if choose_epoch(history) == epoch:
            best = (epoch, copy.deepcopy({key: value.detach().cpu() for key, value in network.state_dict().items()}))
        if state_path is not None and checked:
            save_torch_atomic({"format": STATE_FORMAT, "fingerprint": fingerprint, "epoch": epoch,
                               **trainer_state(parts), "history": [asdict(item) for item in history], "best_epoch": best[0],
                               "best_network": best[1]}, state_path)
        if on_epoch is not None:
            on_epoch(record)
    assert best is not None and best[0] == choose_epoch(history)
    return TrainedSegnet(best[1], best[0], history)

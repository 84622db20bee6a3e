"""The distilled network of DatasetDDPM: a SegFormer (transformers' ``SegformerForSemanticSegmentation``,
random init, no download), built from ``segnet`` params, saved with what it was trained for, applied in
one forward pass.

SegFormer's logits come at its first encoder stage's resolution (1/4 of the input with SegFormer-B0's
stride 4); ``class_logits`` upsamples them bilinearly to the input's size, for the loss and for prediction.
Inputs are ``[N, S, S, 3] uint8`` images, normalised as everywhere in this project (``x / 127.5 - 1``).

transformers is imported inside the functions that need it, so modules that only name this one (the API,
and through it the label stage) do not pay its import time.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as functional

from pipeline.atomic import save_torch_atomic
from pipeline.config import SegnetConfig
from pipeline.data.images import to_model_input
from pipeline.errors import SegnetError

# What save_segnet writes; load_segnet refuses any other.
SEGNET_FORMAT = "ddpm-segmentation-segnet/1"


def segformer_config(config: SegnetConfig, num_classes: int) -> dict:
    """The ``transformers.SegformerConfig`` arguments of ``segnet`` params (what a segnet file records)."""
    stages = len(config.hidden_sizes)
    return {"num_channels": 3, "num_labels": num_classes, "num_encoder_blocks": stages,
            "hidden_sizes": list(config.hidden_sizes), "depths": list(config.depths),
            "num_attention_heads": list(config.attention_heads), "sr_ratios": list(config.sr_ratios),
            "patch_sizes": list(config.patch_sizes), "strides": list(config.strides),
            "mlp_ratios": [config.mlp_ratio] * stages, "decoder_hidden_size": config.decoder_hidden_size}


def build_network(arguments: dict, seed: int | None = None) -> torch.nn.Module:
    """A randomly initialised SegFormer from ``segformer_config``'s arguments (seeded when ``seed`` is given)."""
    from transformers import SegformerConfig, SegformerForSemanticSegmentation

    if seed is not None:
        torch.manual_seed(seed)
    return SegformerForSemanticSegmentation(SegformerConfig(**arguments))


def class_logits(network: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """``[N, 3, S, S] float32`` in [-1, 1] -> ``[N, C, S, S]`` logits, upsampled bilinearly from the network's."""
    logits = network(pixel_values=images).logits
    if logits.shape[-2:] != images.shape[-2:]:
        logits = functional.interpolate(logits, size=images.shape[-2:], mode="bilinear", align_corners=False)
    return logits


@torch.no_grad()
def segment_images(network: torch.nn.Module, images: np.ndarray, batch_size: int = 32,
                   device: torch.device | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``[N, S, S, 3] uint8`` -> ``([N, S, S] uint8`` classes (argmax), ``[N, S, S] float32`` entropy of the
    softmax in nats), ``batch_size`` images per forward pass; the network is left in eval mode."""
    device = device or torch.device("cpu")
    network.eval()
    masks, entropies = [], []
    for start in range(0, len(images), batch_size):
        logits = class_logits(network, to_model_input(images[start : start + batch_size]).to(device)).float()
        log_probabilities = torch.log_softmax(logits, dim=1)
        masks.append(logits.argmax(1).to(torch.uint8).cpu().numpy())
        entropies.append((-(log_probabilities.exp() * log_probabilities).sum(1)).cpu().numpy().astype(np.float32))
    if not masks:
        size = images.shape[1] if images.ndim == 4 else 0
        return np.zeros((0, size, size), np.uint8), np.zeros((0, size, size), np.float32)
    return np.concatenate(masks), np.concatenate(entropies)


def segnet_record(config: SegnetConfig, *, num_classes: int, image_size: int, ignore_label: int) -> dict:
    """What a segnet file must match to be used with params: the network's shape, classes and image size."""
    return {"segformer": segformer_config(config, num_classes), "image_size": image_size, "ignore_label": ignore_label}


def save_segnet(path: Path, network: torch.nn.Module, record: dict, training: dict) -> None:
    """The chosen network's weights, its ``segnet_record`` and how it was chosen (``training``: epoch, val mIoU,
    the per-epoch history), written atomically."""
    save_torch_atomic({"format": SEGNET_FORMAT, "record": record, "training": training,
                       "state_dict": {key: value.detach().cpu() for key, value in network.state_dict().items()}}, path)


def read_segnet(path: Path) -> dict:
    """A segnet file's payload (format checked)."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"segnet {path} does not exist; run the train_segnet stage (`dvc repro train_segnet`)")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 (not a torch file, truncated, or a pickle of other objects)
        raise SegnetError(f"segnet {path} cannot be read ({type(error).__name__}); rerun `dvc repro train_segnet`") from None
    found = payload.get("format") if isinstance(payload, dict) else None
    if found != SEGNET_FORMAT:
        raise SegnetError(f"segnet {path} has format {found!r}, not {SEGNET_FORMAT!r}; rerun `dvc repro train_segnet`")
    return payload


def load_segnet(path: Path, record: dict) -> tuple[torch.nn.Module, dict]:
    """The network ``save_segnet`` wrote, in eval mode on the CPU, and its ``training`` entry; a ``SegnetError``
    naming every differing key unless it was trained for ``record`` (``segnet_record`` of the reader's params)."""
    payload = read_segnet(path)
    saved = payload["record"]
    differ = [f"{key} {saved.get(key)!r} (params: {value!r})" for key, value in record.items() if saved.get(key) != value]
    if differ:
        raise SegnetError(f"segnet {path} was trained for other params: {'; '.join(differ)}; rerun "
                          f"`dvc repro train_segnet` (or use the params it was trained with)")
    network = build_network(saved["segformer"])
    network.load_state_dict(payload["state_dict"])
    return network.eval(), payload["training"]

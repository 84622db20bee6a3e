"""A masked autoencoder (He et al. 2022) as a competing representation: transformers' ViTMAE, trained from
random weights on the unlabeled images the DDPM is pretrained on (``features.representation: mae``).

Pretraining (``train_mae``, the pretrain_mae stage): ``ViTMAEForPreTraining`` hides ``mae.mask_ratio`` of the
patches from the ViT encoder, a light decoder reconstructs them, and the loss is the MSE on the masked
patches' normalised pixels (``norm_pix_loss``); AdamW with a linear warm-up and a half-cosine decay. The
batches are the DDPM's (``pipeline.diffusion.train.batch_at``: step k's batch depends on the seed and k only)
and the masks come from a generator seeded with ``mae.seed``, so a run resumed from its state file equals
an unbroken one bit for bit.

Features (``token_maps``), as the paper's ``FeatureExtractorMAE`` takes them: the hidden states of the
chosen encoder blocks at mask ratio 0, the CLS token dropped, the patch tokens put back into patch-grid
order with ``ids_restore`` and reshaped to ``[N, C, S/p, S/p]`` maps; the one feature path upsamples them.

A checkpoint is a plain dict (``torch.load(weights_only=True)``): format, the ``ViTMAEConfig`` arguments, the
encoder's weights (``ViTMAEModel``; the decoder is dropped) and where it came from. With another
representation the stage writes ``unused_checkpoint()`` instead, so the default run trains nothing here.
transformers is imported inside the functions that use it: the DDPM's stages never load it.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np
import torch

from pipeline.config import MaeConfig
from pipeline.data.layout import ImageFiles
from pipeline.diffusion.train import batch_at
from pipeline.errors import ConfigError, DatasetError
from pipeline.resume import GLOBAL_RNG
from pipeline.selfsup.steps import pretraining_steps, read_encoder, save_encoder, save_unused

if TYPE_CHECKING:
    from transformers import ViTMAEForPreTraining, ViTMAEModel

MAE_FORMAT = "ddpm-segmentation-mae/1"
STATE_FORMAT = "ddpm-segmentation-mae-state/1"


def build_pretraining_model(config: MaeConfig, image_size: int) -> "ViTMAEForPreTraining":
    """A randomly initialised ViTMAE encoder + decoder (init drawn from torch's global generator, seeded
    with ``mae.seed``; the position embeddings are MAE's fixed 2-D sine-cosine ones)."""
    from transformers import ViTMAEConfig, ViTMAEForPreTraining

    torch.manual_seed(config.seed)
    model = ViTMAEForPreTraining(ViTMAEConfig(**config.vit_config(image_size)))
    _init_as_mae(model)
    return model


def _init_as_mae(model: "ViTMAEForPreTraining") -> None:
    """MAE's init (He et al.'s models_mae.py), through the library's own initialisers where it has them: the fixed
    2-D sine-cosine position embeddings of the encoder and the decoder, the patch projection drawn as a Linear
    (xavier), the CLS and mask tokens (normal, std 0.02), every Linear xavier-uniform with zero bias.

    transformers 5.x (5.25 here) leaves both position embeddings at zero when a model is built from a config:
    the encoder's ``initialize_weights`` returns early because the patch projection is already marked
    initialised, and the decoder's is never called (``_init_weights`` zeroes its position embedding). With no
    positions the decoder cannot tell which masked patch it predicts: pretraining collapsed to predicting zeros
    (the encoder's gradient fell to ~1e-4 within 50 steps; val mIoU 0.111 against 0.178 for the random MAE)."""
    embeddings = model.vit.embeddings
    embeddings.patch_embeddings.projection._is_hf_initialized = False
    embeddings.initialize_weights()
    model.decoder.initialize_weights(embeddings.patch_embeddings.num_patches)
    # MAE's models_mae.py draws every Linear with xavier_uniform and zero bias (transformers: normal, std 0.02,
    # under which the decoder barely depends on the encoder at first: its gradient started at ~1e-3)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear):
                torch.nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    module.bias.zero_()


def _optimizer(model: torch.nn.Module, config: MaeConfig) -> torch.optim.Optimizer:
    """AdamW with MAE's betas; biases, norms and the CLS token (1-D parameters) without weight decay, as MAE."""
    trained = [param for param in model.parameters() if param.requires_grad]
    groups = [{"params": [p for p in trained if p.ndim > 1], "weight_decay": config.weight_decay},
              {"params": [p for p in trained if p.ndim <= 1], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, 0.95))


def train_mae(
    config: MaeConfig,
    image_size: int,
    images: np.ndarray | ImageFiles,
    *,
    device: torch.device,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
    state_path: Path | None = None,
    fingerprint: str = "",
) -> tuple["ViTMAEModel", list[dict[str, float]]]:
    """Pretrain an MAE for ``config.steps`` steps on ``[N, S, S, 3] uint8`` images (an array or ``ImageFiles``);
    return its encoder (eval mode, CPU, ``mask_ratio`` as trained) and every step's loss ``{"loss": ...}``.

    ``on_step(step, losses)`` follows each step. With ``state_path`` a resumable state is written there every
    ``config.state_every`` steps and a run whose state matches ``fingerprint`` continues from it.
    """
    from transformers import get_cosine_schedule_with_warmup

    if len(images) < config.batch_size:
        raise DatasetError(f"{len(images)} unlabeled images are fewer than mae.batch_size={config.batch_size}; "
                           f"add images or lower the batch size")
    model = build_pretraining_model(config, image_size).to(device).train()
    optimizer = _optimizer(model, config)
    schedule = get_cosine_schedule_with_warmup(optimizer, config.warmup_steps, max(1, config.steps))
    generator = torch.Generator().manual_seed(config.seed)  # the masks
    patches = (image_size // config.patch_size) ** 2

    def loss_at(step: int) -> torch.Tensor:
        pixels = batch_at(images, config.batch_size, config.seed, step).to(device)
        noise = torch.rand((pixels.shape[0], patches), generator=generator).to(device)  # argsort -> the kept patches
        return model(pixel_values=pixels, noise=noise).loss

    history = pretraining_steps(
        config.steps, config.state_every, {"model": model, "optimizer": optimizer, "schedule": schedule,
                                           "generator": generator, "torch_rng": GLOBAL_RNG}, loss_at,
        stage="pretrain_mae", state_format=STATE_FORMAT,
        likely_cause=lambda: f"mae.lr={schedule.get_last_lr()[0]:g} is too high (lower it or raise mae.warmup_steps)",
        on_step=on_step, state_path=state_path, fingerprint=fingerprint)
    return model.vit.cpu().eval(), history


def save_mae(path: Path, encoder: "ViTMAEModel", config: MaeConfig, image_size: int, source: dict) -> None:
    """The encoder's weights with the ``ViTMAEConfig`` arguments that rebuild it, written atomically."""
    save_encoder(path, MAE_FORMAT, encoder, source, vit_config=config.vit_config(image_size))


def unused_checkpoint(path: Path) -> None:
    """The placeholder the stage writes when the representation is not mae (``save_unused``)."""
    save_unused(path, MAE_FORMAT)


def load_mae(path: str | Path) -> "ViTMAEModel":
    """The encoder ``save_mae`` wrote, in eval mode on the CPU, set to mask ratio 0 (every patch is seen)."""
    from transformers import ViTMAEConfig, ViTMAEModel

    payload = read_encoder(path, MAE_FORMAT, "mae", "MAE")
    model = ViTMAEModel(ViTMAEConfig(**{**payload["vit_config"], "mask_ratio": 0.0}))
    model.load_state_dict(payload["state_dict"])
    return model.eval()


def check_encoder_blocks(model: "ViTMAEModel", blocks: Sequence[int]) -> None:
    depth = model.config.num_hidden_layers
    beyond = [block for block in blocks if not 0 <= block < depth]
    if beyond:
        raise ConfigError(f"blocks {list(blocks)} asks for MAE encoder block(s) {beyond}, but the encoder has "
                          f"{depth} (0 to {depth - 1}); choose blocks within them")


def encoder_tokens(model: "ViTMAEModel", x0: torch.Tensor, hidden_indices: Sequence[int],
                   noise: torch.Tensor | None = None) -> list[torch.Tensor]:
    """The patch tokens ``[N, P, C]`` of hidden states ``hidden_indices`` (0 = the embeddings, b + 1 = encoder
    block b's output) for ``x0 [N, 3, S, S]`` in [-1, 1], in patch-grid order (row-major): ViTMAE shuffles the
    patches by ``argsort(noise)`` even at mask ratio 0, so each is gathered back with ``ids_restore``.
    ``noise [N, P]`` defaults to the identity order (no draw from torch's global generator)."""
    if model.config.mask_ratio != 0:
        raise ValueError(f"features are taken at mask ratio 0, not {model.config.mask_ratio}; load with load_mae")
    patches = (model.config.image_size // model.config.patch_size) ** 2
    if noise is None:
        noise = torch.arange(patches, dtype=torch.float32, device=x0.device).expand(x0.shape[0], -1)
    output = model(pixel_values=x0, noise=noise, output_hidden_states=True)
    restore = output.ids_restore.unsqueeze(-1)
    tokens = []
    for index in hidden_indices:
        states = output.hidden_states[index][:, 1:]  # drop the CLS token
        tokens.append(torch.gather(states, 1, restore.expand(-1, -1, states.shape[-1])))
    return tokens


def token_maps(model: "ViTMAEModel", x0: torch.Tensor, blocks: Sequence[int]) -> list[torch.Tensor]:
    """Encoder blocks ``blocks``' patch tokens as maps ``[N, C, S/p, S/p]`` (C = ``hidden_size``), for
    ``x0 [N, 3, S, S]`` in [-1, 1]."""
    check_encoder_blocks(model, blocks)
    side = model.config.image_size // model.config.patch_size
    tokens = encoder_tokens(model, x0, [block + 1 for block in blocks])
    return [block.transpose(1, 2).reshape(x0.shape[0], -1, side, side) for block in tokens]

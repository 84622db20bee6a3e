"""A UNet that is state-dict compatible with OpenAI guided-diffusion's ``UNetModel``.

Same module tree (so the same state-dict keys and shapes), same maths, so the paper's checkpoints
(lsun_bedroom.pt, ffhq.pt, ...) load unchanged. The one addition: ``forward`` can return the outputs of
chosen decoder blocks (``output_blocks[i]``, numbered as the paper numbers them), without hooks.

Tensor contract of the model: ``x`` is ``[N, 3, H, W] float32`` in [-1, 1] (a noisy image ``x_t``),
``timesteps`` is ``[N]`` integer diffusion steps in ``[0, diffusion_steps)``; the output is
``[N, 3 or 6, H, W]`` (ε prediction, plus the variance interpolation when ``learn_sigma``).

``use_fp16`` is guided-diffusion's: ``convert_to_fp16`` turns the conv weights of the input, middle and
output blocks to float16, and ``forward`` runs those blocks in float16 while the timestep embedding,
normalisation, softmax and the output head stay float32. ``for_inference`` applies it on CUDA only.
"""
from __future__ import annotations

import functools
import math
import warnings
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.diffusion.flags import UNetConfig, config_from_flags
from pipeline.errors import ConfigError, ModelFlagsError, check_decoder_blocks


# ---------------------------------------------------------------------------------------------
# Building blocks (names and layouts mirror guided-diffusion so state-dict keys match)
# ---------------------------------------------------------------------------------------------
class GroupNorm32(nn.GroupNorm):
    """GroupNorm with 32 groups computed in float32, as guided-diffusion's ``normalization``."""

    def __init__(self, channels: int):
        super().__init__(32, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float()).type(x.dtype)


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: int = 10000) -> torch.Tensor:
    """Sinusoidal embedding ``[N] -> [N, dim]``: cosines first, then sines."""
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half
    )
    args = timesteps[:, None].float() * freqs[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding


class TimestepBlock(nn.Module):
    """A module whose forward takes the timestep embedding as a second argument."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError


class TimestepEmbedSequential(nn.Sequential):
    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        for layer in self:
            x = layer(x, emb) if isinstance(layer, TimestepBlock) else layer(x)
        return x


class Upsample(nn.Module):
    """Nearest-neighbour x2, then an optional 3x3 conv (key ``conv``)."""

    def __init__(self, channels: int, use_conv: bool, out_channels: int | None = None):
        super().__init__()
        self.channels = channels
        self.use_conv = use_conv
        if use_conv:
            self.conv = nn.Conv2d(channels, out_channels or channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        return self.conv(x) if self.use_conv else x


class Downsample(nn.Module):
    """Stride-2 3x3 conv (key ``op``), or 2x2 average pooling without a conv."""

    def __init__(self, channels: int, use_conv: bool, out_channels: int | None = None):
        super().__init__()
        if use_conv:
            self.op = nn.Conv2d(channels, out_channels or channels, 3, stride=2, padding=1)
        else:
            self.op = nn.AvgPool2d(kernel_size=2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class ResBlock(TimestepBlock):
    def __init__(
        self,
        channels: int,
        emb_channels: int,
        dropout: float,
        out_channels: int,
        use_scale_shift_norm: bool,
        up: bool = False,
        down: bool = False,
    ):
        super().__init__()
        self.use_scale_shift_norm = use_scale_shift_norm
        self.in_layers = nn.Sequential(GroupNorm32(channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1))
        self.updown = up or down
        if up:
            self.h_upd, self.x_upd = Upsample(channels, False), Upsample(channels, False)
        elif down:
            self.h_upd, self.x_upd = Downsample(channels, False), Downsample(channels, False)
        else:
            self.h_upd = self.x_upd = nn.Identity()
        self.emb_layers = nn.Sequential(
            nn.SiLU(), nn.Linear(emb_channels, 2 * out_channels if use_scale_shift_norm else out_channels)
        )
        self.out_layers = nn.Sequential(
            GroupNorm32(out_channels),
            nn.SiLU(),
            nn.Dropout(p=dropout),
            nn.Conv2d(out_channels, out_channels, 3, padding=1),
        )
        # guided-diffusion zero-initialises the last conv so each block starts as the identity.
        nn.init.zeros_(self.out_layers[-1].weight)
        nn.init.zeros_(self.out_layers[-1].bias)
        if out_channels == channels:
            self.skip_connection = nn.Identity()
        else:
            self.skip_connection = nn.Conv2d(channels, out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if self.updown:
            h = self.in_layers[:-1](x)
            h = self.h_upd(h)
            x = self.x_upd(x)
            h = self.in_layers[-1](h)
        else:
            h = self.in_layers(x)
        emb_out = self.emb_layers(emb).type(h.dtype)[..., None, None]
        if self.use_scale_shift_norm:
            scale, shift = emb_out.chunk(2, dim=1)
            h = self.out_layers[0](h) * (1 + scale) + shift
            h = self.out_layers[1:](h)
        else:
            h = self.out_layers(h + emb_out)
        return self.skip_connection(x) + h


class AttentionBlock(nn.Module):
    """Spatial self-attention; ``legacy`` splits heads before q/k/v as guided-diffusion's default does."""

    def __init__(self, channels: int, num_heads: int, num_head_channels: int | None, new_order: bool):
        super().__init__()
        if num_head_channels is None:
            self.num_heads = num_heads
        else:
            if channels % num_head_channels:
                raise ModelFlagsError(
                    f"num_head_channels={num_head_channels} does not divide a block's {channels} channels"
                )
            self.num_heads = channels // num_head_channels
        self.new_order = new_order
        self.norm = GroupNorm32(channels)
        self.qkv = nn.Conv1d(channels, channels * 3, 1)
        self.proj_out = nn.Conv1d(channels, channels, 1)
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    def _attention(self, qkv: torch.Tensor) -> torch.Tensor:
        batch, width, length = qkv.shape
        head_channels = width // (3 * self.num_heads)
        if self.new_order:
            q, k, v = (part.reshape(batch * self.num_heads, head_channels, length) for part in qkv.chunk(3, dim=1))
        else:
            q, k, v = qkv.reshape(batch * self.num_heads, head_channels * 3, length).split(head_channels, dim=1)
        scale = 1 / math.sqrt(math.sqrt(head_channels))
        weight = torch.einsum("bct,bcs->bts", q * scale, k * scale)
        weight = torch.softmax(weight.float(), dim=-1).type(weight.dtype)
        return torch.einsum("bts,bcs->bct", weight, v).reshape(batch, -1, length)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, *spatial = x.shape
        x = x.reshape(batch, channels, -1)
        h = self.proj_out(self._attention(self.qkv(self.norm(x))))
        return (x + h).reshape(batch, channels, *spatial)


class UNetModel(nn.Module):
    """guided-diffusion's UNet. ``forward(x, t, return_blocks=[...])`` also returns decoder activations."""

    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = config
        model_channels = config.num_channels
        channel_mult = config.resolved_channel_mult
        attention_rates = config.attention_downsample_rates
        heads_upsample = config.num_heads_upsample if config.num_heads_upsample is not None else config.num_heads
        time_dim = model_channels * 4

        def resblock(channels: int, out: int, **kwargs: bool) -> ResBlock:
            return ResBlock(channels, time_dim, config.dropout, out, config.use_scale_shift_norm, **kwargs)

        def attention(channels: int, heads: int) -> AttentionBlock:
            return AttentionBlock(channels, heads, config.num_head_channels, config.use_new_attention_order)

        self.time_embed = nn.Sequential(nn.Linear(model_channels, time_dim), nn.SiLU(), nn.Linear(time_dim, time_dim))
        channels = input_channels = int(channel_mult[0] * model_channels)
        self.input_blocks = nn.ModuleList(
            [TimestepEmbedSequential(nn.Conv2d(config.in_channels, channels, 3, padding=1))]
        )
        skip_channels = [channels]
        rate = 1
        for level, mult in enumerate(channel_mult):
            for _ in range(config.num_res_blocks):
                layers: list[nn.Module] = [resblock(channels, int(mult * model_channels))]
                channels = int(mult * model_channels)
                if rate in attention_rates:
                    layers.append(attention(channels, config.num_heads))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skip_channels.append(channels)
            if level != len(channel_mult) - 1:
                down = resblock(channels, channels, down=True) if config.resblock_updown else Downsample(channels, True)
                self.input_blocks.append(TimestepEmbedSequential(down))
                skip_channels.append(channels)
                rate *= 2
        self.middle_block = TimestepEmbedSequential(
            resblock(channels, channels), attention(channels, config.num_heads), resblock(channels, channels)
        )
        self.output_blocks = nn.ModuleList()
        for level, mult in list(enumerate(channel_mult))[::-1]:
            for index in range(config.num_res_blocks + 1):
                layers = [resblock(channels + skip_channels.pop(), int(model_channels * mult))]
                channels = int(model_channels * mult)
                if rate in attention_rates:
                    layers.append(attention(channels, heads_upsample))
                if level and index == config.num_res_blocks:
                    up = resblock(channels, channels, up=True) if config.resblock_updown else Upsample(channels, True)
                    layers.append(up)
                    rate //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))
        self.out = nn.Sequential(
            GroupNorm32(channels), nn.SiLU(), nn.Conv2d(input_channels, config.out_channels, 3, padding=1)
        )
        nn.init.zeros_(self.out[-1].weight)
        nn.init.zeros_(self.out[-1].bias)

    @property
    def num_decoder_blocks(self) -> int:
        return len(self.output_blocks)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the input, middle and output blocks run in (float16 after ``convert_to_fp16``).

        Read from the first conv's weight, not from ``config.use_fp16``: the flag says what to do at
        inference on CUDA (``for_inference``), this says what was done, so the forward always casts ``h``
        to the dtype its convs actually hold.
        """
        return self.input_blocks[0][0].weight.dtype

    def convert_to_fp16(self) -> "UNetModel":
        """guided-diffusion's ``convert_to_fp16``: the Conv1d/Conv2d weights and biases of input_blocks,
        middle_block and output_blocks become float16. ``time_embed``, the ResBlocks' ``emb_layers``
        Linears, the GroupNorm affine parameters and ``out`` stay float32, as in guided-diffusion (its
        ``convert_module_to_f16`` converts conv layers only; ResBlock casts the embedding projection to
        ``h``'s dtype for that reason)."""
        for part in (self.input_blocks, self.middle_block, self.output_blocks):
            _convert_convs(part, torch.float16)
        return self

    def convert_to_fp32(self) -> "UNetModel":
        """Undo ``convert_to_fp16`` (the float16 rounding of the weights stays)."""
        for part in (self.input_blocks, self.middle_block, self.output_blocks):
            _convert_convs(part, torch.float32)
        return self

    def decoder_block_shapes(self) -> list[tuple[int, int, int]]:
        """``[C, H, W]`` of every ``output_blocks[i]`` output, computed without running the model."""
        shapes = []
        size = self.config.image_size // 2 ** (len(self.config.resolved_channel_mult) - 1)
        for block in self.output_blocks:
            channels = block[0].out_layers[-1].out_channels
            if isinstance(block[-1], Upsample) or (isinstance(block[-1], ResBlock) and block[-1].updown):
                size *= 2
            shapes.append((channels, size, size))
        return shapes

    def forward(
        self, x: torch.Tensor, timesteps: torch.Tensor, return_blocks: Sequence[int] | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        """Predict from ``x`` ``[N, C, H, W]`` at integer ``timesteps`` ``[N]``.

        With ``return_blocks``, also return the outputs of those decoder blocks, in the order asked;
        the forward pass stops after the last block needed (the output head is then not computed and
        the first return value is None). Block outputs are in ``self.dtype`` (float16 after
        ``convert_to_fp16``); the prediction is in ``x``'s dtype.
        """
        wanted = list(return_blocks) if return_blocks is not None else None
        if wanted is not None:
            check_decoder_blocks(wanted, self.num_decoder_blocks)
        # As guided-diffusion: the embedding is computed in float32 (time_embed is never converted), then
        # h is cast to the blocks' dtype; each ResBlock casts its embedding projection to h's dtype.
        emb = self.time_embed(timestep_embedding(timesteps, self.config.num_channels))
        skips = []
        h = x.type(self.dtype)
        for module in self.input_blocks:
            h = module(h, emb)
            skips.append(h)
        h = self.middle_block(h, emb)
        captured: dict[int, torch.Tensor] = {}
        last_needed = max(wanted) if wanted else None
        for index, module in enumerate(self.output_blocks):
            h = module(torch.cat([h, skips.pop()], dim=1), emb)
            if wanted is not None and index in wanted:
                captured[index] = h
                if index == last_needed:
                    return None, [captured[i] for i in wanted]  # type: ignore[return-value]
        out = self.out(h.type(x.dtype))  # the output head runs in the input's dtype (float32)
        if wanted is not None:
            return out, [captured[i] for i in wanted]
        return out


def _convert_convs(module: nn.Module, dtype: torch.dtype) -> None:
    for layer in module.modules():
        if isinstance(layer, (nn.Conv1d, nn.Conv2d)):
            layer.weight.data = layer.weight.data.to(dtype)
            if layer.bias is not None:
                layer.bias.data = layer.bias.data.to(dtype)


FP16_FLAG = "ddpm.model.use_fp16"


def for_inference(model: UNetModel, device: torch.device | str) -> UNetModel:
    """``model`` in eval mode on ``device``, in float16 as guided-diffusion runs it when its flags say
    ``use_fp16`` and ``device`` is CUDA (convert after loading: checkpoints hold float32 weights).

    On a CPU, ``use_fp16`` runs in float32 and warns once, naming the flag. torch's CPU kernels do run
    the converted model, but a float16 conv2d took ~6x as long as float32 on this project's 2-core AVX-512
    CPU (torch 2.13, 64 channels at 32², batch 2), and a CPU has no memory to gain back from it; refusing
    would make every paper preset (use_fp16: true) fail on a CPU, where a few 256² images are minutes.
    """
    device = torch.device(device)
    model = model.to(device).eval()
    if model.config.use_fp16:
        if device.type == "cuda":
            model.convert_to_fp16()
        else:
            warnings.warn(
                f"{FP16_FLAG} is true but the model runs on {device.type}: features are computed in float32 "
                f"(float16 is used on CUDA only); set {FP16_FLAG}: false to silence this",
                stacklevel=2,
            )
    return model


def check_model_builds(config: UNetConfig) -> None:
    """Build the UNet on the meta device (no memory, no arithmetic), so group norms, heads and widths are
    checked before any stage spends time: a ``ConfigError`` naming ``ddpm.model``."""
    try:
        with torch.device("meta"):
            create_unet(config)
    except (ValueError, RuntimeError, AssertionError, ZeroDivisionError) as error:
        raise ConfigError(f"ddpm.model flags do not build a UNet ({error}); channel counts (num_channels x each "
                          f"channel_mult) must be divisible by the 32 group-norm groups and by num_head_channels") from None


def create_unet(model_flags: dict[str, Any] | UNetConfig, init: str = "guided") -> UNetModel:
    """A fresh UNet drawn from torch's global generator. ``init`` (``ddpm.train.init``): ``guided`` =
    guided-diffusion's init, its zero_module layers at zero; ``dense`` = those layers then drawn too
    (``redraw_zero_layers``), every other weight the same draw as ``guided``'s from the same seed."""
    config = model_flags if isinstance(model_flags, UNetConfig) else config_from_flags(model_flags)
    model = UNetModel(config)
    if init == "dense":
        redraw_zero_layers(model)
    elif init != "guided":
        raise ValueError(f"init={init!r}: use guided or dense")
    return model


def zero_initialised_layers(model: UNetModel) -> list[nn.Module]:
    """The layers guided-diffusion's zero_module leaves at zero: each ResBlock's last conv, each attention
    block's proj_out, and the output conv. Untrained, every residual branch adds zero, so a guided-init UNet
    is an input conv, up/down sampling and skip 1x1 convs: close to an identity map of its input."""
    layers: list[nn.Module] = []
    for module in model.modules():
        if isinstance(module, ResBlock):
            layers.append(module.out_layers[-1])
        elif isinstance(module, AttentionBlock):
            layers.append(module.proj_out)
    return layers + [model.out[-1]]


def redraw_zero_layers(model: UNetModel) -> UNetModel:
    """Draw the zero-initialised layers (``zero_initialised_layers``) with PyTorch's default init for their
    type (nn.Conv1d / nn.Conv2d ``reset_parameters``: Kaiming-uniform weights, uniform biases), like every other
    layer of the net: a random network that is random everywhere (the fair control of docs/analyses.md)."""
    with torch.no_grad():
        for layer in zero_initialised_layers(model):
            layer.reset_parameters()
    return model


@functools.lru_cache(maxsize=1)
def _paper_model_shapes() -> dict[str, tuple[int, ...]]:
    """State-dict shapes of the paper's 256x256 model, built on the meta device (no memory)."""
    from pipeline.presets import PAPER_MODEL_FLAGS

    with torch.device("meta"):
        model = create_unet(PAPER_MODEL_FLAGS)
    return {key: tuple(value.shape) for key, value in model.state_dict().items()}


def check_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """Raise ``ModelFlagsError`` listing missing/unexpected/mis-shaped keys and the likely wrong flag."""
    expected = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    found = {key: tuple(value.shape) for key, value in state_dict.items()}
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    mismatched = sorted(key for key in set(expected) & set(found) if expected[key] != found[key])
    if not (missing or unexpected or mismatched):
        return
    config: UNetConfig = model.config  # type: ignore[assignment]
    hints = []
    if "out.2.weight" in found and "out.2.weight" in expected and found["out.2.weight"] != expected["out.2.weight"]:
        channels = found["out.2.weight"][0]
        want = "true" if channels == 2 * config.in_channels else "false"
        hints.append(
            f"learn_sigma: out.2.weight has {channels} output channels; set ddpm.model.learn_sigma: {want}"
        )
    if "label_emb.weight" in found:
        hints.append("class_cond: the checkpoint is class-conditional (label_emb.weight); use an unconditional one")
    if "time_embed.0.weight" in found and found.get("time_embed.0.weight", (0, 0))[1] != config.num_channels:
        hints.append(
            f"num_channels: time_embed.0.weight takes {found['time_embed.0.weight'][1]} inputs; "
            f"set ddpm.model.num_channels: {found['time_embed.0.weight'][1]}"
        )
    if not hints and any(key.endswith(("h_upd", "x_upd")) or ".op." in key for key in missing + unexpected):
        hints.append("resblock_updown: down/upsampling layers differ; flip ddpm.model.resblock_updown")
    if not hints and any(".qkv." in key or ".proj_out." in key for key in missing + unexpected):
        hints.append("attention_resolutions: attention blocks sit at other resolutions; check ddpm.model.attention_resolutions")
    if not hints and (missing or unexpected):
        hints.append("num_res_blocks / channel_mult: the block structure differs; check ddpm.model.num_res_blocks and channel_mult")
    if not hints and mismatched:
        if any("emb_layers" in key for key in mismatched):
            hints.append("use_scale_shift_norm: emb_layers shapes differ; flip ddpm.model.use_scale_shift_norm")
        else:
            hints.append("channel_mult / num_channels: layer widths differ; check ddpm.model.channel_mult and num_channels")
    if found == _paper_model_shapes():
        # The commonest mix-up: the paper's checkpoint (ffhq.pt, lsun_*.pt) with the default digits preset;
        # one hint that fixes every flag beats a list of single flags.
        hints = ["these are the paper's 256x256 guided-diffusion weights: set ddpm.preset: adm256 "
                 "(and drop ddpm.model flags that contradict it)"]

    def listing(title: str, keys: list[str], show_shapes: bool = False) -> str:
        if not keys:
            return ""
        shown = [f"{k} (checkpoint {found[k]}, flags {expected[k]})" if show_shapes else k for k in keys[:8]]
        more = f" ... and {len(keys) - 8} more" if len(keys) > 8 else ""
        return f"\n  {title} ({len(keys)}): " + ", ".join(shown) + more

    raise ModelFlagsError(
        f"{source} does not match the model flags."
        + listing("shape mismatches", mismatched, show_shapes=True)
        + listing("missing from checkpoint", missing)
        + listing("unexpected in checkpoint", unexpected)
        + "\n  most likely wrong flag: "
        + "; ".join(hints)
    )


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Load a ``.pt`` state dict safely (``weights_only=True``: a user's pickle is never executed)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist; set ddpm.checkpoint to an existing .pt file")
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for corrupt or unsafe pickles
        raise ModelFlagsError(
            f"checkpoint {path} could not be loaded as a weights-only state dict ({type(error).__name__}: "
            f"{str(error).splitlines()[0] if str(error) else ''}); pass a guided-diffusion .pt state dict"
        ) from error
    if isinstance(loaded, dict) and "state_dict" in loaded and isinstance(loaded["state_dict"], dict):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, dict) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise ModelFlagsError(f"checkpoint {path} is not a state dict (a mapping of names to tensors)")
    return loaded


def load_guided_diffusion(path: str | Path, model_flags: dict[str, Any]) -> UNetModel:
    """Build the UNet from guided-diffusion flags and load its ``.pt`` state dict (fp16 ones too).

    Returns the model in eval mode, float32, on the CPU, also for ``use_fp16`` flags: guided-diffusion
    stores even fp16-trained models' weights in float32, and ``for_inference`` converts them when the
    model is run on CUDA.
    """
    model = create_unet(model_flags)
    state_dict = load_state_dict_file(path)
    check_state_dict(model, state_dict, f"checkpoint {path}")
    model.load_state_dict({key: value.float() for key, value in state_dict.items()})
    return model.eval()

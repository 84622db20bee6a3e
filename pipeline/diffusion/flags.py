"""Model flags without the model: guided-diffusion's flag names parsed into a ``UNetConfig``.

No torch here, so params can be loaded and checked (``pipeline.config``) without importing the network;
``pipeline.diffusion.unet`` builds the network from a ``UNetConfig``.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from pipeline.errors import ModelFlagsError

# channel_mult used when the flag is "" (the default for the size): guided-diffusion's script_util for
# 64-512, improved-diffusion's for 32 (guided-diffusion has no 32 default; improved-diffusion agrees at 64, 256).
DEFAULT_CHANNEL_MULT = {
    512: (0.5, 1, 1, 2, 2, 4, 4),
    256: (1, 1, 2, 2, 4, 4),
    128: (1, 1, 2, 3, 4),
    64: (1, 2, 3, 4),
    32: (1, 2, 2, 2),
}


# Flags of guided-/improved-diffusion's DIFFUSION_FLAGS that users paste into ddpm.model by mistake.
_NOT_FOR_FEATURES = "it does not change the network or its features; remove it from ddpm.model"
DIFFUSION_FLAGS = {
    "diffusion_steps": "set ddpm.diffusion_steps",
    "noise_schedule": "set ddpm.noise_schedule",
    "rescale_timesteps": "set ddpm.rescale_timesteps (true for improved-diffusion checkpoints)",
    "timestep_respacing": _NOT_FOR_FEATURES,
    "use_kl": _NOT_FOR_FEATURES,
    "predict_xstart": _NOT_FOR_FEATURES,
    "rescale_learned_sigmas": _NOT_FOR_FEATURES,
    "sigma_small": _NOT_FOR_FEATURES,
}



@dataclass(frozen=True)
class UNetConfig:
    """Resolved model flags (guided-diffusion's names; lists instead of its comma strings).

    ``attention_resolutions`` are given as image resolutions (as guided-diffusion's flags are) and
    turned into downsampling rates by ``attention_downsample_rates``.
    """

    image_size: int
    num_channels: int = 128
    num_res_blocks: int = 2
    channel_mult: tuple[float, ...] = ()
    attention_resolutions: tuple[int, ...] = (16, 8)
    num_heads: int = 4
    num_head_channels: int | None = None
    num_heads_upsample: int | None = None
    use_scale_shift_norm: bool = True
    resblock_updown: bool = False
    use_new_attention_order: bool = False
    learn_sigma: bool = False
    dropout: float = 0.0
    # Run the blocks in float16 for features (``for_inference``: CUDA only). The weights stay float32 in
    # checkpoints and pretraining stays float32 (no loss-scaled mixed-precision trainer here).
    use_fp16: bool = False
    in_channels: int = 3

    @property
    def out_channels(self) -> int:
        return 2 * self.in_channels if self.learn_sigma else self.in_channels

    @property
    def resolved_channel_mult(self) -> tuple[float, ...]:
        if self.channel_mult:
            return tuple(self.channel_mult)
        if self.image_size not in DEFAULT_CHANNEL_MULT:
            raise ModelFlagsError(
                f"channel_mult is empty and image_size {self.image_size} has no default "
                f"(defaults exist for {sorted(DEFAULT_CHANNEL_MULT)}); set ddpm.model.channel_mult, e.g. [1, 2, 2]"
            )
        return DEFAULT_CHANNEL_MULT[self.image_size]

    @property
    def attention_downsample_rates(self) -> tuple[int, ...]:
        return tuple(self.image_size // int(resolution) for resolution in self.attention_resolutions)

    def to_dict(self) -> dict[str, Any]:
        """Plain-Python flags (lists, not tuples) for checkpoints and store attributes."""
        out = asdict(self)
        out["channel_mult"] = list(self.channel_mult)
        out["attention_resolutions"] = list(self.attention_resolutions)
        return out


def _as_number_list(name: str, value: Any, kind: type) -> tuple:
    """Accept guided-diffusion's comma strings ("16,8", "" = default) and real YAML lists."""
    if value is None:
        return ()
    if isinstance(value, str):
        parts = [part.strip() for part in value.split(",") if part.strip()]
    elif isinstance(value, (list, tuple)):
        parts = list(value)
    else:
        raise ModelFlagsError(f"model flag {name}={value!r}: expected a list such as [16, 8] or a string '16,8'")
    try:
        numbers = tuple(kind(part) for part in parts)
    except (TypeError, ValueError) as error:
        raise ModelFlagsError(f"model flag {name}={value!r}: every entry must be a number") from error
    if kind is float:  # keep ints as ints so flags round-trip as written (1 not 1.0)
        numbers = tuple(int(n) if float(n).is_integer() else n for n in numbers)
    return numbers


def config_from_flags(model_flags: dict[str, Any]) -> UNetConfig:
    """Build a ``UNetConfig`` from flags in guided-diffusion's names (string or list forms).

    ``num_head_channels`` / ``num_heads_upsample`` of -1 (guided-diffusion's "unset") become None.
    ``class_cond`` is refused: class-conditional models need labels the segmentation task does not have.
    """
    flags = dict(model_flags)
    if flags.pop("class_cond", False):
        raise ModelFlagsError(
            "model flag class_cond=True is not supported: feature extraction runs the unconditional model; "
            "use an unconditional checkpoint or set class_cond: false"
        )
    # Flags of guided-diffusion's scripts that do not change the network.
    for ignored in ("use_checkpoint", "num_classes"):
        flags.pop(ignored, None)
    misplaced = sorted(set(flags) & set(DIFFUSION_FLAGS))
    if misplaced:
        raise ModelFlagsError("; ".join(f"{name} is a diffusion flag, not a model flag: {DIFFUSION_FLAGS[name]}"
                                        for name in misplaced))
    known = {field.name for field in fields(UNetConfig)}
    unknown = sorted(set(flags) - known)
    if unknown:
        raise ModelFlagsError(f"unknown model flag(s) {unknown}; known flags: {sorted(known)}")
    if "image_size" not in flags or flags["image_size"] is None:
        raise ModelFlagsError("model flag image_size is required")
    flags["channel_mult"] = _as_number_list("channel_mult", flags.get("channel_mult"), float)
    if "attention_resolutions" in flags:
        flags["attention_resolutions"] = _as_number_list("attention_resolutions", flags["attention_resolutions"], int)
    for name in ("num_head_channels", "num_heads_upsample"):
        if flags.get(name) == -1:
            flags[name] = None
    config = UNetConfig(**flags)
    for rate in config.attention_downsample_rates:
        if rate < 1:
            raise ModelFlagsError(
                f"attention_resolutions {list(config.attention_resolutions)} contains a resolution above "
                f"image_size {config.image_size}"
            )
    levels = len(config.resolved_channel_mult)
    if config.image_size % (2 ** (levels - 1)):
        raise ModelFlagsError(
            f"image_size {config.image_size} is not divisible by 2^{levels - 1} "
            f"(channel_mult has {levels} levels); choose a size such as {2 ** (levels - 1) * 8}"
        )
    return config


GROUP_NORM_GROUPS = 32  # guided-diffusion's normalization(): GroupNorm with 32 groups


def check_widths(config: UNetConfig) -> None:
    """The torch-free part of ``unet.check_model_builds``: every level's width (num_channels x channel_mult)
    must split into the 32 group-norm groups and into attention heads of num_head_channels, so params that
    cannot build a UNet fail at load time, in every stage, without importing the model code."""
    for mult in config.resolved_channel_mult:
        width = int(config.num_channels * mult)
        problem = None
        if width % GROUP_NORM_GROUPS:
            problem = f"num_channels ({width}) must be divisible by num_groups ({GROUP_NORM_GROUPS})"
        elif config.num_head_channels and width % config.num_head_channels:
            problem = f"channels ({width}) must be divisible by num_head_channels ({config.num_head_channels})"
        if problem:
            raise ModelFlagsError(f"ddpm.model flags do not build a UNet ({problem}); channel counts (num_channels x each "
                                  f"channel_mult) must be divisible by the 32 group-norm groups and by num_head_channels")


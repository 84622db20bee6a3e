"""Typed, frozen configuration loaded once from params.yaml.

One dataclass per params section. Unknown keys, wrong types and out-of-range values raise
``ConfigError`` naming the key (``ensemble.lr``) and the file, so a typo in ``dvc exp run -S`` fails
loudly instead of being ignored.
"""
from __future__ import annotations

import dataclasses
import enum
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pipeline.diffusion import NoiseSchedule
from pipeline.errors import ConfigError, check_timesteps
from pipeline.presets import MODEL_PRESETS
from pipeline.unet import ModelFlagsError, UNetConfig, config_from_flags



class UpsampleMode(str, enum.Enum):
    BILINEAR = "bilinear"
    NEAREST = "nearest"


class StoreLayout(str, enum.Enum):
    """``features.layout``: what a feature store keeps on disk (pipeline/store.py)."""

    PIXELS = "pixels"  # the upsampled [pixels, D] float16 matrix, as the paper's code holds it
    NATIVE = "native"  # each block's map at the resolution the UNet made it, upsampled when read


class NonSquarePolicy(str, enum.Enum):
    ERROR = "error"
    CENTER_CROP = "center_crop"


class ModelPreset(str, enum.Enum):
    """``ddpm.preset``: model flags and default blocks of pipeline/presets.py ``MODEL_PRESETS``."""

    DIGITS = "digits"  # the built-in 32-channel UNet for the digits (image_size = dataset.image_size)
    ADM256 = "adm256"  # the paper's 256x256 guided-diffusion checkpoints (lsun_*.pt, ffhq.pt)


class LossWeighting(str, enum.Enum):
    """``ddpm.train.loss_weighting``: how the ε-MSE of each example is weighted by its timestep."""

    UNIFORM = "uniform"  # Ho et al.'s simple loss: every timestep alike
    MIN_SNR = "min_snr"  # Hang et al. 2023 (Min-SNR-γ): weight min(SNR(t), γ) / SNR(t)


class LrSchedule(str, enum.Enum):
    """``ddpm.train.lr_schedule``, after ``warmup_steps`` of linear warm-up."""

    CONSTANT = "constant"
    COSINE = "cosine"  # half-cosine from lr to 0 at the last step (Loshchilov & Hutter, without restarts)


class Autocast(str, enum.Enum):
    NONE = "none"
    BFLOAT16 = "bfloat16"
    FLOAT16 = "float16"


BUILTIN_DATASET = "digits"


# What a custom (non-preset) dataset gets for these keys when they are null.
CUSTOM_DEFAULTS = {"ignore_label": 255, "min_class_pixels": 0, "val_images": 0}
PRESET_KEYS = ("image_size", "num_classes", "class_names", "ignore_label", "train_images", "val_images",
               "test_images", "min_class_pixels")


@dataclass(frozen=True)
class DatasetConfig:
    """``name: digits`` is the built-in set that ``prepare`` composes; any other name is a folder in the
    paper's layout at ``root`` (``real/train``, ``real/test``, optional ``unlabeled``). Keys left null are
    filled from the preset of ``name`` (pipeline/presets.py); a custom name must set them."""

    name: str = BUILTIN_DATASET
    root: str = "data/builtin"
    image_size: int | None = None
    num_classes: int | None = None
    class_names: tuple[str, ...] | None = None
    # Pixels with this label are never trained on or scored (255 usually; bedroom_28 uses 0).
    ignore_label: int | None = None
    train_images: int | None = None
    # Validation images: scored for every choice (blocks, steps, epochs, defaults), never trained on.
    # From real/val when the dataset has it, else held out of real/train after the training images.
    val_images: int | None = None
    test_images: int | None = None
    # Built-in set only: unlabeled canvases for DDPM pretraining, digit height in pixels, split seed.
    unlabeled_images: int = 4000
    digit_size: int = 24
    seed: int = 0
    # The paper's rule: a class covering fewer pixels than this in a training mask becomes ignore (0 = off).
    min_class_pixels: int | None = None
    non_square: NonSquarePolicy = NonSquarePolicy.ERROR

    def names(self) -> list[str]:
        if self.class_names is not None:
            return list(self.class_names)
        return [f"class_{index}" for index in range(self.num_classes)]

    def resolved(self) -> "DatasetConfig":
        """A copy with every null preset key filled from the preset named ``name``."""
        from pipeline.presets import PRESETS

        preset = PRESETS.get(self.name, {})
        values = {}
        for key in PRESET_KEYS:
            value = getattr(self, key)
            if value is None and key in preset:
                value = tuple(preset[key]) if key == "class_names" else preset[key]
            elif value is None and key in CUSTOM_DEFAULTS:
                value = CUSTOM_DEFAULTS[key]
            elif value is None and key != "class_names":
                raise ConfigError(
                    f"dataset.{key} is null and dataset.name={self.name!r} is not a preset "
                    f"({', '.join(PRESETS)}); set dataset.{key} for your dataset"
                )
            values[key] = value
        return dataclasses.replace(self, **values)


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 800
    batch_size: int = 32
    # lr 1e-3 after 100 warm-up steps, constant, uniform loss: the best of the recipes measured on val
    # (benchmarks/learning_curve.py, docs/benchmarks.md); Min-SNR-γ and cosine decay scored lower here.
    lr: float = 1e-3
    lr_schedule: LrSchedule = LrSchedule.CONSTANT
    warmup_steps: int = 100
    loss_weighting: LossWeighting = LossWeighting.UNIFORM
    min_snr_gamma: float = 5.0
    # EMA of the weights used for features; the rate ramps up as (1+k)/(10+k) until it reaches ema_rate,
    # so a short run is not dominated by the random init (0.999 without warm-up hurt at ~600 steps).
    ema_rate: float = 0.999
    seed: int = 0
    log_every: int = 10
    threads: int | None = None
    # A resumable state (model, EMA, optimizer, RNG, step) is written every state_every steps beside the
    # checkpoint; a rerun after a kill continues from it (0 = never).
    state_every: int = 100


@dataclass(frozen=True)
class DDPMConfig:
    # Model flags (and the blocks that `blocks: null` reads) come from this preset; keys given in `model`
    # (guided-diffusion's flag names) override the preset's one by one.
    preset: ModelPreset = ModelPreset.DIGITS
    model: dict = field(default_factory=dict)
    diffusion_steps: int = 1000
    noise_schedule: NoiseSchedule = NoiseSchedule.LINEAR
    # True for improved-diffusion checkpoints (the network sees t * 1000 / diffusion_steps).
    rescale_timesteps: bool = False
    checkpoint: str | None = "models/scratch"
    train: TrainConfig = field(default_factory=TrainConfig)

    def model_flags(self) -> dict[str, Any]:
        """The preset's model flags, overridden key by key by the non-null keys of ``model`` (params.yaml
        lists guided-diffusion's flags as null, so `-S ddpm.model.num_channels=64` needs no `++`)."""
        return {**MODEL_PRESETS[self.preset.value]["model"], **{k: v for k, v in self.model.items() if v is not None}}

    def preset_blocks(self) -> tuple[int, ...]:
        return tuple(MODEL_PRESETS[self.preset.value]["blocks"])


@dataclass(frozen=True)
class FeaturesConfig:
    upsample: UpsampleMode = UpsampleMode.BILINEAR
    noise_seed: int = 0
    # The paper's main setting shares one noise tensor; True draws new noise per image (seeded by index).
    stochastic_noise: bool = False
    batch_size: int = 16
    # Upper bound on rows per zarr chunk; the store uses gcd(chunk_pixels, H*W) so each image owns whole chunks.
    chunk_pixels: int = 4096
    codec: str = "zstd"
    clevel: int = 3
    autocast: Autocast = Autocast.NONE
    device: str = "auto"
    # Where extraction runs (placement only, the store is the same): 0 = in this process; N = a local
    # dask.distributed cluster of N worker processes; scheduler = the address of a running cluster
    # (workers need this package installed and the data and store paths visible). One worker per GPU.
    workers: int = 0
    scheduler: str | None = None
    # A tls:// scheduler needs these PEM files (dask's Security: CA, this client's certificate and key). A tcp://
    # address is plain TCP: dask sends pickles, unauthenticated, so anyone who reaches it runs code (docs/scaling.md).
    tls_ca_file: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    # The decoder blocks the stores hold (blocks must be among them): null = ddpm.preset's blocks, not
    # `blocks`, so extract depends on this key and never on `blocks` and a blocks sweep within it only refits.
    store_blocks: tuple[int, ...] | None = None
    layout: StoreLayout = StoreLayout.PIXELS

    def tls_files(self) -> dict[str, str] | None:
        """dask ``Security`` arguments for a tls:// scheduler, else None."""
        if self.scheduler is None or not self.scheduler.startswith("tls://"):
            return None
        return {"tls_ca_file": self.tls_ca_file, "tls_client_cert": self.tls_cert, "tls_client_key": self.tls_key}


class Stopping(str, enum.Enum):
    # A member group stops when its epoch loss has not improved by min_delta for `patience` epochs.
    PLATEAU = "plateau"
    # ddpm-segmentation's train_interpreter.py: from epoch index `warmup_epochs` on, every member stops
    # on its own once `batch_patience` batches in a row have not beaten its best batch loss.
    PAPER = "paper"


@dataclass(frozen=True)
class EnsembleConfig:
    members: int = 10
    # The paper trains at batch 64, lr 1e-3, ~5 epochs (its stopping rule). Chosen on the digits' val split
    # (benchmarks/fit_vs_paper.py --select): batch 512 at lr 4e-3 for 4 epochs scores at least the paper's
    # val mIoU in ~1/3.5 of its time; a step costs about as much at 512 rows as at 64 on a CPU.
    lr: float = 4e-3
    batch_size: int = 512
    epochs: int = 4
    stopping: Stopping = Stopping.PLATEAU
    patience: int = 2
    min_delta: float = 0.01
    # The paper's rule counts a batch as stale when it does not beat the best batch loss and stops after
    # more than 50 stale batches in a row, checked from 0-based epoch 4 on (train_interpreter.py).
    batch_patience: int = 50
    warmup_epochs: int = 4
    # Shuffle buffer in labeled rows (ignore rows are dropped when it is filled); it holds buffer_rows x D
    # float16 values. When every labeled row fits, the fit reads the store once and shuffles globally
    # every epoch, as the paper's in-RAM DataLoader does; otherwise rows are mixed across many chunks.
    buffer_rows: int = 65536
    # Members trained together in one pass over the data (null = members / parallel_passes). Fewer trade passes for memory:
    # 10 members of the paper's D=8448 MLP with Adam hold ~0.6 GB by themselves.
    members_per_pass: int | None = None
    # Passes trained at the same time, each on its own CPU thread. With threads: 1 each pass's arithmetic
    # stays on its thread, so with members_per_pass set the weights do not depend on this or on the core
    # count. Each running pass holds its own shuffle pool, so memory grows with it. The default is a fixed
    # 2, not the core count, so the grouping (and the weights) are the same on every machine: 10 members
    # as 2 passes of 5 fit in 0.54x the time of one pass of 10 on this 2-core machine.
    parallel_passes: int = 2
    seed: int = 0
    device: str = "auto"
    # CPU threads for the ensemble's arithmetic in fit and evaluate (the store reader has its own thread).
    # 1 gives the same weights and metrics in every run and on any core count; null uses all cores, ~1.5x
    # faster fitting on 2 cores, but MKL's multi-threaded batched GEMM then gave other last bits in 1 of
    # 66 traced fits and in 1 evaluate run (README "Determinism"). No effect on a GPU.
    threads: int | None = 1
    # The MLPs' matrix products in fit and evaluate: bfloat16 = torch.autocast (weights, Adam and the loss stay
    # float32), as good on val as float32 and 1.3-1.6x faster on this CPU (AVX512-BF16; benchmarks/fit_vs_paper.py);
    # emulated, so slower, on CPUs without native bf16 (a warning says so): none = float32 there.
    autocast: Autocast = Autocast.BFLOAT16


@dataclass(frozen=True)
class EvaluateConfig:
    overlays: int = 6
    # Cap on per-pixel rows written for DVC's confusion-matrix plot (a seeded sample beyond it).
    confusion_max_pixels: int = 20000
    batch_pixels: int = 16384


@dataclass(frozen=True)
class Params:
    t_steps: tuple[int, ...] = (50, 150, 250)
    # null = the blocks of ddpm.preset (digits: [0, 1, 2, 3]; adm256: the paper's [5, 6, 7, 8, 12]);
    # params_from_dict fills it, so stages always see a tuple.
    blocks: tuple[int, ...] | None = None
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    ddpm: DDPMConfig = field(default_factory=DDPMConfig)
    features: FeaturesConfig = field(default_factory=FeaturesConfig)
    ensemble: EnsembleConfig = field(default_factory=EnsembleConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)

    def unet_config(self) -> UNetConfig:
        """The model flags of ``ddpm.preset`` overridden by ``ddpm.model``; ``image_size`` defaults to
        ``dataset.image_size``. Every stage builds or checks its UNet from this."""
        flags = self.ddpm.model_flags()
        flags.setdefault("image_size", self.dataset.image_size)
        if flags["image_size"] != self.dataset.image_size:
            if self.ddpm.model.get("image_size") is not None:
                raise ConfigError(
                    f"ddpm.model.image_size={flags['image_size']} differs from dataset.image_size="
                    f"{self.dataset.image_size}; remove ddpm.model.image_size or make them equal"
                )
            raise ConfigError(
                f"ddpm.preset={self.ddpm.preset.value} is a model for {flags['image_size']}x{flags['image_size']} "
                f"images but dataset.image_size={self.dataset.image_size}; use a {flags['image_size']} px dataset "
                f"(the paper presets, e.g. dataset.name=ffhq_34) or ddpm.preset=digits with your own ddpm.model flags"
            )
        try:
            return config_from_flags(flags)
        except ModelFlagsError as error:
            raise ConfigError(f"ddpm.model: {error}") from error


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Check and convert one YAML value to the annotated type, naming ``key`` on failure."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _convert(value, option, key)
            except ConfigError as error:
                errors.append(str(error))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}: {value!r} matches none of {tp}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping of keys to values, got {value!r}")
        return _build(tp, value, key)
    if origin is tuple:
        (item_type, _ellipsis) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{key} must be a YAML list such as [1, 2], got {value!r}")
        return tuple(_convert(item, item_type, f"{key}[{index}]") for index, item in enumerate(value))
    if tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping, got {value!r}")
        return dict(value)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        allowed = [member.value for member in tp]
        if value not in allowed:
            raise ConfigError(f"{key}={value!r} is not one of {allowed}")
        return tp(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key} must be a string, got {value!r}")
        return value
    raise AssertionError(f"unsupported annotation {_type_name(tp)} for {key}")


def _build(cls: type, data: dict, prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(
            f"unknown params key(s) {', '.join(where + str(k) for k in unknown)}; "
            f"known keys{' of ' + prefix if prefix else ''}: {', '.join(names)}"
        )
    values = {}
    for name in names:
        if name in data:
            values[name] = _convert(data[name], hints[name], f"{prefix}.{name}" if prefix else name)
    return cls(**values)


def _validate(params: Params) -> None:
    def positive(key: str, value: float) -> None:
        if value <= 0:
            raise ConfigError(f"{key} must be > 0, got {value}")

    dataset = params.dataset
    if not params.t_steps:
        raise ConfigError("t_steps is empty; give at least one diffusion step, e.g. [50, 150, 250]")
    if len(set(params.t_steps)) != len(params.t_steps):
        raise ConfigError(f"t_steps {list(params.t_steps)} repeats a step; each step must appear once")
    check_timesteps(params.t_steps, params.ddpm.diffusion_steps)
    if not params.blocks:
        raise ConfigError("blocks is empty; list decoder blocks (output_blocks indices), e.g. [2, 3, 4, 5, 6], "
                          "or null for the blocks of ddpm.preset")
    if len(set(params.blocks)) != len(params.blocks):
        raise ConfigError(f"blocks {list(params.blocks)} repeats a block")
    _validate_store_blocks(params)
    for key in ("image_size", "num_classes", "train_images", "test_images"):
        positive(f"dataset.{key}", getattr(dataset, key))
    if dataset.val_images < 0:
        raise ConfigError(f"dataset.val_images must be >= 0 (0 = no validation split), got {dataset.val_images}")
    if dataset.num_classes < 2:
        raise ConfigError(f"dataset.num_classes must be >= 2, got {dataset.num_classes}")
    if dataset.num_classes > MAX_CLASSES:
        raise ConfigError(f"dataset.num_classes={dataset.num_classes}: masks, labels and predictions are uint8 and keep "
                          f"one value for the ignore label, so at most {MAX_CLASSES} classes fit; merge classes")
    if not 0 <= dataset.ignore_label <= 255:
        raise ConfigError(f"dataset.ignore_label={dataset.ignore_label} must be in [0, 255] (masks are uint8)")
    if dataset.class_names is not None and len(dataset.class_names) != dataset.num_classes:
        raise ConfigError(
            f"dataset.class_names has {len(dataset.class_names)} names but dataset.num_classes is "
            f"{dataset.num_classes}; give one name per class or null"
        )
    if dataset.name == BUILTIN_DATASET:
        positive("dataset.unlabeled_images", dataset.unlabeled_images)
        if not 8 <= dataset.digit_size <= dataset.image_size:
            raise ConfigError(
                f"dataset.digit_size={dataset.digit_size} must be in [8, dataset.image_size={dataset.image_size}]"
            )
        if dataset.num_classes != 11:
            raise ConfigError("the built-in digits have 11 classes (background + 10 digits); set dataset.num_classes: 11")
    train = params.ddpm.train
    for key in ("batch_size", "lr", "log_every"):
        positive(f"ddpm.train.{key}", getattr(train, key))
    if train.steps < 0:
        raise ConfigError(f"ddpm.train.steps must be >= 0 (0 keeps the random init), got {train.steps}")
    if not 0 <= train.ema_rate < 1:
        raise ConfigError(f"ddpm.train.ema_rate must be in [0, 1), got {train.ema_rate}")
    positive("ddpm.train.min_snr_gamma", train.min_snr_gamma)
    for key in ("warmup_steps", "state_every"):
        if getattr(train, key) < 0:
            raise ConfigError(f"ddpm.train.{key} must be >= 0 (0 = off), got {getattr(train, key)}")
    for key in ("batch_size", "chunk_pixels", "clevel"):
        positive(f"features.{key}", getattr(params.features, key))
    if params.features.workers < 0:
        raise ConfigError(f"features.workers must be >= 0 (0 = extract in this process), got {params.features.workers}")
    if params.features.codec not in ("zstd", "lz4", "blosclz", "zlib", "none"):
        raise ConfigError(f"features.codec={params.features.codec!r} is not one of zstd, lz4, blosclz, zlib, none")
    for key in ("members", "lr", "batch_size", "epochs", "buffer_rows", "batch_patience"):
        positive(f"ensemble.{key}", getattr(params.ensemble, key))
    if params.ensemble.batch_size < 2 or params.ensemble.buffer_rows < 2:
        raise ConfigError(f"ensemble.batch_size and ensemble.buffer_rows must be >= 2 (BatchNorm needs two rows per batch), "
                          f"got {params.ensemble.batch_size} and {params.ensemble.buffer_rows}")
    if params.ensemble.warmup_epochs < 0:
        raise ConfigError(f"ensemble.warmup_epochs must be >= 0, got {params.ensemble.warmup_epochs}")
    if params.ensemble.members_per_pass is not None and params.ensemble.members_per_pass < 1:
        raise ConfigError(f"ensemble.members_per_pass must be >= 1 or null, got {params.ensemble.members_per_pass}")
    if params.ensemble.parallel_passes < 1:
        raise ConfigError(f"ensemble.parallel_passes must be >= 1, got {params.ensemble.parallel_passes}")
    if params.ensemble.threads is not None and params.ensemble.threads < 1:
        raise ConfigError(f"ensemble.threads must be >= 1 or null (all cores), got {params.ensemble.threads}")
    if params.ensemble.patience < 1:
        raise ConfigError(f"ensemble.patience must be >= 1, got {params.ensemble.patience}")
    for key in ("confusion_max_pixels", "batch_pixels"):
        positive(f"evaluate.{key}", getattr(params.evaluate, key))
    _validate_numbers_and_devices(params)
    _build_unet_on_meta(params.unet_config())  # the flags build a network, so prepare rejects what pretrain would crash on


def _validate_store_blocks(params: Params) -> None:
    stored = params.features.store_blocks
    if not stored or len(set(stored)) != len(stored):
        raise ConfigError(f"features.store_blocks {list(stored)} must list decoder blocks, each once, or be null "
                          f"(the blocks of ddpm.preset)")
    missing = [block for block in params.blocks if block not in stored]
    if missing:
        raise ConfigError(
            f"blocks {list(params.blocks)} asks for block(s) {missing} that features.store_blocks {list(stored)} "
            f"does not store; set features.store_blocks to a list holding them, e.g. "
            f"{sorted(set(stored) | set(params.blocks))} (the extract stages rerun), or choose blocks within "
            f"{list(stored)}")


# Levels the codecs take (numcodecs' Blosc and zlib: 0..9, where 0 stores uncompressed: use codec: none for that).
CODEC_LEVELS = {"zstd": (1, 9), "lz4": (1, 9), "blosclz": (1, 9), "zlib": (1, 9), "none": (None, None)}
# Masks are uint8 and one value is the ignore label (255 usually).
MAX_CLASSES = 255
SEED_LIMIT = 2**63


def _validate_numbers_and_devices(params: Params) -> None:
    """Seeds, codec level, dropout, schedule and devices: what later stages would crash or go NaN on."""
    from pipeline.diffusion import betas_for_schedule
    from pipeline.runtime import check_device

    for key, seed in (("dataset.seed", params.dataset.seed), ("features.noise_seed", params.features.noise_seed),
                      ("ensemble.seed", params.ensemble.seed)):
        if not 0 <= seed < SEED_LIMIT:
            raise ConfigError(f"{key}={seed}: seeds must be in [0, 2**63) (numpy and torch refuse negative seeds)")
    low, high = CODEC_LEVELS[params.features.codec]
    if low is not None and not low <= params.features.clevel <= high:
        raise ConfigError(f"features.clevel={params.features.clevel} is outside [{low}, {high}], the levels of "
                          f"features.codec={params.features.codec}; use e.g. 3 (or codec: none for no compression)")
    dropout = params.ddpm.model_flags().get("dropout", 0.0)
    if isinstance(dropout, (int, float)) and not 0 <= dropout < 1:
        raise ConfigError(f"ddpm.model.dropout={dropout} must be in [0, 1) (a probability of dropping; 0 = off)")
    betas_for_schedule(params.ddpm.noise_schedule, params.ddpm.diffusion_steps)
    remote = params.features.scheduler is not None  # the cluster's workers, not this machine, run extraction
    check_device(params.features.device, "features.device", local=not remote)
    check_device(params.ensemble.device, "ensemble.device", local=True)
    _validate_tls(params.features)


def _validate_tls(features: FeaturesConfig) -> None:
    keys = {"features.tls_ca_file": features.tls_ca_file, "features.tls_cert": features.tls_cert,
            "features.tls_key": features.tls_key}
    if features.tls_files() is None:
        given = [key for key, value in keys.items() if value is not None]
        if given:
            raise ConfigError(f"{', '.join(given)} given but features.scheduler={features.scheduler!r} is not a tls:// "
                              f"address; use tls://host:port, or set {', '.join(given)} to null")
        return
    for key, value in keys.items():
        if value is None or not Path(value).is_file():
            raise ConfigError(f"features.scheduler={features.scheduler!r} is a TLS address, so {key} must be an existing "
                              f"PEM file, got {value!r} (docs/scaling.md: running extraction on a cluster safely)")


def _build_unet_on_meta(config: UNetConfig) -> None:
    """Build the UNet on the meta device (no memory, no arithmetic): group norms, heads and widths are checked."""
    import torch

    from pipeline.unet import create_unet

    try:
        with torch.device("meta"):
            create_unet(config)
    except (ValueError, RuntimeError, AssertionError, ZeroDivisionError) as error:
        raise ConfigError(f"ddpm.model flags do not build a UNet ({error}); channel counts (num_channels x each "
                          f"channel_mult) must be divisible by the 32 group-norm groups and by num_head_channels") from None


def params_from_dict(data: dict, source: str = "params") -> Params:
    try:
        params = _build(Params, data, "")
        params = dataclasses.replace(params, dataset=params.dataset.resolved())
        if params.blocks is None:  # blocks: null = the model preset's blocks
            params = dataclasses.replace(params, blocks=params.ddpm.preset_blocks())
        if params.features.store_blocks is None:  # store_blocks: null = the model preset's blocks too
            params = dataclasses.replace(params, features=dataclasses.replace(
                params.features, store_blocks=params.ddpm.preset_blocks()))
        _validate(params)
    except ConfigError as error:
        raise ConfigError(f"{source}: {error}") from None
    return params


class UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping (plain YAML keeps the last silently)."""


def _unique_mapping(loader: UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    lines: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        line = key_node.start_mark.line + 1
        if isinstance(key, typing.Hashable) and key in lines:
            raise ConfigError(f"key {key!r} appears twice in one section, on line {lines[key]} and line {line}; "
                              f"delete one of them (YAML would silently keep the last)")
        lines[key] = line
    return loader.construct_mapping(node, deep=deep)


UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)


def load_params(path: str | Path = "params.yaml") -> Params:
    """Load and validate params.yaml; every problem is a ``ConfigError`` naming the file and key."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"params file {path} does not exist; run from the repository root or pass --params")
    try:
        data = yaml.load(path.read_text(), Loader=UniqueKeyLoader)
    except yaml.YAMLError as error:
        raise ConfigError(f"{path} is not valid YAML: {error}") from None
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must be a mapping of params sections, got {type(data).__name__}")
    return params_from_dict(data, str(path))

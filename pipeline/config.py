"""Typed, frozen configuration loaded once from params.yaml (pydantic v2).

One model per params section: frozen, unknown keys refused, strict types (a YAML string is not a number,
``true`` is not 1) and each field's range declared beside it. Every problem is a ``ConfigError`` naming
the file, the key (``ensemble.lr``), the value and what to do, so a typo in ``dvc exp run -S`` fails
loudly instead of being ignored. The defaults here are the ones params.yaml lists (a test keeps them
equal); ``null`` in params.yaml means "the preset's value".

No torch and no network code is imported here: checks that need torch run where torch is at hand (the
device exists: ``pipeline.runtime.stage_params``; the UNet builds: each stage that builds one, with
``pipeline.diffusion.unet.check_model_builds``). Model widths are checked here, torch-free
(``flags.check_widths``).
"""
from __future__ import annotations

import math
import typing
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr

from pipeline.config_messages import validated
from pipeline.diffusion.flags import UNetConfig, check_widths, config_from_flags
from pipeline.diffusion.schedule import betas_for_schedule, space_timesteps
from pipeline.enums import (
    Autocast,
    Codec,
    Corruption,
    CorruptionConstants,
    FixedSigma,
    LabelFormat,
    LossWeighting,
    LrSchedule,
    ModelPreset,
    NoiseSchedule,
    NonSquarePolicy,
    Recipe,
    Representation,
    Stopping,
    StoreLayout,
    SuggestScore,
    UNetInit,
    UpsampleMode,
)
from pipeline.errors import ConfigError, ModelFlagsError, check_timesteps
from pipeline.presets import ENSEMBLE_RECIPES, MODEL_PRESETS, PRESETS, RECIPE_KEYS

__all__ = ["Autocast", "Codec", "ConfigError", "Corruption", "DatasetConfig", "DDPMConfig", "EnsembleConfig", "EvaluateConfig",
           "FeaturesConfig", "LabelFormat", "LossWeighting", "LrSchedule", "MaeConfig", "SwavConfig", "ModelFlags", "ModelPreset",
           "NoiseSchedule", "NonSquarePolicy", "Params", "Recipe", "Representation", "RuntimeConfig", "SegnetConfig",
           "Stopping", "StoreLayout", "TrainConfig", "UNetInit", "UpsampleMode", "load_params",
           "params_from_dict"]

BUILTIN_DATASET = "digits"
# The placeholder file that ddpm.checkpoint and segnet.weights default to: "start from random weights". dvc.yaml
# depends on the path these keys name, and DVC cannot depend on null (it fails on the path "None").
SCRATCH = "models/scratch"
# What a custom (non-preset) dataset gets for these keys when they are null.
CUSTOM_DEFAULTS = {"ignore_label": 255, "min_class_pixels": 0, "val_images": 0}
PRESET_KEYS = ("image_size", "num_classes", "class_names", "ignore_label", "train_images", "val_images",
               "test_images", "min_class_pixels")
# Levels the codecs take (numcodecs' Blosc and zlib: 0..9, where 0 stores uncompressed: use codec: none for that).
CODEC_LEVELS = {Codec.ZSTD: (1, 9), Codec.LZ4: (1, 9), Codec.BLOSCLZ: (1, 9), Codec.ZLIB: (1, 9), Codec.NONE: (None, None)}
# Masks are uint8 and one value is the ignore label (255 usually).
MAX_CLASSES = 255

# Field types. YAML gives lists and strings; strict mode would refuse a list for a tuple and a string for an
# enum, so those two are lax at the outer level while their items stay strict ("2" is not the integer 2).
T = typing.TypeVar("T")
Choice = Annotated[T, Field(strict=False)]
IntList = Annotated[tuple[StrictInt, ...], Field(strict=False)]
Positive = Annotated[StrictInt, Field(gt=0)]
NonNegative = Annotated[StrictInt, Field(ge=0)]
Seed = Annotated[StrictInt, Field(ge=0, lt=2**63, description="seeds must be in [0, 2**63): numpy and torch "
                                                              "refuse negative seeds")]
Rate = Annotated[float, Field(gt=0)]
Byte = Annotated[StrictInt, Field(ge=0, le=255, description="a colour channel in [0, 255]")]
Colour = Annotated[tuple[Byte, Byte, Byte], Field(strict=False)]


class Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", strict=True, validate_default=False)


class DatasetConfig(Section):
    """``name: digits`` is the built-in set that ``prepare`` composes; any other name is a folder in the
    paper's layout at ``root`` (``real/train``, ``real/test``, optional ``real/val`` and ``unlabeled``). Keys
    left null are filled from the preset of ``name`` (pipeline/presets.py); a custom name must set them."""

    name: str = BUILTIN_DATASET
    root: str = "data/builtin"
    image_size: Optional[Positive] = None
    num_classes: Optional[Annotated[StrictInt, Field(ge=2, description="background plus at least one class")]] = None
    class_names: Optional[Annotated[tuple[StrictStr, ...], Field(strict=False)]] = None
    # Pixels with this label are never trained on or scored (255 usually; bedroom_28 uses 0).
    ignore_label: Optional[Annotated[StrictInt, Field(ge=0, le=255, description="masks are uint8")]] = None
    train_images: Optional[Positive] = None
    # Validation images: scored for every choice (blocks, steps, epochs, defaults), never trained on.
    # From real/val when the dataset has it, else held out of real/train after the training images.
    val_images: Optional[Annotated[StrictInt, Field(ge=0, description="0 = no validation split")]] = None
    test_images: Optional[Positive] = None
    # The paper's rule: a class covering fewer pixels than this in a training mask becomes ignore (0 = off).
    min_class_pixels: Optional[NonNegative] = None
    non_square: Choice[NonSquarePolicy] = NonSquarePolicy.ERROR
    # The masks' format (pipeline/data/labels.py), converted once by prepare into the prepared layout's .npy masks:
    # npy = <stem>.npy beside each image; png = real/<split>/masks/<stem>.png, indexed (P) or greyscale (L) with
    # value = class, or colour masks read through class_colors; coco = the COCO JSON file coco_file.
    labels: Choice[LabelFormat] = LabelFormat.NPY
    # png only: [r, g, b] of each class, in class order (null = masks hold class indices). When given, every PNG
    # mask is read by colour, and a colour that is not listed (nor ignore_color) is an error.
    class_colors: Optional[Annotated[tuple[Colour, ...], Field(strict=False)]] = None
    ignore_color: Optional[Colour] = None  # png with class_colors: the colour that means ignore_label (VOC: [224, 224, 192])
    # coco only: the COCO file, relative to root; {split} is replaced by train, val and test (one file per split),
    # a path without it is one file for every split. Its images are matched to the split folders by file name.
    coco_file: StrictStr = "real/{split}/annotations.json"
    # coco only: COCO category_id -> class index (or ignore_label); a category used by an annotation but missing
    # here is an error. Where annotations overlap the smaller one wins (ties: the later one in the file).
    coco_categories: Optional[Annotated[dict[StrictInt, StrictInt], Field(strict=False)]] = None
    # coco only: the class of pixels no annotation covers (0 = background, or ignore_label).
    coco_background: NonNegative = 0
    # Built-in set only: unlabeled canvases for DDPM pretraining, digit height in pixels, split seed.
    unlabeled_images: Positive = 4000
    digit_size: StrictInt = 24
    seed: Seed = 0
    # Images prepare puts in its demo folder for the segment stage to show (0 = none): digits composes new
    # canvases from the unlabeled digits (never a train, val or test digit); a folder dataset gives the first
    # of its unlabeled/ images.
    demo_images: NonNegative = 6

    def names(self) -> list[str]:
        if self.class_names is not None:
            return list(self.class_names)
        return [f"class_{index}" for index in range(self.num_classes)]

    def resolved(self) -> "DatasetConfig":
        """A copy with every null preset key filled from the preset named ``name``."""
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
        return self.model_copy(update=values)


class TrainConfig(Section):
    """``ddpm.train``: pretraining on the unlabeled images (``ddpm.checkpoint: models/scratch``)."""

    steps: Annotated[StrictInt, Field(ge=0, description="0 keeps the random init")] = 800
    # The init of a UNet made from scratch (not of an imported checkpoint): guided = guided-diffusion's, whose
    # zero-initialised layers (each ResBlock's last conv, attention proj_out, the output conv) make an untrained
    # net nearly an identity map; dense = those layers drawn with PyTorch's default init like every other layer,
    # the fair random-network control (steps: 0, init: dense).
    init: Choice[UNetInit] = UNetInit.GUIDED
    batch_size: Positive = 32
    # lr 1e-3 after 100 warm-up steps, constant, uniform loss: the best of the recipes measured on val
    # (benchmarks/learning_curve.py, docs/benchmarks.md); Min-SNR-γ and cosine decay scored lower here.
    lr: Rate = 1e-3
    lr_schedule: Choice[LrSchedule] = LrSchedule.CONSTANT
    warmup_steps: Annotated[StrictInt, Field(ge=0, description="0 = off")] = 100
    loss_weighting: Choice[LossWeighting] = LossWeighting.UNIFORM
    min_snr_gamma: Rate = 5.0
    # EMA of the weights used for features; the rate ramps up as (1+k)/(10+k) until it reaches ema_rate,
    # so a short run is not dominated by the random init (0.999 without warm-up hurt at ~600 steps).
    ema_rate: Annotated[float, Field(ge=0, lt=1, description="a rate in [0, 1)")] = 0.999
    seed: Seed = 0
    # The UNet's forward pass under torch.autocast (bfloat16: its convolutions and attention in bf16; the weights,
    # Adam, the EMA and the loss stay float32). none = float32 throughout. bfloat16 is 1.48x faster here at the same
    # val mIoU within one seed's spread (benchmarks/results/learning_curve_bf16.json, docs/benchmarks.md).
    autocast: Choice[Autocast] = Autocast.BFLOAT16
    log_every: Positive = 10
    # A resumable state (model, EMA, optimizer, RNG, step) is written every state_every steps beside the
    # checkpoint; a rerun after a kill continues from it (0 = never).
    state_every: Annotated[StrictInt, Field(ge=0, description="0 = off")] = 100


class ModelFlags(Section):
    """``ddpm.model``: guided-diffusion's model flags; null = the value of ``ddpm.preset``. Lists are YAML
    lists (``channel_mult: [1, 1, 2, 2, 4, 4]``, not guided-diffusion's ``"1,1,2,2,4,4"``), unset is null
    (not its -1)."""

    image_size: Optional[Positive] = None  # null = dataset.image_size
    num_channels: Optional[Positive] = None
    num_res_blocks: Optional[Positive] = None
    channel_mult: Optional[Annotated[tuple[Annotated[float, Field(gt=0)], ...], Field(strict=False)]] = None
    attention_resolutions: Optional[Annotated[tuple[Positive, ...], Field(strict=False)]] = None
    num_heads: Optional[Positive] = None
    num_head_channels: Optional[Positive] = None
    num_heads_upsample: Optional[Positive] = None
    use_scale_shift_norm: Optional[bool] = None
    resblock_updown: Optional[bool] = None
    use_new_attention_order: Optional[bool] = None
    learn_sigma: Optional[bool] = None
    dropout: Optional[Annotated[float, Field(ge=0, lt=1, description="a probability of dropping; 0 = off")]] = None
    use_fp16: Optional[bool] = None

    def given(self) -> dict[str, Any]:
        """The flags set here (not null), in guided-diffusion's names."""
        return {key: value for key, value in self.model_dump().items() if value is not None}


class DDPMConfig(Section):
    # Model flags (and the blocks that `blocks: null` reads) come from this preset; keys given in `model`
    # (guided-diffusion's flag names) override the preset's one by one.
    preset: Choice[ModelPreset] = ModelPreset.DIGITS
    checkpoint: Optional[StrictStr] = SCRATCH
    diffusion_steps: Positive = 1000
    noise_schedule: Choice[NoiseSchedule] = NoiseSchedule.LINEAR
    # True for improved-diffusion checkpoints (the network sees t * 1000 / diffusion_steps).
    rescale_timesteps: bool = False
    model: ModelFlags = ModelFlags()
    train: TrainConfig = TrainConfig()

    def model_flags(self) -> dict[str, Any]:
        """The preset's model flags, overridden key by key by the non-null keys of ``model`` (params.yaml
        lists guided-diffusion's flags as null, so `-S ddpm.model.num_channels=64` needs no `++`)."""
        return {**MODEL_PRESETS[self.preset.value]["model"], **self.model.given()}

    def preset_blocks(self) -> tuple[int, ...]:
        return tuple(MODEL_PRESETS[self.preset.value]["blocks"])


class FeaturesConfig(Section):
    upsample: Choice[UpsampleMode] = UpsampleMode.BILINEAR
    noise_seed: Seed = 0
    # The paper's main setting shares one noise tensor; True draws new noise per image (seeded by index).
    stochastic_noise: bool = False
    batch_size: Positive = 16
    # Upper bound on rows per zarr chunk; the store uses gcd(chunk_pixels, H*W) so each image owns whole chunks.
    chunk_pixels: Positive = 4096
    codec: Choice[Codec] = Codec.ZSTD
    clevel: Positive = 3
    autocast: Choice[Autocast] = Autocast.NONE
    # Where extraction runs (placement only, the store is the same): 0 = in this process; N = a local
    # dask.distributed cluster of N worker processes; scheduler = the address of a running cluster
    # (workers need this package installed and the data and store paths visible). One worker per GPU.
    workers: Annotated[StrictInt, Field(ge=0, description="0 = extract in this process")] = 0
    scheduler: Optional[StrictStr] = None
    # A tls:// scheduler needs these PEM files (dask's Security: CA, this client's certificate and key). A tcp://
    # address is plain TCP: dask sends pickles, unauthenticated, so anyone who reaches it runs code (docs/scaling.md).
    tls_ca_file: Optional[StrictStr] = None
    tls_cert: Optional[StrictStr] = None
    tls_key: Optional[StrictStr] = None
    # Baselines through the same stages (docs/analyses.md): ddpm, rgb or rgb_patch (patch_size x patch_size
    # pixels), or mae (the masked autoencoder of section mae). All but ddpm ignore t (each store of t_steps holds
    # the same values: run them with one step).
    representation: Choice[Representation] = Representation.DDPM
    patch_size: Annotated[StrictInt, Field(ge=1, description="an odd number: the pixel is the centre")] = 5
    # The features of noise_draws noise draws, averaged (the paper's noise variants; 1 = one draw). Draw j uses
    # seed noise_seed + j, shared by all images, or per image with stochastic_noise.
    noise_draws: Annotated[StrictInt, Field(ge=1, description="1 = one noise draw")] = 1
    # The decoder blocks the stores hold (blocks must be among them): null = ddpm.preset's blocks, not
    # `blocks`, so extract depends on this key and never on `blocks` and a blocks sweep within it only refits.
    store_blocks: Optional[IntList] = None
    layout: Choice[StoreLayout] = StoreLayout.PIXELS

    def representation_id(self) -> str:
        """What a store records as its representation: ``ddpm``, ``rgb``, ``rgb_patch<k>``, ``mae`` or ``swav``."""
        if self.representation is Representation.RGB_PATCH:
            return f"rgb_patch{self.patch_size}"
        return self.representation.value

    def tls_files(self) -> dict[str, str] | None:
        """dask ``Security`` arguments for a tls:// scheduler, else None."""
        if self.scheduler is None or not self.scheduler.startswith("tls://"):
            return None
        return {"tls_ca_file": self.tls_ca_file, "tls_client_cert": self.tls_cert, "tls_client_key": self.tls_key}


class EnsembleConfig(Section):
    members: Positive = 10
    # lr, batch_size, epochs, stopping and autocast left null take the recipe's values (pipeline/presets.py
    # ENSEMBLE_RECIPES), and a key set explicitly wins, as dataset keys and dataset presets do; resolved() fills
    # them, so the stages see numbers. fast (the default): batch 512 at lr 4e-3 for at most 4 epochs, plateau
    # stopping, bf16 products, chosen on the digits' val split (benchmarks/fit_vs_paper.py --select): at least the
    # paper's val mIoU in ~1/3.5 of its time; a step costs about as much at 512 rows as at 64 on a CPU. paper:
    # the paper's fit (train_interpreter.py): lr 1e-3, batch 64, at most 100 epochs, its stopping rule, float32.
    recipe: Choice[Recipe] = Recipe.FAST
    lr: Optional[Rate] = None
    batch_size: Optional[Annotated[StrictInt, Field(ge=2, description="BatchNorm needs two rows per batch")]] = None
    epochs: Optional[Positive] = None  # at most (a stopping rule may end a member sooner)
    stopping: Optional[Choice[Stopping]] = None
    # Optimizer steps (batches) per member whatever the number of labeled images: null = train by epochs as
    # above; N = exactly N batches, cycling epochs over the pool as often as it takes, with no stopping rule
    # (epochs and stopping are not used). The sample-efficiency sweep sets it, so 1 image and 50 images get the
    # same number of Adam steps instead of ~8 against ~390 at batch 512 for 4 epochs.
    steps: Optional[Positive] = None
    patience: Positive = 2
    min_delta: Annotated[float, Field(ge=0)] = 0.01
    # The paper's rule counts a batch as stale when it does not beat the best batch loss and stops after
    # more than 50 stale batches in a row, checked from 0-based epoch 4 on (train_interpreter.py).
    batch_patience: Annotated[StrictInt, Field(ge=0, description="0 = stop at the first stale batch")] = 50
    warmup_epochs: NonNegative = 4
    # The shuffle pool of labeled rows (ignore rows are dropped when it is filled), sized in memory: buffer_mb MiB of
    # rows of D values (2 bytes each: float16, or bfloat16 under bf16 autocast), or buffer_rows rows when that is set.
    # When every labeled row fits, the fit reads the store once and shuffles globally every epoch, as the paper's
    # in-RAM DataLoader does; otherwise rows are mixed across many chunks. A budget in bytes rather than rows keeps
    # the memory the same at any D while narrow features get the whole split: 1024 MiB is 63,550 rows at the paper's
    # D = 8448 (the earlier default was 65,536 rows at every D) and 279,620 at D = 1920 (docs/benchmarks.md).
    buffer_mb: Positive = 1024
    buffer_rows: Optional[Annotated[StrictInt, Field(ge=2, description="BatchNorm needs two rows per batch")]] = None
    # Members trained together in one pass over the data (null = members / parallel_passes). Fewer trade passes for memory:
    # 10 members of the paper's D=8448 MLP with Adam hold ~0.6 GB by themselves.
    members_per_pass: Optional[Positive] = None
    # Passes trained at the same time, each on its own CPU thread running one thread of arithmetic, so with
    # members_per_pass set the weights depend neither on this nor on the core count (docs/determinism.md).
    # The default is a fixed 2, not the core count, so the grouping (and the weights) are the same on every
    # machine: 10 members as 2 passes of 5 fit in 0.54x the time of one pass of 10 on this 2-core machine.
    parallel_passes: Positive = 2
    seed: Seed = 0
    # The MLPs' matrix products in fit and evaluate: bfloat16 = torch.autocast (weights, Adam and the loss stay
    # float32), as good on val as float32 and 1.3-1.6x faster on this CPU (AVX512-BF16; benchmarks/fit_vs_paper.py);
    # emulated, so slower, on CPUs without native bf16 (a warning says so): none = float32 there.
    autocast: Optional[Choice[Autocast]] = None
    # Sample efficiency (docs/analyses.md): fit on train_images of the store's train images, drawn with
    # train_subset_seed (null = all of them). Only fit and evaluate rerun: the stores stay as they are.
    train_images: Optional[Positive] = None
    train_subset_seed: Seed = 0

    def resolved(self) -> "EnsembleConfig":
        """A copy with every null recipe key (lr, batch_size, epochs, stopping, autocast) filled from
        ``ENSEMBLE_RECIPES[recipe]``; keys given explicitly stay as given. Idempotent."""
        recipe = ENSEMBLE_RECIPES[self.recipe.value]
        filled = {key: recipe[key] for key in RECIPE_KEYS if getattr(self, key) is None}
        if "stopping" in filled:
            filled["stopping"] = Stopping(filled["stopping"])
        if "autocast" in filled:
            filled["autocast"] = Autocast(filled["autocast"])
        return self.model_copy(update=filled) if filled else self

    def pool_rows(self, dim: int, itemsize: int = 2) -> int:
        """Rows of the shuffle pool for ``dim`` features of ``itemsize`` bytes: ``buffer_rows`` when set, else as
        many as ``buffer_mb`` MiB hold (at least 2, for BatchNorm)."""
        if self.buffer_rows is not None:
            return self.buffer_rows
        return max(2, self.buffer_mb * 2**20 // (dim * itemsize))

    def given_by(self, key: str) -> str:
        """Where a recipe key's value comes from, for messages: ``ensemble.epochs=4 (recipe fast)``."""
        value = getattr(self, key)
        value = value.value if isinstance(value, Enum) else value
        source = " (recipe " + self.recipe.value + ")" if value == ENSEMBLE_RECIPES[self.recipe.value].get(key) else ""
        return f"ensemble.{key}={value}{source}"


class EvaluateConfig(Section):
    overlays: NonNegative = 6
    # Cap on per-pixel rows written for DVC's confusion-matrix plot (a seeded sample beyond it).
    confusion_max_pixels: Positive = 20000
    batch_pixels: Positive = 16384


class RobustnessConfig(Section):
    """Stage robustness: the test split corrupted, features made on the fly, scored by the fitted ensemble."""

    corruptions: Annotated[tuple[Choice[Corruption], ...], Field(strict=False, min_length=1)] = tuple(Corruption)
    # 1 (mild) .. 5 (strong), as ImageNet-C numbers them
    severities: Annotated[tuple[Annotated[StrictInt, Field(ge=1, le=5)], ...], Field(strict=False, min_length=1)] = (1, 3, 5)
    seed: Seed = 0  # the Gaussian noise's draws
    # The severities' published constants: auto = ImageNet-C's for images of 128 px and more, CIFAR-10-C's below
    # (pipeline/analysis/corruptions.py); metrics/robustness.json records which were used.
    constants: Choice[CorruptionConstants] = CorruptionConstants.AUTO


class KMeansConfig(Section):
    """Stage kmeans: k-means clusters of the per-pixel features of a few test images, one map per (t, block)."""

    images: Positive = 4
    k: Positive = 5  # the paper's figure shows k = 5
    t_steps: Annotated[IntList, Field(min_length=1)] = (50, 250)
    blocks: Annotated[IntList, Field(min_length=1)] = (1, 3)
    iterations: Positive = 30
    seed: Seed = 0


DEVICE_PATTERN = r"^(auto|cpu|mps|cuda(:[0-9]+)?)$"


class SegmentConfig(Section):
    """Stage segment: the folder it segments (read by dvc.yaml's templating, not by Python). The default is
    prepare's demo folder (``dataset.demo_images`` canvases); set it to your own folder of images."""

    images: Annotated[StrictStr, Field(min_length=1)] = "data/demo"


class SampleConfig(Section):
    """Stage sample (DatasetDDPM, docs/paper.md): images drawn from the DDPM (pipeline/diffusion/sample.py)."""

    images: Positive = 32
    batch_size: Positive = 8  # images sampled at once; each image's noise is its own, so results do not depend on it
    # guided-diffusion's timestep_respacing: a step count (50 = 50 evenly spaced of ddpm.diffusion_steps), counts per
    # equal section ("10,15,20") or "ddim<N>" (the DDIM paper's integer stride); at most ddpm.diffusion_steps.
    steps: Union[Positive, StrictStr] = 50
    # null = the ancestral sampler (p_sample); a number in [0, 1] = DDIM with that eta (0 = deterministic given x_T)
    eta: Optional[Annotated[float, Field(ge=0, le=1, description="DDIM's eta in [0, 1], or null for ancestral "
                                                                 "sampling")]] = None
    # Models without learn_sigma (learned ones use their own): small = the posterior variance, large = beta_t
    # (guided-diffusion's default). Over 50 respaced steps large left grainy backgrounds on the digits' DDPM and small
    # clean ones, as Nichol & Dhariwal (2021, "Improving sampling speed") report for fixed variances and few steps.
    fixed_sigma: Choice[FixedSigma] = FixedSigma.SMALL
    seed: Seed = 0


class DatasetDDPMConfig(Section):
    """Stage label (DatasetDDPM): the samples labeled by the ensemble, the most uncertain dropped.

    Images are ranked by uncertainty (the mean of their pixels' top-decile Jensen-Shannon disagreement);
    ``drop_uncertain`` x images (rounded down) of the most uncertain are dropped. ``drop_least_uncertain: k`` > 0
    reproduces the official train_deeplab.py's ``idxs[k: -f + k]`` (k = 30 there): the kept window of the
    ranking shifts k places, so the k least uncertain go too and only f - k of the most uncertain do."""

    drop_uncertain: Annotated[float, Field(ge=0, lt=1, description="a fraction of the images in [0, 1)")] = 0.1
    drop_least_uncertain: NonNegative = 0
    grid_images: Positive = 8  # images of each side (kept, dropped) in plots/samples.png


class SegnetConfig(Section):
    """Stages train_segnet and evaluate_segnet (DatasetDDPM): a SegFormer (transformers'
    ``SegformerForSemanticSegmentation``, random init) trained on the label stage's kept samples, its epoch
    chosen on the val split. One entry per encoder stage in each of the five lists (the same length each);
    a stage's map is its input's side divided by its stride (rounded up) and must be at least its
    ``sr_ratios`` entry (the attention's key/value reduction). The defaults are a 0.42M-parameter net for
    32 px images whose first stage keeps the full resolution; SegFormer-B0 is hidden_sizes [32, 64, 160, 256],
    depths [2, 2, 2, 2], attention_heads [1, 2, 5, 8], sr_ratios [8, 4, 2, 1], patch_sizes [7, 3, 3, 3],
    strides [4, 2, 2, 2], decoder_hidden_size 256. The optimiser is the paper's: Adam, lr 1e-3, batch 8.
    ``weights`` may name a local file whose encoder weights the network starts from (its shapes must be the
    ones these params build); the decode head always starts freshly initialised."""

    hidden_sizes: Annotated[tuple[Positive, ...], Field(strict=False, min_length=1)] = (32, 64, 128)
    depths: Annotated[tuple[Positive, ...], Field(strict=False, min_length=1)] = (1, 1, 1)
    attention_heads: Annotated[tuple[Positive, ...], Field(strict=False, min_length=1)] = (1, 2, 4)
    sr_ratios: Annotated[tuple[Positive, ...], Field(strict=False, min_length=1)] = (4, 2, 1)
    patch_sizes: Annotated[tuple[Positive, ...], Field(strict=False, min_length=1)] = (3, 3, 3)
    strides: Annotated[tuple[Positive, ...], Field(strict=False, min_length=1)] = (1, 2, 2)
    mlp_ratio: Positive = 4
    decoder_hidden_size: Positive = 64
    lr: Rate = 1e-3
    batch_size: Positive = 8
    epochs: Positive = 20
    # null: ``epochs`` epochs whatever the synthetic set's size (the paper's recipe, for 10,000 samples). N: as many
    # whole epochs as reach N optimizer steps (``epochs_for``), so that a sweep over synthetic-set sizes keeps the
    # optimizer steps (at 20 epochs, 29 samples get 80 steps and 231 get 580); ``epochs`` is then not used. Chosen
    # on val: 2320 steps gave 0.146 at 32 samples and 0.180 at 256, against 0.094-0.100 and 0.119-0.121 at 20 epochs;
    # at the default 32 samples val peaked at step 528 (epoch 132) and fell to ~0.124 by 2320, so the default is half
    # of that, 1160 (same epoch kept, 75 s less); the size sweep (analyses/experiments.py) sets 2320, which 256
    # samples need (their best epoch: step 2059).
    steps: Optional[Positive] = 1160
    seed: Seed = 0
    # The encoder's initial weights (pipeline/segnet/weights.py): a transformers SegFormer folder written by
    # save_pretrained (a local copy of nvidia/mit-b0, say) or a .pt / .safetensors state dict of a SegformerModel
    # or SegformerForSemanticSegmentation. models/scratch (the placeholder) or null: random init.
    weights: Optional[StrictStr] = SCRATCH

    def epochs_for(self, samples: int) -> int:
        """The epochs trained on ``samples`` samples: ``epochs``, or with ``steps`` set the fewest whole epochs of
        ``ceil(samples / batch_size)`` batches that make at least ``steps`` optimizer steps."""
        if self.steps is None:
            return self.epochs
        batches = max(1, -(-samples // self.batch_size))
        return -(-self.steps // batches)

    def weights_path(self) -> Path | None:
        """The file or folder ``weights`` names; None for a random init (null or the ``models/scratch`` placeholder)."""
        if self.weights is None or Path(self.weights) == Path(SCRATCH):
            return None
        return Path(self.weights)

    def stage_sides(self, image_size: int) -> list[int]:
        """The side of each encoder stage's map for ``image_size`` inputs (a stride-s conv with padding
        patch // 2 gives ceil(side / s) for odd patches)."""
        sides, side = [], image_size
        for patch, stride in zip(self.patch_sizes, self.strides):
            side = (side + 2 * (patch // 2) - patch) // stride + 1
            sides.append(side)
        return sides


class SuggestConfig(Section):
    """Stage suggest: the unlabeled images worth labeling next, by the ensemble's disagreement on them."""

    pool_images: Positive = 200  # unlabeled images scored, a seeded sample of data/prepared/unlabeled (all if fewer)
    count: Positive = 10  # images suggested
    score: Choice[SuggestScore] = SuggestScore.TOP_DECILE
    # true: greedy k-center on the images' mean feature vectors among the `candidates` top-scored images, so the
    # suggestions are spread over what the pool looks like rather than `count` near-copies of one hard case
    diversity: bool = False
    candidates: Positive = 50  # top-scored images kept (with their maps) for the diversity pick; >= count
    seed: Seed = 0  # the pool's sample


class RuntimeConfig(Section):
    """Where and on how many threads every stage computes; results do not depend on it except as noted."""

    # auto = the first CUDA GPU if there is one, else the CPU (every stage: pretrain, extract, fit, evaluate,
    # segment). On a dask cluster (features.scheduler) the workers resolve it on their own machines.
    device: Annotated[StrictStr, Field(pattern=DEVICE_PATTERN,
                                       description="a device; use auto, cpu, cuda, cuda:<index> or mps")] = "auto"
    # torch's CPU threads for pretraining and extraction (null = all cores). The ensemble (fit, evaluate)
    # always computes on one thread per pass (ensemble.parallel_passes), so its weights and metrics are the
    # same on any core count. The environment variable DDPM_SEG_THREADS overrides this.
    threads: Optional[Positive] = None


class MaeConfig(Section):
    """``mae``: the masked autoencoder of ``features.representation: mae`` (He et al. 2022, transformers' ViTMAE),
    trained from random weights on the unlabeled images by the pretrain_mae stage (nothing is trained, and a
    placeholder written, while the representation is another). The image size is ``dataset.image_size``; its
    features are the patch tokens of the encoder blocks ``blocks`` lists (0 = the first), at mask ratio 0.
    Defaults: a small ViT for 32 px on a CPU (not chosen on val)."""

    patch_size: Positive = 4  # must divide dataset.image_size: 32 px -> an 8 x 8 grid of tokens
    hidden_size: Positive = 128  # the encoder's width; a multiple of num_attention_heads
    num_hidden_layers: Positive = 4  # encoder blocks; `blocks` selects among them
    num_attention_heads: Positive = 4
    intermediate_size: Positive = 512  # the encoder MLP's width
    # The light decoder, used only in pretraining (MAE's asymmetric design).
    decoder_hidden_size: Positive = 64
    decoder_num_hidden_layers: Positive = 2
    decoder_num_attention_heads: Positive = 4
    decoder_intermediate_size: Positive = 256
    mask_ratio: Annotated[float, Field(gt=0, lt=1, description="a fraction of the patches in (0, 1)")] = 0.75
    norm_pix_loss: bool = True  # the loss on each masked patch's normalised pixels (MAE's default)
    # The DDPM's default pretraining time here (800 bf16 steps, 4.6 min on 2 cores): an equal budget
    steps: Annotated[StrictInt, Field(ge=0, description="0 keeps the random init")] = 3000
    batch_size: Positive = 64
    # AdamW (betas 0.9, 0.95 as MAE) with linear warm-up then a half-cosine to 0 (transformers' schedule).
    lr: Rate = 1e-3
    weight_decay: Annotated[float, Field(ge=0)] = 0.05
    warmup_steps: NonNegative = 100
    seed: Seed = 0
    log_every: Positive = 10
    state_every: Annotated[StrictInt, Field(ge=0, description="0 = off")] = 100  # a resumable state every N steps

    def vit_config(self, image_size: int) -> dict[str, Any]:
        """The keyword arguments of transformers' ``ViTMAEConfig`` for ``image_size`` px images."""
        return {"image_size": image_size, "patch_size": self.patch_size, "num_channels": 3,
                "hidden_size": self.hidden_size, "num_hidden_layers": self.num_hidden_layers,
                "num_attention_heads": self.num_attention_heads, "intermediate_size": self.intermediate_size,
                "decoder_hidden_size": self.decoder_hidden_size,
                "decoder_num_hidden_layers": self.decoder_num_hidden_layers,
                "decoder_num_attention_heads": self.decoder_num_attention_heads,
                "decoder_intermediate_size": self.decoder_intermediate_size,
                "mask_ratio": self.mask_ratio, "norm_pix_loss": self.norm_pix_loss}


class SwavConfig(Section):
    """``swav``: SwAV (Caron et al. 2020) for ``features.representation: swav``: a ResNet (transformers'
    ResNetModel) trained from random weights on the unlabeled images by the pretrain_swav stage (nothing is
    trained, and a placeholder written, while the representation is another). Its features are the outputs of
    every other residual block of each stage (the paper's hooks), which ``blocks`` indexes (0 = the first).
    Defaults: a small ResNet for 32 px on a CPU; the loss, crop and Sinkhorn settings are SwAV's (not chosen
    on val)."""

    embedding_size: Positive = 32  # the stem's width (a 7x7 stride-2 conv and a max pool: 1/4 of the image)
    hidden_sizes: Annotated[tuple[Positive, ...], Field(strict=False, min_length=1)] = (32, 64, 128, 256)
    depths: Annotated[tuple[Positive, ...], Field(strict=False, min_length=1)] = (2, 2, 2, 2)  # blocks per stage
    layer_type: Annotated[StrictStr, Field(pattern="^(basic|bottleneck)$",
                                           description="basic (ResNet-18/34) or bottleneck (ResNet-50)")] = "basic"
    projection_hidden: Positive = 256
    projection_dim: Positive = 64
    prototypes: Positive = 32  # SwAV's K (3000 for ImageNet's 1000 classes)
    temperature: Rate = 0.1
    sinkhorn_epsilon: Rate = 0.05
    sinkhorn_iterations: Positive = 3
    local_crops: NonNegative = 4  # small crops beside the 2 global ones (multi-crop)
    local_crop_size: Optional[Positive] = None  # null = half the image size
    global_crop_scale: Annotated[float, Field(gt=0, lt=1, description="a fraction of the image in (0, 1)")] = 0.14
    local_crop_scale: Annotated[float, Field(gt=0, lt=1, description="a fraction of the image in (0, 1)")] = 0.05
    flip: bool = True
    # SwAV's colour distortion strength s (its default 1.0 for colour images); 0 here: at 1.0 and 0.4 SwAV collapsed
    # on the grayscale digits (loss at ln(prototypes), uniform predictions; benchmarks/swav_collapse.py)
    jitter: Annotated[float, Field(ge=0, description="SwAV's colour distortion strength s")] = 0.0
    freeze_prototypes_steps: NonNegative = 100  # the prototypes are not updated in the first steps
    # The DDPM's default pretraining time here (benchmarks/pretraining_budget.py: 0.169 s a step against 0.330)
    steps: Annotated[StrictInt, Field(ge=0, description="0 keeps the random init")] = 1500
    batch_size: Positive = 64
    # AdamW with linear warm-up then a half-cosine to 0 (transformers' schedule), as the MAE's
    lr: Rate = 1e-3
    weight_decay: Annotated[float, Field(ge=0)] = 1e-6
    warmup_steps: NonNegative = 100
    seed: Seed = 0
    log_every: Positive = 10
    state_every: Annotated[StrictInt, Field(ge=0, description="0 = off")] = 100  # a resumable state every N steps

    def resnet_config(self) -> dict[str, Any]:
        """The keyword arguments of transformers' ``ResNetConfig``."""
        return {"num_channels": 3, "embedding_size": self.embedding_size, "hidden_sizes": list(self.hidden_sizes),
                "depths": list(self.depths), "layer_type": self.layer_type, "hidden_act": "relu",
                "downsample_in_first_stage": False}

    def feature_blocks(self) -> int:
        """How many blocks ``blocks`` chooses among: every other residual block of each stage."""
        return sum((depth + 1) // 2 for depth in self.depths)


class Params(Section):
    t_steps: IntList = (50, 150, 250)
    # null = the blocks of ddpm.preset (digits: [0, 1, 2, 3]; adm256: the paper's [5, 6, 7, 8, 12]);
    # params_from_dict fills it, so stages always see a tuple.
    blocks: Optional[IntList] = None
    dataset: DatasetConfig = DatasetConfig()
    ddpm: DDPMConfig = DDPMConfig()
    features: FeaturesConfig = FeaturesConfig()
    ensemble: EnsembleConfig = EnsembleConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    robustness: RobustnessConfig = RobustnessConfig()
    kmeans: KMeansConfig = KMeansConfig()
    segment: SegmentConfig = SegmentConfig()
    sample: SampleConfig = SampleConfig()
    datasetddpm: DatasetDDPMConfig = DatasetDDPMConfig()
    segnet: SegnetConfig = SegnetConfig()
    suggest: SuggestConfig = SuggestConfig()
    mae: MaeConfig = MaeConfig()
    swav: SwavConfig = SwavConfig()
    runtime: RuntimeConfig = RuntimeConfig()

    def unet_config(self) -> UNetConfig:
        """The model flags of ``ddpm.preset`` overridden by ``ddpm.model``; ``image_size`` defaults to
        ``dataset.image_size``. Every stage builds or checks its UNet from this."""
        flags = self.ddpm.model_flags()
        flags.setdefault("image_size", self.dataset.image_size)
        if flags["image_size"] != self.dataset.image_size:
            if self.ddpm.model.image_size is not None:
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


def _build(data: dict) -> Params:
    """``Params`` from a dict; pydantic's errors in this project's words (``pipeline.config_messages``)."""
    return validated(Params, data)


def _validate(params: Params) -> None:
    """What one field cannot say alone: rules across keys and against the presets' values."""
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
    if dataset.num_classes > MAX_CLASSES:
        raise ConfigError(f"dataset.num_classes={dataset.num_classes}: masks, labels and predictions are uint8 and keep "
                          f"one value for the ignore label, so at most {MAX_CLASSES} classes fit; merge classes")
    if dataset.class_names is not None and len(dataset.class_names) != dataset.num_classes:
        raise ConfigError(
            f"dataset.class_names has {len(dataset.class_names)} names but dataset.num_classes is "
            f"{dataset.num_classes}; give one name per class or null"
        )
    _validate_labels(dataset)
    if dataset.name == BUILTIN_DATASET:
        if not 8 <= dataset.digit_size <= dataset.image_size:
            raise ConfigError(
                f"dataset.digit_size={dataset.digit_size} must be in [8, dataset.image_size={dataset.image_size}]"
            )
        if dataset.num_classes != 11:
            raise ConfigError("the built-in digits have 11 classes (background + 10 digits); set dataset.num_classes: 11")
    features = params.features
    low, high = CODEC_LEVELS[features.codec]
    if low is not None and not low <= features.clevel <= high:
        raise ConfigError(f"features.clevel={features.clevel} is outside [{low}, {high}], the levels of "
                          f"features.codec={features.codec.value}; use e.g. 3 (or codec: none for no compression)")
    betas_for_schedule(params.ddpm.noise_schedule, params.ddpm.diffusion_steps)
    if features.patch_size % 2 == 0:
        raise ConfigError(f"features.patch_size={features.patch_size} must be an odd number >= 1 (the pixel is the centre)")
    _validate_stopping(params.ensemble)
    if params.ensemble.train_images is not None and params.ensemble.train_images > dataset.train_images:
        raise ConfigError(f"ensemble.train_images={params.ensemble.train_images} must be null (all) or in [1, "
                          f"dataset.train_images={dataset.train_images}]")
    check_timesteps(params.kmeans.t_steps, params.ddpm.diffusion_steps)
    if params.suggest.diversity and params.suggest.candidates < params.suggest.count:
        raise ConfigError(f"suggest.candidates={params.suggest.candidates} must be >= suggest.count="
                          f"{params.suggest.count}: the diversity pick chooses count images among the candidates")
    _validate_tls(features)
    _validate_mae(params)
    _validate_swav(params)
    _validate_datasetddpm(params)
    _validate_segnet(params.segnet, params.dataset.image_size)
    check_widths(params.unet_config())  # torch-free; the stages that build a UNet also build it on the meta device


def _validate_mae(params: Params) -> None:
    """The MAE's shape against the image size; with representation mae, blocks and store_blocks against its depth."""
    mae, size = params.mae, params.dataset.image_size
    if size % mae.patch_size:
        raise ConfigError(f"mae.patch_size={mae.patch_size} does not divide dataset.image_size={size}; choose a "
                          f"divisor of {size} (e.g. {next(p for p in (4, 2, 1) if size % p == 0)})")
    for prefix in ("", "decoder_"):
        width, heads = getattr(mae, f"{prefix}hidden_size"), getattr(mae, f"{prefix}num_attention_heads")
        if width % heads:
            raise ConfigError(f"mae.{prefix}hidden_size={width} is not a multiple of mae.{prefix}num_attention_heads="
                              f"{heads}; each attention head takes an equal share of the width")
    if params.features.representation is Representation.MAE:
        _validate_encoder_blocks(params, mae.num_hidden_layers, "the MAE encoder's", "raise mae.num_hidden_layers")


def _validate_swav(params: Params) -> None:
    """SwAV's network and crops against the image size; with representation swav, blocks and store_blocks
    against its feature blocks."""
    swav, size = params.swav, params.dataset.image_size
    if len(swav.hidden_sizes) != len(swav.depths):
        raise ConfigError(f"swav.hidden_sizes {list(swav.hidden_sizes)} and swav.depths {list(swav.depths)} must have "
                          f"one entry per ResNet stage each; give them the same length")
    if swav.local_crop_scale >= swav.global_crop_scale:
        raise ConfigError(f"swav.local_crop_scale={swav.local_crop_scale} must be below swav.global_crop_scale="
                          f"{swav.global_crop_scale}: local crops take the smaller areas")
    if swav.local_crop_size is not None and swav.local_crop_size > size:
        raise ConfigError(f"swav.local_crop_size={swav.local_crop_size} is larger than dataset.image_size={size}; "
                          f"choose at most {size} (null = half the image)")
    if swav.batch_size < 2:
        raise ConfigError("swav.batch_size=1: Sinkhorn spreads a batch over the prototypes and the projection head's "
                          "BatchNorm needs two images; use 2 or more")
    if params.features.representation is Representation.SWAV:
        _validate_encoder_blocks(params, swav.feature_blocks(), "SwAV's (every other residual block of each stage)",
                                 "add ResNet stages or deepen them (swav.depths)")


def _validate_encoder_blocks(params: Params, count: int, whose: str, remedy: str) -> None:
    """blocks and store_blocks of a self-supervised representation: within its ``count`` feature blocks."""
    representation = params.features.representation.value
    for key, blocks in (("blocks", params.blocks), ("features.store_blocks", params.features.store_blocks)):
        beyond = [block for block in blocks if not 0 <= block < count]
        if beyond:
            raise ConfigError(f"{key} {list(blocks)} (null = ddpm.preset's blocks) asks for block(s) {beyond}, but "
                              f"with features.representation={representation} the blocks are {whose}, 0 to "
                              f"{count - 1}; choose blocks within that or {remedy}")


def _validate_stopping(ensemble: EnsembleConfig) -> None:
    """A stopping rule that cannot fire is refused, naming both keys: the paper's rule looks only at epochs after
    warmup_epochs (train_interpreter.py checks from 0-based epoch warmup_epochs on), so epochs <= warmup_epochs
    would silently train every member for all its epochs. (plateau's epochs is a cap it may reach first: an
    epochs <= patience fit is a fixed-length fit, as short test and benchmark fits ask for.) With ensemble.steps
    set no stopping rule runs."""
    if ensemble.steps is None and ensemble.stopping is Stopping.PAPER and ensemble.epochs <= ensemble.warmup_epochs:
        raise ConfigError(
            f"ensemble.stopping=paper can never stop a member: {ensemble.given_by('epochs')} <= ensemble.warmup_epochs="
            f"{ensemble.warmup_epochs}, and the paper's rule only looks at epochs after warmup_epochs; raise "
            f"ensemble.epochs (the paper's recipe: ensemble.recipe=paper, at most 100 epochs), lower "
            f"ensemble.warmup_epochs, or use ensemble.stopping=plateau")


def _validate_datasetddpm(params: Params) -> None:
    """sample.steps against the schedule; the filter's counts against sample.images."""
    sample, steps = params.sample, params.ddpm.diffusion_steps
    if isinstance(sample.steps, int) and sample.steps > steps:
        raise ConfigError(f"sample.steps={sample.steps} is more than ddpm.diffusion_steps={steps}; use at most {steps}")
    try:
        space_timesteps(steps, sample.steps)
    except (ConfigError, ValueError) as error:
        raise ConfigError(f"sample.steps={sample.steps!r} is not a respacing of ddpm.diffusion_steps={steps} "
                          f"({error}); use a step count such as 50, counts per section such as \"10,15,20\", or "
                          f"\"ddim50\"") from None
    dropped = dropped_count(params.datasetddpm.drop_uncertain, sample.images)
    if params.datasetddpm.drop_least_uncertain > dropped:
        raise ConfigError(f"datasetddpm.drop_least_uncertain={params.datasetddpm.drop_least_uncertain} is more than the "
                          f"{dropped} images datasetddpm.drop_uncertain={params.datasetddpm.drop_uncertain} drops of "
                          f"sample.images={sample.images} (it shifts that window); lower it or sample more images")


def _validate_segnet(segnet: SegnetConfig, image_size: int) -> None:
    """The SegFormer's per-stage lists agree in length, heads divide widths, and every stage's map is big enough."""
    lists = ("hidden_sizes", "depths", "attention_heads", "sr_ratios", "patch_sizes", "strides")
    lengths = {key: len(getattr(segnet, key)) for key in lists}
    if len(set(lengths.values())) != 1:
        shown = ", ".join(f"segnet.{key} has {length}" for key, length in lengths.items())
        raise ConfigError(f"the segnet's per-stage lists differ in length ({shown}); give one entry per encoder "
                          f"stage in each")
    for stage, (width, heads) in enumerate(zip(segnet.hidden_sizes, segnet.attention_heads)):
        if width % heads:
            raise ConfigError(f"segnet.hidden_sizes[{stage}]={width} is not a multiple of segnet.attention_heads"
                              f"[{stage}]={heads}; each head gets an equal share of the channels")
    for stage, (side, ratio) in enumerate(zip(segnet.stage_sides(image_size), segnet.sr_ratios)):
        if side < ratio:
            raise ConfigError(f"segnet.sr_ratios[{stage}]={ratio} is more than encoder stage {stage}'s map side {side} "
                              f"(dataset.image_size={image_size} through segnet.strides {list(segnet.strides)}); "
                              f"lower it to at most {max(side, 1)} or use smaller strides")


def dropped_count(fraction: float, images: int) -> int:
    """How many of ``images`` a fraction drops: rounded down, as train_deeplab.py's ``int(len(idxs) * portion)``
    (rounded to 9 places first, so 0.29 x 100 is 29 and not 28.999...)."""
    return math.floor(round(fraction * images, 9))


def _validate_labels(dataset: DatasetConfig) -> None:
    """The label-format keys against the class count: every colour or category lands on a class or on ignore."""
    def is_label(value: int) -> bool:
        return 0 <= value < dataset.num_classes or value == dataset.ignore_label

    if dataset.class_colors is not None:
        colours = [list(colour) for colour in dataset.class_colors]
        if len(colours) != dataset.num_classes:
            raise ConfigError(f"dataset.class_colors has {len(colours)} colours but dataset.num_classes is "
                              f"{dataset.num_classes}; give one [r, g, b] per class, in class order")
        repeated = sorted({str(c) for c in colours if colours.count(c) > 1})
        if repeated or (dataset.ignore_color is not None and list(dataset.ignore_color) in colours):
            shown = repeated or [str(list(dataset.ignore_color)) + " (also dataset.ignore_color)"]
            raise ConfigError(f"dataset.class_colors gives colour(s) {', '.join(shown)} to more than one class; "
                              f"each class needs its own colour")
    if dataset.labels is not LabelFormat.COCO:
        return
    if not dataset.coco_categories:
        raise ConfigError("dataset.labels is coco but dataset.coco_categories is null; map each COCO category_id "
                          "to a class index, e.g. coco_categories: {1: 1, 2: 2}")
    bad = {key: value for key, value in dataset.coco_categories.items() if not is_label(value)}
    if bad:
        raise ConfigError(f"dataset.coco_categories maps category id(s) {bad} outside the classes [0, "
                          f"{dataset.num_classes}) and the ignore label {dataset.ignore_label}; fix the mapping or "
                          f"dataset.num_classes")
    if not is_label(dataset.coco_background):
        raise ConfigError(f"dataset.coco_background={dataset.coco_background} is neither a class in [0, "
                          f"{dataset.num_classes}) nor the ignore label {dataset.ignore_label}")
    file = Path(dataset.coco_file)
    if file.is_absolute() or ".." in file.parts:
        # Inside root, the prepare stage's ${dataset.root} dep tracks it; a file elsewhere would not be tracked.
        raise ConfigError(f"dataset.coco_file={dataset.coco_file!r} must be a path inside dataset.root, relative to "
                          f"it (e.g. real/{{split}}/annotations.json); move the file into the dataset folder")


def _validate_store_blocks(params: Params) -> None:
    stored, features = params.features.store_blocks, params.features
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
    if features.layout is StoreLayout.NATIVE and features.representation is not Representation.DDPM:
        what = {Representation.MAE: "the MAE's patch tokens", Representation.SWAV: "SwAV's block outputs"}.get(
            features.representation, "pixel colours")
        raise ConfigError(f"features.layout=native keeps the DDPM's decoder maps, but features.representation="
                          f"{features.representation.value} stores {what}; use features.layout: pixels for it")


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


def params_from_dict(data: dict, source: str = "params") -> Params:
    try:
        params = _build(data)
        params = params.model_copy(update={"dataset": params.dataset.resolved(), "ensemble": params.ensemble.resolved()})
        if params.blocks is None:  # blocks: null = the model preset's blocks
            params = params.model_copy(update={"blocks": params.ddpm.preset_blocks()})
        if params.features.store_blocks is None:  # store_blocks: null = the model preset's blocks too
            params = params.model_copy(update={"features": params.features.model_copy(
                update={"store_blocks": params.ddpm.preset_blocks()})})
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

from __future__ import annotations

import enum
import subprocess
import sys

import pytest
import yaml
from pydantic import BaseModel, ValidationError

from pipeline.config import ConfigError, ModelPreset, Params, UpsampleMode, load_params, params_from_dict
from pipeline.presets import MODEL_PRESETS, PAPER_T_STEPS
from tests.conftest import REPO


def test_repository_params_load_and_build_the_model():
    params = load_params(REPO / "params.yaml")
    assert isinstance(params, Params)
    assert params.features.upsample is UpsampleMode.BILINEAR
    config = params.unet_config()
    assert config.image_size == params.dataset.image_size
    assert len(params.dataset.names()) == params.dataset.num_classes


@pytest.mark.parametrize(
    "data, message",
    [
        ({"ensemble": {"lrr": 0.1}}, r"unknown params key\(s\) ensemble.lrr"),
        ({"typo_section": {}}, r"unknown params key\(s\) typo_section"),
        ({"ensemble": {"members": "10"}}, r"ensemble.members must be an integer, got '10'"),
        ({"ensemble": {"members": 0}}, r"ensemble.members must be > 0"),
        ({"runtime": {"threads": 0}}, r"runtime.threads must be > 0, got 0"),
        ({"runtime": {"device": "gpu"}}, r"runtime.device='gpu' is not a device; use auto, cpu, cuda"),
        ({"ensemble": {"lr": "0.1"}}, r"ensemble.lr must be a number, got '0.1'"),
        ({"ddpm": {"rescale_timesteps": 1}}, r"ddpm.rescale_timesteps must be true or false, got 1"),
        ({"ensemble": "fast"}, r"ensemble must be a mapping of keys to values, got 'fast'"),
        ({"ensemble": {"batch_size": 1}}, r"ensemble.batch_size must be >= 2, got 1 \(BatchNorm needs two rows"),
        ({"t_steps": "50,150"}, r"t_steps must be a YAML list"),
        ({"t_steps": [50, 1.5]}, r"t_steps\[1\] must be an integer"),
        ({"t_steps": [50, 1000]}, r"t_steps contains 1000, outside \[0, 1000\)"),
        ({"t_steps": []}, r"t_steps is empty"),
        ({"blocks": [2, 2]}, r"blocks \[2, 2\] repeats a block"),
        ({"features": {"upsample": "bicubic"}}, r"features.upsample='bicubic' is not one of \['bilinear', 'nearest'\]"),
        ({"ddpm": {"noise_schedule": "quadratic"}}, r"ddpm.noise_schedule='quadratic'"),
        ({"ddpm": {"model": {"num_chanels": 32}}},
         r"unknown params key\(s\) ddpm.model.num_chanels; known keys of ddpm.model: image_size, num_channels"),
        ({"ddpm": {"model": {"diffusion_steps": 10}}},
         r"ddpm.model.diffusion_steps is a diffusion flag, not a model flag: set ddpm.diffusion_steps"),
        ({"ddpm": {"model": {"diffusion_steps": 10, "num_chanels": 3, "foo": 1}}},
         r"diffusion flag, not a model flag: set ddpm.diffusion_steps; unknown params key\(s\) ddpm.model.num_chanels, "
         r"ddpm.model.foo; known keys of ddpm.model: image_size"),
        ({"ddpm": {"model": {"image_size": 64}}}, r"ddpm.model.image_size=64 differs from dataset.image_size=32"),
        ({"dataset": {"class_names": ["a", "b"]}}, r"dataset.class_names has 2 names but dataset.num_classes is 11"),
        ({"dataset": {"ignore_label": 256}}, r"dataset.ignore_label must be <= 255, got 256 \(masks are uint8\)"),
        ({"dataset": {"name": "mine"}}, r"dataset.image_size is null and dataset.name='mine' is not a preset"),
        ({"ddpm": {"train": {"ema_rate": 1.0}}}, r"ddpm.train.ema_rate must be < 1, got 1.0 \(a rate in \[0, 1\)\)"),
    ],
)
def test_bad_params_name_the_key(data, message):
    with pytest.raises(ConfigError, match=message):
        params_from_dict(data)


def test_load_params_names_the_file(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump({"ensemble": {"epochs": -1}}))
    with pytest.raises(ConfigError, match=rf"{path}: ensemble.epochs must be > 0"):
        load_params(path)
    with pytest.raises(ConfigError, match="does not exist"):
        load_params(tmp_path / "missing.yaml")


def test_config_is_frozen():
    params = params_from_dict({})
    with pytest.raises(ValidationError, match="frozen"):
        params.ensemble.members = 3  # type: ignore[misc]


def test_model_flag_lists_are_yaml_lists_and_unset_is_null():
    config = params_from_dict({"ddpm": {"model": {"channel_mult": [1, 2, 2], "attention_resolutions": [8]}}}).unet_config()
    assert config.channel_mult == (1, 2, 2) and config.attention_resolutions == (8,)
    with pytest.raises(ConfigError, match=r"ddpm.model.channel_mult must be a YAML list such as \[1, 2\], got '1,2,2'"):
        params_from_dict({"ddpm": {"model": {"channel_mult": "1,2,2"}}})
    with pytest.raises(ConfigError, match=r"ddpm.model.num_head_channels must be > 0, got -1"):
        params_from_dict({"ddpm": {"model": {"num_head_channels": -1}}})


def test_loading_params_imports_no_torch():
    """Config is a leaf: params load and are checked without the network, the diffusion maths or torch."""
    code = ("import sys; from pipeline.config import load_params; load_params('params.yaml'); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'torch' or m in ('pipeline.diffusion.unet', 'pipeline.diffusion.gaussian')))")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]", result.stdout


def test_presets_fill_null_keys_and_explicit_values_win():
    ffhq = params_from_dict({"dataset": {"name": "ffhq_34"}, "ddpm": {"model": {"num_channels": 32}}}).dataset
    assert (ffhq.image_size, ffhq.num_classes, ffhq.train_images, ffhq.test_images) == (256, 34, 20, 20)
    assert ffhq.min_class_pixels == 20 and ffhq.names()[17] == "head***hair"
    bedroom = params_from_dict({"dataset": {"name": "bedroom_28", "train_images": 5}}).dataset
    assert bedroom.ignore_label == 0 and bedroom.num_classes == 29 and bedroom.train_images == 5
    digits = params_from_dict({}).dataset
    assert digits.num_classes == 11 and digits.names()[1] == "digit_0" and digits.min_class_pixels == 0


# params.yaml's ddpm.model and blocks before they moved into the digits preset (pipeline/presets.py).
OLD_DIGITS_FLAGS = {"num_channels": 32, "num_res_blocks": 2, "channel_mult": [1, 2, 2], "attention_resolutions": [8],
                    "num_head_channels": 32, "use_scale_shift_norm": True, "resblock_updown": True,
                    "learn_sigma": False, "dropout": 0.0}


def test_default_params_resolve_to_the_old_explicit_digits_model_and_blocks():
    params = load_params(REPO / "params.yaml")
    data = yaml.safe_load((REPO / "params.yaml").read_text())
    # everything comes from ddpm.preset: digits (the listed flags are null = the preset's value)
    assert set(data["ddpm"]["model"].values()) == {None} and data["blocks"] is None
    assert params.ddpm.preset is ModelPreset.DIGITS
    old = params_from_dict(dict(data, blocks=[0, 1, 2, 3], ddpm=dict(data["ddpm"], model=OLD_DIGITS_FLAGS)))
    assert params.unet_config() == old.unet_config()
    assert params.unet_config().to_dict() == old.unet_config().to_dict()  # what checkpoints record
    assert params.blocks == old.blocks == (0, 1, 2, 3)  # the digits preset's blocks, chosen on val
    assert list(params.t_steps) == PAPER_T_STEPS  # t_steps stays explicit (dvc.yaml's foreach reads it)


def test_null_model_flags_are_the_presets_and_a_value_overrides_only_its_flag():
    listed = params_from_dict({"ddpm": {"model": {"num_channels": None, "dropout": 0.25}}}).unet_config()
    assert listed.num_channels == 32 and listed.dropout == 0.25 and listed.resblock_updown is True


def test_explicit_model_flags_override_the_preset_key_by_key():
    digits = params_from_dict({"ddpm": {"model": {"num_channels": 64}}}).unet_config()
    assert digits.num_channels == 64 and digits.channel_mult == (1, 2, 2) and digits.num_head_channels == 32
    paper = params_from_dict({"dataset": {"name": "ffhq_34"},
                              "ddpm": {"preset": "adm256", "model": {"num_channels": 128, "use_fp16": False}}})
    config = paper.unet_config()
    assert (config.num_channels, config.use_fp16, config.num_head_channels, config.learn_sigma) == (128, False, 64, True)
    assert paper.blocks == (5, 6, 7, 8, 12)


def test_explicit_blocks_win_over_the_preset():
    params = params_from_dict({"dataset": {"name": "ffhq_34"}, "ddpm": {"preset": "adm256"}, "blocks": [6, 8]})
    assert params.blocks == (6, 8)


@pytest.mark.parametrize(
    "data, message",
    [
        ({"ddpm": {"preset": "adm128"}}, r"ddpm.preset='adm128' is not one of \['digits', 'adm256'\]"),
        ({"ddpm": {"preset": "adm256"}},
         r"ddpm.preset=adm256 is a model for 256x256 images but dataset.image_size=32; use a 256 px dataset"),
        ({"blocks": []}, r"blocks is empty; .* or null for the blocks of ddpm.preset"),
        ({"blocks": "5,6"}, r"blocks must be a YAML list such as \[1, 2\], got '5,6'"),
    ],
)
def test_bad_presets_and_blocks_name_the_key(data, message):
    with pytest.raises(ConfigError, match=message):
        params_from_dict(data)


def test_every_model_preset_has_a_name_flags_and_blocks():
    assert [preset.value for preset in ModelPreset] == list(MODEL_PRESETS)
    for name, preset in MODEL_PRESETS.items():
        assert set(preset) == {"model", "blocks"} and preset["blocks"], name


def test_params_yaml_and_the_model_defaults_agree():
    """One source of defaults: params.yaml lists every key of every section, each with the models' default
    (null means "the preset's value", which the models spell None)."""
    def walk(section: dict, defaults: BaseModel, prefix: str = ""):
        assert set(section) == set(type(defaults).model_fields), f"{prefix or 'top level'}: params.yaml and the models list other keys"
        for key, value in section.items():
            default = getattr(defaults, key)
            if isinstance(default, BaseModel):
                yield from walk(value, default, f"{prefix}{key}.")
            else:
                default = default.value if isinstance(default, enum.Enum) else default
                default = list(default) if isinstance(default, tuple) else default
                yield f"{prefix}{key}", value, default

    disagree = [(key, value, default) for key, value, default in walk(yaml.safe_load((REPO / "params.yaml").read_text()), Params())
                if value != default]
    assert disagree == []

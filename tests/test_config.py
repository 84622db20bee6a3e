from __future__ import annotations

import pytest
import yaml

from pipeline.config import ConfigError, Params, UpsampleMode, load_params, params_from_dict
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
        ({"ensemble": {"threads": 0}}, r"ensemble.threads must be >= 1 or null \(all cores\), got 0"),
        ({"t_steps": "50,150"}, r"t_steps must be a YAML list"),
        ({"t_steps": [50, 1.5]}, r"t_steps\[1\] must be an integer"),
        ({"t_steps": [50, 1000]}, r"t_steps contains 1000, outside \[0, 1000\)"),
        ({"t_steps": []}, r"t_steps is empty"),
        ({"blocks": [2, 2]}, r"blocks \[2, 2\] repeats a block"),
        ({"features": {"upsample": "bicubic"}}, r"features.upsample='bicubic' is not one of \['bilinear', 'nearest'\]"),
        ({"ddpm": {"noise_schedule": "quadratic"}}, r"ddpm.noise_schedule='quadratic'"),
        ({"ddpm": {"model": {"num_chanels": 32}}}, r"ddpm.model: unknown model flag\(s\) \['num_chanels'\]"),
        ({"ddpm": {"model": {"image_size": 64}}}, r"ddpm.model.image_size=64 differs from dataset.image_size=32"),
        ({"dataset": {"class_names": ["a", "b"]}}, r"dataset.class_names has 2 names but dataset.num_classes is 11"),
        ({"dataset": {"ignore_label": 256}}, r"dataset.ignore_label=256 must be in \[0, 255\]"),
        ({"dataset": {"name": "mine"}}, r"dataset.image_size is null and dataset.name='mine' is not a preset"),
        ({"ddpm": {"train": {"ema_rate": 1.0}}}, r"ddpm.train.ema_rate must be in \[0, 1\)"),
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
    with pytest.raises(AttributeError):
        params.ensemble.members = 3  # type: ignore[misc]


def test_presets_fill_null_keys_and_explicit_values_win():
    ffhq = params_from_dict({"dataset": {"name": "ffhq_34"}, "ddpm": {"model": {"num_channels": 32}}}).dataset
    assert (ffhq.image_size, ffhq.num_classes, ffhq.train_images, ffhq.test_images) == (256, 34, 20, 20)
    assert ffhq.min_class_pixels == 20 and ffhq.names()[17] == "head***hair"
    bedroom = params_from_dict({"dataset": {"name": "bedroom_28", "train_images": 5}}).dataset
    assert bedroom.ignore_label == 0 and bedroom.num_classes == 29 and bedroom.train_images == 5
    digits = params_from_dict({}).dataset
    assert digits.num_classes == 11 and digits.names()[1] == "digit_0" and digits.min_class_pixels == 0

"""Config files and --config.key=value overrides."""

import os
import re

import pytest

from medfinder_jax import config_utils

DEFAULT = os.path.join(os.path.dirname(__file__), "..", "configs", "default.py")


def test_overrides_parse_into_the_field_type():
  config = config_utils.load_config_file(DEFAULT)
  config_utils.apply_overrides(config, {
      "train.lr": "3e-4", "train.epochs": "2", "data.shape": "64,64,32",
      "text.trainable": "true", "model.backbone": "vit", "data.spacing": "()"})
  assert config.train.lr == pytest.approx(3e-4)
  assert config.train.epochs == 2 and isinstance(config.train.epochs, int)
  assert config.data.shape == (64, 64, 32)
  assert config.text.trainable is True
  assert config.model.backbone == "vit"
  assert config.data.spacing == ()


def test_unknown_key_is_a_clear_error():
  config = config_utils.load_config_file(DEFAULT)
  with pytest.raises(config_utils.ConfigError, match="train.lrr"):
    config_utils.apply_overrides(config, {"train.lrr": "1"})
  with pytest.raises(config_utils.ConfigError, match="expected an integer"):
    config_utils.apply_overrides(config, {"train.epochs": "many"})


def test_split_config_overrides_accepts_both_spellings():
  overrides, rest = config_utils.split_config_overrides(
      ["train", "--config.train.lr=1e-3", "--config.seed", "7", "--epochs", "3"])
  assert overrides == {"train.lr": "1e-3", "seed": "7"}
  assert rest == ["train", "--epochs", "3"]


def test_missing_config_file_names_the_path(tmp_path):
  with pytest.raises(config_utils.ConfigError, match="nope.py"):
    config_utils.load_config_file(str(tmp_path / "nope.py"))


@pytest.mark.parametrize("name", ["default", "medfinder_resnet50", "medfinder_vit", "released_code"])
def test_every_shipped_config_loads(name):
  path = os.path.join(os.path.dirname(DEFAULT), f"{name}.py")
  config = config_utils.load_config_file(path)
  assert config.model.backbone in ("resnet50", "vit")


def test_released_code_config_is_the_released_behaviour():
  config = config_utils.load_config_file(os.path.join(os.path.dirname(DEFAULT), "released_code.py"))
  assert config.loss.contrastive == "released" and config.loss.mse_weight == 0.0
  assert not config.model.fusion.enabled and not config.augment.two_views
  assert config.data.preprocess == "released" and config.data.split_by == "rows"


@pytest.mark.parametrize("key, value", [("train.batch_size_per_device", 0), ("train.epochs", -1),
                                        ("data.shard_size", 0), ("data.workers", -1),
                                        ("train.lr", 0.0), ("text.max_tokens", 1)])
def test_out_of_range_settings_are_named_with_their_flag(key, value):
  config = config_utils.load_config_file(DEFAULT)
  config_utils.check_config(config)                      # the defaults are fine
  config_utils.apply_overrides(config, {key: value})
  with pytest.raises(config_utils.ConfigError, match=re.escape(f"--config.{key}={value!r}")):
    config_utils.check_config(config)


def test_typed_overrides_are_set_as_given():
  config = config_utils.apply_overrides(config_utils.load_config_file(DEFAULT),
                                        {"data.shape": (8, 8, 4), "train.lr": 0.5})
  assert config.data.shape == (8, 8, 4) and config.train.lr == 0.5

"""Test-wide setup: 8 fake CPU devices (must precede any jax import), quiet TF, no network."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")


import numpy as np  # noqa: E402
import pytest  # noqa: E402  (after the environment above)

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs",
                              "default.py")
TINY_CONFIG = DEFAULT_CONFIG + ":tiny"       # --config for launch.py: the tests' tiny model


# Both rank engines follow one contract (metrics.py "One pass"): tests of counts run on each
# (metrics.rank_engine(name) is the module).
RANK_ENGINES = ("host", "jax")


def quantized_embeddings(n, d, seed):
  """Embeddings on a 1/16 grid: every dot product is exact in float32, in any summation order,
  so ranks cannot depend on how the matmul is split (chunks, devices)."""
  rng = np.random.default_rng(seed)
  text = rng.integers(-8, 9, size=(n, d)) / 16.0
  image = text + rng.integers(-16, 17, size=(n, d)) / 16.0
  return text.astype(np.float32), image.astype(np.float32)


_CONVERTED = {}


def convert_phantom(root, n, shape, seed=0, folders=10, min_shards=4):
  """Phantom corpus of n studies converted at `shape` under `root` (returns the TFRecord dir)."""
  from data_prep import convert, phantom_layouts  # pylint: disable=import-outside-toplevel
  from medfinder_jax import config_utils  # pylint: disable=import-outside-toplevel
  raw, out = os.path.join(root, "raw"), os.path.join(root, "tfrecords")
  phantom_layouts.write_phantom_corpus(raw, n=n, seed=seed, folders=folders, size=64, slices=24)
  config = config_utils.load_config_file(DEFAULT_CONFIG)
  config.data.data_root = raw
  config.data.shape = tuple(shape)
  config.data.spacing = ()
  config.data.min_shards = min_shards
  convert.convert_corpus(config.data, out, workers=0, progress=False, log=lambda *a: None)
  return out


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory):
  """A converted phantom dataset shared by the tests: 40 studies at 16x16x8 (train 28/val 4/test 8)."""
  key = ("tiny", 40, (16, 16, 8))
  if key not in _CONVERTED:
    _CONVERTED[key] = convert_phantom(str(tmp_path_factory.mktemp("tiny_dataset")), 40, (16, 16, 8))
  return _CONVERTED[key]


def make_tiny_config(**overrides):
  """configs/default.py:tiny (a 4-to-16-channel ResNet, MiniLM text, 32-d embeddings, 16x16x8
  volumes: the `tiny_dataset` shape) with `overrides` ({"a.b": value}) applied."""
  from medfinder_jax import config_utils  # pylint: disable=import-outside-toplevel
  return config_utils.apply_overrides(config_utils.load_config_file(TINY_CONFIG), overrides)


@pytest.fixture
def tiny_config():
  """Factory: tiny_config(**{"model.backbone": "vit"}) -> a tiny ConfigDict."""
  return make_tiny_config


@pytest.fixture(scope="session")
def aligned(tiny_dataset, tmp_path_factory):
  """The tiny model aligned on tiny_dataset's test split (exact retrieval), as saved files:
  tests/model_files.aligned_model."""
  import model_files  # pylint: disable=import-outside-toplevel
  return model_files.aligned_model(tiny_dataset, tmp_path_factory)


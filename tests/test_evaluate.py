"""Evaluation of a split: every study once, in dataset order, equal to encoding it alone; the
metrics of the aligned model are perfect."""

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

from medfinder_jax import evaluate
from medfinder_jax import loading
from medfinder_jax import input_pipeline as ip
from medfinder_jax import sharding
from medfinder_jax import text as text_lib


@pytest.fixture(scope="module")
def setup(tiny_dataset):
  from conftest import make_tiny_config  # pylint: disable=import-outside-toplevel
  config = make_tiny_config()
  model, variables = loading.init_model(config, config.data.shape, jax.random.key(0))
  tokenizer = text_lib.load_tokenizer(config.text)
  builder, spec = ip.open_dataset(tiny_dataset)
  return config, model, variables, tokenizer, builder, spec


def reference_embeddings(setup, split):
  """Each study encoded on its own (no mesh, no batching, no padding)."""
  config, model, variables, tokenizer, builder, spec = setup
  images, texts = [], []
  for example in tfds.as_numpy(builder.as_dataset(split=split, shuffle_files=False)):
    volume = example["volume"][None].astype(np.float32) / 255.0     # uint8: round(255 u)
    images.append(model.apply(variables, volume[..., None], method=model.encode_image)[0])
    ids, mask = tokenizer([example["report"].decode()])
    texts.append(model.apply(variables, ids, mask, method=model.encode_text)[0])
  return np.stack(images), np.stack(texts)


@pytest.mark.parametrize("num_devices,per_device", [(3, 1), (8, 1), (2, 3)])
def test_extraction_counts_every_study_once_in_dataset_order(setup, num_devices, per_device):
  _, model, variables, tokenizer, builder, spec = setup
  mesh = sharding.make_mesh({"data": -1, "fsdp": 1}, jax.devices()[:num_devices])
  result = evaluate.embed_split(model, variables, builder, spec, "test", tokenizer, mesh,
                                  per_device)
  image, text = reference_embeddings(setup, "test")
  assert result.n == spec.split_sizes["test"] == 8
  np.testing.assert_allclose(result.image_embeddings, image, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(result.text_embeddings, text, rtol=1e-4, atol=1e-5)
  expected_ids = [ex["study_id"].decode() for ex in tfds.as_numpy(
      builder.as_dataset(split="test", shuffle_files=False))]
  assert list(result.study_ids) == expected_ids
  assert all(path.endswith(".nii.gz") for path in result.source_paths)


def test_extraction_result_is_a_valid_interchange_set(setup, tmp_path):
  from medfinder_jax import interchange  # pylint: disable=import-outside-toplevel
  _, model, variables, tokenizer, builder, spec = setup
  mesh = sharding.make_mesh({"data": -1, "fsdp": 1})
  result = evaluate.embed_split(model, variables, builder, spec, "val", tokenizer, mesh, 1)
  path = tmp_path / "embeddings.npz"
  interchange.save_embeddings(str(path), result)
  loaded = interchange.load_embeddings(str(path))
  assert loaded.n == 4 and loaded.dim == 32


def test_evaluating_the_aligned_model_finds_every_study_at_rank_1_with_keywords(aligned):
  from medfinder_jax import metrics  # pylint: disable=import-outside-toplevel
  builder, spec = ip.open_dataset(aligned.dataset_dir)
  mesh = sharding.make_mesh({"data": 2, "fsdp": 1}, jax.devices()[:2])
  settings = metrics.MetricSettings(bootstrap_samples=10)
  evaluation = evaluate.evaluate_split(
      aligned.model, sharding.replicate(aligned.variables, mesh), builder, spec, "test",
      text_lib.load_tokenizer(aligned.config.text), mesh, settings,
      keywords=("atelectasis", "nodule"), batch_size_per_device=3)
  assert evaluation.metrics["t2i"]["R@1"] == evaluation.metrics["i2t"]["R@1"] == 100.0
  assert evaluation.metrics["ci"]["samples"] == 10
  assert set(evaluation.metrics["keywords"]) == {"atelectasis", "nodule"}
  assert list(evaluation.embeddings.study_ids) == aligned.study_ids
  np.testing.assert_allclose(evaluation.embeddings.image_embeddings, aligned.image, rtol=1e-4,
                             atol=1e-5)
  assert evaluation.embeddings.keyword_embeddings.shape == (2, 32)
  assert (evaluation.ranks["t2i"].ranks == 1).all()

"""Embedding extraction: every study once, in dataset order, equal to encoding it alone."""

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

from medfinder_jax import loading
from medfinder_jax import evaluate
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
  result = evaluate.extract_split(model, variables, builder, spec, "test", tokenizer, mesh,
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
  result = evaluate.extract_split(model, variables, builder, spec, "val", tokenizer, mesh, 1)
  path = tmp_path / "embeddings.npz"
  interchange.save_embeddings(str(path), result)
  loaded = interchange.load_embeddings(str(path))
  assert loaded.n == 4 and loaded.dim == 32


def test_encode_texts_pads_to_whole_batches_and_keeps_order(setup):
  _, model, variables, tokenizer, _, _ = setup
  mesh = sharding.make_mesh({"data": -1, "fsdp": 1})
  texts = ["atelectasis", "pleural effusion", "right upper lobe nodule"]
  out = evaluate.encode_texts(model, variables, tokenizer, texts, mesh, batch_size_per_device=1)
  assert out.shape == (3, 32)
  ids, mask = tokenizer(texts[1:2])
  alone = model.apply(variables, ids, mask, method=model.encode_text)[0]
  np.testing.assert_allclose(out[1], alone, rtol=1e-4, atol=1e-5)

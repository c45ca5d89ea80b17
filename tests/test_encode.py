"""Encoding on a mesh: texts padded to a short length embed as at full length, on any number of
devices; stored volumes embed as the model applied to their [0, 1] intensities."""

import jax
import numpy as np
import pytest

from medfinder_jax import encode
from medfinder_jax import sharding
from medfinder_jax import text as text_lib


def tokenizer(aligned):
  return text_lib.load_tokenizer(aligned.config.text)


@pytest.mark.parametrize("query", ["atelectasis", "CT chest. " * 20])   # short / truncated
def test_queries_padded_to_a_short_length_embed_as_at_full_length(aligned, query):
  mesh = sharding.single_device_mesh()
  variables = sharding.replicate(aligned.variables, mesh)
  got = encode.texts(aligned.model, variables, tokenizer(aligned), [query], mesh, 1)
  ids, mask = tokenizer(aligned)([query])                 # text.max_tokens (32) long
  want = aligned.model.apply(aligned.variables, ids, mask, method=aligned.model.encode_text)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_several_queries_on_several_devices_embed_as_at_full_length(aligned):
  mesh = sharding.make_mesh({"data": 2, "fsdp": 1}, jax.local_devices()[:2])
  queries = ["atelectasis", "small left effusion", "atelectasis"]    # last batch padded
  got = encode.texts(aligned.model, sharding.replicate(aligned.variables, mesh),
                     tokenizer(aligned), queries, mesh, batch_size_per_device=1)
  ids, mask = tokenizer(aligned)(queries)
  want = aligned.model.apply(aligned.variables, ids, mask, method=aligned.model.encode_text)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)




def test_stored_volumes_embed_as_the_model_on_their_intensities(aligned):
  from medfinder_jax import input_pipeline  # pylint: disable=import-outside-toplevel
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  builder, spec = input_pipeline.open_dataset(aligned.dataset_dir)
  stored = np.stack([e["volume"] for e in tfds.as_numpy(
      builder.as_dataset(split="test", shuffle_files=False))])
  mesh = sharding.make_mesh({"data": 2, "fsdp": 1}, jax.local_devices()[:2])
  got = encode.volumes(aligned.model, sharding.replicate(aligned.variables, mesh), stored,
                       spec.intensity, mesh)
  np.testing.assert_allclose(got, aligned.image, rtol=1e-4, atol=1e-5)


def test_texts_are_padded_to_whole_batches_in_order(aligned):
  model, variables = aligned.model, aligned.variables
  tokenizer = text_lib.load_tokenizer(aligned.config.text)
  mesh = sharding.make_mesh({"data": -1, "fsdp": 1})
  texts = ["atelectasis", "pleural effusion", "right upper lobe nodule"]
  out = encode.texts(model, sharding.replicate(variables, mesh), tokenizer, texts, mesh,
                     batch_size_per_device=1)
  assert out.shape == (3, 32)
  ids, mask = tokenizer(texts[1:2])
  alone = model.apply(variables, ids, mask, method=model.encode_text)[0]
  np.testing.assert_allclose(out[1], alone, rtol=1e-4, atol=1e-5)

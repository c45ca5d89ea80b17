"""Embeddings of a split, computed on the mesh by every process, gathered in dataset order.

Every study counts exactly once: evaluation batches are padded and masked
(`input_pipeline.eval_batches`) and each row carries its position in the split, so the gathered
rows are put back in dataset order and the padding dropped (the released code's sampler
repeated studies instead). Text is deterministic at evaluation (no random word window).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from medfinder_jax import interchange
from medfinder_jax import sharding


@functools.lru_cache(maxsize=None)
def _image_encoder_fn(model, intensity):
  @jax.jit
  def encode(variables, volume):
    return model.apply(variables, intensity(volume), method=model.encode_image)
  return encode


@functools.lru_cache(maxsize=None)
def _text_encoder_fn(model):
  @jax.jit
  def encode(variables, input_ids, attention_mask):
    return model.apply(variables, input_ids, attention_mask, method=model.encode_text)
  return encode


def encode_image_batch(model, variables, volume, intensity):
  """Global (B, X, Y, Z) stored volumes -> (B, D) image embeddings (eval form, on the mesh).

  intensity: the schema.Intensity the volumes were stored with (spec.intensity)."""
  return _image_encoder_fn(model, intensity)(variables, volume)


def encode_text_batch(model, variables, input_ids, attention_mask):
  """Global (B, L) token ids and mask -> (B, D) text embeddings (on the mesh)."""
  return _text_encoder_fn(model)(variables, input_ids, attention_mask)


def gather_to_host(array):
  """A global jax.Array -> the whole array as numpy on every process."""
  if jax.process_count() == 1:
    return np.asarray(array)
  return np.asarray(multihost_utils.process_allgather(array, tiled=True))


def extract_split(model, variables, builder, spec, split, tokenizer, mesh, batch_size_per_device,
                  progress=None):
  """Image and text embeddings of every study of `split`, in dataset order, on every process.

  Returns an interchange.EmbeddingSet (image/text embeddings (N, D) float32, study_ids, reports,
  source_paths). `progress` (optional) is called with the number of batches done.
  """
  from medfinder_jax import input_pipeline  # pylint: disable=import-outside-toplevel
  image, text = extract_split_embeddings(model, variables, builder, spec, split, tokenizer, mesh,
                                         batch_size_per_device, progress)
  texts = input_pipeline.read_split_text(builder, split)
  return interchange.EmbeddingSet(
      image_embeddings=image, text_embeddings=text, study_ids=np.asarray(texts["study_id"]),
      reports=np.asarray(texts["report"]),
      source_paths=np.asarray(texts.get("source_path", [""] * len(image))))


def extract_split_embeddings(model, variables, builder, spec, split, tokenizer, mesh,
                             batch_size_per_device, progress=None):
  """(image, text) embeddings (N, D) float32 of `split` in dataset order, on every process; no
  second pass over the records for their ids and reports (what validation needs)."""
  # TensorFlow (6 s to import) only when a converted split is read: query encoding stays light.
  from medfinder_jax import input_pipeline  # pylint: disable=import-outside-toplevel
  local_batch = batch_size_per_device * mesh.local_mesh.size
  batches = input_pipeline.eval_batches(builder, split, local_batch, tokenizer)
  pieces = {"image": [], "text": [], "index": []}
  for done, batch in enumerate(input_pipeline.prefetch_to_device(batches, mesh), start=1):
    image = encode_image_batch(model, variables, batch["volume"], spec.intensity)
    text = encode_text_batch(model, variables, batch["input_ids"], batch["attention_mask"])
    index = jnp.where(batch["mask"], batch["index"], -1)
    for name, value in (("image", image), ("text", text), ("index", index)):
      pieces[name].append(gather_to_host(value))
    if progress is not None:
      progress(done)
  return _in_dataset_order(pieces, spec.split_sizes[split], split)


def _in_dataset_order(pieces, expected, split):
  """Concatenated gathered rows -> (image, text) in dataset order, padding dropped."""
  index = np.concatenate(pieces["index"])
  keep = index >= 0
  order = np.argsort(index[keep], kind="stable")
  rows = index[keep][order]
  if not np.array_equal(rows, np.arange(expected)):
    raise RuntimeError(f"split {split!r}: gathered {len(rows)} rows for {expected} studies "
                       "(expected each study exactly once)")
  take = lambda name: np.concatenate(pieces[name])[keep][order].astype(np.float32)
  return take("image"), take("text")


def encode_texts(model, variables, tokenizer, texts, mesh, batch_size_per_device=8):
  """Free texts (queries, keywords) -> (len(texts), D) float32 embeddings, on every process.

  Every process must pass the same texts; rows are padded to whole global batches.
  """
  global_batch = batch_size_per_device * mesh.size
  local_batch = global_batch // jax.process_count()
  out = []
  for start in range(0, len(texts), global_batch):
    chunk = list(texts[start:start + global_batch])
    chunk += [""] * (global_batch - len(chunk))
    mine = chunk[jax.process_index() * local_batch:(jax.process_index() + 1) * local_batch]
    ids, attention = tokenizer(mine)
    batch = sharding.make_global_batch({"ids": ids, "mask": attention}, mesh)
    out.append(gather_to_host(encode_text_batch(model, variables, batch["ids"], batch["mask"])))
  return np.concatenate(out)[:len(texts)].astype(np.float32) if out else np.zeros((0, 0))

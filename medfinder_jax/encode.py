"""A loaded model at work on a mesh: stored volumes and texts -> embeddings (no TensorFlow).

The encoders are jitted once per model (and intensity mapping) and run on global jax.Arrays
whose batch axis is sharded over the mesh; results come back to the host on every process
(sharding.gather_to_host). Every process must call these together with the same inputs where
an input is global (texts), or with its own rows where it is per-process (encode_volumes).
"""

import functools

import jax
import numpy as np

from medfinder_jax import sharding

QUERY_LENGTHS = (16, 32, 64)   # token lengths short texts are padded to (else text.max_tokens)


@functools.lru_cache(maxsize=None)
def _image_encoder(model, intensity):
  @jax.jit
  def encode(variables, volume):
    return model.apply(variables, intensity(volume), method=model.encode_image)
  return encode


@functools.lru_cache(maxsize=None)
def _text_encoder(model):
  @jax.jit
  def encode(variables, input_ids, attention_mask):
    return model.apply(variables, input_ids, attention_mask, method=model.encode_text)
  return encode


def image_batch(model, variables, volume, intensity):
  """Global (B, X, Y, Z) stored volumes -> (B, D) image embeddings (eval form, on the mesh).

  intensity: the schema.Intensity the volumes were stored with (spec.intensity)."""
  return _image_encoder(model, intensity)(variables, volume)


def text_batch(model, variables, input_ids, attention_mask):
  """Global (B, L) token ids and mask -> (B, D) text embeddings (on the mesh)."""
  return _text_encoder(model)(variables, input_ids, attention_mask)


def texts(model, variables, tokenizer, values, mesh, batch_size_per_device=8):
  """Free texts (queries, keywords, reports) -> (len(values), D) float32, on every process.

  Every process passes the same texts; rows are padded to whole global batches. Tokens are
  padded only to the shortest of QUERY_LENGTHS (else text.max_tokens) that holds a batch's
  longest text: padding is masked out of attention, so the embedding is the full-length one up
  to float rounding, at a fraction of the cost for short queries (one compile per length).
  """
  values = list(values)
  global_rows, local_rows = sharding.batch_rows(batch_size_per_device, mesh)
  first = jax.process_index() * local_rows
  out = []
  for start in range(0, len(values), global_rows):
    chunk = values[start:start + global_rows]
    chunk += [""] * (global_rows - len(chunk))
    ids, mask = tokenizer(chunk)          # every process measures the whole chunk: same length
    length = _padded_length(int(mask.sum(axis=1).max()), mask.shape[1])
    mine = slice(first, first + local_rows)
    batch = sharding.make_global_batch({"ids": ids[mine, :length], "mask": mask[mine, :length]},
                                       mesh)
    out.append(sharding.gather_to_host(text_batch(model, variables, batch["ids"],
                                                  batch["mask"])))
  return np.concatenate(out)[:len(values)].astype(np.float32) if out else np.zeros((0, 0))


def _padded_length(longest, full):
  return next((n for n in QUERY_LENGTHS if longest <= n < full), full)


def volumes(model, variables, stored, intensity, mesh):
  """This process's (B, X, Y, Z) stored volumes (B a multiple of its devices) -> the (B x
  processes, D) float32 image embeddings of every process's rows, in process order."""
  batch = sharding.make_global_batch({"volume": np.asarray(stored)}, mesh)
  return sharding.gather_to_host(image_batch(model, variables, batch["volume"], intensity)
                                 ).astype(np.float32)

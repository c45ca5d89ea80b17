"""Evaluation of a model on a split, in memory: the one path of in-loop validation and of
`launch.py eval` (which writes the files afterwards, from the result).

`embed_split` computes the embeddings of every study of a split on the mesh, by every process,
and gathers them in dataset order. Every study counts exactly once: evaluation batches are
padded and masked (`input_pipeline.eval_batches`) and each row carries its position in the
split, so the gathered rows are put back in dataset order and the padding dropped (the released
code's sampler repeated studies instead). Text is deterministic at evaluation (no random word
window). `evaluate_split` adds the keyword queries and the metrics (metrics.embedding_metrics).
"""

import dataclasses
from typing import Any

import jax.numpy as jnp
import numpy as np

from medfinder_jax import encode
from medfinder_jax import input_pipeline
from medfinder_jax import interchange
from medfinder_jax import metrics as metrics_lib
from medfinder_jax import sharding


@dataclasses.dataclass
class Evaluation:
  """What `evaluate_split` found: the split's embeddings, its metrics (metrics.json's dict) and
  the per-query ranks (metrics.DirectionRanks by direction, for plots)."""
  embeddings: interchange.EmbeddingSet
  metrics: dict
  ranks: Any


def embed_split(model, variables, builder, spec, split, tokenizer, mesh, batch_size_per_device,
                progress=None):
  """Image and text embeddings of every study of `split`, in dataset order, on every process,
  as an interchange.EmbeddingSet (embeddings (N, D) float32, study_ids, reports,
  source_paths). `progress` (optional) is called with the number of batches done."""
  _, local_rows = sharding.batch_rows(batch_size_per_device, mesh)
  batches = input_pipeline.eval_batches(builder, split, local_rows, tokenizer)
  pieces = {"image": [], "text": [], "index": []}
  for done, batch in enumerate(input_pipeline.prefetch_to_device(batches, mesh), start=1):
    image = encode.image_batch(model, variables, batch["volume"], spec.intensity)
    text = encode.text_batch(model, variables, batch["input_ids"], batch["attention_mask"])
    index = jnp.where(batch["mask"], batch["index"], -1)
    for name, value in (("image", image), ("text", text), ("index", index)):
      pieces[name].append(sharding.gather_to_host(value))
    if progress is not None:
      progress(done)
  image, text = _in_dataset_order(pieces, spec.split_sizes[split], split)
  texts = input_pipeline.split_texts(builder, split)
  return interchange.EmbeddingSet(
      image_embeddings=image, text_embeddings=text, study_ids=np.asarray(texts["study_id"]),
      reports=np.asarray(texts["report"]),
      source_paths=np.asarray(texts.get("source_path", [""] * len(image))))


def _in_dataset_order(pieces, expected, split):
  """Concatenated gathered rows -> (image, text) in dataset order, padding dropped."""
  index = np.concatenate(pieces["index"])
  keep = index >= 0
  order = np.argsort(index[keep], kind="stable")
  rows = index[keep][order]
  if not np.array_equal(rows, np.arange(expected)):
    raise RuntimeError(f"split {split!r}: gathered {len(rows)} rows for {expected} studies "
                       "(expected each study exactly once)")
  take = lambda name: np.concatenate(pieces[name])[keep][order].astype(np.float32)  # noqa: E731
  return take("image"), take("text")


def evaluate_split(model, variables, builder, spec, split, tokenizer, mesh, settings, *,
                   keywords=(), batch_size_per_device=4, progress=None):
  """Evaluation of `split`: its embeddings, the keyword queries' embeddings (`keywords`) and
  every metric of `settings` (a metrics.MetricSettings). Runs on every process; every process
  gets the same result."""
  embeddings = embed_split(model, variables, builder, spec, split, tokenizer, mesh,
                           batch_size_per_device, progress)
  if keywords:
    embeddings.keywords = np.asarray(keywords, dtype=str)
    embeddings.keyword_embeddings = encode.texts(model, variables, tokenizer, keywords, mesh,
                                                 batch_size_per_device)
  result, ranks = metrics_lib.embedding_metrics(embeddings, settings)
  return Evaluation(embeddings, result, ranks)

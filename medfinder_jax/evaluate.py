"""Evaluation of a model on a split, in memory: the one path of in-loop validation and of
`launch.py eval` (which writes the files afterwards, from the result).

`embed_split` computes the embeddings of every study of a split on the mesh, by every process,
and gathers them in dataset order. Every study counts exactly once: evaluation batches are
padded and masked (`input_pipeline.eval_batches`) and each row carries its position in the
split, so the gathered rows are put back in dataset order and the padding dropped (the released
code's sampler repeated studies instead). Text is deterministic at evaluation (no random word
window). `evaluate_split` adds the keyword queries, the labels and prompts of zero-shot
classification, and the metrics (metrics.embedding_metrics); `operating_points` picks the
zero-shot thresholds on a validation split.
"""

import dataclasses
from typing import Any

import jax.numpy as jnp
import numpy as np

from medfinder_jax import encode
from medfinder_jax import findings
from medfinder_jax import input_pipeline
from medfinder_jax import interchange
from medfinder_jax import metrics as metrics_lib
from medfinder_jax import sharding
from medfinder_jax import zeroshot


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
  source_paths, and scan_ids where the records carry them). `progress` (optional) is called with the number of batches done."""
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
      source_paths=np.asarray(texts.get("source_path", [""] * len(image))),
      scan_ids=np.asarray(texts["scan_id"]) if "scan_id" in texts else None)


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


def split_labels(builder, spec, split, reports, settings):
  """(labels (N, L) int8, label names) of a split: the records' label vectors when the dataset
  has them (CT-RATE), else the configured findings read from the reports (negation-aware,
  findings.py); (None, None) when neither applies."""
  names = tuple(spec.label_names)
  if names:
    return np.asarray(input_pipeline.split_labels(builder, split), np.int8), names
  if settings.zeroshot.findings and reports is not None:
    relevance = findings.relevance_matrix(reports, settings.zeroshot.findings)
    return relevance.T.astype(np.int8), settings.zeroshot.findings
  return None, None


def prompt_embeddings(model, variables, tokenizer, mesh, label_names, templates,
                      batch_size_per_device=4):
  """(L, 2, D) positive/negative prompt embeddings of each label (ensembled over templates)."""
  texts = zeroshot.prompts(label_names, templates)
  embedded = encode.texts(model, variables, tokenizer, texts, mesh, batch_size_per_device)
  return zeroshot.ensemble(embedded, len(label_names), len(templates))


def add_labels_and_prompts(embeddings, model, variables, builder, spec, split, tokenizer, mesh,
                           settings, similarity_scale, batch_size_per_device=4):
  """Adds labels, label_names and (with zero-shot on) prompt_embeddings and logit_scale."""
  labels, names = split_labels(builder, spec, split, embeddings.reports, settings)
  if labels is None:
    return embeddings
  embeddings.labels, embeddings.label_names = labels, np.asarray(names, dtype=str)
  if settings.zeroshot.enabled:
    embeddings.prompt_embeddings = prompt_embeddings(
        model, variables, tokenizer, mesh, names, settings.zeroshot.templates,
        batch_size_per_device)
    embeddings.logit_scale = np.float32(similarity_scale)
  return embeddings


def evaluate_split(model, variables, builder, spec, split, tokenizer, mesh, settings, *,
                   keywords=(), batch_size_per_device=4, progress=None, similarity_scale=1.0,
                   label_thresholds=None):
  """Evaluation of `split`: its embeddings, the keyword queries' embeddings (`keywords`), the
  labels and prompt embeddings of zero-shot classification, and every metric of `settings` (a
  metrics.MetricSettings). similarity_scale: the model's inverse temperature (P(present));
  label_thresholds: zero-shot operating points from a validation split (operating_points), else
  chosen on this split. Runs on every process; every process gets the same result."""
  embeddings = embed_split(model, variables, builder, spec, split, tokenizer, mesh,
                           batch_size_per_device, progress)
  if keywords:
    embeddings.keywords = np.asarray(keywords, dtype=str)
    embeddings.keyword_embeddings = encode.texts(model, variables, tokenizer, keywords, mesh,
                                                 batch_size_per_device)
  add_labels_and_prompts(embeddings, model, variables, builder, spec, split, tokenizer, mesh,
                         settings, similarity_scale, batch_size_per_device)
  if label_thresholds is not None and embeddings.prompt_embeddings is not None:
    embeddings.label_thresholds = np.asarray(label_thresholds, np.float32)
  result, ranks = metrics_lib.embedding_metrics(embeddings, settings)
  return Evaluation(embeddings, result, ranks)


def operating_points(model, variables, builder, spec, split, tokenizer, mesh, settings, *,
                     similarity_scale=1.0, batch_size_per_device=4):
  """(L,) zero-shot thresholds by Youden's J on `split` (the validation split), or None when
  that split has no labels. Its embeddings are computed as evaluate_split computes them."""
  embeddings = embed_split(model, variables, builder, spec, split, tokenizer, mesh,
                           batch_size_per_device)
  add_labels_and_prompts(embeddings, model, variables, builder, spec, split, tokenizer, mesh,
                         settings, similarity_scale, batch_size_per_device)
  if embeddings.prompt_embeddings is None:
    return None
  if settings.gallery == "scan":
    embeddings = metrics_lib.scan_gallery(embeddings)
  return zeroshot.youden_thresholds(metrics_lib.zeroshot_scores(embeddings), embeddings.labels)

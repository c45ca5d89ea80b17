"""Embedding index on disk, and exact search over it (a query embedding -> ranked rows).

An index is a directory:
  index.json      {"format": "medfinder-index", "version": 2, "n": N, "dim": D,
                   "created": "2025-01-01T00:00:00Z" (UTC),
                   "model": the identity of the model that made the embeddings
                            (loading.make_identity: backbone, embed_dim, fingerprint, checkpoint,
                            kind, step, config, preprocess) + "embedded_from"}
  embeddings.npz  the interchange format (interchange.py): image_embeddings and text_embeddings
                  (L2-normalized float32, row i = study i), study_ids, reports, source_paths.
Queries must come from the same model; commands/search.py checks that against "model".
An index of another format version is refused (rebuild it with launch.py embed).
"""

import dataclasses
import datetime
import json
import os
import shutil
import tempfile
from typing import NamedTuple

import numpy as np

from medfinder_jax import interchange
from medfinder_jax import metrics as metrics_lib

INDEX_FORMAT = "medfinder-index"
INDEX_VERSION = 2   # 2: the model record of loading.make_identity (kind "released", loss section)
META_FILE = "index.json"
EMBEDDINGS_FILE = "embeddings.npz"
TARGETS = ("image", "text")


class IndexFileError(interchange.InterchangeError):
  """An index that cannot be used: missing, corrupt or inconsistent files."""


class SearchResult(NamedTuple):
  rank: int           # 1-based position in the result list
  study_id: str
  score: float        # cosine similarity between the query and the item
  excerpt: str        # start of the study's report (whitespace collapsed)
  source_path: str    # the study's volume file ("" when unknown)
  row: int            # 0-based row of the study in the index


@dataclasses.dataclass
class EmbeddingIndex(interchange.PairedEmbeddings):
  directory: str
  meta: dict
  image_embeddings: np.ndarray   # (N, D) float32, unit rows
  text_embeddings: np.ndarray    # (N, D) float32, unit rows
  study_ids: np.ndarray          # (N,) str
  reports: np.ndarray            # (N,) str ("" when unknown)
  source_paths: np.ndarray       # (N,) str ("" when unknown)


# --- Writing and reading --------------------------------------------------------------------------

def _unit_rows(x):
  """Rows scaled to unit L2 norm, as numpy float32 (all-zero rows stay zero)."""
  return np.asarray(metrics_lib.l2_normalize(x))


def check_index_target(directory, overwrite=False):
  """Raises IndexFileError unless an index may be written to `directory`: it does not exist, or
  overwrite is set and it is an index (or an empty directory). Cheap: call it before the work."""
  if not os.path.exists(directory):
    return
  if not overwrite:
    raise IndexFileError(f"{directory}: already exists; pass --overwrite to replace the index")
  if not os.path.isdir(directory):
    raise IndexFileError(f"{directory}: exists and is not a directory; refusing to replace it")
  if os.listdir(directory) and not os.path.isfile(os.path.join(directory, META_FILE)):
    raise IndexFileError(f"{directory}: exists and is not an index (no {META_FILE}); "
                         f"refusing to replace it")


def build_index(directory, embeddings, model, overwrite=False):
  """Writes an index directory from an interchange.EmbeddingSet (or its {name: array} fields).

  Embeddings are L2-normalized before storing; missing reports/source paths are stored as "".
  The directory appears complete or not at all (written next to it, then renamed).
  """
  if not isinstance(embeddings, interchange.EmbeddingSet):
    embeddings = interchange.validate(embeddings, directory)
  check_index_target(directory, overwrite)
  blank = np.full((embeddings.n,), "", dtype=str)
  stored = interchange.EmbeddingSet(
      image_embeddings=_unit_rows(embeddings.image_embeddings),
      text_embeddings=_unit_rows(embeddings.text_embeddings),
      study_ids=embeddings.study_ids,
      reports=blank if embeddings.reports is None else embeddings.reports,
      source_paths=blank if embeddings.source_paths is None else embeddings.source_paths)
  meta = {"format": INDEX_FORMAT, "version": INDEX_VERSION, "n": embeddings.n,
          "dim": embeddings.dim,
          "created": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
          "model": dict(model)}
  parent = os.path.dirname(os.path.abspath(directory))
  os.makedirs(parent, exist_ok=True)
  staging = tempfile.mkdtemp(dir=parent, prefix=".tmp-index-")
  try:
    interchange.save_embeddings(os.path.join(staging, EMBEDDINGS_FILE), stored)
    with open(os.path.join(staging, META_FILE), "w", encoding="utf-8") as f:
      json.dump(meta, f, indent=2)
    if os.path.exists(directory):
      shutil.rmtree(directory)
    os.replace(staging, directory)
  finally:
    if os.path.exists(staging):
      shutil.rmtree(staging)
  return directory


def _read_meta(directory):
  path = os.path.join(directory, META_FILE)
  if not os.path.isdir(directory):
    raise IndexFileError(f"{directory}: no such index directory")
  try:
    with open(path, encoding="utf-8") as f:
      meta = json.load(f)
  except FileNotFoundError:
    raise IndexFileError(f"{directory}: not a MedFinder index (no {META_FILE}); build one "
                         f"with launch.py embed") from None
  except (OSError, json.JSONDecodeError) as err:
    raise IndexFileError(f"{path}: unreadable ({err})") from None
  if meta.get("format") != INDEX_FORMAT or meta.get("version") != INDEX_VERSION:
    raise IndexFileError(f"{path}: format {meta.get('format')!r} version "
                         f"{meta.get('version')!r}, this version of launch.py reads "
                         f"{INDEX_FORMAT!r} version {INDEX_VERSION}: rebuild the index with "
                         f"launch.py embed")
  return meta


def load_index(directory):
  """Reads an index; IndexFileError naming the file for anything missing or inconsistent."""
  meta = _read_meta(directory)
  data = interchange.load_embeddings(os.path.join(directory, EMBEDDINGS_FILE))
  if (data.n, data.dim) != (meta.get("n"), meta.get("dim")):
    raise IndexFileError(f"{directory}: {META_FILE} says N={meta.get('n')}, D={meta.get('dim')} "
                         f"but {EMBEDDINGS_FILE} has N={data.n}, D={data.dim}; rebuild the index")
  blank = np.full((data.n,), "", dtype=str)
  index = EmbeddingIndex(
      directory=directory, meta=meta, image_embeddings=data.image_embeddings,
      text_embeddings=data.text_embeddings, study_ids=data.study_ids,
      reports=blank if data.reports is None else data.reports,
      source_paths=blank if data.source_paths is None else data.source_paths)
  return index


# --- Search ---------------------------------------------------------------------------------------

def excerpt(text, max_chars=200):
  """The start of a report on one line, cut at a word boundary, with "…" when shortened."""
  text = " ".join(str(text).split())
  if len(text) <= max_chars:
    return text
  cut = text[:max_chars].rsplit(" ", 1)[0] or text[:max_chars]
  return cut + "…"


def top_k_rows(scores, k):
  """Row indices of the k highest scores, best first (ties: lower row first); O(N + k log k)."""
  k = min(int(k), scores.shape[0])
  if k <= 0:
    return np.zeros((0,), np.int64)
  rows = np.argpartition(-scores, k - 1)[:k] if k < scores.shape[0] else np.arange(k)
  return rows[np.lexsort((rows, -scores[rows]))]


def _query_vector(index, query_embedding):
  query = np.asarray(query_embedding, np.float32)
  if query.ndim == 2 and query.shape[0] == 1:
    query = query[0]
  if query.ndim != 1 or query.shape[0] != index.dim:
    raise ValueError(f"query embedding has shape {query.shape}; the index {index.directory} "
                     f"expects one vector of dimension {index.dim}")
  if not np.all(np.isfinite(query)):
    raise ValueError("query embedding contains NaN or Inf")
  return _unit_rows(query[None])[0]


def search(index, query_embedding, top_k=10, against="image", excerpt_chars=200):
  """Ranks the index's studies for one query embedding by cosine similarity.

  against="image": compare with the image embeddings (a text or keyword query finds studies);
  "text": compare with the report embeddings (a volume query finds reports).
  Returns up to top_k SearchResult, best first (top_k larger than N returns all N).
  """
  if against not in TARGETS:
    raise ValueError(f"against must be one of {TARGETS}, got {against!r}")
  if top_k < 1:
    raise ValueError(f"top_k must be at least 1, got {top_k}")
  gallery = index.image_embeddings if against == "image" else index.text_embeddings
  scores = gallery @ _query_vector(index, query_embedding)
  return [SearchResult(rank=i + 1, study_id=str(index.study_ids[row]), score=float(scores[row]),
                       excerpt=excerpt(index.reports[row], excerpt_chars),
                       source_path=str(index.source_paths[row]), row=int(row))
          for i, row in enumerate(top_k_rows(scores, top_k))]

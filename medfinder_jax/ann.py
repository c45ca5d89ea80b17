"""Approximate search over an archive index: a faiss IVF index with 8-bit scalar quantization.

Why IVF-SQ8 (faiss `IVF<nlist>,SQ8`, inner product on the unit rows): at a million 512-d studies
its codes take 512 MB (HNSW over float vectors would take 2 GB plus its graph, and its build is
an order of magnitude slower on a few cores); the coarse quantizer trains on a sample in seconds;
a query scans nprobe of nlist lists, so its cost is set by one number that the build tunes; and
the index file is memory-mapped by faiss when loaded. The few candidates it returns (4 x top_k)
are re-scored exactly from the index's own embeddings, so scores are the exact cosines and
quantization only decides which rows are candidates.

Built by `launch.py index-ann` into <index>/ann/: ivf.faiss and ann.json {"format":
"medfinder-ann", "version": 1, "kind", "nlist", "nprobe", "recall_at_10", "recall_by_nprobe",
"queries", "built_over" (the index's commits), "n", "build_s", "created"}. recall@10 is measured
at build time against exact search, with the report embeddings of sampled studies as queries
(text queries are what ANN serves: it covers the image gallery); nprobe is the smallest power of
two that reaches the target recall. When the index has changed since (a shard added, a study
removed), the ANN index is stale and search falls back to exact search, saying so.
"""

import datetime
import json
import os
import shutil
import time

import numpy as np

from medfinder_jax import errors
from medfinder_jax import index as index_lib

ANN_DIR = "ann"
ANN_FILE = "ivf.faiss"
ANN_META = "ann.json"
ANN_FORMAT = "medfinder-ann"
ANN_VERSION = 1
RERANK_FACTOR = 4     # candidates per result re-scored exactly
ADD_ROWS = 65536      # rows converted and added at once


class AnnError(errors.UserError):
  """An ANN index that cannot be built or used as asked."""


def _faiss():
  try:
    import faiss  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise AnnError("approximate search needs faiss: .venv/bin/pip install faiss-cpu") from None
  return faiss


def default_nlist(n):
  """About sqrt(n) lists (a power of two), at least 1 and at most n / 39 (faiss's minimum of
  training points per list)."""
  if n < 39:
    return 1
  return int(max(1, min(2 ** round(np.log2(np.sqrt(n))), n // 39)))


def build(index, nlist=None, target_recall=0.95, queries=1000, seed=0, log=print):
  """Builds and saves the ANN index of `index` (an index_lib.ArchiveIndex); returns ann.json."""
  faiss = _faiss()
  if index.n == 0:
    raise AnnError(f"{index.directory}: the index is empty")
  if not 0 < target_recall <= 1:
    raise AnnError(f"--target_recall {target_recall}: expected a value in (0, 1]")
  start = time.perf_counter()
  nlist = int(nlist or default_nlist(index.n))
  if not 1 <= nlist <= index.n:
    raise AnnError(f"--nlist {nlist}: expected 1 to the number of studies ({index.n})")
  rng = np.random.default_rng(seed)
  ivf = faiss.index_factory(index.dim, f"IVF{nlist},SQ8", faiss.METRIC_INNER_PRODUCT)
  train_rows = np.sort(rng.choice(index.n, size=min(index.n, max(64 * nlist, 20000)),
                                  replace=False))
  log(f"training {nlist} lists on {len(train_rows)} studies")
  ivf.train(index.vectors(train_rows, "image"))
  for shard in index.shards:
    for first in range(0, shard.image.shape[0], ADD_ROWS):
      rows = shard.global_rows[first:first + ADD_ROWS]
      keep = rows >= 0
      block = index_lib.as_float32(shard.image[first:first + ADD_ROWS])[keep]
      shard.release("image", first, first + ADD_ROWS)
      ivf.add_with_ids(block, rows[keep])
  log(f"added {index.n} studies; measuring recall@10 against exact search")
  recall = _tune(index, ivf, nlist, target_recall, min(queries, index.n), rng)
  nprobe = next((p for p, r in recall.items() if r >= target_recall), max(recall))
  meta = {"format": ANN_FORMAT, "version": ANN_VERSION, "kind": f"IVF{nlist},SQ8",
          "nlist": nlist, "nprobe": int(nprobe), "recall_at_10": recall[nprobe],
          "target_recall": target_recall, "recall_by_nprobe": {str(p): r for p, r in recall.items()},
          "queries": min(queries, index.n), "built_over": index.commits, "n": index.n,
          "build_s": round(time.perf_counter() - start, 2),
          "created": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}
  _save(index.directory, ivf, meta)
  return meta


def _tune(index, ivf, nlist, target_recall, count, rng):
  """{nprobe: recall@10} for nprobe = 1, 2, 4, ... until the target is reached."""
  sample = np.sort(rng.choice(index.n, size=count, replace=False))
  queries = index_lib.query_vectors(index, index.vectors(sample, "text"))
  k = min(10, index.n)
  truth = np.concatenate([index_lib.exact_top_k(index, queries[i:i + 64], k)[0]
                          for i in range(0, len(queries), 64)])
  recall, nprobe = {}, 1
  while True:
    ivf.nprobe = nprobe
    found = rerank(index, queries, ivf.search(queries, RERANK_FACTOR * k)[1], k)[0]
    hits = sum(len(set(t) & set(f)) for t, f in zip(truth, found))
    recall[nprobe] = round(hits / truth.size, 4)
    if recall[nprobe] >= target_recall or nprobe >= nlist:
      return recall
    nprobe = min(2 * nprobe, nlist)


def rerank(index, queries, candidates, k):
  """(rows, scores) of the k best candidates per query, scored exactly (ties: lower row)."""
  rows = np.where(candidates >= 0, candidates, -1)
  scores = np.full(rows.shape, -np.inf, np.float32)
  valid = rows >= 0
  if valid.any():
    vectors = index.vectors(rows[valid], "image")
    scores[valid] = np.einsum("ij,ij->i", vectors, np.repeat(queries, valid.sum(axis=1), axis=0))
  order = np.lexsort((np.where(valid, rows, np.iinfo(np.int64).max), -scores), axis=1)[:, :k]
  rows, scores = np.take_along_axis(rows, order, axis=1), np.take_along_axis(scores, order, axis=1)
  count = int(np.isfinite(scores).all(axis=0).sum())
  return rows[:, :count], scores[:, :count]


def _save(directory, ivf, meta):
  faiss = _faiss()
  target = os.path.join(directory, ANN_DIR)
  staging = os.path.join(directory, ".tmp-" + ANN_DIR)
  shutil.rmtree(staging, ignore_errors=True)
  os.makedirs(staging)
  faiss.write_index(ivf, os.path.join(staging, ANN_FILE))
  with open(os.path.join(staging, ANN_META), "w", encoding="utf-8") as f:
    json.dump(meta, f, indent=2)
  if os.path.exists(target):
    shutil.rmtree(target)
  os.replace(staging, target)


class AnnIndex:
  """A loaded ANN index (memory-mapped by faiss) and its build record."""

  def __init__(self, ivf, meta):
    self.ivf = ivf
    self.meta = meta
    ivf.nprobe = int(meta["nprobe"])

  def search(self, index, queries, k):
    """(rows, scores) like index_lib.exact_top_k, for the image gallery."""
    k = min(int(k), index.n)
    candidates = self.ivf.search(queries, RERANK_FACTOR * k)[1]
    return rerank(index, queries, candidates, k)


def load(index):
  """(AnnIndex or None, why not): None when there is none, or it is stale or unreadable."""
  folder = os.path.join(index.directory, ANN_DIR)
  if not os.path.isdir(folder):
    return None, "no ANN index (launch.py index-ann builds one)"
  try:
    with open(os.path.join(folder, ANN_META), encoding="utf-8") as f:
      meta = json.load(f)
  except (OSError, ValueError) as err:
    return None, f"{folder}: unreadable {ANN_META} ({err}); rebuild with launch.py index-ann"
  if meta.get("format") != ANN_FORMAT or meta.get("version") != ANN_VERSION:
    return None, f"{folder}: ANN format version {meta.get('version')!r}, expected " \
                 f"{ANN_VERSION}; rebuild with launch.py index-ann"
  if meta.get("built_over") != index.commits:
    return None, (f"{folder}: stale (the index changed since it was built); exact search "
                  f"until launch.py index-ann rebuilds it")
  faiss = _faiss()
  try:
    ivf = faiss.read_index(os.path.join(folder, ANN_FILE), faiss.IO_FLAG_MMAP)
  except RuntimeError as err:
    return None, f"{folder}: unreadable {ANN_FILE} ({str(err).splitlines()[0]})"
  return AnnIndex(ivf, meta), None

"""Score-matrix passes on the host CPU, without JAX: both directions' rank counts in one pass over
S = T·Iᵀ, and each volume's nearest volumes.

rank_counts keeps the contract of score_pass.rank_counts (metrics.py, "Ties" and "One pass"): S
is visited in square tiles of one shape, t2i counts by rows and i2t by columns of the same tiles,
and every paired score is read from a tile of that shape, so it compares bit-exactly with its row
and its column. Here the tiles are multiplied by the BLAS numpy links (one thread per core, each on
its own tiles) and counted with numpy alone: comparisons into a byte mask, whose bytes are summed
eight at a time as the lanes of uint64 words (at most 255 words per sum, so that no lane
overflows into the next).

Why a second engine: on a CPU, XLA multiplies the score tiles at about half the rate of that BLAS,
and importing JAX (or numba) costs about as much as the whole pass at N = 8,192.
metrics.paired_ranks picks this engine on machines without an accelerator, so `launch.py metrics`
never imports JAX there; score_pass (JAX) serves meshes and accelerators.

Order of work: first the diagonal tiles (r, r), which hold the paired scores of their own rows and
columns and are counted completely; then every other tile (r, c), whose rows compare with the
paired scores of block r and whose columns with those of block c. Each tile is multiplied once.
"""

import itertools
import math
from concurrent import futures

import numpy as np
import threadpoolctl

from medfinder_jax import bootstrap

BLOCK_SIZE = 1024   # rows and columns of one tile (4 MiB of float32: in cache while counted)
STRIP_SCORES = 1 << 24   # scores of one strip of volume -> volume queries (64 MiB of float32)
LANE_LIMIT = 255    # uint64 words summed at once: each byte lane then holds at most 255


def default_block_size(n):
  """Rows (and columns) of one score tile: BLOCK_SIZE, or N rounded up to 8 when smaller."""
  return int(min(BLOCK_SIZE, math.ceil(max(n, 1) / 8) * 8))


def rows_per_strip(n):
  """Queries per strip of volume -> volume scores against all N volumes (at most STRIP_SCORES
  scores, between 8 and BLOCK_SIZE rows)."""
  return int(max(8, min(BLOCK_SIZE, STRIP_SCORES // max(n, 1))))


def _lane_sums(words, axis):
  """Sums of uint64 words of 0/1 bytes along `axis`, in runs of at most LANE_LIMIT words, as
  (…, 8) byte lanes (int64): lane k of a sum counts byte k of the words summed. Bytes add in
  place, whatever the byte order, because no lane carries into the next."""
  total = 0
  for start in range(0, words.shape[axis], LANE_LIMIT):
    run = words[start:start + LANE_LIMIT] if axis == 0 else words[:, start:start + LANE_LIMIT]
    lanes = np.sum(run, axis=axis, dtype=np.uint64)
    total = total + lanes.view(np.uint8).reshape(lanes.shape + (8,)).astype(np.int64)
  return total


class _Counter:
  """Counts of one thread's tiles: a byte mask (width rounded up to whole uint64 words, the
  extra bytes always 0) and the column counts of every tile it counted."""

  def __init__(self, block, size):
    self.tile = np.empty((block, block), np.float32)
    self.mask = np.zeros((block, math.ceil(block / 8) * 8), np.bool_)
    self.words = self.mask.view(np.uint64)
    self.col_greater = np.zeros(size, np.int64)
    self.col_equal = np.zeros(size, np.int64)

  def row_counts(self, compare, paired):
    """(block,) rows' counts of tile entries that `compare` (np.greater, np.equal) true with their
    paired score."""
    block = self.tile.shape[0]
    compare(self.tile, paired[:, None], out=self.mask[:, :block])
    return _lane_sums(self.words, axis=1).sum(axis=1)

  def col_counts(self, compare, paired):
    """(block,) columns' counts of tile entries that `compare` true with their paired score."""
    block = self.tile.shape[0]
    compare(self.tile, paired[None, :], out=self.mask[:, :block])
    return _lane_sums(self.words, axis=0).reshape(-1)[:block]


class _Blocks:
  """Rows of x in blocks of `block`: views of x, except a last partial block, which is a
  zero-padded copy (so that every tile is multiplied in one shape, without copying x)."""

  def __init__(self, x, block):
    self.x, self.block = np.ascontiguousarray(x, np.float32), block
    n, dim = self.x.shape
    whole = n // block
    self.tail = None
    if whole * block < n:
      self.tail = np.zeros((block, dim), np.float32)
      self.tail[:n - whole * block] = self.x[whole * block:]

  def __getitem__(self, r):
    if (r + 1) * self.block <= self.x.shape[0]:
      return self.x[r * self.block:(r + 1) * self.block]
    return self.tail


class _Pass:
  """The shared state of one pass: the inputs in blocks, paired scores and the row counts (each
  row block written by one thread at a time); column counts are kept per thread and summed."""

  def __init__(self, text, image, block):
    self.n = text.shape[0]
    self.block = block
    self.blocks = math.ceil(self.n / block)
    self.text, self.image = _Blocks(text, block), _Blocks(image, block)
    size = self.blocks * block
    self.paired = np.zeros(size, np.float32)
    self.row_greater = np.zeros(size, np.int64)
    self.row_equal = np.zeros(size, np.int64)

  def span(self, r):
    return slice(r * self.block, (r + 1) * self.block)

  def valid(self, r):
    return min(self.block, self.n - r * self.block)

  def multiply(self, r, c, tile):
    """Tile (r, c) of S; scores of padding rows and columns become -inf, which never count."""
    np.matmul(self.text[r], self.image[c].T, out=tile)
    tile[self.valid(r):] = -np.inf
    tile[:, self.valid(c):] = -np.inf

  def count(self, r, c, counter):
    """Adds the counts of tile (r, c), in counter.tile, against the paired scores."""
    rows, cols = self.span(r), self.span(c)
    for compare, row_total, col_total in ((np.greater, self.row_greater, counter.col_greater),
                                          (np.equal, self.row_equal, counter.col_equal)):
      row_total[rows] += counter.row_counts(compare, self.paired[rows])
      col_total[cols] += counter.col_counts(compare, self.paired[cols])


def _claimed(counter, total):
  """Indices below `total` drawn from a counter shared by threads: each goes to one thread
  (next() on an itertools.count is atomic in CPython)."""
  for i in counter:
    if i >= total:
      return
    yield i


def _run_on_threads(work, states):
  """work(state) on one thread per state; the first exception of any is raised here, once all
  have finished."""
  with futures.ThreadPoolExecutor(len(states)) as pool:
    list(pool.map(work, states))


def rank_counts(text, image, block_size=None, workers=None):
  """{"t2i": (greater, equal), "i2t": (greater, equal)}, each int64 (N,): how many gallery items
  score > / == the paired item (the pair itself excluded), for paired rows text i <-> image i.

  text, image: (N, D), compared by dot product in float32 as given (normalize first for cosine).
  block_size: rows/columns per tile (None: default_block_size(N)); workers: threads (None: one
  per core), each running the BLAS single-threaded on its own tiles.
  """
  state = _Pass(text, image, block_size or default_block_size(np.shape(text)[0]))
  size, blocks = state.blocks * state.block, state.blocks
  counters = [_Counter(state.block, size)
              for _ in range(min(workers or bootstrap.default_workers(), blocks))]
  diagonal, rows = itertools.count(), itertools.count()

  def diagonal_tiles(counter):
    for r in _claimed(diagonal, blocks):
      state.multiply(r, r, counter.tile)
      state.paired[state.span(r)] = np.diagonal(counter.tile)
      state.count(r, r, counter)

  def other_tiles(counter):   # a whole row of tiles per claim: its row counts have one writer
    for r in _claimed(rows, blocks):
      for c in itertools.chain(range(r), range(r + 1, blocks)):
        state.multiply(r, c, counter.tile)
        state.count(r, c, counter)

  with threadpoolctl.threadpool_limits(1, user_api="blas"):
    _run_on_threads(diagonal_tiles, counters)   # every paired score is known after this
    _run_on_threads(other_tiles, counters)
  n = state.n
  column = lambda name: sum(getattr(c, name)[:n] for c in counters)  # noqa: E731
  return {"t2i": (state.row_greater[:n], state.row_equal[:n] - 1),
          "i2t": (column("col_greater"), column("col_equal") - 1)}


# --- Volume -> volume neighbours ------------------------------------------------------------------

def top_k(scores, k):
  """(R, k) column indices of each row's k largest scores, best first, ties to the lower index
  (what jax.lax.top_k returns); k <= the number of columns. O(columns) per row, plus k log k."""
  if k == 0:
    return np.zeros((scores.shape[0], 0), np.int64)
  kth = -np.partition(-scores, k - 1, axis=1)[:, k - 1:k]      # each row's k-th largest score
  above, at = scores > kth, scores == kth
  chosen = above | at
  surplus = np.flatnonzero(chosen.sum(axis=1) > k)   # rows tied at the k-th score: keep the first
  if surplus.size:
    wanted = k - above[surplus].sum(axis=1, keepdims=True)
    chosen[surplus] = above[surplus] | (at[surplus] & (np.cumsum(at[surplus], axis=1) <= wanted))
  columns = np.nonzero(chosen)[1].reshape(-1, k)                 # ascending within each row
  order = np.argsort(-np.take_along_axis(scores, columns, axis=1), axis=1, kind="stable")
  return np.take_along_axis(columns, order, axis=1)


def volume_neighbours(image, labels, in_gallery, k, exclude_self, rows=None, workers=None):
  """Per query volume: the k best gallery volumes (ties to the lower index) and how many gallery
  volumes share a finding with it, as score_pass.volume_neighbours: (N, k) and (N,) int64.
  image: (N, D) normalized; labels: (N, L) 0/1; in_gallery: (N,) bool. Strips of `rows` queries
  (None: rows_per_strip(N)) run on `workers` threads (None: one per core)."""
  image = np.asarray(image, np.float32)
  labels = np.asarray(labels, np.float32)
  in_gallery = np.asarray(in_gallery, bool)
  n = image.shape[0]
  rows = rows or rows_per_strip(n)
  top, relevant = np.zeros((n, k), np.int64), np.zeros(n, np.int64)
  strips, num_strips = itertools.count(), math.ceil(n / rows)

  def strip(start):
    span = slice(start, min(start + rows, n))
    allowed = np.broadcast_to(in_gallery, (span.stop - start, n)).copy()
    if exclude_self:
      allowed[np.arange(span.stop - start), np.arange(start, span.stop)] = False
    scores = np.where(allowed, image[span] @ image.T, np.float32(-np.inf))
    top[span] = top_k(scores, k)
    relevant[span] = np.sum(((labels[span] @ labels.T) > 0) & allowed, axis=1)

  def work(_):
    for s in _claimed(strips, num_strips):
      strip(s * rows)

  with threadpoolctl.threadpool_limits(1, user_api="blas"):
    _run_on_threads(work, list(range(min(workers or bootstrap.default_workers(), num_strips))))
  return top, relevant

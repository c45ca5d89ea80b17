"""Percentile bootstrap machinery shared by the retrieval and zero-shot metrics.

A replicate resamples N items with replacement and is represented by how many times each item
was drawn (a count vector), so a metric of the replicate is a weighted metric of the original
items: nothing is copied, and every metric of one replicate sees the same resample. Replicate r's
draws come from a counter-based stream keyed by (seed, r) alone: results are reproducible given
the seed, fewer replicates are a prefix of more, and neither the batch size nor the number of
threads changes them. Replicates run in batches on host threads, each batch one compiled pass
per metric over the items in sorted order (bootstrap_kernels.py); the metric code turns the
totals into values.
"""

import math
import os
from concurrent import futures

import numpy as np

MAX_BATCH = 256              # replicates per batch
BATCH_ELEMENTS = 1 << 24     # item x replicate counts per batch (16 MiB of uint8)


def kernels():
  """The compiled kernels. numba (about half a second to import, plus a one-time compilation
  cached on disk) is loaded only when confidence intervals are asked for."""
  from medfinder_jax import bootstrap_kernels  # pylint: disable=import-outside-toplevel
  return bootstrap_kernels


def _seed64(seed):
  return np.uint64(int(seed) % (1 << 64))


def resample_counts(seed, first, num, n):
  """(n, num) draw counts: column j is replicate first + j, n draws from n items (sum n)."""
  for dtype in (np.uint8, np.uint16, np.uint32):   # a count over 255 is astronomically rare
    counts = np.zeros((num, n), dtype)
    if kernels().draw_counts(_seed64(seed), int(first), counts):
      return np.ascontiguousarray(counts.T)
  raise AssertionError("a draw count exceeded 2**32 - 1")   # needs more than 4e9 items


def batch_size(n):
  """Replicates per batch for n items: about BATCH_ELEMENTS counts, at most MAX_BATCH."""
  return max(1, min(MAX_BATCH, BATCH_ELEMENTS // max(n, 1)))


def default_workers():
  """Threads of a host pass: one per core this process may run on (bootstrap replicates, and
  score_pass_host's tiles and strips)."""
  return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
             else os.cpu_count() or 1)


def run_replicates(kernel, seed, num_samples, n, *, batch=None, workers=None):
  """{name: (num_samples, ...)} of kernel(counts) over batches of replicates.

  kernel maps (n, R) draw counts to {name: (R, ...) array}; batches run on `workers` threads
  (default: the CPUs this process may use)."""
  batch = batch or batch_size(n)
  starts = range(0, num_samples, batch)

  def one(start):
    return kernel(resample_counts(seed, start, min(batch, num_samples - start), n))

  workers = min(workers or default_workers(), max(1, math.ceil(num_samples / batch)))
  with futures.ThreadPoolExecutor(workers) as pool:
    batches = list(pool.map(one, starts))
  return {name: np.concatenate([b[name] for b in batches]) for name in batches[0]}


def percentile_interval(samples, level):
  """Percentile bootstrap interval [lo, hi] along axis 0 (NaN samples ignored)."""
  tail = 100.0 * (1.0 - level) / 2
  return np.nanpercentile(np.asarray(samples, np.float64), [tail, 100.0 - tail], axis=0)

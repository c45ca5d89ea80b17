"""Compiled per-replicate passes of the bootstrap (numba; imported only when CIs are asked for).

Every kernel reads a batch of replicates as draw counts `counts` (N items x R replicates, item
rows contiguous), walks the items once in a metric's sorted order and keeps R running totals, so
a batch costs one pass over N x R small integers with no N x R temporaries. Kernels release the
GIL: bootstrap.run_replicates runs batches on threads.

Each kernel is written as a plain Python function (`_<name>_py`) and compiled by a call, not
a decorator: mutation testing skips decorated functions, and with NUMBA_DISABLE_JIT=1 the same
source runs as Python (tests/mutation/run.sh bootstrap_kernels).
"""

import numba
import numpy as np

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_UNIT = 1.0 / 9007199254740992.0   # 2**-53


def _compile(kernel):
  return numba.njit(nogil=True, cache=True)(kernel)


def _mix64_py(z):
  """SplitMix64's output function: a bijective 64-bit hash."""
  z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
  z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
  return z ^ (z >> np.uint64(31))


_mix64 = _compile(_mix64_py)


def _draw_counts_py(seed, first, counts):
  """Fill counts (R, N), zeros on entry, with replicate first + r's draw counts in row r.

  Replicate r draws N items uniformly with replacement from a SplitMix64 stream keyed by
  (seed, r) alone, so it does not depend on the batch it is computed in. Returns False if a
  count would overflow the dtype (then nothing is meaningful; the caller widens it)."""
  num, n = counts.shape
  limit = np.iinfo(counts.dtype).max
  for r in range(num):
    state = _mix64(_mix64(seed) ^ (np.uint64(first + r) * _GOLDEN))
    row = counts[r]
    for _ in range(n):
      state += _GOLDEN
      item = min(np.int64(np.float64(_mix64(state) >> np.uint64(11)) * _UNIT * n), n - 1)
      if row[item] == limit:
        return False
      row[item] += 1
  return True


draw_counts = _compile(_draw_counts_py)


def _rank_totals_py(counts, order, ranks, hits, middle, out_hits, out_rank_sum, out_median):
  """Per direction m and replicate c: Σ count·hits_k, Σ count·rank and the median rank.

  order (M, N): items by ascending rank; ranks (M, N) and hits (M, K, N) in that order; middle:
  the two 1-based order statistics whose mean is the median of N values. Outputs (M, K, R),
  (M, R), (M, R)."""
  num_directions, n = order.shape
  num_ks = hits.shape[1]
  r_count = counts.shape[1]
  for m in range(num_directions):
    cumulative = np.zeros(r_count, np.int64)
    low = np.zeros(r_count)
    high = np.zeros(r_count)
    rank_sum = out_rank_sum[m]
    for t in range(n):
      row = counts[order[m, t]]
      rank = ranks[m, t]
      for c in range(r_count):             # branch-free, so the loops vectorize
        w = np.int64(row[c])
        before = cumulative[c]
        cumulative[c] = before + w
        rank_sum[c] += w * rank
        low[c] += rank * ((before < middle[0]) & (middle[0] <= before + w))
        high[c] += rank * ((before < middle[1]) & (middle[1] <= before + w))
      for k in range(num_ks):
        hit, total = hits[m, k, t], out_hits[m, k]
        if hit != 0.0:
          for c in range(r_count):
            total[c] += row[c] * hit
    for c in range(r_count):
      out_median[m, c] = 0.5 * (low[c] + high[c])


rank_totals = _compile(_rank_totals_py)


def _precision_totals_py(counts, order, relevant, ks, out):
  """Relevant copies among the top K of each resampled gallery: out (Q, K, R).

  order (Q, N): gallery items, best first; relevant (Q, N) in that order. An item drawn w times
  fills w consecutive places, so it adds min(w, K − places before it) (≥ 0) to P@K's count. The
  walk stops once every replicate has filled its largest K."""
  num_queries, n = order.shape
  r_count = counts.shape[1]
  largest = ks.max()
  for q in range(num_queries):
    before = np.zeros(r_count, np.int64)
    for t in range(n):
      row = counts[order[q, t]]
      if relevant[q, t]:
        for c in range(r_count):
          w = row[c]
          for j in range(len(ks)):
            out[q, j, c] += max(0, min(w, ks[j] - before[c]))
      full = True
      for c in range(r_count):
        before[c] += row[c]
        full = full and before[c] >= largest
      if full:
        break


precision_totals = _compile(_precision_totals_py)


def _label_totals_py(counts, order, positive, group_end, cut, out):
  """One label's weighted Mann-Whitney and confusion counts for R replicates: out (5, R) =
  (2U, positive weight, negative weight, positive weight below cut, negative weight below cut).

  order (N,): studies by ascending score; positive (N,) in that order; group_end (N,): for each
  position, the end (exclusive) of its run of equal scores; cut: the first position called
  present (a group start). U counts, per positive draw, the negative draws scoring below it and
  half of those tied with it (2U is an integer)."""
  n = order.shape[0]
  r_count = counts.shape[1]
  twice_u = np.zeros(r_count, np.int64)
  pos = np.zeros(r_count, np.int64)
  neg = np.zeros(r_count, np.int64)
  group_pos = np.zeros(r_count, np.int64)
  group_neg = np.zeros(r_count, np.int64)
  t = 0
  while t < n:
    if t == cut:
      out[3, :] = pos
      out[4, :] = neg
    end = group_end[t]
    if end == t + 1:                          # untied: the common case
      row = counts[order[t]]
      if positive[t]:
        for c in range(r_count):
          twice_u[c] += 2 * row[c] * neg[c]
          pos[c] += row[c]
      else:
        for c in range(r_count):
          neg[c] += row[c]
    else:
      group_pos[:] = 0
      group_neg[:] = 0
      for s in range(t, end):
        row = counts[order[s]]
        if positive[s]:
          for c in range(r_count):
            group_pos[c] += row[c]
        else:
          for c in range(r_count):
            group_neg[c] += row[c]
      for c in range(r_count):
        twice_u[c] += group_pos[c] * (2 * neg[c] + group_neg[c])
        pos[c] += group_pos[c]
        neg[c] += group_neg[c]
    t = end
  if cut >= n:
    out[3, :] = pos
    out[4, :] = neg
  out[0, :] = twice_u
  out[1, :] = pos
  out[2, :] = neg


label_totals = _compile(_label_totals_py)

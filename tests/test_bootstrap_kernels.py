"""The bootstrap's compiled kernels against their definitions: each replicate's totals equal the
metric computed on the resample written out item by item (np.repeat by the draw counts)."""

import numpy as np
import pytest

from medfinder_jax import bootstrap

kernels = bootstrap.kernels()
MASK = (1 << 64) - 1


def splitmix64(z):
  """SplitMix64's output function on Python integers (the published constants)."""
  z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
  z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
  return z ^ (z >> 31)


def reference_counts(seed, first, num, n):
  """(num, n) draw counts of replicates first..first+num-1 by the documented stream: replicate r
  starts from mix(mix(seed) ^ r·golden) and draws item floor(u·n), u = mix(state += golden)'s top
  53 bits as a fraction."""
  golden = 0x9E3779B97F4A7C15
  counts = np.zeros((num, n), np.int64)
  for row, r in enumerate(range(first, first + num)):
    state = splitmix64(splitmix64(seed) ^ ((r * golden) & MASK))
    for _ in range(n):
      state = (state + golden) & MASK
      counts[row, min(int((splitmix64(state) >> 11) * 2.0**-53 * n), n - 1)] += 1
  return counts


def random_counts(n, replicates, seed=0, draws=None):
  """(n, R) uint8 draw counts of resamples of `draws` items (default n) from n."""
  rng = np.random.default_rng(seed)
  draws = n if draws is None else draws
  columns = [np.bincount(rng.integers(0, n, draws), minlength=n) for _ in range(replicates)]
  return np.ascontiguousarray(np.stack(columns, axis=1).astype(np.uint8))


@pytest.mark.parametrize("seed,first", [(0, 0), (12345, 7), (2**64 - 1, 3)])
def test_draw_counts_follow_the_splitmix64_stream(seed, first):
  counts = np.zeros((4, 37), np.uint8)
  assert kernels.draw_counts(np.uint64(seed), first, counts)
  np.testing.assert_array_equal(counts, reference_counts(seed, first, 4, 37))


def test_draw_counts_fill_wide_dtypes_and_report_overflow_only_at_the_limit():
  wide = np.zeros((2, 50), np.uint32)
  assert kernels.draw_counts(np.uint64(9), 0, wide)
  np.testing.assert_array_equal(wide, reference_counts(9, 0, 2, 50))
  one_below = np.full((1, 1), 254, np.uint8)          # one item, one draw: reaches 255
  assert kernels.draw_counts(np.uint64(0), 0, one_below) and one_below[0, 0] == 255
  assert not kernels.draw_counts(np.uint64(0), 0, np.full((1, 3), 255, np.uint8))


def expanded(values, weights):
  return np.repeat(values, weights.astype(np.int64))


def test_rank_totals_are_each_replicates_hits_rank_sum_and_median():
  n, replicates, ks = 31, 6, (1, 3, 10)
  rng = np.random.default_rng(1)
  ranks = np.stack([rng.integers(1, 40, n), rng.integers(1, 5, n)])     # the second heavily tied
  order = np.argsort(ranks, axis=1, kind="stable")
  sorted_ranks = np.ascontiguousarray(np.take_along_axis(ranks, order, axis=1))
  # Hits in [0, 1]: 0/1, or under the "mid" tie rule the chance of being in the top K
  # (quarters here, so that every sum is exact).
  hits = np.ascontiguousarray(np.stack([[(sorted_ranks[0] <= k).astype(np.float64) for k in ks],
                                        rng.integers(0, 5, (len(ks), n)) / 4.0]))
  for total in (n, n - 1):          # an odd and an even number of draws: one or two middles
    counts = random_counts(n, replicates, seed=total, draws=total)
    middle = np.array([(total + 1) // 2, total // 2 + 1], np.int64)
    out_hits, out_sum = np.zeros((2, len(ks), replicates)), np.zeros((2, replicates))
    out_median = np.zeros((2, replicates))
    kernels.rank_totals(counts, order, sorted_ranks, hits, middle, out_hits, out_sum, out_median)
    for m in range(2):
      for c in range(replicates):
        drawn = expanded(ranks[m], counts[:, c])
        assert len(drawn) == total
        weights = counts[order[m], c].astype(np.int64)          # in rank order, like hits
        np.testing.assert_array_equal(out_hits[m, :, c], hits[m] @ weights)
        if m == 0:
          np.testing.assert_array_equal(out_hits[m, :, c], [np.sum(drawn <= k) for k in ks])
        assert out_sum[m, c] == drawn.sum()
        assert out_median[m, c] == np.median(drawn)


def test_precision_totals_count_relevant_copies_in_each_resampled_top_k():
  n, queries, replicates = 40, 3, 5
  rng = np.random.default_rng(2)
  order = np.stack([rng.permutation(n) for _ in range(queries)])
  relevant = rng.random((queries, n)) < 0.3                   # in `order`'s order
  counts = random_counts(n, replicates, seed=3)
  # 60: more places than draws, so every walk goes to the end; up to 10, walks stop early.
  for ks in (np.array([1, 5, 10, 60], np.int64), np.array([1, 5, 10], np.int64)):
    out = np.zeros((queries, len(ks), replicates))
    kernels.precision_totals(counts, np.ascontiguousarray(order), relevant, ks, out)
    for q in range(queries):
      for c in range(replicates):
        ranking = expanded(relevant[q], counts[order[q], c])  # the resampled gallery, best first
        np.testing.assert_array_equal(out[q, :, c], [ranking[:k].sum() for k in ks])


def tied_scores(n, rng):
  scores = np.round(rng.normal(size=n), 1)                    # many ties
  order = np.argsort(scores, kind="stable")
  sorted_scores = scores[order]
  group_end = np.searchsorted(sorted_scores, sorted_scores, side="right").astype(np.int64)
  return scores, order, group_end


@pytest.mark.parametrize("cut_at", ["start", "middle", "end"])
def test_label_totals_are_each_replicates_mann_whitney_and_confusion_counts(cut_at):
  n, replicates = 60, 7
  rng = np.random.default_rng(4)
  scores, order, group_end = tied_scores(n, rng)
  positive_items = rng.random(n) < 0.4
  positive = positive_items[order]
  starts = np.flatnonzero(np.r_[True, np.diff(scores[order]) != 0])
  cut = {"start": 0, "middle": int(starts[len(starts) // 2]), "end": n}[cut_at]
  counts = random_counts(n, replicates, seed=5)
  out = np.zeros((5, replicates))
  kernels.label_totals(counts, order, positive, group_end, cut, out)
  threshold = np.inf if cut == n else scores[order][cut]      # called present: score >= it
  for c in range(replicates):
    s, y = expanded(scores, counts[:, c]), expanded(positive_items, counts[:, c])
    pos, neg = s[y], s[~y]
    twice_u = 2 * np.sum(pos[:, None] > neg[None, :]) + np.sum(pos[:, None] == neg[None, :])
    below = s < threshold
    np.testing.assert_array_equal(out[:, c], [twice_u, len(pos), len(neg), np.sum(y & below),
                                              np.sum(~y & below)])

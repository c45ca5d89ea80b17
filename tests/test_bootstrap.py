"""Bootstrap resampling: draw counts that are a with-replacement resample, reproducible per
replicate whatever the batching and the threads."""

import numpy as np
import pytest

from medfinder_jax import bootstrap


def test_each_replicate_draws_n_items_with_replacement():
  n, replicates = 2000, 64
  counts = bootstrap.resample_counts(seed=0, first=0, num=replicates, n=n)
  assert counts.shape == (n, replicates)
  np.testing.assert_array_equal(counts.sum(axis=0), n)
  # A count is Binomial(n, 1/n) ≈ Poisson(1): P(0) = P(1) ≈ 0.368, P(2) ≈ 0.184.
  share = np.bincount(counts.ravel(), minlength=3)[:3] / counts.size
  np.testing.assert_allclose(share, [np.exp(-1), np.exp(-1), np.exp(-1) / 2], atol=0.005)
  # Every item is equally likely: its mean count over the replicates is 1.
  per_item = counts.mean(axis=1)
  assert abs(per_item.mean() - 1) < 1e-12 and per_item.std() < 1.5 / np.sqrt(replicates)


def test_replicate_depends_on_seed_and_index_only():
  whole = bootstrap.resample_counts(seed=5, first=0, num=6, n=300)
  np.testing.assert_array_equal(bootstrap.resample_counts(seed=5, first=2, num=3, n=300),
                                whole[:, 2:5])
  assert not np.array_equal(bootstrap.resample_counts(seed=6, first=0, num=6, n=300), whole)
  assert len({column.tobytes() for column in whole.T}) == 6     # replicates differ


@pytest.mark.parametrize("batch, workers", [(1, 1), (3, 2), (7, 2), (None, None)])
def test_results_do_not_depend_on_batches_or_threads(batch, workers):
  values = np.random.default_rng(0).integers(0, 1000, size=500)

  def weighted_sum(counts):     # integer arithmetic: exact whatever the batch shape
    return {"sum": counts.T.astype(np.int64) @ values}

  expected = bootstrap.run_replicates(weighted_sum, 3, 20, 500, batch=20, workers=1)["sum"]
  got = bootstrap.run_replicates(weighted_sum, 3, 20, 500, batch=batch, workers=workers)["sum"]
  np.testing.assert_array_equal(got, expected)
  assert got.shape == (20,)


def test_a_count_at_its_dtype_limit_is_refused_not_wrapped():
  full = np.full((1, 4), np.iinfo(np.uint16).max, np.uint16)
  assert not bootstrap.kernels().draw_counts(np.uint64(0), 0, full)


def test_percentile_interval_ignores_undefined_replicates():
  samples = np.concatenate([np.linspace(0, 1, 101), [np.nan] * 5])
  np.testing.assert_allclose(bootstrap.percentile_interval(samples, 0.9), [0.05, 0.95])


def test_batches_shrink_as_n_grows_to_bound_memory():
  """A batch's (N, R) counts stay near BATCH_ELEMENTS: R = MAX_BATCH for small N, fewer (a whole
  number, at least 1) for large N."""
  assert bootstrap.batch_size(100) == bootstrap.MAX_BATCH
  quarter = bootstrap.batch_size(bootstrap.BATCH_ELEMENTS // 4)
  assert quarter == 4 and isinstance(quarter, int)
  assert bootstrap.batch_size(2 * bootstrap.BATCH_ELEMENTS) == 1


def test_any_integer_seed_is_accepted_and_seeds_are_read_modulo_2_to_the_64():
  reference = bootstrap.resample_counts(seed=2**64 - 1, first=0, num=2, n=50)
  np.testing.assert_array_equal(bootstrap.resample_counts(seed=-1, first=0, num=2, n=50), reference)
  np.testing.assert_array_equal(bootstrap.resample_counts(seed=2**64 + 7, first=0, num=2, n=50),
                                bootstrap.resample_counts(seed=7, first=0, num=2, n=50))

"""Percentile bootstrap machinery shared by the retrieval and zero-shot metrics.

A replicate resamples N items with replacement and is represented by how many times each item
was drawn (a weight vector), so a metric of the replicate is a weighted metric of the original
items: nothing is copied, and every metric of one replicate sees the same resample. Replicates
are computed in fixed-size batches of keys on the device; replicate j is the same whatever the
number of replicates asked for (fewer samples = a prefix), so results are reproducible given
the seed and nothing recompiles when the count changes.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np

BATCH = 32   # replicates computed per device call


def resample_counts(key, n):
  """How many times each of n items is drawn in one resample of size n (float32)."""
  draws = jax.random.randint(key, (n,), 0, n)
  return jnp.zeros((n,), jnp.float32).at[draws].add(1.0)


def replicate_keys(seed, num_samples, batch=BATCH):
  """Per-batch key arrays: batch b gets split(fold_in(key(seed), b))."""
  base = jax.random.key(seed)
  for b in range(math.ceil(num_samples / batch)):
    yield jax.random.split(jax.random.fold_in(base, b), batch)


def run_replicates(kernel, seed, num_samples, *args, batch=BATCH):
  """Concatenated {name: (num_samples, ...)} outputs of kernel(keys, *args) over key batches."""
  batches = [kernel(keys, *args) for keys in replicate_keys(seed, num_samples, batch)]
  return {name: np.concatenate([np.asarray(b[name]) for b in batches])[:num_samples]
          for name in batches[0]}


def percentile_interval(samples, level):
  """Percentile bootstrap interval [lo, hi] along axis 0 (NaN samples ignored)."""
  tail = 100.0 * (1.0 - level) / 2
  return np.nanpercentile(np.asarray(samples, np.float64), [tail, 100.0 - tail], axis=0)

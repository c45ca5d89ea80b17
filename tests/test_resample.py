"""Separable resampling: linear (antialiased) and area weights."""

import numpy as np
import pytest

from data_prep import resample


@pytest.mark.parametrize("n_in,n_out", [(40, 13), (13, 40), (30, 30), (100, 96), (7, 3)])
def test_linear_weights_reproduce_a_ramp_away_from_the_edges(n_in, n_out):
  ramp = 3.0 * np.arange(n_in) + 5.0
  out = resample.apply_weights(ramp.reshape(-1, 1, 1), 0, *resample.linear_weights(n_in, n_out))
  centers = (np.arange(n_out) + 0.5) * n_in / n_out - 0.5
  support = max(n_in / n_out, 1.0)
  interior = (centers - support >= 0) & (centers + support <= n_in - 1)
  np.testing.assert_allclose(out[interior, 0, 0], 3.0 * centers[interior] + 5.0, rtol=1e-5)


def test_linear_shrink_averages_noise_instead_of_aliasing_it():
  noise = np.random.default_rng(0).standard_normal(3000)
  out = resample.apply_weights(noise.reshape(-1, 1, 1), 0, *resample.linear_weights(3000, 300))
  plain = resample.apply_weights(noise.reshape(-1, 1, 1), 0,
                                 *resample.linear_weights(3000, 300, antialias=False))
  assert np.std(out) < 0.5 * np.std(plain)


@pytest.mark.parametrize("n_in,n_out", [(17, 5), (5, 17), (224, 96), (96, 224), (12, 12)])
def test_area_weights_match_torch_adaptive_average_pooling(n_in, n_out):
  torch = pytest.importorskip("torch")
  x = np.random.default_rng(1).standard_normal((n_in, 3)).astype(np.float32)
  ours = resample.apply_weights(x, 0, *resample.area_weights(n_in, n_out))
  ref = torch.nn.functional.adaptive_avg_pool1d(torch.from_numpy(x.T.copy())[None], n_out)
  np.testing.assert_allclose(ours, ref[0].numpy().T, atol=1e-6)


def test_resize_processes_every_axis_and_keeps_a_constant():
  x = np.full((20, 30, 10), 7, dtype=np.int16)
  out = resample.resize(x, (8, 45, 10))
  assert out.shape == (8, 45, 10) and out.dtype == np.float32
  np.testing.assert_allclose(out, 7.0, rtol=1e-6)


def test_chunked_application_equals_whole_array_math():
  x = np.random.default_rng(2).standard_normal((33, 41, 29)).astype(np.float32)
  idx, w = resample.linear_weights(41, 17)
  expected = sum(w[:, t][None, :, None] * x[:, idx[:, t], :] for t in range(idx.shape[1]))
  np.testing.assert_allclose(resample.apply_weights(x, 1, idx, w, chunk_bytes=4096), expected,
                             rtol=1e-5, atol=1e-6)

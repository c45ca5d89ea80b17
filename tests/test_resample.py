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


def reference_pass(x, axis, idx, w):
  """One resample pass as whole-array math: the float32 products summed tap by tap in order."""
  def term(t):
    shape = [1] * x.ndim
    shape[axis] = idx.shape[0]
    return w[:, t].reshape(shape) * np.take(x, idx[:, t], axis=axis)
  out = term(0)
  for t in range(1, idx.shape[1]):
    out = out + term(t)
  return out


def reference_resize(x, out_shape, make):
  """resize as a user would write it: the axes in order of decreasing reduction."""
  for axis in sorted(range(3), key=lambda a: out_shape[a] / x.shape[a]):
    if x.shape[axis] != out_shape[axis]:
      x = reference_pass(x, axis, *make(x.shape[axis], out_shape[axis]))
  return x.astype(np.float32)


LAYOUTS = {
    "C": lambda x: x,
    "F": np.asfortranarray,
    "cropped view": lambda x: np.pad(x, 3)[3:-3, 3:-3, 3:-3],
    "flipped view": lambda x: np.ascontiguousarray(x[::-1, ::-1])[::-1, ::-1],
    "transposed view": lambda x: np.ascontiguousarray(x.transpose(2, 0, 1)).transpose(1, 2, 0),
}


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [np.int16, np.float32])
@pytest.mark.parametrize("axis", [0, 1, 2])
def test_a_pass_along_any_axis_of_any_layout_is_the_sum_of_products_in_tap_order(
    axis, dtype, layout):
  x = LAYOUTS[layout](np.random.default_rng(2).normal(0, 500, (23, 31, 19)).astype(dtype))
  idx, w = resample.linear_weights(x.shape[axis], 9)
  out = resample.apply_weights(x, axis, idx, w, chunk_bytes=4096)   # many slabs, when gathered
  assert out.dtype == np.float32
  np.testing.assert_array_equal(out, reference_pass(x, axis, idx, w))


@pytest.mark.parametrize("method", ["linear", "area"])
@pytest.mark.parametrize("flip", [(0,), (1, 2), (0, 1, 2)])
def test_resize_gives_the_same_bits_as_the_reference_on_volumes_stored_backwards(method, flip):
  """An LPS file read as RAS is a view with negative strides; its resize is walked forwards
  with mirrored weights and must give exactly the values of the plain passes."""
  x = np.random.default_rng(3).integers(-1024, 2000, (40, 27, 33)).astype(np.int16)
  backwards = np.flip(x, flip)
  make = {"linear": resample.linear_weights, "area": resample.area_weights}[method]
  for shape in [(13, 27, 11), (50, 9, 20)]:
    expected = reference_resize(np.ascontiguousarray(backwards), shape, make)
    np.testing.assert_array_equal(resample.resize(backwards, shape, method), expected)
    np.testing.assert_array_equal(resample.resize(backwards.copy(), shape, method), expected)


def test_mirrored_weights_resample_the_reversed_axis():
  x = np.random.default_rng(4).standard_normal(37).astype(np.float32)
  idx, w = resample.linear_weights(37, 12)
  forwards = reference_pass(x, 0, idx, w)
  np.testing.assert_array_equal(
      reference_pass(x[::-1], 0, *resample.mirrored(idx, w, 37))[::-1], forwards)

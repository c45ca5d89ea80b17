"""On-device augmentation: geometry against analytic maps and scipy, noise statistics, keys."""

import math
import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import scipy.ndimage

from medfinder_jax import augment


def _config(**overrides):
  config = ml_collections.ConfigDict(dict(
      two_views=True, rotate_max=0.2, zoom_range=(0.9, 1.1), noise_std_max=0.1, prob=0.5,
      view_prob=0.3))
  config.update(overrides)
  return config


def _volumes(batch=4, shape=(12, 10, 8), seed=0):
  rng = np.random.default_rng(seed)
  return jnp.asarray(rng.uniform(size=(batch, *shape, 1)).astype(np.float32))


def _two_views(key, volumes, config):
  """Jitted two_views (eager vmapped dispatch is slower than one compile here)."""
  return jax.jit(lambda k, v: augment.two_views(k, v, config))(key, volumes)


def _augment_batch(key, volumes, config, prob, view=0, first_index=0):
  fn = lambda k, v: augment.augment_batch(k, v, config, prob, view, first_index)  # noqa: E731
  return jax.jit(fn)(key, volumes)


def _ramp(shape, weights=(1.0, 10.0, 100.0)):
  """f(x, y, z) = w . (x, y, z): trilinear interpolation reproduces it exactly."""
  grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1)
  return (grid @ np.asarray(weights)).astype(np.float32)[..., None]


def _source_coordinates(shape, matrix):
  """numpy: c + M (p - c) for every voxel p, shape (X, Y, Z, 3)."""
  centre = (np.asarray(shape) - 1) / 2.0
  grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1)
  return centre + (grid - centre) @ np.asarray(matrix, np.float64).T


# --- identity -----------------------------------------------------------------------------------

def test_probability_zero_is_the_identity():
  volumes = _volumes()
  view_a, view_b = _two_views(jax.random.key(0), volumes, _config(prob=0.0, view_prob=0.0))
  np.testing.assert_array_equal(view_a, volumes)
  np.testing.assert_array_equal(view_b, volumes)


def test_zero_strength_is_the_identity():
  volumes = _volumes()
  config = _config(rotate_max=0.0, zoom_range=(1.0, 1.0), noise_std_max=0.0, prob=1.0,
                   view_prob=1.0)
  view_a, view_b = _two_views(jax.random.key(0), volumes, config)
  np.testing.assert_array_equal(view_a, volumes)
  np.testing.assert_array_equal(view_b, volumes)


# --- geometry -----------------------------------------------------------------------------------

def test_resampling_matches_scipy_trilinear_with_edge_padding():
  volume = _volumes(batch=1, shape=(11, 9, 7))[0]
  matrix = augment.sampling_matrix(jnp.array([0.15, -0.1, 0.2]), 0.92)
  coords = _source_coordinates((11, 9, 7), matrix)
  expected = scipy.ndimage.map_coordinates(np.asarray(volume[..., 0], np.float64),
                                           np.moveaxis(coords, -1, 0), order=1, mode="nearest")
  out = augment.resample_trilinear(volume, matrix)
  np.testing.assert_allclose(out[..., 0], expected, atol=2e-6)


def test_resampling_a_ramp_gives_the_clamped_affine_map():
  shape = (9, 8, 6)
  weights = np.array([1.0, 10.0, 100.0])
  matrix = augment.sampling_matrix(jnp.array([0.2, -0.2, 0.1]), 0.9)  # zoom out: borders used
  coords = _source_coordinates(shape, matrix)
  expected = np.clip(coords, 0, np.asarray(shape) - 1) @ weights
  out = augment.resample_trilinear(jnp.asarray(_ramp(shape, weights)), matrix)
  np.testing.assert_allclose(out[..., 0], expected, atol=1e-3)


def test_quarter_turn_about_z_moves_a_marker_from_plus_x_to_plus_y():
  volume = np.zeros((9, 9, 5, 1), np.float32)
  volume[6, 4, 2] = 1.0  # centre is (4, 4, 2): marker at centre + 2 x
  out = augment.resample_trilinear(jnp.asarray(volume),
                                   augment.sampling_matrix(jnp.array([0, 0, math.pi / 2]), 1.0))
  assert np.unravel_index(np.argmax(out), out.shape)[:3] == (4, 6, 2)
  np.testing.assert_allclose(np.max(out), 1.0, atol=1e-5)


def test_small_rotation_moves_the_centroid_of_a_blob_as_the_rotation_matrix_says():
  shape = (25, 25, 25)
  grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1)
  centre, blob_at = np.array([12.0, 12.0, 12.0]), np.array([18.0, 12.0, 14.0])
  blob = np.exp(-np.sum((grid - blob_at) ** 2, axis=-1) / 2.0).astype(np.float32)[..., None]
  angles = jnp.array([0.1, -0.2, 0.2])
  out = np.asarray(augment.resample_trilinear(jnp.asarray(blob),
                                              augment.sampling_matrix(angles, 1.0)))[..., 0]
  centroid = np.sum(grid * out[..., None], axis=(0, 1, 2)) / np.sum(out)
  expected = centre + np.asarray(augment.rotation_matrix(angles)) @ (blob_at - centre)
  np.testing.assert_allclose(centroid, expected, atol=0.05)


def test_zoom_scales_distances_from_the_centre():
  shape = (21, 21, 21)
  volume = np.zeros((*shape, 1), np.float32)
  volume[10 + 5, 10, 10] = 1.0  # 5 voxels from the centre along x
  out = np.asarray(augment.resample_trilinear(jnp.asarray(volume),
                                              augment.sampling_matrix(jnp.zeros(3), 1.2)))[..., 0]
  grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1)
  centroid = np.sum(grid * out[..., None], axis=(0, 1, 2)) / np.sum(out)
  np.testing.assert_allclose(centroid, [10 + 6.0, 10, 10], atol=0.05)


def test_rotation_matrix_composes_x_then_y_then_z_and_is_orthonormal():
  r = np.asarray(augment.rotation_matrix(jnp.array([0.3, -0.2, 0.1])))
  np.testing.assert_allclose(r @ r.T, np.eye(3), atol=1e-6)
  rz = np.asarray(augment.rotation_matrix(jnp.array([0.0, 0.0, math.pi / 2])))
  np.testing.assert_allclose(rz @ [1, 0, 0], [0, 1, 0], atol=1e-6)


# --- sampling statistics ------------------------------------------------------------------------

def test_noise_std_is_uniform_up_to_noise_std_max_with_zero_mean():
  n = 256
  volumes = jnp.full((n, 8, 8, 8, 1), 0.5, jnp.float32)
  config = _config(rotate_max=0.0, zoom_range=(1.0, 1.0))
  out = _augment_batch(jax.random.key(1), volumes, config, prob=1.0)
  residual = np.asarray(out - volumes).reshape(n, -1)
  stds = residual.std(axis=1)
  assert stds.min() >= 0.0 and stds.max() <= 0.1 * 1.15  # 512 samples: sample std ~ ±3%
  np.testing.assert_allclose(stds.mean(), 0.05, atol=0.006)   # U(0, 0.1): mean 0.05
  np.testing.assert_allclose(stds.std(), 0.1 / math.sqrt(12), atol=0.006)
  np.testing.assert_allclose(residual.mean(), 0.0, atol=0.002)


def test_each_transform_fires_with_its_probability():
  keys = augment.example_keys(jax.random.key(2), 2000)[0, :, 0]
  draw = lambda k: augment.sample_params(jax.random.uniform(k, (8,)), 0.3, 0.2, (0.9, 1.1), 0.1)  # noqa: E731,E501
  params = jax.jit(jax.vmap(draw))(keys)
  for fired in (np.any(params["angles"] != 0, axis=1), params["zoom"] != 1.0,
                params["noise_std"] > 0):
    np.testing.assert_allclose(np.mean(fired), 0.3, atol=0.04)  # binomial sd 0.01
  angles = np.asarray(params["angles"])[np.any(params["angles"] != 0, axis=1)]
  assert np.abs(angles).max() <= 0.2 and np.abs(angles).max() > 0.19
  zooms = np.asarray(params["zoom"])[np.asarray(params["zoom"]) != 1.0]
  assert zooms.min() >= 0.9 and zooms.max() <= 1.1


# --- keys ---------------------------------------------------------------------------------------

def test_views_differ_per_example_and_per_view():
  volumes = jnp.broadcast_to(_volumes(batch=1), (4, 12, 10, 8, 1))
  config = _config(prob=1.0, view_prob=1.0)
  view_a, view_b = _two_views(jax.random.key(3), volumes, config)
  views = np.concatenate([view_a, view_b]).reshape(8, -1)
  for i in range(8):
    for j in range(i + 1, 8):
      assert np.max(np.abs(views[i] - views[j])) > 1e-3, (i, j)


def test_same_key_same_views_other_key_other_views():
  volumes, config = _volumes(), _config(prob=1.0, view_prob=1.0)
  fn = jax.jit(lambda k, v: augment.two_views(k, v, config))
  a1, b1 = fn(jax.random.key(4), volumes)
  a2, b2 = fn(jax.random.key(4), volumes)
  a3, _ = fn(jax.random.key(5), volumes)
  np.testing.assert_array_equal(a1, a2)
  np.testing.assert_array_equal(b1, b2)
  assert np.max(np.abs(a1 - a3)) > 1e-3


def test_two_views_are_augment_batch_with_prob_then_view_prob():
  volumes, config = _volumes(), _config(prob=0.9, view_prob=0.4)
  view_a, view_b = _two_views(jax.random.key(6), volumes, config)
  np.testing.assert_allclose(view_a, _augment_batch(jax.random.key(6), volumes, config, 0.9, 0),
                             atol=1e-6)
  np.testing.assert_allclose(view_b, _augment_batch(jax.random.key(6), volumes, config, 0.4, 1),
                             atol=1e-6)


def test_an_example_depends_on_its_global_index_not_on_the_batch_it_is_in():
  volumes, config = _volumes(batch=6), _config(prob=1.0, view_prob=1.0)
  full = _augment_batch(jax.random.key(7), volumes, config, 1.0, view=1)
  part = _augment_batch(jax.random.key(7), volumes[2:5], config, 1.0, view=1,
                               first_index=2)
  np.testing.assert_allclose(part, full[2:5], atol=1e-6)


@pytest.mark.parametrize("axes", [(8, 1), (2, 4)])
def test_result_does_not_depend_on_batch_sharding_over_8_devices(axes):
  assert jax.device_count() == 8, "tests/conftest.py provides 8 fake CPU devices"
  mesh = jax.make_mesh(axes, ("data", "fsdp"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
  sharding = jax.NamedSharding(mesh, jax.P(("data", "fsdp")))
  volumes, config = _volumes(batch=8), _config(prob=1.0, view_prob=1.0)
  fn = jax.jit(lambda k, v: augment.two_views(k, v, config))
  single = fn(jax.random.key(8), jax.device_put(volumes, jax.devices()[0]))
  sharded = fn(jax.random.key(8), jax.device_put(volumes, sharding))
  assert len(sharded[0].sharding.device_set) == 8
  assert not sharded[0].sharding.is_fully_replicated  # no gather of the batch
  np.testing.assert_allclose(sharded[0], single[0], atol=1e-6)
  np.testing.assert_allclose(sharded[1], single[1], atol=1e-6)


def test_integer_or_unbatched_volumes_are_a_clear_error():
  with pytest.raises(TypeError, match="uint8"):
    augment.two_views(jax.random.key(0), jnp.zeros((2, 4, 4, 4, 1), jnp.uint8), _config())
  with pytest.raises(TypeError, match=r"\(4, 4, 4, 1\)"):
    augment.augment_batch(jax.random.key(0), jnp.zeros((4, 4, 4, 1)), _config(), 0.5)


# --- Draws (mutation testing) ---------------------------------------------------------------------

def _params(prob, count=4000, seed=12):
  keys = augment.example_keys(jax.random.key(seed), count)[0, :, 0]
  draw = lambda k: augment.sample_params(jax.random.uniform(k, (8,)), prob, 0.2, (0.9, 1.1), 0.1)  # noqa: E731,E501
  return jax.device_get(jax.jit(jax.vmap(draw))(keys))


def test_zoom_is_uniform_over_the_zoom_range():
  zooms = _params(prob=1.0)["zoom"]
  np.testing.assert_allclose(zooms.mean(), 1.0, atol=0.005)          # U(0.9, 1.1)
  np.testing.assert_allclose(zooms.std(), 0.2 / math.sqrt(12), atol=0.003)


def test_transforms_fire_independently_of_each_other():
  """Rotation, zoom and noise each fire with probability p, and together with p^2 (not p: one
  shared draw would always fire them together)."""
  params = _params(prob=0.5)
  rotated, zoomed = np.any(params["angles"] != 0, axis=1), params["zoom"] != 1.0
  noisy = params["noise_std"] > 0
  for a, b in ((rotated, zoomed), (rotated, noisy), (zoomed, noisy)):
    np.testing.assert_allclose(np.mean(a & b), 0.25, atol=0.03)     # binomial sd 0.007
  np.testing.assert_allclose(np.corrcoef(params["zoom"][zoomed & noisy],
                                         params["noise_std"][zoomed & noisy])[0, 1], 0.0,
                             atol=0.1)


def test_two_views_of_part_of_a_batch_use_its_global_index():
  volumes, config = _volumes(batch=6), _config(prob=1.0, view_prob=1.0)
  full = _two_views(jax.random.key(8), volumes, config)
  part = jax.jit(lambda k, v: augment.two_views(k, v, config, first_index=2))(
      jax.random.key(8), volumes[2:5])
  for got, want in zip(part, full):
    np.testing.assert_allclose(got, want[2:5], atol=1e-6)


def test_noise_firing_is_independent_of_the_rotation_angles():
  params = _params(prob=0.5)
  rotated = np.any(params["angles"] != 0, axis=1)
  noisy = (params["noise_std"] > 0).astype(np.float64)
  for axis in range(3):
    assert abs(np.corrcoef(noisy[rotated], params["angles"][rotated, axis])[0, 1]) < 0.1


def test_every_view_example_and_stream_gets_its_own_key():
  keys = jax.random.key_data(augment.example_keys(jax.random.key(9), 16, first_index=3))
  flat = np.asarray(keys).reshape(2 * 16 * 2, -1)
  assert len({tuple(k) for k in flat}) == len(flat)


# --- Thin axes and dtypes (mutation testing) ------------------------------------------------------

@pytest.mark.parametrize("shape", [(7, 2, 1), (1, 7, 2)])
def test_resampling_an_axis_one_or_two_voxels_thick_matches_scipy(shape):
  """A slab one or two voxels thick (a single slice, a thin crop) is sampled like any other
  axis: edge values outside it, never a read into the neighbouring row of the flat volume."""
  volume = _volumes(batch=1, shape=shape)[0]
  matrix = augment.sampling_matrix(jnp.array([0.5, -0.4, 0.3]), 0.9)
  coords = _source_coordinates(shape, matrix)
  expected = scipy.ndimage.map_coordinates(np.asarray(volume[..., 0], np.float64),
                                           np.moveaxis(coords, -1, 0), order=1, mode="nearest")
  out = augment.resample_trilinear(volume, matrix)
  np.testing.assert_allclose(out[..., 0], expected, atol=2e-6)


# --- The documented key numbering (mutation testing) ----------------------------------------------

@pytest.mark.parametrize("first_index", [None, 5])
def test_example_keys_are_the_fold_ins_the_docstring_documents(first_index):
  """[v, i, s] = fold_in(key, 4 * (first_index + i) + 2 * v + s), first_index 0 by default: a
  study's augmentation can be reproduced from the key, its global index and the view alone."""
  key = jax.random.key(10)
  args = () if first_index is None else (first_index,)
  keys = np.asarray(jax.random.key_data(augment.example_keys(key, 3, *args)))
  start = first_index or 0
  expected = [[[jax.random.key_data(jax.random.fold_in(key, 4 * (start + i) + 2 * v + s))
                for s in range(2)] for i in range(3)] for v in range(2)]
  np.testing.assert_array_equal(keys, np.asarray(expected))


def test_augment_batch_by_default_is_the_first_view_from_global_index_zero():
  volumes, config = _volumes(batch=2, shape=(5, 4, 3)), _config(prob=1.0)
  default = jax.jit(lambda k, v: augment.augment_batch(k, v, config, 1.0))(
      jax.random.key(11), volumes)
  np.testing.assert_allclose(default, _augment_batch(jax.random.key(11), volumes, config, 1.0,
                                                     view=0, first_index=0), atol=1e-6)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_a_view_keeps_the_shape_and_float_dtype_of_its_volumes(dtype):
  """No promotion to float32 (half the memory of a view kept for bfloat16 input), no extra axis,
  and the same warp as float32 up to bfloat16's precision (the noise is drawn in the volumes'
  dtype, so its values differ: left out of the comparison)."""
  volumes, config = _volumes(batch=2, shape=(5, 4, 3)), _config(prob=1.0, noise_std_max=0.0)
  out = _augment_batch(jax.random.key(12), volumes.astype(dtype), config, 1.0)
  assert out.shape == volumes.shape and out.dtype == dtype
  np.testing.assert_allclose(np.asarray(out, np.float32),
                             _augment_batch(jax.random.key(12), volumes, config, 1.0), atol=3e-2)


def test_no_gather_tells_the_compiler_its_indices_are_sorted():
  """Rotated sample points are gathered out of order, and a gather marked sorted has undefined
  results on a backend that uses the hint. XLA:CPU ignores it, so no value test here sees it."""
  text = jax.jit(augment.resample_trilinear).lower(jnp.zeros((4, 3, 2, 1)), jnp.eye(3)).as_text()
  flags = re.findall(r"indices_are_sorted = (\w+)", text)
  assert flags and set(flags) == {"false"}

"""On-device 3D augmentation: random rotation + zoom (one affine, one trilinear pass) and noise.

Pure JAX and jit-able. Volumes are float (X, Y, Z, C) in [0, 1]; batches are (B, X, Y, Z, C).
Reproduces the released code's train transforms (MONAI RandRotate ±0.2 rad about each axis,
RandZoom 0.9-1.1, RandGaussianNoise mean 0 with std ~ U(0, 0.1), each with its own probability),
with two differences made on purpose: rotation and zoom are composed into ONE affine about the
volume centre and resampled ONCE (no double blurring), trilinear with border (edge-replicate)
padding for both. Rotation and zoom act in voxel-index space (as MONAI does), so on anisotropic
voxels a rotation is not rigid in millimetres. Noise is not clipped back to [0, 1] (as MONAI).

Randomness: view v (0 or 1) of example i draws from keys `fold_in(key, 4 * (first_index + i) +
2 * v + {0, 1})`, so a study's augmentation depends only on (key, its global index, view) — not
on the batch size, the mesh, or how the batch is sharded.
"""

import jax
import jax.numpy as jnp


def sample_params(uniforms, prob, rotate_max, zoom_range, noise_std_max):
  """One example's transform from 8 numbers uniform in [0, 1).

  uniforms[0:3] decide whether rotation, zoom and noise fire (each with probability `prob`),
  uniforms[3:8] give the 3 angles, the zoom and the noise std. Returns {"angles": (3,) radians
  about the X, Y, Z axes (0 when off), "zoom": factor, >1 enlarges the content (1 when off),
  "noise_std": (0 when off)}.
  """
  u = uniforms
  angles = rotate_max * (2.0 * u[3:6] - 1.0)
  zoom = zoom_range[0] + (zoom_range[1] - zoom_range[0]) * u[6]
  return {"angles": jnp.where(u[0] < prob, angles, 0.0),
          "zoom": jnp.where(u[1] < prob, zoom, 1.0),
          "noise_std": jnp.where(u[2] < prob, noise_std_max * u[7], 0.0)}


def rotation_matrix(angles):
  """R = Rx(angles[0]) @ Ry(angles[1]) @ Rz(angles[2]); right-handed, acting on (x, y, z)."""
  cx, cy, cz = jnp.cos(angles)
  sx, sy, sz = jnp.sin(angles)
  one, zero = jnp.ones_like(cx), jnp.zeros_like(cx)
  rx = jnp.array([[one, zero, zero], [zero, cx, -sx], [zero, sx, cx]])
  ry = jnp.array([[cy, zero, sy], [zero, one, zero], [-sy, zero, cy]])
  rz = jnp.array([[cz, -sz, zero], [sz, cz, zero], [zero, zero, one]])
  return rx @ ry @ rz


def sampling_matrix(angles, zoom):
  """Output -> input map about the centre: input = c + M (output - c), M = R^T / zoom.

  The content is rotated by R and scaled by `zoom` about the volume centre c = (shape - 1) / 2.
  """
  return rotation_matrix(angles).T / zoom


def resample_trilinear(volume, matrix):
  """Samples `volume` (X, Y, Z, C) at c + matrix (p - c) for every voxel p; border padding.

  One pass: the 8 corners of each sample point are gathered from the flattened volume and
  blended trilinearly. Points outside the volume take the nearest edge value (corner indices are
  clamped to [0, n-2] and the fractions to [0, 1]). An identity matrix returns `volume` exactly.
  """
  shape = volume.shape[:3]
  coords = _sample_coordinates(shape, matrix)
  los, fracs = [], []
  for axis, coord in enumerate(coords):
    lo = jnp.clip(jnp.floor(coord), 0, max(shape[axis] - 2, 0))
    los.append(lo.astype(jnp.int32))
    fracs.append(jnp.clip(coord - lo, 0.0, 1.0)[..., None].astype(volume.dtype))
  strides = (shape[1] * shape[2], shape[2], 1)
  base = los[0] * strides[0] + los[1] * strides[1] + los[2]
  flat = volume.reshape(-1, volume.shape[-1])
  steps = [min(1, n - 1) * s for n, s in zip(shape, strides)]  # 0 on a size-1 axis

  def corner(dx, dy, dz):
    return jnp.take(flat, base + dx * steps[0] + dy * steps[1] + dz * steps[2], axis=0,
                    mode="clip", unique_indices=False, indices_are_sorted=False)

  fx, fy, fz = fracs
  c00 = corner(0, 0, 0) * (1 - fz) + corner(0, 0, 1) * fz
  c01 = corner(0, 1, 0) * (1 - fz) + corner(0, 1, 1) * fz
  c10 = corner(1, 0, 0) * (1 - fz) + corner(1, 0, 1) * fz
  c11 = corner(1, 1, 0) * (1 - fz) + corner(1, 1, 1) * fz
  c0 = c00 * (1 - fy) + c01 * fy
  c1 = c10 * (1 - fy) + c11 * fy
  return c0 * (1 - fx) + c1 * fx


def augment_volume(keys, volume, prob, rotate_max, zoom_range, noise_std_max):
  """One augmented view of one volume (X, Y, Z, C): warp (rotation + zoom), then add noise.

  keys: (2,) keys, [0] draws the transform, [1] the noise (see `example_keys`).
  """
  params = sample_params(jax.random.uniform(keys[0], (8,)), prob, rotate_max, zoom_range,
                         noise_std_max)
  warped = resample_trilinear(volume, sampling_matrix(params["angles"], params["zoom"]))
  # Drawn flat: an N-d draw compiles ~6x slower on XLA:CPU (threefry index math per axis).
  noise = jax.random.normal(keys[1], (volume.size,), volume.dtype).reshape(volume.shape)
  return warped + params["noise_std"].astype(volume.dtype) * noise


def augment_batch(key, volumes, augment_config, prob, view=0, first_index=0):
  """Augments a (B, X, Y, Z, C) batch; example i uses `example_keys(...)[view, i]`.

  prob: per-transform probability (config `augment.prob` for the first view, `augment.view_prob`
  for the second). view: 0 or 1. first_index: global index of row 0 (e.g. the micro-batch
  offset when accumulating gradients), so keys never repeat within a step.
  """
  _check_volumes(volumes)
  keys = example_keys(key, volumes.shape[0], first_index)[view]
  return _augment_with_keys(keys, volumes, augment_config, prob)


def two_views(key, volumes, augment_config, first_index=0):
  """Two independent views (view_a, view_b) of each study, with probabilities prob / view_prob.

  Equal to augment_batch(..., prob, view=0) and augment_batch(..., view_prob, view=1). The views
  run as a 2-step lax.map (one compiled body: half the compile time of two calls); a vmap over
  the views was measured ~3x slower on CPU (benchmarks/augment_bench.py, "views").
  """
  _check_volumes(volumes)
  keys = example_keys(key, volumes.shape[0], first_index)
  probs = jnp.array([augment_config.prob, augment_config.view_prob], jnp.float32)
  views = jax.lax.map(lambda kp: _augment_with_keys(kp[0], volumes, augment_config, kp[1]),
                      (keys, probs))
  return views[0], views[1]


def example_keys(key, batch_size, first_index=0):
  """(2 views, B, 2) keys: [v, i, s] = fold_in(key, 4 * (first_index + i) + 2 * v + s).

  s = 0 draws example i's transform for view v, s = 1 its noise. One fold_in call for all of
  them: every jax.random call site costs ~0.5-1 s of XLA compile on CPU.
  """
  index = first_index + jnp.arange(batch_size)
  data = 4 * index[None, :, None] + 2 * jnp.arange(2)[:, None, None] + jnp.arange(2)
  return jax.vmap(lambda d: jax.random.fold_in(key, d))(data.reshape(-1)).reshape(data.shape)


def _check_volumes(volumes):
  if volumes.ndim != 5 or not jnp.issubdtype(volumes.dtype, jnp.floating):
    raise TypeError(f"augmentation expects float volumes (B, X, Y, Z, C) in [0, 1]; got "
                    f"{volumes.dtype} of shape {volumes.shape} (uint8 records: "
                    "volumes.astype(float32) / 255)")


def _augment_with_keys(keys, volumes, augment_config, prob):
  fn = lambda k, v: augment_volume(  # noqa: E731
      k, v, prob, augment_config.rotate_max, tuple(augment_config.zoom_range),
      augment_config.noise_std_max)
  return jax.vmap(fn)(keys, volumes)


def _sample_coordinates(shape, matrix):
  """Input coordinates (3 arrays of `shape`) of every output voxel under `matrix` about c."""
  centre = [(n - 1) / 2.0 for n in shape]
  grid = [(jnp.arange(n, dtype=jnp.float32) - c).reshape([-1 if a == axis else 1
                                                          for a in range(3)])
          for axis, (n, c) in enumerate(zip(shape, centre))]
  matrix = matrix.astype(jnp.float32)
  return [centre[i] + matrix[i, 0] * grid[0] + matrix[i, 1] * grid[1] + matrix[i, 2] * grid[2]
          for i in range(3)]

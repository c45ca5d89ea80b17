"""Separable 3D resampling with sparse per-axis weights (pure numpy).

A resize is done one axis at a time: output sample j along an axis is a weighted sum of a few
input samples, `out[j] = sum_t w[j, t] * x[idx[j, t]]`. Doing the axis with the largest reduction
first keeps every later pass small, which is what makes conversion cheap next to decoding.
"""

import numpy as np


def linear_weights(n_in, n_out, antialias=True):
  """(idx, w), each (n_out, taps): linear interpolation between two grids of the same extent.

  Sample centers are aligned (output j sits at input coordinate (j + 0.5) * n_in / n_out - 0.5,
  0-based), edges replicate. When shrinking (n_out < n_in) and `antialias`, each output is the
  mean of the linear interpolant over its own cell (width n_in / n_out), so every input sample
  contributes (no aliasing of noise or small structures); a linear ramp is reproduced exactly
  away from the edges either way.
  """
  scale = n_in / n_out
  centers = (np.arange(n_out) + 0.5) * scale - 0.5
  half = scale / 2 if antialias and scale > 1 else 0.0
  first = np.floor(centers - half - 1).astype(np.int64) + 1
  taps = int(np.ceil(2 * half + 2)) + 1
  idx = first[:, None] + np.arange(taps)[None, :]
  offset = centers[:, None] - idx
  if half > 0:
    w = (_hat_integral(offset + half) - _hat_integral(offset - half)) / (2 * half)
  else:
    w = np.maximum(0.0, 1.0 - np.abs(offset))
  return _normalized(np.clip(idx, 0, n_in - 1), w)


def _hat_integral(t):
  """Integral from -inf to t of the linear-interpolation kernel max(0, 1 - |u|)."""
  t = np.clip(t, -1.0, 1.0)
  return np.where(t < 0, 0.5 * (t + 1) ** 2, 1.0 - 0.5 * (1 - t) ** 2)


def area_weights(n_in, n_out):
  """(idx, w): torch's adaptive average pooling (`interpolate(mode="area")`, MONAI's "area").

  Output j averages inputs floor(j * n_in / n_out) .. ceil((j + 1) * n_in / n_out) - 1.
  """
  j = np.arange(n_out)
  start = (j * n_in) // n_out
  end = -((-(j + 1) * n_in) // n_out)
  count = end - start
  taps = int(count.max())
  idx = start[:, None] + np.arange(taps)[None, :]
  w = (np.arange(taps)[None, :] < count[:, None]).astype(np.float64)
  return _normalized(np.clip(idx, 0, n_in - 1), w)


def _normalized(idx, w):
  w = w / w.sum(axis=1, keepdims=True)
  keep = np.any(w > 0, axis=0)          # drop taps that are zero for every output
  return idx[:, keep], w[:, keep].astype(np.float32)


def apply_weights(x, axis, idx, w, chunk_bytes=1 << 21):
  """Resamples `x` along `axis` with weights from linear_weights/area_weights (float32 out).

  `x` may be any numeric dtype and any memory layout. Every output value is computed the same
  way whichever route runs: the products w * x rounded to float32, summed tap by tap in order.
  """
  if axis == _innermost_axis(x):
    return _apply_gathered(x, axis, idx, w, chunk_bytes)
  return _apply_by_planes(x, axis, idx, w)


def _innermost_axis(x):
  """The axis of `x` with the smallest stride (the one contiguous in memory)."""
  return min(range(x.ndim), key=lambda a: (abs(x.strides[a]) if x.shape[a] > 1 else np.inf, -a))


def _apply_by_planes(x, axis, idx, w):
  """Along an outer axis: each output plane is a weighted sum of whole input planes, read as
  views (no gathers, one plane of scratch)."""
  planes = np.moveaxis(x, axis, 0)
  out_shape = list(x.shape)
  out_shape[axis] = idx.shape[0]
  out = np.empty(out_shape, np.float32)
  out_planes = np.moveaxis(out, axis, 0)
  scratch = np.empty(planes.shape[1:], np.float32)
  for j, (taps, weights) in enumerate(zip(idx, w)):
    target = out_planes[j]
    np.multiply(planes[taps[0]], weights[0], out=target)
    for i, weight in zip(taps[1:], weights[1:]):
      np.multiply(planes[i], weight, out=scratch)
      target += scratch
  return out


def _apply_gathered(x, axis, idx, w, chunk_bytes):
  """Along the contiguous axis: the taps are gathered through slabs of another axis so the
  temporaries stay in cache (4-6x faster than whole-array passes)."""
  out_shape = list(x.shape)
  out_shape[axis] = idx.shape[0]
  out = np.empty(out_shape, np.float32)
  slab_axis = 1 if axis == 0 else 0
  slab_size = x.size // x.shape[slab_axis] * 4
  per_slab = max(1, chunk_bytes // max(slab_size, 1))
  bshape = [1] * x.ndim
  bshape[axis] = idx.shape[0]
  weights = [w[:, t].reshape(bshape) for t in range(idx.shape[1])]
  for start in range(0, x.shape[slab_axis], per_slab):
    window = [slice(None)] * x.ndim
    window[slab_axis] = slice(start, start + per_slab)
    window = tuple(window)
    _accumulate_taps(x[window], axis, idx, weights, out[window])
  return out


def _accumulate_taps(x, axis, idx, weights, out):
  """out = sum_t weights[t] * x[idx[:, t]] along `axis`, written into `out` in place."""
  scratch = None
  for t, weight in enumerate(weights):
    term = np.take(x, idx[:, t], axis=axis)
    if t == 0:
      np.multiply(term, weight, out=out)
      continue
    if scratch is None:
      scratch = np.empty(out.shape, np.float32)
    np.multiply(term, weight, out=scratch)
    out += scratch


def resize(x, out_shape, method="linear"):
  """Resizes a 3D array to `out_shape`; method "linear" (antialiased) or "area" (adaptive mean).

  The axes are processed in order of decreasing reduction; an axis of unchanged size is not
  touched. Axes that `x` stores backwards (a flipped orientation) are walked forwards with
  mirrored weights, which gives the same values: numpy's vectorized loops are several times
  slower on negative strides. Returns float32 (a float32 copy of `x` if nothing changes).
  """
  make = {"linear": linear_weights, "area": area_weights}[method]
  order = sorted(range(x.ndim), key=lambda a: out_shape[a] / x.shape[a])
  flips = tuple(a for a in range(x.ndim) if x.strides[a] < 0)
  x = np.flip(x, flips)
  for axis in order:
    if x.shape[axis] != out_shape[axis]:
      weights = make(x.shape[axis], int(out_shape[axis]))
      if axis in flips:
        weights = mirrored(*weights, x.shape[axis])
      x = apply_weights(x, axis, *weights)
  return np.flip(np.asarray(x, dtype=np.float32), flips)


def mirrored(idx, w, n_in):
  """The weights of the same resample on the axis read backwards: output n_out - 1 - j takes
  the inputs n_in - 1 - idx[j] with the weights w[j], in the same tap order (so each value is
  the same sum of the same products)."""
  return (n_in - 1 - idx)[::-1], w[::-1]

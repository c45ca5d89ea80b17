"""Augmentation throughput on this machine: resampling implementations, noise draws, two views.

Variants timed round-robin (best of --repeats rounds, so other load on the machine hurts less):
  resample  gather8   medfinder_jax.augment.resample_trilinear: 8 point gathers, flattened volume
            window    one lax.gather of a 2x2x2 window per output voxel
            mapcoord  jax.scipy.ndimage.map_coordinates(order=1, mode="nearest"), per channel
  noise     module    augment.augment_volume's draws: uniform (8 params), flat normal (noise)
            nd        the same with the noise drawn N-d (volume shape) instead of flat
            one       one flat normal of 8 + n values, params = normal CDF of the first 8
  views     lax.map   augment.two_views: a 2-step lax.map over the views (one compiled body)
            separate  two augment_batch calls (two compiled copies)
            vmapped   one vmap over the two views of the batch
One volume = one augmented view of one study; all variants compute the same values.

  python benchmarks/augment_bench.py --shapes 64,64,32 112,112,48 --batch 4
"""

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # repo root
from medfinder_jax import augment  # noqa: E402

CONFIG = type("AugmentConfig", (), dict(rotate_max=0.2, zoom_range=(0.9, 1.1),
                                        noise_std_max=0.1, prob=0.5, view_prob=0.3))


def resample_window(volume, matrix):
  """One gather of (2, 2, 2, C) windows; same semantics as augment.resample_trilinear."""
  shape = volume.shape[:3]
  coords = augment._sample_coordinates(shape, matrix)  # pylint: disable=protected-access
  los, fracs = [], []
  for axis, coord in enumerate(coords):
    lo = jnp.clip(jnp.floor(coord), 0, shape[axis] - 2)
    los.append(jnp.broadcast_to(lo.astype(jnp.int32), shape).reshape(-1))
    fracs.append(jnp.broadcast_to(jnp.clip(coord - lo, 0.0, 1.0), shape).reshape(-1, 1, 1, 1, 1))
  dnums = jax.lax.GatherDimensionNumbers(offset_dims=(1, 2, 3, 4), collapsed_slice_dims=(),
                                         start_index_map=(0, 1, 2))
  win = jax.lax.gather(volume, jnp.stack(los, axis=-1), dnums,
                       slice_sizes=(2, 2, 2, volume.shape[-1]),
                       mode=jax.lax.GatherScatterMode.CLIP)
  fx, fy, fz = fracs
  weights = (jnp.concatenate([1 - fx, fx], axis=1) * jnp.concatenate([1 - fy, fy], axis=2)
             * jnp.concatenate([1 - fz, fz], axis=3))
  return jnp.sum(win * weights, axis=(1, 2, 3)).reshape(volume.shape)


def resample_mapcoord(volume, matrix):
  coords = augment._sample_coordinates(volume.shape[:3], matrix)  # pylint: disable=protected-access
  coords = [jnp.broadcast_to(c, volume.shape[:3]) for c in coords]
  return jnp.stack([jax.scipy.ndimage.map_coordinates(volume[..., ch], coords, order=1,
                                                      mode="nearest")
                    for ch in range(volume.shape[-1])], axis=-1)


def draw_module(keys, shape):
  n = int(np.prod(shape))
  return jax.random.uniform(keys[0], (8,)), jax.random.normal(keys[1], (n,)).reshape(shape)


def draw_nd(keys, shape):
  return jax.random.uniform(keys[0], (8,)), jax.random.normal(keys[1], shape)


def draw_one_normal(keys, shape):
  z = jax.lax.optimization_barrier(jax.random.normal(keys[1], (8 + int(np.prod(shape)),)))
  return 0.5 * (1.0 + jax.lax.erf(z[:8] / np.sqrt(2.0))), z[8:].reshape(shape)


def noise_fn(draw):
  def one(key, volume):
    uniforms, noise = draw(key, volume.shape)
    return volume + 0.1 * uniforms[0] * noise
  return jax.vmap(one)


def views_separate(key, volumes):
  return (augment.augment_batch(key, volumes, CONFIG, CONFIG.prob, 0),
          augment.augment_batch(key, volumes, CONFIG, CONFIG.view_prob, 1))


def views_vmapped(key, volumes):
  probs = jnp.array([CONFIG.prob, CONFIG.view_prob], jnp.float32)
  views = jax.vmap(lambda p, v: augment.augment_batch(key, volumes, CONFIG, p, v))(
      probs, jnp.arange(2))
  return views[0], views[1]


def variants(batch):
  """name -> (jitted fn taking (key, volumes, matrices, keys), volumes per call)."""
  out = {}
  for name, resample in (("gather8", augment.resample_trilinear), ("window", resample_window),
                         ("mapcoord", resample_mapcoord)):
    fn = jax.jit(jax.vmap(resample))
    out["resample " + name] = (lambda k, v, m, ks, fn=fn: fn(v, m), batch)
  for name, draw in (("module", draw_module), ("nd", draw_nd), ("one", draw_one_normal)):
    fn = jax.jit(noise_fn(draw))
    out["noise    " + name] = (lambda k, v, m, ks, fn=fn: fn(ks, v), batch)
  mapped = jax.jit(lambda k, v: augment.two_views(k, v, CONFIG))
  out["views    lax.map"] = (lambda k, v, m, ks: mapped(k, v), 2 * batch)
  separate = jax.jit(views_separate)
  out["views    separate"] = (lambda k, v, m, ks: separate(k, v), 2 * batch)
  vmapped = jax.jit(views_vmapped)
  out["views    vmapped"] = (lambda k, v, m, ks: vmapped(k, v), 2 * batch)
  return out


def bench_shape(shape, batch, repeats):
  rng = np.random.default_rng(0)
  volumes = jnp.asarray(rng.uniform(size=(batch, *shape, 1)).astype(np.float32))
  key = jax.random.key(0)
  keys = augment.example_keys(key, batch)[0]
  angles = jax.random.uniform(key, (batch, 3), minval=-0.2, maxval=0.2)
  matrices = jax.vmap(augment.sampling_matrix)(angles, jnp.full((batch,), 1.05))
  args = (key, volumes, matrices, keys)
  fns = variants(batch)
  compile_s, best, outputs = {}, {name: float("inf") for name in fns}, {}
  for name, (fn, _) in fns.items():
    start = time.perf_counter()
    outputs[name] = jax.block_until_ready(fn(*args))
    compile_s[name] = time.perf_counter() - start
  for _ in range(repeats):
    for name, (fn, _) in fns.items():
      start = time.perf_counter()
      jax.block_until_ready(fn(*args))
      best[name] = min(best[name], time.perf_counter() - start)
  for name, (_, n) in fns.items():
    print(f"  {name:18s} {n / best[name]:8.1f} volumes/s  {1e3 * best[name] / n:7.2f} ms/volume"
          f"  (first call incl. compile {compile_s[name]:5.2f} s)")
  for group, ref in (("resample", "resample gather8"), ("views", "views    lax.map")):
    for name in fns:
      if name.startswith(group) and name != ref:
        diff = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), outputs[name],
                            outputs[ref])
        print(f"  max |{name.split()[-1]} - {ref.split()[-1]}| = {max(jax.tree.leaves(diff)):.1e}")


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--shapes", nargs="+", default=["64,64,32", "112,112,48"])
  parser.add_argument("--batch", type=int, default=4)
  parser.add_argument("--repeats", type=int, default=8)
  args = parser.parse_args()
  print(f"jax {jax.__version__}, backend {jax.default_backend()}, {jax.device_count()} device(s),"
        f" {os.cpu_count()} CPU(s) visible, load average {os.getloadavg()[0]:.1f}")
  for text in args.shapes:
    shape = tuple(int(n) for n in text.split(","))
    print(f"shape {shape} x batch {args.batch}:")
    bench_shape(shape, args.batch, args.repeats)


if __name__ == "__main__":
  main()

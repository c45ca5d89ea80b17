"""3D convolution implementations: XLA native vs by-slices (2D convs) vs PyTorch, forward and
forward+backward, per ResNet layer shape and for a whole ResNet50-style tower.

Why: XLA:CPU runs 3D convolutions far slower than 2D ones; ResNet3D's conv_impl="slices" computes
the same convolution as k 2D convolutions of depth-shifted slices (and 1^3 kernels as matmuls).

  python benchmarks/conv3d.py [--batch 2] [--size 32,32,16] [--repeats 5] [--no_torch]
Prints one JSON line per case with milliseconds.
"""

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from medfinder_jax.models import resnet3d  # noqa: E402

LAYERS = [  # (name, in channels, out channels, kernel, stride)
    ("stem 7^3", 1, 64, 7, 1),
    ("bottleneck 1^3", 64, 64, 1, 1),
    ("bottleneck 3^3", 64, 64, 3, 1),
    ("bottleneck 1^3 expand", 64, 256, 1, 1),
    ("downsample 3^3/2", 128, 128, 3, 2),
]


def timed(fn, *args, repeats):
  jax.block_until_ready(fn(*args))
  start = time.perf_counter()
  for _ in range(repeats):
    out = fn(*args)
  jax.block_until_ready(out)
  return 1e3 * (time.perf_counter() - start) / repeats


def jax_layer(x, w, stride, impl, repeats):
  pad = w.shape[0] // 2
  fwd = jax.jit(lambda x, w: resnet3d.conv3d(x, w, stride, pad, impl))
  grad = jax.jit(jax.grad(lambda x, w: jnp.sum(resnet3d.conv3d(x, w, stride, pad, impl)),
                          argnums=(0, 1)))
  return timed(fwd, x, w, repeats=repeats), timed(grad, x, w, repeats=repeats)


def torch_layer(x, cin, cout, k, stride, repeats):
  import torch  # pylint: disable=import-outside-toplevel
  conv = torch.nn.Conv3d(cin, cout, k, stride=stride, padding=k // 2, bias=False)
  xt = torch.from_numpy(np.transpose(np.asarray(x), (0, 4, 1, 2, 3)).copy()).requires_grad_()
  with torch.no_grad():
    conv(xt)
  start = time.perf_counter()
  for _ in range(repeats):
    with torch.no_grad():
      conv(xt)
  forward = 1e3 * (time.perf_counter() - start) / repeats
  start = time.perf_counter()
  for _ in range(repeats):
    conv(xt).sum().backward()
  return forward, 1e3 * (time.perf_counter() - start) / repeats


def tower(batch, size, impl, repeats):
  model = resnet3d.ResNet3D((1, 1, 1, 1), (16, 32, 64, 128), conv1_kernel=3, conv1_stride=2,
                            conv_impl=impl)
  x = jnp.ones((batch, *size, 1), jnp.float32)
  variables = jax.jit(model.init)(jax.random.key(0), x)

  def loss(params, x):
    (pooled, _), _ = model.apply({**variables, "params": params}, x, True,
                                 mutable=["batch_stats"])
    return jnp.sum(pooled)

  grad = jax.jit(jax.grad(loss))
  return timed(grad, variables["params"], x, repeats=repeats)


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--batch", type=int, default=2)
  parser.add_argument("--size", default="32,32,16")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--no_torch", action="store_true")
  args = parser.parse_args()
  size = tuple(int(s) for s in args.size.split(","))
  rng = np.random.default_rng(0)
  for name, cin, cout, k, stride in LAYERS:
    x = jnp.asarray(rng.normal(size=(args.batch, *size, cin)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(k, k, k, cin, cout)) * 0.01, jnp.float32)
    row = {"case": name, "backend": jax.default_backend(), "input": [args.batch, *size, cin]}
    for impl in ("native", "slices"):
      row[f"{impl}_fwd_ms"], row[f"{impl}_fwd_bwd_ms"] = (
          round(t, 2) for t in jax_layer(x, w, stride, impl, args.repeats))
    if not args.no_torch:
      row["torch_fwd_ms"], row["torch_fwd_bwd_ms"] = (
          round(t, 2) for t in torch_layer(x, cin, cout, k, stride, args.repeats))
    print(json.dumps(row), flush=True)
  for impl in ("native", "slices"):
    ms = tower(2 * args.batch, (64, 64, 32), impl, args.repeats)
    print(json.dumps({"case": "tiny ResNet (1,1,1,1)x(16..128) grad, 64x64x32",
                      "batch": 2 * args.batch, "impl": impl, "fwd_bwd_ms": round(ms, 1)}),
          flush=True)


if __name__ == "__main__":
  main()

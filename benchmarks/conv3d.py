"""3D convolution implementations: XLA native vs decomposed vs PyTorch, forward and
forward+backward, per ResNet50 layer shape and for whole towers.

Why: XLA:CPU runs 3D convolutions far slower than 2D convolutions and matmuls; ResNet3D's
conv_impl="decomposed" computes the same convolution as a matmul (1^3 kernels, and im2col for
small output maps) or one 2D convolution over stacked depth-shifted slices.

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

LAYERS = [  # (name, in channels, out channels, kernel, stride, input size divisor)
    ("stem 7^3", 1, 64, 7, 1, 1),
    ("stage1 1^3", 64, 64, 1, 1, 1),
    ("stage1 3^3", 64, 64, 3, 1, 1),
    ("stage1 1^3 expand", 64, 256, 1, 1, 1),
    ("stage2 3^3/2", 128, 128, 3, 2, 1),
    ("stage3 3^3", 256, 256, 3, 1, 4),
    ("stage4 3^3/2", 512, 512, 3, 2, 4),
    ("stage4 3^3", 512, 512, 3, 1, 8),
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


def tower(batch, size, impl, repeats, small=True):
  model = (resnet3d.ResNet3D((1, 1, 1, 1), (16, 32, 64, 128), conv1_kernel=3, conv1_stride=2,
                             conv_impl=impl) if small else resnet3d.ResNet3D(conv_impl=impl))
  x = jnp.ones((batch, *size, 1), jnp.float32)
  variables = jax.jit(model.init)(jax.random.key(0), x)

  def loss(params, x):
    (pooled, _), _ = model.apply({**variables, "params": params}, x, True,
                                 mutable=["batch_stats"])
    return jnp.sum(pooled)

  grad = jax.jit(jax.grad(loss))
  return timed(grad, variables["params"], x, repeats=repeats)


def torch_tower(batch, size, repeats, small=True):
  import torch  # pylint: disable=import-outside-toplevel
  from monai.networks.nets import resnet  # pylint: disable=import-outside-toplevel
  model = (resnet.ResNet("bottleneck", [1, 1, 1, 1], [16, 32, 64, 128], spatial_dims=3,
                         n_input_channels=1, conv1_t_size=3, conv1_t_stride=2,
                         feed_forward=False) if small else
           resnet.ResNet("bottleneck", [3, 4, 6, 3], [64, 128, 256, 512], spatial_dims=3,
                         n_input_channels=1, feed_forward=False))
  x = torch.ones(batch, 1, *size)
  model(x).sum().backward()
  start = time.perf_counter()
  for _ in range(repeats):
    model(x).sum().backward()
  return 1e3 * (time.perf_counter() - start) / repeats


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
  for name, cin, cout, k, stride, divisor in LAYERS:
    layer_size = tuple(max(1, n // divisor) for n in size)
    x = jnp.asarray(rng.normal(size=(args.batch, *layer_size, cin)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(k, k, k, cin, cout)) * 0.01, jnp.float32)
    row = {"case": name, "backend": jax.default_backend(),
           "input": [args.batch, *layer_size, cin]}
    for impl in ("native", "decomposed"):
      row[f"{impl}_fwd_ms"], row[f"{impl}_fwd_bwd_ms"] = (
          round(t, 2) for t in jax_layer(x, w, stride, impl, args.repeats))
    if not args.no_torch:
      row["torch_fwd_ms"], row["torch_fwd_bwd_ms"] = (
          round(t, 2) for t in torch_layer(x, cin, cout, k, stride, args.repeats))
    print(json.dumps(row), flush=True)
  for impl in ("native", "decomposed"):
    ms = tower(2 * args.batch, (64, 64, 32), impl, args.repeats)
    print(json.dumps({"case": "small ResNet (1,1,1,1)x(16..128) grad, 64x64x32",
                      "batch": 2 * args.batch, "impl": impl, "fwd_bwd_ms": round(ms, 1)}),
          flush=True)
    ms = tower(args.batch, size, impl, args.repeats, small=False)
    print(json.dumps({"case": f"ResNet50 grad, {args.size}", "batch": args.batch, "impl": impl,
                      "fwd_bwd_ms": round(ms, 1)}), flush=True)
  if not args.no_torch:
    for small, shape, batch, label in ((True, (64, 64, 32), 2 * args.batch, "small ResNet"),
                                       (False, size, args.batch, "ResNet50")):
      print(json.dumps({"case": f"{label} grad (MONAI)", "batch": batch, "impl": "torch",
                        "shape": list(shape),
                        "fwd_bwd_ms": round(torch_tower(batch, shape, args.repeats, small), 1)}),
            flush=True)


if __name__ == "__main__":
  main()

#!/usr/bin/env python3
"""Per-device memory of the ResNet50 image tower with each volume split over `spatial` devices.

  python benchmarks/spatial_memory.py                        # compile-only table, 8 fake CPUs
  python benchmarks/spatial_memory.py --shapes 224,224,96 --spatial 1,2
  python benchmarks/spatial_memory.py --throughput --steps 5  # on GPUs: volumes/s as well

What is compiled: one training pass of the image tower alone (forward in train mode, BatchNorm
statistics updated, gradient of every tower parameter), ResNet50 as the paper (MONAI layers
(3, 4, 6, 3), conv1 7^3 at stride 1), bf16 compute with float32 params, remat per stage,
native 3D convolutions (what GPUs run), batch 1 volume per data shard on a mesh
data = devices / spatial x spatial. The train step encodes two views per study, so its tower
activations are twice these; the text tower, fusion and losses are small beside them.

Memory is XLA's compiled memory analysis on this backend (no run), per device, in GiB: temp
(activations and scratch), arguments (params, the volume) and the total with the outputs. On CPU the
numbers are XLA:CPU's buffer assignment; a GPU's differs in fusion and convolution scratch
(cuDNN workspace), so take them as the scaling with `spatial` and as an order of magnitude.
"""

import argparse
import os
import sys
import time

DEVICES_FLAG = "--xla_force_host_platform_device_count"


def _fake_devices_before_jax(argv):
  """8 (or --devices) fake CPU devices, unless running on an accelerator (--throughput)."""
  if "--throughput" in argv:
    return
  devices = argv[argv.index("--devices") + 1] if "--devices" in argv else "8"
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {DEVICES_FLAG}={devices}"
  os.environ.setdefault("JAX_PLATFORMS", "cpu")


if __name__ == "__main__":   # imported (tests): the importer has set its devices
  _fake_devices_before_jax(sys.argv)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from medfinder_jax import sharding  # noqa: E402
from medfinder_jax.models import resnet3d  # noqa: E402

GIB = 2**30


def resnet50(mesh, remat=True, dtype=jnp.bfloat16, conv_impl="native"):
  """The paper's tower (conv1 stride 1) for `mesh` (split over its spatial axis)."""
  return resnet3d.ResNet3D(dtype=dtype, remat=remat, conv_impl=conv_impl,
                           activation_sharding=sharding.activation_sharding(mesh))


def tower_training_pass(model):
  """(variables, volumes) -> (sum of pooled features, new batch_stats, gradients)."""
  def loss(params, batch_stats, volumes):
    (pooled, _), updates = model.apply({"params": params, "batch_stats": batch_stats}, volumes,
                                       train=True, mutable=["batch_stats"])
    return jnp.sum(pooled), updates["batch_stats"]

  def step(variables, volumes):
    (value, batch_stats), grads = jax.value_and_grad(loss, has_aux=True)(
        variables["params"], variables["batch_stats"], volumes)
    return value, batch_stats, grads
  return step


def compile_tower(model, mesh, shape, rows):
  """The tower's training pass compiled for `rows` volumes of `shape` on `mesh` (no data)."""
  variables = jax.eval_shape(model.init, jax.random.key(0),
                             jax.ShapeDtypeStruct((1, *shape, 1), jnp.float32))
  replicated = sharding.replicated(mesh)
  variables = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated),
                           variables)
  volumes = jax.ShapeDtypeStruct((rows, *shape, 1), jnp.float32,
                                 sharding=sharding.batch_sharding(mesh))
  return jax.jit(tower_training_pass(model)).lower(variables, volumes).compile()


def memory_row(compiled):
  """GiB per device: temp (activations, scratch), arguments, and their total with the outputs
  (less what outputs reuse of the arguments). XLA:CPU's own peak_memory_in_bytes is left out:
  it counts less than temp alone here."""
  m = compiled.memory_analysis()
  total = (m.temp_size_in_bytes + m.argument_size_in_bytes + m.output_size_in_bytes
           - m.alias_size_in_bytes)
  return {"temp_gib": m.temp_size_in_bytes / GIB, "args_gib": m.argument_size_in_bytes / GIB,
          "total_gib": total / GIB}


def throughput(compiled, model, mesh, shape, rows, steps):
  """Volumes/s of the compiled pass on real devices (median of `steps` timed calls)."""
  variables = jax.jit(model.init, out_shardings=sharding.replicated(mesh))(
      jax.random.key(0), jnp.zeros((1, *shape, 1)))
  volumes = jax.device_put(np.random.default_rng(0).random((rows, *shape, 1), np.float32),
                           sharding.batch_sharding(mesh))
  jax.block_until_ready(compiled(variables, volumes))
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    jax.block_until_ready(compiled(variables, volumes))
    times.append(time.perf_counter() - start)
  return rows / float(np.median(times))


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--shapes", nargs="+", default=["224,224,96", "480,480,240"])
  parser.add_argument("--spatial", default="1,2,4,8")
  parser.add_argument("--devices", type=int, default=8)
  parser.add_argument("--no_remat", action="store_true")
  parser.add_argument("--throughput", action="store_true", help="run it too (accelerators)")
  parser.add_argument("--steps", type=int, default=5)
  args = parser.parse_args()
  devices = jax.devices()[:args.devices]
  print(f"ResNet50 (conv1 stride 1) tower training pass, bf16, remat={not args.no_remat}, "
        f"batch 1 per data shard, {len(devices)} {devices[0].platform} devices; per device:")
  print(f"{'shape':>12} {'spatial':>7} {'mesh':>12} {'temp GiB':>9} {'args GiB':>9} "
        f"{'total GiB':>9} {'compile s':>9}" + (f" {'vol/s':>8}" if args.throughput else ""),
        flush=True)
  for text in args.shapes:
    shape = tuple(int(v) for v in text.split(","))
    for spatial in (int(v) for v in args.spatial.split(",")):
      mesh = sharding.make_mesh({"data": len(devices) // spatial, "fsdp": 1, "spatial": spatial},
                                devices)
      rows = sharding.num_batch_shards(mesh)
      model = resnet50(mesh, remat=not args.no_remat)
      start = time.perf_counter()
      compiled = compile_tower(model, mesh, shape, rows)
      seconds = time.perf_counter() - start
      row = memory_row(compiled)
      line = (f"{'x'.join(map(str, shape)):>12} {spatial:>7} "
              f"{f'{rows}x1x{spatial}':>12} {row['temp_gib']:>9.2f} {row['args_gib']:>9.2f} "
              f"{row['total_gib']:>9.2f} {seconds:>9.1f}")
      if args.throughput:
        line += f" {throughput(compiled, model, mesh, shape, rows, args.steps):>8.2f}"
      print(line, flush=True)


if __name__ == "__main__":
  main()

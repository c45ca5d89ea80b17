"""Device mesh, partition rules, batch sharding, activation sharding and sharded init.

One mesh with axes ("data", "fsdp", "spatial"). The batch axis is sharded over data x fsdp
jointly, so every group of `spatial` devices holds global_batch / (data x fsdp) rows;
parameters and optimizer state are sharded over "fsdp" by one rule (`PartitionRules`), and
everything else is replicated. With spatial > 1 the image towers split each volume too: their
activations carry `SpatialSharding` constraints (X of (B, X, Y, Z, C) feature maps, the sequence
of (B, N, C) tokens over "spatial"), and XLA's SPMD partitioner adds the halo exchanges of
convolutions and pooling and the reductions of BatchNorm and pooling over space. The train step
is one `jax.jit` with these shardings as in/out shardings (no pmap); XLA inserts the
collectives, so losses and BatchNorm statistics are over the global batch.
"""

import dataclasses
import math
import re

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from medfinder_jax.config_utils import ConfigError

MESH_AXES = ("data", "fsdp", "spatial")
BATCH_AXES = ("data", "fsdp")  # the batch axis is split over both: data x fsdp row blocks
FSDP_AXIS = "fsdp"
SPATIAL_AXIS = "spatial"       # last: its devices are neighbours (one host, fastest links)
DEFAULT_SIZES = {"spatial": 1}  # mesh axes a config may leave out


# --- Mesh ---------------------------------------------------------------------------------------

def mesh_shape(mesh_config, num_devices):
  """(data, fsdp, spatial) sizes from config `mesh` (-1 = the rest of the devices; a missing
  spatial is 1) for `num_devices`."""
  sizes = {axis: int(mesh_config.get(axis, DEFAULT_SIZES.get(axis))) for axis in MESH_AXES}
  for axis, size in sizes.items():
    if size == 0 or size < -1:
      raise ConfigError(f"config mesh.{axis}={size}: expected a positive size or -1 (the rest)")
  rest = [axis for axis, size in sizes.items() if size == -1]
  if len(rest) > 1:
    raise ConfigError(f"config mesh.{rest[0]} and mesh.{rest[1]} are both -1; at most one axis "
                      "can take the rest of the devices")
  fixed = math.prod(size for size in sizes.values() if size != -1)
  if rest:
    if num_devices % fixed:
      raise ConfigError(f"config mesh: {num_devices} devices cannot be split with "
                        f"{_describe(sizes)}; the fixed sizes ({fixed}) must divide "
                        f"{num_devices}")
    sizes[rest[0]] = num_devices // fixed
  if math.prod(sizes.values()) != num_devices:
    raise ConfigError(f"config mesh: {_describe(sizes)} uses {math.prod(sizes.values())} devices "
                      f"but {num_devices} are available; make the product {num_devices} or set "
                      "one axis to -1")
  return tuple(sizes[axis] for axis in MESH_AXES)


def make_mesh(mesh_config, devices=None):
  """A ("data", "fsdp", "spatial") Mesh with Auto axis types over `devices` (default: all, all
  processes). Each spatial group (the devices sharing one volume) must lie in one process:
  every process feeds whole volumes."""
  devices = jax.devices() if devices is None else list(devices)
  shape = mesh_shape(mesh_config, len(devices))
  mesh = jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                       devices=devices)
  _check_spatial_groups(mesh)
  return mesh


def _check_spatial_groups(mesh):
  processes = np.vectorize(lambda d: d.process_index)(mesh.devices)
  if (processes != processes[..., :1]).any():
    raise ConfigError(f"config mesh.spatial={mesh.shape[SPATIAL_AXIS]}: the devices that share "
                      "one volume would span several processes; expected mesh.spatial to "
                      f"divide the devices of one process ({jax.local_device_count()})")


def single_device_mesh():
  """A one-device mesh of this process's first device (interactive queries: a batch of one)."""
  return make_mesh({"data": 1, "fsdp": 1, "spatial": 1}, jax.local_devices()[:1])


def num_batch_shards(mesh):
  """How many row blocks the batch axis is split into (data x fsdp: the devices of a spatial
  group hold the same rows, so adding spatial devices leaves the global batch as it is).

  This is the `num_blocks` of losses.released when each block holds one "local batch" of the
  released code.
  """
  return math.prod(mesh.shape[axis] for axis in BATCH_AXES)


def spatial_size(mesh):
  """How many devices share one volume (1 on a mesh without a spatial axis)."""
  return dict(mesh.shape).get(SPATIAL_AXIS, 1)


def _describe(sizes):
  return " x ".join(f"{axis}={size}" for axis, size in sizes.items())


# --- Parameter / optimizer-state partitioning ---------------------------------------------------

@dataclasses.dataclass(frozen=True)
class PartitionRules:
  """Where each leaf of a state pytree lives on the mesh.

  overrides: ((regex, PartitionSpec), ...) tried first, in order, with re.search against the
    leaf's path ("params/encoder/conv1/kernel"; optimizer states contain the same path).
  Otherwise a leaf with at least `min_size` elements is sharded over "fsdp" on its largest
  dimension divisible by the fsdp size (the last such on ties: the output features of a
  kernel); every other leaf (biases, norms, scalars, step counters) is replicated.
  """
  min_size: int = 2**18
  overrides: tuple = ()

  @classmethod
  def from_config(cls, mesh_config):
    return cls(min_size=int(mesh_config.fsdp_min_size))

  def spec(self, path, shape, fsdp_size):
    """PartitionSpec for a leaf at `path` ("a/b/kernel") of `shape` with fsdp axis size."""
    for pattern, override in self.overrides:
      if re.search(pattern, path):
        return override
    if fsdp_size <= 1 or math.prod(shape) < self.min_size:
      return PartitionSpec()
    candidates = [i for i, n in enumerate(shape) if n % fsdp_size == 0]
    if not candidates:
      return PartitionSpec()
    dim = max(candidates, key=lambda i: (shape[i], i))
    return PartitionSpec(*([None] * dim + [FSDP_AXIS]))


def tree_shardings(tree, mesh, rules):
  """A pytree of NamedShardings for `tree` (arrays, ShapeDtypeStructs: anything with .shape).

  Works the same for params and for optimizer states built from them (optax mu/nu mirror the
  params' paths and shapes, so they get the same placement).
  """
  fsdp_size = mesh.shape[FSDP_AXIS]

  def one(path, leaf):
    return NamedSharding(mesh, rules.spec(path_string(path), tuple(leaf.shape), fsdp_size))

  return jax.tree_util.tree_map_with_path(one, tree)


def path_string(path):
  """'a/b/0/kernel' for a jax key path (dict keys, attributes, sequence indices)."""
  parts = []
  for entry in path:
    for attr in ("key", "name", "idx"):
      if hasattr(entry, attr):
        parts.append(str(getattr(entry, attr)))
        break
    else:
      parts.append(str(entry))
  return "/".join(parts)


def replicated(mesh):
  """Sharding of a value every device holds in full (scalars, metrics, RNG keys)."""
  return NamedSharding(mesh, PartitionSpec())


def replicate(tree, mesh):
  """Every leaf held whole by every device of `mesh` (any number of processes).

  Host values (numpy, Python scalars) must be the same on every process; jax.Arrays already
  replicated on this mesh are kept, and those replicated elsewhere (e.g. on another mesh) are
  copied from this process's replica.
  """
  target = replicated(mesh)

  def one(leaf):
    if isinstance(leaf, jax.Array):
      if leaf.sharding.is_equivalent_to(target, leaf.ndim):
        return leaf
      leaf = leaf.addressable_data(0) if leaf.is_fully_replicated else leaf
    value = np.asarray(leaf)
    return jax.make_array_from_callback(value.shape, target, lambda index: value[index])

  return jax.tree.map(one, tree)


def gather_to_host(value):
  """The whole of a global jax.Array (or the rows of every process's host array, in process
  order) as numpy, on every process; a no-op copy for one process."""
  if jax.process_count() == 1:
    return np.asarray(value)
  return np.asarray(multihost_utils.process_allgather(value, tiled=True))


def sharded_abstract(init_fn, *args, mesh, rules):
  """jax.ShapeDtypeStructs (with .sharding) of init_fn(*args), computed without running it.

  What orbax restore needs as its target, and what `init_sharded` places the state on.
  """
  abstract = jax.eval_shape(init_fn, *args)
  shardings = tree_shardings(abstract, mesh, rules)
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      abstract, shardings)


def init_sharded(init_fn, *args, mesh, rules):
  """init_fn(*args) computed directly into its shardings (never whole on one device).

  jax.eval_shape gives the state's structure, the rules give each leaf's sharding, and a jit
  with those out_shardings lets every device compute only its own shard. `args` (e.g. an RNG
  key) must be the same on every process.
  """
  abstract = sharded_abstract(init_fn, *args, mesh=mesh, rules=rules)
  shardings = jax.tree.map(lambda a: a.sharding, abstract)
  return jax.jit(init_fn, out_shardings=shardings)(*args)


# --- Batches ------------------------------------------------------------------------------------

def local_device_count(mesh):
  """Devices of `mesh` that belong to this process."""
  return sum(1 for d in mesh.devices.flat if d.process_index == jax.process_index())


def local_batch_shards(mesh):
  """Row blocks of the batch that this process's devices hold (its spatial groups)."""
  return local_device_count(mesh) // spatial_size(mesh)


def batch_rows(per_device, mesh, accum=1):
  """(global, local) rows of a batch with `per_device` rows per batch shard (data x fsdp; a
  "device" when spatial = 1) and `accum` micro-batches: the whole mesh's, and the share this
  process feeds (its batch shards' rows)."""
  rows = int(per_device) * int(accum)
  return rows * num_batch_shards(mesh), rows * local_batch_shards(mesh)


def batch_sharding(mesh):
  """Rows of the leading (batch) axis split over ("data", "fsdp"); other axes whole (volumes
  enter whole on each device of a spatial group: the towers split them, `SpatialSharding`)."""
  return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def make_global_batch(local_batch, mesh):
  """Global jax.Arrays from this process's rows (a pytree of numpy arrays, batch axis first).

  Every process passes its own per-process batch (global batch / process count rows, in the
  order of its devices in the mesh); the result is one global array per field, sharded by
  `batch_sharding`. Works unchanged for one process. Fields must be numeric or bool (encode
  strings such as study ids before, or keep them on the host).
  """
  sharding = batch_sharding(mesh)
  local_shards = local_batch_shards(mesh)

  def one(path, value):
    value = np.asarray(value)
    name = path_string(path) or "batch"
    if value.dtype.kind not in "biuf":
      raise TypeError(f"batch field {name!r} has dtype {value.dtype}; only numeric/bool fields "
                      "can become device arrays (keep strings such as study ids on the host)")
    if value.ndim == 0 or value.shape[0] % local_shards:
      raise ValueError(f"batch field {name!r} has shape {value.shape}; its first (batch) axis "
                       f"must split evenly over this process's {local_shards} "
                       f"{'devices' if spatial_size(mesh) == 1 else 'batch shards'}")
    return jax.make_array_from_process_local_data(sharding, value)

  return jax.tree_util.tree_map_with_path(one, local_batch)


# --- Activations split over space ---------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class SpatialSharding:
  """The sharding constraint the image towers put on their activations when spatial > 1.

  Called on a (B, X, Y, Z, C) feature map or a (B, N, C) token sequence: the batch axis over
  data x fsdp and axis 1 (X, or the X-major patch sequence) over "spatial", the rest whole.
  Hashable and comparable by value (the mesh), so models holding it stay jit-static keys.
  An X that does not divide by `spatial` is split unevenly (XLA pads the last shard).
  """
  mesh: jax.sharding.Mesh

  def __call__(self, x):
    spec = PartitionSpec(BATCH_AXES, SPATIAL_AXIS, *([None] * (x.ndim - 2)))
    return jax.lax.with_sharding_constraint(x, NamedSharding(self.mesh, spec))


def activation_sharding(mesh):
  """The towers' `SpatialSharding` on `mesh`, or None when no volume is split (spatial = 1,
  or no mesh): the models then compile to the program they always had."""
  if mesh is None or spatial_size(mesh) == 1:
    return None
  return SpatialSharding(mesh)

"""Mesh construction, partition rules, sharded init, global batches and 1-vs-8-device equivalence.

Equivalence tolerance: one AdamW step of a toy model (Dense -> BatchNorm -> Dense, CLIP loss over
the global batch) on 8 fake CPU devices matches 1 device to rtol 1e-5 / atol 1e-6 for the loss,
gradients, updated params and BatchNorm statistics (only float32 reduction order differs).
"""

import json
import os
import socket
import subprocess
import sys
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax.training import train_state
from jax.sharding import PartitionSpec as P

from medfinder_jax import losses, sharding
from medfinder_jax.config_utils import ConfigError

RTOL, ATOL = 1e-5, 1e-6


def _mesh_config(data, fsdp, fsdp_min_size=2**18):
  return ml_collections.ConfigDict(dict(data=data, fsdp=fsdp, fsdp_min_size=fsdp_min_size))


# --- mesh ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("data, fsdp, expected", [
    (-1, 1, (8, 1)), (-1, 2, (4, 2)), (2, -1, (2, 4)), (1, 8, (1, 8)), (4, 2, (4, 2)),
    (8, -1, (8, 1)), (1, -1, (1, 8))])
def test_mesh_shape_for_splits_of_8_devices(data, fsdp, expected):
  mesh = sharding.make_mesh(_mesh_config(data, fsdp))
  assert tuple(mesh.shape[a] for a in ("data", "fsdp")) == expected
  assert mesh.axis_names == ("data", "fsdp", "spatial") and mesh.shape["spatial"] == 1
  assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
  assert mesh.devices.size == 8


@pytest.mark.parametrize("data, fsdp, message", [
    (2, 2, "uses 4 devices but 8 are available"),
    (3, -1, "cannot be split"),
    (-1, -1, "both -1"),
    (0, 1, "mesh.data=0"),
    (16, 1, "uses 16 devices but 8")])
def test_mesh_mismatch_is_a_clear_config_error(data, fsdp, message):
  with pytest.raises(ConfigError, match=message):
    sharding.make_mesh(_mesh_config(data, fsdp))


def test_mesh_on_a_subset_of_devices():
  mesh = sharding.make_mesh(_mesh_config(-1, 1), devices=jax.devices()[:1])
  assert mesh.devices.size == 1 and sharding.num_batch_shards(mesh) == 1


def test_num_batch_shards_is_data_times_fsdp():
  assert sharding.num_batch_shards(sharding.make_mesh(_mesh_config(2, 4))) == 8


# --- partition rules ----------------------------------------------------------------------------

def _sample_params():
  return {
      "encoder": {"conv1": {"kernel": jnp.zeros((3, 3, 3, 64, 128)), "bias": jnp.zeros((128,))},
                  "odd": {"kernel": jnp.zeros((3, 5, 7, 9))}},
      "proj": {"kernel": jnp.zeros((256, 256))},
      "small": {"kernel": jnp.zeros((4, 8))},
      "embedding": jnp.zeros((1000, 96)),
  }


def _specs(tree, mesh, rules):
  return jax.tree.map(lambda s: s.spec, sharding.tree_shardings(tree, mesh, rules))


def test_large_kernels_shard_on_their_largest_divisible_dim_over_fsdp():
  mesh = sharding.make_mesh(_mesh_config(2, 4))
  specs = _specs(_sample_params(), mesh, sharding.PartitionRules(min_size=1000))
  assert specs["encoder"]["conv1"]["kernel"] == P(None, None, None, None, "fsdp")
  assert specs["encoder"]["conv1"]["bias"] == P()          # below min_size
  assert specs["encoder"]["odd"]["kernel"] == P()          # no dimension divisible by 4
  assert specs["proj"]["kernel"] == P(None, "fsdp")         # tie: the output dimension
  assert specs["small"]["kernel"] == P()
  assert specs["embedding"] == P("fsdp")                    # 1000 % 4 == 0, 96 % 4 == 0


def test_everything_is_replicated_without_an_fsdp_axis():
  mesh = sharding.make_mesh(_mesh_config(-1, 1))
  specs = _specs(_sample_params(), mesh, sharding.PartitionRules(min_size=1))
  assert all(spec == P() for spec in jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, P)))


def test_overrides_win_over_the_size_rule():
  mesh = sharding.make_mesh(_mesh_config(2, 4))
  rules = sharding.PartitionRules(min_size=1000, overrides=((r"embedding$", P()),
                                                            (r"proj/kernel", P("fsdp", None))))
  specs = _specs(_sample_params(), mesh, rules)
  assert specs["embedding"] == P()
  assert specs["proj"]["kernel"] == P("fsdp", None)


def test_optimizer_state_gets_the_same_placement_as_its_params():
  mesh = sharding.make_mesh(_mesh_config(2, 4))
  rules = sharding.PartitionRules(min_size=1000)
  params = _sample_params()
  opt_state = jax.eval_shape(optax.adamw(1e-3).init, params)
  opt_specs = _specs(opt_state, mesh, rules)
  param_specs = _specs(params, mesh, rules)
  adam = opt_specs[0]
  assert adam.mu == param_specs and adam.nu == param_specs
  assert adam.count == P()


def test_config_threshold_feeds_the_rules():
  rules = sharding.PartitionRules.from_config(_mesh_config(-1, 1, fsdp_min_size=123))
  assert rules.min_size == 123


# --- global batch -------------------------------------------------------------------------------

def test_make_global_batch_shards_rows_over_all_devices():
  mesh = sharding.make_mesh(_mesh_config(2, 4))
  local = {"volume": np.arange(16 * 3, dtype=np.float32).reshape(16, 3),
           "mask": np.ones(16, bool)}
  batch = sharding.make_global_batch(local, mesh)
  assert batch["volume"].shape == (16, 3) and batch["mask"].dtype == bool
  assert batch["volume"].sharding.spec == P(("data", "fsdp"))
  np.testing.assert_array_equal(batch["volume"], local["volume"])
  for shard in batch["volume"].addressable_shards:
    assert shard.data.shape == (2, 3)
    np.testing.assert_array_equal(shard.data, local["volume"][shard.index])


def test_make_global_batch_rejects_strings_and_uneven_rows():
  mesh = sharding.make_mesh(_mesh_config(-1, 1))
  with pytest.raises(TypeError, match="'study_id'"):
    sharding.make_global_batch({"study_id": np.array(["a"] * 8)}, mesh)
  with pytest.raises(ValueError, match="'volume'.*8 devices"):
    sharding.make_global_batch({"volume": np.zeros((12, 2), np.float32)}, mesh)


# --- sharded init and train-step equivalence ----------------------------------------------------

class ToyModel(nn.Module):
  """Dense -> BatchNorm -> relu -> Dense: enough to exercise fsdp kernels and BN statistics.

  No bias before the BatchNorm (as in ResNets): its true gradient is 0, and AdamW would turn
  the float noise there into +-lr updates that differ between device counts.
  """

  @nn.compact
  def __call__(self, x, train):
    x = nn.Dense(64, use_bias=False, name="dense1")(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=0.9, name="bn")(x)
    return nn.Dense(32, name="dense2")(nn.relu(x))


class State(train_state.TrainState):
  batch_stats: dict


def _create_state(key):
  model = ToyModel()
  variables = model.init(key, jnp.zeros((2, 16)), train=False)
  return State.create(apply_fn=model.apply, params=variables["params"],
                      batch_stats=variables["batch_stats"], tx=optax.adamw(1e-2))


def _train_step(state, batch):
  def loss_fn(params):
    out, updates = state.apply_fn({"params": params, "batch_stats": state.batch_stats},
                                  batch["x"], train=True, mutable=["batch_stats"])
    loss, _ = losses.clip(batch["y"], out, jnp.log(1 / 0.07))
    return loss, updates["batch_stats"]
  (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  return state.apply_gradients(grads=grads, batch_stats=batch_stats), loss, grads


def _run_step(mesh, rules, batch):
  state = sharding.init_sharded(_create_state, jax.random.key(0), mesh=mesh, rules=rules)
  state_shardings = jax.tree.map(lambda x: x.sharding, state)
  batch = sharding.make_global_batch(batch, mesh)
  step = jax.jit(_train_step, in_shardings=(state_shardings, sharding.batch_sharding(mesh)),
                 out_shardings=(state_shardings, sharding.replicated(mesh), None),
                 donate_argnums=0)
  new_state, loss, grads = step(state, batch)
  return new_state, loss, grads


def _batch():
  rng = np.random.default_rng(0)
  return {"x": rng.normal(size=(16, 16)).astype(np.float32),
          "y": rng.normal(size=(16, 32)).astype(np.float32)}


def test_init_sharded_places_each_leaf_by_the_rules():
  mesh = sharding.make_mesh(_mesh_config(2, 4))
  rules = sharding.PartitionRules(min_size=512)
  state = sharding.init_sharded(_create_state, jax.random.key(0), mesh=mesh, rules=rules)
  assert state.params["dense1"]["kernel"].sharding.spec == P(None, "fsdp")   # 16 x 64
  assert state.opt_state[0].mu["dense2"]["kernel"].sharding.spec == P("fsdp")  # 64 x 32
  assert state.params["dense2"]["bias"].sharding.spec == P()
  assert state.step.sharding.spec == P()
  reference = _create_state(jax.random.key(0))
  np.testing.assert_array_equal(state.params["dense1"]["kernel"],
                                reference.params["dense1"]["kernel"])


@pytest.mark.parametrize("data, fsdp", [(8, 1), (2, 4)])
def test_train_step_on_8_devices_matches_1_device(data, fsdp):
  rules = sharding.PartitionRules(min_size=512)
  one = sharding.make_mesh(_mesh_config(1, 1), devices=jax.devices()[:1])
  eight = sharding.make_mesh(_mesh_config(data, fsdp))
  state1, loss1, grads1 = _run_step(one, rules, _batch())
  state8, loss8, grads8 = _run_step(eight, rules, _batch())
  if fsdp > 1:
    assert state8.params["dense1"]["kernel"].sharding.spec == P(None, "fsdp")
  np.testing.assert_allclose(loss8, loss1, rtol=RTOL, atol=ATOL)
  for a, b in zip(jax.tree.leaves(grads8), jax.tree.leaves(grads1)):
    np.testing.assert_allclose(a, b, rtol=RTOL, atol=ATOL)
  for a, b in zip(jax.tree.leaves(state8.params), jax.tree.leaves(state1.params)):
    np.testing.assert_allclose(a, b, rtol=RTOL, atol=ATOL)
  for a, b in zip(jax.tree.leaves(state8.batch_stats), jax.tree.leaves(state1.batch_stats)):
    np.testing.assert_allclose(a, b, rtol=RTOL, atol=ATOL)


def test_batchnorm_statistics_are_over_the_global_batch():
  mesh = sharding.make_mesh(_mesh_config(8, 1))
  state, _, _ = _run_step(mesh, sharding.PartitionRules(), _batch())
  initial = _create_state(jax.random.key(0))
  hidden = _batch()["x"] @ np.asarray(initial.params["dense1"]["kernel"])
  expected_mean = 0.9 * 0.0 + 0.1 * hidden.mean(axis=0)   # flax: m * running + (1 - m) * batch
  np.testing.assert_allclose(state.batch_stats["bn"]["mean"], expected_mean, rtol=1e-4,
                             atol=1e-6)


# --- two real processes -------------------------------------------------------------------------

_WORKER = r'''
import json, sys
import jax, jax.numpy as jnp, numpy as np, ml_collections
from medfinder_jax import distributed, losses, sharding
port, pid, data, fsdp = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
assert distributed.initialize_distributed(f"localhost:{port}", 2, pid) is True
mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=data, fsdp=fsdp)))
rows = np.arange(16 * 4, dtype=np.float32).reshape(16, 4) / 64.0
batch = sharding.make_global_batch({"x": rows[pid * 8:(pid + 1) * 8]}, mesh)
state = sharding.init_sharded(lambda k: {"w": jax.random.normal(k, (8, 4))}, jax.random.key(0),
                              mesh=mesh, rules=sharding.PartitionRules(min_size=1))
loss = jax.jit(lambda s, b: losses.clip(b["x"] @ s["w"].T, b["x"] @ s["w"].T + 0.1,
                                        jnp.float32(2.0))[0],
               out_shardings=sharding.replicated(mesh))(state, batch)
gathered = sharding.gather_to_host(batch["x"])
host_rows = sharding.gather_to_host(rows[pid * 8:(pid + 1) * 8] + 100.0)
print(json.dumps({"shape": list(batch["x"].shape), "loss": float(loss),
                  "gathered": gathered.tolist(), "host_rows": host_rows.tolist(),
                  "w_spec": str(state["w"].sharding.spec),
                  "local_rows": sorted(int(s.index[0].start) for s in
                                       batch["x"].addressable_shards)}))
'''


@pytest.mark.slow
@pytest.mark.parametrize("data, fsdp", [(-1, 1), (2, 4)])
def test_two_processes_build_one_global_batch(tmp_path, data, fsdp):
  """2 processes x 4 CPU devices: same loss as one process computing the whole batch."""
  with socket.socket() as sock:
    sock.bind(("localhost", 0))
    port = sock.getsockname()[1]
  script = tmp_path / "worker.py"
  script.write_text(_WORKER)
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
         "JAX_PLATFORMS": "cpu", "PYTHONPATH": root}
  procs = [subprocess.Popen([sys.executable, str(script), str(port), str(pid), str(data),
                             str(fsdp)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True) for pid in range(2)]
  outputs = [proc.communicate(timeout=120) for proc in procs]
  for proc, (_, err) in zip(procs, outputs):
    assert proc.returncode == 0, err[-3000:]
  # the last JSON line (the CPU collectives' Gloo library prints its own lines to stdout)
  results = [json.loads([line for line in out.splitlines() if line.startswith("{")][-1])
             for out, _ in outputs]
  rows = np.arange(16 * 4, dtype=np.float32).reshape(16, 4) / 64.0
  w = jax.random.normal(jax.random.key(0), (8, 4))
  expected, _ = losses.clip(rows @ w.T, rows @ w.T + 0.1, jnp.float32(2.0))
  assert results[0]["shape"] == [16, 4]
  for result in results:   # every process gets the whole array, and the host rows in order
    np.testing.assert_array_equal(result["gathered"], rows)
    np.testing.assert_array_equal(result["host_rows"], rows + 100.0)
  assert results[0]["local_rows"] == [0, 2, 4, 6] and results[1]["local_rows"] == [8, 10, 12, 14]
  for result in results:
    np.testing.assert_allclose(result["loss"], expected, rtol=1e-5)
  if fsdp > 1:
    assert results[0]["w_spec"] == str(P("fsdp"))


# --- replication, batch sizes and activation sharding -------------------------------------------

def _mesh(data, fsdp, spatial):
  return sharding.make_mesh(ml_collections.ConfigDict(dict(data=data, fsdp=fsdp, spatial=spatial)))


def test_single_device_mesh_is_this_process_first_device():
  mesh = sharding.single_device_mesh()
  assert mesh.axis_names == ("data", "fsdp", "spatial")
  assert dict(mesh.shape) == {"data": 1, "fsdp": 1, "spatial": 1}
  assert list(mesh.devices.flat) == [jax.local_devices()[0]]


@pytest.mark.parametrize("data, fsdp, spatial", [(2, 4, 1), (1, 2, 4)])
def test_batch_rows_counts_the_rows_of_every_batch_shard_and_micro_batch(data, fsdp, spatial):
  mesh = _mesh(data, fsdp, spatial)
  shards = data * fsdp            # the devices of a spatial group hold the same rows
  assert sharding.batch_rows(3, mesh, accum=2) == (3 * 2 * shards, 3 * 2 * shards)
  assert sharding.batch_rows(3, mesh) == (3 * shards, 3 * shards)


def test_replicate_gives_every_device_the_whole_value():
  mesh = _mesh(2, 4, 1)
  spread = sharding.make_global_batch({"x": np.arange(8.0, dtype=np.float32)}, mesh)["x"]
  elsewhere = jax.device_put(np.arange(3, dtype=np.int32),
                             sharding.replicated(sharding.single_device_mesh()))
  tree = {"host": np.arange(6, dtype=np.float32).reshape(2, 3), "scalar": 2.5,
          "spread": spread, "elsewhere": elsewhere}
  out = sharding.replicate(tree, mesh)
  expected = {"host": tree["host"], "scalar": np.float64(2.5), "spread": np.arange(8.0),
              "elsewhere": np.arange(3)}
  for name, value in out.items():
    assert value.sharding.is_equivalent_to(sharding.replicated(mesh), value.ndim), name
    assert len(value.addressable_shards) == 8, name
    for shard in value.addressable_shards:
      np.testing.assert_array_equal(shard.data, expected[name], err_msg=name)


def test_replicate_keeps_a_value_already_replicated_on_the_mesh():
  mesh = _mesh(2, 4, 1)
  value = jax.device_put(np.arange(4.0), sharding.replicated(mesh))
  assert sharding.replicate({"v": value}, mesh)["v"] is value


def test_gather_to_host_gives_the_whole_array_as_numpy():
  mesh = _mesh(2, 4, 1)
  rows = np.arange(16, dtype=np.float32).reshape(8, 2)
  gathered = sharding.gather_to_host(sharding.make_global_batch({"x": rows}, mesh)["x"])
  assert isinstance(gathered, np.ndarray)
  np.testing.assert_array_equal(gathered, rows)


def test_activations_are_split_over_space_only_when_spatial_is_above_1():
  assert sharding.activation_sharding(None) is None
  assert sharding.activation_sharding(_mesh(2, 4, 1)) is None
  mesh = _mesh(1, 2, 4)
  assert sharding.activation_sharding(mesh) == sharding.SpatialSharding(mesh)


@pytest.mark.parametrize("shape, shard_shape", [((2, 8, 3, 3, 2), (1, 2, 3, 3, 2)),
                                                ((2, 8, 5), (1, 2, 5))])
def test_spatial_sharding_splits_rows_over_batch_shards_and_axis_1_over_space(shape, shard_shape):
  mesh = _mesh(1, 2, 4)
  x = jnp.arange(np.prod(shape), dtype=jnp.float32).reshape(shape)
  y = jax.jit(sharding.SpatialSharding(mesh))(x)
  np.testing.assert_array_equal(y, x)
  assert {shard.data.shape for shard in y.addressable_shards} == {shard_shape}
  blocks = {(s.index[0].start or 0, s.index[1].start or 0) for s in y.addressable_shards}
  assert blocks == {(b, x1) for b in (0, 1) for x1 in (0, 2, 4, 6)}


def test_a_mesh_built_without_a_spatial_axis_keeps_volumes_whole():
  mesh = jax.make_mesh((2, 4), ("data", "fsdp"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
  assert sharding.spatial_size(mesh) == 1
  assert sharding.activation_sharding(mesh) is None
  assert sharding.batch_rows(3, mesh) == (24, 24)


def test_a_bare_array_batch_with_uneven_rows_is_named_batch():
  mesh = sharding.make_mesh(_mesh_config(-1, 1))
  with pytest.raises(ValueError, match="batch field 'batch'"):
    sharding.make_global_batch(np.zeros((12, 2), np.float32), mesh)


@pytest.mark.parametrize("data, fsdp, message", [
    (-2, 1, "mesh.data=-2: expected a positive size or -1"),
    (-1, -1, "mesh.data and mesh.fsdp are both -1"),
    (3, -1, r"cannot be split with data=3 x fsdp=-1 x spatial=1; the fixed sizes \(3\)")])
def test_mesh_errors_name_the_axes_at_fault(data, fsdp, message):
  with pytest.raises(ConfigError, match=message):
    sharding.mesh_shape(_mesh_config(data, fsdp), 8)


def test_the_rest_of_the_devices_is_a_whole_number():
  shape = sharding.mesh_shape(_mesh_config(-1, 2), 8)
  assert shape == (4, 2, 1) and all(type(size) is int for size in shape)


def test_mesh_uses_the_devices_given_in_their_order():
  devices = jax.devices()[4:][::-1]
  mesh = sharding.make_mesh(_mesh_config(2, 2), devices=devices)
  assert list(mesh.devices.flat) == devices


class _Device:
  def __init__(self, process_index):
    self.process_index = process_index


def _fake_mesh(processes):
  """A stand-in mesh of fake devices (one process cannot make devices of another)."""
  devices = np.vectorize(_Device, otypes=[object])(np.asarray(processes))
  return type("FakeMesh", (), {"devices": devices, "shape": {"spatial": devices.shape[-1]}})()


def test_a_spatial_group_spanning_two_processes_is_refused():
  sharding._check_spatial_groups(_fake_mesh([[[0, 0], [1, 1]]]))   # each group in one process
  with pytest.raises(ConfigError, match="mesh.spatial=2: the devices that share one volume"):
    sharding._check_spatial_groups(_fake_mesh([[[0, 1], [1, 1]]]))


def test_two_fsdp_devices_shard_kernels_from_exactly_min_size_elements():
  mesh = sharding.make_mesh(_mesh_config(4, 2))
  at = _specs(_sample_params(), mesh, sharding.PartitionRules(min_size=256 * 256))
  above = _specs(_sample_params(), mesh, sharding.PartitionRules(min_size=256 * 256 + 1))
  assert at["proj"]["kernel"] == P(None, "fsdp")               # 256 x 256 = min_size
  assert above["proj"]["kernel"] == P()


def test_uneven_rows_on_a_spatial_mesh_name_the_batch_shards():
  with pytest.raises(ValueError, match="this process's 2 batch shards"):
    sharding.make_global_batch({"x": np.zeros((3, 2), np.float32)}, _mesh(1, 2, 4))


def test_path_string_joins_dict_keys_attributes_and_indices():
  class Pair(NamedTuple):
    first: dict
    second: tuple

  tree = {"params": Pair(first={"kernel": 1}, second=(2, 3))}
  paths = [sharding.path_string(path) for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]
  assert paths == ["params/first/kernel", "params/second/0", "params/second/1"]

"""Spatial partitioning (mesh.spatial = N): one volume split along X over N devices.

What must hold: splitting a volume changes where activations live, never what is computed. So
the towers' outputs and gradients, a train step and restored checkpoints equal those of the
unsplit run; only float32 sums run in another order (BatchNorm statistics, pooling and
attention are reduced across the spatial devices, and a convolution adds the rows it receives
from its neighbours' halos in another order).

Tolerances (float32):
- tower outputs: pooled features rtol 1e-5 / atol 1e-5 (magnitudes ~1); a feature map after
  training-mode BatchNorm (ResNet stage 1, values up to ~5) atol 1e-5 x its largest value:
  batch statistics summed in another order move every value by a few roundings of the
  largest (measured worst 1.4e-5 at N = 8, 3e-6 x the largest);
- gradients: rtol 1e-4 with atol 1e-4 x the leaf's largest |g| (measured worst 5e-5 x at
  N = 8: training-mode BatchNorm divides by batch statistics, which amplifies rounding);
  biases that feed a BatchNorm (`downsample_conv/bias`) have a true gradient of 0, so both
  sides must be float noise (|g| < 1e-5 x the largest gradient of the tower);
- a train step: as tests/test_train.py (its module docstring explains each tolerance);
- checkpoints: exact (a restore only places the same bytes on another mesh).
"""

import functools
import os
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "benchmarks"))
import spatial_memory  # noqa: E402  (benchmarks/spatial_memory.py: the compiled tower)
from medfinder_jax import checkpoint
from medfinder_jax import convert_weights
from medfinder_jax import encode
from medfinder_jax import input_pipeline as ip
from medfinder_jax import loading
from medfinder_jax import sharding
from medfinder_jax import train
from medfinder_jax import train_step
from medfinder_jax.models import resnet3d
from medfinder_jax.models import vit3d
from test_train import BN_FED_BIAS, assert_gradients_match, _tree_paths

SHAPE = (32, 16, 8)   # X splits into 4 voxels per device at N = 8 (a ViT patch edge)


def spatial_mesh(n, data=1):
  """data x 1 x n mesh on the first data * n devices."""
  return sharding.make_mesh({"data": data, "fsdp": 1, "spatial": n}, jax.devices()[:data * n])


# --- mesh and batches -----------------------------------------------------------------------------

def test_the_mesh_is_data_by_fsdp_by_spatial_and_the_batch_ignores_spatial():
  mesh = spatial_mesh(4, data=2)
  assert mesh.axis_names == ("data", "fsdp", "spatial") and dict(mesh.shape) == {
      "data": 2, "fsdp": 1, "spatial": 4}
  assert sharding.num_batch_shards(mesh) == 2
  assert sharding.batch_rows(3, mesh, accum=2) == (12, 12)   # 3 x 2 micro-batches x 2 shards
  assert sharding.make_mesh({"data": -1, "fsdp": 1, "spatial": 8}).shape["data"] == 1
  assert sharding.make_mesh({"data": -1, "fsdp": 1}).shape["spatial"] == 1   # left out: 1


def test_spatial_devices_of_a_batch_shard_hold_the_same_rows():
  mesh = spatial_mesh(4, data=2)
  rows = np.arange(4 * 3, dtype=np.float32).reshape(4, 3)
  batch = sharding.make_global_batch({"volume": rows}, mesh)
  assert batch["volume"].sharding.spec == P(("data", "fsdp"))
  for shard in batch["volume"].addressable_shards:
    np.testing.assert_array_equal(shard.data, rows[shard.index])
    assert shard.data.shape == (2, 3)


def test_no_activation_sharding_without_a_split():
  assert sharding.activation_sharding(None) is None
  assert sharding.activation_sharding(spatial_mesh(1, data=8)) is None
  assert sharding.activation_sharding(spatial_mesh(4)) == sharding.SpatialSharding(
      spatial_mesh(4))   # by value: a jit-static model attribute


def test_bad_spatial_sizes_are_config_errors_naming_the_field():
  with pytest.raises(sharding.ConfigError, match="mesh.spatial=0"):
    sharding.make_mesh({"data": -1, "fsdp": 1, "spatial": 0})
  with pytest.raises(sharding.ConfigError, match="spatial=3 uses 3 devices but 8"):
    sharding.make_mesh({"data": 1, "fsdp": 1, "spatial": 3})


# --- the towers split a volume and compute the same ---------------------------------------------

def tiny_resnet(activation_sharding=None):
  """Two stages (one strided, with a downsample shortcut): BatchNorm sees 128 values per
  channel at the last stage, so its statistics are well conditioned."""
  return resnet3d.ResNet3D((1, 1), (4, 8), conv1_kernel=3, conv1_stride=1,
                           activation_sharding=activation_sharding)


def tiny_vit(activation_sharding=None):
  return vit3d.ViT3D(patch_size=4, hidden_size=32, mlp_dim=64, num_layers=2, num_heads=2,
                     activation_sharding=activation_sharding)


TOWERS = {"resnet": (tiny_resnet, "stage1"), "vit": (tiny_vit, "stem")}


def tower_pass(backbone, n):
  """(pooled, a feature map, its sharding spec, gradients, batch_stats) of the `backbone`
  tower in training mode on two volumes, split over n devices."""
  build, feature = TOWERS[backbone]
  mesh = spatial_mesh(n)
  volumes = jax.random.uniform(jax.random.key(0), (2, *SHAPE, 1))
  variables = build().init(jax.random.key(1), volumes[:1])
  model = build(sharding.activation_sharding(mesh))

  def loss(params, volumes):
    (pooled, out), updates = model.apply({**variables, "params": params}, volumes, train=True,
                                         mutable=["batch_stats"])
    return jnp.sum(pooled**2), (pooled, out[feature], updates.get("batch_stats"))

  fn = jax.jit(jax.value_and_grad(loss, has_aux=True),
               in_shardings=(sharding.replicated(mesh), sharding.batch_sharding(mesh)))
  (_, (pooled, features, stats)), grads = fn(variables["params"], volumes)
  spec = features.sharding.spec
  return jax.device_get((pooled, features, spec, _tree_paths(grads), stats))


@functools.lru_cache(maxsize=None)
def unsplit(backbone):
  return tower_pass(backbone, 1)


SLOW = pytest.mark.slow   # ResNet compiles take ~1-3 minutes on 2 loaded cores


@pytest.mark.parametrize("backbone, n", [
    ("vit", 4), pytest.param("vit", 2, marks=SLOW), pytest.param("vit", 8, marks=SLOW),
    pytest.param("resnet", 2, marks=SLOW), pytest.param("resnet", 4, marks=SLOW),
    pytest.param("resnet", 8, marks=SLOW)])
def test_a_split_tower_computes_what_the_whole_one_does(backbone, n):
  pooled, features, spec, grads, stats = tower_pass(backbone, n)
  ref_pooled, ref_features, _, ref_grads, ref_stats = unsplit(backbone)
  assert spec[1] == "spatial"            # the activations really are split along X / tokens
  np.testing.assert_allclose(pooled, ref_pooled, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(features, ref_features, rtol=0,
                             atol=1e-5 * np.max(np.abs(ref_features)))
  largest = max(float(np.max(np.abs(g))) for g in ref_grads.values())
  for path, value in ref_grads.items():
    if re.search(BN_FED_BIAS, path):
      assert max(np.max(np.abs(grads[path])), np.max(np.abs(value))) < 1e-5 * largest, path
      continue
    scale = float(np.max(np.abs(value)))
    np.testing.assert_allclose(grads[path], value, rtol=1e-4, atol=1e-4 * scale, err_msg=path)
  for a, b in zip(jax.tree.leaves(stats), jax.tree.leaves(ref_stats)):   # over batch and space
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_tower_memory_per_device_falls_with_the_split():
  """Compiled temp memory (activations) of the tiny 4-stage ResNet's training pass at
  64x16x8, CPU's decomposed convolutions: the decomposed form partitions too."""
  model = lambda mesh: resnet3d.ResNet3D(  # noqa: E731
      (1, 1, 1, 1), (4, 8, 8, 16), conv1_kernel=3, conv1_stride=1,
      activation_sharding=sharding.activation_sharding(mesh))
  temp = {}
  for n in (1, 2, 4):
    mesh = spatial_mesh(n)
    compiled = spatial_memory.compile_tower(model(mesh), mesh, (64, 16, 8), rows=1)
    temp[n] = compiled.memory_analysis().temp_size_in_bytes
  assert temp[1] / temp[2] >= 1.6, temp
  assert temp[1] / temp[4] >= 2.5, temp


# --- a train step ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def parts(tiny_dataset):
  """Tiny config, the text tower, pretrained MiniLM params, dataset spec and a host batch of 8."""
  from conftest import make_tiny_config  # pylint: disable=import-outside-toplevel
  config = make_tiny_config(**{"train.lr": 1e-3})
  tokenizer, _ = loading.text_tower(config.text)
  bert_config, text_params = convert_weights.load_hf_bert(tokenizer.folder)
  builder, spec = ip.open_dataset(tiny_dataset)
  batch = next(iter(ip.train_batches(builder, "train", 8, tokenizer, seed=0, shuffle_buffer=8,
                                     process_index=0, process_count=1)))
  return config, bert_config, text_params, spec, batch


def step_on(parts, data, spatial):
  """(state after one step, metrics) of the global batch of 8 on a data x 1 x spatial mesh."""
  config, bert_config, text_params, spec, batch = parts
  config = config.copy_and_resolve_references()
  config.mesh.spatial = spatial
  config.train.batch_size_per_device = 8 // data     # per data shard: the same global batch
  mesh = spatial_mesh(spatial, data)
  model = loading.build_model(config, bert_config, mesh)
  tx = train_step.make_optimizer(config.train, total_steps=100)
  state = train_step.create_train_state(model, tx, config, spec.shape, jax.random.key(1), mesh,
                                        sharding.PartitionRules(), text_params)
  step = train_step.make_train_step(config, spec.intensity, mesh,
                                    jax.tree.map(lambda x: x.sharding, state))
  key = sharding.replicate(jax.random.key_data(jax.random.key(7)), mesh)
  after, metrics = step(state, sharding.make_global_batch(batch, mesh), key)
  return jax.device_get(after), jax.device_get(metrics)


@pytest.mark.slow
def test_one_step_split_over_4_spatial_devices_equals_the_unsplit_step(parts):
  """data=2 x spatial=4 against data=2 x spatial=1. After AdamW's first update the moments are
  mu = (1 - b1) g and nu = (1 - b2) g^2, so they carry the gradients."""
  ref, ref_metrics = step_on(parts, data=2, spatial=1)
  got, metrics = step_on(parts, data=2, spatial=4)
  for name in ("loss", "contrastive", "mse", "grad_norm"):
    np.testing.assert_allclose(metrics[name], ref_metrics[name], rtol=1e-5, err_msg=name)
  adam, ref_adam = got.opt_state.inner_state[0], ref.opt_state.inner_state[0]
  b1, b2 = 0.9, 0.999
  mu = {k: v / (1 - b1) for k, v in _tree_paths(adam.mu).items()}
  ref_mu = {k: v / (1 - b1) for k, v in _tree_paths(ref_adam.mu).items()}
  assert_gradients_match(mu, ref_mu)
  for path, value in _tree_paths(ref_adam.nu).items():
    g2 = _tree_paths(adam.nu)[path]
    if re.search(BN_FED_BIAS, path):
      continue   # (float noise)^2, see assert_gradients_match
    np.testing.assert_allclose(g2, value, rtol=3e-4, atol=3e-4 * float(np.max(value)),
                               err_msg=path)
  lr = float(ref_metrics["lr"])
  for path, value in _tree_paths(ref.params).items():
    clear = np.ones(value.shape, bool)
    if path in ref_mu:
      clear = np.abs(ref_mu[path]) > 1e-3 * np.max(np.abs(ref_mu[path]))
      clear &= not re.search(BN_FED_BIAS, path)
    np.testing.assert_allclose(_tree_paths(got.params)[path][clear], value[clear], rtol=1e-5,
                               atol=1e-6, err_msg=path)
    assert np.all(np.abs(_tree_paths(got.params)[path] - value) <= 2 * lr + 1e-6), path
  for a, b in zip(jax.tree.leaves(got.batch_stats), jax.tree.leaves(ref.batch_stats)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


# --- checkpoints are independent of the mesh ------------------------------------------------------

def test_a_checkpoint_restores_at_another_spatial_size_and_back(parts, tmp_path):
  """Saved at data=2 x spatial=4, restored at spatial=1, saved again there and restored at
  spatial=4: the same values each time, placed for the mesh restored on."""
  config, bert_config, text_params, spec, _ = parts
  tx = train_step.make_optimizer(config.train, total_steps=100)
  rules = sharding.PartitionRules(min_size=2**10)
  meshes = {n: spatial_mesh(n, data=2) for n in (1, 4)}
  abstract = {n: train_step.abstract_train_state(
      loading.build_model(config, bert_config, mesh), tx, config, spec.shape, mesh, rules)
              for n, mesh in meshes.items()}
  state = train_step.create_train_state(
      loading.build_model(config, bert_config, meshes[4]), tx, config, spec.shape,
      jax.random.key(1), meshes[4], rules, text_params)
  expected = jax.device_get((state.variables(), state.opt_state))
  manager = checkpoint.make_manager(str(tmp_path / "checkpoints"))
  trees = (state.variables(), state.opt_state)
  for step, n in ((1, 1), (2, 4)):
    meta = checkpoint.build_meta(step=step, epoch=0, batches_consumed=step, seed=0,
                                 rng_key_data=jax.random.key_data(jax.random.key(0)),
                                 config=config, dataset_spec=spec, process_count=1,
                                 global_batch=8)
    checkpoint.save(manager, step, *trees, meta)
    manager.wait_until_finished()
    target = (abstract[n].variables(), abstract[n].opt_state)
    trees = checkpoint.restore_train(manager, step, *target)
    for got, want, placed in zip(jax.tree.leaves(trees), jax.tree.leaves(expected),
                                 jax.tree.leaves(target)):
      assert got.sharding == placed.sharding and got.sharding.mesh == meshes[n]
      np.testing.assert_array_equal(got, want)
  manager.close()


# --- train, validate, eval and embed with mesh.spatial -------------------------------------------

@pytest.mark.slow
def test_training_and_embedding_run_split_and_agree_with_the_unsplit_model(tiny_config,
                                                                           tiny_dataset,
                                                                           tmp_path):
  """Train 1 step (validation included) at data=2 x spatial=4, then embed volumes at
  spatial=4 and at spatial=1 from the checkpoint: the same embeddings."""
  config = tiny_config(**{"data.tfrecord_dir": tiny_dataset, "output_dir": str(tmp_path / "run"),
                          "mesh.data": 2, "mesh.spatial": 4, "train.max_steps": 1,
                          "train.batch_size_per_device": 4})
  summary = train.train_and_evaluate(config)
  assert summary["step"] == 1 and summary["val_metrics"]["n"] == 4
  volumes = np.random.default_rng(0).integers(0, 255, (4, 16, 16, 8)).astype(np.uint8)
  embeddings = {}
  for data, spatial in ((2, 4), (2, 1)):
    mesh = spatial_mesh(spatial, data)
    loaded = loading.load_model(summary["last_checkpoint"], config, mesh=mesh)
    embeddings[spatial] = encode.volumes(loaded.model, loaded.variables, volumes,
                                         loaded.spec.intensity, mesh)
  np.testing.assert_allclose(embeddings[4], embeddings[1], rtol=0, atol=1e-5)
  assert os.path.isdir(summary["last_checkpoint"])

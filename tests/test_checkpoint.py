"""Checkpoints: what is kept, which step is read, exact round trips, versions, clear errors."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from data_prep import schema
from medfinder_jax import checkpoint
from medfinder_jax import train_step

SPEC = schema.DatasetSpec(directory="/data/tiny",
                          preprocess=schema.PreprocessParams(shape=(16, 16, 8), spacing=()),
                          split_sizes={"train": 28, "val": 4, "test": 8},
                          label_columns=("findings",))


def variables_tree(seed):
  """Random variables in the model's top-level layout (checkpoint.py only sees a pytree): image
  tower kernels and norms, a bfloat16 projection, the frozen text tower, the loss scalar and
  the ResNet's BatchNorm statistics."""
  rng = np.random.default_rng(seed)
  normal = lambda *shape, dtype=jnp.float32: jnp.asarray(  # noqa: E731
      rng.standard_normal(shape, dtype=np.float32), dtype=dtype)
  params = {"image_encoder": {"conv1": {"kernel": normal(3, 3, 3, 1, 4)},
                              "bn1": {"scale": normal(4), "bias": normal(4)}},
            "image_projection": {"kernel": normal(4, 8, dtype=jnp.bfloat16), "bias": normal(8)},
            "text_encoder": {"embeddings": {"embedding": normal(10, 8)}},
            "logit_scale": normal()}
  stats = {"bn1": {"mean": normal(4), "var": jnp.abs(normal(4))}}
  return {"params": params, "batch_stats": {"image_encoder": stats}}


@pytest.fixture(scope="module")
def trained():
  """Variables in the model's layout (loss scalars included), the optimizer state of their
  trainable part after one update, and the tiny config (saved in the meta)."""
  from conftest import make_tiny_config  # pylint: disable=import-outside-toplevel
  config = make_tiny_config()
  variables = variables_tree(0)
  trainable, _ = train_step.split_params(variables["params"], train_step.frozen_keys(config))
  tx = train_step.make_optimizer(config.train, total_steps=10)
  one_update = jax.jit(lambda p: tx.update(jax.tree.map(jnp.ones_like, p), tx.init(p), p)[1])
  return config, variables, one_update(trainable)


def meta_for(config, step, r10=None):
  val = None if r10 is None else {"t2i": {"R@10": r10}}
  return checkpoint.build_meta(step=step, epoch=step // 3, batches_consumed=step, seed=42,
                               rng_key_data=jax.random.key_data(jax.random.key(42)),
                               config=config, dataset_spec=SPEC, process_count=1, global_batch=8,
                               val_metrics=val)


def write_steps(directory, trained, scores, keep=2):
  """Saves one checkpoint per (step, val R@10 or None) and returns the manager's steps."""
  config, variables, opt_state = trained
  manager = checkpoint.make_manager(directory, keep=keep)
  for step, r10 in scores:
    metrics = None if r10 is None else {checkpoint.BEST_METRIC: r10}
    checkpoint.save(manager, step, variables, opt_state, meta_for(config, step, r10), metrics)
  manager.wait_until_finished()
  steps = manager.all_steps()
  manager.close()
  return sorted(steps)


def test_keeps_the_latest_k_and_the_best_validated_step(tmp_path, trained):
  directory = checkpoint.checkpoint_dir(str(tmp_path))
  steps = write_steps(directory, trained, [(1, 50.0), (2, 25.0), (3, None), (4, 30.0)], keep=2)
  assert steps == [1, 3, 4]          # 3, 4 latest; 1 best; 2 neither
  assert sorted(os.listdir(directory)) == ["1", "3", "4"]
  listing = checkpoint.steps(str(tmp_path))
  assert listing["steps"] == [1, 3, 4] and listing["latest"] == 4 and listing["best"] == 1
  assert listing["metrics"][3] is None and listing["metrics"][4] == {checkpoint.BEST_METRIC: 30.0}


def test_the_latest_of_equally_good_steps_is_the_best(tmp_path, trained):
  write_steps(checkpoint.checkpoint_dir(str(tmp_path)), trained, [(1, 40.0), (2, 40.0), (3, 10.0)],
              keep=3)
  assert checkpoint.steps(str(tmp_path))["best"] == 2


def on_one_device(tree):
  """ShapeDtypeStructs of `tree` on this process's first device (a read_variables target)."""
  placement = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=placement), tree)


def test_the_best_step_is_read_by_default_and_any_step_on_request(tmp_path, trained):
  config, variables, _ = trained
  write_steps(checkpoint.checkpoint_dir(str(tmp_path)), trained,
              [(1, 10.0), (2, 75.0), (3, 5.0)], keep=3)
  meta = checkpoint.read_meta(str(tmp_path))
  assert meta["step"] == 2 and meta["val_metrics"]["t2i"]["R@10"] == 75.0
  assert meta["checkpoint_path"] == os.path.join(checkpoint.checkpoint_dir(str(tmp_path)), "2")
  assert checkpoint.dataset_spec(meta) == SPEC
  assert checkpoint.config_from_meta(meta).model.embed_dim == config.model.embed_dim == 32
  restored = checkpoint.read_variables(meta["checkpoint_path"], on_one_device(variables))
  assert jax.tree.structure(restored) == jax.tree.structure(variables)
  for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(variables)):
    np.testing.assert_array_equal(got, want)
  assert checkpoint.read_meta(str(tmp_path), step=3)["step"] == 3
  step_dir = os.path.join(checkpoint.checkpoint_dir(str(tmp_path)), "1")
  assert checkpoint.read_meta(step_dir)["step"] == 1


def test_without_validated_steps_the_latest_is_loaded(tmp_path, trained):
  write_steps(checkpoint.checkpoint_dir(str(tmp_path)), trained, [(1, None), (2, None)])
  assert checkpoint.read_meta(str(tmp_path))["step"] == 2


def test_train_state_round_trips_exactly_including_the_optimizer(tmp_path, trained):
  config, variables, opt_state = trained
  directory = checkpoint.checkpoint_dir(str(tmp_path))
  write_steps(directory, trained, [(7, None)])
  manager = checkpoint.make_manager(directory)
  abstract = lambda tree: jax.tree.map(  # noqa: E731
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                     sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0])),
      tree)
  got_vars, got_opt = checkpoint.restore_train(manager, 7, abstract(variables),
                                               abstract(opt_state))
  meta = checkpoint.restore_meta(manager, 7)
  manager.close()
  assert jax.tree.structure(got_opt) == jax.tree.structure(opt_state)
  for got, want in zip(jax.tree.leaves((got_vars, got_opt)),
                       jax.tree.leaves((variables, opt_state))):
    assert got.dtype == want.dtype
    np.testing.assert_array_equal(got, want)
  assert meta["step"] == 7 and meta["batches_consumed"] == 7 and meta["seed"] == 42
  assert meta["rng_key_data"] == [int(x) for x in jax.random.key_data(jax.random.key(42))]
  assert checkpoint.config_from_meta(meta).train.lr == config.train.lr


def test_a_path_without_checkpoints_is_a_clear_error(tmp_path):
  with pytest.raises(checkpoint.CheckpointError, match="holds no checkpoint"):
    checkpoint.read_meta(str(tmp_path))
  with pytest.raises(checkpoint.CheckpointError, match="does not exist"):
    checkpoint.read_meta(str(tmp_path / "nowhere"))


def test_a_missing_step_names_the_steps_there(tmp_path, trained):
  write_steps(checkpoint.checkpoint_dir(str(tmp_path)), trained, [(1, None)])
  with pytest.raises(checkpoint.CheckpointError, match=r"no step 9; it has steps \[1\]"):
    checkpoint.read_meta(str(tmp_path), step=9)


def test_a_checkpoint_of_another_format_version_is_refused(tmp_path, trained):
  config = trained[0]
  meta = {**meta_for(config, 1), "version": 1}
  manager = checkpoint.make_manager(checkpoint.checkpoint_dir(str(tmp_path)))
  checkpoint.save(manager, 1, trained[1], trained[2], meta)
  manager.wait_until_finished()
  manager.close()
  with pytest.raises(checkpoint.CheckpointError, match="format version 1; this version of "
                                                       "launch.py reads version 2"):
    checkpoint.read_meta(str(tmp_path))


def truncate_largest_array_file(step_dir):
  """Cuts the largest data file of a step's variables to 20 bytes (a copy cut short)."""
  files = [os.path.join(root, name) for root, _, names in
           os.walk(os.path.join(step_dir, "variables")) for name in names]
  largest = max(files, key=os.path.getsize)
  with open(largest, "r+b") as f:
    f.truncate(20)
  return largest


def test_a_truncated_array_file_is_a_damaged_checkpoint_naming_the_step(tmp_path, trained):
  _, variables, _ = trained
  directory = checkpoint.checkpoint_dir(str(tmp_path))
  write_steps(directory, trained, [(1, None), (2, None)])
  truncate_largest_array_file(os.path.join(directory, "2"))
  meta = checkpoint.read_meta(str(tmp_path))               # meta is intact
  with pytest.raises(checkpoint.DamagedCheckpoint) as err:
    checkpoint.read_variables(meta["checkpoint_path"], on_one_device(variables))
  message = str(err.value)
  assert os.path.join(directory, "2") in message and "cannot read variables" in message
  assert len(message) < 600 and "\n" not in message         # one line, not orbax's dump
  restored = checkpoint.read_variables(os.path.join(directory, "1"), on_one_device(variables))
  np.testing.assert_array_equal(restored["params"]["logit_scale"],
                                variables["params"]["logit_scale"])


def test_a_step_without_its_meta_is_a_damaged_checkpoint(tmp_path, trained):
  import shutil  # pylint: disable=import-outside-toplevel
  directory = checkpoint.checkpoint_dir(str(tmp_path))
  write_steps(directory, trained, [(1, None), (2, None)])
  shutil.rmtree(os.path.join(directory, "2", "meta"))
  with pytest.raises(checkpoint.DamagedCheckpoint, match=r"checkpoints/2: meta/ missing"):
    checkpoint.read_meta(str(tmp_path))
  assert checkpoint.read_meta(str(tmp_path), step=1)["step"] == 1


def test_a_damaged_step_set_aside_leaves_the_earlier_ones_in_use(tmp_path, trained):
  directory = checkpoint.checkpoint_dir(str(tmp_path))
  write_steps(directory, trained, [(1, None), (2, None)])
  manager = checkpoint.make_manager(directory)
  moved = checkpoint.set_aside(manager, 2)
  assert moved == os.path.join(directory, "2.damaged") and os.path.isdir(moved)
  assert manager.latest_step() == 1 and manager.all_steps() == [1]
  manager.close()


def test_a_failed_write_is_a_clear_error_and_keeps_the_earlier_steps(tmp_path, trained,
                                                                    monkeypatch):
  import errno  # pylint: disable=import-outside-toplevel
  config, variables, opt_state = trained
  directory = checkpoint.checkpoint_dir(str(tmp_path))
  write_steps(directory, trained, [(1, None)])
  manager = checkpoint.make_manager(directory)

  def disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.path.join(directory, "2"))

  monkeypatch.setattr(manager, "save", disk_full)
  with pytest.raises(checkpoint.CheckpointWriteError, match=r"cannot write step 2 \(No space "
                                                            r"left on device.*steps saved "
                                                            r"before \(\[1\]\) are intact"):
    checkpoint.save(manager, 2, variables, opt_state, meta_for(config, 2))
  manager.close()
  assert checkpoint.read_meta(str(tmp_path))["step"] == 1

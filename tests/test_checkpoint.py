"""Checkpoints: what is kept, which step is read, exact round trips, versions, clear errors."""

import errno
import json
import os
import re
import shutil
import sys
import types

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.experimental import multihost_utils

from data_prep import schema
from medfinder_jax import checkpoint
from medfinder_jax import train_step
from medfinder_jax.models import bert as bert_lib

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
  assert listing["directory"] == directory
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


# --- Which steps are kept, what a save writes -----------------------------------------------------

def test_keeping_fewer_than_one_step_still_keeps_the_latest(tmp_path, trained):
  assert write_steps(str(tmp_path), trained, [(1, None), (2, None), (3, None)], keep=0) == [3]


def test_only_the_best_and_the_latest_k_are_kept_unvalidated_or_second_best_steps_not(
    tmp_path, trained):
  assert write_steps(str(tmp_path), trained, [(1, None), (2, 10.0), (3, 5.0), (4, None), (5, None)],
                     keep=2) == [2, 4, 5]


def test_saving_a_step_that_exists_changes_nothing(tmp_path, trained):
  config, variables, opt_state = trained
  directory = checkpoint.checkpoint_dir(str(tmp_path))
  write_steps(directory, trained, [(1, 20.0)])
  manager = checkpoint.make_manager(directory)
  other = jax.tree.map(lambda x: x + 1, variables)
  assert not checkpoint.save(manager, 1, other, opt_state, meta_for(config, 1, 90.0),
                             {checkpoint.BEST_METRIC: 90.0})
  manager.close()
  restored = checkpoint.read_variables(str(tmp_path), on_one_device(variables))
  for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(variables)):
    np.testing.assert_array_equal(got, want)
  assert checkpoint.steps(str(tmp_path))["metrics"] == {1: {checkpoint.BEST_METRIC: 20.0}}


def test_metrics_without_the_selection_metric_leave_a_step_unvalidated(tmp_path, trained):
  config, variables, opt_state = trained
  manager = checkpoint.make_manager(checkpoint.checkpoint_dir(str(tmp_path)))
  assert checkpoint.save(manager, 1, variables, opt_state, meta_for(config, 1),
                         {"val_i2t_R@10": 90.0})
  assert checkpoint.save(manager, 2, variables, opt_state, meta_for(config, 2),
                         {checkpoint.BEST_METRIC: np.float32(5.0), "val_loss": np.float64(1.5)})
  checkpoint.wait_until_finished(manager)
  manager.close()
  listing = checkpoint.steps(str(tmp_path))
  assert listing["metrics"] == {1: None, 2: {checkpoint.BEST_METRIC: 5.0, "val_loss": 1.5}}
  assert listing["best"] == 2


def test_a_half_written_step_of_a_killed_run_is_removed_by_the_next_save(tmp_path, trained):
  config, variables, opt_state = trained
  directory = checkpoint.checkpoint_dir(str(tmp_path))
  write_steps(directory, trained, [(1, None)])
  os.makedirs(os.path.join(directory, "3.orbax-checkpoint-tmp", "variables"))
  manager = checkpoint.make_manager(directory)
  checkpoint.save(manager, 2, variables, opt_state, meta_for(config, 2))
  checkpoint.wait_until_finished(manager)
  manager.close()
  assert sorted(os.listdir(directory)) == ["1", "2"]


def tree_listing(root):
  return sorted((os.path.relpath(path, root), sorted(names)) for path, _, names in os.walk(root))


def test_reading_checkpoints_never_creates_or_deletes_anything(tmp_path, trained):
  variables = trained[1]
  directory = checkpoint.checkpoint_dir(str(tmp_path))
  write_steps(directory, trained, [(1, None), (2, 10.0), (3, None)], keep=1)
  os.makedirs(os.path.join(directory, "4.orbax-checkpoint-tmp", "variables"))
  before = tree_listing(str(tmp_path))
  checkpoint.steps(str(tmp_path))
  checkpoint.read_meta(str(tmp_path), step=3)
  checkpoint.read_variables(str(tmp_path), on_one_device(variables))
  manager = checkpoint.make_manager(directory, keep=1, read_only=True, enable_async=False)
  checkpoint.restore_meta(manager, 2)
  manager.close()
  assert tree_listing(str(tmp_path)) == before
  elsewhere = str(tmp_path / "elsewhere")
  checkpoint.make_manager(elsewhere, read_only=True, enable_async=False).close()
  assert not os.path.exists(elsewhere)


# --- Write failures -------------------------------------------------------------------------------

MIB = 2**20


def fake_manager(directory, steps=(), **methods):
  """The parts of a CheckpointManager the write checks use."""
  return types.SimpleNamespace(directory=directory, all_steps=lambda: list(steps), **methods)


def free_space(monkeypatch, free):
  """shutil.disk_usage reports `free` bytes; returns the paths it was asked about."""
  asked = []

  def disk_usage(path):
    asked.append(path)
    return types.SimpleNamespace(total=10 * free + 1, used=9 * free + 1, free=free)

  monkeypatch.setattr(shutil, "disk_usage", disk_usage)
  return asked


def test_not_enough_space_is_refused_naming_the_need_the_free_space_and_the_steps(
    tmp_path, monkeypatch):
  trees = ({"a": np.zeros(3 * MIB, np.uint8)}, {"b": np.zeros(2 * MIB, np.float32), "n": 5})
  manager = fake_manager(str(tmp_path), steps=[30, 10])   # 11 MiB of arrays: 12.1 with margin
  asked = free_space(monkeypatch, 12 * MIB)
  with pytest.raises(checkpoint.CheckpointWriteError) as err:
    checkpoint.check_space(manager, 40, trees)
  message = str(err.value)
  assert message.startswith(f"{tmp_path}: not enough space for checkpoint step 40")
  assert "needs about 12 MiB and 12 MiB are free" in message
  assert "steps saved before ([10, 30]) are intact" in message
  assert "rerun the same command" in message
  assert asked == [str(tmp_path)]
  free_space(monkeypatch, 13 * MIB)
  checkpoint.check_space(manager, 40, trees)
  free_space(monkeypatch, 0)
  with pytest.raises(checkpoint.CheckpointWriteError, match=r"\(none\) are intact"):
    checkpoint.check_space(fake_manager(str(tmp_path)), 40, trees)


def test_a_save_without_the_space_for_it_writes_nothing(tmp_path, trained, monkeypatch):
  config, variables, opt_state = trained
  directory = checkpoint.checkpoint_dir(str(tmp_path))
  write_steps(directory, trained, [(1, None)])
  manager = checkpoint.make_manager(directory)
  free_space(monkeypatch, 100)
  with pytest.raises(checkpoint.CheckpointWriteError, match="not enough space for checkpoint "
                                                            r"step 2.*\(\[1\]\) are intact"):
    checkpoint.save(manager, 2, variables, opt_state, meta_for(config, 2))
  manager.close()
  assert os.listdir(directory) == ["1"]


def test_a_failed_async_write_names_the_step_being_written(tmp_path):
  def fails(*args, **kwargs):
    raise ValueError(f"while writing {tmp_path}/5.orbax-checkpoint-tmp/variables\n"
                     "DATA_LOSS: short write\n  (a long trace)")

  manager = fake_manager(str(tmp_path), steps=[4, 3], wait_until_finished=fails)
  with pytest.raises(checkpoint.CheckpointWriteError) as err:
    checkpoint.wait_until_finished(manager)
  assert str(err.value).startswith(f"{tmp_path}: cannot write step 5 (DATA_LOSS: short write); "
                                   "the steps saved before ([3, 4]) are intact")
  assert err.value.__cause__ is None and err.value.__suppress_context__


def test_a_failed_wait_without_a_step_in_the_error_names_the_last_checkpoint(tmp_path):
  def fails():
    raise OSError(errno.EIO, os.strerror(errno.EIO))

  with pytest.raises(checkpoint.CheckpointWriteError) as err:
    checkpoint.wait_until_finished(fake_manager(str(tmp_path), wait_until_finished=fails))
  assert str(err.value).startswith(f"{tmp_path}: cannot write the last checkpoint (Input/output "
                                   "error); the steps saved before (none) are intact")


def raised(error, inner, chain="cause"):
  """`error` as caught, raised from `inner` (chain="cause") or while handling it ("context")."""
  try:
    try:
      raise inner
    except Exception as caught:  # pylint: disable=broad-except
      if chain == "cause":
        raise error from caught
      raise error  # pylint: disable=raise-missing-from
  except Exception as got:  # pylint: disable=broad-except
    return got


ENOSPC = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/run/checkpoints/2/x")
TS_WRITE = ("Error writing \"abc\" in OCDBT database: UNKNOWN: [os_error_code='28'] Failed "
            "writing: \"/run/checkpoints/2.orbax-checkpoint-tmp/d/abc\" [source locations=...]")


@pytest.mark.parametrize("error, reason", [
    (ENOSPC, "No space left on device: /run/checkpoints/2/x"),
    (OSError(errno.EIO, os.strerror(errno.EIO)), "Input/output error"),
    (raised(ValueError("wrapped"), ENOSPC), "No space left on device: /run/checkpoints/2/x"),
    (raised(ValueError("while"), ENOSPC, "context"), "No space left on device: "
                                                     "/run/checkpoints/2/x"),
    (OSError("an OSError without errno"), "an OSError without errno"),
    (ValueError(TS_WRITE), "No space left on device: "
                           "/run/checkpoints/2.orbax-checkpoint-tmp/d/abc"),
    (ValueError("UNKNOWN: [os_error_code='5'] reading"), "Input/output error"),
    (raised(ValueError("outer"), ValueError(TS_WRITE)),
     "No space left on device: /run/checkpoints/2.orbax-checkpoint-tmp/d/abc"),
    (raised(ValueError("outer"), ValueError(TS_WRITE), "context"),
     "No space left on device: /run/checkpoints/2.orbax-checkpoint-tmp/d/abc"),
    (ValueError("Traceback\nDATA_LOSS: Error reading \"v/d/1\": unexpected EOF\nmore"),
     "DATA_LOSS: Error reading \"v/d/1\": unexpected EOF"),
    (raised(ValueError("outer"), ValueError("x\nNOT_FOUND: no v/manifest")), "NOT_FOUND: no "
                                                                            "v/manifest"),
    (raised(ValueError("outer"), ValueError("FAILED_PRECONDITION: ro"), "context"),
     "FAILED_PRECONDITION: ro"),
    (raised(ValueError("DATA_LOSS: the outer one"), ValueError("UNKNOWN: inner")),
     "DATA_LOSS: the outer one"),
    (ValueError("  the first line\nthe second"), "the first line"),
    (raised(KeyError(), ValueError("the inner error\nmore")), "the inner error"),
    (KeyError(), "KeyError"),
    (ValueError("x" * 500), "x" * 400),
])
def test_a_write_or_read_failure_is_said_in_one_line(error, reason):
  assert checkpoint._reason(error) == reason  # pylint: disable=protected-access


# --- Meta -----------------------------------------------------------------------------------------

def test_the_meta_holds_the_runs_position_and_settings_as_plain_json(trained):
  config = trained[0]
  key = jax.random.key_data(jax.random.key(7))
  bert = bert_lib.BertConfig(vocab_size=99, hidden_size=8)
  meta = checkpoint.build_meta(
      step=np.int64(12), epoch=np.int32(2), batches_consumed=np.int64(30), seed=np.int64(7),
      rng_key_data=key, config=config, dataset_spec=SPEC, process_count=np.int32(2),
      global_batch=np.int64(16), val_metrics={"t2i": {"R@10": np.float32(50.0),
                                                     "MdR": float("nan")}},
      bert_config=bert)
  assert json.loads(json.dumps(meta, allow_nan=False)) == meta
  ints = ("version", "step", "epoch", "batches_consumed", "seed", "process_count", "global_batch")
  assert {k: meta[k] for k in ints} == {"version": 2, "step": 12, "epoch": 2,
                                        "batches_consumed": 30, "seed": 7, "process_count": 2,
                                        "global_batch": 16}
  assert all(type(meta[k]) is int for k in ints)  # pylint: disable=unidiomatic-typecheck
  assert meta["rng_key_data"] == [int(x) for x in np.asarray(key)]
  assert all(type(x) is int for x in meta["rng_key_data"])  # pylint: disable=unidiomatic-typecheck
  assert meta["val_metrics"] == {"t2i": {"R@10": 50.0, "MdR": None}}
  assert bert_lib.BertConfig(**meta["bert_config"]) == bert
  meta["checkpoint_path"] = "/run/checkpoints/12"
  assert checkpoint.dataset_spec(meta) == SPEC
  assert checkpoint.config_from_meta(meta).to_dict() == config.to_dict()
  assert set(meta) == set(ints) | {"rng_key_data", "config", "dataset", "val_metrics",
                                   "bert_config", "checkpoint_path"}


def test_a_meta_without_validation_or_text_config_says_none(trained):
  meta = meta_for(trained[0], 3)
  assert meta["val_metrics"] is None and meta["bert_config"] is None


def test_config_from_meta_turns_json_lists_back_into_tuples():
  config = checkpoint.config_from_meta({"config": {"data": {"shape": [16, 16, 8]},
                                                   "layers": [[1, 2], [3]], "lr": 0.5,
                                                   "name": "tiny"}})
  assert isinstance(config, ml_collections.ConfigDict)
  assert config.data.shape == (16, 16, 8) and config.layers == ((1, 2), (3,))
  assert config.lr == 0.5 and config.name == "tiny"


@pytest.mark.parametrize("dataset", ["missing", None, {"directory": "/data"},
                                     {"preprocess": {"no_such_field": 1}}])
def test_a_meta_without_a_usable_dataset_spec_is_a_checkpoint_error(dataset):
  meta = {"checkpoint_path": "/run/checkpoints/3"}
  if dataset != "missing":
    meta["dataset"] = dataset
  with pytest.raises(checkpoint.CheckpointError, match="^/run/checkpoints/3: "):
    checkpoint.dataset_spec(meta)


@pytest.mark.parametrize("meta, error", [
    ([1, 2], "/meta: not a JSON object"),
    ({"step": 1}, ": checkpoint format version None; this version of launch.py reads version 2"),
])
def test_a_meta_that_is_not_this_versions_object_is_refused(tmp_path, trained, meta, error):
  directory = checkpoint.checkpoint_dir(str(tmp_path))
  manager = checkpoint.make_manager(directory)
  checkpoint.save(manager, 1, trained[1], trained[2], meta)
  checkpoint.wait_until_finished(manager)
  manager.close()
  with pytest.raises(checkpoint.CheckpointError) as err:
    checkpoint.read_meta(str(tmp_path))
  assert str(err.value).startswith(os.path.join(directory, "1") + error)   # the step dir first


# --- Finding checkpoints --------------------------------------------------------------------------

def test_a_run_is_found_from_its_output_dir_its_checkpoints_folder_or_one_step(
    tmp_path, trained, monkeypatch):
  directory = checkpoint.checkpoint_dir(str(tmp_path))
  write_steps(directory, trained, [(1, None), (2, None)])
  assert checkpoint.resolve(str(tmp_path)) == (directory, None)
  assert checkpoint.resolve(directory) == (directory, None)
  assert checkpoint.resolve(os.path.join(directory, "2") + os.sep) == (directory, 2)
  monkeypatch.chdir(tmp_path)
  assert checkpoint.resolve("checkpoints") == (directory, None)
  assert checkpoint.resolve(os.path.join("checkpoints", "1")) == (directory, 1)
  assert checkpoint.read_meta(os.path.join(directory, "1"), step=2)["step"] == 2


def test_a_numbered_folder_counts_as_a_step_only_with_a_steps_files(tmp_path):
  directory = tmp_path / "checkpoints"
  os.makedirs(directory / "7" / "other")
  os.makedirs(directory / "v1" / "meta")
  os.makedirs(tmp_path / "12")
  for path in (tmp_path, directory, directory / "7"):
    with pytest.raises(checkpoint.CheckpointError, match=re.escape(f"{str(path)!r} holds no "
                                                                   "checkpoint")):
      checkpoint.resolve(str(path))
  with pytest.raises(checkpoint.CheckpointError, match="does not exist"):
    checkpoint.resolve(str(directory / "7" / "missing"))
  (directory / "7" / "_CHECKPOINT_METADATA").write_text("{}")    # orbax's file: a (damaged) step
  assert checkpoint.resolve(str(tmp_path)) == (str(directory), None)
  assert checkpoint.resolve(str(directory / "7")) == (str(directory), 7)
  os.makedirs(directory / "8" / "opt_state")
  assert checkpoint.resolve(str(directory / "8")) == (str(directory), 8)


def test_step_folders_orbax_does_not_list_are_no_finished_checkpoint(tmp_path):
  os.makedirs(tmp_path / "checkpoints" / "007" / "meta")    # not a name orbax gives a step
  with pytest.raises(checkpoint.CheckpointError, match=re.escape(
      f"{str(tmp_path / 'checkpoints')!r} holds no finished checkpoint")):
    checkpoint.read_meta(str(tmp_path))


def test_missing_items_are_all_named(tmp_path, trained):
  _, variables, opt_state = trained
  directory = checkpoint.checkpoint_dir(str(tmp_path))
  write_steps(directory, trained, [(1, None)])
  shutil.rmtree(os.path.join(directory, "1", "variables"))
  shutil.rmtree(os.path.join(directory, "1", "opt_state"))
  manager = checkpoint.make_manager(directory)
  with pytest.raises(checkpoint.DamagedCheckpoint,
                     match=re.escape(f"{os.path.join(directory, '1')}: variables/, opt_state/ "
                                     "missing (the step is incomplete)")):
    checkpoint.restore_train(manager, 1, on_one_device(variables), on_one_device(opt_state))
  manager.close()


def test_an_unreadable_train_state_names_the_items_read(tmp_path, trained):
  _, variables, opt_state = trained
  directory = checkpoint.checkpoint_dir(str(tmp_path))
  write_steps(directory, trained, [(1, None)])
  truncate_largest_array_file(os.path.join(directory, "1"))
  manager = checkpoint.make_manager(directory)
  with pytest.raises(checkpoint.DamagedCheckpoint, match=re.escape(
      f"{os.path.join(directory, '1')}: cannot read variables and opt_state: ")):
    checkpoint.restore_train(manager, 1, on_one_device(variables), on_one_device(opt_state))
  manager.close()


def test_a_step_set_aside_again_keeps_every_earlier_copy(tmp_path, trained):
  directory = checkpoint.checkpoint_dir(str(tmp_path))
  write_steps(directory, trained, [(1, None), (2, None), (3, None)], keep=3)
  os.makedirs(os.path.join(directory, "3.damaged"))
  os.makedirs(os.path.join(directory, "2.damaged"))
  os.makedirs(os.path.join(directory, "2.damaged2"))
  manager = checkpoint.make_manager(directory, keep=3)
  assert checkpoint.set_aside(manager, 3) == os.path.join(directory, "3.damaged2")
  assert checkpoint.set_aside(manager, 2) == os.path.join(directory, "2.damaged3")
  assert manager.all_steps() == [1]
  manager.close()
  assert os.path.isdir(os.path.join(directory, "3.damaged2", "meta"))
  assert sorted(os.listdir(directory)) == ["1", "2.damaged", "2.damaged2", "2.damaged3",
                                           "3.damaged", "3.damaged2"]


# --- Reports of abandoned I/O ---------------------------------------------------------------------

def unraisable(value, obj=None):
  return types.SimpleNamespace(exc_type=type(value), exc_value=value, exc_traceback=None,
                               err_msg=None, object=obj)


def test_only_reports_of_abandoned_checkpoint_io_are_dropped(monkeypatch):
  async def _read_array_index():
    pass

  reported = []
  monkeypatch.setattr(sys, "unraisablehook", reported.append)
  checkpoint._drop_reports_of_abandoned_io()  # pylint: disable=protected-access
  hook = sys.unraisablehook
  read = _read_array_index()
  dropped = [unraisable(RuntimeError("Event loop is closed")),
             unraisable(ValueError("cancelled"), read)]
  kept = [unraisable(RuntimeError("Event loop is running")),
          unraisable(ValueError("Event loop is closed")),
          unraisable(ValueError("cancelled"), "<coroutine object _write_array at 0x1>")]
  for report in dropped + kept:
    hook(report)
  read.close()
  assert reported == kept
  checkpoint._drop_reports_of_abandoned_io()  # pylint: disable=protected-access
  assert sys.unraisablehook is hook     # installed once


# --- Several processes ----------------------------------------------------------------------------

def as_process(monkeypatch, index, count=2):
  monkeypatch.setattr(jax, "process_count", lambda: count)
  monkeypatch.setattr(jax, "process_index", lambda: index)


def test_every_process_refuses_a_save_that_one_process_has_no_space_for(tmp_path, monkeypatch):
  trees = ({"a": np.zeros(MIB, np.uint8)},)
  as_process(monkeypatch, 0)
  free_space(monkeypatch, 100 * MIB)
  verdicts = {}

  def allgather(mine, others):
    verdicts["mine"] = int(mine)
    return np.array([int(mine), others], np.int32)

  monkeypatch.setattr(multihost_utils, "process_allgather", lambda x: allgather(x, 0))
  with pytest.raises(checkpoint.CheckpointWriteError, match="not enough space"):
    checkpoint.check_space(fake_manager(str(tmp_path)), 5, trees)
  assert verdicts == {"mine": 1}
  monkeypatch.setattr(multihost_utils, "process_allgather", lambda x: allgather(x, 1))
  checkpoint.check_space(fake_manager(str(tmp_path)), 5, trees)


@pytest.mark.parametrize("index", [0, 1])
def test_a_step_is_set_aside_by_process_0_with_every_process_waiting_for_it(
    tmp_path, monkeypatch, index):
  os.makedirs(tmp_path / "2" / "meta")
  as_process(monkeypatch, index)
  events = []
  monkeypatch.setattr(multihost_utils, "sync_global_devices",
                      lambda name: events.append(("sync", name, os.path.isdir(tmp_path / "2"))))
  manager = fake_manager(str(tmp_path), reload=lambda: events.append(("reload",)))
  assert checkpoint.set_aside(manager, 2) == str(tmp_path / "2.damaged")
  assert os.path.isdir(tmp_path / "2.damaged") == (index == 0)
  (what, name, step_still_there), reload = events     # the barrier, then the step list reloaded
  assert what == "sync" and isinstance(name, str) and reload == ("reload",)
  assert step_still_there == (index != 0)                # process 0 renamed before the barrier


# --- Placement ------------------------------------------------------------------------------------

def test_a_restored_state_is_placed_as_the_targets_say(tmp_path, trained):
  config, variables, opt_state = trained
  directory = checkpoint.checkpoint_dir(str(tmp_path))
  write_steps(directory, trained, [(1, None)])
  manager = checkpoint.make_manager(directory)
  checkpoint.save(manager, 2, jax.tree.map(lambda x: x + 1, variables), opt_state,
                  meta_for(config, 2))
  checkpoint.wait_until_finished(manager)
  placement = jax.sharding.SingleDeviceSharding(jax.devices()[1])
  target = lambda tree: jax.tree.map(  # noqa: E731
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=placement), tree)
  got_vars, got_opt = checkpoint.restore_train(manager, 1, target(variables), target(opt_state))
  manager.close()
  read = checkpoint.read_variables(str(tmp_path), target(variables), step=1)
  for got, want in zip(jax.tree.leaves((got_vars, got_opt, read)),
                       jax.tree.leaves((variables, opt_state, variables))):
    assert got.sharding == placement
    np.testing.assert_array_equal(got, want)

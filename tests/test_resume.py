"""Resuming a run (medfinder_jax/train.py: initial_state, check_resume_compatible) on the
stand-in model of tests/test_train_step.py: what a restart holds is what was saved (params,
optimizer state, BatchNorm statistics, step count) in the shardings a fresh run would use; a
damaged newest step gives way to the one before; a changed setup is refused naming every
difference. tests/test_train.py and tests/test_launch_train.py resume the real model.
"""

import dataclasses
import os

import jax
import numpy as np
import pytest

from medfinder_jax import checkpoint
from medfinder_jax import config_utils
from medfinder_jax import sharding
from medfinder_jax import train
from medfinder_jax import train_step
from test_train_step import RULES, SHAPE, SPEC, TOTAL_STEPS, StandIn, make_config, make_mesh
from test_train_step import make_model
from test_train_step import tree_paths

GLOBAL_BATCH = 4


def make_run(config, workdir, tokenizer=None):
  """A train.Run of the stand-in on 2 devices (fsdp = 2), without a dataset."""
  mesh = make_mesh(data=1, fsdp=2)
  return train.Run(config=config, workdir=str(workdir), builder=None, spec=SPEC, mesh=mesh,
                   rules=RULES, tokenizer=tokenizer, model=make_model(config), bert_config=None,
                   tx=train_step.make_optimizer(config.train, TOTAL_STEPS), steps_per_epoch=5,
                   total_steps=TOTAL_STEPS, global_batch=GLOBAL_BATCH, local_batch=GLOBAL_BATCH)


def stepped_state(run, step, seed):
  """A state as if `step` updates had run: fresh, then one update with random gradients (the
  optimizer state is no longer zero), BatchNorm statistics moved, the step count set."""
  state = train_step.create_train_state(run.model, run.tx, run.config, SHAPE,
                                        jax.random.key(seed), run.mesh, run.rules)
  rng = np.random.default_rng(seed)
  grads = jax.tree.map(lambda x: rng.normal(size=x.shape).astype(np.float32), state.trainable)
  stats = jax.tree.map(lambda x: x + rng.normal(size=x.shape).astype(np.float32),
                       state.batch_stats)
  state = jax.jit(lambda s, g, b: s.apply_gradients(g, b))(state, grads, stats)
  return state.replace(step=sharding.replicate(np.int32(step), run.mesh))


def save_step(run, manager, state):
  step = int(state.step)
  meta = checkpoint.build_meta(
      step=step, epoch=step // run.steps_per_epoch, batches_consumed=step, seed=run.config.seed,
      rng_key_data=jax.random.key_data(jax.random.key(run.config.seed)), config=run.config,
      dataset_spec=run.spec, process_count=jax.process_count(), global_batch=run.global_batch)
  checkpoint.save(manager, step, state.variables(), state.opt_state, meta)
  checkpoint.wait_until_finished(manager)


@pytest.fixture
def saved(tmp_path):
  """(run, manager, {step: the saved state on the host}) with steps 3 and 4 saved."""
  run = make_run(make_config(), tmp_path)
  manager = checkpoint.make_manager(checkpoint.checkpoint_dir(str(tmp_path)))
  states = {}
  for step in (3, 4):
    state = stepped_state(run, step, seed=step)
    save_step(run, manager, state)
    states[step] = jax.device_get(state)
  yield run, manager, states
  manager.close()


def assert_state_is(got, expected, run):
  """Every leaf equal, in the shardings of the run's abstract state, the trainable / frozen
  split kept."""
  abstract = train_step.abstract_train_state(run.model, run.tx, run.config, SHAPE, run.mesh,
                                             run.rules)
  assert jax.tree.structure(got) == jax.tree.structure(abstract)
  assert set(got.trainable) == set(expected.trainable)
  assert set(got.frozen) == set(expected.frozen)
  shardings = tree_paths(jax.tree.map(lambda a: a.sharding, abstract))
  want = tree_paths(expected)
  for path, leaf in tree_paths(got).items():
    np.testing.assert_array_equal(leaf, want[path], err_msg=path)
    assert leaf.dtype == want[path].dtype, path
    assert leaf.sharding == shardings[path], path


def test_a_restart_holds_the_newest_saved_state_in_its_shardings(saved):
  run, manager, states = saved
  state, meta = train.initial_state(run, manager)
  assert meta["step"] == 4 and meta["checkpoint_path"].endswith(os.path.join("checkpoints", "4"))
  assert int(state.step) == 4 and state.step.dtype == np.int32
  assert_state_is(state, states[4], run)


def test_a_restart_on_another_mesh_holds_the_state_in_the_new_meshs_shardings(saved):
  """Saved with fsdp = 2, resumed with data = 2: every leaf is placed as the new run's abstract
  state says (replicated where it was split), not where it was saved."""
  run, manager, states = saved
  moved = dataclasses.replace(run, mesh=make_mesh(data=2, fsdp=1))
  state, _ = train.initial_state(moved, manager)
  assert_state_is(state, states[4], moved)


def test_a_model_without_batchnorm_restores_with_empty_statistics(tmp_path):
  """As the ViT tower: no "batch_stats" collection in the checkpoint, and the restored state has
  the fresh state's empty statistics (the same pytree, so the jitted step takes it)."""
  config = make_config()
  run = dataclasses.replace(make_run(config, tmp_path), model=StandIn(2.0, batch_norm=False))
  manager = checkpoint.make_manager(checkpoint.checkpoint_dir(str(tmp_path)))
  state = stepped_state(run, 2, seed=2)
  assert state.batch_stats == {}
  save_step(run, manager, state)
  restored, _ = train.initial_state(run, manager)
  manager.close()
  assert restored.batch_stats == {}
  assert_state_is(restored, jax.device_get(state), run)


def test_a_damaged_newest_step_is_set_aside_and_the_one_before_restored(saved, capsys):
  run, manager, states = saved
  step_dir = os.path.join(str(manager.directory), "4")
  for name in os.listdir(os.path.join(step_dir, "meta")):
    os.remove(os.path.join(step_dir, "meta", name))
  os.rmdir(os.path.join(step_dir, "meta"))
  state, meta = train.initial_state(run, manager)
  assert meta["step"] == 3
  assert_state_is(state, states[3], run)
  assert os.path.isdir(step_dir + ".damaged") and not os.path.exists(step_dir)
  out = capsys.readouterr().out
  assert "skipping damaged checkpoint step 4" in out and "4.damaged" in out
  assert "meta/ missing" in out


def test_without_checkpoints_the_run_starts_fresh_from_its_seed_with_the_pretrained_text(
    tmp_path, monkeypatch):
  """A fresh state is the seed's (every process gets the same) and its text tower is the
  pretrained one read from the tokenizer's folder."""
  text = {"embedding": np.linspace(-1, 1, 16 * 4, dtype=np.float32).reshape(16, 4)}
  read = []
  monkeypatch.setattr(train.convert_weights, "load_hf_bert",
                      lambda folder: read.append(folder) or (None, text))
  tokenizer = type("Tokenizer", (), {"folder": str(tmp_path / "text")})()
  run = make_run(make_config(**{"seed": 5}), tmp_path, tokenizer)
  manager = checkpoint.make_manager(checkpoint.checkpoint_dir(str(tmp_path)))
  state, meta = train.initial_state(run, manager)
  manager.close()
  assert meta is None and read == [tokenizer.folder] and int(state.step) == 0
  expected = train_step.create_train_state(run.model, run.tx, run.config, SHAPE,
                                           jax.random.key(5), run.mesh, run.rules, text)
  assert_state_is(state, jax.device_get(expected), run)


# --- What may change between a run and its resumption -------------------------------------------

def meta_of(config, **fields):
  """A checkpoint's meta for `config` (fields override: global_batch, process_count, ...)."""
  meta = {"config": config_utils.to_dict(config), "dataset": SPEC.to_dict(),
          "global_batch": GLOBAL_BATCH, "process_count": jax.process_count(),
          "checkpoint_path": "/runs/a/checkpoints/7"}
  return {**meta, **fields}


SAVED_VALUES = {"seed": 1, "model.backbone": "vit", "model.embed_dim": 64,
                "model.resnet": {"layers": [2, 2, 2, 2]}, "model.vit": {"patch": 4},
                "model.fusion": {"enabled": False}, "loss.contrastive": "siglip",
                "loss.learn_temperature": False, "text.trainable": True,
                "train.batch_size_per_device": 9, "train.grad_accum_steps": 3,
                "train.shuffle_buffer": 7, "text.max_tokens": 11, "text.pooling": "mean"}


def test_every_setting_that_fixes_the_state_or_the_data_order_is_listed():
  assert set(SAVED_VALUES) == set(train.RESUME_KEYS)


@pytest.mark.parametrize("key", sorted(SAVED_VALUES))
def test_resuming_with_a_changed_setting_is_refused_naming_it(key, tmp_path):
  run = make_run(make_config(), tmp_path)
  saved = config_utils.to_dict(run.config)
  *parents, leaf = key.split(".")
  node = saved
  for part in parents:
    node = node.setdefault(part, {})
  node[leaf] = SAVED_VALUES[key]
  with pytest.raises(train.TrainingError) as err:
    train.check_resume_compatible({**meta_of(run.config), "config": saved}, run)
  message = str(err.value)
  now = train._get(config_utils.to_dict(run.config), key)   # pylint: disable=protected-access
  assert f"{key}: checkpoint {SAVED_VALUES[key]!r}, now {now!r}" in message
  assert message.count("\n  ") == 1   # that setting only
  assert repr(str(tmp_path)) in message and "/runs/a/checkpoints/7" in message
  assert "another --output_dir" in message


def test_a_changed_volume_shape_batch_or_process_count_is_refused_naming_each(tmp_path):
  run = make_run(make_config(), tmp_path)
  other = {**SPEC.to_dict(), "preprocess": {**SPEC.preprocess.to_dict(), "shape": [8, 8, 4]}}
  meta = meta_of(run.config, dataset=other, global_batch=8, process_count=2)
  with pytest.raises(train.TrainingError) as err:
    train.check_resume_compatible(meta, run)
  message = str(err.value)
  assert "volume shape: checkpoint (8, 8, 4), dataset now (8, 8, 8)" in message
  assert f"global_batch: checkpoint 8, now {GLOBAL_BATCH}" in message
  assert f"process_count: checkpoint 2, now {jax.process_count()}" in message


def test_settings_outside_the_state_and_the_data_order_may_change(tmp_path):
  run = make_run(make_config(), tmp_path)
  saved = make_config(**{"train.lr": 0.5, "train.epochs": 99, "train.log_every_steps": 3})
  train.check_resume_compatible(meta_of(saved), run)


def test_a_setting_missing_from_an_older_checkpoint_reads_as_none(tmp_path):
  """A key the saved config lacks differs from any value it has now (and a dotted path through
  a plain value is missing, not an error)."""
  run = make_run(make_config(), tmp_path)
  saved = config_utils.to_dict(run.config)
  del saved["text"]["pooling"]
  saved["model"] = "resnet50"
  with pytest.raises(train.TrainingError) as err:
    train.check_resume_compatible({**meta_of(run.config), "config": saved}, run)
  assert "text.pooling: checkpoint None, now 'cls'" in str(err.value)
  assert "model.backbone: checkpoint None, now 'resnet50'" in str(err.value)

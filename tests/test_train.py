"""Training: the optimizer, the train state's freezing, sharded step equivalence, gradient
accumulation, and the loop's stops.

Equivalence tolerance (one step of the tiny model, same global batch of 8 studies and key):
- loss and logged metrics: rtol 1e-5;
- gradients: rtol 1e-4 with atol 1e-4 x the leaf's largest |g| (float32 reductions run in
  another order); biases that feed a BatchNorm (below) have a true gradient of 0: there both
  sides must be float noise (|g| < 1e-5);
- updated params: AdamW's first update is lr * g / (|g| + eps), about lr * sign(g), so where a
  gradient is at the float-noise level the two runs may move by +-lr. Params whose gradient is
  clearly non-zero (|g| > 1e-3 x the leaf's largest) match to rtol 1e-5 / atol 1e-6; every
  param, including biases that feed a BatchNorm (MONAI shortcut B, `downsample_conv/bias`,
  true gradient 0), is within 2 lr; frozen params match exactly;
- BatchNorm statistics: rtol 1e-4 / atol 1e-6.
"""

import functools
import os
import re
import signal
import threading
import time

import jax
import numpy as np
import optax
import pytest

from medfinder_jax import checkpoint
from medfinder_jax import convert_weights
from medfinder_jax import errors
from medfinder_jax import input_pipeline as ip
from medfinder_jax import loading
from medfinder_jax import logging as logging_lib
from medfinder_jax import sharding
from medfinder_jax import stopping
from medfinder_jax import train
from medfinder_jax import train_step

BN_FED_BIAS = r"downsample_conv/bias$"


def _tree_paths(tree):
  return {sharding.path_string(p): leaf for p, leaf in jax.tree_util.tree_leaves_with_path(tree)}


# --- Optimizer ------------------------------------------------------------------------------------

def test_learning_rate_warms_up_linearly_then_decays_to_zero_by_cosine(tiny_config):
  config = tiny_config(**{"train.lr": 1e-3, "train.warmup_steps": 10})
  schedule = train_step.learning_rate_schedule(config.train, 110)
  assert float(schedule(0)) == 0.0
  assert float(schedule(5)) == pytest.approx(5e-4)
  assert float(schedule(10)) == pytest.approx(1e-3)
  assert float(schedule(60)) == pytest.approx(5e-4, rel=1e-4)   # half way down the cosine
  assert float(schedule(110)) == pytest.approx(0.0, abs=1e-9)
  no_warmup = train_step.learning_rate_schedule(tiny_config(**{"train.lr": 1e-3}).train, 100)
  assert float(no_warmup(0)) == pytest.approx(1e-3) and float(no_warmup(50)) == pytest.approx(5e-4)


def test_weight_decay_spares_loss_scalars_biases_and_norm_scales(tiny_config):
  config = tiny_config(**{"train.lr": 0.1, "train.weight_decay": 0.5})
  tx = train_step.make_optimizer(config.train, total_steps=1000)
  params = {"image_encoder": {"conv": {"kernel": np.ones((3, 4), np.float32),
                                       "bias": np.ones((4,), np.float32)},
                              "norm": {"scale": np.ones((4,), np.float32)}},
            "logit_scale": np.float32(2.0)}
  zeros = jax.tree.map(np.zeros_like, params)
  updates, _ = tx.update(zeros, tx.init(params), params)    # zero gradient: only decay moves
  new = optax.apply_updates(params, updates)
  np.testing.assert_allclose(new["image_encoder"]["conv"]["kernel"], 1 - 0.1 * 0.5, rtol=1e-6)
  np.testing.assert_array_equal(new["image_encoder"]["conv"]["bias"], 1.0)
  np.testing.assert_array_equal(new["image_encoder"]["norm"]["scale"], 1.0)
  np.testing.assert_array_equal(new["logit_scale"], 2.0)


@pytest.mark.parametrize("text_trainable, learn_temperature, frozen", [
    (False, True, {"text_encoder"}),
    (True, True, set()),
    (False, False, {"text_encoder", "logit_scale"})])
def test_the_config_decides_what_is_frozen(tiny_config, text_trainable, learn_temperature,
                                          frozen):
  config = tiny_config(**{"text.trainable": text_trainable,
                          "loss.learn_temperature": learn_temperature})
  params = {"image_encoder": 1, "text_encoder": 2, "logit_scale": 3, "fusion": 4}
  trainable, held = train_step.split_params(params, train_step.frozen_keys(config))
  assert set(held) == frozen and set(trainable) == set(params) - frozen


# --- One train step on different meshes -----------------------------------------------------------

@pytest.fixture(scope="module")
def parts(tiny_dataset):
  """Tiny config, model, pretrained MiniLM params, dataset spec and one host batch of 8."""
  from conftest import make_tiny_config  # pylint: disable=import-outside-toplevel
  config = make_tiny_config(**{"train.lr": 1e-3})
  tokenizer, _ = loading.text_tower(config.text)
  bert_config, text_params = convert_weights.load_hf_bert(tokenizer.folder)
  model = loading.build_model(config, bert_config)
  builder, spec = ip.open_dataset(tiny_dataset)
  batch = next(iter(ip.train_batches(builder, "train", 8, tokenizer, seed=0, shuffle_buffer=8,
                                     process_index=0, process_count=1)))
  return config, model, text_params, spec, batch


def make_state(parts, mesh, config, rules=None):
  _, model, text_params, spec, _ = parts
  tx = train_step.make_optimizer(config.train, total_steps=100)
  rules = rules or sharding.PartitionRules(min_size=2**10)   # fsdp shards even tiny kernels
  return train_step.create_train_state(model, tx, config, spec.shape, jax.random.key(1), mesh,
                                       rules, text_params)


def one_step(parts, devices, data, fsdp, accum=1, **overrides):
  """(state before, gradients, state after, metrics, param specs) of one step over a global
  batch of 8 studies on `devices` devices (data x fsdp)."""
  config, _, _, spec, batch = parts
  config = config.copy_and_resolve_references()
  mesh = sharding.make_mesh({"data": data, "fsdp": fsdp}, jax.devices()[:devices])
  config.train.batch_size_per_device = 8 // devices // accum
  config.train.grad_accum_steps = accum
  for key, value in overrides.items():
    config.loss[key] = value
  state = make_state(parts, mesh, config)
  before = jax.device_get(state)
  global_batch = sharding.make_global_batch(batch, mesh)
  key = sharding.replicate(jax.random.key_data(jax.random.key(7)), mesh)
  grads, _, _ = jax.jit(functools.partial(train_step.gradients, config=config,
                                          model_input=spec.intensity, mesh=mesh))(
      state, global_batch, train_step.step_key(key, 0))
  step = train_step.make_train_step(config, spec.intensity, mesh,
                                    jax.tree.map(lambda x: x.sharding, state))
  after, metrics = step(state, global_batch, key)
  specs = {path: leaf.sharding.spec for path, leaf in _tree_paths(after.trainable).items()}
  return before, _tree_paths(jax.device_get(grads)), jax.device_get(after), \
      jax.device_get(metrics), specs


@pytest.fixture(scope="module")
def single_device_step(parts):
  return one_step(parts, devices=1, data=1, fsdp=1)


def assert_gradients_match(grads, expected):
  """Gradients (path -> array) equal the expected ones, to the module's tolerance."""
  assert set(grads) == set(expected)
  for path, value in expected.items():
    if re.search(BN_FED_BIAS, path):   # true gradient 0: float noise on both sides
      assert np.max(np.abs(grads[path])) < 1e-5 and np.max(np.abs(value)) < 1e-5, path
      continue
    scale = float(np.max(np.abs(value))) or 1.0
    np.testing.assert_allclose(grads[path], value, rtol=1e-4, atol=1e-4 * scale, err_msg=path)


@pytest.mark.slow
@pytest.mark.parametrize("data, fsdp", [(8, 1), (2, 4)])
def test_one_step_on_8_devices_matches_1_device(parts, single_device_step, data, fsdp):
  _, ref_grads, ref, ref_metrics, _ = single_device_step
  _, grads, got, metrics, specs = one_step(parts, devices=8, data=data, fsdp=fsdp)
  if fsdp > 1:
    assert any("fsdp" in str(spec) for spec in specs.values())
  for name in ("loss", "contrastive", "mse", "grad_norm"):
    np.testing.assert_allclose(metrics[name], ref_metrics[name], rtol=1e-5, err_msg=name)
  assert_gradients_match(grads, ref_grads)
  lr = float(ref_metrics["lr"])
  got_params, ref_params = _tree_paths(got.params), _tree_paths(ref.params)
  for path, value in ref_params.items():
    clear = np.ones(value.shape, bool)   # frozen leaves (no gradient) must match everywhere
    if path in ref_grads:
      clear = np.abs(ref_grads[path]) > 1e-3 * np.max(np.abs(ref_grads[path]))
      if re.search(BN_FED_BIAS, path):
        clear[...] = False
    np.testing.assert_allclose(got_params[path][clear], value[clear], rtol=1e-5, atol=1e-6,
                               err_msg=path)
    assert np.all(np.abs(got_params[path] - value) <= 2 * lr + 1e-6), path
  for (path, a), b in zip(_tree_paths(got.batch_stats).items(), jax.tree.leaves(ref.batch_stats)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6, err_msg=path)
  assert int(got.step) == int(ref.step) == 1


def test_a_step_moves_the_trainable_params_and_never_the_frozen_ones(single_device_step):
  before, grads, after, metrics, _ = single_device_step
  assert set(after.frozen) == {"text_encoder"}
  assert not any(path.startswith("text_encoder") for path in grads)
  for a, b in zip(jax.tree.leaves(after.frozen), jax.tree.leaves(before.frozen)):
    np.testing.assert_array_equal(a, b)
  assert not any("text_encoder" in path for path in _tree_paths(after.opt_state))
  assert not np.allclose(after.params["image_projection"]["kernel"],
                         before.params["image_projection"]["kernel"])
  assert after.params["logit_scale"] != before.params["logit_scale"]
  assert np.isfinite(metrics["loss"]) and metrics["lr"] == pytest.approx(1e-3)


@pytest.mark.slow
def test_a_fixed_temperature_stays_at_its_initial_value(parts):
  before, grads, after, _, _ = one_step(parts, devices=1, data=1, fsdp=1,
                                        learn_temperature=False)
  assert "logit_scale" in after.frozen and "logit_scale" not in grads
  assert float(after.params["logit_scale"]) == float(before.params["logit_scale"]) == \
      pytest.approx(np.log(1 / 0.07))


@pytest.mark.slow
def test_accumulated_gradient_is_the_mean_over_micro_batches(parts):
  """accum=2 equals the mean of the two micro-batch gradients computed separately with the
  step's own loss (micro-batch a = rows a, a+2, a+4, ...), and BatchNorm statistics flow from
  the first micro-batch into the second."""
  config, _, _, spec, batch = parts
  _, grads, after, _, _ = one_step(parts, devices=2, data=2, fsdp=1, accum=2)
  config = config.copy_and_resolve_references()
  config.train.batch_size_per_device, config.train.grad_accum_steps = 2, 2
  mesh = sharding.make_mesh({"data": 2, "fsdp": 1}, jax.devices()[:2])
  state = make_state(parts, mesh, config)
  step_key = train_step.step_key(jax.random.key(7), 0)
  loss = functools.partial(train_step.micro_batch_loss, config=config,
                           model_input=spec.intensity, num_blocks=2)
  grad_fn = jax.jit(jax.grad(loss, has_aux=True))
  micro_grads = []
  for a in range(2):
    micro = sharding.make_global_batch(jax.tree.map(lambda x, a=a: x[a::2], batch), mesh)
    grad, (_, stats) = grad_fn(state.trainable, state, micro, jax.random.fold_in(step_key, a),
                               a * 4)
    state = state.replace(batch_stats=stats)
    micro_grads.append(grad)
  expected = _tree_paths(jax.tree.map(lambda g0, g1: (g0 + g1) / 2, *micro_grads))
  assert_gradients_match(grads, jax.device_get(expected))
  for a, b in zip(jax.tree.leaves(after.batch_stats), jax.tree.leaves(state.batch_stats)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


# --- What each step draws ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def draws(parts):
  """run(state, steps) -> (state after, [(the two augmented views, the dropout key) of each
  step]) of the jitted train step (compiled once), recorded from inside it: the dropout masks
  are a function of that key alone. `run.mesh` and `run.uninterrupted` (two steps from a fresh
  state: (state after the first, the draws of both)) come with it."""
  config, model, _, spec, batch = parts
  mesh = sharding.make_mesh({"data": 1, "fsdp": 1}, jax.devices()[:1])
  seen = {"views": [], "dropout": []}
  two_views = train_step.augment.two_views

  def recording_views(*args, **kwargs):
    views = two_views(*args, **kwargs)
    jax.debug.callback(lambda a, b: seen["views"].append((np.asarray(a), np.asarray(b))), *views)
    return views

  def recording_apply(variables, *args, rngs, **kwargs):
    jax.debug.callback(lambda k: seen["dropout"].append(np.asarray(k)),
                       jax.random.key_data(rngs["dropout"]))
    return model.apply(variables, *args, rngs=rngs, **kwargs)

  step = jax.jit(functools.partial(train_step.train_step, config=config,
                                   model_input=spec.intensity, mesh=mesh))
  global_batch = sharding.make_global_batch(batch, mesh)
  base_key = sharding.replicate(jax.random.key_data(jax.random.key(7)), mesh)

  def run(state, steps):
    seen["views"].clear()
    seen["dropout"].clear()
    state = state.replace(apply_fn=recording_apply)
    with pytest.MonkeyPatch.context() as patch:   # seen by the trace: the first call
      patch.setattr(train_step.augment, "two_views", recording_views)
      for _ in range(steps):
        state, _ = step(state, global_batch, base_key)
      jax.effects_barrier()
    assert len(seen["views"]) == len(seen["dropout"]) == steps
    return state.replace(apply_fn=model.apply), list(zip(seen["views"], seen["dropout"]))

  run.mesh = mesh
  after_one, first = run(make_state(parts, mesh, config), 1)
  _, second = run(after_one, 1)
  run.uninterrupted = (after_one, first + second)
  return run


def assert_same_draw(a, b):
  (a_views, a_key), (b_views, b_key) = a, b
  for x, y in zip(a_views, b_views):
    np.testing.assert_array_equal(x, y)
  np.testing.assert_array_equal(a_key, b_key)


def test_consecutive_steps_draw_new_augmentations_and_dropout_masks(draws):
  """Over the same batch, step 1 must not replay step 0's views or dropout: a run that drew
  the same ones every step would see each study under one augmentation only."""
  (views0, key0), (views1, key1) = draws.uninterrupted[1]
  for v0, v1 in zip(views0, views1):
    assert np.abs(v0 - v1).max() > 1e-3
  assert not np.array_equal(key0, key1)
  assert np.abs(views0[0] - views0[1]).max() > 1e-3   # and the two views of a step differ


def test_a_resumed_step_draws_what_the_uninterrupted_run_drew(parts, draws):
  """A resumed run holds the restored params and step count and the run's base key (train.py
  restores both): its step 1 sees step 1's views and dropout, whatever the params."""
  after_one, uninterrupted = draws.uninterrupted
  _, resumed = draws(after_one, 1)
  assert_same_draw(resumed[0], uninterrupted[1])
  fresh = make_state(parts, draws.mesh, parts[0])
  _, counted = draws(fresh.replace(step=jax.numpy.ones((), jax.numpy.int32)), 1)
  assert_same_draw(counted[0], uninterrupted[1])


# --- The loop -------------------------------------------------------------------------------------

def loop_config(tiny_config, tiny_dataset, tmp_path, **overrides):
  return tiny_config(**{"data.tfrecord_dir": tiny_dataset, "output_dir": str(tmp_path / "run"),
                        "train.log_every_steps": 1, "train.eval_every_steps": 1000,
                        **overrides})


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(
    tiny_config, tiny_dataset, tmp_path):
  """lr 1e30: step 1 is finite but its update blows the weights up, so step 2's loss is NaN."""
  config = loop_config(tiny_config, tiny_dataset, tmp_path, **{
      "train.lr": 1e30, "train.checkpoint_every_steps": 1, "train.max_steps": 6})
  with pytest.raises(train.Diverged, match=r"at step 2; stopped, the last good checkpoint is "
                                           r"step 1") as err:
    train.train_and_evaluate(config)
  assert err.value.step == 2 and err.value.last_checkpoint == 1
  assert os.listdir(checkpoint.checkpoint_dir(config.output_dir)) == ["1"]
  records = logging_lib.read_metrics(os.path.join(config.output_dir, "metrics.jsonl"))
  assert [r["step"] for r in records] == [1] and np.isfinite(records[0]["loss"])


def test_sigterm_saves_a_checkpoint_and_returns_cleanly(tiny_config, tiny_dataset, tmp_path):
  config = loop_config(tiny_config, tiny_dataset, tmp_path, **{"train.max_steps": 10_000})
  metrics_file = os.path.join(config.output_dir, "metrics.jsonl")

  def terminate_after_first_steps():
    deadline = time.time() + 300
    while time.time() < deadline:
      if os.path.exists(metrics_file) and len(logging_lib.read_metrics(metrics_file)) >= 2:
        os.kill(os.getpid(), signal.SIGTERM)
        return
      time.sleep(0.05)

  killer = threading.Thread(target=terminate_after_first_steps, daemon=True)
  killer.start()
  summary = train.train_and_evaluate(config)
  killer.join()
  assert summary["stopped"] == "SIGTERM"
  assert 2 <= summary["step"] < 10_000
  meta = checkpoint.read_meta(config.output_dir, step=summary["step"])
  assert meta["step"] == summary["step"] == meta["batches_consumed"]
  assert summary["last_checkpoint"] == meta["checkpoint_path"]
  assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL   # handler restored


def test_time_budget_stops_training_with_a_checkpoint(tiny_config, tiny_dataset, tmp_path):
  config = loop_config(tiny_config, tiny_dataset, tmp_path,
                       **{"train.max_steps": 10_000, "train.max_minutes": 1e-9})
  summary = train.train_and_evaluate(config)
  assert summary["stopped"] == "time budget"
  assert 1 <= summary["step"] < 10_000
  assert checkpoint.read_meta(config.output_dir, step=summary["step"])["step"] == summary["step"]


def test_raw_corpus_as_data_root_is_an_error_with_the_convert_command(tiny_config, tmp_path):
  (tmp_path / "meta").mkdir()
  config = tiny_config(**{"data.data_root": str(tmp_path), "data.tfrecord_dir": ""})
  with pytest.raises(errors.UserError, match=r"launch.py convert --data_root .* --output_dir"):
    train.train_and_evaluate(config)


def test_empty_text_model_path_says_what_to_pass(tiny_config, tiny_dataset):
  config = tiny_config(**{"data.tfrecord_dir": tiny_dataset, "text.model_path": ""})
  with pytest.raises(errors.UserError, match="BioBERT.*minilm"):
    train.setup_run(config)


def test_batch_larger_than_the_train_split_is_a_clear_error(tiny_config, tiny_dataset):
  config = tiny_config(**{"data.tfrecord_dir": tiny_dataset, "train.batch_size_per_device": 4})
  with pytest.raises(train.TrainingError, match="28 studies, fewer than one global batch of 32"):
    train.setup_run(config)


@pytest.mark.slow
def test_loss_falls_and_recall_rises_above_chance(tiny_config, tmp_path_factory, tmp_path):
  """60 phantom studies at 32x32x16 (train 42), 100 steps of batch 8 at lr 1e-3 (~1-2 min).
  Recall is measured in the loop on the training studies (train.val_split = "train"): the
  question is whether the model learns the pairing at all, not whether 6 val studies generalize.
  Measured: mean rank t2i 21 -> ~12, i2t -> ~9 (chance 21.5), t2i R@10 19% -> ~55% (chance 24%).
  """
  from conftest import convert_phantom  # pylint: disable=import-outside-toplevel
  dataset = convert_phantom(str(tmp_path_factory.mktemp("learn")), 60, (32, 32, 16))
  config = tiny_config(**{"data.tfrecord_dir": dataset, "data.shape": (32, 32, 16),
                          "output_dir": str(tmp_path / "run"), "train.lr": 1e-3,
                          "train.epochs": 20, "train.val_split": "train",
                          "train.log_every_steps": 10, "train.eval_every_steps": 100})
  summary = train.train_and_evaluate(config)
  records = logging_lib.read_metrics(os.path.join(config.output_dir, "metrics.jsonl"))
  losses = [r["loss"] for r in records if "loss" in r]
  assert summary["step"] == 100 and len(losses) >= 10
  assert np.mean(losses[-3:]) < losses[0] - 0.2
  val = summary["val_metrics"]
  chance_mean_rank = (val["n"] + 1) / 2
  assert val["n"] == 42
  assert val["t2i"]["MnR"] < 0.8 * chance_mean_rank and val["i2t"]["MnR"] < 0.8 * chance_mean_rank
  assert val["t2i"]["R@10"] > 100 * 10 / 42 + 10


@pytest.mark.slow
def test_resume_skips_a_damaged_latest_step_and_says_which_and_why(tiny_config, tiny_dataset,
                                                                  tmp_path, capsys):
  from test_checkpoint import truncate_largest_array_file  # pylint: disable=import-outside-toplevel
  config = loop_config(tiny_config, tiny_dataset, tmp_path, **{
      "train.checkpoint_every_steps": 1, "train.max_steps": 2})
  train.train_and_evaluate(config)
  directory = checkpoint.checkpoint_dir(config.output_dir)
  truncate_largest_array_file(os.path.join(directory, "2"))
  config.train.max_steps = 3
  capsys.readouterr()
  summary = train.train_and_evaluate(config)
  out = capsys.readouterr().out
  assert "skipping damaged checkpoint step 2" in out and "cannot read variables" in out
  assert "resuming from step 1" in out
  assert summary["step"] == 3 and os.path.isdir(os.path.join(directory, "2.damaged"))
  assert checkpoint.read_meta(config.output_dir)["step"] == 3


# --- What a step changes besides the parameters (mutation testing) ---------------------------------

def test_a_step_runs_the_model_in_training_mode_and_keeps_its_batchnorm_statistics(
    single_device_step):
  """Every BatchNorm statistic moves toward the batch's after one step: the step runs the model
  in training mode (dropout on, batch statistics) and keeps the statistics it updated, which
  evaluation then normalizes with. A step in inference mode, or one that dropped the update,
  would leave them at their initial values (mean 0, variance 1) for ever."""
  before, _, after, _, _ = single_device_step
  stats_before, stats_after = (_tree_paths(s.batch_stats) for s in (before, after))
  assert stats_before and set(stats_after) == set(stats_before)
  for path, value in stats_before.items():
    assert not np.allclose(stats_after[path], value), path

"""The train step (medfinder_jax/train_step.py) on a stand-in model that compiles in seconds.

The stand-in has the real model's contract (models/medfinder.py): the same training call, the
top-level parameter keys the trainer splits by ("image_encoder", "text_encoder",
"logit_scale"), BatchNorm statistics, dropout, and the output dict losses.total_loss reads. It
reports what it sees in training (the views and its dropout mask, per micro-batch) to `SEEN`.
What the step does is checked against references written here: optax's warmup-cosine formula,
a hand optax.adamw update, jax.grad of the documented micro-batch loss over numpy-sliced
micro-batches. tests/test_train.py runs the same step on the real tiny MedFinder.
"""

import functools
import types
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from data_prep import schema
from medfinder_jax import augment
from medfinder_jax import losses
from medfinder_jax import sharding
from medfinder_jax import train_step

SHAPE = (8, 8, 8)      # stored volume X, Y, Z
TOKENS = 6             # text.max_tokens
VOCAB = 16
ROWS = 4               # global batch
SPEC = schema.DatasetSpec("", schema.PreprocessParams(shape=SHAPE, spacing=()))   # uint8
SEEN = []              # what the stand-in saw in training: (input_ids, view_a, view_b, dropped)


# --- The stand-in model ---------------------------------------------------------------------------

class StandInImageTower(nn.Module):
  """Pooled voxels -> Dense -> BatchNorm -> Dropout -> Dense. Returns (embedding, the dropout
  mask applied). No Dense biases: neither has a gradient (BatchNorm follows the first; the
  released loss is blind to a shift of every image embedding), and AdamW would turn their
  float-noise gradients into lr-sized steps of either sign."""
  embed_dim: int
  batch_norm: bool = True

  @nn.compact
  def __call__(self, volume, train):
    pooled = volume.reshape(volume.shape[0], 8, -1).mean(-1)
    hidden = nn.Dense(8, use_bias=False)(pooled)
    if self.batch_norm:
      hidden = nn.BatchNorm(use_running_average=not train, momentum=0.5)(hidden)
    dropped = nn.Dropout(0.5, deterministic=not train)(hidden)
    return nn.Dense(self.embed_dim, use_bias=False)(dropped), (dropped == 0) & (hidden != 0)


class StandIn(nn.Module):
  """MedFinder's training call and output on a few dozen parameters: text = masked mean of
  token embeddings; image_a / image_b = the tower on each view (one pass, BatchNorm over both);
  image = their mean (the fused embedding's place)."""
  logit_scale_init: float
  embed_dim: int = 4
  batch_norm: bool = True   # False: no "batch_stats" collection (as the ViT tower)

  @nn.compact
  def __call__(self, view_a, view_b, input_ids, attention_mask, train=True):
    tokens = nn.Embed(VOCAB, self.embed_dim, name="text_encoder")(input_ids)
    mask = attention_mask[..., None].astype(jnp.float32)
    out = {"text": (tokens * mask).sum(1) / jnp.maximum(mask.sum(1), 1.0),
           "logit_scale": self.param("logit_scale", nn.initializers.constant(
               self.logit_scale_init), (), jnp.float32)}
    tower = StandInImageTower(self.embed_dim, self.batch_norm, name="image_encoder")
    if view_b is None:
      out["image_a"], dropped = tower(view_a, train)
      out["image"] = out["image_a"]
    else:
      both, dropped = tower(jnp.concatenate([view_a, view_b]), train)
      out["image_a"], out["image_b"] = jnp.split(both, 2)
      out["image"] = 0.5 * (out["image_a"] + out["image_b"])
    if train:
      jax.debug.callback(_record, input_ids, view_a,
                         view_a if view_b is None else view_b, dropped, view_b is None)
    return out


def _record(input_ids, view_a, view_b, dropped, one_view):
  SEEN.append((np.asarray(input_ids), np.asarray(view_a),
               None if one_view else np.asarray(view_b), np.asarray(dropped)))


def seen_by_micro_batch():
  """SEEN since the last call, as {first row's input_ids: (view_a, view_b, dropped)}."""
  jax.effects_barrier()
  seen = {ids[0].tobytes(): rest for ids, *rest in SEEN}
  SEEN.clear()
  return seen


def make_config(**overrides):
  """The tiny config with the stand-in's text length, 2 micro-batches of one row per device."""
  from conftest import make_tiny_config  # pylint: disable=import-outside-toplevel
  settings = {"train.lr": 1e-2, "train.weight_decay": 0.1, "text.max_tokens": TOKENS,
              "train.batch_size_per_device": 1, "train.grad_accum_steps": 2}
  return make_tiny_config(**{**settings, **overrides})


def make_model(config):
  """The stand-in with the loss's initial logit_scale (released, which has none, reads no
  scalar: the stand-in keeps one at log(1 / temperature) as a frozen parameter to check)."""
  scalars = losses.learnable_scalars(config.loss)
  return StandIn(scalars.get("logit_scale", math.log(1 / config.loss.temperature_init)))


def make_mesh(data=2, fsdp=1, spatial=1):
  return sharding.make_mesh({"data": data, "fsdp": fsdp, "spatial": spatial},
                            jax.devices()[:data * fsdp * spatial])


RULES = sharding.PartitionRules(min_size=1)   # fsdp shards every kernel it can
TOTAL_STEPS = 10


def host_batch(rows=ROWS, seed=0):
  rng = np.random.default_rng(seed)
  mask = np.ones((rows, TOKENS), np.int32)
  mask[:, TOKENS // 2 + 1:] = rng.integers(0, 2, (rows, TOKENS // 2 - 1))
  ids = rng.permutation(VOCAB - 1)[np.arange(rows) % (VOCAB - 1)] + 1  # distinct: they name rows
  return {"volume": rng.integers(0, 256, (rows, *SHAPE), dtype=np.uint8),
          "input_ids": np.concatenate([ids[:, None], rng.integers(1, VOCAB, (rows, TOKENS - 1))],
                                      axis=1).astype(np.int32),
          "attention_mask": mask}


def base_key(mesh, seed=7):
  return sharding.replicate(jax.random.key_data(jax.random.key(seed)), mesh)


def tree_paths(tree):
  return {sharding.path_string(p): leaf for p, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def assert_trees_close(got, expected, rtol=1e-5, atol=1e-6):
  got, expected = tree_paths(jax.device_get(got)), tree_paths(jax.device_get(expected))
  assert set(got) == set(expected)
  for path, value in expected.items():
    np.testing.assert_allclose(got[path], value, rtol=rtol, atol=atol, err_msg=path)


def shardings_of(tree):
  return jax.tree.map(lambda x: x.sharding, tree)


# --- Optimizer ------------------------------------------------------------------------------------

def warmup_cosine(step, lr, warmup, total):
  """optax's warmup-cosine schedule written out: linear 0 -> lr over `warmup` steps, then
  0.5 lr (1 + cos(pi t / T)) over the T = total - warmup steps after it, 0 beyond."""
  if step < warmup:
    return lr * step / warmup
  t = min(step - warmup, total - warmup)
  return 0.5 * lr * (1 + math.cos(math.pi * t / (total - warmup)))


@pytest.mark.parametrize("warmup, total", [(3, 11), (0, 10), (1, 4)])
def test_learning_rate_warms_up_linearly_then_decays_to_zero_by_cosine(warmup, total):
  config = make_config(**{"train.lr": 0.3, "train.warmup_steps": warmup})
  schedule = train_step.learning_rate_schedule(config.train, total)
  for step in range(total + 3):
    assert float(schedule(step)) == pytest.approx(warmup_cosine(step, 0.3, warmup, total),
                                                  rel=1e-5, abs=1e-7), step


@pytest.mark.parametrize("warmup, total, peak_step", [(0, 0, 0), (0, 1, 0), (4, 2, 4)])
def test_a_run_no_longer_than_its_warmup_still_peaks_then_ends_at_zero(warmup, total,
                                                                        peak_step):
  """Too few steps for the schedule (total 0 or 1, or not past the warmup): the learning rate
  still reaches train.lr (after the warmup) and is 0 one step later; no division by zero."""
  config = make_config(**{"train.lr": 0.3, "train.warmup_steps": warmup})
  schedule = train_step.learning_rate_schedule(config.train, total)
  assert float(schedule(peak_step)) == pytest.approx(0.3)
  assert float(schedule(peak_step + 1)) == pytest.approx(0.0, abs=1e-7)


def test_weight_decay_applies_to_kernels_and_embeddings_only():
  """Zero gradients: only the decay moves a parameter, and only one of ndim >= 2."""
  config = make_config(**{"train.lr": 0.1, "train.weight_decay": 0.5})
  tx = train_step.make_optimizer(config.train, total_steps=1000)
  params = {"kernel": np.ones((3, 4), np.float32), "embedding": np.ones((2, 3, 2), np.float32),
            "bias": np.ones((4,), np.float32), "logit_scale": np.float32(2.0)}
  updates, _ = jax.jit(tx.update)(jax.tree.map(np.zeros_like, params), tx.init(params), params)
  new = optax.apply_updates(params, updates)
  np.testing.assert_allclose(new["kernel"], 1 - 0.1 * 0.5, rtol=1e-6)
  np.testing.assert_allclose(new["embedding"], 1 - 0.1 * 0.5, rtol=1e-6)
  np.testing.assert_array_equal(new["bias"], 1.0)
  np.testing.assert_array_equal(new["logit_scale"], 2.0)




# --- The runs the tests read ----------------------------------------------------------------------

def documented_micro_batch_loss(trainable, frozen, batch_stats, batch, key, first_index, *,
                                config, model, num_blocks):
  """One micro-batch's (loss, (metrics, batch_stats)) composed here as the step documents it:
  the stored uint8 voxels / 255 as model input, the views from fold_in(key, 0) (augment's two
  views, or one view at augment.prob), dropout from fold_in(key, 1), the model in training mode
  updating its BatchNorm statistics, losses.total_loss."""
  volume = jnp.asarray(batch["volume"], jnp.float32)[..., None] / 255.0
  view_key = jax.random.fold_in(key, 0)
  if config.augment.two_views:
    views = augment.two_views(view_key, volume, config.augment, first_index=first_index)
  else:
    views = (augment.augment_batch(view_key, volume, config.augment, config.augment.prob, 0,
                                   first_index), None)
  out, updates = model.apply({"params": {**trainable, **frozen}, "batch_stats": batch_stats},
                             *views, batch["input_ids"], batch["attention_mask"], train=True,
                             rngs={"dropout": jax.random.fold_in(key, 1)},
                             mutable=["batch_stats"])
  loss, metrics = losses.total_loss(out, config.loss, num_blocks=num_blocks)
  return loss, (metrics, updates["batch_stats"])


def hand_adamw(config):
  """optax.adamw with the warmup-cosine schedule and the ndim >= 2 decay mask, built here."""
  return optax.adamw(train_step.learning_rate_schedule(config.train, TOTAL_STEPS),
                     weight_decay=float(config.train.weight_decay),
                     mask=lambda params: jax.tree.map(lambda x: x.ndim >= 2, params))


def reference_steps(run, steps):
  """`steps` optimizer steps over run.batch computed independently on one device: step s uses
  key fold_in(key(7), s), micro-batch a = numpy rows a, a + A, ... with key fold_in(step key, a)
  and first study index a * rows, BatchNorm statistics passed on by hand, the gradient averaged,
  a hand AdamW update. -> per step {"trainable", "batch_stats", "grads", "loss", "seen"}."""
  config, fresh = run.config, run.fresh
  accum = int(config.train.grad_accum_steps)
  grad_fn = jax.jit(jax.grad(functools.partial(
      documented_micro_batch_loss, config=config, model=run.model,
      num_blocks=sharding.num_batch_shards(run.mesh)), has_aux=True))
  tx = hand_adamw(config)
  params, stats, opt_state = fresh.trainable, fresh.batch_stats, tx.init(fresh.trainable)
  results = []
  for s in range(steps):
    key = jax.random.fold_in(jax.random.key(7), s)
    grads, micro_losses, micro_contrastive = [], [], []
    for a in range(accum):
      micro = jax.tree.map(lambda x, a=a: x[a::accum], run.batch)
      grad, (metrics, stats) = grad_fn(params, fresh.frozen, stats, micro,
                                       jax.random.fold_in(key, a), a * (ROWS // accum))
      grads.append(grad)
      micro_losses.append(float(metrics["loss"]))
      micro_contrastive.append(float(metrics["contrastive"]))
    grads = jax.tree.map(lambda *g: sum(g) / accum, *grads)
    updates, opt_state = jax.jit(tx.update)(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    results.append({"trainable": params, "batch_stats": stats, "grads": grads,
                    "loss": np.mean(micro_losses), "contrastive": np.mean(micro_contrastive),
                    "seen": seen_by_micro_batch()})
  return results


def start_run(config, mesh, text_params=None):
  """A run's parts, its fresh state (on the device and as host arrays) and its jitted step."""
  model, tx = make_model(config), train_step.make_optimizer(config.train, TOTAL_STEPS)
  state = train_step.create_train_state(model, tx, config, SHAPE, jax.random.key(1), mesh,
                                        RULES, text_params)
  run = types.SimpleNamespace(config=config, mesh=mesh, model=model, tx=tx, batch=host_batch(),
                              key=base_key(mesh), shardings=shardings_of(state),
                              fresh=jax.device_get(state))
  run.step = train_step.make_train_step(config, SPEC.intensity, mesh, run.shardings)
  return run, state


def take_steps(run, state, steps):
  """-> (state after, [(host state, host metrics, what the model saw) of each step])."""
  seen_by_micro_batch()
  taken = []
  for _ in range(steps):
    state, metrics = run.step(state, sharding.make_global_batch(run.batch, run.mesh), run.key)
    taken.append((jax.device_get(state), jax.device_get(metrics), seen_by_micro_batch()))
  return state, metrics, taken


@pytest.fixture(scope="module")
def run():
  """The default run: 2 micro-batches, two views, the temperature learnt, pretrained text
  params (frozen), on 2 devices with fsdp = 2 (kernels sharded). Two steps from the fresh
  state, then step 1 again from the restored state after step 0 (a resume)."""
  text = {"embedding": np.linspace(-1, 1, VOCAB * 4, dtype=np.float32).reshape(VOCAB, 4)}
  run, state = start_run(make_config(), make_mesh(data=1, fsdp=2), text)
  run.text, run.given = text, state
  state, metrics, run.taken = take_steps(run, state, 2)
  run.out_shardings = (shardings_of(state), shardings_of(metrics))
  restored = jax.device_put(run.taken[0][0], run.shardings)
  _, _, run.resumed = take_steps(run, restored, 1)
  run.reference = reference_steps(run, 2)
  return run


@pytest.fixture(scope="module")
def one_view_run():
  """One micro-batch (the default), one view, the released loss (contrastive within each
  device's rows: num_blocks = 2), the loss scalar frozen, 2 devices (data = 2): one step and
  its reference."""
  config = make_config(**{"train.grad_accum_steps": 1, "train.batch_size_per_device": 2,
                          "augment.two_views": False, "loss.contrastive": "released",
                          "loss.learn_temperature": False})
  run, state = start_run(config, make_mesh(data=2))
  _, _, run.taken = take_steps(run, state, 1)
  run.reference = reference_steps(run, 1)
  return run


# --- State ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("contrastive, text_trainable, learn_temperature, frozen", [
    ("clip", False, True, {"text_encoder"}),
    ("clip", True, True, set()),
    ("clip", False, False, {"text_encoder", "logit_scale", "logit_bias"}),
    ("siglip", True, False, {"logit_scale", "logit_bias"})])
def test_the_config_decides_what_is_frozen(contrastive, text_trainable, learn_temperature,
                                          frozen):
  config = make_config(**{"loss.contrastive": contrastive, "text.trainable": text_trainable,
                          "loss.learn_temperature": learn_temperature})
  assert train_step.frozen_keys(config) == frozen
  params = {"image_encoder": 1, "text_encoder": 2, "logit_scale": 3, "logit_bias": 4}
  trainable, held = train_step.split_params(params, train_step.frozen_keys(config))
  assert held == {k: v for k, v in params.items() if k in frozen}
  assert trainable == {k: v for k, v in params.items() if k not in frozen}


def check_a_fresh_state_holds_the_model_init_with_optimizer_state_for_the_trainable_only(run):
  fresh = run.fresh
  volume, tokens = jnp.zeros((1, *SHAPE, 1)), jnp.ones((1, TOKENS), jnp.int32)
  variables = jax.eval_shape(functools.partial(run.model.init, train=False),
                             jax.random.key(0), volume, volume, tokens, tokens)
  shapes = lambda tree: jax.tree.map(lambda x: (x.shape, x.dtype), tree)  # noqa: E731
  assert shapes(fresh.params) == shapes(variables["params"])
  assert shapes(fresh.batch_stats) == shapes(variables["batch_stats"])
  assert int(fresh.step) == 0 and fresh.step.dtype == np.int32
  assert set(fresh.frozen) == {"text_encoder"}
  assert set(fresh.trainable) == {"image_encoder", "logit_scale"}
  opt_paths = tree_paths(fresh.opt_state)
  assert opt_paths and not any("text_encoder" in path for path in opt_paths)
  assert float(fresh.params["logit_scale"]) == pytest.approx(math.log(1 / 0.07))
  stats = tree_paths(fresh.batch_stats)
  np.testing.assert_array_equal(stats["image_encoder/BatchNorm_0/mean"], 0.0)
  np.testing.assert_array_equal(stats["image_encoder/BatchNorm_0/var"], 1.0)


def check_pretrained_text_params_are_the_frozen_text_tower(run):
  np.testing.assert_array_equal(run.fresh.frozen["text_encoder"]["embedding"],
                                run.text["embedding"])


def test_the_state_gives_the_model_its_collections_as_init_made_them():
  """variables(): {"params": trainable + frozen, "batch_stats"}, with no "batch_stats" for a
  model without BatchNorm (what init gives it, and what checkpoints and loading expect);
  variables(other) swaps in other trainable params (what the gradient differentiates)."""
  make = lambda stats: train_step.TrainState(  # noqa: E731
      step=0, trainable={"image_encoder": 1}, frozen={"text_encoder": 2}, batch_stats=stats,
      opt_state=(), apply_fn=None, tx=None)
  assert make({"image_encoder": 3}).variables() == {
      "params": {"image_encoder": 1, "text_encoder": 2}, "batch_stats": {"image_encoder": 3}}
  assert make({}).variables() == {"params": {"image_encoder": 1, "text_encoder": 2}}
  assert make({}).variables({"image_encoder": 4}) == {
      "params": {"image_encoder": 4, "text_encoder": 2}}
  assert make({}).params == {"image_encoder": 1, "text_encoder": 2}


def test_a_model_without_batchnorm_keeps_its_empty_statistics():
  """No BatchNorm (the ViT tower): a fresh state holds empty batch_stats and a micro-batch
  returns them as they were, so the state keeps its structure step after step (traced only:
  jax.eval_shape)."""
  config = make_config(**{"train.grad_accum_steps": 1, "train.batch_size_per_device": 4})
  model = StandIn(2.0, batch_norm=False)
  volume, tokens = jnp.zeros((1, *SHAPE, 1)), jnp.ones((1, TOKENS), jnp.int32)
  variables = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0),
                             volume, volume, tokens, tokens)
  assert set(variables) == {"params"}
  trainable, frozen = train_step.split_params(variables["params"], {"text_encoder"})
  state = train_step.TrainState(step=0, trainable=trainable, frozen=frozen, batch_stats={},
                                opt_state=(), apply_fn=model.apply, tx=None)
  loss = functools.partial(train_step.micro_batch_loss, config=config,
                           model_input=SPEC.intensity, num_blocks=1)
  _, (_, stats) = jax.eval_shape(loss, trainable, state, host_batch(), jax.random.key(0), 0)
  assert stats == {}
  abstract = train_step.abstract_train_state(model, train_step.make_optimizer(config.train, 10),
                                             config, SHAPE, make_mesh(), RULES)
  assert abstract.batch_stats == {} and "batch_stats" not in abstract.variables()


def described(tree, shardings):
  """{path: (shape, dtype, sharding)} of a state's leaves."""
  return {path: (tuple(leaf.shape), np.dtype(leaf.dtype), tree_paths(shardings)[path])
          for path, leaf in tree_paths(tree).items()}


def check_the_abstract_state_is_the_created_one_without_computing_it(run):
  """Shapes, dtypes and shardings (fsdp-sharded kernels included): what a restore targets."""
  abstract = train_step.abstract_train_state(run.model, run.tx, run.config, SHAPE, run.mesh,
                                             RULES)
  assert jax.tree.structure(abstract) == jax.tree.structure(run.fresh)
  assert described(abstract, shardings_of(abstract)) == described(run.fresh, run.shardings)
  assert any("fsdp" in str(s.spec) for s in jax.tree.leaves(run.shardings.trainable))


# --- Train step -----------------------------------------------------------------------------------

def test_micro_batch_a_holds_rows_m_times_accum_plus_a_with_no_rows_moving_between_devices():
  """Each micro-batch is spread over both devices, and each device's share of it comes from
  the rows that device already holds."""
  mesh = make_mesh(data=2)
  batch = {"row": np.arange(12), "x": np.arange(12 * 2).reshape(12, 2)}
  global_batch = sharding.make_global_batch(batch, mesh)
  split = train_step._micro_batches   # pylint: disable=protected-access
  micro = jax.jit(lambda b: split(b, 3, mesh))(global_batch)
  for name, value in batch.items():
    assert micro[name].shape == (3, 4, *value.shape[1:])
    for a in range(3):
      np.testing.assert_array_equal(micro[name][a], value[a::3])
  held = {shard.device: set(np.asarray(shard.data))
          for shard in global_batch["row"].addressable_shards}
  for shard in micro["row"].addressable_shards:
    assert shard.data.shape == (3, 2)
    assert set(np.asarray(shard.data).ravel()) <= held[shard.device]


def test_views_enter_whole_on_each_spatial_device_and_stay_as_they_are_with_no_split():
  """mesh.spatial = 2: the views leave augmentation batch-sharded, whole along space (the
  image tower splits them). No spatial split (no mesh, spatial = 1): nothing is placed."""
  place = train_step._whole_on_each_spatial_device   # pylint: disable=protected-access
  split = make_mesh(data=2, spatial=2)
  views = [jax.device_put(np.full((2, 4, 2, 2, 1), v, np.float32),
                          jax.sharding.NamedSharding(split, jax.sharding.PartitionSpec(
                              None, "spatial"))) for v in (1.0, 2.0)]
  for given in ((views[0], None), tuple(views)):
    placed = jax.jit(lambda v: place(v, split))(given)   # pylint: disable=cell-var-from-loop
    assert len(placed) == 2 and (placed[1] is None) == (given[1] is None)
    for view, value in zip(placed, given):
      if value is not None:
        assert view.sharding.shard_shape(view.shape) == (1, 4, 2, 2, 1)
        np.testing.assert_array_equal(view, value)
  given = tuple(views)
  for mesh in (None, make_mesh(data=2)):
    assert place(given, mesh) is given


def assert_same_sight(got, expected, rtol=1e-5, atol=1e-6):
  """The model saw the same micro-batches, views and dropout masks."""
  assert set(got) == set(expected)
  for name, (view_a, view_b, dropped) in expected.items():
    np.testing.assert_allclose(got[name][0], view_a, rtol=rtol, atol=atol)
    if view_b is None:
      assert got[name][1] is None
    else:
      np.testing.assert_allclose(got[name][1], view_b, rtol=rtol, atol=atol)
    np.testing.assert_array_equal(got[name][2], dropped)


def check_each_micro_batch_sees_the_documented_views_and_dropout(run):
  """Step s, micro-batch a: its rows, views from fold_in(fold_in(base, s), a) at first study
  index a * rows, dropout from the same key (see documented_micro_batch_loss)."""
  for (_, _, seen), reference in zip(run.taken, run.reference):
    assert_same_sight(seen, reference["seen"])


def check_a_step_is_an_adamw_update_on_the_mean_micro_batch_gradient(run):
  """The jitted step's params and BatchNorm statistics after each step equal the reference's:
  hand AdamW (masked decay, the schedule's learning rate of each step) on the mean of the
  micro-batch gradients, statistics flowing from one micro-batch to the next."""
  for s, ((state, _, _), reference) in enumerate(zip(run.taken, run.reference)):
    assert_trees_close(state.trainable, reference["trainable"], rtol=1e-4, atol=1e-6)
    assert_trees_close(state.batch_stats, reference["batch_stats"], rtol=1e-4)
    assert int(state.step) == s + 1


def check_a_step_moves_the_trainable_params_and_never_the_frozen_ones(run):
  fresh = run.fresh
  for state, _, _ in run.taken:
    assert_trees_close(state.frozen, fresh.frozen, rtol=0, atol=0)
    assert not any("text_encoder" in path for path in tree_paths(state.opt_state))
    for path, value in tree_paths(fresh.trainable).items():
      assert not np.allclose(tree_paths(state.trainable)[path], value), path


def check_a_fixed_loss_scalar_stays_at_its_initial_value_and_gets_no_optimizer_state(run):
  (state, _, _), = run.taken
  assert set(state.frozen) == {"text_encoder", "logit_scale"}
  assert float(state.params["logit_scale"]) == pytest.approx(math.log(1 / 0.07))
  assert not any("logit_scale" in path for path in tree_paths(state.opt_state))


def check_step_metrics_are_the_micro_batch_mean_the_gradient_norm_and_the_learning_rate(
    run):
  schedule = train_step.learning_rate_schedule(run.config.train, TOTAL_STEPS)
  for s, ((_, metrics, _), reference) in enumerate(zip(run.taken, run.reference)):
    assert metrics["loss"] == pytest.approx(reference["loss"], rel=1e-4)
    assert metrics["grad_norm"] == pytest.approx(float(optax.global_norm(reference["grads"])),
                                                 rel=1e-4)
    assert metrics["lr"] == pytest.approx(float(schedule(s)))
    assert {"contrastive", "temperature", "accuracy_t2i"} <= set(metrics)
    assert metrics["contrastive"] == pytest.approx(reference["contrastive"], rel=1e-4)
    assert (metrics["mse"] > 0) == bool(run.config.augment.two_views)


def check_consecutive_steps_draw_new_augmentations_and_dropout_masks(run):
  """Over the same batch, step 1 must not replay step 0's views or dropout: a run that drew
  the same ones every step would see each study under one augmentation only."""
  (_, _, seen0), (_, _, seen1) = run.taken
  for name, (view_a, view_b, dropped) in seen0.items():
    assert np.abs(view_a - seen1[name][0]).max() > 1e-3
    assert np.abs(view_b - seen1[name][1]).max() > 1e-3
    assert not np.array_equal(dropped, seen1[name][2])
    assert np.abs(view_a - view_b).max() > 1e-3   # and the two views of a step differ


def check_a_resumed_step_draws_what_the_uninterrupted_run_drew(run):
  """A resumed run holds the restored state (step count included) and the run's base key: its
  step 1 sees step 1's views and dropout, and ends where the uninterrupted run did."""
  (resumed, resumed_metrics, resumed_seen), = run.resumed
  uninterrupted, metrics, seen = run.taken[1]
  assert_same_sight(resumed_seen, seen, rtol=0, atol=0)
  assert_trees_close(resumed.trainable, uninterrupted.trainable, rtol=0, atol=0)
  assert resumed_metrics["loss"] == metrics["loss"]


def test_the_step_key_is_fold_in_of_the_step_for_typed_and_raw_base_keys():
  typed = jax.random.key(3)
  expected = jax.random.key_data(jax.random.fold_in(typed, 5))
  for base in (typed, jax.random.key_data(typed)):
    np.testing.assert_array_equal(jax.random.key_data(train_step.step_key(base, 5)), expected)


def check_the_jitted_step_donates_the_state_and_keeps_its_shardings(run):
  """The step reuses the state's buffers (XLA:CPU copies scalars: those may stay)."""
  assert all(leaf.is_deleted() for leaf in jax.tree.leaves(run.given) if leaf.ndim)
  state_shardings, metric_shardings = run.out_shardings
  assert state_shardings == run.shardings
  assert all(s.is_fully_replicated for s in jax.tree.leaves(metric_shardings))


def test_the_abstract_batch_is_the_global_batch_the_pipeline_builds():
  """Rows = per-device rows x micro-batches x batch shards, the stored dtype, batch-sharded."""
  config = make_config(**{"train.batch_size_per_device": 3, "train.grad_accum_steps": 2})
  mesh = make_mesh(data=2, fsdp=2)
  batch = host_batch(rows=3 * 2 * 4)
  real = sharding.make_global_batch(batch, mesh)
  abstract = train_step.abstract_batch(config, SPEC, mesh)
  assert set(abstract) == set(real) == set(train_step.BATCH_FIELDS)
  for name, value in real.items():
    assert (abstract[name].shape, abstract[name].dtype) == (value.shape, value.dtype), name
    assert abstract[name].sharding == value.sharding, name


# --- The two runs, checked ------------------------------------------------------------------------
# One test per run: mutmut credits what a module fixture runs (the state, the steps) to the
# first test that builds it and reruns only credited tests for a mutant, so the test that
# builds a run makes every check of it.

DEFAULT_RUN_CHECKS = (
    check_a_fresh_state_holds_the_model_init_with_optimizer_state_for_the_trainable_only,
    check_pretrained_text_params_are_the_frozen_text_tower,
    check_the_abstract_state_is_the_created_one_without_computing_it,
    check_each_micro_batch_sees_the_documented_views_and_dropout,
    check_a_step_is_an_adamw_update_on_the_mean_micro_batch_gradient,
    check_a_step_moves_the_trainable_params_and_never_the_frozen_ones,
    check_step_metrics_are_the_micro_batch_mean_the_gradient_norm_and_the_learning_rate,
    check_consecutive_steps_draw_new_augmentations_and_dropout_masks,
    check_a_resumed_step_draws_what_the_uninterrupted_run_drew,
    check_the_jitted_step_donates_the_state_and_keeps_its_shardings)

ONE_VIEW_RUN_CHECKS = (
    check_each_micro_batch_sees_the_documented_views_and_dropout,
    check_a_step_is_an_adamw_update_on_the_mean_micro_batch_gradient,
    check_step_metrics_are_the_micro_batch_mean_the_gradient_norm_and_the_learning_rate,
    check_a_fixed_loss_scalar_stays_at_its_initial_value_and_gets_no_optimizer_state)


def test_the_default_run_two_steps_and_a_resume(run):
  """2 micro-batches, two views, the temperature learnt, fsdp-sharded kernels."""
  for check in DEFAULT_RUN_CHECKS:
    check(run)


def test_the_one_view_released_loss_run(one_view_run):
  """1 micro-batch, one view, the released loss, its scalar frozen."""
  for check in ONE_VIEW_RUN_CHECKS:
    check(one_view_run)

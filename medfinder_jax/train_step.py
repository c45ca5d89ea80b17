"""The train state, the optimizer and the sharded train step (pure JAX: no TensorFlow, no I/O).

- State (`TrainState`): the step count, the parameters split into `trainable` (what the
  optimizer sees and updates) and `frozen` (held fixed: the BERT tower unless text.trainable, as
  the released code freezes it; the loss scalars unless loss.learn_temperature), BatchNorm
  statistics, the optimizer state, and the model's apply function and optimizer as static
  fields. The split is by top-level parameter key, and it is the only freezing mechanism:
  frozen parameters are not differentiated, get no optimizer state and never change. The state
  is created directly in its shardings (never whole on one device) and the step donates it.
- Optimizer: AdamW on the trainable parameters, cosine decay over all steps with optional linear
  warmup (stepped per optimizer update; the released code stepped per epoch), the current
  learning rate kept in the optimizer state. Weight decay only on kernels and embeddings
  (ndim >= 2): not on biases, norm scales or the loss scalars.
- Step: one jax.jit with explicit in/out shardings. Stored volumes become model input through
  the dataset's schema.Intensity and are augmented on the device (two views, augment.two_views);
  gradients are accumulated over `train.grad_accum_steps` micro-batches; BatchNorm statistics
  are over the global (micro-)batch, the contrastive loss uses the fused image embedding, the
  MSE the per-view ones. Step s draws its randomness from fold_in(base_key, s), so a resumed
  run draws the same.
- Spatial partitioning (mesh.spatial = N > 1): volumes enter whole on each device of a spatial
  group, and augmentation runs there before the reshard (its resampling gathers voxels from
  anywhere in the volume): each of the N devices computes the same views of its rows (N x the
  augmentation work, and per device two float32 views of its rows at full size beside the
  tower's split activations), then the image tower's first constraint keeps only the device's
  X slab (a local slice, no communication).

This module is importable without TensorFlow (GPU hosts that benchmark the step need none).
"""

import functools
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from medfinder_jax import augment
from medfinder_jax import losses
from medfinder_jax import sharding
from medfinder_jax.models import medfinder as medfinder_lib


# --- Optimizer ------------------------------------------------------------------------------------

def learning_rate_schedule(train_config, total_steps):
  """lr(step): linear warmup 0 -> lr over warmup_steps, then cosine decay to 0 at total_steps."""
  lr, warmup = float(train_config.lr), int(train_config.warmup_steps)
  if warmup <= 0:
    return optax.cosine_decay_schedule(lr, max(1, total_steps))
  return optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(warmup + 1, total_steps))


def decay_mask(params):
  """True where AdamW applies weight decay: kernels and embeddings (ndim >= 2), not loss
  scalars, biases or norm scales."""
  return jax.tree.map(lambda leaf: leaf.ndim >= 2, params)


def make_optimizer(train_config, total_steps):
  """AdamW (config train.lr / weight_decay) with the cosine schedule; the learning rate of the
  last update is in opt_state.hyperparams["learning_rate"]."""
  adamw = optax.inject_hyperparams(optax.adamw, static_args=("mask",))
  return adamw(learning_rate=learning_rate_schedule(train_config, total_steps),
               weight_decay=float(train_config.weight_decay), mask=decay_mask)


# --- State ----------------------------------------------------------------------------------------

def frozen_keys(config):
  """Top-level parameter keys held fixed in training (see the module docstring)."""
  keys = set()
  if not config.text.trainable:
    keys.add(medfinder_lib.TEXT_TOWER)
  if not config.loss.learn_temperature:
    keys.update(medfinder_lib.LOSS_SCALARS)
  return frozenset(keys)


def split_params(params, frozen):
  """(trainable, frozen) parts of a params dict, by top-level key."""
  return ({k: v for k, v in params.items() if k not in frozen},
          {k: v for k, v in params.items() if k in frozen})


class TrainState(flax.struct.PyTreeNode):
  """Everything a train step changes. step: int32 scalar, optimizer updates done."""
  step: jax.Array
  trainable: Any
  frozen: Any
  batch_stats: Any
  opt_state: Any
  apply_fn: Callable = flax.struct.field(pytree_node=False)
  tx: optax.GradientTransformation = flax.struct.field(pytree_node=False)

  @property
  def params(self):
    return {**self.trainable, **self.frozen}

  def variables(self, trainable=None):
    """Model variables for apply_fn, optionally with other trainable params (differentiation)."""
    params = {**(self.trainable if trainable is None else trainable), **self.frozen}
    return {"params": params, **({"batch_stats": self.batch_stats} if self.batch_stats else {})}

  def apply_gradients(self, grads, batch_stats):
    """One optimizer update of the trainable params; the step count advances."""
    updates, opt_state = self.tx.update(grads, self.opt_state, self.trainable)
    return self.replace(step=self.step + 1, trainable=optax.apply_updates(self.trainable, updates),
                        batch_stats=batch_stats, opt_state=opt_state)

  @property
  def learning_rate(self):
    """The learning rate of the last update (a traced scalar inside the step)."""
    return self.opt_state.hyperparams["learning_rate"]


def _fresh_state_fn(model, tx, config, image_shape):
  """(key, text_params) -> a fresh TrainState (to be jitted with out_shardings)."""
  def fresh(key, text_params):
    variables = medfinder_lib.init_variables(model, key, image_shape, config.text.max_tokens,
                                             text_params)
    trainable, frozen = split_params(variables["params"], frozen_keys(config))
    return TrainState(step=jnp.zeros((), jnp.int32), trainable=trainable, frozen=frozen,
                      batch_stats=variables.get("batch_stats", {}), opt_state=tx.init(trainable),
                      apply_fn=model.apply, tx=tx)
  return fresh


def create_train_state(model, tx, config, image_shape, rng, mesh, rules, text_params=None):
  """A fresh TrainState computed directly into its shardings (sharding.init_sharded).

  text_params: pretrained BERT params (numpy, identical on every process) for
  params["text_encoder"]. rng must be the same key on every process.
  """
  fresh = _fresh_state_fn(model, tx, config, tuple(image_shape))
  return sharding.init_sharded(fresh, rng, text_params, mesh=mesh, rules=rules)


def abstract_train_state(model, tx, config, image_shape, mesh, rules):
  """The TrainState as ShapeDtypeStructs with shardings (a restore target; nothing computed)."""
  fresh = _fresh_state_fn(model, tx, config, tuple(image_shape))
  return sharding.sharded_abstract(fresh, jax.random.key(0), None, mesh=mesh, rules=rules)


# --- Train step -----------------------------------------------------------------------------------

def _micro_batches(batch, accum_steps, mesh):
  """(G, ...) global batch -> (accum_steps, G / accum_steps, ...), micro-batch a = rows
  m * accum_steps + a: every device keeps its own rows (no data movement), each micro-batch
  is spread over all devices."""
  spec = jax.sharding.PartitionSpec(None, sharding.BATCH_AXES)

  def split(x):
    x = x.reshape(x.shape[0] // accum_steps, accum_steps, *x.shape[1:])
    x = jnp.swapaxes(x, 0, 1)
    return jax.lax.with_sharding_constraint(x, jax.sharding.NamedSharding(mesh, spec))

  return jax.tree.map(split, batch)


def _views(key, volumes, augment_config, first_index):
  """(view_a, view_b or None): two augmented views, or one when augment.two_views is off."""
  if augment_config.two_views:
    return augment.two_views(key, volumes, augment_config, first_index=first_index)
  view = augment.augment_batch(key, volumes, augment_config, augment_config.prob, 0, first_index)
  return view, None


def _whole_on_each_spatial_device(views, mesh):
  """The views batch-sharded and whole along space (see the module docstring), or as they are
  when no volume is split (no mesh, or spatial = 1: the program stays as it was)."""
  if mesh is None or sharding.spatial_size(mesh) == 1:
    return views
  place = lambda v: v if v is None else jax.lax.with_sharding_constraint(  # noqa: E731
      v, sharding.batch_sharding(mesh))
  return tuple(place(v) for v in views)


def micro_batch_loss(trainable, state, batch, key, first_index, *, config, model_input,
                     num_blocks, mesh=None):
  """(loss, (metrics, batch_stats)) of one micro-batch with `trainable` params.

  key: this micro-batch's key (view augmentation and dropout draw from it); first_index: the
  global index of the batch's first study (augmentation draws per study). num_blocks: batch
  shards (data x fsdp: the released loss's local batches). mesh: where the augmentation runs
  (module docstring), None = wherever XLA puts it.
  """
  views = _views(jax.random.fold_in(key, 0), model_input(batch["volume"]), config.augment,
                 first_index)
  views = _whole_on_each_spatial_device(views, mesh)
  out, updates = state.apply_fn(state.variables(trainable), *views, batch["input_ids"],
                                batch["attention_mask"], train=True,
                                rngs={"dropout": jax.random.fold_in(key, 1)},
                                mutable=["batch_stats"])
  loss, metrics = losses.total_loss(out, config.loss, num_blocks=num_blocks)
  return loss, (metrics, updates.get("batch_stats", state.batch_stats))


def gradients(state, batch, key, *, config, model_input, mesh):
  """(grads of the trainable params, new batch_stats, per-micro-batch metrics (A, ...)) of one
  global batch, averaged over its train.grad_accum_steps = A micro-batches.

  batch: global {"volume" (G, X, Y, Z) stored dtype, "input_ids", "attention_mask" (G, L)};
  key: the step's key (micro-batch a uses fold_in(key, a)).
  """
  accum = int(config.train.grad_accum_steps)
  micro = _micro_batches(batch, accum, mesh)
  rows = batch["volume"].shape[0] // accum
  grad_fn = jax.value_and_grad(functools.partial(
      micro_batch_loss, config=config, model_input=model_input,
      num_blocks=sharding.num_batch_shards(mesh), mesh=mesh), has_aux=True)

  def accumulate(carry, inputs):
    grads_sum, batch_stats = carry
    index, mb = inputs
    (_, (metrics, batch_stats)), grads = grad_fn(
        state.trainable, state.replace(batch_stats=batch_stats), mb,
        jax.random.fold_in(key, index), index * rows)
    return (jax.tree.map(jnp.add, grads_sum, grads), batch_stats), metrics

  carry = (jax.tree.map(jnp.zeros_like, state.trainable), state.batch_stats)
  if accum == 1:  # no loop at all: on XLA:CPU even a 1-trip scan made the step 5x slower
    (grads, batch_stats), metrics = accumulate(carry, (0, jax.tree.map(lambda x: x[0], micro)))
    metrics = jax.tree.map(lambda m: m[None], metrics)
  else:  # unrolled on CPU, where a while-loop body runs ~5x slower (benchmarks/train_step.py)
    (grads, batch_stats), metrics = jax.lax.scan(
        accumulate, carry, (jnp.arange(accum), micro), unroll=jax.default_backend() == "cpu")
  return jax.tree.map(lambda g: g / accum, grads), batch_stats, metrics


def step_key(base_key, step):
  """The key of optimizer step `step` (0-based): fold_in(base_key, step). base_key: typed, or
  its raw uint32 key data."""
  if not jnp.issubdtype(base_key.dtype, jax.dtypes.prng_key):
    base_key = jax.random.wrap_key_data(base_key)
  return jax.random.fold_in(base_key, step)


def train_step(state, batch, base_key, *, config, model_input, mesh):
  """(state, global batch, the run's base key) -> (new state, metrics of this step)."""
  grads, batch_stats, metrics = gradients(state, batch, step_key(base_key, state.step),
                                          config=config, model_input=model_input, mesh=mesh)
  state = state.apply_gradients(grads, batch_stats)
  metrics = jax.tree.map(jnp.mean, metrics)
  metrics.update(grad_norm=optax.global_norm(grads), lr=state.learning_rate)
  return state, metrics


def make_train_step(config, model_input, mesh, state_shardings):
  """train_step jitted once: explicit in/out shardings, the state donated.

  model_input: stored volumes -> model input (the dataset's schema.Intensity)."""
  batch = sharding.batch_sharding(mesh)
  replicated = sharding.replicated(mesh)
  step = functools.partial(train_step, config=config, model_input=model_input, mesh=mesh)
  return jax.jit(step, in_shardings=(state_shardings, {name: batch for name in BATCH_FIELDS},
                                     replicated),
                 out_shardings=(state_shardings, replicated), donate_argnums=0)


BATCH_FIELDS = ("volume", "input_ids", "attention_mask")


def abstract_batch(config, spec, mesh):
  """ShapeDtypeStructs of one global training batch (for .lower() without data)."""
  rows, _ = sharding.batch_rows(config.train.batch_size_per_device, mesh,
                                config.train.grad_accum_steps)
  s = sharding.batch_sharding(mesh)
  tokens = (rows, int(config.text.max_tokens))
  return {"volume": jax.ShapeDtypeStruct((rows, *spec.shape), np.dtype(spec.volume_dtype),
                                         sharding=s),
          "input_ids": jax.ShapeDtypeStruct(tokens, jnp.int32, sharding=s),
          "attention_mask": jax.ShapeDtypeStruct(tokens, jnp.int32, sharding=s)}

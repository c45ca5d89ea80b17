"""Training: train state, optimizer, the sharded train step, and the train/evaluate loop.

Shape of the flax examples: `create_train_state`, `make_train_step`, `train_and_evaluate`.

- State (`TrainState`): step (optimizer updates done), params (the model's, plus
  params["loss"] = learnable loss scalars), batch_stats (ResNet BatchNorm), opt_state. It is
  created directly in its shardings (sharding.init_sharded: never whole on one device) and the
  train step donates it.
- Optimizer: AdamW, cosine decay over all steps with optional linear warmup (stepped per
  optimizer update; the released code stepped per epoch). Weight decay only on kernels and embeddings
  (ndim >= 2): not on biases, norm scales or the loss scalars. A frozen text tower
  (text.trainable False, as in the seed) is set_to_zero and holds no optimizer state.
- Train step: one jax.jit with explicit in/out shardings. Stored volumes become [0, 1] floats and
  are augmented on the device (two views, augment.two_views); gradients are accumulated over
  `train.grad_accum_steps` micro-batches with lax.scan; BatchNorm statistics are over the global
  (micro-)batch, the contrastive loss uses the fused image embedding, the MSE the per-view ones.
- Loop: metrics stay on the device and reach the host every `train.log_every_steps` (no
  per-step sync); validation, checkpoints, NaN/Inf stop, SIGTERM/SIGINT/preemption stop.
"""

import dataclasses
import functools
import os
import signal
import threading
import time
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import multihost_utils

from medfinder_jax import augment
from medfinder_jax import checkpoint
from medfinder_jax import config_utils
from medfinder_jax import convert_weights
from medfinder_jax import errors
from medfinder_jax import evaluate
from medfinder_jax import logging as logging_lib
from medfinder_jax import losses
from medfinder_jax import metrics as metrics_lib
from medfinder_jax import sharding
from medfinder_jax import text as text_lib
from medfinder_jax.models import medfinder as medfinder_lib

FROZEN, TRAINABLE = "frozen", "trainable"
LOSS_KEY = losses.PARAMS_KEY  # params[LOSS_KEY]: learnable loss scalars (temperature, bias)
TEXT_KEY = "text_encoder"    # params[TEXT_KEY]: the BERT tower, frozen unless text.trainable

# Config fields that fix the shapes of the saved state or the order of the data: a resumed run
# must keep them (anything else, e.g. epochs, lr, log cadence, may change).
RESUME_KEYS = ("seed", "model.backbone", "model.embed_dim", "model.resnet", "model.vit", "model.fusion",
               "loss.contrastive", "text.trainable", "train.batch_size_per_device",
               "train.grad_accum_steps", "train.shuffle_buffer", "text.max_tokens",
               "text.pooling")

EXIT_DIVERGED = 3  # launch.py's exit code when the loss became NaN/Inf


class TrainingError(errors.UserError):
  """Training cannot start or go on as configured; the message says what to change."""


class Diverged(RuntimeError):
  """The loss (or gradient norm) became NaN/Inf at `step`; the last good checkpoint is kept."""

  def __init__(self, message, step, last_checkpoint):
    super().__init__(message)
    self.step = step
    self.last_checkpoint = last_checkpoint


# --- Optimizer ------------------------------------------------------------------------------------

def learning_rate_schedule(train_config, total_steps):
  """lr(step): linear warmup 0 -> lr over warmup_steps, then cosine decay to 0 at total_steps."""
  lr, warmup = float(train_config.lr), int(train_config.warmup_steps)
  if warmup <= 0:
    return optax.cosine_decay_schedule(lr, max(1, total_steps))
  return optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(warmup + 1, total_steps))


def param_labels(params, text_trainable):
  """{top-level key: "frozen" | "trainable"}: the text tower is frozen unless text_trainable."""
  return {key: (FROZEN if key == TEXT_KEY and not text_trainable else TRAINABLE)
          for key in params}


def decay_mask(params):
  """True where AdamW applies weight decay: kernels and embeddings (ndim >= 2), not loss
  scalars, biases or norm scales."""
  def one(path, leaf):
    return sharding.path_string(path).split("/")[0] != LOSS_KEY and leaf.ndim >= 2
  return jax.tree_util.tree_map_with_path(one, params)


def make_optimizer(train_config, text_trainable, total_steps):
  """AdamW (config train.lr / weight_decay) on the trainable towers, set_to_zero on the frozen
  text tower (no optimizer state for it). Returns (optax transformation, lr schedule)."""
  schedule = learning_rate_schedule(train_config, total_steps)
  adamw = optax.adamw(schedule, weight_decay=float(train_config.weight_decay), mask=decay_mask)
  tx = optax.multi_transform({TRAINABLE: adamw, FROZEN: optax.set_to_zero()},
                             functools.partial(param_labels, text_trainable=text_trainable))
  return tx, schedule


# --- State ----------------------------------------------------------------------------------------

class TrainState(flax.struct.PyTreeNode):
  """Everything a train step changes. step: int32 scalar, optimizer updates done."""
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any

  def variables(self):
    """Model variables for `model.apply` (no loss scalars)."""
    params = {k: v for k, v in self.params.items() if k != LOSS_KEY}
    return {"params": params, **({"batch_stats": self.batch_stats} if self.batch_stats else {})}


def _init_state_fn(model, tx, loss_config, image_shape, max_tokens):
  """key, text_params -> TrainState (to be jitted with out_shardings)."""
  def init(key, text_params):
    variables = losses.with_loss_params(
        medfinder_lib.init_variables(model, key, image_shape, max_tokens, text_params),
        loss_config)
    params = dict(variables["params"])
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      batch_stats=variables.get("batch_stats", {}), opt_state=tx.init(params))
  return init


def create_train_state(model, tx, config, image_shape, rng, mesh, rules, text_params=None):
  """A fresh TrainState computed directly into its shardings (see sharding.init_sharded).

  text_params: pretrained BERT params (numpy, identical on every process) for params
  ["text_encoder"]. rng must be the same key on every process.
  """
  init = _init_state_fn(model, tx, config.loss, tuple(image_shape), config.text.max_tokens)
  return sharding.init_sharded(init, rng, text_params, mesh=mesh, rules=rules)


def abstract_train_state(model, tx, config, image_shape, mesh, rules):
  """ShapeDtypeStructs with shardings of the TrainState (restore target; no computation)."""
  init = _init_state_fn(model, tx, config.loss, tuple(image_shape), config.text.max_tokens)
  return sharding.sharded_abstract(init, jax.random.key(0), None, mesh=mesh, rules=rules)


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


def make_loss_fn(model, config, model_input, num_blocks):
  """(trainable, frozen, batch_stats, micro_batch, key, first_index) -> (loss, (metrics, bs)).

  model_input: stored volumes -> [0, 1] model input (the dataset's schema.Intensity).
  num_blocks: per-device blocks of a micro-batch (the released loss's local batches = device count).
  """
  def loss_fn(trainable, frozen, batch_stats, batch, key, first_index):
    params = {**trainable, **frozen}
    loss_params = params.get(LOSS_KEY, {})
    model_params = {k: v for k, v in params.items() if k != LOSS_KEY}
    volumes = model_input(batch["volume"])
    view_a, view_b = _views(jax.random.fold_in(key, 0), volumes, config.augment, first_index)
    variables = {"params": model_params, **({"batch_stats": batch_stats} if batch_stats else {})}
    out, updates = model.apply(variables, view_a, view_b, batch["input_ids"],
                               batch["attention_mask"], train=True,
                               rngs={"dropout": jax.random.fold_in(key, 1)},
                               mutable=["batch_stats"])
    loss, metrics = losses.total_loss(loss_params, out["text"], out["image"], config.loss,
                                      view_a=out["image_a"], view_b=out.get("image_b"),
                                      num_blocks=num_blocks)
    return loss, (metrics, updates.get("batch_stats", batch_stats))
  return loss_fn


def train_step_fn(model, tx, schedule, config, model_input, mesh):
  """The (unjitted) step: (state, batch, base_key) -> (new state, metrics of this step).

  batch: global {"volume" (G, X, Y, Z) stored dtype, "input_ids", "attention_mask" (G, L)},
  G = train.batch_size_per_device * devices * train.grad_accum_steps. base_key: the run's PRNG
  key (typed, or its raw uint32 key data); step s uses fold_in(base_key, s) (augmentation,
  dropout), so a resumed run draws the same.
  """
  accum = int(config.train.grad_accum_steps)

  def step(state, batch, base_key):
    labels = param_labels(state.params, config.text.trainable)
    trainable = {k: v for k, v in state.params.items() if labels[k] == TRAINABLE}
    frozen = {k: v for k, v in state.params.items() if labels[k] == FROZEN}
    micro = _micro_batches(batch, accum, mesh)
    micro_rows = batch["volume"].shape[0] // accum
    loss_fn = make_loss_fn(model, config, model_input,
                           num_blocks=sharding.num_batch_shards(mesh))
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if not jnp.issubdtype(base_key.dtype, jax.dtypes.prng_key):
      base_key = jax.random.wrap_key_data(base_key)
    key = jax.random.fold_in(base_key, state.step)

    def accumulate(carry, inputs):
      grads_sum, batch_stats = carry
      index, mb = inputs
      (_, (metrics, batch_stats)), grads = grad_fn(
          trainable, frozen, batch_stats, mb, jax.random.fold_in(key, index), index * micro_rows)
      return (jax.tree.map(jnp.add, grads_sum, grads), batch_stats), metrics

    zeros = jax.tree.map(jnp.zeros_like, trainable)
    if accum == 1:  # no loop at all: on XLA:CPU even a 1-trip scan made the step 5x slower
      (grads_sum, batch_stats), metrics = accumulate(
          (zeros, state.batch_stats), (0, jax.tree.map(lambda x: x[0], micro)))
      metrics = jax.tree.map(lambda m: m[None], metrics)
    else:  # unrolled on CPU, where a while-loop body runs ~5x slower (benchmarks/train_step.py)
      (grads_sum, batch_stats), metrics = jax.lax.scan(
          accumulate, (zeros, state.batch_stats), (jnp.arange(accum), micro),
          unroll=jax.default_backend() == "cpu")
    grads = jax.tree.map(lambda g: g / accum, grads_sum)
    full_grads = {**grads, **jax.tree.map(jnp.zeros_like, frozen)}
    updates, opt_state = tx.update(full_grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = jax.tree.map(jnp.mean, metrics)
    metrics.update(grad_norm=optax.global_norm(grads), lr=schedule(state.step))
    new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                              opt_state=opt_state)
    return new_state, metrics

  return step


def make_train_step(model, tx, schedule, config, model_input, mesh, state_shardings):
  """The train step jitted once: explicit in/out shardings, the state donated."""
  batch_sharding = sharding.batch_sharding(mesh)
  batch_shardings = {"volume": batch_sharding, "input_ids": batch_sharding,
                     "attention_mask": batch_sharding}
  replicated = sharding.replicated(mesh)
  return jax.jit(train_step_fn(model, tx, schedule, config, model_input, mesh),
                 in_shardings=(state_shardings, batch_shardings, replicated),
                 out_shardings=(state_shardings, replicated), donate_argnums=0)


def abstract_batch(config, spec, mesh):
  """ShapeDtypeStructs of one global training batch (for .lower() without data)."""
  rows = (int(config.train.batch_size_per_device) * mesh.size
          * int(config.train.grad_accum_steps))
  s = sharding.batch_sharding(mesh)
  return {"volume": jax.ShapeDtypeStruct((rows, *spec.shape), np.dtype(spec.volume_dtype),
                                         sharding=s),
          "input_ids": jax.ShapeDtypeStruct((rows, config.text.max_tokens), jnp.int32,
                                            sharding=s),
          "attention_mask": jax.ShapeDtypeStruct((rows, config.text.max_tokens), jnp.int32,
                                                 sharding=s)}


# --- Run setup ------------------------------------------------------------------------------------

@dataclasses.dataclass
class Run:
  """What the loop needs, built once by `setup_run`."""
  config: Any
  workdir: str
  builder: Any
  spec: Any  # data_prep.schema.DatasetSpec
  mesh: Any
  rules: sharding.PartitionRules
  tokenizer: Any
  model: Any
  bert_config: Any
  tx: Any
  schedule: Any
  steps_per_epoch: int
  total_steps: int
  global_batch: int
  local_batch: int


def resolve_dataset_dir(data_config):
  """data.tfrecord_dir, else a converted dataset given as data.data_root; a raw corpus there is
  an error that prints the `launch.py convert` command to run."""
  if data_config.tfrecord_dir:
    return data_config.tfrecord_dir
  root = data_config.data_root
  if not root:
    raise TrainingError("no training data: pass --config.data.tfrecord_dir DIR (a dataset "
                        "written by `launch.py convert`) or --data_root DIR")
  if os.path.isfile(os.path.join(root, "dataset_info.json")):
    return root
  if os.path.isdir(os.path.join(root, "meta")) or any(
      name.startswith("CT") for name in (os.listdir(root) if os.path.isdir(root) else ())):
    converted = os.path.join(os.path.abspath(root) + "_tfrecords")
    raise TrainingError(
        f"--data_root {root!r} is a raw corpus (CT*/ct/*.nii.gz, meta/*.csv); training reads "
        f"converted TFRecords. Convert it once:\n  python launch.py convert --data_root {root} "
        f"--output_dir {converted}\nthen train with --config.data.tfrecord_dir {converted}")
  raise TrainingError(f"--data_root {root!r} is neither a converted dataset (no "
                      "dataset_info.json) nor a raw corpus (no meta/ or CT*/ folders)")


def setup_run(config, workdir=None):
  """Dataset, mesh, tokenizer, model and optimizer for `config` (no state yet)."""
  workdir = workdir or config.output_dir
  from medfinder_jax import input_pipeline  # pylint: disable=import-outside-toplevel  (TF)
  try:
    builder, spec = input_pipeline.open_dataset(resolve_dataset_dir(config.data))
  except input_pipeline.DatasetError as err:
    raise TrainingError(str(err)) from None
  try:
    metrics_lib.check_eval_config(config.eval)
  except ValueError as err:
    raise TrainingError(str(err)) from None
  mesh = sharding.make_mesh(config.mesh)
  accum = int(config.train.grad_accum_steps)
  if accum < 1:
    raise TrainingError(f"config train.grad_accum_steps={accum}: expected >= 1")
  global_batch = int(config.train.batch_size_per_device) * mesh.size * accum
  train_size = spec.split_sizes.get("train", 0)
  steps_per_epoch = train_size // global_batch
  if steps_per_epoch < 1:
    raise TrainingError(
        f"the train split of {spec.directory!r} has {train_size} studies, fewer than one global "
        f"batch of {global_batch} (train.batch_size_per_device={config.train.batch_size_per_device}"
        f" x {mesh.size} devices x train.grad_accum_steps={accum}); lower the batch size")
  total_steps = int(config.train.max_steps) or int(config.train.epochs) * steps_per_epoch
  try:
    tokenizer = text_lib.load_tokenizer(config.text)
    bert_config = convert_weights.load_bert_config(tokenizer.folder)
    text_lib.check_vocab_fits(tokenizer, bert_config)
  except text_lib.TextModelError as err:
    raise TrainingError(f"{err}\n(text model: --config.text.model_path DIR, a local HF BERT "
                        "folder such as BioBERT v1.1, or --config.text.model_path minilm)"
                        ) from None
  model = medfinder_lib.build_model(config.model, config.text, bert_config)
  tx, schedule = make_optimizer(config.train, config.text.trainable, total_steps)
  return Run(config=config, workdir=workdir, builder=builder, spec=spec, mesh=mesh,
             rules=sharding.PartitionRules.from_config(config.mesh), tokenizer=tokenizer,
             model=model, bert_config=bert_config, tx=tx, schedule=schedule,
             steps_per_epoch=steps_per_epoch, total_steps=total_steps,
             global_batch=global_batch, local_batch=global_batch // jax.process_count())


def initial_state(run, manager):
  """(state, meta or None): restored from the latest checkpoint, else freshly initialised."""
  latest = manager.latest_step()
  if latest is None:
    try:
      _, text_params = convert_weights.load_hf_bert(run.tokenizer.folder)
    except (text_lib.TextModelError, convert_weights.WeightImportError) as err:   # a bad file
      raise TrainingError(str(err)) from None
    state = create_train_state(run.model, run.tx, run.config, run.spec.shape,
                               jax.random.key(run.config.seed), run.mesh, run.rules, text_params)
    return state, None
  meta = checkpoint.restore_meta(manager, latest)
  check_resume_compatible(meta, run)
  abstract = abstract_train_state(run.model, run.tx, run.config, run.spec.shape, run.mesh,
                                  run.rules)
  variables, opt_state = checkpoint.restore_train(
      manager, latest, _variables_item(abstract), abstract.opt_state)
  state = abstract.replace(
      step=replicated_array(np.int32(meta["step"]), abstract.step.sharding),
      params=variables["params"], batch_stats=variables.get("batch_stats", {}),
      opt_state=opt_state)
  return state, meta


def replicated_array(value, replicated_sharding):
  """A global array every device holds in full, from host `value` (the same on every process;
  works where device_put cannot reach other processes' devices)."""
  value = np.asarray(value)
  return jax.make_array_from_callback(value.shape, replicated_sharding, lambda index: value[index])


def _variables_item(state):
  """The checkpoint's "variables" item of a state (or of its abstract twin)."""
  return {"params": state.params, **({"batch_stats": state.batch_stats}
                                     if state.batch_stats else {})}


def _get(config_dict, dotted):
  node = config_dict
  for part in dotted.split("."):
    node = node.get(part) if isinstance(node, dict) else None
  return node


def check_resume_compatible(meta, run):
  """TrainingError listing every setting that differs from the checkpoint's in a way that makes
  resuming meaningless (shapes of the state, data order)."""
  saved = meta["config"]
  now = config_utils.to_dict(run.config)
  problems = [f"{key}: checkpoint {_get(saved, key)!r}, now {_get(now, key)!r}"
              for key in RESUME_KEYS if _get(saved, key) != _get(now, key)]
  saved_spec = checkpoint.dataset_spec(meta)
  if saved_spec.shape != run.spec.shape:
    problems.append(f"volume shape: checkpoint {saved_spec.shape}, dataset now "
                    f"{run.spec.shape}")
  for name, value in (("global_batch", run.global_batch),
                      ("process_count", jax.process_count())):
    if meta.get(name) != value:
      problems.append(f"{name}: checkpoint {meta.get(name)}, now {value}")
  if problems:
    raise TrainingError(
        f"{run.workdir!r} holds checkpoints of a run that cannot be resumed with these settings "
        f"(latest: {meta['checkpoint_path']}):\n  " + "\n  ".join(problems)
        + "\nUse the same settings, or another --output_dir to start a new run.")


# --- Loop helpers ---------------------------------------------------------------------------------

def _preemption_service_running():
  """Whether jax.distributed.initialize started the preemption sync manager (on by default)."""
  from jax._src import distributed  # pylint: disable=import-outside-toplevel
  return getattr(distributed.global_state, "preemption_sync_manager", None) is not None


class StopRequest:
  """Records SIGTERM / SIGINT (and jax's multi-host preemption notice) so the loop can save a
  checkpoint and exit cleanly. Single process: Python handlers for both signals. Several
  processes: SIGTERM is left to jax's preemption service (all processes agree on the step via
  reached_preemption_sync_point) when it runs, else recorded like SIGINT; SIGINT is recorded
  locally and agreed on at log points.
  `deadline` (time.time() seconds, optional): past it, a stop is requested the same way
  (config train.max_minutes)."""

  def __init__(self, deadline=None):
    self.reason = None
    self.deadline = deadline
    self._previous = {}
    self.multiprocess = jax.process_count() > 1
    self.preemption_service = self.multiprocess and _preemption_service_running()
    if self.multiprocess and not self.preemption_service:
      _say("note: jax's preemption service is off (jax_enable_preemption_service): SIGTERM is "
           "handled at log points (train.log_every_steps), like Ctrl-C")

  def __enter__(self):
    if threading.current_thread() is not threading.main_thread():
      return self
    signals = (signal.SIGINT,) if self.preemption_service else (signal.SIGTERM, signal.SIGINT)
    for sig in signals:
      self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)

  def _handle(self, signum, frame):
    del frame
    if self.reason is not None and signum == signal.SIGINT:
      raise KeyboardInterrupt  # second Ctrl-C: stop now
    self.reason = signal.Signals(signum).name

  def preempted(self, step):
    """jax's preemption sync point (multi-process only); call at every step."""
    if not self.preemption_service:
      return False
    return multihost_utils.reached_preemption_sync_point(step)

  def agreed(self):
    """Whether any process asked to stop (a collective in multi-process runs)."""
    if self.reason is None and self.deadline is not None and time.time() >= self.deadline:
      self.reason = "time budget"
    if not self.multiprocess:
      return self.reason is not None
    flags = multihost_utils.process_allgather(np.int32(self.reason is not None))
    return bool(np.any(flags))


class MetricsBuffer:
  """Per-step metrics kept on the device until `flush` brings them to the host in one copy."""

  def __init__(self):
    self.first_step = None
    self.pending = []

  def add(self, step, metrics):
    if self.first_step is None:
      self.first_step = step
    self.pending.append(metrics)

  def flush(self):
    """(first step, {name: np.ndarray of per-step values}) or None when empty."""
    if not self.pending:
      return None
    pending = jax.device_get(self.pending)   # one transfer of all the (replicated) scalars
    first = self.first_step
    self.first_step, self.pending = None, []
    return first, {k: np.stack([np.asarray(m[k]) for m in pending]) for k in pending[0]}


def first_nonfinite(first_step, values):
  """Step number (1-based: the update that produced it) of the first NaN/Inf loss or gradient
  norm in a flushed buffer, or None."""
  bad = ~(np.isfinite(values["loss"]) & np.isfinite(values["grad_norm"]))
  return first_step + int(np.argmax(bad)) if bad.any() else None


def validate(run, state):
  """Retrieval metrics of the validation split (config train.val_split) for the current state,
  or None when the dataset has no such split."""
  split = run.config.train.val_split
  if split not in run.spec.split_sizes:
    return None
  image, text = evaluate.extract_split_embeddings(
      run.model, state.variables(), run.builder, run.spec, split, run.tokenizer, run.mesh,
      int(run.config.eval.batch_size_per_device))
  return metrics_lib.retrieval_metrics(text, image,
                                       ks=tuple(run.config.eval.recall_ks),
                                       ties=run.config.eval.ties)


def flat_val_metrics(result):
  """{"val_t2i_R@10": ..., "val_i2t_MdR": ...} from a retrieval_metrics dict."""
  return {f"val_{direction}_{name}": value for direction in metrics_lib.DIRECTIONS
          for name, value in result[direction].items()}


def _due(step, every, steps_per_epoch, total):
  """Whether a periodic action (every N steps; 0 = at each epoch end) falls on `step`."""
  period = int(every) or steps_per_epoch
  return step % period == 0 or step == total


def _say(message):
  if jax.process_index() == 0:
    print(message, flush=True)


# --- The loop -------------------------------------------------------------------------------------

def train_and_evaluate(config, workdir=None):
  """Trains (or resumes) the model of `config`, writing logs and checkpoints under `workdir`
  (default config.output_dir).

  Returns a summary dict: {"step", "stopped": "finished" | "SIGTERM" | "SIGINT" | "preempted",
  "last_checkpoint", "val_metrics", "checkpoint_dir", "metrics_file"}. Raises Diverged on a
  NaN/Inf loss and TrainingError for unusable settings.
  """
  run = setup_run(config, workdir)
  ckpt_dir = checkpoint.checkpoint_dir(run.workdir)
  manager = checkpoint.make_manager(ckpt_dir, keep=config.train.keep_checkpoints)
  try:
    return _train(run, manager, ckpt_dir)
  finally:
    manager.wait_until_finished()
    manager.close()


def _train(run, manager, ckpt_dir):
  config = run.config
  state, meta = initial_state(run, manager)
  start = int(meta["step"]) if meta else 0
  base_key_data = (np.asarray(meta["rng_key_data"], np.uint32) if meta
                   else np.asarray(jax.random.key_data(jax.random.key(config.seed))))
  base_key = replicated_array(base_key_data, sharding.replicated(run.mesh))
  metrics_file = os.path.join(run.workdir, logging_lib.METRICS_FILE)
  _say(f"training {config.model.backbone} on {run.spec.directory}: {run.total_steps} steps "
       f"({run.steps_per_epoch} per epoch, global batch {run.global_batch}, "
       f"{run.mesh.size} devices {dict(run.mesh.shape)}, {jax.process_count()} process(es))\n"
       f"  metrics: {metrics_file}\n  checkpoints: {ckpt_dir}"
       + (f"\n  resuming from step {start}: {meta['checkpoint_path']}" if meta else ""))
  summary = {"step": start, "stopped": "finished", "val_metrics": meta and meta["val_metrics"],
             "last_checkpoint": meta and meta["checkpoint_path"], "checkpoint_dir": ckpt_dir,
             "metrics_file": metrics_file}
  if start >= run.total_steps:
    _say(f"already trained to step {start} (of {run.total_steps}); nothing to do")
    return summary
  step_fn = make_train_step(run.model, run.tx, run.schedule, config, run.spec.intensity, run.mesh,
                            jax.tree.map(lambda x: x.sharding, state))
  from medfinder_jax import input_pipeline  # pylint: disable=import-outside-toplevel  (TF)
  batches = input_pipeline.train_batches(
      run.builder, "train", run.local_batch, run.tokenizer, seed=config.seed, start_batch=start,
      shuffle_buffer=config.train.shuffle_buffer, window_words=config.text.window_words)
  device_batches = input_pipeline.prefetch_to_device(batches, run.mesh)
  logger = logging_lib.MetricsLogger.from_config(config, resume_step=start,
                                                 directory=run.workdir)
  loop = _Loop(run, manager, logger, state, start, base_key, base_key_data, summary)
  minutes = float(config.train.max_minutes)
  deadline = time.time() + 60 * minutes if minutes > 0 else None
  with logger, StopRequest(deadline) as stop, logging_lib.progress_bar(
      run.total_steps, initial=start, desc="train") as bar:
    loop.bar = bar
    try:
      for batch in device_batches:
        loop.state, metrics = step_fn(loop.state, batch, base_key)
        loop.step += 1
        loop.buffer.add(loop.step, metrics)
        bar.update(1)
        if loop.after_step(stop):
          break
    finally:
      device_batches.close()
  return summary


class _Loop:
  """The loop's mutable bookkeeping: logging, validation, checkpoints, stopping."""

  def __init__(self, run, manager, logger, state, step, base_key, base_key_data, summary):
    self.run, self.manager, self.logger = run, manager, logger
    self.state, self.step = state, step
    self.base_key, self.base_key_data = base_key, base_key_data
    self.summary = summary
    self.buffer = MetricsBuffer()
    self.bar = None
    self.val_metrics = summary["val_metrics"]
    self.last_log = (time.time(), step)

  def after_step(self, stop):
    """Periodic work after a step; True when the loop must end."""
    run, cfg, step = self.run, self.run.config.train, self.step
    preempted = stop.preempted(step)
    at_log = step % max(1, int(cfg.log_every_steps)) == 0
    requested = preempted or ((at_log or not stop.multiprocess) and stop.agreed())
    evaluate_now = _due(step, cfg.eval_every_steps, run.steps_per_epoch, run.total_steps)
    save_now = evaluate_now or requested or _due(step, cfg.checkpoint_every_steps,
                                                 run.steps_per_epoch, run.total_steps)
    if at_log or save_now:
      self.log_metrics()
    val = None
    if evaluate_now:
      val = self.validate()
    if save_now:
      self.save(val)
    self.summary["step"] = step
    if requested:
      self.summary["stopped"] = "preempted" if preempted else (stop.reason or "signal")
      _say(f"\nstopped at step {step} ({self.summary['stopped']}); checkpoint saved: "
           f"{self.summary['last_checkpoint']}\nrerun the same command to resume")
      return True
    return step >= run.total_steps

  def log_metrics(self):
    flushed = self.buffer.flush()
    if flushed is None:
      return
    first, values = flushed
    bad = first_nonfinite(first, values)
    if bad is not None:
      self.diverged(bad, values, first)
    now = time.time()
    elapsed, steps = now - self.last_log[0], self.step - self.last_log[1]
    self.last_log = (now, self.step)
    record = {name: float(np.mean(v)) for name, v in values.items()}
    record.update(epoch=(self.step - 1) // self.run.steps_per_epoch,
                  steps_per_sec=steps / max(elapsed, 1e-9),
                  volumes_per_sec=steps * self.run.global_batch / max(elapsed, 1e-9))
    self.logger.log(self.step, record)
    self.bar.set_postfix(loss=f"{record['loss']:.4f}", refresh=False)

  def diverged(self, bad, values, first):
    self.manager.wait_until_finished()
    last = self.manager.latest_step()
    where = (f"the last good checkpoint is step {last}: "
             f"{os.path.join(str(self.manager.directory), str(last))}" if last is not None
             else "no checkpoint was written before it")
    loss = values["loss"][bad - first]
    advice = "lower train.lr or add train.warmup_steps"
    if self.run.config.model.dtype != "float32":
      advice += ", or train with model.dtype float32"
    raise Diverged(f"training diverged: the loss became {loss} (gradient norm "
                   f"{values['grad_norm'][bad - first]}) at step {bad}; stopped, {where}. "
                   f"To resume from there: {advice}, and rerun with the same output_dir.",
                   bad, last)

  def validate(self):
    result = validate(self.run, self.state)
    if result is None:
      return None
    flat = flat_val_metrics(result)
    self.logger.log(self.step, flat)
    self.val_metrics = {k: result[k] for k in ("t2i", "i2t", "n")}
    self.summary["val_metrics"] = self.val_metrics
    return flat

  def save(self, val):
    run = self.run
    meta = checkpoint.build_meta(
        step=self.step, epoch=self.step // run.steps_per_epoch, batches_consumed=self.step,
        seed=run.config.seed, rng_key_data=self.base_key_data, config=run.config,
        dataset_spec=run.spec, process_count=jax.process_count(), global_batch=run.global_batch,
        val_metrics=self.val_metrics if val is not None else None, bert_config=run.bert_config)
    checkpoint.save(self.manager, self.step, _variables_item(self.state), self.state.opt_state,
                    meta, val)
    self.summary["last_checkpoint"] = os.path.join(str(self.manager.directory), str(self.step))


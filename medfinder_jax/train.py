"""Training: run setup, resume, validation and the train/evaluate loop (`launch.py train`).

Shape of the flax examples: `setup_run` builds what a run needs once (dataset, mesh, tokenizer,
model, optimizer), `initial_state` restores the latest checkpoint or creates a fresh state, and
`train_and_evaluate` runs the loop. The state and the jitted step are in train_step.py.

The loop keeps metrics on the device (logging.MetricsBuffer) and brings them to the host every
`train.log_every_steps` (no per-step sync); it validates (evaluate.evaluate_split, the same path
as `launch.py eval`) and checkpoints periodically, stops on a NaN/Inf loss, and on SIGTERM,
SIGINT, a preemption notice or the time budget (stopping.StopRequest) saves and returns.
"""

import dataclasses
import os
import time
from typing import Any

import jax
import numpy as np

from medfinder_jax import checkpoint
from medfinder_jax import config_utils
from medfinder_jax import convert_weights
from medfinder_jax import distributed
from medfinder_jax import errors
from medfinder_jax import evaluate
from medfinder_jax import input_pipeline
from medfinder_jax import loading
from medfinder_jax import logging as logging_lib
from medfinder_jax import metrics as metrics_lib
from medfinder_jax import sharding
from medfinder_jax import stopping
from medfinder_jax import train_step
from medfinder_jax import zeroshot

# Config fields that fix the shapes of the saved state or the order of the data: a resumed run
# must keep them (anything else, e.g. epochs, lr, log cadence, may change).
RESUME_KEYS = ("seed", "model.backbone", "model.embed_dim", "model.resnet", "model.vit",
               "model.fusion", "loss.contrastive", "loss.learn_temperature", "text.trainable",
               "train.batch_size_per_device", "train.grad_accum_steps", "train.shuffle_buffer",
               "text.max_tokens", "text.pooling")

EXIT_DIVERGED = 3  # launch.py's exit code when the loss became NaN/Inf


class TrainingError(errors.UserError):
  """Training cannot start or go on as configured; the message says what to change."""


class Diverged(RuntimeError):
  """The loss (or gradient norm) became NaN/Inf at `step`; the last good checkpoint is kept."""

  def __init__(self, message, step, last_checkpoint):
    super().__init__(message)
    self.step = step
    self.last_checkpoint = last_checkpoint


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
  steps_per_epoch: int
  total_steps: int
  global_batch: int
  local_batch: int

  def epoch_of(self, step):
    """0-based epoch of the `step`-th optimizer update (1-based)."""
    return (step - 1) // self.steps_per_epoch


def setup_run(config, workdir=None):
  """Dataset, mesh, tokenizer, model and optimizer for `config` (no state yet)."""
  metrics_lib.MetricSettings.from_config(config.eval)   # bad eval settings fail before training
  builder, spec = input_pipeline.open_dataset(input_pipeline.resolve_dataset_dir(config.data))
  mesh = sharding.make_mesh(config.mesh)
  accum = int(config.train.grad_accum_steps)
  global_batch, local_batch = sharding.batch_rows(config.train.batch_size_per_device, mesh, accum)
  train_size = spec.split_sizes.get("train", 0)
  steps_per_epoch = train_size // global_batch
  if steps_per_epoch < 1:
    raise TrainingError(
        f"the train split of {spec.directory!r} has {train_size} studies, fewer than one global "
        f"batch of {global_batch} (train.batch_size_per_device={config.train.batch_size_per_device}"
        f" x {sharding.num_batch_shards(mesh)} batch shards (data x fsdp) x "
        f"train.grad_accum_steps={accum}); lower the batch size")
  total_steps = int(config.train.max_steps) or int(config.train.epochs) * steps_per_epoch
  tokenizer, bert_config = loading.text_tower(config.text)
  return Run(config=config, workdir=workdir or config.output_dir, builder=builder, spec=spec,
             mesh=mesh, rules=sharding.PartitionRules.from_config(config.mesh),
             tokenizer=tokenizer, model=loading.build_model(config, bert_config, mesh),
             bert_config=bert_config, tx=train_step.make_optimizer(config.train, total_steps),
             steps_per_epoch=steps_per_epoch, total_steps=total_steps,
             global_batch=global_batch, local_batch=local_batch)


def initial_state(run, manager):
  """(state, meta or None): restored from the newest intact checkpoint, else freshly
  initialised. A damaged step (files missing or unreadable) is moved aside to <step>.damaged
  with a note saying why, and the step before it is tried."""
  for step in sorted(manager.all_steps(), reverse=True):
    try:
      return _restored_state(run, manager, step)
    except checkpoint.DamagedCheckpoint as err:
      moved = checkpoint.set_aside(manager, step)
      _say(f"note: skipping damaged checkpoint step {step} (moved aside to {moved}): {err}")
  _, text_params = convert_weights.load_hf_bert(run.tokenizer.folder)
  state = train_step.create_train_state(run.model, run.tx, run.config, run.spec.shape,
                                        jax.random.key(run.config.seed), run.mesh, run.rules,
                                        text_params)
  return state, None


def _restored_state(run, manager, step):
  meta = checkpoint.restore_meta(manager, step)
  check_resume_compatible(meta, run)
  abstract = train_step.abstract_train_state(run.model, run.tx, run.config, run.spec.shape,
                                             run.mesh, run.rules)
  variables, opt_state = checkpoint.restore_train(
      manager, step, abstract.variables(), abstract.opt_state)
  trainable, frozen = train_step.split_params(variables["params"], abstract.frozen.keys())
  state = abstract.replace(
      step=sharding.replicate(np.int32(meta["step"]), run.mesh), trainable=trainable,
      frozen=frozen, batch_stats=variables.get("batch_stats", {}), opt_state=opt_state)
  return state, meta


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

def first_nonfinite(first_step, values):
  """Step number (1-based: the update that produced it) of the first NaN/Inf loss or gradient
  norm in a flushed buffer, or None."""
  bad = ~(np.isfinite(values["loss"]) & np.isfinite(values["grad_norm"]))
  return first_step + int(np.argmax(bad)) if bad.any() else None


def validate(run, state):
  """Retrieval metrics of the validation split (config train.val_split) for the current state,
  or None when the dataset has no such split: evaluate.evaluate_split, as `launch.py eval`
  computes them, without bootstrap intervals, keyword queries, volume->volume retrieval or
  zero-shot classification (model selection uses retrieval only)."""
  split = run.config.train.val_split
  if split not in run.spec.split_sizes:
    return None
  settings = dataclasses.replace(
      metrics_lib.MetricSettings.from_config(run.config.eval, run.config.seed,
                                             bootstrap_samples=0),
      volume_ks=(), zeroshot=zeroshot.ZeroShotSettings(enabled=False))
  return evaluate.evaluate_split(
      run.model, state.variables(), run.builder, run.spec, split, run.tokenizer, run.mesh,
      settings, batch_size_per_device=int(run.config.eval.batch_size_per_device)).metrics


def flat_val_metrics(result):
  """{"val_t2i_R@10": ..., "val_i2t_MdR": ...} from a retrieval_metrics dict."""
  return {f"val_{direction}_{name}": value for direction in metrics_lib.DIRECTIONS
          for name, value in result[direction].items()}


def _due(step, every, steps_per_epoch, total):
  """Whether a periodic action (every N steps; 0 = at each epoch end) falls on `step`."""
  period = int(every) or steps_per_epoch
  return step % period == 0 or step == total


def _say(message):
  if distributed.is_main_process():
    print(message, flush=True)


# --- The loop -------------------------------------------------------------------------------------

def train_and_evaluate(config, workdir=None):
  """Trains (or resumes) the model of `config`, writing logs and checkpoints under `workdir`
  (default config.output_dir).

  Returns a summary dict: {"step", "stopped": "finished" | "SIGTERM" | "SIGINT" | "preempted" |
  "time budget", "last_checkpoint", "val_metrics", "checkpoint_dir", "metrics_file"}. Raises
  Diverged on a NaN/Inf loss and a UserError subclass for unusable settings.
  """
  run = setup_run(config, workdir)
  ckpt_dir = checkpoint.checkpoint_dir(run.workdir)
  manager = checkpoint.make_manager(ckpt_dir, keep=config.train.keep_checkpoints)
  try:
    return _train(run, manager, ckpt_dir)
  finally:
    try:
      checkpoint.wait_until_finished(manager)
    finally:
      manager.close()


def _train(run, manager, ckpt_dir):
  config = run.config
  state, meta = initial_state(run, manager)
  start = int(meta["step"]) if meta else 0
  base_key_data = (np.asarray(meta["rng_key_data"], np.uint32) if meta
                   else np.asarray(jax.random.key_data(jax.random.key(config.seed))))
  base_key = sharding.replicate(base_key_data, run.mesh)
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
  step_fn = train_step.make_train_step(config, run.spec.intensity, run.mesh,
                                       jax.tree.map(lambda x: x.sharding, state))
  batches = input_pipeline.train_batches(
      run.builder, "train", run.local_batch, run.tokenizer, seed=config.seed, start_batch=start,
      shuffle_buffer=config.train.shuffle_buffer, window_words=config.text.window_words)
  device_batches = input_pipeline.prefetch_to_device(batches, run.mesh)
  logger = logging_lib.MetricsLogger.from_config(config, resume_step=start,
                                                 directory=run.workdir)
  loop = _Loop(run, manager, logger, state, start, base_key_data, summary)
  minutes = float(config.train.max_minutes)
  deadline = time.time() + 60 * minutes if minutes > 0 else None
  with logger, stopping.StopRequest(deadline) as stop, logging_lib.progress_bar(
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

  def __init__(self, run, manager, logger, state, step, base_key_data, summary):
    self.run, self.manager, self.logger = run, manager, logger
    self.state, self.step = state, step
    self.base_key_data = base_key_data
    self.summary = summary
    self.buffer = logging_lib.MetricsBuffer()
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
    record.update(epoch=self.run.epoch_of(self.step),
                  steps_per_sec=steps / max(elapsed, 1e-9),
                  volumes_per_sec=steps * self.run.global_batch / max(elapsed, 1e-9))
    self.logger.log(self.step, record)
    self.bar.set_postfix(loss=f"{record['loss']:.4f}", refresh=False)

  def diverged(self, bad, values, first):
    checkpoint.wait_until_finished(self.manager)
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
        step=self.step, epoch=run.epoch_of(self.step), batches_consumed=self.step,
        seed=run.config.seed, rng_key_data=self.base_key_data, config=run.config,
        dataset_spec=run.spec, process_count=jax.process_count(), global_batch=run.global_batch,
        val_metrics=self.val_metrics if val is not None else None, bert_config=run.bert_config)
    checkpoint.save(self.manager, self.step, self.state.variables(), self.state.opt_state,
                    meta, val)
    self.summary["last_checkpoint"] = os.path.join(str(self.manager.directory), str(self.step))

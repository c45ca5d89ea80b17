"""Training checkpoints on disk (orbax): save, find, and read back steps. Persistence only:
what a checkpoint's contents mean (the model, its text tower) is loading.py's business.

Layout (one orbax CheckpointManager at `<output_dir>/checkpoints`; saves are async and atomic:
a step directory appears under its final name only once every process has finished writing):

  <output_dir>/checkpoints/
    <step>/                      step = optimizer updates done (an int, e.g. 120)
      variables/                 {"params": model params (loss scalars included),
                                  "batch_stats": ResNet BatchNorm statistics} (orbax PyTree)
      opt_state/                 optax state (frozen text tower: none stored) (orbax PyTree)
      meta/                      JSON, see `build_meta`
      metrics/                   JSON {"val_t2i_R@10": ...} when the step was validated
      _CHECKPOINT_METADATA       orbax's own bookkeeping

Kept: the latest `train.keep_checkpoints` steps plus the best one by validation text->image
R@10 (the released code's model selection); every other step is deleted by orbax after a save.
"""

import contextlib
import dataclasses
import os
import re
import shutil
import sys

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from orbax.checkpoint import checkpoint_managers

from data_prep import schema
from medfinder_jax import config_utils
from medfinder_jax import distributed
from medfinder_jax import errors
from medfinder_jax import interchange
from medfinder_jax import logging as logging_lib

CHECKPOINT_DIR = "checkpoints"
ITEMS = ("variables", "opt_state", "meta")
BEST_METRIC = "val_t2i_R@10"   # key of the metrics dict saved with a validated step
META_VERSION = 2   # 2: loss scalars are model parameters (params["logit_scale"], ...)


# Orbax notices about what this module does on purpose: steps saved without validation metrics
# (e.g. at SIGTERM between validations), read-only managers for loading.
logging_lib.drop_library_notices("did not provide metrics", "Given directory is read only",
                                 "read_only=True, setting", "overriding jax.Array")


class CheckpointError(errors.UserError):
  """A path that holds no usable checkpoint, or a checkpoint that cannot be used as asked."""


class DamagedCheckpoint(CheckpointError):
  """A step whose files are missing or unreadable (a copy cut short, a disk error, a kill
  while files were replaced by hand); the message names the step directory and what failed."""


class CheckpointWriteError(CheckpointError):
  """A checkpoint could not be written (e.g. the disk is full); earlier steps are intact."""


# Status lines of TensorStore errors (the part of orbax's long messages that says what failed).
_STORE_STATUS = re.compile(r"\b(?:DATA_LOSS|OUT_OF_RANGE|NOT_FOUND|INVALID_ARGUMENT|"
                           r"FAILED_PRECONDITION|RESOURCE_EXHAUSTED|UNKNOWN): [^\n]*")


# --- Manager --------------------------------------------------------------------------------------

def checkpoint_dir(output_dir):
  """Absolute `<output_dir>/checkpoints` (orbax wants absolute paths)."""
  return os.path.join(os.path.abspath(output_dir), CHECKPOINT_DIR)


def _best_metric(metrics):
  return float(metrics[BEST_METRIC])


def make_manager(directory, keep=3, read_only=False, enable_async=True):
  """CheckpointManager over `directory` keeping the latest `keep` steps and the best one.

  All processes must create it (and call save) together; only process 0 writes the JSON items.
  """
  _plain_array_saving_on_cpu()
  latest = checkpoint_managers.LatestN(n=max(1, int(keep)))
  best = checkpoint_managers.BestN(get_metric_fn=_best_metric, reverse=False, n=1,
                                   keep_checkpoints_without_metrics=False)
  options = ocp.CheckpointManagerOptions(
      best_fn=_best_metric, best_mode="max", create=not read_only, read_only=read_only,
      preservation_policy=None if read_only else checkpoint_managers.AnyPreservationPolicy(
          [latest, best]),
      enable_async_checkpointing=enable_async,
      cleanup_tmp_directories=not read_only)  # half-written steps of a killed run
  return ocp.CheckpointManager(directory, options=options, item_names=ITEMS)


_PLAIN_ARRAY_SAVING = False


def _plain_array_saving_on_cpu():
  """On CPU, orbax's replica-parallel saving (its default off GPU) slices every replicated
  array with a newly compiled op per shape: ~10 s of compiles at the first save of a small
  model and nothing gained on one host's memory. Saving whole replicas is what GPUs do."""
  global _PLAIN_ARRAY_SAVING
  if jax.default_backend() == "cpu" and not _PLAIN_ARRAY_SAVING:
    _PLAIN_ARRAY_SAVING = True
    ocp.type_handlers.register_type_handler(
        jax.Array, ocp.type_handlers.ArrayHandler(use_replica_parallel=False), override=True)


def save(manager, step, variables, opt_state, meta, val_metrics=None):
  """Starts an (async) save of one step; `val_metrics` = {"val_t2i_R@10": float, ...} or None.

  The arrays are copied off the device before this returns, so the caller may donate them to
  the next train step. Returns False when the step already exists. CheckpointWriteError when
  this save, or the previous one still being written, fails (e.g. a full disk): orbax writes a
  step under a temporary name and renames it when complete, so the steps before stay intact.
  """
  if step in manager.all_steps():
    return False
  wait_until_finished(manager)    # orbax waits for the previous save anyway; then measure
  check_space(manager, step, (variables, opt_state))
  args = ocp.args.Composite(variables=ocp.args.StandardSave(variables),
                            opt_state=ocp.args.StandardSave(opt_state),
                            meta=ocp.args.JsonSave(meta))
  metrics = None
  if val_metrics and BEST_METRIC in val_metrics:
    metrics = {k: float(v) for k, v in val_metrics.items()}
  with _writing(manager, step):
    return manager.save(step, args=args, metrics=metrics, force=True)


def wait_until_finished(manager):
  """Blocks until the async save in flight is on disk; CheckpointWriteError when it failed."""
  with _writing(manager, None):
    manager.wait_until_finished()


SPACE_MARGIN = 1.1   # a step's files take at most this much more than its arrays' bytes


def check_space(manager, step, trees):
  """CheckpointWriteError, before anything is written, when the checkpoint directory's
  filesystem cannot hold one more step of `trees` (their arrays' bytes x SPACE_MARGIN): a
  clean stop instead of a write failing half way. All processes agree (a collective)."""
  need = SPACE_MARGIN * sum(getattr(leaf, "nbytes", 0) for leaf in jax.tree.leaves(trees))
  free = shutil.disk_usage(str(manager.directory)).free
  enough = np.int32(free >= need)
  if jax.process_count() > 1:
    enough = np.int32(np.all(multihost_utils.process_allgather(enough)))
  if not enough:
    done = sorted(manager.all_steps())
    raise CheckpointWriteError(
        f"{manager.directory}: not enough space for checkpoint step {step}: it needs about "
        f"{need / 2**20:.0f} MiB and {free / 2**20:.0f} MiB are free; the steps saved before "
        f"({done or 'none'}) are intact: free space (or use another --output_dir) and rerun the "
        f"same command to resume")


@contextlib.contextmanager
def _writing(manager, step):
  try:
    yield
  except Exception as err:  # orbax re-raises a failed async write as whatever the writer hit
    failed = re.search(r"/(\d+)\.orbax-checkpoint-tmp", str(err))   # the step being written
    what = (f"step {failed.group(1)}" if failed else f"step {step}" if step is not None
            else "the last checkpoint")
    done = sorted(manager.all_steps())
    raise CheckpointWriteError(
        f"{manager.directory}: cannot write {what} ({_reason(err)}); the steps saved before "
        f"({done or 'none'}) are intact: free space (or fix the disk) and rerun the same command "
        f"to resume") from None


def _reason(err):
  """What an orbax / TensorStore / OS error says went wrong, in one line."""
  for cause in (err, err.__cause__, err.__context__):
    if isinstance(cause, OSError) and cause.strerror:
      return f"{cause.strerror}" + (f": {cause.filename}" if cause.filename else "")
  text = "\n".join(str(e) for e in (err, err.__cause__, err.__context__) if e is not None)
  os_error = re.search(r"\[os_error_code='(\d+)'\]", text)
  if os_error:       # TensorStore's report of an OS error: say it as the OS does
    written = re.search(r'Failed writing: "([^"]+)"', text)
    return os.strerror(int(os_error.group(1))) + (f": {written.group(1)}" if written else "")
  status = _STORE_STATUS.search(text)
  first = status.group(0) if status else (text.strip().splitlines() or [type(err).__name__])[0]
  return first[:400]


def _restore(manager, step, **items):
  """manager.restore of `items` ({name: orbax args}) at `step`; DamagedCheckpoint naming the
  step directory and what failed when an item is missing or cannot be read."""
  step_dir = os.path.join(str(manager.directory), str(step))
  missing = [name for name in items if not os.path.isdir(os.path.join(step_dir, name))]
  if missing:
    raise DamagedCheckpoint(f"{step_dir}: {', '.join(f'{m}/' for m in missing)} missing "
                            f"(the step is incomplete)")
  try:
    return manager.restore(step, args=ocp.args.Composite(**items))
  except Exception as err:  # orbax / TensorStore raise bare Exceptions for unreadable data
    raise DamagedCheckpoint(f"{step_dir}: cannot read {' and '.join(items)}: "
                            f"{_reason(err)}") from None


def _drop_reports_of_abandoned_io():
  """When one read (or write) of a step fails, orbax's others still finish in TensorStore's
  threads and report into an event loop orbax has closed, each as an "exception ignored"
  traceback: dozens, around the one line that says what failed, and from the moment the first
  read fails. They say nothing more: drop them (installed once, before any checkpoint I/O),
  and keep every other unraisable exception reported as before."""
  previous = sys.unraisablehook
  if getattr(previous, "drops_abandoned_reads", False):
    return

  def hook(unraisable):
    value = unraisable.exc_value
    if isinstance(value, RuntimeError) and "Event loop is closed" in str(value):
      return
    if "_read_array_index" in repr(unraisable.object):   # a read coroutine left unfinished
      return
    previous(unraisable)

  hook.drops_abandoned_reads = True
  sys.unraisablehook = hook


_drop_reports_of_abandoned_io()


def set_aside(manager, step):
  """Renames a damaged step's directory to <step>.damaged (orbax ignores it; its files stay for
  inspection) and reloads the manager's step list. Returns the new path. Every process calls
  this together; process 0 renames."""
  path = os.path.join(str(manager.directory), str(step))
  target = path + ".damaged"
  if distributed.is_main_process():
    suffix = 1
    while os.path.exists(target):
      suffix += 1
      target = f"{path}.damaged{suffix}"
    os.replace(path, target)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(f"checkpoint.set_aside {step}")
  manager.reload()
  return target


def restore_train(manager, step, abstract_variables, abstract_opt_state):
  """(variables, opt_state) of `step`, placed by the shardings of the abstract targets
  (jax.ShapeDtypeStructs with .sharding, e.g. from sharding.sharded_abstract)."""
  restored = _restore(manager, step, variables=ocp.args.StandardRestore(abstract_variables),
                      opt_state=ocp.args.StandardRestore(abstract_opt_state))
  return restored["variables"], restored["opt_state"]


def restore_meta(manager, step):
  """The meta dict of `step` (see `build_meta`) plus "checkpoint_path" (the step dir).

  CheckpointError for a checkpoint of another format version (older ones are not read),
  DamagedCheckpoint for one that cannot be read."""
  meta = _restore(manager, step, meta=ocp.args.JsonRestore())["meta"]
  if not isinstance(meta, dict):
    raise DamagedCheckpoint(f"{os.path.join(str(manager.directory), str(step))}/meta: not a "
                            f"JSON object")
  meta = dict(meta)
  meta["checkpoint_path"] = os.path.join(str(manager.directory), str(step))
  if meta.get("version") != META_VERSION:
    raise CheckpointError(f"{meta['checkpoint_path']}: checkpoint format version "
                          f"{meta.get('version')!r}; this version of launch.py reads version "
                          f"{META_VERSION} only: train again, or use the version that wrote it")
  return meta


# --- Meta -----------------------------------------------------------------------------------------

def build_meta(*, step, epoch, batches_consumed, seed, rng_key_data, config, dataset_spec,
               process_count, global_batch, val_metrics=None, bert_config=None):
  """The JSON "meta" item of a checkpoint.

  step: optimizer updates done; epoch: 0-based epoch of the last of them;
  batches_consumed: host batches each process has read (the data position to resume at);
  seed / rng_key_data: the run's seed and the raw uint32 data of its base PRNG key (per-step
  keys are fold_in(key, step)); config: the full ConfigDict; dataset_spec: the
  schema.DatasetSpec trained on (its preprocessing, split sizes); val_metrics:
  the last validation metrics dict (or None); bert_config: the text tower's BertConfig.
  """
  return {
      "version": META_VERSION,
      "step": int(step),
      "epoch": int(epoch),
      "batches_consumed": int(batches_consumed),
      "seed": int(seed),
      "rng_key_data": [int(x) for x in np.asarray(rng_key_data).reshape(-1)],
      "process_count": int(process_count),
      "global_batch": int(global_batch),
      "config": config_utils.to_dict(config),
      "dataset": dataset_spec.to_dict(),
      "val_metrics": interchange.json_safe(val_metrics, nonfinite_as_none=True) if val_metrics is not None else None,
      "bert_config": dataclasses.asdict(bert_config) if bert_config is not None else None,
  }


def dataset_spec(meta):
  """The schema.DatasetSpec a checkpoint was trained on (its volumes' preprocessing)."""
  try:
    return schema.DatasetSpec.from_dict(meta.get("dataset"), meta["checkpoint_path"])
  except ValueError as err:
    raise CheckpointError(str(err)) from None


def config_from_meta(meta):
  """The ConfigDict saved in a checkpoint's meta (JSON lists back to tuples)."""
  def tuples(value):
    if isinstance(value, dict):
      return {k: tuples(v) for k, v in value.items()}
    if isinstance(value, list):
      return tuple(tuples(v) for v in value)
    return value
  return ml_collections.ConfigDict(tuples(meta["config"]))


# --- Finding checkpoints --------------------------------------------------------------------------

def _is_step_dir(path):
  """A numbered directory holding a step's items or orbax's bookkeeping (possibly damaged: the
  reads say what is missing)."""
  return (re.fullmatch(r"\d+", os.path.basename(os.path.normpath(path))) is not None
          and any(os.path.exists(os.path.join(path, name))
                  for name in ITEMS + ("_CHECKPOINT_METADATA",)))


def resolve(path):
  """(checkpoints directory, step or None) for a run's output_dir, its checkpoints dir or one
  step dir; CheckpointError (naming `path`) when it is none of these."""
  if not os.path.isdir(path):
    raise CheckpointError(f"checkpoint path {path!r} does not exist")
  path = os.path.abspath(path)
  if _is_step_dir(path):
    return os.path.dirname(path), int(os.path.basename(path))
  for candidate in (os.path.join(path, CHECKPOINT_DIR), path):
    if os.path.isdir(candidate) and any(_is_step_dir(os.path.join(candidate, name))
                                        for name in os.listdir(candidate)):
      return candidate, None
  raise CheckpointError(
      f"{path!r} holds no checkpoint: expected a training output_dir (with "
      f"{CHECKPOINT_DIR}/<step>/), its {CHECKPOINT_DIR}/ folder, or one <step>/ folder "
      "written by `launch.py train`")


def _open(path, step):
  """(read-only manager, chosen step): `step`, else the path's step, else best, else latest."""
  directory, path_step = resolve(path)
  manager = make_manager(directory, read_only=True, enable_async=False)
  steps = manager.all_steps()
  if not steps:
    raise CheckpointError(f"{directory!r} holds no finished checkpoint")
  chosen = step if step is not None else path_step
  if chosen is None:
    chosen = manager.best_step()   # highest val t2i R@10 (the latest of ties); None unvalidated
  if chosen is None:
    chosen = manager.latest_step()
  if chosen not in steps:
    raise CheckpointError(f"{directory!r} has no step {chosen}; it has steps {sorted(steps)}")
  return manager, int(chosen)


def steps(path):
  """{"directory", "steps": sorted finished steps, "latest", "best" (None without validated
  steps), "metrics": {step: saved validation metrics or None}} of a run's checkpoints."""
  directory, _ = resolve(path)
  manager = make_manager(directory, read_only=True, enable_async=False)
  try:
    metrics = {step: manager.metrics(step) for step in sorted(manager.all_steps())}
    return {"directory": directory, "steps": sorted(metrics), "latest": manager.latest_step(),
            "best": manager.best_step(), "metrics": metrics}
  finally:
    manager.close()


def read_meta(path, step=None):
  """The meta dict of a checkpoint (see `build_meta`) plus "checkpoint_path" (the step dir).

  path: output_dir, its checkpoints dir or a step dir; step: None = the path's own step, else
  the best validated step, else the latest.
  """
  manager, step = _open(path, step)
  try:
    return restore_meta(manager, step)
  finally:
    manager.close()


# --- Reading one checkpoint ----------------------------------------------------------------------

def read_variables(path, abstract_variables, step=None):
  """The "variables" item of a checkpoint, placed as `abstract_variables` says (a tree of
  jax.ShapeDtypeStructs with .sharding: what the model's init would make). path and step as for
  read_meta; pass meta["checkpoint_path"] to read the step whose meta was read."""
  manager, step = _open(path, step)
  try:
    restored = _restore(manager, step, variables=ocp.args.StandardRestore(abstract_variables))
    return {k: dict(v) for k, v in restored["variables"].items()}
  finally:
    manager.close()

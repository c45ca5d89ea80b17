"""Training logs: a JSONL metrics file always, wandb when asked, a tqdm progress bar, and the
buffer that keeps per-step metrics on the device between log points.

Only process 0 writes anything (jax.process_index() == 0); on other processes every call is a
no-op, so the train loop can call these unconditionally. wandb is never required: mode
"disabled" (the default) never imports it, and if the import or wandb.init fails the run warns
and goes on with the JSONL log alone.

JSONL format (one object per line): {"step": int, "time": unix seconds, "<metric>": value, ...}.
Values are numbers, bools or strings; non-finite floats are written as the strings "NaN",
"Infinity", "-Infinity" (strict JSON; float() reads them back).
"""

import json
import logging as std_logging
import math
import os
import secrets
import time

import jax
import numpy as np
import tqdm

from medfinder_jax import distributed
from medfinder_jax.config_utils import ConfigError, to_dict

WANDB_MODES = ("online", "offline", "disabled")
METRICS_FILE = "metrics.jsonl"
WANDB_ID_FILE = "wandb_run_id.txt"  # next to the JSONL: a resumed run continues the same run

_log = std_logging.getLogger(__name__)


class MetricsLogger:
  """Appends metrics to `path` (JSONL) and mirrors them to wandb when a run is active.

  resume_step: when resuming from a checkpoint at this step, lines logged after it (by the
    interrupted run, past its last checkpoint) are dropped so the log reads like one run.
  wandb_mode / wandb_project / wandb_name: see config `wandb`; run_config is stored in wandb.
  is_main: override of "this is process 0" (tests).
  """

  def __init__(self, path, *, resume_step=None, wandb_mode="disabled", wandb_project="",
               wandb_name="", run_config=None, is_main=None):
    if wandb_mode not in WANDB_MODES:
      raise ConfigError(f"config wandb.mode={wandb_mode!r}; expected one of {WANDB_MODES}")
    self.path = path
    self.is_main = distributed.is_main_process() if is_main is None else is_main
    self._file = None
    self._wandb_run = None
    if not self.is_main:
      return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if resume_step is not None:
      drop_records_after(path, resume_step)
    self._file = open(path, "a", encoding="utf-8")
    if wandb_mode != "disabled":
      id_path = os.path.join(os.path.dirname(os.path.abspath(path)), WANDB_ID_FILE)
      self._wandb_run = start_wandb(wandb_mode, wandb_project, wandb_name, run_config, id_path)

  @classmethod
  def from_config(cls, config, resume_step=None, directory=None):
    """`<directory or output_dir>/metrics.jsonl`, wandb settings from config `wandb`, the config
    in wandb."""
    return cls(os.path.join(directory or config.output_dir, METRICS_FILE), resume_step=resume_step,
               wandb_mode=config.wandb.mode, wandb_project=config.wandb.project,
               wandb_name=config.wandb.name, run_config=to_dict(config))

  @property
  def wandb_active(self):
    return self._wandb_run is not None

  def log(self, step, metrics):
    """Writes {"step", "time", **metrics}; metrics are scalars (python, numpy or jax)."""
    if not self.is_main:
      return
    values = {name: json_value(value) for name, value in metrics.items()}
    record = {"step": int(step), "time": round(time.time(), 3), **values}
    self._file.write(json.dumps(record, allow_nan=False) + "\n")
    self._file.flush()
    if self._wandb_run is not None:
      try:
        self._wandb_run.log({k: _wandb_value(v) for k, v in values.items()}, step=int(step))
      except Exception as err:  # pylint: disable=broad-except
        _log.warning("wandb.log failed (%s); continuing with %s only", err, self.path)
        self._wandb_run = None

  def close(self):
    if self._file is not None:
      self._file.close()
      self._file = None
    if self._wandb_run is not None:
      try:
        self._wandb_run.finish()
      except Exception as err:  # pylint: disable=broad-except
        _log.warning("wandb finish failed: %s", err)
      self._wandb_run = None

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


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


class _DropNotices(std_logging.Filter):
  """Drops log records whose message contains any of `texts`."""

  def __init__(self, texts):
    super().__init__()
    self.texts = tuple(texts)

  def filter(self, record):
    message = record.getMessage()
    return not any(text in message for text in self.texts)


def drop_library_notices(*texts):
  """Silences the absl log records (orbax, tfds) that contain any of `texts`: library notices
  about what this project does on purpose, or cannot change, which would print on every
  command and hide the messages that matter."""
  std_logging.getLogger("absl").addFilter(_DropNotices(texts))


def start_wandb(mode, project, name, run_config, id_path):
  """A wandb run (resumed when `id_path` holds an earlier run's id), or None after a warning."""
  try:
    import wandb  # pylint: disable=import-outside-toplevel
  except Exception as err:  # pylint: disable=broad-except
    _log.warning("wandb.mode=%s but wandb cannot be imported (%s); logging to JSONL only",
                 mode, err)
    return None
  try:
    run_id = _read_run_id(id_path) or secrets.token_hex(4)  # wandb ids: [a-z0-9]
    run = wandb.init(project=project or None, name=name or None, mode=mode, config=run_config,
                     dir=os.path.dirname(id_path), id=run_id, resume="allow")
    with open(id_path, "w", encoding="utf-8") as f:
      f.write(run_id + "\n")
    return run
  except Exception as err:  # pylint: disable=broad-except
    _log.warning("wandb.init (mode=%s) failed (%s); logging to JSONL only", mode, err)
    return None


def drop_records_after(path, step):
  """Rewrites the JSONL at `path` keeping records with "step" <= step (and no torn lines)."""
  if not os.path.exists(path):
    return
  kept, dropped = [], 0
  with open(path, encoding="utf-8") as f:
    for line in f:
      try:
        record = json.loads(line)
      except json.JSONDecodeError:
        dropped += 1  # e.g. a line cut by a kill mid-write
        continue
      if isinstance(record, dict) and record.get("step", 0) <= step:
        kept.append(line if line.endswith("\n") else line + "\n")
      else:
        dropped += 1
  if dropped:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
      f.writelines(kept)
    os.replace(tmp, path)
    _log.info("%s: dropped %d record(s) after step %d (resuming there)", path, dropped, step)


def read_metrics(path):
  """The records of a metrics JSONL (a list of dicts), skipping a line torn by a kill."""
  records = []
  with open(path, encoding="utf-8") as f:
    for line in f:
      try:
        record = json.loads(line)
      except json.JSONDecodeError:
        continue
      if isinstance(record, dict):
        records.append(record)
  return records


def json_value(value):
  """A JSON-safe python value for a scalar metric (python, numpy or replicated jax scalar)."""
  if isinstance(value, jax.Array):
    if not value.is_fully_addressable:
      value = value.addressable_data(0)  # replicated across processes: the local copy
    value = np.asarray(jax.device_get(value))
  if isinstance(value, np.ndarray):
    if value.size != 1:
      raise ValueError(f"metric of shape {value.shape}: only scalars go to the metrics log")
    value = value.reshape(()).item()
  elif isinstance(value, np.generic):
    value = value.item()
  if isinstance(value, float) and not math.isfinite(value):
    return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
  return value


def progress_bar(total, initial=0, desc="train", is_main=None, **kwargs):
  """A tqdm bar on process 0 (a silent no-op bar elsewhere): update(n), set_postfix(...)."""
  is_main = distributed.is_main_process() if is_main is None else is_main
  return tqdm.tqdm(total=total, initial=initial, desc=desc, disable=not is_main,
                   dynamic_ncols=True, **kwargs)


def _wandb_value(value):
  return float(value) if value in ("NaN", "Infinity", "-Infinity") else value


def _read_run_id(path):
  if not os.path.exists(path):
    return None
  with open(path, encoding="utf-8") as f:
    return f.read().strip() or None


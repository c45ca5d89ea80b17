"""`launch.py eval` (and `train --eval_only`): a model evaluated on a split of a converted
dataset -> embeddings.npz, metrics.json and optional plots in config.output_dir, and the table.

The model is our checkpoint or a released-code file (loading.py); the dataset is the one the
config names (--config.data.tfrecord_dir, or a converted --data_root), else the one our
checkpoint was trained on. The metrics are computed in memory (evaluate.evaluate_split) and the
files written from that result, so `launch.py metrics` on the written npz gives the same numbers.
Every process takes part (the mesh spans all devices); only process 0 writes and prints.
"""

import os
import sys

import jax

from medfinder_jax import distributed
from medfinder_jax import evaluate
from medfinder_jax import input_pipeline
from medfinder_jax import interchange
from medfinder_jax import loading
from medfinder_jax import logging as logging_lib
from medfinder_jax import metrics as metrics_lib
from medfinder_jax import sharding
from medfinder_jax.commands import metrics as metrics_command

EMBEDDINGS_FILE = "embeddings.npz"


def stderr_log(message):
  print(message, file=sys.stderr, flush=True)


def open_split(config, model_path, split):
  """(builder, spec) of the split to evaluate: the configured dataset, else our checkpoint's."""
  kind = loading.model_kind(model_path)
  directory = input_pipeline.resolve_dataset_dir(config.data, required=kind == "released")
  builder, spec = input_pipeline.open_dataset(directory or loading.trained_on(model_path))
  input_pipeline.split_files(builder, split)
  return builder, spec


def log_notes(notes, log):
  if distributed.is_main_process():
    for note in notes:
      if note:
        log(f"note: {note}")


def run(config, model_path, *, split=None, plots=False, bootstrap_samples=None, log=None):
  """Evaluates and writes the files; returns (metrics, written paths) on process 0, else None."""
  log = log or stderr_log
  split = split or config.eval.split
  settings = metrics_lib.MetricSettings.from_config(config.eval, config.seed, bootstrap_samples)
  builder, spec = open_split(config, model_path, split)
  mesh = sharding.make_mesh(config.mesh)
  loaded = loading.load_model(model_path, config, spec=spec, mesh=mesh)
  log_notes(loaded.notes + [loaded.preprocessing_note(spec)], log)
  per_device = int(config.eval.batch_size_per_device)
  _, local_rows = sharding.batch_rows(per_device, mesh)
  total = input_pipeline.num_eval_batches(input_pipeline.split_files(builder, split), local_rows,
                                          jax.process_count())
  thresholds = validation_thresholds(loaded, builder, spec, split, mesh, settings, per_device, log)
  with logging_lib.progress_bar(total, desc=f"embed {split}", leave=False) as bar:
    evaluation = evaluate.evaluate_split(
        loaded.model, loaded.variables, builder, spec, split, loaded.tokenizer, mesh, settings,
        keywords=tuple(config.eval.keywords), batch_size_per_device=per_device,
        progress=lambda done: bar.update(1), similarity_scale=loaded.similarity_scale,
        label_thresholds=thresholds)
  if not distributed.is_main_process():
    return None
  extra = {"split": split, "dataset": os.path.abspath(spec.directory),
           "model": {k: v for k, v in loaded.identity.items() if k != "config"}}
  return write_evaluation(config.output_dir or ".", evaluation, extra, plots)


def validation_thresholds(loaded, builder, spec, split, mesh, settings, per_device, log):
  """Zero-shot operating points from config eval.zeroshot.threshold_split (Youden's J there),
  or None: zero-shot off, that split is the evaluated one or absent (then chosen on the
  evaluated split, and the result says so)."""
  source = settings.zeroshot.threshold_split
  if not settings.zeroshot.enabled or not source or source == split:
    return None
  if source not in spec.split_sizes:
    log_notes([f"zero-shot thresholds: the dataset has no {source!r} split "
               f"(eval.zeroshot.threshold_split); choosing them on {split!r} itself"], log)
    return None
  return evaluate.operating_points(loaded.model, loaded.variables, builder, spec, source,
                                   loaded.tokenizer, mesh, settings,
                                   similarity_scale=loaded.similarity_scale,
                                   batch_size_per_device=per_device)


def write_evaluation(directory, evaluation, extra, plots):
  """embeddings.npz, metrics.json (with `extra` fields) and, with `plots`, the rank plots into
  `directory`; returns (metrics, written paths)."""
  npz = os.path.join(directory, EMBEDDINGS_FILE)
  written = [metrics_command.checked_write(
      npz, lambda: interchange.save_embeddings(npz, evaluation.embeddings))]
  metrics = {**evaluation.metrics, "embeddings": os.path.abspath(npz), **extra}
  return metrics, written + metrics_command.write_metrics(
      os.path.join(directory, metrics_command.METRICS_FILE), metrics, evaluation.ranks,
      directory if plots else None, evaluation.embeddings)


def format_result(metrics, written):
  """The tables (with chance levels) and the files written."""
  return metrics_lib.format_metrics_table(metrics, show_chance=True) + "\nwrote " + \
      ", ".join(written)

"""`launch.py demo`: the whole chain on a laptop CPU in minutes, proving that retrieval is learned.

phantom corpus (data_prep.phantom_layouts) -> TFRecords (data_prep.convert) -> training
(train.train_and_evaluate, within a time budget) -> test-split evaluation of the best checkpoint
(commands/eval.py) -> the paper-style table beside chance, metrics.json, plots.

Every stage resumes: a rerun with the same output_dir reuses the corpus, finishes the
conversion, continues (or skips) training and evaluates again.

Layout of output_dir:
  phantom/     the synthetic corpus (BIMCV-R layout)
  tfrecords/   the converted dataset (+ conversion_report.json)
  run/         training: metrics.jsonl, checkpoints/
  eval/        embeddings.npz, metrics.json, rank_histogram.png, recall_at_k.png, roc_*.png
  training_curves.png   loss and validation R@10 against the step
"""

import os
import time

from data_prep import convert as convert_lib
from data_prep import corpus_bimcv
from data_prep import phantom
from data_prep import phantom_layouts
from medfinder_jax import errors
from medfinder_jax import logging as logging_lib
from medfinder_jax import metrics as metrics_lib
from medfinder_jax import plots
from medfinder_jax import sharding
from medfinder_jax import train as train_lib
from medfinder_jax.commands import eval as eval_command

PHANTOM_SIZE = 128    # nominal in-plane matrix of the demo's source volumes (quick to generate)
PHANTOM_SLICES = 40


def stage_dirs(output_dir):
  names = ("phantom", "tfrecords", "run", "eval")
  return {name: os.path.join(output_dir, name) for name in names}


def make_corpus(directory, n, seed, log):
  """The phantom corpus of n studies (kept if a complete one is already there)."""
  csv = os.path.join(directory, "meta", "curated_ct_report_path_En.csv")
  if os.path.isfile(csv) and _csv_rows(csv) == n:
    log(f"[1/4] phantom corpus: reusing {directory} ({n} studies)")
    return
  log(f"[1/4] phantom corpus: {n} synthetic chest CT studies with reports -> {directory}")
  phantom_layouts.write_phantom_corpus(directory, n=n, seed=seed, folders=FOLDERS,
                                       size=PHANTOM_SIZE, slices=PHANTOM_SLICES, progress=True)


def _csv_rows(path):
  with open(path, encoding="utf-8") as f:
    return max(0, sum(1 for line in f if line.strip()) - 1)


def convert(config, phantom_dir, tfrecord_dir, workers, log):
  log(f"[2/4] convert to TFRecords at {tuple(config.data.shape)} -> {tfrecord_dir}")
  data = config.data.copy_and_resolve_references()
  data.data_root = phantom_dir
  report = convert_lib.convert_corpus(data, tfrecord_dir, workers=workers, log=log)
  if not report.get("num_converted"):
    raise RuntimeError(f"conversion of {phantom_dir} produced no studies; see "
                       f"{os.path.join(tfrecord_dir, 'conversion_report.json')}")
  return report


def train(config, tfrecord_dir, run_dir, minutes, log):
  log(f"[3/4] train for at most {minutes:g} min -> {run_dir}")
  config = config.copy_and_resolve_references()
  config.data.tfrecord_dir = tfrecord_dir
  config.output_dir = run_dir
  config.train.max_minutes = float(minutes)
  return train_lib.train_and_evaluate(config)


def evaluate(config, tfrecord_dir, run_dir, eval_dir, log):
  log(f"[4/4] evaluate the best checkpoint on the test split -> {eval_dir}")
  config = config.copy_and_resolve_references()
  config.data.tfrecord_dir = tfrecord_dir
  config.output_dir = eval_dir
  result = eval_command.run(config, run_dir, split="test", plots=True, log=log)
  return result and result[0]


def summary_lines(result, records):
  """Headline: how far above chance the test retrieval is, and how the loss moved."""
  chance = result["chance"]
  lines = []
  for direction in ("t2i", "i2t"):
    r10, mdr = result[direction]["R@10"], result[direction]["MdR"]
    lines.append(f"{direction}: R@10 {r10:.1f}% = {r10 / chance['R@10']:.1f}x chance "
                 f"({chance['R@10']:.1f}%), MdR {mdr:g} (chance {chance['MdR']:g} of "
                 f"N={result['n']})")
  zeroshot = result.get("zeroshot") or {}
  if zeroshot.get("labels"):
    above = [name for name in zeroshot["labels"]
             if ((zeroshot[name].get("ci") or {}).get("AUROC") or [0.0])[0] > 0.5]
    lines.append(f"zero-shot: macro AUROC {zeroshot['macro']['AUROC']:.3f} (chance 0.5); "
                 f"CI above chance for {len(above)} of {len(zeroshot['labels'])} findings"
                 + (f": {', '.join(above)}" if above else ""))
  losses = [r["loss"] for r in records if isinstance(r.get("loss"), float)]
  if losses:
    first, last = losses[:3], losses[-3:]
    lines.append(f"training loss {sum(first) / len(first):.3f} -> {sum(last) / len(last):.3f} "
                 f"over {records[-1]['step']} steps")
  return lines


class DemoError(errors.UserError):
  """The demo cannot run with these settings (checked before any stage starts)."""


FOLDERS = 10   # the phantom's CT folders: the folder split's 7 / 1 / 2


def check_settings(config, n, minutes):
  """DemoError when the demo could not run to its end: no demo section, a corpus too small for
  the folder split or for one training batch, no time budget."""
  if config.get("demo") is None:
    raise DemoError("the config has no `demo` section (n, minutes); use configs/demo.py or a "
                    "config that imports it")
  if n < 2 * FOLDERS or minutes <= 0:
    raise DemoError(f"--n must be at least {2 * FOLDERS} ({FOLDERS} CT folders, 7/1/2 split) "
                    f"and --minutes positive; got --n {n}, --minutes {minutes:g}")
  mesh = sharding.make_mesh(config.mesh)
  global_batch, _ = sharding.batch_rows(config.train.batch_size_per_device, mesh,
                                        config.train.grad_accum_steps)
  if train_studies(n) < global_batch:
    enough = next(m for m in range(n, 100 * global_batch) if train_studies(m) >= global_batch)
    raise DemoError(f"--n {n}: the train split would hold {train_studies(n)} studies, fewer than "
                    f"one global batch of {global_batch} (--config.train.batch_size_per_device="
                    f"{config.train.batch_size_per_device} x {sharding.num_batch_shards(mesh)} "
                    f"batch shards); pass --n {enough} or more, or a smaller batch")


def train_studies(n):
  """Studies of an n-study phantom corpus in the folder split's train folders."""
  folders = [f"CT{i}" for i in range(1, FOLDERS + 1)]
  train_folders = set(corpus_bimcv.folder_split_assignment(folders)["train"])
  return sum(phantom.folder_of(index, FOLDERS, n) in train_folders for index in range(n))


def run(config, output_dir, n, minutes, workers=2, log=print):
  """Runs the four stages; returns {"metrics": test metrics, "records": training log, "files"}."""
  check_settings(config, n, minutes)
  start = time.time()
  dirs = stage_dirs(output_dir)
  make_corpus(dirs["phantom"], n, config.seed, log)
  convert(config, dirs["phantom"], dirs["tfrecords"], workers, log)
  train(config, dirs["tfrecords"], dirs["run"], minutes, log)
  result = evaluate(config, dirs["tfrecords"], dirs["run"], dirs["eval"], log)
  if result is None:  # not process 0
    return None
  records = logging_lib.read_metrics(os.path.join(dirs["run"], logging_lib.METRICS_FILE))
  curves = plots.plot_training_curves(records, os.path.join(output_dir, "training_curves.png"))
  log("\nTest split retrieval (best checkpoint by validation t2i R@10):\n")
  log(metrics_lib.format_metrics_table(result, show_chance=True))
  log("")
  for line in summary_lines(result, records):
    log(line)
  files = [os.path.join(dirs["eval"], name) for name in
           ("metrics.json", "embeddings.npz", "rank_histogram.png", "recall_at_k.png")]
  files += [os.path.join(dirs["run"], logging_lib.METRICS_FILE), curves]
  log("\nwrote:\n  " + "\n  ".join(files))
  log(f"demo finished in {(time.time() - start) / 60:.1f} min")
  return {"metrics": result, "records": records, "files": files}

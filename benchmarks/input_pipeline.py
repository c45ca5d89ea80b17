"""Volumes/s delivered by the training input pipeline (TFRecords -> global device batches).

Measures, per host, what medfinder_jax.input_pipeline hands the train step: record read,
zlib decode, shuffle, batching, report window + tokenization, host->device copy into a global
batch sharded over the local devices. Compare with the train step's consumption
(benchmarks/train_step.py): the goal is at least 2x.

  python benchmarks/input_pipeline.py                       # phantom at 224x224x96, makes it once
  python benchmarks/input_pipeline.py --tfrecord_dir DIR    # an existing converted dataset
Writes a JSON line with the figures (and --json_out FILE).
"""

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

from medfinder_jax import config_utils  # noqa: E402
from medfinder_jax import input_pipeline  # noqa: E402
from medfinder_jax import sharding  # noqa: E402
from medfinder_jax import text as text_lib  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_dataset(directory, n, shape, workers):
  """A phantom corpus of n studies converted at `shape` (skipped if already there)."""
  from data_prep import convert, phantom_layouts  # pylint: disable=import-outside-toplevel
  out = os.path.join(directory, "tfrecords")
  if os.path.isfile(os.path.join(out, "dataset_info.json")):
    return out
  raw = os.path.join(directory, "raw")
  phantom_layouts.write_phantom_corpus(raw, n=n, seed=0, folders=10, size=256, slices=96)
  config = config_utils.load_config_file(os.path.join(ROOT, "configs", "default.py"))
  config.data.data_root = raw
  config.data.shape = tuple(shape)
  convert.convert_corpus(config.data, out, workers=workers, progress=False,
                         log=lambda *a: None)
  return out


def measure(tfrecord_dir, batch_per_device, batches, text_model, shuffle_buffer, warmup):
  builder, spec = input_pipeline.open_dataset(tfrecord_dir)
  tokenizer = text_lib.ReportTokenizer(text_lib.resolve_text_model_path(text_model), 100)
  mesh = sharding.make_mesh({"data": -1, "fsdp": 1})
  local_batch = batch_per_device * jax.local_device_count()
  host = input_pipeline.train_batches(builder, "train", local_batch, tokenizer, seed=0,
                                      shuffle_buffer=shuffle_buffer)
  stream = input_pipeline.prefetch_to_device(host, mesh)
  for _ in range(warmup):
    jax.block_until_ready(next(stream))
  start = time.perf_counter()
  for _ in range(batches):
    jax.block_until_ready(next(stream))
  seconds = time.perf_counter() - start
  return {"bench": "input_pipeline", "shape": list(spec.shape), "backend": jax.default_backend(),
          "devices": jax.local_device_count(), "local_batch": local_batch, "batches": batches,
          "volumes_per_s": round(batches * local_batch / seconds, 2),
          "ms_per_batch": round(1e3 * seconds / batches, 2),
          "train_studies": spec.split_sizes.get("train")}


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--tfrecord_dir", default="")
  parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(),
                                                        "medfinder_bench_pipeline"))
  parser.add_argument("--n", type=int, default=60, help="phantom studies to convert")
  parser.add_argument("--shape", default="224,224,96")
  parser.add_argument("--workers", type=int, default=2)
  parser.add_argument("--batch_per_device", type=int, default=4)
  parser.add_argument("--batches", type=int, default=20)
  parser.add_argument("--warmup", type=int, default=3)
  parser.add_argument("--shuffle_buffer", type=int, default=64)
  parser.add_argument("--text_model", default="minilm")
  parser.add_argument("--json_out", default="")
  args = parser.parse_args()
  shape = tuple(int(s) for s in args.shape.split(","))
  directory = args.tfrecord_dir or make_dataset(args.workdir, args.n, shape, args.workers)
  result = measure(directory, args.batch_per_device, args.batches, args.text_model,
                   args.shuffle_buffer, args.warmup)
  print(json.dumps(result))
  if args.json_out:
    with open(args.json_out, "w", encoding="utf-8") as f:
      json.dump(result, f, indent=2)


if __name__ == "__main__":
  main()

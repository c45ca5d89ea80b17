"""Beam conversion against the local pool: studies/s of the DirectRunner with N workers and of
convert_corpus with N workers, on one phantom corpus, and their ratio.

  python benchmarks/beam_throughput.py [--n 32] [--size 512] [--slices 100] [--shape 224,224,96]
      [--workers 2] [--mode multi_threading|multi_processing] [--repeats 1] [--corpus DIR]

--mode is the DirectRunner's direct_running_mode: multi_threading (the default of
--beam_pipeline_options with direct_num_workers > 1, which the README recommends on one machine)
or multi_processing (a Beam worker process per worker as well). Both runs are whole conversions
from an empty output directory (the start-up of every worker and study process, shard files,
metadata and report included), with the default shard plan (data.shard_size, data.min_shards),
so the ratio is what a user sees on one machine; the launcher's own TensorFlow import (for the
shard writer and the metadata) is done before either is timed. The runs alternate (local, Beam,
local, Beam, ...) so that a machine whose load drifts penalizes both alike; the best of
--repeats is kept. Each run also prints its CPU seconds (this process and the worker and study
processes it started): the work done, which other load on the machine barely changes. The two
outputs are compared byte for byte.
Goal: Beam/local wall time (= local/Beam studies/s) within 1.3.
"""

import argparse
import os
import resource
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# Only what launch.py imports: every study process (spawned) imports this script again, as it
# imports launch.py there; Beam and the phantom writer are imported in main().
from configs import default  # pylint: disable=g-import-not-at-top,wrong-import-position
from data_prep import convert  # pylint: disable=g-import-not-at-top,wrong-import-position


def parse_args():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--n", type=int, default=32)
  parser.add_argument("--size", type=int, default=512)
  parser.add_argument("--slices", type=int, default=100)
  parser.add_argument("--shape", default="224,224,96")
  parser.add_argument("--workers", type=int, default=2)
  parser.add_argument("--mode", default="multi_threading",
                      choices=("multi_threading", "multi_processing"),
                      help="the DirectRunner's direct_running_mode")
  parser.add_argument("--repeats", type=int, default=1, help="runs of each (best kept)")
  parser.add_argument("--corpus", default="", help="corpus folder (created if missing)")
  return parser.parse_args()


def ensure_corpus(args):
  from data_prep import phantom_layouts  # pylint: disable=import-outside-toplevel
  root = args.corpus or os.path.join(tempfile.gettempdir(),
                                     f"medfinder_bench_{args.n}_{args.size}_{args.slices}")
  if not os.path.isfile(os.path.join(root, "meta", phantom_layouts.CSV_NAME)):
    start = time.time()
    phantom_layouts.write_phantom_corpus(root, args.n, seed=0, folders=10, size=args.size,
                                 slices=args.slices)
    print(f"phantom corpus: {args.n} studies in {time.time() - start:.1f} s -> {root}")
  return root


def shard_bytes(out):
  return {name: open(os.path.join(out, name), "rb").read()
          for name in sorted(os.listdir(out)) if ".tfrecord-" in name}


def cpu_seconds():
  """CPU time of this process and of its children that ended (workers, study processes)."""
  return sum(resource.getrusage(who).ru_utime + resource.getrusage(who).ru_stime
             for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))


def timed(convert_fn, out):
  """(wall seconds, CPU seconds, report) of one conversion. CPU time is the work done, which
  other load on the machine barely changes; wall time is what a user waits."""
  start, start_cpu = time.perf_counter(), cpu_seconds()
  report = convert_fn(out)
  return time.perf_counter() - start, cpu_seconds() - start_cpu, report


def main():
  from data_prep import beam_convert  # pylint: disable=import-outside-toplevel
  args = parse_args()
  root = ensure_corpus(args)
  data_config = default.get_config().data
  data_config.data_root = root
  data_config.shape = tuple(int(s) for s in args.shape.split(","))
  quiet = lambda *_: None  # noqa: E731
  options = (f"runner=DirectRunner,direct_num_workers={args.workers},"
             f"direct_running_mode={args.mode}")
  runs = {
      "local": lambda out: convert.convert_corpus(data_config, out, workers=args.workers,
                                                  progress=False, log=quiet),
      "beam": lambda out: beam_convert.convert_corpus(data_config, out, options, log=quiet),
  }
  plan = convert.plan_conversion(data_config, log=quiet)
  convert.tensorflow()     # the launcher's own import (the writers'), outside both timings
  print(f"{len(plan.corpus.studies)} studies of ~{args.size}x{args.size}x{args.slices} -> "
        f"{data_config.shape}, {len(plan.shards)} shards; load average "
        f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
  best, shards = {}, {}
  with tempfile.TemporaryDirectory() as scratch:
    for repeat in range(args.repeats):
      for name, run in runs.items():
        out = os.path.join(scratch, f"{name}{repeat}")
        seconds, cpu, report = timed(run, out)
        shards[name] = shard_bytes(out)
        best[name] = min(best.get(name, seconds), seconds)
        print(f"  {name:5s} run {repeat + 1}: {report['num_converted']} studies in "
              f"{seconds:.1f} s = {report['num_converted'] / seconds:.2f} studies/s, "
              f"{cpu:.1f} CPU s (load {os.getloadavg()[0]:.1f})")
  n = len(plan.corpus.studies)
  print(f"local pool, {args.workers} workers: {n / best['local']:.2f} studies/s; "
        f"DirectRunner, {args.workers} workers ({args.mode}): {n / best['beam']:.2f} studies/s")
  print(f"Beam / local wall time: {best['beam'] / best['local']:.2f}x (goal <= 1.3); "
        f"shards byte-identical: {shards['beam'] == shards['local']}")


if __name__ == "__main__":
  main()

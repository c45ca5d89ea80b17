"""Conversion throughput vs bare nibabel decoding, and scaling with worker processes.

  python benchmarks/convert_throughput.py [--n 12] [--size 512] [--slices 100] [--shape 224,224,96]
      [--workers 1,2] [--corpus DIR]

Writes (or reuses) a phantom corpus of realistic source size, then reports per study:
  decode    nibabel load + scaled float32 array (`get_fdata(dtype=float32)`): the bare cost any
            reader pays; `raw` is the unscaled int16 decode alone
  convert   what a conversion worker does per study: load, ct preprocessing, zlib + tf.Example
and the ratio convert/decode (goal: <= 2); then, for 1..N workers, the steady-state rate of a
warm worker pool converting every study (what scales with cores) and the wall time of a whole
`convert_corpus` run (adds process start-up, the TensorFlow import for writing, shard files).
"""

import argparse
import concurrent.futures
import multiprocessing
import os
import statistics
import sys
import tempfile
import time

import nibabel as nib
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from configs import default  # pylint: disable=g-import-not-at-top,wrong-import-position
from data_prep import convert  # pylint: disable=g-import-not-at-top,wrong-import-position
from data_prep import corpus  # pylint: disable=g-import-not-at-top,wrong-import-position
from data_prep import phantom_layouts  # pylint: disable=g-import-not-at-top,wrong-import-position
from data_prep import preprocess  # pylint: disable=g-import-not-at-top,wrong-import-position
from data_prep import schema  # pylint: disable=g-import-not-at-top,wrong-import-position


def parse_args():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--n", type=int, default=12)
  parser.add_argument("--size", type=int, default=512)
  parser.add_argument("--slices", type=int, default=100)
  parser.add_argument("--shape", default="224,224,96")
  parser.add_argument("--workers", default="1,2")
  parser.add_argument("--corpus", default="", help="corpus folder (created if missing)")
  parser.add_argument("--repeats", type=int, default=2, help="timing passes per study")
  return parser.parse_args()


def ensure_corpus(args):
  root = args.corpus or os.path.join(tempfile.gettempdir(),
                                     f"medfinder_bench_{args.n}_{args.size}_{args.slices}")
  if not os.path.isfile(os.path.join(root, "meta", phantom_layouts.CSV_NAME)):
    start = time.time()
    phantom_layouts.write_phantom_corpus(root, args.n, seed=0, folders=10, size=args.size,
                                         slices=args.slices)
    print(f"phantom corpus: {args.n} studies in {time.time() - start:.1f} s -> {root}")
  return root


def best_of(fn, repeats):
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return min(times)


def per_study(root, data_config, repeats):
  studies = corpus.read_corpus(data_config).studies
  params = schema.PreprocessParams.from_config(data_config)
  convert.init_worker(root, params, ("findings",))
  rows = []
  for study in studies:
    path = os.path.join(root, study.source_path)
    decode = best_of(lambda: nib.load(path).get_fdata(dtype=np.float32), repeats)
    raw = best_of(lambda: np.asanyarray(nib.load(path).dataobj.get_unscaled()), repeats)
    full = best_of(lambda: convert.convert_study(study), repeats)
    source = preprocess.load_source(path)
    prep = best_of(lambda: preprocess.preprocess(source, params), repeats)
    rows.append((study.study_id, source.raw.shape, decode, raw, prep, full))
  return rows


def pool_rate(root, data_config, workers):
  """Studies/s of `workers` warm processes running convert_study over the whole corpus."""
  studies = corpus.read_corpus(data_config).studies
  params = schema.PreprocessParams.from_config(data_config)
  with concurrent.futures.ProcessPoolExecutor(
      workers, mp_context=multiprocessing.get_context("spawn"), initializer=convert.init_worker,
      initargs=(root, params, ("findings",))) as pool:
    list(pool.map(time.sleep, [0.5] * workers))       # start and initialize every worker
    start = time.perf_counter()
    results = list(pool.map(convert.convert_study, studies))
    seconds = time.perf_counter() - start
  assert all(status == "ok" for status, _ in results)
  return len(studies) / seconds


def main():
  args = parse_args()
  root = ensure_corpus(args)
  data_config = default.get_config().data
  data_config.data_root = root
  data_config.shape = tuple(int(s) for s in args.shape.split(","))
  rows = per_study(root, data_config, args.repeats)
  print(f"\nper study (best of {args.repeats}), source -> {data_config.shape}, "
        f"spacing {tuple(data_config.spacing)} mm:")
  print(f"{'study':14s} {'source shape':18s} {'decode':>8s} {'raw':>8s} {'preproc':>8s} "
        f"{'convert':>8s} {'ratio':>6s}")
  for study_id, shape, decode, raw, prep, full in rows:
    print(f"{study_id:14s} {str(shape):18s} {decode:8.3f} {raw:8.3f} {prep:8.3f} {full:8.3f} "
          f"{full / decode:6.2f}")
  decode = sum(r[2] for r in rows)
  full = sum(r[5] for r in rows)
  print(f"mean voxels {statistics.mean(np.prod(r[1]) for r in rows) / 1e6:.1f} M; "
        f"decode {len(rows) / decode:.2f} studies/s, convert {len(rows) / full:.2f} studies/s "
        f"per worker; convert/decode = {full / decode:.2f}")
  print(f"\nscaling (load average before: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores):")
  base = None
  for workers in (int(w) for w in args.workers.split(",")):
    rate = pool_rate(root, data_config, workers)
    base = base or rate
    print(f"  warm pool, workers={workers}: {rate:.2f} studies/s ({rate / base:.2f}x)")
  base = None
  for workers in (int(w) for w in args.workers.split(",")):
    with tempfile.TemporaryDirectory() as out:
      start = time.perf_counter()
      report = convert.convert_corpus(data_config, out, workers=workers, progress=False,
                                      log=lambda *_: None)
      seconds = time.perf_counter() - start
    rate = report["num_converted"] / seconds
    base = base or rate
    print(f"  convert_corpus, workers={workers}: {report['num_converted']} studies in "
          f"{seconds:.1f} s = "
          f"{rate:.2f} studies/s ({rate / base:.2f}x)")


if __name__ == "__main__":
  main()

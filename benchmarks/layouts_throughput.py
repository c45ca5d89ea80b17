"""Conversion throughput per worker of a DICOM series and of a CT-RATE volume, against bare
decoding (pydicom or nibabel alone), issue 12's measure (goal: within 1.5x of bare decoding).

  python benchmarks/layouts_throughput.py [--size 512] [--slices 300] [--repeats 2] [--dir DIR]

Writes one phantom chest of size x size x slices voxels (int16) as a DICOM series (one file per
slice) and as a CT-RATE volume (.nii.gz, raw values + metadata CSV), then times, best of
--repeats:
  bare      pydicom: dcmread + pixel_array of every file; nibabel: load + get_fdata(float32)
  load      our reader alone: dicom.load_series (headers, series choice, ordering, checks,
            pixels) / preprocess.load_source + with_metadata (the raw-vs-HU decision)
  convert   what a conversion worker does: load, ct preprocessing to --shape, zlib, tf.Example
and the ratios load/bare and convert/bare, in wall-clock seconds and in CPU seconds of this
process (the CPU table is the one to read on a machine that other jobs share: their load
stretches wall times, theirs and ours alike, but not our CPU time).
"""

import argparse
import dataclasses
import os
import sys
import tempfile
import time

import nibabel as nib
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from configs import default  # pylint: disable=g-import-not-at-top,wrong-import-position
from data_prep import convert  # pylint: disable=g-import-not-at-top,wrong-import-position
from data_prep import corpus_base  # pylint: disable=g-import-not-at-top,wrong-import-position
from data_prep import dicom  # pylint: disable=g-import-not-at-top,wrong-import-position
from data_prep import phantom  # pylint: disable=g-import-not-at-top,wrong-import-position
from data_prep import phantom_layouts  # pylint: disable=g-import-not-at-top,wrong-import-position
from data_prep import preprocess  # pylint: disable=g-import-not-at-top,wrong-import-position
from data_prep import schema  # pylint: disable=g-import-not-at-top,wrong-import-position
from data_prep import sources  # pylint: disable=g-import-not-at-top,wrong-import-position


def parse_args():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--size", type=int, default=512)
  parser.add_argument("--slices", type=int, default=300)
  parser.add_argument("--shape", default="224,224,96")
  parser.add_argument("--repeats", type=int, default=2)
  parser.add_argument("--dir", default="", help="where the inputs go (default: a temp folder)")
  return parser.parse_args()


def best_of(fn, repeats):
  """(wall, cpu): the fastest of `repeats` calls of fn, in wall-clock and process CPU seconds."""
  walls, cpus = [], []
  for _ in range(repeats):
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    walls.append(time.perf_counter() - wall)
    cpus.append(time.process_time() - cpu)
  return min(walls), min(cpus)


def write_inputs(root, size, slices):
  """(dicom folder, nifti path, metadata) of one phantom chest of size x size x slices."""
  geometry = phantom.sample_geometry(np.random.default_rng(0), size, 100)
  geometry = dataclasses.replace(geometry, shape=(size, size, slices),
                                 spacing=(geometry.spacing[0],) * 2 + (300.0 / slices,),
                                 orientation="LPS")
  hu, _ = phantom.render_study(geometry, [], np.random.default_rng(0))
  raw, affine = phantom.stored_volume(hu, geometry, slope=1.0, inter=-1024.0)
  folder = os.path.join(root, "CT1", "dicom", "series")
  if not os.path.isdir(folder):
    phantom_layouts.write_dicom_series(folder, raw, affine, 1.0, -1024.0,
                                       file_order=np.random.default_rng(1))
  nifti = os.path.join(root, "train_0_a_1.nii.gz")
  unit = affine.copy()
  unit[:3, :3] /= np.linalg.norm(affine[:3, :3], axis=0)
  if not os.path.isfile(nifti):
    phantom.write_raw_nifti(nifti, raw, unit)
  meta = {"slope": 1.0, "intercept": -1024.0,
          "spacing": tuple(float(s) for s in np.linalg.norm(affine[:3, :3], axis=0))}
  return folder, nifti, meta


def bare_dicom(folder):
  import pydicom  # pylint: disable=import-outside-toplevel
  return [pydicom.dcmread(os.path.join(folder, name)).pixel_array
          for name in sorted(os.listdir(folder))]


def bare_nifti(path):
  return nib.load(path).get_fdata(dtype=np.float32)


def main():
  args = parse_args()
  root = args.dir or os.path.join(tempfile.gettempdir(),
                                  f"medfinder_layouts_{args.size}_{args.slices}")
  os.makedirs(root, exist_ok=True)
  start = time.time()
  folder, nifti, meta = write_inputs(root, args.size, args.slices)
  print(f"inputs ({time.time() - start:.1f} s): {folder} ({args.slices} files), {nifti}")
  data = default.get_config().data
  params = dataclasses.replace(schema.PreprocessParams.from_config(data),
                               shape=tuple(int(s) for s in args.shape.split(",")))
  convert.init_worker(root, params, ())
  cases = {
      "dicom": (lambda: bare_dicom(folder), lambda: dicom.load_series(folder),
                corpus_base.Study(0, "series", os.path.relpath(folder, root), "CT1", "r", {},
                                  "train")),
      "ctrate": (lambda: bare_nifti(nifti),
                 lambda: sources.with_metadata(preprocess.load_source(nifti), meta),
                 corpus_base.Study(0, "train_0_a_1", os.path.basename(nifti), "train", "r", {},
                                   "train", source_meta=meta)),
  }
  print(f"\n{args.size}x{args.size}x{args.slices} int16 -> {params.shape}, best of "
        f"{args.repeats} (s):")
  print(f"{'layout':8s} {'clock':5s} {'bare':>7s} {'load':>7s} {'convert':>8s} {'load/bare':>10s} "
        f"{'convert/bare':>13s}")
  for name, (bare, load, study) in cases.items():
    assert convert.convert_study(study)[0] == "ok"
    times = (best_of(bare, args.repeats), best_of(load, args.repeats),
             best_of(lambda s=study: convert.convert_study(s), args.repeats))
    for clock, (t_bare, t_load, t_full) in zip(("wall", "cpu"), zip(*times)):
      print(f"{name:8s} {clock:5s} {t_bare:7.2f} {t_load:7.2f} {t_full:8.2f} "
            f"{t_load / t_bare:10.2f} {t_full / t_bare:13.2f}")


if __name__ == "__main__":
  main()

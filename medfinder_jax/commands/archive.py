"""`launch.py index` (remove studies, describe an index) and `launch.py index-ann` (build its
approximate-search index). Neither loads a model: they work on the stored embeddings."""

import os

from medfinder_jax import ann as ann_lib
from medfinder_jax import errors
from medfinder_jax import index as index_lib


class ArchiveError(errors.UserError):
  """An index command that cannot run as asked."""


def read_id_file(path):
  """Study ids of FILE, one a line (blank lines ignored)."""
  try:
    with open(path, encoding="utf-8") as f:
      return [line.strip() for line in f if line.strip()]
  except OSError as err:
    raise ArchiveError(f"--remove_file {path}: cannot read it ({err.strerror or err})") from None


def run_index(directory, remove=None, remove_file=None):
  """Removes the given studies, or describes the index; returns the line to print."""
  if remove is None and remove_file is None:
    return describe(directory)
  ids = list(remove or []) + (read_id_file(remove_file) if remove_file else [])
  count = index_lib.remove_studies(directory, ids)
  left = index_lib.load_index(directory).n
  return f"removed {count} studies from {directory}: {left} left"


def describe(directory):
  index = index_lib.load_index(directory)
  info = index_lib.describe(index)
  ann, why = ann_lib.load(index) if os.path.isdir(
      os.path.join(directory, ann_lib.ANN_DIR)) else (None, "none")
  ann_text = (f"ANN {ann.meta['kind']} nprobe {ann.meta['nprobe']}, recall@10 "
              f"{ann.meta['recall_at_10']:.3f}" if ann else f"ANN: {why}")
  return (f"{directory}: {info['n']} studies in {info['shards']} shards, D={info['dim']} "
          f"{info['dtype']}, {info['bytes'] / 2**20:.1f} MiB; {ann_text}")


def run_index_ann(directory, nlist=None, target_recall=0.95, queries=1000):
  index = index_lib.load_index(directory)
  meta = ann_lib.build(index, nlist=nlist, target_recall=target_recall, queries=queries,
                       log=lambda line: print(line, flush=True))
  return (f"wrote {directory}/{ann_lib.ANN_DIR}: {meta['kind']}, nprobe {meta['nprobe']}, "
          f"recall@10 {meta['recall_at_10']:.3f} against exact search ({meta['queries']} "
          f"queries), built in {meta['build_s']:.1f} s")

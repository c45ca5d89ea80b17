"""Raw corpus -> TFRecord shards + TFDS metadata + conversion report (`launch.py convert`).

Output directory:
  medfinder_ct-<split>.tfrecord-<i>-of-<n>   records (data_prep/schema.py), CSV order per split
  dataset_info.json, features.json, metadata.json   TFDS metadata: `tfds.builder_from_directory`
  conversion_report.json   every skipped study with its reason (retry: true = a rerun tries it
                           again), counts per split, settings
  .convert_state/          plan and one marker per finished shard (what makes a rerun resume)

Studies are preprocessed in worker processes; the main process writes each shard to a temporary
file and renames it into place when complete, then writes the shard's marker. A rerun (after an
interruption, a killed worker or a crash) skips shards whose marker matches and redoes the rest,
so it ends with the same bytes as an uninterrupted run. If a worker process dies, the studies it
may have held are retried one at a time in a fresh pool; one that kills its worker again on its
own is skipped with that reason.

Skips are of two kinds. Bad input (an unreadable or malformed volume, a bad CSV row) is final: a
rerun keeps the shard as it is. A failure that need not recur (a worker that died, out of memory,
a study past data.study_timeout_s, an unexpected error) is skipped with `retry: true` in the
report, and its shard does not count as finished: rerunning the same command (e.g. with fewer
--workers, or after fixing a bug) converts that shard again. A volume over data.max_volume_mib is
a final skip too, but its shard is redone by a rerun with a higher limit.

Limits (`Limits`: data.max_volume_mib, data.study_timeout_s) decide what is skipped, never what a
record holds, so they are not part of the settings a rerun must match. A failure to write the
output (disk full) stops the conversion with one OutputError naming the file; the shards finished
before are kept, and rerunning the same command resumes.

The same conversion runs as an Apache Beam pipeline (data_prep/beam_convert.py, `launch.py
convert --beam_pipeline_options ...`): both paths share the plan (plan_conversion: shards, file
names, study order), the per-study function (run_study -> convert_study) and the shard writer
(write_shard), and finish with the same metadata and report (finish_conversion), so they give
the same bytes. data_root and output_dir may be on any file system Beam supports
(data_prep/filesystem.py: gs://, s3://, ... when apache-beam is installed), on either path.
"""

import collections
import concurrent.futures
import contextlib
import dataclasses
import errno
import hashlib
import itertools
import json
import math
import multiprocessing
import os
import re
import signal
import tempfile
import threading
import time
import uuid

import numpy as np
import tensorflow_datasets as tfds
import tqdm
from tensorflow_datasets.core import example_serializer
from tensorflow_datasets.core import naming

from data_prep import corpus as corpus_lib
from data_prep import corpus_base
from data_prep import filesystem
from data_prep import preprocess
from data_prep import schema
from data_prep import sources
from medfinder_jax import errors

STATE_DIR = ".convert_state"
REPORT_NAME = "conversion_report.json"
SHARD_TEMPLATE = "{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}"   # tfds' default template
WORKER_DIED = "the worker process converting it died (killed, or out of memory)"
OUT_OF_MEMORY = "out of memory while converting"


def tensorflow():
  """TensorFlow, imported at first use. Only the writers of shard files and of the dataset
  metadata need it; the processes that convert studies (local pool workers, the Beam DoFns'
  StudyProcess children) read, preprocess and serialize records without it (tfds serializes
  with its own protos), so they start without its import (~9 s on a 2-core machine)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top,import-outside-toplevel
  return tf


class OutputError(errors.UserError):
  """The output cannot be written (disk full, no permission): fatal; finished shards are kept."""


def output_error(path, err):
  """OutputError naming `path` and the system's words for `err` (OSError or a TensorFlow
  OpError), with what to do."""
  if isinstance(err, OSError) and err.strerror:
    name = errno.errorcode.get(err.errno, "")
    text = f"{err.strerror} ({name})" if name else err.strerror
  else:
    text = str(getattr(err, "message", err)).rsplit("; ", 1)[-1]
  return OutputError(f"cannot write {path}: {text}; the shards finished before are kept: free "
                     f"space (or fix the output directory) and rerun the same command to resume")


@dataclasses.dataclass(frozen=True)
class Limits:
  """What a worker may spend on one study. They decide what is skipped, never what a record
  holds, so they are not part of the settings a rerun must match."""
  max_volume_mib: float = 2048.0     # decoded voxels a header may declare
  study_timeout_s: float = 600.0     # wall-clock time of one study

  @classmethod
  def from_config(cls, data_config):
    values = {}
    for field in dataclasses.fields(cls):
      value = data_config.get(field.name, field.default)
      try:
        values[field.name] = float(value)
      except (TypeError, ValueError):
        values[field.name] = math.nan
      if not (math.isfinite(values[field.name]) and values[field.name] > 0):
        raise corpus_base.CorpusError(f"data.{field.name}={value!r}; expected a positive number")
    return cls(**values)


@dataclasses.dataclass
class Shard:
  """One output file: a contiguous run of a split's studies (CSV order)."""
  split: str
  index: int
  count: int
  studies: list

  @property
  def filename(self):
    return (f"{schema.DATASET_NAME}-{self.split}.{schema.FILE_FORMAT}-"
            f"{self.index:05d}-of-{self.count:05d}")

  def fingerprint(self, settings_digest):
    """Changes when the settings or any of the shard's inputs change."""
    inputs = [(s.study_id, s.source_path, s.file_size, s.report, sorted(s.labels.items()),
               s.scan_id, s.patient_id, list(s.label_vector), s.source_meta)
              for s in self.studies]
    return _digest([settings_digest, self.filename, inputs])


def _digest(value):
  return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def num_shards(num_studies, shard_size, min_shards):
  """Enough shards for `shard_size` studies each, and at least `min_shards` (if that many
  studies) so that several processes can each read their own files."""
  return max(math.ceil(num_studies / shard_size), min(num_studies, min_shards))


def plan_shards(studies, shard_size, min_shards):
  """Shards per split, in split order; sizes within a split differ by at most one."""
  shards = []
  for split in schema.SPLITS:
    members = [s for s in studies if s.split == split]
    if not members:
      continue
    count = num_shards(len(members), shard_size, min_shards)
    bounds = [len(members) * i // count for i in range(count + 1)]
    shards += [Shard(split, i, count, members[bounds[i]:bounds[i + 1]]) for i in range(count)]
  return shards


# --- Records ------------------------------------------------------------------------------------

def features_dict(shape, volume_dtype, label_columns=(), num_labels=0):
  """The tfds FeaturesDict for records of this shape/dtype (the volume zlib-compressed)."""
  features = {}
  for name, (kind, dtype, dims) in schema.feature_specs(shape, volume_dtype, label_columns,
                                                        num_labels).items():
    if kind == "text":
      features[name] = tfds.features.Text()
    elif name == schema.VOLUME:
      features[name] = tfds.features.Tensor(shape=dims, dtype=np.dtype(dtype),
                                            encoding=schema.VOLUME_ENCODING)
    else:
      features[name] = tfds.features.Tensor(shape=dims, dtype=np.dtype(dtype))
  return tfds.features.FeaturesDict(features)



# --- Worker side --------------------------------------------------------------------------------

_WORKER = {}


def init_worker(data_root, params, label_columns, limits=None, num_labels=0):
  """Per-process setup: the feature spec and serializer (no TensorFlow needed here)."""
  features = features_dict(params.shape, params.volume_dtype, label_columns, num_labels)
  _WORKER.update(data_root=data_root, params=params, features=features,
                 serializer=example_serializer.ExampleSerializer(features.get_serialized_info()),
                 limits=limits or Limits())


def convert_study(study):
  """("ok", serialized record bytes), ("skip", reason) for bad input (final), ("limit", reason)
  for a volume over data.max_volume_mib (final at this limit), or ("retry", reason) for a
  failure that need not recur (a rerun tries again). Never raises."""
  try:
    source = preprocess.load_source(filesystem.join(_WORKER["data_root"], study.source_path),
                                    _WORKER["limits"].max_volume_mib)
    if study.source_meta:
      source = sources.with_metadata(source, study.source_meta)
    volume, volume_spacing = preprocess.preprocess(source, _WORKER["params"])
    example = make_example(study, source, volume, volume_spacing)
    encoded = encode_example(_WORKER["features"], example, _WORKER["params"])
    record = _WORKER["serializer"].get_tf_example(encoded).SerializeToString(deterministic=True)
    return "ok", record
  except sources.VolumeTooLarge as err:
    return "limit", str(err)
  except sources.BadVolume as err:
    return "skip", str(err)
  except MemoryError:
    return "retry", OUT_OF_MEMORY
  except Exception as err:  # pylint: disable=broad-except
    return "retry", f"unexpected error: {type(err).__name__}: {err}"


class StudyTimeout(BaseException):
  """Raised by SIGALRM in a study past data.study_timeout_s; a BaseException so that no
  `except Exception` on the way turns it into another kind of failure."""


def run_study(convert_fn, study):
  """convert_fn(study) within the worker's data.study_timeout_s: a study still running then (a
  file system that stopped answering, a pathological file) is ("retry", reason), and so is one
  whose convert_fn raises (never an exception: a study's failure is data, on either path)."""
  seconds = _WORKER["limits"].study_timeout_s
  try:
    with time_limit(seconds):
      return convert_fn(study)
  except StudyTimeout:
    return "retry", timed_out(seconds)
  except MemoryError:
    return "retry", OUT_OF_MEMORY
  except Exception as err:  # pylint: disable=broad-except  (a convert_fn that raises: a skip)
    return "retry", f"unexpected error: {type(err).__name__}: {err}"


def timed_out(seconds):
  """The skip reason of a study past data.study_timeout_s."""
  return (f"still running after data.study_timeout_s={seconds:g} s (a stalled file system?); "
          f"rerun to retry it, or raise --config.data.study_timeout_s")


def _raise_timeout(signum, frame):
  del signum, frame
  raise StudyTimeout()


@contextlib.contextmanager
def time_limit(seconds):
  """Raises StudyTimeout in this (main) thread after `seconds` (SIGALRM). Nests: an outer alarm
  (pytest-timeout's, a caller's) that is due sooner is left to fire; a later one is restored.
  No limit off the main thread or without SIGALRM, where signals cannot interrupt the study."""
  if not hasattr(signal, "setitimer") or threading.current_thread() is not threading.main_thread():
    yield
    return
  previous_handler = signal.signal(signal.SIGALRM, _raise_timeout)
  outer_delay, outer_interval = signal.setitimer(signal.ITIMER_REAL, seconds)
  start = time.monotonic()
  if outer_delay and outer_delay <= seconds:      # the outer alarm comes first: keep it
    signal.setitimer(signal.ITIMER_REAL, outer_delay, outer_interval)
    signal.signal(signal.SIGALRM, previous_handler)
    yield
    return
  try:
    yield
  finally:
    signal.setitimer(signal.ITIMER_REAL, 0)
    signal.signal(signal.SIGALRM, previous_handler)
    if outer_delay:
      left = outer_delay - (time.monotonic() - start)
      signal.setitimer(signal.ITIMER_REAL, max(left, 1e-3), outer_interval)


STUDY_GRACE_S = 60.0     # after data.study_timeout_s, how long a StudyProcess waits for the alarm


class StudyProcess:
  """Runs studies one at a time through run_study in a child process, for a caller whose
  studies would otherwise run on a thread (the Beam pipeline's DoFn: data_prep/beam_convert.py),
  where no alarm can interrupt a study; in the child's main thread run_study's can, so
  data.study_timeout_s applies as in the local pool. A child that dies (killed, out of memory)
  gives ("retry", WORKER_DIED), as a worker of the local pool does; one that has not answered
  STUDY_GRACE_S after the limit (stuck in C code, deaf to the alarm) is killed and gives the
  timeout's skip. The next study then gets a fresh child."""

  def __init__(self, init_args):
    self.init_args, self.limits = init_args, init_args[3] or Limits()
    self.process = self.connection = None

  def run(self, convert_fn, study):
    """run_study(convert_fn, study) in the child: the study's result, never an exception."""
    if self.process is None:
      self._start()
    try:
      self.connection.send((convert_fn, study))
    except OSError:                 # the child died between studies: a fresh one takes it
      self.close()
      self._start()
      self.connection.send((convert_fn, study))
    if not self.connection.poll(self.limits.study_timeout_s + STUDY_GRACE_S):
      self.close(kill=True)
      return "retry", timed_out(self.limits.study_timeout_s)
    try:
      return self.connection.recv()
    except (EOFError, OSError):
      self.close()
      return "retry", WORKER_DIED

  def _start(self):
    context = multiprocessing.get_context("spawn")
    connection, child_end = context.Pipe()
    process = context.Process(target=_serve_studies, args=(child_end, self.init_args),
                              daemon=True, name="medfinder-study")
    try:
      process.start()
    finally:
      child_end.close()
    self.process, self.connection = process, connection
    try:
      self.connection.recv()        # ready: set up (imports done) before any deadline runs
    except EOFError:
      self.close()
      raise RuntimeError("the study process died while starting (see its error above)") from None

  def close(self, kill=False):
    """Stops the child: asks it to end, or kills it (`kill`, or when it does not end at once)."""
    if self.process is None:
      return
    if not kill:
      with contextlib.suppress(OSError):
        self.connection.send(None)
      self.process.join(timeout=5)
    if self.process.is_alive():
      self.process.kill()
      self.process.join()
    self.connection.close()
    self.process = self.connection = None


def _serve_studies(connection, init_args):
  """A StudyProcess's child: set up, say so, then (convert_fn, study) -> run_study's result
  until told to stop (None) or its parent has gone (end of the pipe)."""
  init_worker(*init_args)
  connection.send("ready")
  while True:
    try:
      task = connection.recv()
    except EOFError:
      return
    if task is None:
      return
    connection.send(run_study(*task))


def encode_example(features, example, params):
  """tfds encoding of every feature, the volume at schema.VOLUME_ZLIB_LEVEL (same format)."""
  return {name: (schema.encode_volume(example[name], params.shape, params.volume_dtype)
                 if name == schema.VOLUME else feature.encode_example(example[name]))
          for name, feature in features.items()}


def make_example(study, source, volume, volume_spacing):
  """The record of one study as a dict of feature values (data_prep/schema.py)."""
  example = {
      schema.VOLUME: volume,
      schema.SHAPE: np.asarray(source.raw.shape, np.int32),
      schema.SPACING: np.asarray(source.spacing, np.float32),
      schema.VOLUME_SPACING: np.asarray(volume_spacing, np.float32),
      schema.ORIENTATION: source.orientation,
      schema.REPORT: study.report,
      schema.STUDY_ID: study.study_id,
      schema.SOURCE_PATH: study.source_path,
      schema.SCAN_ID: study.scan_id or study.study_id,
      schema.PATIENT_ID: study.patient_id,
      schema.SERIES_UID: source.series_uid,
      schema.HU_SCALING: np.asarray([source.slope, source.inter], np.float32),
      schema.HU_SOURCE: source.hu_source,
  }
  if study.label_vector:
    example[schema.LABELS] = np.asarray(study.label_vector, np.int8)
  example.update(study.labels)
  return example


# --- Running the studies ------------------------------------------------------------------------

def _ordered_results(studies, workers, init_args, convert_fn):
  """Yields (study, result) in input order, converting in `workers` processes (0 = here).

  After a worker death the pool is rebuilt and every study that was in flight is rerun alone;
  one that kills its worker alone yields ("retry", WORKER_DIED)."""
  if workers == 0:
    init_worker(*init_args)
    for study in studies:
      yield study, run_study(convert_fn, study)
    return
  window = 2 * workers
  pending, done, suspects = {}, {}, set()
  next_submit = next_yield = converted = culprits = 0
  pool = _new_pool(workers, init_args)
  try:
    while next_yield < len(studies):
      broken = False
      try:
        if suspects:
          if not pending:
            i = min(suspects)
            pending[i] = pool.submit(run_study, convert_fn, studies[i])
        else:
          while next_submit < len(studies) and len(pending) < window:
            pending[next_submit] = pool.submit(run_study, convert_fn, studies[next_submit])
            next_submit += 1
      except concurrent.futures.process.BrokenProcessPool:
        broken = True
      if not broken:
        concurrent.futures.wait(pending.values(),
                                return_when=concurrent.futures.FIRST_COMPLETED)
      for i, future in list(pending.items()):
        if not future.done():
          continue
        del pending[i]
        try:
          done[i] = future.result()
          suspects.discard(i)
          converted += 1
        except concurrent.futures.process.BrokenProcessPool:
          broken = True
          if i in suspects and not pending:   # it ran alone: it is the culprit
            done[i] = ("retry", WORKER_DIED)
            suspects.discard(i)
            culprits += 1
          else:
            suspects.add(i)
      if culprits >= 3 and not converted:
        raise corpus_base.CorpusError(
            "worker processes die before converting any study (out of memory? a broken "
            "install?); rerun with --workers 0 to see the error in this process")
      if broken:
        suspects.update(pending)
        pending.clear()
        pool.shutdown(wait=True, cancel_futures=True)
        pool = _new_pool(workers, init_args)
      while next_yield in done:
        yield studies[next_yield], done.pop(next_yield)
        next_yield += 1
  finally:
    pool.shutdown(wait=True, cancel_futures=True)


def _new_pool(workers, init_args):
  return concurrent.futures.ProcessPoolExecutor(
      max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
      initializer=init_worker, initargs=init_args)


# --- Shard files and state ----------------------------------------------------------------------
# Paths go through data_prep/filesystem.py: os for a local output_dir (as always), Beam's
# FileSystems for gs://, s3://, ... (the same code for the local pool and the Beam pipeline).

def _write_json_atomic(path, value):
  """Writes `value` to `path` via a temporary file: `path` is the old or the new file, never a
  part. OutputError (the temporary file removed) when it cannot be written."""
  try:
    filesystem.write_json_atomic(path, value)
  except OSError as err:
    raise output_error(path, err) from None


def _read_json(path):
  return filesystem.read_json(path)


def _marker_path(output_dir, shard):
  return filesystem.join(output_dir, STATE_DIR, shard.filename + ".json")


def read_marker(output_dir, shard, fingerprint):
  """The marker the last write of `shard` left, if it was written for these inputs and the
  shard file beside it is the one it describes; else None."""
  marker = _read_json(_marker_path(output_dir, shard))
  if not (marker and marker.get("fingerprint") == fingerprint):
    return None
  if filesystem.size(filesystem.join(output_dir, shard.filename)) != marker.get("num_bytes"):
    return None
  return marker


def _finished_marker(output_dir, shard, fingerprint, limits):
  """The shard's marker if the shard is complete for these inputs, else None. A shard with a
  study to retry (worker death, out of memory, unexpected error) is not complete, nor one with a
  volume skipped under a lower data.max_volume_mib than `limits` has."""
  marker = read_marker(output_dir, shard, fingerprint)
  if marker is None:
    return None
  # A skip without the flag comes from an older marker: redo its shard to be safe.
  if any(s.get("retry", True) for s in marker.get("skipped", [])):
    return None
  if marker.get("skipped_over_max_volume_mib", math.inf) < limits.max_volume_mib:
    return None
  return marker


def _check_plan(output_dir, plan_digest, shards):
  """Refuses an output_dir that holds a conversion of other inputs or settings."""
  plan_path = filesystem.join(output_dir, STATE_DIR, "plan.json")
  plan = _read_json(plan_path)
  if plan is not None and plan.get("digest") != plan_digest:
    raise corpus_base.CorpusError(
        f"{output_dir!r} holds a conversion with other inputs or settings; use a new "
        f"--output_dir or delete that one")
  if plan is None:
    _write_json_atomic(plan_path, {"digest": plan_digest,
                                   "shards": [s.filename for s in shards]})


class _ShardWriter:
  """Writes one shard to a temporary file; `commit` renames it into place, then the marker. A
  write that fails (disk full) removes the temporary file and raises OutputError: the final name
  only ever holds a complete shard.

  The temporary file is in STATE_DIR/tmp of a local output_dir (one rename away from its
  place), or in this machine's temporary folder for a remote one (then copied and renamed: see
  filesystem.publish). Its name is unique to this attempt, so two attempts at one shard (a Beam
  bundle retried) never write into each other's file."""

  def __init__(self, output_dir, shard, fingerprint, limits):
    self.output_dir, self.shard, self.fingerprint = output_dir, shard, fingerprint
    self.limits = limits
    self.path = filesystem.join(output_dir, shard.filename)
    self.staging = filesystem.join(output_dir, STATE_DIR, "tmp")
    local_dir = tempfile.gettempdir() if filesystem.is_remote(output_dir) else self.staging
    self.tmp = os.path.join(local_dir,
                            f"{shard.filename}.{os.getpid()}-{uuid.uuid4().hex[:8]}")
    self.writer = None
    self.study_ids, self.skipped, self.over_limit = [], [], False
    with self._failing_as_output_error():
      self.writer = tensorflow().io.TFRecordWriter(self.tmp)

  @contextlib.contextmanager
  def _failing_as_output_error(self):
    try:
      yield
    except (OSError, tensorflow().errors.OpError) as err:
      self.discard()
      raise output_error(self.path, err) from None

  def add(self, study, result):
    status, payload = result
    if status == "ok":
      with self._failing_as_output_error():
        self.writer.write(payload)
      self.study_ids.append(study.study_id)
    else:
      self.over_limit |= status == "limit"
      self.skipped.append(dataclasses.asdict(corpus_base.Skipped(
          study.row, study.source_path, payload, study.split, study.study_id,
          retry=status == "retry")))

  def commit(self):
    with self._failing_as_output_error():
      self.writer.close()
      self.writer = None
      filesystem.publish(self.tmp, self.path, self.staging)
      num_bytes = filesystem.size(self.path)
    marker = {"fingerprint": self.fingerprint, "num_examples": len(self.study_ids),
              "num_bytes": num_bytes, "study_ids": self.study_ids, "skipped": self.skipped}
    if self.over_limit:       # a rerun with a higher limit redoes the shard
      marker["skipped_over_max_volume_mib"] = self.limits.max_volume_mib
    _write_json_atomic(_marker_path(self.output_dir, self.shard), marker)
    return marker

  def discard(self):
    """Closes and removes the temporary file (after a failure or an interruption)."""
    if self.writer is not None:
      with contextlib.suppress(Exception):
        self.writer.close()
      self.writer = None
    filesystem.remove_quietly(self.tmp)


def write_shard(output_dir, shard, fingerprint, limits, results):
  """Writes `shard` from `results` ((study, result) of its studies, in order) and commits it:
  the one shard writer of the local pool and the Beam pipeline. Returns the shard's marker; on
  any failure (OutputError, Ctrl-C) the temporary file is removed and the error raised."""
  writer = _ShardWriter(output_dir, shard, fingerprint, limits)
  try:
    for study, result in results:
      writer.add(study, result)
    return writer.commit()
  except BaseException:
    writer.discard()
    raise


# --- Metadata and report ------------------------------------------------------------------------

def dataset_metadata(params, corpus):
  """What a reader needs beyond the features: preprocessing and how splits were assigned."""
  intensity = params.intensity
  split_rule = {
      "folders": "CT folders in natural order: last max(1, round(n/5)) test, the "
                 "max(1, round(n/10)) before them val, the rest train (7/1/2 of 10)",
      "rows": "CSV rows: [0, int(n*0.7)) train, [int(n*0.7), int(n*(0.7+0.1))) val, rest test "
              "(the released code's slicing)",
      "patients": "CT-RATE: the valid folder is test; val = the train patients first in "
                  "sha256(patient id) order, max(1, round(n * data.val_fraction)) of them; "
                  "every scan and reconstruction of a patient in the patient's split",
  }[corpus.split_by]
  return {
      "schema_version": schema.SCHEMA_VERSION,
      "preprocess": params.to_dict(),
      "axis_order": "XYZ",
      "orientation": "RAS" if params.mode == "ct" else "source voxel order",
      "intensity": {"volume_dtype": params.volume_dtype, "unit_scale": intensity.scale,
                    "unit_offset": intensity.offset,
                    "meaning": "volume * unit_scale + unit_offset = [0, 1] intensity"},
      "split_by": corpus.split_by,
      "split_rule": split_rule,
      "split_assignment": corpus.split_assignment,
      "label_columns": list(corpus.label_columns),
      "label_names": list(corpus.label_names),
      "layout": corpus.layout,
      "csv": os.path.basename(corpus.csv_path),
      "sources": {role: os.path.basename(path) for role, path in corpus.sources.items()},
  }


def split_totals(shards, markers):
  """({split: [records per shard, in shard order]}, {split: bytes}) of splits with shards."""
  lengths, sizes = {}, collections.Counter()
  for shard in shards:
    lengths.setdefault(shard.split, []).append(markers[shard.filename]["num_examples"])
    sizes[shard.split] += markers[shard.filename]["num_bytes"]
  return lengths, dict(sizes)


def _write_tfds_metadata(output_dir, params, corpus, lengths, sizes):
  """dataset_info.json and features.json (tfds), metadata.json (dataset_metadata); for a
  remote output_dir written locally first, beside empty files named like the shards (tfds
  lists them), then copied (tfds writes through TensorFlow's own file systems, which do not
  cover every file system Beam's do)."""
  if filesystem.is_remote(output_dir):
    with tempfile.TemporaryDirectory() as local:
      names = [Shard(split, i, len(counts), []).filename
               for split, counts in lengths.items() for i in range(len(counts))]
      for name in names:
        open(os.path.join(local, name), "wb").close()
      _write_tfds_metadata(local, params, corpus, lengths, sizes)
      for name in sorted(set(os.listdir(local)) - set(names)):
        filesystem.publish(os.path.join(local, name), filesystem.join(output_dir, name),
                           filesystem.join(output_dir, STATE_DIR, "tmp"))
    return
  split_infos = [
      tfds.core.SplitInfo(
          name=split, shard_lengths=lengths[split], num_bytes=sizes[split],
          filename_template=naming.ShardedFileTemplate(
              data_dir=output_dir, template=SHARD_TEMPLATE, dataset_name=schema.DATASET_NAME,
              split=split, filetype_suffix=schema.FILE_FORMAT))
      for split in schema.SPLITS if split in lengths]
  tfds.folder_dataset.write_metadata(
      data_dir=output_dir,
      features=features_dict(params.shape, params.volume_dtype, corpus.label_columns,
                             len(corpus.label_names)),
      split_infos=split_infos, filename_template=SHARD_TEMPLATE, check_data=False,
      description="CT volumes and radiology reports converted by MedFinder-JAX "
                  "(data_prep/convert.py); see metadata.json for the preprocessing.",
      metadata=tfds.core.MetadataDict(dataset_metadata(params, corpus)))


def build_report(output_dir, params, corpus, shards, markers, shard_lengths):
  """The conversion report: counts, shard lengths and every skipped study with its reason.

  num_to_retry: skipped studies with `retry: true` (worker death, out of memory, unexpected
  error), which rerunning the same command converts again."""
  skipped = [dataclasses.asdict(s) for s in corpus.skipped]
  for shard in shards:
    skipped += markers[shard.filename]["skipped"]
  skipped.sort(key=lambda s: s["row"])
  converted = {split: sum(shard_lengths.get(split, [])) for split in schema.SPLITS}
  return {
      "output_dir": filesystem.absolute(output_dir),
      "csv": filesystem.absolute(corpus.csv_path),
      "csv_rows": corpus.num_rows,
      "layout": corpus.layout,
      "split_by": corpus.split_by,
      "split_assignment": corpus.split_assignment,
      "converted": converted,
      "num_converted": sum(converted.values()),
      "num_skipped": len(skipped),
      "num_to_retry": sum(bool(s["retry"]) for s in skipped),
      "shard_lengths": shard_lengths,
      "preprocess": params.to_dict(),
      "skipped": skipped,
  }


def format_summary(report, seconds=None):
  """A few lines for the terminal."""
  counts = ", ".join(f"{split} {report['converted'][split]}" for split in schema.SPLITS)
  lines = [f"converted {report['num_converted']} of {report['csv_rows']} CSV rows "
           f"({counts}); skipped {report['num_skipped']}"
           + (f"; {seconds:.1f} s" if seconds is not None else "")]
  reasons = collections.Counter(re.sub(r"'[^']*'|\d+", "*", s["reason"].split(" (")[0])
                                for s in report["skipped"])
  for reason, count in reasons.most_common(8):
    lines.append(f"  skipped {count:4d} x {reason}")
  if report["num_to_retry"]:
    lines.append(f"  {report['num_to_retry']} of the skipped failed for a reason that need not "
                 f"recur (worker died, out of memory, timed out, unexpected error): rerun the "
                 f"same command to retry them")
  empty = [split for split in schema.SPLITS if not report["converted"][split]]
  if empty:
    lines.append(f"  warning: no studies in split(s) {', '.join(empty)}")
  lines.append(f"report: {filesystem.join(report['output_dir'], REPORT_NAME)}")
  return "\n".join(lines)


# --- Driver -------------------------------------------------------------------------------------
# A conversion is plan_conversion -> prepare_output -> (convert the unfinished shards: the local
# pool here, or the Beam pipeline of data_prep/beam_convert.py, both through run_study and
# write_shard) -> finish_conversion.

@dataclasses.dataclass
class Plan:
  """What a conversion of a corpus with given settings produces, whoever runs it: the shards
  (split, index, studies in order, file name) and the fingerprint of each."""
  data_root: str
  params: schema.PreprocessParams
  limits: Limits
  corpus: corpus_base.Corpus
  shards: list
  fingerprints: dict       # shard file name -> fingerprint of its settings and inputs

  @property
  def init_args(self):
    """init_worker's arguments: what a process needs to convert this plan's studies."""
    return (self.data_root, self.params, self.corpus.label_columns, self.limits,
            len(self.corpus.label_names))


def plan_conversion(data_config, log=print):
  """Reads the corpus and plans its shards. CorpusError for unusable input or settings."""
  if filesystem.is_remote(data_config.data_root):    # before the settings: say what to install
    filesystem.require_beam(f"data_root {data_config.data_root!r}")
  try:
    params = schema.PreprocessParams.from_config(data_config)
    limits = Limits.from_config(data_config)
    corpus = corpus_lib.read_corpus(data_config, log=log)
    schema.feature_specs(params.shape, params.volume_dtype, corpus.label_columns)  # name clashes
  except (corpus_base.CorpusError, filesystem.BeamNotInstalled):
    raise
  except ValueError as err:
    raise corpus_base.CorpusError(str(err)) from None
  shards = plan_shards(corpus.studies, int(data_config.shard_size),
                       int(data_config.get("min_shards", 1)))
  settings_digest = _digest({"schema": schema.SCHEMA_VERSION, "params": params.to_dict(),
                             "labels": list(corpus.label_columns),
                             "label_names": list(corpus.label_names)})
  fingerprints = {s.filename: s.fingerprint(settings_digest) for s in shards}
  return Plan(str(data_config.data_root), params, limits, corpus, shards, fingerprints)


def prepare_output(output_dir, plan, log=print):
  """Makes `output_dir` ready for `plan` (refusing one that holds another conversion, emptying
  the temporary files of an interrupted run) and returns {file name: marker} of the shards a
  previous run finished."""
  tmp_dir = filesystem.join(output_dir, STATE_DIR, "tmp")
  try:
    filesystem.makedirs(tmp_dir)
  except OSError as err:
    raise output_error(tmp_dir, err) from None
  _check_plan(output_dir, _digest(sorted(plan.fingerprints.items())), plan.shards)
  _fresh_tmp_dir(tmp_dir)
  markers = {}
  for shard in plan.shards:
    marker = _finished_marker(output_dir, shard, plan.fingerprints[shard.filename], plan.limits)
    if marker is not None:
      markers[shard.filename] = marker
  if markers:
    log(f"resuming: {len(markers)} of {len(plan.shards)} shards already done")
  return markers


def finish_conversion(output_dir, plan, markers, seconds=None, log=print):
  """Writes the TFDS metadata (if any record was converted) and the report, from the markers of
  every shard of `plan`; prints the summary and returns the report."""
  lengths, sizes = split_totals(plan.shards, markers)
  if any(m["num_examples"] for m in markers.values()):
    try:
      _write_tfds_metadata(output_dir, plan.params, plan.corpus, lengths, sizes)
    except (OSError, tensorflow().errors.OpError) as err:
      raise output_error(f"the dataset metadata in {output_dir}", err) from None
  report = build_report(output_dir, plan.params, plan.corpus, plan.shards, markers, lengths)
  _write_json_atomic(filesystem.join(output_dir, REPORT_NAME), report)
  log(format_summary(report, seconds))
  return report


def convert_corpus(data_config, output_dir, workers=None, progress=True, log=print,
                   convert_fn=convert_study):
  """Converts the corpus of `data_config` (the config's `data` section) into `output_dir`.

  workers: processes (None = data_config.workers; 0 = convert in this process). Returns the
  report dict (also written to output_dir/conversion_report.json). Raises CorpusError for
  unusable input as a whole and OutputError when the output cannot be written; bad studies are
  skipped and reported. `convert_fn` (study -> result, run in the workers under the study time
  limit, importable by name) is where tests inject faults.
  """
  start = time.time()
  plan = plan_conversion(data_config, log)
  workers = int(data_config.workers if workers is None else workers)
  markers = prepare_output(output_dir, plan, log)
  todo = [s for s in plan.shards if s.filename not in markers]
  markers.update(_convert_shards(output_dir, todo, plan.fingerprints, workers, progress,
                                 plan.init_args, convert_fn))
  return finish_conversion(output_dir, plan, markers, time.time() - start, log)


def _fresh_tmp_dir(tmp):
  """Empties STATE_DIR/tmp: what an interrupted run left there is incomplete."""
  try:
    filesystem.empty_dir(tmp)
  except OSError as err:
    raise output_error(tmp, err) from None


def _convert_shards(output_dir, shards, fingerprints, workers, progress, init_args,
                    convert_fn):
  """Converts the studies of `shards` in order (one stream through the pool, so that workers
  never wait at a shard's end); writes and commits each shard when complete. On any failure
  (OutputError, Ctrl-C) the shard being written is discarded and the workers are stopped; the
  committed shards stay."""
  studies = [study for shard in shards for study in shard.studies]
  limits = init_args[3]
  markers, skipped = {}, 0
  bar = tqdm.tqdm(total=len(studies), unit="study", desc="convert", disable=not progress)

  def counted(results):
    nonlocal skipped
    for study, result in results:
      skipped += result[0] != "ok"
      bar.update(1)
      bar.set_postfix(skipped=skipped, refresh=False)
      yield study, result

  results = _ordered_results(studies, workers, init_args, convert_fn)
  with bar, contextlib.closing(results):
    for shard in shards:
      markers[shard.filename] = write_shard(
          output_dir, shard, fingerprints[shard.filename], limits,
          counted(itertools.islice(results, len(shard.studies))))
  return markers

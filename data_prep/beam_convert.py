"""The conversion as an Apache Beam pipeline (`launch.py convert --beam_pipeline_options ...`).

The same conversion as data_prep/convert.py's local pool, on any Beam runner (DirectRunner on
one machine; Dataflow, Flink, Spark on a cluster), for corpora that outgrow one host:

  launcher:  convert.plan_conversion (the corpus, the shards, their file names and study order,
             exactly as locally) -> convert.prepare_output (refuses another conversion's
             output_dir, finds the shards a previous run finished)
  pipeline:  Create(one element per unfinished shard) -> Reshuffle (spreads the shards over the
             workers) -> ConvertShardFn: each study of the shard, in order, through
             convert.run_study (the per-study function of the local pool: read, preprocess,
             encode, or a skip with its reason) in the DoFn's convert.StudyProcess, the shard
             written by convert.write_shard (temporary name, atomic rename, then its marker)
  launcher:  the markers of every shard -> convert.finish_conversion (dataset_info.json,
             features.json, metadata.json, conversion_report.json, written once)

Why one element per shard: a shard's records are written in the local order by one worker, so
Beam and local conversions give byte-identical shards, and no record (MBs of voxels) ever
crosses a shuffle; a corpus has thousands of shards, plenty to spread. Why the launcher writes
the metadata: the markers on the output file system are what a rerun resumes from anyway, and
reading them there lets the local writer of the report be the only one. Study skips travel as
data (in the markers), never as exceptions: a study that raises is a skip with `retry: true`.

Beam's retries: a retried bundle rewrites its shard under a new temporary name and renames it
over the final name with the same bytes, then rewrites the same marker: nothing is duplicated or
lost. A failed or cancelled pipeline leaves the shards it finished; rerunning the same command
(on Beam or locally) redoes only the others.

Why a child process per DoFn (convert.StudyProcess): Beam runs bundles on threads of its worker
processes, where no alarm can interrupt a study; in the child's main thread it can, so
data.study_timeout_s applies as in the local pool, and a study that kills its process (out of
memory) is a skip with `retry: true`, as there, not a crashed Beam worker. A Beam worker that
dies for another reason is retried by the runner, which then fails the pipeline (Dataflow after
4 attempts); rerunning resumes. The child does the study's work (read, preprocess, serialize:
no TensorFlow, so it starts in about a second) and the DoFn only writes the records, so on one
machine the DirectRunner's worker threads convert in parallel (multi_threading, the default
parse_pipeline_options gives direct_num_workers > 1).

The corpus may be on any file system Beam supports (data_prep/filesystem.py); the launcher
reads its CSVs and listings, the workers its volumes.

Importing this module without apache-beam raises filesystem.BeamNotInstalled, which names
requirements-beam.txt.
"""

import contextlib
import logging
import os
import time

from data_prep import convert
from data_prep import filesystem
from medfinder_jax import errors

filesystem.require_beam("launch.py convert --beam_pipeline_options")


import apache_beam as beam  # pylint: disable=g-import-not-at-top,wrong-import-position
from apache_beam.options import pipeline_options  # pylint: disable=g-import-not-at-top

REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METRICS = "medfinder_convert"


@contextlib.contextmanager
def _quiet_logger(name, level=logging.ERROR):
  logger = logging.getLogger(name)
  previous = logger.level
  logger.setLevel(level)
  try:
    yield
  finally:
    logger.setLevel(previous)


class PipelineFailed(errors.UserError):
  """The Beam pipeline failed; the shards it finished are kept and a rerun resumes."""


class BadPipelineOptions(errors.UserError):
  """--beam_pipeline_options holds an option no Beam runner knows."""


def parse_pipeline_options(text):
  """PipelineOptions from TFDS's syntax: "runner=DirectRunner,direct_num_workers=2", each item
  one Beam flag without its dashes (so a value cannot hold a comma, as in TFDS). An option Beam
  does not know is refused (Beam would drop it with a warning: a typo would silently change the
  run). Two defaults differ from Beam's: direct_num_workers > 1 (or 0: one per core) without
  direct_running_mode runs that many worker threads in this process (multi_threading; Beam's
  in_memory default runs one), and worker logs start at WARNING
  (default_sdk_harness_log_level), not INFO. Threads suffice because each converts its
  studies in a StudyProcess child of its own and holds no GIL while it waits;
  multi_processing would start a Beam worker process per worker as well, each importing Beam,
  and TensorFlow for the shard writer, before its first shard."""
  flags = [f"--{item.strip().lstrip('-')}" for item in str(text).split(",") if item.strip()]
  options = pipeline_options.PipelineOptions(flags)
  with _quiet_logger(pipeline_options.__name__):
    known = options.get_all_options()
    unknown = sorted(set(options.get_all_options(retain_unknown_options=True)) - set(known))
  if unknown:
    raise BadPipelineOptions(
        f"--beam_pipeline_options {text!r}: unknown Beam option(s) {unknown}; expected "
        f"name=value items separated by commas, e.g. runner=DirectRunner,direct_num_workers=2 "
        f"(see `python -m apache_beam.examples.wordcount --help` for every option)")
  given = {flag.split("=")[0][2:] for flag in flags}
  direct = options.view_as(pipeline_options.DirectOptions)
  if direct.direct_num_workers not in (None, 1) and "direct_running_mode" not in given:
    direct.direct_running_mode = "multi_threading"
  if "default_sdk_harness_log_level" not in given:   # not every worker's start-up notices
    options.view_as(pipeline_options.WorkerOptions).default_sdk_harness_log_level = "WARNING"
  return options


class ConvertShardFn(beam.DoFn):
  """One shard: its studies in order through convert.run_study in a convert.StudyProcess (one
  child process per DoFn instance, started by its first study), written by convert.write_shard.
  Yields the shard's file name; the outcome of every study is in the shard's marker."""

  def __init__(self, output_dir, init_args, convert_fn):
    super().__init__()
    self.output_dir, self.init_args, self.convert_fn = output_dir, init_args, convert_fn
    self.studies = beam.metrics.Metrics.counter(METRICS, "studies_converted")
    self.skipped = beam.metrics.Metrics.counter(METRICS, "studies_skipped")
    self.shards = beam.metrics.Metrics.counter(METRICS, "shards_written")

  def setup(self):
    self.study_process = convert.StudyProcess(self.init_args)

  def process(self, task):
    shard, fingerprint = task
    results = ((study, self.study_process.run(self.convert_fn, study)) for study in shard.studies)
    marker = convert.write_shard(self.output_dir, shard, fingerprint, self.init_args[3], results)
    self.studies.inc(marker["num_examples"])
    self.skipped.inc(len(marker["skipped"]))
    self.shards.inc()
    yield shard.filename

  def teardown(self):
    self.study_process.close()


def build_pipeline(pipeline, tasks, output_dir, init_args, convert_fn):
  """Adds the conversion of `tasks` ([(shard, fingerprint)]) to `pipeline`."""
  return (pipeline
          | "Shards" >> beam.Create(tasks, reshuffle=False)
          | "Spread" >> beam.Reshuffle()
          | "ConvertShard" >> beam.ParDo(ConvertShardFn(output_dir, init_args, convert_fn)))


@contextlib.contextmanager
def _repository_importable():
  """Puts the repository on PYTHONPATH while the pipeline runs: the DirectRunner's worker
  processes inherit the environment and must import data_prep (cluster workers get it from
  --setup_file or a container image instead; README)."""
  previous = os.environ.get("PYTHONPATH")
  paths = [p for p in (previous or "").split(os.pathsep) if p]
  if REPOSITORY not in paths:
    os.environ["PYTHONPATH"] = os.pathsep.join([REPOSITORY, *paths])
  try:
    yield
  finally:
    if previous is None:
      os.environ.pop("PYTHONPATH", None)
    else:
      os.environ["PYTHONPATH"] = previous


def run_pipeline(options, tasks, output_dir, init_args, convert_fn):
  """Runs the conversion of `tasks` on the runner of `options` and waits for it. PipelineFailed
  when it fails; Ctrl-C cancels a job that runs elsewhere."""
  pipeline = beam.Pipeline(options=options)
  build_pipeline(pipeline, tasks, output_dir, init_args, convert_fn)
  result = None
  try:
    with _repository_importable():
      result = pipeline.run()
      state = result.wait_until_finish()
  except KeyboardInterrupt:
    if result is not None:
      with contextlib.suppress(Exception):
        result.cancel()
    raise
  except errors.UserError:
    raise
  except Exception as err:  # pylint: disable=broad-except  (a runner's failure, in its words)
    raise PipelineFailed(_failure(err)) from None
  if state != beam.runners.runner.PipelineState.DONE:
    raise PipelineFailed(_failure(f"the pipeline ended in state {state}"))


def _failure(err):
  lines = [line.strip() for line in str(err).splitlines() if line.strip()]
  what = lines[-1] if lines else type(err).__name__
  return (f"the Beam pipeline failed: {what}; the shards finished before are kept: fix the "
          f"cause and rerun the same command to resume")


def convert_corpus(data_config, output_dir, options, log=print, convert_fn=convert.convert_study):
  """convert.convert_corpus on Beam: the same plan, records, metadata and report. `options`:
  PipelineOptions (parse_pipeline_options) or its text. Returns the report."""
  start = time.time()
  if not isinstance(options, pipeline_options.PipelineOptions):
    options = parse_pipeline_options(options)
  plan = convert.plan_conversion(data_config, log)
  markers = convert.prepare_output(output_dir, plan, log)
  todo = [(s, plan.fingerprints[s.filename]) for s in plan.shards if s.filename not in markers]
  if todo:
    runner = options.view_as(pipeline_options.StandardOptions).runner or "DirectRunner"
    log(f"beam: {len(todo)} of {len(plan.shards)} shards to convert on {runner}")
    run_pipeline(options, todo, output_dir, plan.init_args, convert_fn)
  for shard, fingerprint in todo:
    marker = convert.read_marker(output_dir, shard, fingerprint)
    if marker is None:
      raise PipelineFailed(f"the Beam pipeline finished, but {shard.filename} in {output_dir} "
                           f"is missing or incomplete; rerun the same command")
    markers[shard.filename] = marker
  return convert.finish_conversion(output_dir, plan, markers, time.time() - start, log)

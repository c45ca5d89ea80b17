"""Conversion on Apache Beam (DirectRunner): the same records, report and resumption as the
local pool, for every layout; failures inside workers are skips (a study that hangs past
data.study_timeout_s or kills its process too); retried writes are idempotent; the corpus is
read through Beam's file systems when data_root has a scheme (memtest://, a test file system
that no `os` call sees), by Beam and by the local pool.

Prism (the DirectRunner's newer engine) downloads its binary from GitHub on first use, so it
cannot run offline and is not tested here; the tests run Beam's FnApiRunner (in_memory, and
two workers as threads (multi_threading) or processes (multi_processing) in the slow set)."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

pytest.importorskip("apache_beam")

from data_prep import beam_convert  # noqa: E402  (after the skip)
from data_prep import convert  # noqa: E402
from data_prep import filesystem  # noqa: E402
from data_prep import phantom_layouts  # noqa: E402
from medfinder_jax import errors  # noqa: E402
import memtest_filesystem  # noqa: E402  (registers memtest://)
import test_convert  # noqa: E402  (tests/ is on sys.path: the local converter's helpers)
from test_convert import dataset_files, shard_stamps, train_shards  # noqa: E402

ROOT = test_convert.ROOT
TESTS = os.path.join(ROOT, "tests")
IN_MEMORY = "runner=DirectRunner"
TWO_THREADS = "runner=DirectRunner,direct_num_workers=2"     # multi_threading, our default
TWO_PROCESSES = "runner=DirectRunner,direct_num_workers=2,direct_running_mode=multi_processing"


def run_beam(root, out, options=IN_MEMORY, convert_fn=convert.convert_study, **overrides):
  return beam_convert.convert_corpus(test_convert.data_config(root, **overrides), str(out),
                                     options, log=lambda *_: None, convert_fn=convert_fn)


# The corpus and its local conversion, as test_convert.py builds them (module-scoped fixtures).
phantom_root = test_convert.phantom_root
reference = test_convert.reference


@pytest.fixture(scope="module")
def bad_corpus(phantom_root, tmp_path_factory):
  """The phantom corpus with a bad study of every kind test_convert plants, converted locally:
  (corpus root, local output)."""
  root = tmp_path_factory.mktemp("bad") / "corpus"
  shutil.copytree(phantom_root, root)
  test_convert.plant_bad_inputs(root)
  out = root.parent / "local"
  test_convert.run_convert(root, out, workers=0)
  return root, out


def raise_at_target(study):
  """Raises at the study named by $RAISE_AT_STUDY (the exception leaves the convert_fn)."""
  if study.study_id == os.environ.get("RAISE_AT_STUDY"):
    raise RuntimeError("decoder crashed")
  return convert.convert_study(study)


def test_beam_and_local_conversions_with_bad_studies_are_byte_identical(bad_corpus, tmp_path):
  root, local = bad_corpus
  report = run_beam(root, tmp_path)
  assert dataset_files(tmp_path) == dataset_files(local)     # shards, metadata, report
  assert report["num_converted"] == 14 and report["num_skipped"] == 12
  assert not os.listdir(tmp_path / convert.STATE_DIR / "tmp")
  stamps = shard_stamps(tmp_path)
  assert run_beam(root, tmp_path) == report                   # a rerun finds everything done
  assert shard_stamps(tmp_path) == stamps


def test_a_study_that_raises_inside_a_worker_is_a_skip_and_the_rest_convert(
    phantom_root, reference, tmp_path, monkeypatch):
  target = train_shards(phantom_root)[1].studies[0].study_id
  monkeypatch.setenv("RAISE_AT_STUDY", target)
  report = run_beam(phantom_root, tmp_path, convert_fn=raise_at_target)
  assert [(s["study_id"], s["reason"], s["retry"]) for s in report["skipped"]] == [
      (target, "unexpected error: RuntimeError: decoder crashed", True)]
  assert report["num_converted"] == 13 and report["num_to_retry"] == 1
  monkeypatch.delenv("RAISE_AT_STUDY")
  stamps = shard_stamps(tmp_path)
  rerun = run_beam(phantom_root, tmp_path)                     # retries that study's shard only
  assert rerun["num_skipped"] == 0
  assert {n for n, t in shard_stamps(tmp_path).items() if t != stamps[n]} == {
      train_shards(phantom_root)[1].filename}
  assert dataset_files(tmp_path) == dataset_files(reference)


@pytest.mark.slow
@pytest.mark.parametrize("options", [TWO_THREADS, TWO_PROCESSES])
def test_two_workers_give_the_local_bytes_and_report_a_raising_study(
    bad_corpus, tmp_path, monkeypatch, options):
  root, local = bad_corpus
  monkeypatch.setenv("PYTHONPATH", TESTS)           # the workers unpickle raise_at_target
  monkeypatch.setenv("RAISE_AT_STUDY", "no-such-study")
  report = run_beam(root, tmp_path / "out", options, convert_fn=raise_at_target)
  assert dataset_files(tmp_path / "out") == dataset_files(local)
  target = train_shards(root)[0].studies[1].study_id
  monkeypatch.setenv("RAISE_AT_STUDY", target)
  report = run_beam(root, tmp_path / "raising", options, convert_fn=raise_at_target)
  assert [s["reason"] for s in report["skipped"] if s["study_id"] == target] == [
      "unexpected error: RuntimeError: decoder crashed"]
  assert report["num_converted"] == 13 and report["num_skipped"] == 13


@pytest.mark.parametrize("layout", phantom_layouts.LAYOUTS)
def test_every_layout_converts_on_beam_as_locally(tmp_path, layout):
  root = tmp_path / layout
  phantom_layouts.write_phantom_corpus(str(root), 6, seed=0, folders=3, size=40, slices=12,
                               layout=layout)
  test_convert.run_convert(root, tmp_path / "local", workers=0)
  report = run_beam(root, tmp_path / "beam")
  assert report["layout"] == layout and report["num_converted"] == 6
  assert dataset_files(tmp_path / "beam") == dataset_files(tmp_path / "local")


KILL_SCRIPT = """
import os, sys
sys.path[:0] = [{root!r}, {tests!r}]
import test_beam_convert
if __name__ == "__main__":
  os.environ["STUDIES_SEEN"] = {seen!r}
  test_beam_convert.run_beam({data!r}, {out!r}, convert_fn=test_beam_convert.die_at_fifth_study)
"""


def die_at_fifth_study(study):
  """Kills the runner (the parent of the study's process: the pipeline, its in-memory workers
  and all), then its own process, at the fifth study, counted in the file $STUDIES_SEEN."""
  with open(os.environ["STUDIES_SEEN"], "a", encoding="utf-8") as file:
    file.write(study.study_id + "\n")
  with open(os.environ["STUDIES_SEEN"], encoding="utf-8") as file:
    if len(file.readlines()) == 5:
      os.kill(os.getppid(), signal.SIGKILL)
      os.kill(os.getpid(), signal.SIGKILL)
  return convert.convert_study(study)


def test_a_rerun_after_a_killed_pipeline_finishes_with_the_same_dataset(phantom_root,
                                                                        reference, tmp_path):
  script = KILL_SCRIPT.format(root=ROOT, tests=TESTS, data=str(phantom_root), out=str(tmp_path),
                              seen=str(tmp_path.parent / f"{tmp_path.name}.seen"))
  killed = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=300,
                          check=False)
  assert killed.returncode == -signal.SIGKILL, killed.stderr.decode()[-2000:]
  stamps = shard_stamps(tmp_path)
  plan = convert.plan_conversion(test_convert.data_config(phantom_root), log=lambda *_: None)
  assert 1 <= len(stamps) < len(plan.shards)                  # killed midway
  assert not os.path.exists(tmp_path / convert.REPORT_NAME)
  report = run_beam(phantom_root, tmp_path)
  assert {n: shard_stamps(tmp_path)[n] for n in stamps} == stamps      # not redone
  assert report["num_converted"] == 14
  assert dataset_files(tmp_path) == dataset_files(reference)


def test_a_retried_bundle_rewrites_its_shard_with_the_same_bytes(phantom_root, reference,
                                                                 tmp_path):
  plan = convert.plan_conversion(test_convert.data_config(phantom_root), log=lambda *_: None)
  convert.prepare_output(str(tmp_path), plan, log=lambda *_: None)
  shard = plan.shards[0]
  fn = beam_convert.ConvertShardFn(str(tmp_path), plan.init_args, convert.convert_study)
  fn.setup()
  task = (shard, plan.fingerprints[shard.filename])
  first = list(fn.process(task))
  marker = (tmp_path / convert.STATE_DIR / f"{shard.filename}.json").read_bytes()
  assert list(fn.process(task)) == first == [shard.filename]          # the retry
  fn.teardown()
  assert (tmp_path / shard.filename).read_bytes() == (reference / shard.filename).read_bytes()
  assert (tmp_path / convert.STATE_DIR / f"{shard.filename}.json").read_bytes() == marker
  assert not os.listdir(tmp_path / convert.STATE_DIR / "tmp")


def test_a_failed_pipeline_keeps_its_shards_and_a_rerun_resumes(phantom_root, reference,
                                                                tmp_path, monkeypatch):
  full = train_shards(phantom_root)[2].filename
  real_writer = convert.tensorflow().io.TFRecordWriter

  class FullDisk:
    def __init__(self, path):
      self.path, self.writer = path, real_writer(path)

    def write(self, record):
      if full in self.path:
        raise OSError(28, os.strerror(28))
      self.writer.write(record)

    def close(self):
      self.writer.close()

  monkeypatch.setattr(convert.tensorflow().io, "TFRecordWriter", FullDisk)
  with pytest.raises(errors.UserError, match="No space left on device") as err:
    run_beam(phantom_root, tmp_path)
  monkeypatch.undo()
  assert "rerun the same command" in str(err.value)
  assert full not in shard_stamps(tmp_path)
  assert not os.path.exists(tmp_path / convert.REPORT_NAME)
  run_beam(phantom_root, tmp_path)
  assert dataset_files(tmp_path) == dataset_files(reference)


def test_output_through_beam_filesystems_gives_the_same_dataset(phantom_root, reference,
                                                                 tmp_path, monkeypatch):
  out = str(tmp_path / "out")
  local_is_remote = filesystem.is_remote
  monkeypatch.setattr(filesystem, "is_remote",          # as if out were gs://...: FileSystems
                      lambda path: str(path).startswith(out) or local_is_remote(path))
  run_beam(phantom_root, out)
  monkeypatch.undo()
  assert dataset_files(out) == dataset_files(reference)
  assert json.loads((tmp_path / "out" / convert.REPORT_NAME).read_text())["num_converted"] == 14


def test_pipeline_options_take_tfds_syntax_and_refuse_unknown_names():
  options = beam_convert.parse_pipeline_options("runner=DirectRunner,direct_num_workers=2")
  values = options.get_all_options()
  assert (values["runner"], values["direct_num_workers"]) == ("DirectRunner", 2)
  assert values["direct_running_mode"] == "multi_threading"    # 2 workers, not in_memory's 1
  processes = beam_convert.parse_pipeline_options(
      "direct_num_workers=2,direct_running_mode=multi_processing").get_all_options()
  assert processes["direct_running_mode"] == "multi_processing"
  per_core = beam_convert.parse_pipeline_options("direct_num_workers=0").get_all_options()
  assert per_core["direct_running_mode"] == "multi_threading"
  one = beam_convert.parse_pipeline_options("runner=DirectRunner").get_all_options()
  assert one["direct_running_mode"] == "in_memory"
  with pytest.raises(beam_convert.BadPipelineOptions, match=r"\['direct_num_worker'\]"):
    beam_convert.parse_pipeline_options("runner=DirectRunner,direct_num_worker=2")
  assert issubclass(beam_convert.BadPipelineOptions, errors.UserError)


def test_cli_converts_on_beam_with_the_flag(phantom_root, reference, tmp_path, capsys):
  import launch  # pylint: disable=import-outside-toplevel
  code = launch.main(["convert", "--data_root", str(phantom_root), "--output_dir",
                      str(tmp_path), "--shape", "24,24,12", "--config.data.shard_size=2",
                      "--config.data.min_shards=2", "--beam_pipeline_options", IN_MEMORY])
  assert code == 0
  assert "converted 14 of 14 CSV rows" in capsys.readouterr().out
  assert dataset_files(tmp_path) == dataset_files(reference)


def test_cli_refuses_workers_beside_beam_options(phantom_root, tmp_path, capsys):
  import launch  # pylint: disable=import-outside-toplevel
  code = launch.main(["convert", "--data_root", str(phantom_root), "--output_dir",
                      str(tmp_path), "--workers", "4", "--beam_pipeline_options", IN_MEMORY])
  assert code == 2
  assert "--workers 4 sizes the local pool" in capsys.readouterr().err


def test_cli_without_apache_beam_says_what_to_install(phantom_root, tmp_path, capsys,
                                                      monkeypatch):
  import launch  # pylint: disable=import-outside-toplevel
  import data_prep  # pylint: disable=import-outside-toplevel
  for name in ("apache_beam", "apache_beam.io", "apache_beam.io.filesystems"):
    monkeypatch.setitem(sys.modules, name, None)               # importing them fails
  monkeypatch.delitem(sys.modules, "data_prep.beam_convert")
  monkeypatch.delattr(data_prep, "beam_convert")
  code = launch.main(["convert", "--data_root", str(phantom_root), "--output_dir",
                      str(tmp_path), "--beam_pipeline_options", IN_MEMORY])
  err = capsys.readouterr().err
  assert code == 2 and "Traceback" not in err
  assert "needs apache-beam, which is not installed: pip install -r requirements-beam.txt" in err
  assert not os.path.exists(tmp_path / convert.STATE_DIR)


def test_a_local_corpus_converts_without_apache_beam(phantom_root, reference, tmp_path,
                                                     monkeypatch):
  for name in ("apache_beam", "apache_beam.io", "apache_beam.io.filesystem",
               "apache_beam.io.filesystems"):
    monkeypatch.setitem(sys.modules, name, None)               # any use of Beam fails
  test_convert.run_convert(phantom_root, tmp_path, workers=0)
  assert dataset_files(tmp_path) == dataset_files(reference)


def test_a_remote_data_root_without_apache_beam_says_what_to_install(tmp_path, monkeypatch):
  for name in ("apache_beam", "apache_beam.io", "apache_beam.io.filesystems"):
    monkeypatch.setitem(sys.modules, name, None)               # importing them fails
  with pytest.raises(filesystem.BeamNotInstalled,
                     match=r"data_root 'gs://bucket/corpus' needs apache-beam, which is not "
                           r"installed: pip install -r requirements-beam.txt"):
    test_convert.run_convert("gs://bucket/corpus", tmp_path)
  assert not os.listdir(tmp_path)


def test_a_scheme_no_installed_file_system_serves_is_refused_naming_it(tmp_path):
  with pytest.raises(filesystem.BeamNotInstalled, match=r"no Beam file system for nofs:// is "
                                                        r"installed"):
    test_convert.run_convert("nofs://bucket/corpus", tmp_path)


# --- The corpus on a Beam file system (memtest://) -----------------------------------------------

@pytest.fixture
def memtest_root(tmp_path, monkeypatch):
  """tmp_path is the root of memtest:// here and in every worker process (the environment)."""
  monkeypatch.setenv(memtest_filesystem.ROOT_VARIABLE, str(tmp_path))
  return tmp_path


def without_csv_path(files):
  """dataset_files with the report's path of the CSV (local or memtest://) left out."""
  files[convert.REPORT_NAME].pop("csv")
  return files


@pytest.mark.parametrize("layout", phantom_layouts.LAYOUTS)
def test_every_layout_read_from_a_beam_file_system_converts_as_from_the_local_path(
    memtest_root, layout):
  root = memtest_root / layout
  phantom_layouts.write_phantom_corpus(str(root), 6, seed=0, folders=3, size=40, slices=12,
                                       layout=layout)
  url = memtest_filesystem.url(root)
  assert not os.path.exists(url)                         # os cannot see it: only the layer can
  test_convert.run_convert(root, memtest_root / "local", workers=0)
  expected = without_csv_path(dataset_files(memtest_root / "local"))
  report = test_convert.run_convert(url, memtest_root / "from_url", workers=0)
  assert report["csv"].startswith(f"{url}/") and report["num_converted"] == 6
  assert without_csv_path(dataset_files(memtest_root / "from_url")) == expected
  run_beam(url, memtest_root / "beam", convert_fn=memtest_filesystem.convert_study)
  assert without_csv_path(dataset_files(memtest_root / "beam")) == expected


def test_bad_studies_read_from_a_beam_file_system_are_skipped_as_from_the_local_path(
    bad_corpus, memtest_root):
  """The local pool's workers (processes) and Beam read memtest:// too, and every bad file gives
  the reason it gives from the local path (the path in a reason aside)."""
  root, local = bad_corpus
  shutil.copytree(root, memtest_root / "corpus")
  url = memtest_filesystem.url(memtest_root / "corpus")
  expected = without_csv_path(dataset_files(local))
  expected_skips = expected[convert.REPORT_NAME].pop("skipped")

  def check(out):
    files = without_csv_path(dataset_files(out))
    skips = files[convert.REPORT_NAME].pop("skipped")
    assert files == expected
    assert [{**s, "reason": s["reason"].replace(url, str(root))} for s in skips] == expected_skips

  test_convert.run_convert(url, memtest_root / "pool", workers=1,
                           convert_fn=memtest_filesystem.convert_study)
  check(memtest_root / "pool")
  run_beam(url, memtest_root / "beam", convert_fn=memtest_filesystem.convert_study)
  check(memtest_root / "beam")


# --- Studies that hang or kill their process, on Beam ---------------------------------------------

def misbehave_at_targets(study):
  """Hangs at $HANG_AT (an alarm ends it), hangs deaf to the alarm at $DEAF_AT (only a kill ends
  it), kills its own process at $DIE_AT; converts the others."""
  if study.study_id == os.environ.get("HANG_AT"):
    time.sleep(3600)
  if study.study_id == os.environ.get("DEAF_AT"):
    signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGALRM])
    time.sleep(3600)
  if study.study_id == os.environ.get("DIE_AT"):
    os.kill(os.getpid(), signal.SIGKILL)
  return convert.convert_study(study)


@pytest.mark.timeout(600)
def test_studies_that_hang_or_kill_their_process_on_beam_are_skips_and_the_rest_convert(
    phantom_root, tmp_path, monkeypatch):
  shards = train_shards(phantom_root)
  targets = {"HANG_AT": shards[1].studies[1].study_id, "DEAF_AT": shards[2].studies[0].study_id,
             "DIE_AT": shards[3].studies[0].study_id}
  for variable, study_id in targets.items():
    monkeypatch.setenv(variable, study_id)
  monkeypatch.setattr(convert, "STUDY_GRACE_S", 2.0)   # the DoFn runs here (in_memory)
  start = time.monotonic()
  report = run_beam(phantom_root, tmp_path, convert_fn=misbehave_at_targets, study_timeout_s=3.0)
  assert time.monotonic() - start < 300
  timed_out = convert.timed_out(3.0)
  assert {(s["study_id"], s["reason"], s["retry"]) for s in report["skipped"]} == {
      (targets["HANG_AT"], timed_out, True), (targets["DEAF_AT"], timed_out, True),
      (targets["DIE_AT"], convert.WORKER_DIED, True)}
  assert report["num_converted"] == 11 and report["num_to_retry"] == 3

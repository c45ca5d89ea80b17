"""Conversion: TFDS round trip, bad input, resume after interruption, worker deaths, CLI."""

import errno
import gzip
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time

import nibabel as nib
import numpy as np
import pytest

from configs import default
from data_prep import convert
from data_prep import corpus
from data_prep import corpus_base
from data_prep import corpus_bimcv
from data_prep import phantom_layouts
from data_prep import preprocess
from data_prep import schema
from medfinder_jax import errors

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPE = (24, 24, 12)


def data_config(root, **overrides):
  config = default.get_config().data
  config.data_root = str(root)
  config.shape = SHAPE
  config.shard_size = 2
  config.min_shards = 2
  for key, value in overrides.items():
    config[key] = value
  return config


def run_convert(root, out, workers=0, convert_fn=convert.convert_study, **overrides):
  return convert.convert_corpus(data_config(root, **overrides), str(out), workers=workers,
                                progress=False, log=lambda *_: None, convert_fn=convert_fn)


def shard_stamps(out):
  """{shard file name: modification time in ns}."""
  return {n: os.stat(os.path.join(out, n)).st_mtime_ns
          for n in os.listdir(out) if ".tfrecord-" in n}


def dataset_files(out):
  """{name: bytes} of a converted dataset (the report without its own output_dir path)."""
  files = {}
  for name in sorted(os.listdir(out)):
    if name == convert.STATE_DIR:
      continue
    with open(os.path.join(out, name), "rb") as file:
      files[name] = file.read()
  report = json.loads(files[convert.REPORT_NAME])
  report.pop("output_dir")
  files[convert.REPORT_NAME] = report
  return files


@pytest.fixture(scope="module")
def phantom_root(tmp_path_factory):
  root = tmp_path_factory.mktemp("phantom")
  phantom_layouts.write_phantom_corpus(str(root), n=14, seed=0, folders=4, size=48, slices=16)
  return root


@pytest.fixture(scope="module")
def reference(phantom_root, tmp_path_factory):
  out = tmp_path_factory.mktemp("reference")
  run_convert(phantom_root, out, workers=0)
  return out


def read_split(out, split, **kw):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  builder = tfds.builder_from_directory(str(out))
  return list(tfds.as_numpy(builder.as_dataset(split=split, **kw)))


def test_records_read_back_through_tfds_equal_the_preprocessed_studies(phantom_root, reference):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  config = data_config(phantom_root)
  studies = corpus.read_corpus(config).studies
  params = schema.PreprocessParams.from_config(config)
  builder = tfds.builder_from_directory(str(reference))
  assert builder.info.metadata["preprocess"]["shape"] == list(SHAPE)
  assert builder.info.metadata["split_assignment"]["val"] == ["CT3"]
  for split in schema.SPLITS:
    expected = [s for s in studies if s.split == split]
    records = read_split(reference, split)
    assert builder.info.splits[split].num_examples == len(expected) == len(records)
    assert builder.info.splits[split].num_shards >= 2
    for study, record in zip(expected, records):
      source = preprocess.load_source(os.path.join(phantom_root, study.source_path))
      volume, volume_spacing = preprocess.preprocess(source, params)
      np.testing.assert_array_equal(record[schema.VOLUME], volume)
      np.testing.assert_allclose(record[schema.VOLUME_SPACING], volume_spacing, rtol=1e-6)
      assert record[schema.REPORT].decode() == study.report
      assert record["findings"].decode() == study.labels["findings"]
      assert record[schema.STUDY_ID].decode() == study.study_id
      assert record[schema.SOURCE_PATH].decode() == study.source_path
      assert record[schema.SHAPE].tolist() == list(source.raw.shape)
      np.testing.assert_allclose(record[schema.SPACING], source.spacing, rtol=1e-6)
      assert record[schema.ORIENTATION].decode() == source.orientation


def test_two_processes_read_disjoint_shards_that_cover_the_split(reference):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  seen = []
  for process in range(2):
    context = tf.distribute.InputContext(num_input_pipelines=2, input_pipeline_id=process)
    records = read_split(reference, "train", read_config=tfds.ReadConfig(input_context=context))
    seen.append({r[schema.STUDY_ID] for r in records})
  everything = {r[schema.STUDY_ID] for r in read_split(reference, "train")}
  assert seen[0] and seen[1] and not seen[0] & seen[1] and seen[0] | seen[1] == everything


def test_parallel_workers_write_the_same_bytes_as_one_process(phantom_root, reference, tmp_path):
  run_convert(phantom_root, tmp_path, workers=2)
  assert dataset_files(tmp_path) == dataset_files(reference)


def convert_noting_tensorflow(study):
  """convert_study's result, or a skip if the process converting has imported TensorFlow."""
  result = convert.convert_study(study)
  return ("skip", "TensorFlow was imported") if "tensorflow" in sys.modules else result


def test_studies_convert_in_processes_that_never_import_tensorflow(phantom_root, reference,
                                                                    tmp_path):
  """Only the writers of shards and metadata import TensorFlow: a worker of the local pool and
  a StudyProcess (the Beam DoFn's child) start without its seconds-long import."""
  report = run_convert(phantom_root, tmp_path, workers=1, convert_fn=convert_noting_tensorflow)
  assert report["num_skipped"] == 0
  assert dataset_files(tmp_path) == dataset_files(reference)
  plan = convert.plan_conversion(data_config(phantom_root), log=lambda *_: None)
  study_process = convert.StudyProcess(plan.init_args)
  try:
    status, record = study_process.run(convert_noting_tensorflow, plan.shards[0].studies[0])
  finally:
    study_process.close()
  shard = (tmp_path / plan.shards[0].filename).read_bytes()
  length, = struct.unpack("<Q", shard[:8])           # TFRecord framing: length, its CRC, data
  assert status == "ok" and record == shard[12:12 + length]


def test_rows_split_follows_csv_order(phantom_root, tmp_path):
  report = run_convert(phantom_root, tmp_path, split_by="rows")
  csv_path = os.path.join(phantom_root, "meta", phantom_layouts.CSV_NAME)
  with open(csv_path, encoding="utf-8") as file:
    paths = [line.split(",")[0] for line in file.read().splitlines()[1:]]
  ids = [corpus_base.study_id_of(os.path.basename(p)) for p in paths]
  train_end, val_end = corpus_bimcv.row_split_bounds(len(ids))
  for split, expected in (("train", ids[:train_end]), ("val", ids[train_end:val_end]),
                          ("test", ids[val_end:])):
    records = read_split(tmp_path, split) if expected else []
    assert [r[schema.STUDY_ID].decode() for r in records] == expected
  assert report["converted"]["val"] == val_end - train_end


def plant_bad_inputs(root):
  """Adds bad files and rows beside the phantom studies; returns {csv row: expected reason}."""
  good = sorted(root.glob("CT1/ct/*.nii.gz"))[0]
  good_bytes = good.read_bytes()
  ct = root / "CT2" / "ct"
  (ct / "truncated.nii.gz").write_bytes(good_bytes[:len(good_bytes) // 2])
  (ct / "plain.nii.gz").write_bytes(gzip.decompress(good_bytes))
  (ct / "text.nii.gz").write_bytes(gzip.compress(b"this is not an image\n" * 50))
  affine = np.diag([0.8, 0.8, 3.0, 1.0])
  nib.save(nib.Nifti1Image(np.zeros((32, 32), np.int16), affine), str(ct / "flat.nii.gz"))
  nib.save(nib.Nifti1Image(np.zeros((16, 16, 8, 4), np.int16), affine), str(ct / "cine.nii.gz"))
  nan = np.full((16, 16, 8), 40.0, np.float32)
  nan[3, 3, 3] = np.nan
  nib.save(nib.Nifti1Image(nan, affine), str(ct / "nan.nii.gz"))
  inf = np.full((16, 16, 8), 40.0, np.float32)
  inf[4, 4, 4] = -np.inf
  nib.save(nib.Nifti1Image(inf, affine), str(ct / "inf.nii.gz"))
  for name in ("noreport", "blankreport"):
    shutil.copy(good, ct / f"{name}.nii.gz")
  bad_rows = [
      ("CT2/ct/truncated.nii.gz", "r", "file is truncated or corrupt"),
      ("CT2/ct/plain.nii.gz", "r", "not a valid gzip file"),
      ("CT2/ct/text.nii.gz", "r", "not a NIfTI file"),
      ("CT2/ct/flat.nii.gz", "r", "expected a 3D volume, found a 2D array"),
      ("CT2/ct/cine.nii.gz", "r", "expected a 3D volume, found a 4D array"),
      ("CT2/ct/nan.nii.gz", "r", "volume has 1 NaN and 0 infinite voxels"),
      ("CT2/ct/inf.nii.gz", "r", "volume has 0 NaN and 1 infinite voxels"),
      ("CT2/ct/noreport.nii.gz", "", "empty report"),
      ("CT2/ct/blankreport.nii.gz", "  ", "empty report"),
      ("CT2/ct/gone.nii.gz", "r", "no volume file named 'gone.nii.gz'"),
      ("../outside/CT1/ct/x.nii.gz", "r", "escapes data_root"),
  ]
  csv_path = root / "meta" / phantom_layouts.CSV_NAME
  lines = csv_path.read_bytes().decode().splitlines()
  expected = {}
  for path, report, reason in bad_rows:
    lines.append(f'{path},"{report}",')
    expected[len(lines) - 1] = reason
  lines.append("CT2/ct/noreport.nii.gz,\"Derrame pleural peque\xf1o\",".encode("cp1252")
               .decode("latin-1"))
  expected[len(lines) - 1] = "column 'Report_en' is not valid utf-8 (byte 0xF1"
  csv_path.write_bytes("\n".join(lines).encode("latin-1") + b"\n")
  return expected


def test_bad_inputs_beside_good_studies_are_skipped_with_clear_reasons(phantom_root, tmp_path):
  root = tmp_path / "corpus"
  shutil.copytree(phantom_root, root)
  expected = plant_bad_inputs(root)
  report = run_convert(root, tmp_path / "out", workers=2)
  reasons = {s["row"]: s["reason"] for s in report["skipped"]}
  assert set(reasons) == set(expected)
  for row, reason in expected.items():
    assert reason in reasons[row], (row, reasons[row])
  assert report["num_converted"] == 14
  assert sum(len(read_split(tmp_path / "out", s)) for s in schema.SPLITS) == 14
  with open(tmp_path / "out" / convert.REPORT_NAME, encoding="utf-8") as file:
    assert json.load(file)["num_skipped"] == len(expected)
  assert report["num_to_retry"] == 0


def test_bad_input_skips_are_final_and_a_rerun_redoes_no_shard(phantom_root, tmp_path):
  root = tmp_path / "corpus"
  shutil.copytree(phantom_root, root)
  ct = root / "CT1" / "ct"
  (ct / "text.nii.gz").write_bytes(gzip.compress(b"this is not an image\n" * 50))
  csv_path = root / "meta" / phantom_layouts.CSV_NAME
  csv_path.write_text(csv_path.read_text() + 'CT1/ct/text.nii.gz,"r",\n')
  first = run_convert(root, tmp_path / "out")
  assert [s["study_id"] for s in first["skipped"]] == ["text"] and not first["num_to_retry"]
  stamps = shard_stamps(tmp_path / "out")
  assert run_convert(root, tmp_path / "out") == first
  assert shard_stamps(tmp_path / "out") == stamps


KILL_SCRIPT = """
import sys
sys.path[:0] = [{root!r}, {tests!r}]
import test_convert
test_convert.run_convert({data!r}, {out!r}, workers=0, convert_fn=test_convert.die_at_target)
"""


def die_at_target(study):
  """Kills the calling process at the study named by $KILL_AT_STUDY."""
  if study.study_id == os.environ.get("KILL_AT_STUDY"):
    os.kill(os.getpid(), signal.SIGKILL)
  return convert.convert_study(study)


def die_once_at_target(study):
  """Kills its worker the first time it meets $KILL_AT_STUDY (remembered in $KILL_MARKER)."""
  marker = os.environ.get("KILL_MARKER", "")
  if study.study_id == os.environ.get("KILL_AT_STUDY") and not os.path.exists(marker):
    open(marker, "w").close()
    os.kill(os.getpid(), signal.SIGKILL)
  return convert.convert_study(study)


def train_shards(root):
  return [s for s in convert.plan_shards(corpus.read_corpus(data_config(root)).studies, 2, 2)
          if s.split == "train"]


def test_a_killed_conversion_resumes_to_an_identical_dataset(phantom_root, reference, tmp_path):
  shards = train_shards(phantom_root)
  target = shards[2].studies[0].study_id
  script = KILL_SCRIPT.format(root=ROOT, tests=os.path.join(ROOT, "tests"),
                              data=str(phantom_root), out=str(tmp_path))
  env = dict(os.environ, KILL_AT_STUDY=target)
  killed = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                          timeout=300, check=False)
  assert killed.returncode == -signal.SIGKILL, killed.stderr.decode()[-2000:]
  stamps = shard_stamps(tmp_path)
  assert sorted(stamps) == [shards[0].filename, shards[1].filename]
  run_convert(phantom_root, tmp_path, workers=0)
  assert {n: shard_stamps(tmp_path)[n] for n in stamps} == stamps   # not redone
  assert dataset_files(tmp_path) == dataset_files(reference)


def test_a_study_that_failed_unexpectedly_is_retried_by_a_rerun(phantom_root, reference,
                                                                tmp_path, monkeypatch):
  shards = train_shards(phantom_root)
  target = shards[1].studies[0]
  load_source = preprocess.load_source

  def fail_at_target(path, *args):
    if path.endswith(target.source_path):
      raise RuntimeError("disk hiccup")
    return load_source(path, *args)

  monkeypatch.setattr(preprocess, "load_source", fail_at_target)   # workers=0: in this process
  report = run_convert(phantom_root, tmp_path, workers=0)
  monkeypatch.undo()
  assert [(s["study_id"], s["reason"], s["retry"]) for s in report["skipped"]] == [
      (target.study_id, "unexpected error: RuntimeError: disk hiccup", True)]
  assert report["num_converted"] == 13 and report["num_to_retry"] == 1
  assert "rerun the same command to retry them" in convert.format_summary(report)
  stamps = shard_stamps(tmp_path)
  rerun = run_convert(phantom_root, tmp_path, workers=0)
  assert rerun["num_skipped"] == 0 and rerun["num_converted"] == 14
  redone = {n for n, stamp in shard_stamps(tmp_path).items() if stamp != stamps[n]}
  assert redone == {shards[1].filename}
  assert dataset_files(tmp_path) == dataset_files(reference)


@pytest.mark.slow
def test_a_killed_worker_is_retried_and_the_dataset_is_identical(phantom_root, reference,
                                                                  tmp_path, monkeypatch):
  monkeypatch.setenv("KILL_AT_STUDY", train_shards(phantom_root)[1].studies[1].study_id)
  monkeypatch.setenv("KILL_MARKER", str(tmp_path / "killed-once"))
  out = tmp_path / "out"
  report = run_convert(phantom_root, out, workers=2, convert_fn=die_once_at_target)
  assert os.path.exists(tmp_path / "killed-once") and report["num_skipped"] == 0
  assert dataset_files(out) == dataset_files(reference)
  run_convert(phantom_root, out, workers=2)           # a rerun finds everything done
  assert dataset_files(out) == dataset_files(reference)


@pytest.mark.slow
def test_a_study_that_always_kills_its_worker_is_skipped_until_a_rerun(phantom_root, reference,
                                                                       tmp_path, monkeypatch):
  target = train_shards(phantom_root)[0].studies[0].study_id
  monkeypatch.setenv("KILL_AT_STUDY", target)
  report = run_convert(phantom_root, tmp_path, workers=2, convert_fn=die_at_target)
  assert [(s["study_id"], s["reason"], s["retry"]) for s in report["skipped"]] == [
      (target, convert.WORKER_DIED, True)]
  assert report["num_converted"] == 13
  run_convert(phantom_root, tmp_path, workers=0)         # e.g. with fewer workers
  assert dataset_files(tmp_path) == dataset_files(reference)


def test_an_output_dir_of_other_settings_is_refused(phantom_root, reference, tmp_path):
  shutil.copytree(reference, tmp_path / "out")
  with pytest.raises(corpus_base.CorpusError, match="other inputs or settings"):
    run_convert(phantom_root, tmp_path / "out", shape=(32, 32, 16))


def test_cli_converts_and_prints_a_summary(phantom_root, tmp_path, capsys):
  import launch  # pylint: disable=g-import-not-at-top
  code = launch.main(["convert", "--data_root", str(phantom_root), "--output_dir",
                      str(tmp_path), "--shape", "24,24,12", "--split_by", "rows",
                      "--workers", "0", "--config.data.shard_size=4"])
  assert code == 0
  assert "converted 14 of 14 CSV rows" in capsys.readouterr().out
  with open(tmp_path / "metadata.json", encoding="utf-8") as file:
    metadata = json.load(file)
  assert metadata["split_by"] == "rows" and metadata["preprocess"]["shape"] == [24, 24, 12]


def test_cli_reports_an_unusable_corpus_without_a_traceback(tmp_path, capsys):
  import launch  # pylint: disable=g-import-not-at-top
  code = launch.main(["convert", "--data_root", str(tmp_path / "nope"), "--output_dir",
                      str(tmp_path / "out")])
  err = capsys.readouterr().err
  assert code == 2 and "is not a directory" in err and "Traceback" not in err


@pytest.mark.parametrize("mode,dtype", [("released", "uint8"), ("ct", "int16")])
def test_other_modes_and_dtypes_round_trip(phantom_root, tmp_path, mode, dtype):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  config = data_config(phantom_root, preprocess=mode, volume_dtype=dtype)
  run_convert(phantom_root, tmp_path, preprocess=mode, volume_dtype=dtype)
  params = schema.PreprocessParams.from_config(config)
  metadata = tfds.builder_from_directory(str(tmp_path)).info.metadata
  assert metadata["intensity"]["volume_dtype"] == dtype
  assert metadata["orientation"] == ("RAS" if mode == "ct" else "source voxel order")
  studies = [s for s in corpus.read_corpus(config).studies if s.split == "val"]
  for study, record in zip(studies, read_split(tmp_path, "val"), strict=True):
    source = preprocess.load_source(os.path.join(phantom_root, study.source_path))
    assert record[schema.VOLUME].dtype == np.dtype(dtype)
    np.testing.assert_array_equal(record[schema.VOLUME], preprocess.preprocess(source, params)[0])


def always_die(study):
  del study
  os.kill(os.getpid(), signal.SIGKILL)


@pytest.mark.slow
def test_workers_that_always_die_stop_the_conversion_with_advice(phantom_root, tmp_path):
  with pytest.raises(corpus_base.CorpusError, match="--workers 0"):
    run_convert(phantom_root, tmp_path, workers=1, convert_fn=always_die)


# --- Reliability: limits, memory, special files, time, full disks, CSV accounting -----------------

def add_rows(root, rows):
  """Appends `rows` (lines of CSV text) to the phantom CSV."""
  csv_path = root / "meta" / phantom_layouts.CSV_NAME
  csv_path.write_text(csv_path.read_text() + "".join(f"{row}\n" for row in rows))


def header_bomb(path, shape=(3000, 3000, 1000)):
  """A .nii.gz holding only a NIfTI header that declares `shape` int16 voxels."""
  header = nib.Nifti1Header()
  header.set_data_shape(shape)
  header.set_data_dtype(np.int16)
  header["vox_offset"], header["magic"] = 352, b"n+1"
  path.write_bytes(gzip.compress(header.binaryblock + b"\0" * 4))


def test_volumes_over_max_volume_mib_are_skipped_until_the_limit_is_raised(phantom_root,
                                                                           tmp_path):
  root = tmp_path / "corpus"
  shutil.copytree(phantom_root, root)
  header_bomb(root / "CT1" / "ct" / "bomb.nii.gz")
  body = np.full((64, 64, 32), -1000, np.int16)                    # 0.25 MiB of voxels
  body[8:56, 12:52, 4:28] = 40
  nib.save(nib.Nifti1Image(body, np.diag([0.8, 0.8, 2.0, 1.0])), str(root / "CT1/ct/big.nii.gz"))
  add_rows(root, ['CT1/ct/bomb.nii.gz,"r",', 'CT1/ct/big.nii.gz,"r",'])
  report = run_convert(root, tmp_path / "default")
  assert [(s["study_id"], s["reason"], s["retry"]) for s in report["skipped"]] == [
      ("bomb", "declares 3000x3000x1000 int16 voxels (17166 MiB), over data.max_volume_mib=2048; "
               "raise --config.data.max_volume_mib to convert it", False)]
  out = tmp_path / "limited"
  limited = run_convert(root, out, max_volume_mib=0.2)
  assert [(s["study_id"], s["retry"]) for s in limited["skipped"]] == [("bomb", False),
                                                                         ("big", False)]
  assert limited["skipped"][1]["reason"].startswith(
      "declares 64x64x32 int16 voxels (0.25 MiB), over data.max_volume_mib=0.2;")
  stamps = shard_stamps(out)
  run_convert(root, out, max_volume_mib=0.2)                     # the same limit: nothing redone
  assert shard_stamps(out) == stamps
  raised = run_convert(root, out, max_volume_mib=0.3)            # redoes the shards of those two
  assert [s["study_id"] for s in raised["skipped"]] == ["bomb"]
  last_train = train_shards(root)[-1].filename
  assert {n for n, t in shard_stamps(out).items() if t != stamps[n]} == {last_train}
  shards = {n: b for n, b in dataset_files(out).items() if ".tfrecord-" in n}
  assert shards == {n: b for n, b in dataset_files(tmp_path / "default").items() if ".tfrecord-" in n}


@pytest.mark.parametrize("where", ["header", "decoding"])
def test_out_of_memory_is_retried_by_a_rerun(phantom_root, reference, tmp_path, monkeypatch,
                                             where):
  target = train_shards(phantom_root)[1].studies[0]
  if where == "header":
    load = nib.load

    def fail(path, *args, **kwargs):
      if str(path).endswith(target.source_path):
        raise MemoryError("Unable to allocate 17.6 GiB")
      return load(path, *args, **kwargs)

    monkeypatch.setattr(nib, "load", fail)
  else:
    readinto = nib.openers.Opener.readinto

    def fail(self, buffer):     # zlib running out of memory half-way through the voxels
      if str(self.name).endswith(target.source_path):
        raise MemoryError()
      return readinto(self, buffer)

    monkeypatch.setattr(nib.openers.Opener, "readinto", fail)
  report = run_convert(phantom_root, tmp_path, workers=0)
  monkeypatch.undo()
  assert [(s["study_id"], s["reason"], s["retry"]) for s in report["skipped"]] == [
      (target.study_id, convert.OUT_OF_MEMORY, True)]
  run_convert(phantom_root, tmp_path, workers=0)
  assert dataset_files(tmp_path) == dataset_files(reference)


@pytest.mark.timeout(120)
def test_a_named_pipe_named_like_a_volume_is_skipped_without_hanging(phantom_root, tmp_path):
  root = tmp_path / "corpus"
  shutil.copytree(phantom_root, root)
  os.mkfifo(root / "CT1" / "ct" / "x_ct.nii.gz")
  add_rows(root, ['CT1/ct/x_ct.nii.gz,"r",'])
  report = run_convert(root, tmp_path / "out", workers=0)
  assert [(s["path"], s["reason"], s["retry"]) for s in report["skipped"]] == [
      ("CT1/ct/x_ct.nii.gz", "CT1/ct/x_ct.nii.gz is a named pipe (FIFO), not a regular file; refused", False)]
  assert report["num_converted"] == 14


def sleep_at_target(study):
  """Hangs (sleeps an hour, far past the test's own timeout) at the study named by
  $SLEEP_AT_STUDY, so the test can only finish if the converter stops waiting for it."""
  if study.study_id == os.environ.get("SLEEP_AT_STUDY"):
    time.sleep(3600)
  return convert.convert_study(study)


@pytest.mark.timeout(240)
@pytest.mark.parametrize("workers", [0, 2])
def test_a_study_past_its_time_limit_is_retried_while_the_others_convert(
    phantom_root, reference, tmp_path, monkeypatch, workers):
  target = train_shards(phantom_root)[1].studies[1].study_id
  monkeypatch.setenv("SLEEP_AT_STUDY", target)
  report = run_convert(phantom_root, tmp_path, workers=workers, convert_fn=sleep_at_target,
                       study_timeout_s=3.0)
  assert [(s["study_id"], s["retry"]) for s in report["skipped"]] == [(target, True)]
  assert report["skipped"][0]["reason"].startswith(
      "still running after data.study_timeout_s=3 s")
  assert report["num_converted"] == 13
  run_convert(phantom_root, tmp_path, workers=0)             # the rerun converts it
  assert dataset_files(tmp_path) == dataset_files(reference)


def test_a_full_disk_stops_with_one_message_and_a_rerun_resumes(phantom_root, reference,
                                                                 tmp_path, monkeypatch):
  shards = train_shards(phantom_root)
  full = shards[2].filename
  real_writer = convert.tensorflow().io.TFRecordWriter

  class FullDisk:
    def __init__(self, path):
      self.path, self.writer = path, real_writer(path)

    def write(self, record):
      if full in self.path:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
      self.writer.write(record)

    def close(self):
      self.writer.close()

  monkeypatch.setattr(convert.tensorflow().io, "TFRecordWriter", FullDisk)
  with pytest.raises(convert.OutputError) as err:
    run_convert(phantom_root, tmp_path, workers=2)
  monkeypatch.undo()
  assert isinstance(err.value, errors.UserError)
  assert str(err.value).startswith(f"cannot write {tmp_path / full}: No space left on device "
                                   f"(ENOSPC); the shards finished before are kept")
  stamps = shard_stamps(tmp_path)
  assert sorted(stamps) == [shards[0].filename, shards[1].filename]
  assert os.listdir(tmp_path / convert.STATE_DIR / "tmp") == []
  assert not os.path.exists(tmp_path / convert.REPORT_NAME)
  run_convert(phantom_root, tmp_path, workers=0)
  assert {n: shard_stamps(tmp_path)[n] for n in stamps} == stamps
  assert dataset_files(tmp_path) == dataset_files(reference)


FSIZE_SCRIPT = """
import resource, sys
resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))  # python ignores SIGXFSZ: EFBIG
sys.path.insert(0, {root!r})
import launch
sys.exit(launch.main(sys.argv[1:]))
"""


def test_cli_on_a_file_size_limit_exits_2_with_one_line_and_valid_shards(phantom_root, reference,
                                                                         tmp_path):
  sizes = {n: len(b) for n, b in dataset_files(reference).items() if ".tfrecord-" in n}
  limit = max(sizes.values()) - 1                  # the first shard of that size fails
  args = ["convert", "--data_root", str(phantom_root), "--output_dir", str(tmp_path),
          "--shape", ",".join(map(str, SHAPE)), "--workers", "0",
          "--config.data.shard_size=2", "--config.data.min_shards=2"]
  result = subprocess.run([sys.executable, "-c", FSIZE_SCRIPT.format(limit=limit, root=ROOT),
                           *args], capture_output=True, text=True, timeout=300, check=False)
  assert result.returncode == 2, result.stderr[-3000:]
  assert "Traceback" not in result.stderr
  (message,) = [line for line in result.stderr.splitlines() if "error:" in line]
  assert message.startswith(f"launch.py convert: error: cannot write {tmp_path}{os.sep}")
  assert ": File too large; the shards finished before are kept" in message
  assert os.listdir(tmp_path / convert.STATE_DIR / "tmp") == []
  assert shard_stamps(tmp_path)                                   # some finished before
  for name in shard_stamps(tmp_path):                             # what is there is complete
    marker = json.loads((tmp_path / convert.STATE_DIR / f"{name}.json").read_text())
    assert marker["num_bytes"] == sizes[name] == os.path.getsize(tmp_path / name)
  run_convert(phantom_root, tmp_path, workers=0)
  assert dataset_files(tmp_path) == dataset_files(reference)


def test_the_summary_counts_every_csv_row(phantom_root, tmp_path):
  root = tmp_path / "corpus"
  shutil.copytree(phantom_root, root)
  add_rows(root, ['CT1/ct/gone.nii.gz,"a "stray" quote",', 'CT1/ct/gone.nii.gz,"r",x,extra'])
  report = run_convert(root, tmp_path / "out")
  assert report["csv_rows"] == 16 == report["num_converted"] + report["num_skipped"]
  assert [s["reason"].split(":")[0] for s in report["skipped"]] == ["line 16", "line 17"]
  assert "converted 14 of 16 CSV rows" in convert.format_summary(report)


@pytest.mark.parametrize("field,value", [("max_volume_mib", 0.0), ("study_timeout_s", -1.0),
                                         ("max_field_chars", 0)])
def test_limits_must_be_positive(phantom_root, tmp_path, field, value):
  with pytest.raises(corpus_base.CorpusError, match=f"data.{field}="):
    run_convert(phantom_root, tmp_path, **{field: value})

"""Corpora beyond BIMCV-R: the same phantom studies in the BIMCV-R, DICOM and CT-RATE layouts
convert to the same volumes; CT-RATE's labels, reports, splits, metadata and skips."""

import json
import os

import numpy as np
import pandas as pd
import pytest

from configs import default
from data_prep import convert
from data_prep import corpus
from data_prep import corpus_base
from data_prep import corpus_ctrate
from data_prep import phantom_layouts
from data_prep import preprocess
from data_prep import schema
from data_prep import sources

N, FOLDERS = 8, 4
SMALL = dict(size=48, slices=16)
SHAPE = (24, 24, 12)


def data_config(root, **overrides):
  config = default.get_config().data
  config.data_root = str(root)
  config.shape = SHAPE
  config.min_shards = 1
  for key, value in overrides.items():
    config[key] = value
  return config


def run_convert(root, out, **overrides):
  return convert.convert_corpus(data_config(root, **overrides), str(out), workers=0,
                                progress=False, log=lambda *_: None)


def records(out):
  """{study_id: record} of every split of a converted dataset."""
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  builder = tfds.builder_from_directory(str(out))
  found = {}
  for split in builder.info.splits:
    for example in tfds.as_numpy(builder.as_dataset(split=split)):
      example["split"] = split
      found[example["study_id"].decode()] = example
  return found


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
  """{layout: (raw root, converted dir)} of one phantom corpus written in every layout."""
  base = tmp_path_factory.mktemp("layouts")
  out = {}
  for layout in phantom_layouts.LAYOUTS:
    root, converted = base / layout, base / f"{layout}_tfrecords"
    phantom_layouts.write_phantom_corpus(str(root), N, seed=0, folders=FOLDERS, layout=layout,
                                         **SMALL)
    run_convert(root, converted, volume_dtype="int16")
    out[layout] = (root, converted)
  return out


def ctrate_ids():
  """Study id in the CT-RATE layout of phantom study i."""
  return [corpus_base.study_id_of(name)
          for _, name in phantom_layouts.ctrate_volume_names(N, FOLDERS)]


def test_auto_layout_detection_names_each_layout(layouts):
  for layout, (root, _) in layouts.items():
    assert corpus.detect_layout(str(root))[0] == layout


def test_same_study_gives_the_same_volume_in_every_layout(layouts):
  by_layout = {layout: records(out) for layout, (_, out) in layouts.items()}
  names = ctrate_ids()
  for index in range(N):
    bimcv = by_layout["bimcv"][f"sub-{index:05d}_ct"]
    others = {"dicom": by_layout["dicom"][f"sub-{index:05d}_ct"],
              "ctrate": by_layout["ctrate"][names[index]]}
    for layout, record in others.items():
      # int16 HU: one quantization step is 1 HU (the BIMCV-R files store 0.5 HU steps for some).
      difference = np.abs(record["volume"].astype(int) - bimcv["volume"].astype(int))
      assert difference.max() <= 1, (layout, index)
      np.testing.assert_allclose(record["volume_spacing"], bimcv["volume_spacing"], rtol=1e-5)
      np.testing.assert_allclose(record["spacing"], bimcv["spacing"], rtol=1e-5)
      assert record["orientation"] == bimcv["orientation"]
      assert record["split"] == bimcv["split"] or layout == "ctrate"
    assert by_layout["dicom"][f"sub-{index:05d}_ct"]["split"] == bimcv["split"]
    assert (others["ctrate"]["split"] == "test") == (bimcv["split"] == "test")


def test_dicom_records_name_their_series_and_keep_no_patient_fields(layouts):
  import pydicom  # pylint: disable=import-outside-toplevel
  root, out = layouts["dicom"]
  for study_id, record in records(out).items():
    source = record["source_path"].decode()
    assert source.endswith(f"/dicom/{study_id}")
    first = sorted((root / source).iterdir())[0]
    assert record["series_uid"].decode() == pydicom.dcmread(first).SeriesInstanceUID
  data = b"".join(open(os.path.join(out, name), "rb").read() for name in os.listdir(out)
                  if os.path.isfile(os.path.join(out, name)))
  for value in phantom_layouts.PLACEHOLDERS.values():
    assert value.encode() not in data


def test_ctrate_labels_equal_the_csv_rows_with_names_in_order(layouts):
  root, out = layouts["ctrate"]
  labels = pd.concat([pd.read_csv(root / "dataset" / "multi_abnormality_labels" / name)
                      for name in ("train_predicted_labels.csv", "valid_predicted_labels.csv")])
  metadata = json.loads((out / "metadata.json").read_text())
  assert metadata["label_names"] == list(phantom_layouts.CTRATE_LABELS)
  assert metadata["layout"] == "ctrate"
  found = records(out)
  assert len(found) == len(labels) == N
  for _, row in labels.iterrows():
    record = found[corpus_base.study_id_of(row["VolumeName"])]
    assert record["labels"].dtype == np.int8
    assert record["labels"].tolist() == [int(row[name]) for name in metadata["label_names"]]


def test_split_labels_and_texts_come_in_dataset_order(layouts):
  from medfinder_jax import input_pipeline  # pylint: disable=import-outside-toplevel
  _, out = layouts["ctrate"]
  builder, spec = input_pipeline.open_dataset(str(out))
  assert spec.label_names == phantom_layouts.CTRATE_LABELS
  found = records(out)
  for split in builder.info.splits:
    texts = input_pipeline.split_texts(builder, split)
    labels = input_pipeline.split_labels(builder, split)
    assert labels.shape == (len(texts["study_id"]), len(spec.label_names))
    for study_id, scan_id, row in zip(texts["study_id"], texts["scan_id"], labels):
      assert row.tolist() == found[study_id]["labels"].tolist()
      assert study_id.startswith(scan_id + "_")       # train_3_a_2 is a reconstruction of train_3_a
  bimcv_builder, bimcv_spec = input_pipeline.open_dataset(str(layouts["bimcv"][1]))
  assert bimcv_spec.label_names == ()
  assert input_pipeline.split_labels(bimcv_builder, "test").shape == (
      bimcv_spec.split_sizes["test"], 0)


def test_ctrate_report_is_findings_and_impressions_without_not_given(layouts):
  root, out = layouts["ctrate"]
  reports = pd.read_csv(root / "dataset" / "radiology_text_reports" / "train_reports.csv")
  found = records(out)
  for _, row in reports.iterrows():
    text = found[corpus_base.study_id_of(row["VolumeName"])]["report"].decode()
    assert text == f"{row['Findings_EN']} {row['Impressions_EN']}"
    assert "Not given." not in text and row["ClinicalInformation_EN"] == "Not given."
  assert corpus_ctrate.report_text({"A": "Not given.", "B": " x. "}, ("A", "B")) == "x."


def test_ctrate_splits_are_by_patient_valid_is_test_and_reconstructions_stay_together(layouts):
  _, out = layouts["ctrate"]
  found = records(out)
  patients = {}
  for record in found.values():
    patients.setdefault(record["patient_id"].decode(), set()).add(record["split"])
    scan, patient = record["scan_id"].decode(), record["patient_id"].decode()
    assert scan.startswith(patient + "_")
    assert (record["split"] == "test") == patient.startswith("valid_")
  assert all(len(splits) == 1 for splits in patients.values())
  assert {s for splits in patients.values() for s in splits} == {"train", "val", "test"}
  assert any(sum(r["scan_id"] == s for r in found.values()) == 2
             for s in {r["scan_id"] for r in found.values()})


def test_patient_val_split_is_deterministic_and_sized_by_fraction():
  patients = [f"train_{i}" for i in range(200)]
  val = corpus_ctrate.patient_val_split(patients, 0.1)
  assert len(val) == 20 and val == corpus_ctrate.patient_val_split(patients[::-1], 0.1)
  assert corpus_ctrate.patient_val_split(patients[:1], 0.5) == set()
  assert corpus_ctrate.patient_val_split(patients, 0.0) == set()
  # Adding patients moves none of the others between train and val... except by rank order.
  assert len(corpus_ctrate.patient_val_split(patients[:10], 0.1)) == 1


def test_ctrate_metadata_spacing_and_intercept_are_applied_exactly_once(layouts):
  root, out = layouts["ctrate"]
  meta = pd.concat([pd.read_csv(root / "dataset" / "metadata" / name)
                    for name in ("train_metadata.csv", "validation_metadata.csv")])
  found = records(out)
  seen = set()
  for _, row in meta.iterrows():
    record = found[corpus_base.study_id_of(row["VolumeName"])]
    xy = json.loads(row["XYSpacing"])
    np.testing.assert_allclose(record["spacing"], [*xy, row["ZSpacing"]], rtol=1e-6)
    patient = int(record["patient_id"].decode().split("_")[1])
    applied = tuple(record["hu_scaling"].tolist())
    # The phantom stores raw values (HU + 1024) for even patients and HU for odd ones.
    assert applied == ((1.0, 0.0) if patient % 2 else (1.0, -1024.0))
    assert record["hu_source"].decode().startswith("metadata") == (patient % 2 == 0)
    seen.add(applied)
  assert seen == {(1.0, 0.0), (1.0, -1024.0)}


def test_choose_scaling_tells_raw_from_hu_on_a_chest(tmp_path):
  phantom_layouts.write_phantom_corpus(str(tmp_path), 1, seed=3, folders=1, layout="bimcv",
                                       **SMALL)
  (path,) = tmp_path.glob("CT1/ct/*.nii.gz")
  source = preprocess.load_source(str(path))
  hu = np.rint(source.raw * source.slope + source.inter).astype(np.int16)
  as_hu = sources.SourceVolume(hu, 1.0, 0.0, source.affine)
  as_raw = sources.SourceVolume((hu + 1024).astype(np.int16), 1.0, 0.0, source.affine)
  assert sources.choose_scaling(as_hu, 1.0, -1024.0)[:2] == (1.0, 0.0)
  assert sources.choose_scaling(as_raw, 1.0, -1024.0)[:2] == (1.0, -1024.0)
  # A header that scales already (slope 0.5) is believed over the metadata applied on top.
  half = sources.SourceVolume(((hu + 1024) * 2).astype(np.int16), 0.5, -1024.0, source.affine)
  assert sources.choose_scaling(half, 1.0, -1024.0)[:2] == (0.5, -1024.0)


def _ctrate_copy(layouts, tmp_path):
  import shutil  # pylint: disable=import-outside-toplevel
  root = tmp_path / "ctrate"
  shutil.copytree(layouts["ctrate"][0], root)
  return root


def _drop_row(csv_path, volume_name):
  table = pd.read_csv(csv_path)
  table[table["VolumeName"] != volume_name].to_csv(csv_path, index=False)


def test_ctrate_skips_are_each_named_and_nothing_else_is_lost(layouts, tmp_path):
  root = _ctrate_copy(layouts, tmp_path)
  dataset = root / "dataset"
  names = [name for _, name in phantom_layouts.ctrate_volume_names(N, FOLDERS)]
  train = [n for n in names if n.startswith("train_")]
  no_file, no_meta, no_label, no_report = train[0], train[1], train[2], train[3]
  (path,) = dataset.glob(f"train/*/*/{no_file}")
  path.unlink()
  _drop_row(dataset / "metadata" / "train_metadata.csv", no_meta)
  _drop_row(dataset / "multi_abnormality_labels" / "train_predicted_labels.csv", no_label)
  _drop_row(dataset / "radiology_text_reports" / "train_reports.csv", no_report)
  report = run_convert(root, tmp_path / "out")
  reasons = {s["study_id"]: s["reason"] for s in report["skipped"]}
  assert reasons.keys() == {corpus_base.study_id_of(n) for n in (no_file, no_meta, no_label,
                                                                 no_report)}
  assert "no volume file" in reasons[corpus_base.study_id_of(no_file)]
  assert "no metadata row" in reasons[corpus_base.study_id_of(no_meta)]
  assert "no label row" in reasons[corpus_base.study_id_of(no_label)]
  assert "no report row" in reasons[corpus_base.study_id_of(no_report)]
  assert report["num_converted"] == N - 4
  assert report["num_converted"] + report["num_skipped"] == report["csv_rows"]


def test_renamed_ctrate_csvs_are_found_by_pattern(layouts, tmp_path):
  root = _ctrate_copy(layouts, tmp_path)
  reports = root / "dataset" / "radiology_text_reports"
  os.rename(reports / "train_reports.csv", reports / "CT-RATE_train_reports (1).csv")
  os.rename(root / "dataset" / "metadata" / "validation_metadata.csv",
            root / "dataset" / "metadata" / "my_validation_metadata_copy.csv")
  result = corpus.read_corpus(data_config(root, layout="ctrate"))
  assert len(result.studies) == N and not result.skipped
  assert result.sources["reports_train"].endswith("CT-RATE_train_reports (1).csv")


def test_ctrate_without_reports_is_refused_naming_the_expected_file(tmp_path):
  (tmp_path / "dataset" / "train").mkdir(parents=True)
  with pytest.raises(corpus_base.CorpusError, match="radiology_text_reports/train_reports.csv"):
    corpus.read_corpus(data_config(tmp_path, layout="ctrate"))


def test_phantom_ctrate_headers_lack_the_true_spacing(layouts):
  import nibabel as nib  # pylint: disable=import-outside-toplevel
  root, _ = layouts["ctrate"]
  for path in (root / "dataset").glob("*/*/*/*.nii.gz"):
    image = nib.load(str(path))
    np.testing.assert_allclose(nib.affines.voxel_sizes(image.affine), 1.0)
    assert image.dataobj.slope in (1.0,) and image.dataobj.inter in (0.0,)


def test_schema_version_is_bumped_and_records_carry_the_new_features(layouts):
  _, out = layouts["bimcv"]
  metadata = json.loads((out / "metadata.json").read_text())
  assert metadata["schema_version"] == schema.SCHEMA_VERSION == 3
  record = next(iter(records(out).values()))
  assert record["scan_id"] == record["study_id"] and record["patient_id"] == b""
  assert record["series_uid"] == b"" and "labels" not in record


def test_cli_writes_each_layout_and_convert_says_which_it_detected(tmp_path, capsys):
  import launch  # pylint: disable=import-outside-toplevel
  root = tmp_path / "ct"
  assert launch.main(["phantom", "--out", str(root), "--n", "4", "--folders", "3", "--size",
                      "32", "--slices", "12", "--layout", "ctrate"]) == 0
  assert launch.main(["convert", "--data_root", str(root), "--output_dir", str(tmp_path / "o"),
                      "--shape", "16,16,8", "--workers", "0"]) == 0
  assert "layout: ctrate (detected: found dataset/" in capsys.readouterr().out
  assert launch.main(["convert", "--data_root", str(root), "--output_dir", str(tmp_path / "p"),
                      "--layout", "bimcv", "--workers", "0"]) == 2
  assert "no CSV in" in capsys.readouterr().err

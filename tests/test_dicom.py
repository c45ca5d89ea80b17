"""DICOM series: slice order by position, orientation, HU, several series, and the skips;
checked against SimpleITK's GDCM series reader (an independent implementation)."""

import os
import shutil

import nibabel as nib
import numpy as np
import pydicom
import pytest

from configs import default
from data_prep import convert
from data_prep import dicom
from data_prep import phantom_layouts
from data_prep import schema
from data_prep import sources

SHAPE = (12, 10, 7)          # columns (X), rows (Y), slices (Z)
SPACING = (0.8, 0.7, 2.5)


def volume(seed=0):
  """A random int16 volume with a body-like block above -500 HU (slope 1, intercept -1024)."""
  rng = np.random.default_rng(seed)
  raw = rng.integers(0, 60, SHAPE).astype(np.int16)          # air, stored raw (HU + 1024)
  raw[2:10, 2:8, 1:6] = rng.integers(1000, 1300, (8, 6, 5))  # soft tissue
  return raw


def affine(orientation="LPS", spacing=SPACING, flip_z=False):
  """Voxel -> RAS mm of a file stored with `orientation` axis codes."""
  signs = {"R": 1, "L": -1, "A": 1, "P": -1, "S": 1, "I": -1}
  out = np.diag([signs[c] * s for c, s in zip(orientation, spacing)] + [1.0])
  if flip_z:
    out[2, 2] *= -1
  out[:3, 3] = (-40.0, 25.0, 100.0)
  return out


def write(folder, raw=None, aff=None, **kw):
  raw = volume() if raw is None else raw
  aff = affine() if aff is None else aff
  phantom_layouts.write_dicom_series(str(folder), raw, aff, 1.0, -1024.0, **kw)
  return raw, aff


def sitk_source(folder):
  """The series as SimpleITK/GDCM reads it: (HU (X, Y, Z) float, RAS affine)."""
  import SimpleITK as sitk  # pylint: disable=import-outside-toplevel
  reader = sitk.ImageSeriesReader()
  reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
  image = reader.Execute()
  hu = sitk.GetArrayFromImage(image).transpose(2, 1, 0).astype(np.float64)
  direction = np.asarray(image.GetDirection()).reshape(3, 3)
  lps = np.eye(4)
  lps[:3, :3] = direction * np.asarray(image.GetSpacing())
  lps[:3, 3] = image.GetOrigin()
  return hu, np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps


def canonical_hu(source):
  """HU in canonical RAS voxel order, and the voxel sizes along R, A, S."""
  hu = source.raw.astype(np.float64) * source.slope + source.inter
  ornt = nib.orientations.io_orientation(source.affine)
  sizes = np.empty(3)
  sizes[ornt[:, 0].astype(int)] = source.spacing
  return nib.orientations.apply_orientation(hu, ornt), sizes


def assert_same_scan(source, hu_expected, affine_expected):
  expected = sources.SourceVolume(hu_expected, 1.0, 0.0, affine_expected)
  ours, sizes = canonical_hu(source)
  theirs, their_sizes = canonical_hu(expected)
  np.testing.assert_array_equal(ours, theirs)
  np.testing.assert_allclose(sizes, their_sizes, rtol=1e-6)
  np.testing.assert_allclose(source.affine @ [0, 0, 0, 1],
                             affine_expected @ [0, 0, 0, 1], atol=1e-4)


@pytest.mark.parametrize("orientation", ["LPS", "RAS"])
def test_series_matches_simpleitk_and_the_nifti_of_the_same_scan(tmp_path, orientation):
  raw, aff = write(tmp_path / "s", aff=affine(orientation),
                   file_order=np.random.default_rng(1))
  source = dicom.load_series(str(tmp_path / "s"))
  assert source.orientation == orientation
  np.testing.assert_allclose(source.spacing, SPACING, rtol=1e-6)
  hu_sitk, aff_sitk = sitk_source(tmp_path / "s")
  assert_same_scan(source, hu_sitk, aff_sitk)
  assert_same_scan(source, raw.astype(np.float64) - 1024, aff)   # what a NIfTI file holds


def test_shuffled_files_and_reversed_instance_numbers_do_not_change_the_volume(tmp_path):
  write(tmp_path / "plain")
  write(tmp_path / "shuffled", file_order=np.random.default_rng(5),
        instance_numbers=np.arange(SHAPE[2], 0, -1))
  plain = dicom.load_series(str(tmp_path / "plain"))
  shuffled = dicom.load_series(str(tmp_path / "shuffled"))
  np.testing.assert_array_equal(plain.raw, shuffled.raw)
  np.testing.assert_allclose(plain.affine, shuffled.affine)


def test_slices_stored_top_down_give_the_same_canonical_volume(tmp_path):
  raw = volume()
  down = affine(flip_z=True)
  down[2, 3] = affine()[2, 3] + (SHAPE[2] - 1) * SPACING[2]
  write(tmp_path / "up", raw)
  write(tmp_path / "down", raw[:, :, ::-1].copy(), down)
  up, reversed_ = (dicom.load_series(str(tmp_path / name)) for name in ("up", "down"))
  np.testing.assert_array_equal(canonical_hu(up)[0], canonical_hu(reversed_)[0])
  hu_sitk, aff_sitk = sitk_source(tmp_path / "down")
  assert_same_scan(reversed_, hu_sitk, aff_sitk)


def test_missing_slice_is_uneven_spacing(tmp_path):
  write(tmp_path / "s")
  os.remove(sorted((tmp_path / "s").iterdir())[3])
  with pytest.raises(dicom.SeriesProblem, match="uneven slice spacing"):
    dicom.load_series(str(tmp_path / "s"))


def test_mr_series_is_not_ct(tmp_path):
  write(tmp_path / "s", modality="MR")
  with pytest.raises(dicom.SeriesProblem, match="no CT series.*MR"):
    dicom.load_series(str(tmp_path / "s"))


def test_two_series_in_one_folder_use_the_one_with_most_slices(tmp_path):
  big = volume(1)
  write(tmp_path / "s", big, series_uid="1.2.3.4")
  write(tmp_path / "other", volume(2)[:, :, :4].copy(), series_uid="1.2.3.5")
  for path in (tmp_path / "other").iterdir():
    shutil.move(str(path), str(tmp_path / "s" / f"other_{path.name}"))
  source = dicom.load_series(str(tmp_path / "s"))
  assert source.series_uid == "1.2.3.4"
  np.testing.assert_array_equal(source.raw, big)


def test_equal_slice_counts_choose_the_thinnest_slices(tmp_path):
  write(tmp_path / "s", series_uid="1.2.9", aff=affine(spacing=(0.8, 0.7, 5.0)))
  write(tmp_path / "t", series_uid="1.2.10", aff=affine(spacing=(0.8, 0.7, 1.0)))
  for path in (tmp_path / "t").iterdir():
    shutil.move(str(path), str(tmp_path / "s" / f"thin_{path.name}"))
  assert dicom.load_series(str(tmp_path / "s")).series_uid == "1.2.10"


def test_non_parallel_slices_are_refused(tmp_path):
  write(tmp_path / "s")
  path = sorted((tmp_path / "s").iterdir())[2]
  ds = pydicom.dcmread(path)
  ds.ImageOrientationPatient = [1, 0, 0, 0, 0.8, 0.6]
  ds.save_as(path)
  with pytest.raises(dicom.SeriesProblem, match="non-parallel slices"):
    dicom.load_series(str(tmp_path / "s"))


def test_pixel_encoding_without_a_decoder_is_named(tmp_path):
  write(tmp_path / "s")
  for path in (tmp_path / "s").iterdir():
    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = pydicom.uid.JPEGLSLossless
    ds.PixelData = pydicom.encaps.encapsulate([b"\xff\x4f\xff\x51" + bytes(60)])
    ds.save_as(path, enforce_file_format=True)
  with pytest.raises(dicom.SeriesProblem, match="JPEG-LS.*no available decoder"):
    dicom.load_series(str(tmp_path / "s"))


def test_size_is_checked_from_the_headers_before_decoding(tmp_path, monkeypatch):
  write(tmp_path / "s")
  monkeypatch.setattr(dicom, "read_pixels", lambda *_: pytest.fail("decoded pixels"))
  with pytest.raises(sources.VolumeTooLarge, match="data.max_volume_mib"):
    dicom.load_series(str(tmp_path / "s"), max_volume_mib=0.0001)


def test_conversion_skips_bad_series_with_reasons_and_keeps_no_patient_names(tmp_path):
  """A DICOM corpus: folders named in the CSV; study id = folder name; a patient's name and
  id in the headers appear nowhere in the output."""
  root = tmp_path / "root"
  phantom_layouts.write_phantom_corpus(str(root), 6, seed=0, folders=3, size=32, slices=12,
                                       layout="dicom")
  secret = {"PatientName": "DOE^JANE", "PatientID": "MRN-8812345", "PatientBirthDate": "19700101"}
  for folder in root.glob("CT*/dicom/*"):
    for path in folder.iterdir():
      ds = pydicom.dcmread(path)
      for key, value in secret.items():
        setattr(ds, key, value)
      ds.save_as(path)
  folders = sorted(root.glob("CT*/dicom/*"))
  os.remove(sorted(folders[0].iterdir())[5])                       # a missing slice
  for path in folders[1].iterdir():                                 # an MR series
    ds = pydicom.dcmread(path)
    ds.Modality = "MR"
    ds.save_as(path)
  config = default.get_config().data
  config.data_root, config.shape, config.min_shards = str(root), (16, 16, 8), 1
  lines = []
  report = convert.convert_corpus(config, str(tmp_path / "out"), workers=0, progress=False,
                                  log=lines.append)
  reasons = {s["study_id"]: s["reason"] for s in report["skipped"]}
  assert reasons.keys() == {folders[0].name, folders[1].name}
  assert "uneven slice spacing" in reasons[folders[0].name]
  assert "no CT series" in reasons[folders[1].name]
  assert report["num_converted"] == 4
  assert any("layout: dicom" in line for line in lines)
  written = b"".join(p.read_bytes() for p in (tmp_path / "out").rglob("*") if p.is_file())
  written += "\n".join(lines).encode()
  for value in secret.values():
    assert value.encode() not in written
  assert schema.SERIES_UID in open(tmp_path / "out" / "features.json").read()

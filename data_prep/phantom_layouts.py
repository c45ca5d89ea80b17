"""The phantom corpus (data_prep/phantom.py's studies) written in each layout: `bimcv`, `dicom`,
`ctrate` (LAYOUTS; `write_phantom_corpus` picks the layout's writer).

Study i is the same chest (voxels in HU, findings, report) in every layout, so a test can
convert each layout and compare volumes. Studies fill CT1..CT<folders> in contiguous blocks.

`bimcv`: `CT1..CTk/ct/<study>.nii.gz` and `meta/curated_ct_report_path_En.csv` (CSV_NAME) with
columns `path`, `Report_en` and `findings` (CSV_COLUMNS). CSV rows are shuffled: row order is
not folder order, as in a real export, so the `rows` and `folders` splits differ.

`dicom`: `CT<k>/dicom/<study>/<n>.dcm`, one CT slice per file (pydicom; ImagePositionPatient,
ImageOrientationPatient, PixelSpacing, RescaleSlope/Intercept), file names in a shuffled order
(not slice order); `meta/curated_ct_report_path_En.csv` with `path` naming each folder. Patient
fields hold the placeholders PLACEHOLDERS, which identify no one. Rows are shuffled as in `bimcv`.

`ctrate`: `dataset/{train,valid}/<split>_<p>/<split>_<p>_a/<split>_<p>_a_<r>.nii.gz` with the
report, metadata and label CSVs of CT-RATE. Studies of the BIMCV-R folders that the `folders`
split makes test go to `valid`, the others to `train`. Two consecutive studies of one CT folder
are two reconstructions (1, 2) of one scan of one patient. The headers lack the true spacing
(1 mm voxels) and scaling (none); the metadata CSV has both (RescaleIntercept -1024). Even
patients store raw values (HU + 1024, the first release), odd ones HU (a later release: the
metadata intercept must not be applied again). Labels map the findings onto CT-RATE's names
(FINDING_LABELS).
"""

import os

import numpy as np
import pandas as pd
import pydicom
import tqdm
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, MRImageStorage, generate_uid

from data_prep import corpus_bimcv
from data_prep import phantom
from medfinder_jax import errors

LAYOUTS = ("bimcv", "ctrate", "dicom")
CSV_NAME = "curated_ct_report_path_En.csv"
CSV_COLUMNS = ("path", "Report_en", "findings")

# CT-RATE's 18 abnormality labels, in the order of its label CSVs.
CTRATE_LABELS = (
    "Medical material", "Arterial wall calcification", "Cardiomegaly", "Pericardial effusion",
    "Coronary artery wall calcification", "Hiatal hernia", "Lymphadenopathy", "Emphysema",
    "Atelectasis", "Lung nodule", "Lung opacity", "Pulmonary fibrotic sequela", "Pleural effusion",
    "Mosaic attenuation pattern", "Peribronchial thickening", "Consolidation", "Bronchiectasis",
    "Interlobular septal thickening")
# Phantom finding -> CT-RATE label (a mass is CT-RATE's nearest: "Lung nodule").
FINDING_LABELS = {"nodule": "Lung nodule", "mass": "Lung nodule",
                  "consolidation": "Consolidation", "pleural effusion": "Pleural effusion",
                  "atelectasis": "Atelectasis", "adenopathy": "Lymphadenopathy",
                  "emphysema": "Emphysema", "cardiomegaly": "Cardiomegaly"}
CTRATE_INTERCEPT = -1024.0
PLACEHOLDERS = {"PatientName": "PHANTOM^SYNTHETIC", "PatientID": "SYNTHETIC"}


def write_phantom_corpus(out_dir, n, seed=0, folders=10, size=512, slices=100, progress=False,
                         layout="bimcv"):
  """Writes n studies in `layout` (LAYOUTS) under `out_dir`; returns the (report) CSV path.

  Deterministic per (seed, n, folders, size, slices): files are byte-identical across runs,
  and every layout holds the same studies (the same voxels in HU, the same findings).
  """
  if n < 1 or folders < 1:
    raise errors.UserError(f"need n >= 1 studies and folders >= 1, got n={n}, folders={folders}")
  if layout not in LAYOUTS:
    raise errors.UserError(f"phantom layout {layout!r}; expected one of {LAYOUTS}")
  indices = range(n)
  if progress:
    desc = "phantom" if layout == "bimcv" else f"phantom ({layout})"
    indices = tqdm.tqdm(indices, desc=desc, unit="study")
  writer = {"bimcv": BimcvWriter, "dicom": DicomWriter,
            "ctrate": CtRateWriter}[layout](out_dir, n, seed, folders)
  for index in indices:
    study, rng = phantom.make_study(seed, index, folders, n, size, slices)
    hu, _ = phantom.render_study(study.geometry, study.findings, rng)
    writer.add(index, study, hu)
  return writer.finish()


def ctrate_volume_names(n, folders):
  """[(folder split, volume name)] of studies 0..n-1 in the `ctrate` layout."""
  writer = CtRateWriter("", n, 0, folders)
  return [writer._volume_name(phantom.folder_of(i, folders, n))[:2]  # pylint: disable=protected-access
          for i in range(n)]


def labels_of(findings):
  """{CT-RATE label: 0/1} of a study's findings."""
  present = {FINDING_LABELS[f.name] for f in findings}
  return {name: int(name in present) for name in CTRATE_LABELS}


# --- BIMCV-R and DICOM: volumes in CT folders, a CSV of paths -----------------------------------

class _CsvWriter:
  """A layout of CT folders with `meta/CSV_NAME`: the row of each study, shuffled at the end."""

  def __init__(self, out_dir, n, seed, folders):
    self.out_dir, self.n, self.seed, self.folders = out_dir, n, seed, folders
    self.rows = []

  def add_row(self, path, study):
    self.rows.append({"path": path, "Report_en": study.report,
                      "findings": ";".join(f.label() for f in study.findings)})

  def finish(self):
    order = np.random.default_rng([self.seed, self.n, 7]).permutation(self.n)
    os.makedirs(os.path.join(self.out_dir, "meta"), exist_ok=True)
    csv_path = os.path.join(self.out_dir, "meta", CSV_NAME)
    pd.DataFrame([self.rows[i] for i in order],
                 columns=list(CSV_COLUMNS)).to_csv(csv_path, index=False)
    return csv_path


class BimcvWriter(_CsvWriter):
  """The `bimcv` layout (module docstring)."""

  def add(self, index, study, hu):
    del index
    folder_dir = os.path.join(self.out_dir, study.folder, "ct")
    os.makedirs(folder_dir, exist_ok=True)
    phantom.write_nifti(os.path.join(folder_dir, study.study_id + ".nii.gz"), hu, study.geometry)
    self.add_row(f"{study.folder}/ct/{study.study_id}.nii.gz", study)


class DicomWriter(_CsvWriter):
  """The `dicom` layout (module docstring)."""

  def add(self, index, study, hu):
    relative = f"{study.folder}/dicom/{study.study_id}"
    raw, affine = phantom.stored_volume(hu, study.geometry)
    write_dicom_series(os.path.join(self.out_dir, relative), raw, affine, study.geometry.slope,
                       study.geometry.inter, uid_seed=(self.seed, study.study_id),
                       file_order=np.random.default_rng([self.seed, index, 11]))
    self.add_row(relative, study)


def write_dicom_series(folder, raw, affine, slope, inter, uid_seed=(0,), file_order=None,
                       modality="CT", series_uid=None, instance_numbers=None, extra=None):
  """One DICOM file per slice k of int16 `raw` (X, Y, Z) whose voxel -> RAS mm map is
  `affine`: pixel [row j, column i] = raw[i, j, k]. `file_order` (a Generator) shuffles which
  file name holds which slice; `instance_numbers` overrides InstanceNumber (default k + 1);
  `extra` sets further tags on every slice (tests: a patient name that must not leak)."""
  os.makedirs(folder, exist_ok=True)
  lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ np.asarray(affine, np.float64)
  col_step, row_step = np.linalg.norm(lps[:3, 0]), np.linalg.norm(lps[:3, 1])
  orientation = [*(lps[:3, 0] / col_step), *(lps[:3, 1] / row_step)]
  entropy = [str(part) for part in uid_seed]
  series_uid = series_uid or generate_uid(entropy_srcs=entropy + ["series"])
  study_uid = generate_uid(entropy_srcs=entropy + ["study"])
  nz = raw.shape[2]
  names = (file_order.permutation(nz) if file_order is not None else np.arange(nz))
  sop_class = CTImageStorage if modality == "CT" else MRImageStorage
  for k in range(nz):
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=entropy + [series_uid, str(k)])
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
    ds.Modality = modality
    ds.PatientName, ds.PatientID = PLACEHOLDERS["PatientName"], PLACEHOLDERS["PatientID"]
    ds.InstanceNumber = int(instance_numbers[k]) if instance_numbers is not None else k + 1
    position = lps @ np.asarray([0.0, 0.0, k, 1.0])
    ds.ImagePositionPatient = [_ds(v) for v in position[:3]]
    ds.ImageOrientationPatient = [_ds(v) for v in orientation]
    ds.PixelSpacing = [_ds(row_step), _ds(col_step)]
    ds.SliceThickness = _ds(np.linalg.norm(lps[:3, 2]))
    ds.RescaleSlope, ds.RescaleIntercept = _ds(slope), _ds(inter)
    ds.Rows, ds.Columns = int(raw.shape[1]), int(raw.shape[0])
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    for key, value in (extra or {}).items():
      setattr(ds, key, value)
    ds.PixelData = np.ascontiguousarray(raw[:, :, k].T.astype("<i2")).tobytes()
    pydicom.dcmwrite(os.path.join(folder, f"{int(names[k]) + 1:04d}.dcm"), ds,
                     enforce_file_format=True)


def _ds(value):
  """A DICOM decimal string (at most 16 characters) of `value`."""
  for digits in range(15, 5, -1):
    text = f"{float(value):.{digits}g}"
    if len(text) <= 16:
      return text
  return f"{float(value):.6g}"


# --- CT-RATE ------------------------------------------------------------------------------------

class CtRateWriter:
  """The `ctrate` layout (module docstring)."""

  def __init__(self, out_dir, n, seed, folders):
    self.out_dir = out_dir
    names = [f"CT{k}" for k in range(1, folders + 1)]
    self.test_folders = (set(corpus_bimcv.folder_split_assignment(names)["test"])
                         if folders >= 3 else set())
    self.n, self.folders = n, folders
    self.counts = {"train": 0, "valid": 0}
    self.current = None                  # (folder, split, patient number) of an open scan
    self.rows = {"train": [], "valid": []}

  def _volume_name(self, folder):
    """(split, name, patient) of the next study, of CT folder `folder`: a second
    reconstruction of the previous study's scan when both are in one CT folder and the
    previous one opened the scan."""
    split = "valid" if folder in self.test_folders else "train"
    previous = self.current
    if previous is not None and previous[0] == folder and previous[3] == 1:
      self.current = (*previous[:3], 2)
    else:
      self.current = (folder, split, self.counts[split], 1)
      self.counts[split] += 1
    _, split, patient, recon = self.current
    return split, f"{split}_{patient}_a_{recon}.nii.gz", f"{split}_{patient}"

  def add(self, index, study, hu):
    del index
    split, name, patient = self._volume_name(study.folder)
    patient_number = int(patient.split("_")[1])
    stored_hu = patient_number % 2 == 1
    inter = 0.0 if stored_hu else CTRATE_INTERCEPT
    raw, affine = phantom.stored_volume(hu, study.geometry, slope=1.0, inter=inter)
    # The header keeps the axis directions but not the voxel size (1 mm) nor the scaling.
    unit = affine.copy()
    unit[:3, :3] = affine[:3, :3] / np.linalg.norm(affine[:3, :3], axis=0)
    folder = os.path.join(self.out_dir, "dataset", split, patient, name.rsplit("_", 1)[0])
    os.makedirs(folder, exist_ok=True)
    phantom.write_raw_nifti(os.path.join(folder, name), raw, unit)
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    findings_text, impression = _split_report(study.report)
    self.rows[split].append({
        "report": {"VolumeName": name, "ClinicalInformation_EN": "Not given.",
                   "Technique_EN": "Non-contrast chest CT.", "Findings_EN": findings_text,
                   "Impressions_EN": impression},
        "metadata": {"VolumeName": name, "RescaleSlope": 1.0,
                     "RescaleIntercept": CTRATE_INTERCEPT,
                     "XYSpacing": f"[{float(spacing[0])!r}, {float(spacing[1])!r}]",
                     "ZSpacing": repr(float(spacing[2])), "Manufacturer": "PHANTOM"},
        "labels": {"VolumeName": name, **labels_of(study.findings)},
    })

  def finish(self):
    dataset = os.path.join(self.out_dir, "dataset")
    files = {"report": ("radiology_text_reports", {"train": "train_reports.csv",
                                                   "valid": "validation_reports.csv"}),
             "metadata": ("metadata", {"train": "train_metadata.csv",
                                       "valid": "validation_metadata.csv"}),
             "labels": ("multi_abnormality_labels", {"train": "train_predicted_labels.csv",
                                                     "valid": "valid_predicted_labels.csv"})}
    for role, (folder, names) in files.items():
      os.makedirs(os.path.join(dataset, folder), exist_ok=True)
      for split, name in names.items():
        rows = [row[role] for row in self.rows[split]]
        columns = list(rows[0]) if rows else ["VolumeName"]
        pd.DataFrame(rows, columns=columns).to_csv(os.path.join(dataset, folder, name),
                                                   index=False)
    return os.path.join(dataset, "radiology_text_reports", "train_reports.csv")


def _split_report(report):
  """(findings, impression) of a phantom report ("... FINDINGS: ... IMPRESSION: ...")."""
  body = report.split("FINDINGS:", 1)[-1]
  findings, _, impression = body.partition("IMPRESSION:")
  return findings.strip(), impression.strip() or "Not given."

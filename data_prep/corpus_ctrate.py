"""CT-RATE's layout -> the Corpus of Studies that convert.py converts (like BIMCV-R's).

  R/dataset/{train,valid}/<split>_<patient>/<split>_<patient>_<scan>/<volume>.nii.gz
      e.g. train/train_12/train_12_a/train_12_a_2.nii.gz: patient 12, scan a, reconstruction 2
  R/dataset/radiology_text_reports/{train,validation}_reports.csv
      VolumeName, ClinicalInformation_EN, Technique_EN, Findings_EN, Impressions_EN
  R/dataset/metadata/{train,validation}_metadata.csv
      VolumeName, RescaleSlope, RescaleIntercept, XYSpacing ("[0.75, 0.75]"), ZSpacing, ...
  R/dataset/multi_abnormality_labels/{train,valid}_predicted_labels.csv
      VolumeName and one 0/1 column per abnormality (18 in CT-RATE)

The CSVs are found by exact name, else by pattern (`*train*report*.csv` ...) anywhere under
R/dataset/, so renamed copies work. A study is a volume file with a report row (the report is
data.ctrate_report_columns joined, "Not given." counting as empty), a metadata row (its slope,
intercept and spacing override the header's: the first release's headers lack them) and a label
row (a multi-hot vector; the label names, in the CSV's column order, go to the dataset metadata).
A volume without a report row, a report row without its file, a missing metadata or label row
and a duplicate report row are each skipped and named; nothing else is lost.

Splits: `valid` is our `test` (the field's evaluation set); `val` is carved from `train` by
patient: patients ordered by sha256 of their id, the first max(1, round(n * data.val_fraction))
are val. Every reconstruction and scan of a patient stays in the patient's split.

Row numbers: report rows count 1.. in file order (train's CSV, then validation's); volumes
without a report row follow them, so converted + skipped = report rows + such volumes.
"""

import ast
import hashlib
import math
import os
import re

from data_prep import corpus_base
from data_prep import filesystem

SPLITS = {"train": "train", "valid": "test"}       # CT-RATE folder -> our split
CSV_NAMES = {   # role -> (exact names per folder split, patterns)
    "reports": ("radiology_text_reports", {"train": "train_reports.csv",
                                           "valid": "validation_reports.csv"}, "report"),
    "metadata": ("metadata", {"train": "train_metadata.csv",
                              "valid": "validation_metadata.csv"}, "metadata"),
    "labels": ("multi_abnormality_labels", {"train": "train_predicted_labels.csv",
                                            "valid": "valid_predicted_labels.csv"}, "label"),
}
SPLIT_WORDS = {"train": ("train",), "valid": ("valid", "validation", "val")}
VOLUME_NAME = re.compile(r"^(train|valid)_(\d+)_([A-Za-z]+)_(\d+)\.nii(?:\.gz)?$")
NOT_GIVEN = ("not given.", "not given")
DEFAULT_REPORT_COLUMNS = ("Findings_EN", "Impressions_EN")
NAME_COLUMN = "VolumeName"


def parse_volume_name(name):
  """(folder split, patient id, scan id, study id) of e.g. "train_12_a_2.nii.gz", or None."""
  match = VOLUME_NAME.match(name)
  if not match:
    return None
  split, patient, scan, _ = match.groups()
  study_id = corpus_base.study_id_of(name)
  return split, f"{split}_{patient}", f"{split}_{patient}_{scan}", study_id


def find_ctrate_csv(data_root, role, split):
  """The CSV of `role` for folder split `split`: its exact path, else the one file matching
  the pattern under dataset/; None when there is none. CorpusError when several match."""
  dataset = filesystem.join(data_root, "dataset")
  folder, exact, word = CSV_NAMES[role]
  path = filesystem.join(dataset, folder, exact[split])
  if filesystem.isfile(path):
    return path
  found = []
  for candidate in _csv_files(dataset):
    name = os.path.basename(candidate).lower()
    if word in name and _split_of_name(name) == split:
      found.append(candidate)
  if len(found) > 1:
    raise corpus_base.CorpusError(f"several {role} CSVs of the {split} split under {dataset!r}: "
                                  f"{found}; keep one (expected {folder}/{exact[split]})")
  return found[0] if found else None


def _csv_files(dataset):
  """The *.csv files anywhere under `dataset`, sorted; hidden files and folders left out (as
  glob's ** leaves them)."""
  found = []
  for folder, dirs, names in filesystem.walk(dataset):
    dirs[:] = [d for d in dirs if not d.startswith(".")]
    found += [filesystem.join(folder, n) for n in names
              if n.endswith(".csv") and not n.startswith(".")]
  return sorted(found)


def _split_of_name(name):
  """'train' or 'valid' from a file name's words (validation_reports.csv -> valid)."""
  words = set(re.split(r"[^a-z]+", name))
  hits = [split for split, options in SPLIT_WORDS.items() if words & set(options)]
  return hits[0] if len(hits) == 1 else None


def index_ctrate_volumes(data_root):
  """{volume file name: relative path} of dataset/{train,valid}/**/*.nii(.gz), regular files."""
  files = {}
  for split in SPLITS:
    top = filesystem.join(data_root, "dataset", split)
    for folder, dirs, names in filesystem.walk(top):
      dirs.sort(key=corpus_base.natural_key)
      for name in sorted(names, key=corpus_base.natural_key):
        if name.endswith(corpus_base.VOLUME_SUFFIXES):
          relative = filesystem.relpath(filesystem.join(folder, name), data_root)
          files.setdefault(name, relative)
  return files


def _read_table(path, max_field_chars, encoding):
  """{VolumeName: (line, values)} and the problems [(line, path text, reason)] of one CSV."""
  columns, records = corpus_base.read_csv_table(path, encoding, NAME_COLUMN, max_field_chars)
  if NAME_COLUMN not in columns:
    raise corpus_base.CorpusError(f"CSV {path!r} has no column {NAME_COLUMN!r}; its columns are "
                                  f"{columns}")
  rows, problems = {}, []
  for record in records:
    if record.problem:
      problems.append((record.line, record.path_text, record.problem))
      continue
    name = record.values[NAME_COLUMN].strip()
    if name in rows:
      problems.append((record.line, name, f"duplicate row for {name!r} in "
                                          f"{os.path.basename(path)} (line {rows[name][0]} "
                                          f"already has it)"))
      continue
    rows[name] = (record.line, record.values)
  return columns, rows, problems


def report_text(values, columns):
  """The report: `columns` of a report row joined, "Not given." (CT-RATE's blank) dropped."""
  parts = []
  for column in columns:
    text = str(values.get(column, "")).strip()
    if text and text.lower() not in NOT_GIVEN:
      parts.append(text)
  return " ".join(parts)


def metadata_of(values, path):
  """(slope, intercept, (x, y, z) spacing) of a metadata row, or (None, reason)."""
  try:
    xy = ast.literal_eval(values["XYSpacing"].strip()) if isinstance(values["XYSpacing"], str) \
        else values["XYSpacing"]
    xy = [float(v) for v in (xy if isinstance(xy, (list, tuple)) else [xy, xy])]
    spacing = (xy[0], xy[1], float(values["ZSpacing"]))
    slope, inter = float(values["RescaleSlope"]), float(values["RescaleIntercept"])
  except (KeyError, ValueError, SyntaxError, TypeError, IndexError) as err:
    return None, (f"metadata row in {os.path.basename(path)} unreadable "
                  f"({type(err).__name__}: {err}); expected RescaleSlope, RescaleIntercept, "
                  f"XYSpacing like \"[0.75, 0.75]\" and ZSpacing")
  values_ok = all(math.isfinite(v) for v in (slope, inter, *spacing))
  if not values_ok or slope == 0 or min(spacing) <= 0 or len(xy) != 2:
    return None, (f"metadata row in {os.path.basename(path)}: slope {slope:g}, intercept "
                  f"{inter:g}, spacing {spacing}; expected a non-zero slope and positive spacing")
  return {"slope": slope, "intercept": inter, "spacing": spacing}, None


def label_vector(values, names, path):
  """The 0/1 labels of `names` in a label row, or (None, reason)."""
  out = []
  for name in names:
    text = str(values.get(name, "")).strip()
    try:
      number = float(text)
    except ValueError:
      number = math.nan
    if number not in (0.0, 1.0):
      return None, (f"label {name!r} is {text!r} in {os.path.basename(path)}; expected 0 or 1")
    out.append(int(number))
  return tuple(out), None


def patient_val_split(patients, fraction):
  """The train patients that become val: sha256 order, the first max(1, round(n * fraction))
  (none when fraction is 0 or fewer than 2 patients)."""
  patients = sorted(set(patients))
  if fraction <= 0 or len(patients) < 2:
    return set()
  count = min(len(patients) - 1, max(1, int(len(patients) * fraction + 0.5)))
  ordered = sorted(patients, key=lambda p: hashlib.sha256(p.encode()).hexdigest())
  return set(ordered[:count])


def read_ctrate(data_config):
  """The CT-RATE Corpus (module docstring); CorpusError when the layout is unusable."""
  data_root = str(data_config.data_root)
  encoding = str(data_config.get("csv_encoding", "utf-8"))
  max_field_chars = data_config.get("max_field_chars", 1_000_000)
  fraction = float(data_config.get("val_fraction", 0.1))
  if not 0 <= fraction < 1:
    raise corpus_base.CorpusError(f"data.val_fraction={fraction!r}; expected 0 <= fraction < 1")
  report_columns = tuple(data_config.get("ctrate_report_columns", DEFAULT_REPORT_COLUMNS))
  tables, sources = {}, {}
  for role in CSV_NAMES:
    for split in SPLITS:
      path = find_ctrate_csv(data_root, role, split)
      if path is None:
        if role == "reports" or filesystem.isdir(filesystem.join(data_root, "dataset", split)):
          folder, exact, _ = CSV_NAMES[role]
          raise corpus_base.CorpusError(
              f"no {role} CSV of the {split} split: expected dataset/{folder}/{exact[split]} "
              f"under {data_root!r} (or a *{split}*{CSV_NAMES[role][2]}*.csv under dataset/)")
        continue
      tables[role, split] = _read_table(path, max_field_chars, encoding) + (path,)
      sources[f"{role}_{split}"] = path
  for split in SPLITS:
    if ("reports", split) in tables:
      missing = [c for c in report_columns if c not in tables["reports", split][0]]
      if missing:
        raise corpus_base.CorpusError(
            f"report CSV {tables['reports', split][3]!r} has no column(s) {missing} "
            f"(data.ctrate_report_columns); its columns are {tables['reports', split][0]}")
  label_names = _label_names(tables)
  files = index_ctrate_volumes(data_root)
  return _assemble(data_root, tables, files, label_names, report_columns, fraction, sources)


def _label_names(tables):
  """The label columns (every column but VolumeName, in file order); both splits must agree."""
  names = None
  for split in SPLITS:
    if ("labels", split) not in tables:
      continue
    columns = [c for c in tables["labels", split][0] if c != NAME_COLUMN]
    if names is not None and columns != names:
      raise corpus_base.CorpusError(f"the label CSVs disagree on the label columns: {names} vs "
                                    f"{columns} ({tables['labels', split][3]})")
    names = columns
  return tuple(names or ())


def _assemble(data_root, tables, files, label_names, report_columns, fraction, sources):
  studies, skipped, row = [], [], 0
  named = set()
  for split in SPLITS:
    if ("reports", split) not in tables:
      continue
    _, reports, problems, path = tables["reports", split]
    base = os.path.basename(path)
    # Problems of the report CSV itself, and its rows, in line order.
    lines = sorted([(line, None, text, reason) for line, text, reason in problems]
                   + [(line, name, values, None) for name, (line, values) in reports.items()])
    for line, name, values, reason in lines:
      row += 1
      if name is None:
        skipped.append(corpus_base.Skipped(row, corpus_base.shown(values), f"{base}: {reason}",
                                           SPLITS[split]))
        continue
      named.add(name)
      study, reason = _study(row, name, values, split, tables, files, data_root, label_names,
                             report_columns)
      if reason:
        skipped.append(corpus_base.Skipped(row, files.get(name, name), reason, SPLITS[split],
                                           corpus_base.study_id_of(name)))
      else:
        studies.append(study)
  for name, relative in files.items():
    if name not in named:
      row += 1
      folder_split = relative.split("/")[1]
      skipped.append(corpus_base.Skipped(row, relative, "no report row for this volume in the "
                                         f"{folder_split} report CSV", SPLITS.get(folder_split, ""),
                                         corpus_base.study_id_of(name)))
  val = patient_val_split([s.patient_id for s in studies if s.split == "train"], fraction)
  for study in studies:
    if study.patient_id in val:
      study.split = "val"
  assignment = {split: sorted({s.patient_id for s in studies if s.split == split},
                              key=corpus_base.natural_key) for split in ("train", "val", "test")}
  studies.sort(key=lambda s: ({"train": 0, "val": 1, "test": 2}[s.split],
                              corpus_base.natural_key(s.study_id)))
  return corpus_base.Corpus(
      csv_path=sources.get("reports_train") or sources.get("reports_valid"), studies=studies,
      skipped=skipped, folders=list(SPLITS), split_by="patients", split_assignment=assignment,
      label_columns=(), num_rows=row, layout="ctrate", label_names=label_names, sources=sources)


def _study(row, name, values, split, tables, files, data_root, label_names, report_columns):
  """(Study, None) for a report row, or (None, reason)."""
  parsed = parse_volume_name(name)
  if parsed is None:
    return None, (f"VolumeName {name!r} is not <split>_<patient>_<scan>_<reconstruction>"
                  f".nii.gz (e.g. train_12_a_2.nii.gz)")
  folder_split, patient_id, scan_id, study_id = parsed
  if folder_split != split:
    return None, f"VolumeName {name!r} of the {folder_split} split in the {split} report CSV"
  relative = files.get(name)
  if relative is None:
    return None, (f"no volume file {name!r} under dataset/{split}/ (expected "
                  f"dataset/{split}/{patient_id}/{scan_id}/{name})")
  path = filesystem.join(data_root, relative)
  kind = corpus_base.file_kind(path)
  if kind is not None:
    return None, f"{relative} is {kind}, not a regular file; refused"
  report = report_text(values, report_columns)
  if not report:
    return None, f"empty report (columns {list(report_columns)} empty or \"Not given.\")"
  meta_table = tables.get(("metadata", split))
  meta_row = meta_table[1].get(name) if meta_table else None
  if meta_row is None:
    return None, "no metadata row for this volume (slope, intercept and spacing unknown)"
  meta, reason = metadata_of(meta_row[1], meta_table[3])
  if reason:
    return None, reason
  labels = ()
  if label_names:
    label_table = tables.get(("labels", split))
    label_row = label_table[1].get(name) if label_table else None
    if label_row is None:
      return None, "no label row for this volume"
    labels, reason = label_vector(label_row[1], label_names, label_table[3])
    if reason:
      return None, reason
  return corpus_base.Study(
      row=row, study_id=study_id, source_path=relative, folder=split, report=report, labels={},
      split=SPLITS[split], file_size=filesystem.size(path),
      scan_id=scan_id, patient_id=patient_id, label_vector=labels, source_meta=meta), None

"""Layouts `bimcv` (BIMCV-R) and `dicom`: CSV rows matched to volume files, checked, and
assigned to splits (a corpus_base.Corpus, as every layout gives).

Layout `bimcv` (BIMCV-R): `data_root/CT*/ct/<name>.nii.gz` and `data_root/meta/<csv>`. A CSV
row's volume is found as the released code code does, by the basename of its `path` among the
CT*/ct/ files (so the CSV may hold paths from another machine); a relative path that names a
CT*/ct/ file exactly wins over a basename match. A `path` that names a directory relative to
data_root is one DICOM series (data_prep/dicom.py); its study id is the directory's name and its
split folder the path's first component. Layout `dicom` is the same reader for a corpus of DICOM
folders only (no CT*/ct/ folders needed), e.g. `CT1/dicom/<study>/*.dcm` with `meta/<csv>`. Row
numbers are 1-based data rows (the header is row 0); the CSV is read as data_prep/corpus_base.py
describes.

Splits (recorded in the dataset metadata):
- `folders` (default, the paper's split as stated by the dataset author): CT folders in natural
  order (CT1 < CT2 < ... < CT10); the last max(1, round(n/5)) are test, the max(1, round(n/10))
  before them val, the rest train -- 7/1/2 for BIMCV-R's 10 folders.
- `rows` (the released code): CSV row order, rows [0, int(n*0.7)) train,
  [int(n*0.7), int(n*(0.7+0.1))) val, the rest test -- the same float expressions, so the same
  rows (for n = 10 that is 7 / 0 / 3, as in the released code).
"""

import functools
import os
import posixpath

from data_prep import corpus_base
from data_prep import filesystem


CSV_CANDIDATES = ("curated_ct_report_path_En.csv", "BIMCV-R.csv")
SPLIT_RULES = ("folders", "rows")


def find_csv(data_root, csv=""):
  """The CSV to read: `csv` (absolute or relative to data_root), else meta/<CSV_CANDIDATES>."""
  if csv:
    path = csv if filesystem.isabs(csv) else filesystem.join(data_root, csv)
    if not filesystem.isfile(path):
      raise corpus_base.CorpusError(f"CSV file {path!r} does not exist (data.csv={csv!r})")
    return path
  for name in CSV_CANDIDATES:
    path = filesystem.join(data_root, "meta", name)
    if filesystem.isfile(path):
      return path
  meta = filesystem.join(data_root, "meta")
  found = sorted(filesystem.listdir(meta)) if filesystem.isdir(meta) else "no meta/ folder"
  raise corpus_base.CorpusError(f"no CSV in {meta!r}: expected one of {list(CSV_CANDIDATES)} "
                                f"(found: {found}); set data.csv to choose another file")


def ct_folders(data_root):
  """The CT* folders of data_root that hold a ct/ folder, in natural order."""
  return sorted((name for name in filesystem.listdir(data_root)
                 if name.startswith("CT") and filesystem.isdir(filesystem.join(data_root, name,
                                                                                "ct"))),
                key=corpus_base.natural_key)


def index_volumes(data_root):
  """(folders, files): CT folders (natural order) and {basename: [relative paths]}."""
  folders = ct_folders(data_root)
  files = {}
  for folder in folders:
    ct = filesystem.join(data_root, folder, "ct")
    try:
      names = sorted(filesystem.listdir(ct), key=corpus_base.natural_key)
    except OSError as err:
      raise corpus_base.CorpusError(f"cannot list {ct!r}: {err.strerror or err}") from None
    for name in names:
      if name.endswith(corpus_base.VOLUME_SUFFIXES):
        files.setdefault(name, []).append(f"{folder}/ct/{name}")
  return folders, files


def folder_split_assignment(folders):
  """{split: [folders]} for the `folders` rule (module docstring)."""
  n = len(folders)
  if n < 3:
    raise corpus_base.CorpusError(f"split_by='folders' needs at least 3 CT folders, found {n} "
                                  f"({folders}); use --split_by rows")
  n_test = max(1, int(n / 5 + 0.5))
  n_val = max(1, int(n / 10 + 0.5))
  n_train = n - n_val - n_test
  return {"train": folders[:n_train], "val": folders[n_train:n_train + n_val],
          "test": folders[n_train + n_val:]}


def row_split_bounds(num_rows, split_rate=0.7):
  """(train_end, val_end) exactly as the released code slices its DataFrame."""
  return int(num_rows * split_rate), int(num_rows * (split_rate + 0.1))


def row_split(row_index, num_rows):
  """Split of the 0-based CSV data row `row_index` under the `rows` rule."""
  return split_of_row(row_index, row_split_bounds(num_rows))


def split_of_row(row_index, bounds):
  """Split of the 0-based CSV data row `row_index` given `row_split_bounds`."""
  train_end, val_end = bounds
  if row_index < train_end:
    return "train"
  return "val" if row_index < val_end else "test"


def folder_check(data_root):
  """is_folder(relative path): whether data_root/relative is a folder, each path asked once (a
  corpus read asks it of every row, twice, and on a bucket each ask is a request)."""
  @functools.lru_cache(maxsize=None)
  def is_folder(relative):
    return filesystem.isdir(filesystem.join(data_root, relative))
  return is_folder


def match_volume(path_text, files, data_root, is_folder=None):
  """(source_path, None) or (None, reason) for a CSV `path` cell. `is_folder`: a folder_check
  of data_root (a fresh one by default)."""
  is_folder = is_folder or folder_check(data_root)
  text = path_text.strip().replace("\\", "/")
  if not text:
    return None, "empty path"
  if ".." in text.split("/"):
    return None, f"path {path_text!r} escapes data_root (contains '..'); refused"
  normalized = posixpath.normpath(text)
  if normalized not in (".", "") and is_folder(normalized):
    return dicom_folder(normalized, data_root)
  basename = posixpath.basename(normalized)
  candidates = files.get(basename, [])
  if not candidates:
    return None, f"no volume file named {basename!r} under {data_root}/CT*/ct/"
  exact = [c for c in candidates if normalized.endswith(c)]
  kinds = {c: corpus_base.file_kind(filesystem.join(data_root, c)) for c in exact or candidates}
  source = next((c for c in kinds if kinds[c] is None), next(iter(kinds)))
  if _resolves_outside(data_root, source):
    return None, f"{source} resolves outside data_root (symbolic link); refused"
  if kinds[source] is not None:
    return None, f"{source} is {kinds[source]}, not a regular file; refused"
  return source, None


def dicom_folder(relative, data_root):
  """(source_path, None) for a DICOM series folder inside data_root, else (None, reason)."""
  if _resolves_outside(data_root, relative):
    return None, f"{relative} resolves outside data_root (symbolic link); refused"
  return relative.strip("/"), None


def _resolves_outside(data_root, relative):
  """Whether data_root/relative is a symbolic link (or under one) to a place outside data_root.
  A remote file system has no links (and `..` is refused before)."""
  if filesystem.is_remote(data_root):
    return False
  real_root = os.path.realpath(data_root)
  return not os.path.realpath(os.path.join(data_root, relative)).startswith(real_root + os.sep)


def folder_bytes(path, is_dir=None):
  """Bytes of a file, or of the regular files directly in a folder (a DICOM series); `is_dir`
  when known."""
  if not (filesystem.isdir(path) if is_dir is None else is_dir):
    return filesystem.size(path)
  return sum(size for _, size in filesystem.files_in(path))


def read_csv_corpus(data_config, layout="bimcv"):
  """Reads, matches and checks every CSV row; assigns splits. Raises CorpusError when the corpus
  as a whole is unusable, otherwise lists bad rows in `skipped` with the reason."""
  data_root = str(data_config.data_root)
  split_by = str(data_config.split_by)
  if split_by not in SPLIT_RULES:
    raise corpus_base.CorpusError(f"data.split_by={split_by!r}; expected one of {SPLIT_RULES}")
  encoding = str(data_config.get("csv_encoding", "utf-8"))
  csv_path = find_csv(data_root, str(data_config.csv))
  path_column, report_column = str(data_config.path_column), str(data_config.report_column)
  max_field_chars = data_config.get("max_field_chars", 1_000_000)
  if not isinstance(max_field_chars, int) or max_field_chars < 1:
    raise corpus_base.CorpusError(f"data.max_field_chars={max_field_chars!r}; expected a positive "
                                  f"integer")
  columns, table = corpus_base.read_csv_table(csv_path, encoding, path_column, max_field_chars)
  for column, field in ((path_column, "path_column"), (report_column, "report_column")):
    if column not in columns:
      raise corpus_base.CorpusError(f"CSV {csv_path!r} has no column {column!r} (data.{field}); "
                                    f"its columns are {columns}")
  label_columns = tuple(c for c in data_config.label_columns if c in columns)
  folders, files = index_volumes(data_root)
  is_folder = folder_check(data_root)
  folders = sorted(set(folders) | _dicom_split_folders(table, is_folder),
                   key=corpus_base.natural_key)
  if not folders:
    raise corpus_base.CorpusError(f"no CT*/ct/ folders under data_root {data_root!r}, nor CSV "
                                  f"paths naming DICOM folders")
  if split_by == "folders":
    assignment = folder_split_assignment(folders)
    split_of_folder = {f: s for s, names in assignment.items() for f in names}
  else:
    bounds = row_split_bounds(len(table))
    assignment = {"train": [0, bounds[0]], "val": list(bounds), "test": [bounds[1], len(table)]}
  studies, skipped, used = [], [], {}
  for index, csv_record in enumerate(table):
    row, path_text = index + 1, csv_record.path_text
    split = split_of_row(index, bounds) if split_by == "rows" else ""
    if csv_record.problem:
      skipped.append(corpus_base.Skipped(row, corpus_base.shown(path_text), csv_record.problem,
                                         split))
      continue
    record = csv_record.values
    reason = next(filter(None, (corpus_base.undecodable(c, record[c], encoding)
                                for c in (path_column, report_column, *label_columns))), None)
    source = None
    if reason is None:
      source, reason = match_volume(path_text, files, data_root, is_folder)
    study_id = corpus_base.study_id_of(posixpath.basename(source)) if source else ""
    if source is not None:
      split = split or split_of_folder[source.split("/")[0]]
      if study_id in used:
        reason = f"duplicate study {study_id!r}: row {used[study_id]} already uses it"
      elif not record[report_column].strip():
        reason = f"empty report (column {report_column!r})"
    if reason is not None:
      skipped.append(corpus_base.Skipped(row, source or corpus_base.shown(path_text), reason,
                                         split, study_id))
      continue
    used[study_id] = row
    studies.append(corpus_base.Study(
        row=row, study_id=study_id, source_path=source,
        folder=source.split("/")[0], report=record[report_column].strip(),
        labels={c: record[c] for c in label_columns}, split=split,
        file_size=folder_bytes(filesystem.join(data_root, source), is_folder(source))))
  return corpus_base.Corpus(csv_path=csv_path, studies=studies, skipped=skipped, folders=folders,
                split_by=split_by, split_assignment=assignment, label_columns=label_columns,
                num_rows=len(table), layout=layout, sources={"reports": csv_path})


def _dicom_split_folders(table, is_folder):
  """First path components of CSV paths that name DICOM folders (their split folders)."""
  found = set()
  for record in table:
    text = record.path_text.strip().replace("\\", "/")
    if not text or record.problem or ".." in text.split("/"):
      continue
    normalized = posixpath.normpath(text)
    if normalized not in (".", "") and is_folder(normalized):
      found.add(normalized.strip("/").split("/")[0])
  return found

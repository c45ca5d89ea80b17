"""The raw corpus: CSV rows matched to volume files, checked, and assigned to splits.

Every layout gives the same Corpus of Studies (convert.py is one converter): `read_corpus` picks
the reader by data.layout ("auto": `detect_layout`). This module holds the shared types and the
BIMCV-R reader; data_prep/corpus_ctrate.py reads CT-RATE.

Layout `bimcv` (BIMCV-R): `data_root/CT*/ct/<name>.nii.gz` and `data_root/meta/<csv>`. A CSV row's volume
is found as the released code code does, by the basename of its `path` among the CT*/ct/ files (so the
CSV may hold paths from another machine); a relative path that names a CT*/ct/ file exactly wins
over a basename match. A `path` that names a directory relative to data_root is one DICOM
series (data_prep/dicom.py); its study id is the directory's name and its split folder the
path's first component. Layout `dicom` is the same reader for a corpus of DICOM folders only
(no CT*/ct/ folders needed), e.g. `CT1/dicom/<study>/*.dcm` with `meta/<csv>`. Only regular files are used (a named pipe would block the reader). Row
numbers are 1-based data rows (the header is row 0); problems with the CSV's structure name the
file's line (the header is line 1), as an editor shows it.

The CSV is read record by record and every data line ends up in a row or in a skip: a record
that is not exactly the header's fields (a stray quote, a missing or extra comma, a field over
data.max_field_chars) is skipped with its line number, and reading goes on at the next line.
A quoted field that swallows following lines which, read alone, are complete rows naming a
volume file marks an unbalanced quote: its opening line is skipped and the swallowed rows are
read as rows. Legitimate multi-line quoted reports are one row.

Splits (recorded in the dataset metadata):
- `folders` (default, the paper's split as stated by the dataset author): CT folders in natural
  order (CT1 < CT2 < ... < CT10); the last max(1, round(n/5)) are test, the max(1, round(n/10))
  before them val, the rest train -- 7/1/2 for BIMCV-R's 10 folders.
- `rows` (the released code): CSV row order, rows [0, int(n*0.7)) train,
  [int(n*0.7), int(n*(0.7+0.1))) val, the rest test -- the same float expressions, so the same
  rows (for n = 10 that is 7 / 0 / 3, as in the released code).
"""

import csv
import dataclasses
import glob
import io
import os
import posixpath
import re
import stat

from medfinder_jax import errors


CSV_CANDIDATES = ("curated_ct_report_path_En.csv", "BIMCV-R.csv")
LAYOUTS = ("auto", "bimcv", "ctrate", "dicom")
VOLUME_SUFFIXES = (".nii.gz", ".nii")
SPLIT_RULES = ("folders", "rows")
_UNDECODABLE = re.compile("[\udc80-\udcff]")
_LINE = re.compile(r"[^\r\n]*(?:\r\n|\r|\n)|[^\r\n]+\Z")   # what the csv module ends lines at


class CorpusError(errors.UserError):
  """A problem with the corpus as a whole (no data_root, no CSV, missing columns): fatal."""


@dataclasses.dataclass
class Study:
  """A CSV row with its matched volume, ready to convert."""
  row: int               # 1-based CSV data row
  study_id: str          # volume basename without .nii(.gz)
  source_path: str       # relative to data_root, '/' separators
  folder: str            # the CT folder, e.g. "CT3"
  report: str
  labels: dict           # label column -> text
  split: str
  file_size: int = 0     # bytes of the file (of the folder's files for a DICOM series)
  scan_id: str = ""      # groups reconstructions of one scan (CT-RATE); "" = the study id
  patient_id: str = ""   # CT-RATE's patient key (the split unit); "" when the corpus has none
  label_vector: tuple = ()   # multi-hot labels in the order of Corpus.label_names
  source_meta: dict = None   # CT-RATE metadata overriding the header: slope, intercept, spacing


@dataclasses.dataclass
class Skipped:
  """A CSV row (or study) that is not converted, and why."""
  row: int
  path: str              # the CSV's path text (or source path once matched)
  reason: str
  split: str = ""
  study_id: str = ""
  retry: bool = False    # failed for a reason that need not recur: a rerun tries again


@dataclasses.dataclass
class Corpus:
  csv_path: str
  studies: list
  skipped: list
  folders: list          # CT folders in natural order
  split_by: str
  split_assignment: dict  # folders: {split: [folders]}; rows: {split: [first_row, end_row)}
  label_columns: tuple    # configured label columns present in the CSV
  num_rows: int
  layout: str = "bimcv"
  label_names: tuple = ()   # the entries of every Study.label_vector, in order
  sources: dict = dataclasses.field(default_factory=dict)   # role -> CSV file read


@dataclasses.dataclass
class CsvRecord:
  """One data record of the CSV, or the line that could not be read as one."""
  line: int              # 1-based line of the file where it starts (the header is line 1)
  values: dict           # column -> text; {} when `problem`
  problem: str = ""      # why it is not a row of the header's fields (the skip reason)
  path_text: str = ""    # the path column's text as far as it can be told (for the report)


def natural_key(name):
  """Sort key that orders CT2 before CT10."""
  return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def find_csv(data_root, csv=""):
  """The CSV to read: `csv` (absolute or relative to data_root), else meta/<CSV_CANDIDATES>."""
  if csv:
    path = csv if os.path.isabs(csv) else os.path.join(data_root, csv)
    if not os.path.isfile(path):
      raise CorpusError(f"CSV file {path!r} does not exist (data.csv={csv!r})")
    return path
  for name in CSV_CANDIDATES:
    path = os.path.join(data_root, "meta", name)
    if os.path.isfile(path):
      return path
  meta = os.path.join(data_root, "meta")
  found = sorted(os.listdir(meta)) if os.path.isdir(meta) else "no meta/ folder"
  raise CorpusError(f"no CSV in {meta!r}: expected one of {list(CSV_CANDIDATES)} "
                    f"(found: {found}); set data.csv to choose another file")


def read_csv_table(csv_path, encoding="utf-8", path_column=None, max_field_chars=None):
  """(columns, [CsvRecord]) with every data line accounted for (module docstring). Bytes that
  are not valid `encoding` are kept as surrogate characters (U+DC80..U+DCFF) so the affected
  rows can be reported and the others still used."""
  with open(csv_path, "rb") as file:
    data = file.read()
  if data.startswith((b"\xff\xfe", b"\xfe\xff")):
    encoding = "utf-16"
  elif data.startswith(b"\xef\xbb\xbf") and encoding.lower().replace("-", "") == "utf8":
    encoding = "utf-8-sig"
  try:
    text = data.decode(encoding, errors="surrogateescape")
  except LookupError:
    raise CorpusError(f"unknown CSV encoding {encoding!r} (data.csv_encoding)") from None
  except UnicodeError as err:     # utf-16 of an odd length: surrogateescape cannot help
    raise CorpusError(f"cannot decode CSV {csv_path!r} as {encoding}: {err}") from None
  # No field can be longer than the file: the module's 131072 default stopped whole conversions.
  csv.field_size_limit(max(csv.field_size_limit(), len(text) + 1))
  lines = _LINE.findall(text)
  first = next((i for i, line in enumerate(lines) if line.strip()), None)
  if first is None:
    raise CorpusError(f"CSV {csv_path!r} is empty")
  columns, end, error = _read_record(lines, first)
  if error:
    raise CorpusError(f"cannot parse the header (line {first + 1}) of CSV {csv_path!r}: {error}")
  path_index = columns.index(path_column) if path_column in columns else None
  records = []
  while end < len(lines):
    start = end
    if not lines[start].strip():   # a blank line holds no row
      end += 1
      continue
    fields, end, error = _read_record(lines, start)
    problem = _quote_problem(lines, start, end, error, len(columns), path_index)
    if problem:
      end = start + 1              # read on from the next line
      path_text = _path_text_alone(lines[start], path_index)
      records.append(CsvRecord(start + 1, {}, problem, path_text))
      continue
    problem = (_width_problem(fields, columns, start, end)
               or _length_problem(fields, columns, start, max_field_chars))
    path_text = fields[path_index] if path_index is not None and path_index < len(fields) else ""
    records.append(CsvRecord(start + 1, {} if problem else dict(zip(columns, fields)), problem,
                             path_text))
  return columns, records


def _read_record(lines, start):
  """(fields, end, error): the record that starts at lines[start], the index after its last
  line, and csv's complaint (strict: a quote inside a quoted field, an unclosed quote)."""
  reader = csv.reader((lines[j] for j in range(start, len(lines))), strict=True)
  try:
    return next(reader), start + reader.line_num, None
  except csv.Error as err:
    return None, start + max(reader.line_num, 1), str(err)


def _parse_alone(line):
  """The fields of `line` read on its own, or None if it is not a complete record."""
  try:
    return next(csv.reader([line], strict=True), None)
  except csv.Error:
    return None


def _quote_problem(lines, start, end, error, width, path_index):
  """Why the record at lines[start:end] is not to be trusted as one row, or ""."""
  line = start + 1
  if error and end == line:
    return f"line {line}: malformed CSV ({error}); fix the quoting"
  if error:
    return (f"line {line}: unbalanced quote: a quoted field opened on this line runs on to line "
            f"{end} ({error}); fix the quoting")
  if end - start > 1 and path_index is not None:
    for j in range(start + 1, end):
      fields = _parse_alone(lines[j])
      if (fields is not None and len(fields) == width
          and fields[path_index].strip().endswith(VOLUME_SUFFIXES)):
        return (f"line {line}: unbalanced quote: a quoted field opened on this line swallows the "
                f"next lines (line {j + 1} and on are rows of their own); fix the quoting")
  return ""


def _path_text_alone(line, path_index):
  try:
    fields = next(csv.reader([line]), [])
  except csv.Error:
    return ""
  return fields[path_index] if path_index is not None and path_index < len(fields) else ""


def _width_problem(fields, columns, start, end):
  if len(fields) == len(columns):
    return ""
  where = f"line {start + 1}" if end - start == 1 else f"lines {start + 1}-{end}"
  return (f"{where}: {len(fields)} fields, the header has {len(columns)} "
          f"({', '.join(columns)}); fix the row")


def _length_problem(fields, columns, start, max_field_chars):
  for column, value in zip(columns, fields):
    if max_field_chars is not None and len(value) > max_field_chars:
      return (f"line {start + 1}: column {column!r} holds {len(value)} characters, over "
              f"data.max_field_chars={max_field_chars}; raise --config.data.max_field_chars to "
              f"keep the row")
  return ""


def index_volumes(data_root):
  """(folders, files): CT folders (natural order) and {basename: [relative paths]}."""
  folders = sorted((os.path.basename(os.path.dirname(p.rstrip("/")))
                    for p in glob.glob(os.path.join(glob.escape(data_root), "CT*", "ct", ""))),
                   key=natural_key)
  files = {}
  for folder in folders:
    try:
      names = sorted(os.listdir(os.path.join(data_root, folder, "ct")), key=natural_key)
    except OSError as err:
      raise CorpusError(f"cannot list {os.path.join(data_root, folder, 'ct')!r}: "
                        f"{err.strerror}") from None
    for name in names:
      if name.endswith(VOLUME_SUFFIXES):
        files.setdefault(name, []).append(f"{folder}/ct/{name}")
  return folders, files


def folder_split_assignment(folders):
  """{split: [folders]} for the `folders` rule (module docstring)."""
  n = len(folders)
  if n < 3:
    raise CorpusError(f"split_by='folders' needs at least 3 CT folders, found {n} ({folders}); "
                      f"use --split_by rows")
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


def study_id_of(filename):
  for suffix in VOLUME_SUFFIXES:
    if filename.endswith(suffix):
      return filename[:-len(suffix)]
  return filename


def match_volume(path_text, files, data_root):
  """(source_path, None) or (None, reason) for a CSV `path` cell."""
  text = path_text.strip().replace("\\", "/")
  if not text:
    return None, "empty path"
  if ".." in text.split("/"):
    return None, f"path {path_text!r} escapes data_root (contains '..'); refused"
  normalized = posixpath.normpath(text)
  if normalized not in (".", "") and os.path.isdir(os.path.join(data_root, normalized)):
    return dicom_folder(normalized, data_root)
  basename = posixpath.basename(normalized)
  candidates = files.get(basename, [])
  if not candidates:
    return None, f"no volume file named {basename!r} under {data_root}/CT*/ct/"
  exact = [c for c in candidates if normalized.endswith(c)]
  kinds = {c: file_kind(os.path.join(data_root, c)) for c in exact or candidates}
  source = next((c for c in kinds if kinds[c] is None), next(iter(kinds)))
  real_root = os.path.realpath(data_root)
  if not os.path.realpath(os.path.join(data_root, source)).startswith(real_root + os.sep):
    return None, f"{source} resolves outside data_root (symbolic link); refused"
  if kinds[source] is not None:
    return None, f"{source} is {kinds[source]}, not a regular file; refused"
  return source, None


def dicom_folder(relative, data_root):
  """(source_path, None) for a DICOM series folder inside data_root, else (None, reason)."""
  real_root = os.path.realpath(data_root)
  if not os.path.realpath(os.path.join(data_root, relative)).startswith(real_root + os.sep):
    return None, f"{relative} resolves outside data_root (symbolic link); refused"
  return relative.strip("/"), None


def folder_bytes(path):
  """Bytes of a file, or of the regular files directly in a folder (a DICOM series)."""
  if not os.path.isdir(path):
    return os.path.getsize(path)
  total = 0
  with os.scandir(path) as entries:
    for entry in entries:
      if entry.is_file():
        total += entry.stat().st_size
  return total


def file_kind(path):
  """None for a regular file (or a link to one), else what `path` is, in words. Only regular
  files are read: opening a named pipe blocks until someone writes to it."""
  try:
    mode = os.stat(path).st_mode
  except FileNotFoundError:
    return "missing (a broken symbolic link?)"
  except OSError as err:
    return f"unreadable ({err.strerror})"
  if stat.S_ISREG(mode):
    return None
  for test, kind in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a named pipe (FIFO)"),
                     (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                     (stat.S_ISBLK, "a block device")):
    if test(mode):
      return kind
  return "a special file"


def shown(text):
  """`text` with undecodable bytes (surrogates) as U+FFFD: safe to write to a UTF-8 report."""
  return _UNDECODABLE.sub("\ufffd", text)


def _undecodable(column, value, encoding):
  match = _UNDECODABLE.search(value)
  if not match:
    return None
  byte = ord(match.group()) - 0xDC00
  return (f"column {column!r} is not valid {encoding} (byte 0x{byte:02X} at character "
          f"{match.start()}); save the CSV as UTF-8 or set data.csv_encoding")


def detect_layout(data_root):
  """(layout, why): `ctrate` when data_root holds CT-RATE's dataset/ folder (its volumes or its
  report CSVs), else `bimcv` when it holds CT*/ct/ folders, else `dicom` when it has meta/."""
  dataset = os.path.join(data_root, "dataset")
  for name in ("radiology_text_reports", "train", "valid"):
    if os.path.isdir(os.path.join(dataset, name)):
      return "ctrate", f"found dataset/{name}/"
  if glob.glob(os.path.join(glob.escape(data_root), "CT*", "ct", "")):
    return "bimcv", "found CT*/ct/ folders"
  if os.path.isdir(os.path.join(data_root, "meta")):
    return "dicom", "found meta/ without CT*/ct/ folders (CSV paths naming DICOM folders)"
  raise CorpusError(f"cannot tell the layout of data_root {data_root!r}: no dataset/ folder "
                    f"(CT-RATE), no CT*/ct/ folders (BIMCV-R) and no meta/ folder (a CSV of "
                    f"DICOM folders); set --layout")


def read_corpus(data_config, log=None):
  """The Corpus of data.layout (LAYOUTS; "auto" detects it and says which via `log`)."""
  data_root = str(data_config.data_root)
  if not data_root or not os.path.isdir(data_root):
    raise CorpusError(f"data_root {data_root!r} is not a directory (set --data_root)")
  layout = str(data_config.get("layout", "auto"))
  if layout not in LAYOUTS:
    raise CorpusError(f"data.layout={layout!r}; expected one of {LAYOUTS}")
  if layout == "auto":
    layout, why = detect_layout(data_root)
    if log is not None:
      log(f"layout: {layout} (detected: {why}; set --layout to choose)")
  if layout == "ctrate":
    from data_prep import corpus_ctrate  # pylint: disable=import-outside-toplevel
    return corpus_ctrate.read_ctrate(data_config)
  return read_csv_corpus(data_config, layout)


def read_csv_corpus(data_config, layout="bimcv"):
  """Reads, matches and checks every CSV row; assigns splits. Raises CorpusError when the
  corpus as a whole is unusable, otherwise lists bad rows in `skipped` with the reason."""
  data_root = str(data_config.data_root)
  split_by = str(data_config.split_by)
  if split_by not in SPLIT_RULES:
    raise CorpusError(f"data.split_by={split_by!r}; expected one of {SPLIT_RULES}")
  encoding = str(data_config.get("csv_encoding", "utf-8"))
  csv_path = find_csv(data_root, str(data_config.csv))
  path_column, report_column = str(data_config.path_column), str(data_config.report_column)
  max_field_chars = data_config.get("max_field_chars", 1_000_000)
  if not isinstance(max_field_chars, int) or max_field_chars < 1:
    raise CorpusError(f"data.max_field_chars={max_field_chars!r}; expected a positive integer")
  columns, table = read_csv_table(csv_path, encoding, path_column, max_field_chars)
  for column, field in ((path_column, "path_column"), (report_column, "report_column")):
    if column not in columns:
      raise CorpusError(f"CSV {csv_path!r} has no column {column!r} (data.{field}); "
                        f"its columns are {columns}")
  label_columns = tuple(c for c in data_config.label_columns if c in columns)
  folders, files = index_volumes(data_root)
  folders = sorted(set(folders) | _dicom_split_folders(table, data_root), key=natural_key)
  if not folders:
    raise CorpusError(f"no CT*/ct/ folders under data_root {data_root!r}, nor CSV paths naming "
                      f"DICOM folders")
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
      skipped.append(Skipped(row, shown(path_text), csv_record.problem, split))
      continue
    record = csv_record.values
    reason = next(filter(None, (_undecodable(c, record[c], encoding)
                                for c in (path_column, report_column, *label_columns))), None)
    source = None
    if reason is None:
      source, reason = match_volume(path_text, files, data_root)
    study_id = study_id_of(posixpath.basename(source)) if source else ""
    if source is not None:
      split = split or split_of_folder[source.split("/")[0]]
      if study_id in used:
        reason = f"duplicate study {study_id!r}: row {used[study_id]} already uses it"
      elif not record[report_column].strip():
        reason = f"empty report (column {report_column!r})"
    if reason is not None:
      skipped.append(Skipped(row, source or shown(path_text), reason, split, study_id))
      continue
    used[study_id] = row
    studies.append(Study(
        row=row, study_id=study_id, source_path=source,
        folder=source.split("/")[0], report=record[report_column].strip(),
        labels={c: record[c] for c in label_columns}, split=split,
        file_size=folder_bytes(os.path.join(data_root, source))))
  return Corpus(csv_path=csv_path, studies=studies, skipped=skipped, folders=folders,
                split_by=split_by, split_assignment=assignment, label_columns=label_columns,
                num_rows=len(table), layout=layout, sources={"reports": csv_path})


def _dicom_split_folders(table, data_root):
  """First path components of CSV paths that name DICOM folders (their split folders)."""
  found = set()
  for record in table:
    text = record.path_text.strip().replace("\\", "/")
    if not text or record.problem or ".." in text.split("/"):
      continue
    normalized = posixpath.normpath(text)
    if normalized not in (".", "") and os.path.isdir(os.path.join(data_root, normalized)):
      found.add(normalized.strip("/").split("/")[0])
  return found

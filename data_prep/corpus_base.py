"""The shared base of every corpus layout: the Corpus of Studies, the skips, CorpusError, the
CSV reader and the file checks. The readers (data_prep/corpus_bimcv.py for BIMCV-R and DICOM
folders, data_prep/corpus_ctrate.py for CT-RATE) build a Corpus from these; data_prep/corpus.py
picks the reader. Only regular files are used (a named pipe would block the reader).

The CSV is read record by record and every data line ends up in a row or in a skip: a record
that is not exactly the header's fields (a stray quote, a missing or extra comma, a field over
data.max_field_chars) is skipped with its line number, and reading goes on at the next line.
A quoted field that swallows following lines which, read alone, are complete rows naming a
volume file marks an unbalanced quote: its opening line is skipped and the swallowed rows are
read as rows. Legitimate multi-line quoted reports are one row. Problems with the CSV's
structure name the file's line (the header is line 1), as an editor shows it.
"""

import csv
import dataclasses
import os
import re
import stat

from data_prep import filesystem
from medfinder_jax import errors


VOLUME_SUFFIXES = (".nii.gz", ".nii")
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


def study_id_of(filename):
  for suffix in VOLUME_SUFFIXES:
    if filename.endswith(suffix):
      return filename[:-len(suffix)]
  return filename


def read_csv_table(csv_path, encoding="utf-8", path_column=None, max_field_chars=None):
  """(columns, [CsvRecord]) with every data line accounted for (module docstring). Bytes that
  are not valid `encoding` are kept as surrogate characters (U+DC80..U+DCFF) so the affected
  rows can be reported and the others still used."""
  data = filesystem.read_bytes(csv_path)
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


def file_kind(path):
  """None for a regular file (or a link to one), else what `path` is, in words. Only regular
  files are read: opening a named pipe blocks until someone writes to it. On a remote file
  system (data_prep/filesystem.py) a file that exists is regular: object stores hold nothing
  else (and the callers have told folders apart already)."""
  if filesystem.is_remote(path):
    return None if filesystem.size(path) is not None else "missing"
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


def undecodable(column, value, encoding):
  """Why `value` (of `column`) holds bytes that are not valid `encoding` (read_csv_table keeps
  them as surrogates), or None."""
  match = _UNDECODABLE.search(value)
  if not match:
    return None
  byte = ord(match.group()) - 0xDC00
  return (f"column {column!r} is not valid {encoding} (byte 0x{byte:02X} at character "
          f"{match.start()}); save the CSV as UTF-8 or set data.csv_encoding")

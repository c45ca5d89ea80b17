"""The archive index on disk (format version 3), and exact search over it.

An index is a directory that grows by whole shards; nothing written is ever rewritten:

  index.json            {"format": "medfinder-index", "version": 3, "dim": D,
                         "dtype": "float16" | "float32", "created": UTC time,
                         "model": the identity of the model that made the embeddings
                                  (loading.make_identity + "embedded_from")}
  shards/<commit>/      one per `launch.py embed` run (per process or host that writes):
    shard.json          {"n", "dim", "dtype", "created", "writer": {"host", "pid"},
                         "replaces": [study ids this shard replaces in earlier commits]}
    image.npy           (n, D) unit image embeddings, memory-mapped when searched
    text.npy            (n, D) unit report embeddings
    studies.arrow       the metadata table (Arrow IPC file, memory-mapped): study_id,
                        source_path, report, has_report, thumbnail (file name or ""),
                        thumbnail_offset, thumbnail_length
    thumbnails.bin      the shard's thumbnails (PNG files end to end; see thumbnails.py)
  removals/<commit>.json  {"created", "study_ids": [...]}: studies removed from earlier commits

A commit name is `<UTC time>-<host>-<pid>-<random>`: writers on several hosts never collide, and
the index is whatever is listed, in name order (a shard appears complete or not at all: it is
written under shards/.tmp-* and renamed). Reading replays the commits in that order: a shard's
rows add studies; a later row of a study id already present (a replacement, or two hosts that
embedded the same study) supersedes the earlier one; a removal drops the ids live before it.
So each study is in the index once, whichever shards hold copies of it.

The metadata table is Arrow IPC rather than Parquet: it is memory-mapped like the embeddings, so
a million reports cost no memory until a result shows them (Parquet would be decoded into RAM).
An index of another format version is refused (rebuild it with launch.py embed).
"""

import concurrent.futures
import dataclasses
import datetime
import functools
import json
import mmap
import os
import secrets
import shutil
import socket
import tempfile
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from medfinder_jax import interchange
from medfinder_jax import metrics as metrics_lib
from medfinder_jax import score_pass_host

INDEX_FORMAT = "medfinder-index"
INDEX_VERSION = 3   # 3: shards, memory-mapped float16/32, Arrow metadata, removals (2: one npz)
META_FILE = "index.json"
SHARDS_DIR = "shards"
REMOVALS_DIR = "removals"
SHARD_META = "shard.json"
IMAGE_FILE = "image.npy"
TEXT_FILE = "text.npy"
TABLE_FILE = "studies.arrow"
THUMBNAILS_FILE = "thumbnails.bin"
DTYPES = ("float16", "float32")
TARGETS = ("image", "text")
STAGING_PREFIX = ".tmp-"
SCAN_MAX_QUERIES = 4     # exact search scans float16 for up to this many queries, else GEMM
SCAN_ROWS = 65536        # rows per scan task (64 MiB at D = 512)
SCAN_THREADS = max(1, min(os.cpu_count() or 1, 8))   # threads that scan blocks of one search
GEMM_ROWS = 4096         # rows per matrix product of a batch (a float32 block of 8 MiB at 512)


class IndexFileError(interchange.InterchangeError):
  """An index that cannot be used: missing, corrupt or inconsistent files."""


class DuplicateStudyError(IndexFileError):
  """Studies to add that the index already holds (and replacing was not asked for)."""


class SearchResult(NamedTuple):
  rank: int           # 1-based position in the result list
  study_id: str
  score: float        # cosine similarity between the query and the item
  excerpt: str        # start of the study's report (whitespace collapsed)
  source_path: str    # the study's volume file ("" when unknown)
  row: int            # 0-based row of the study among the index's live studies


def _now():
  return datetime.datetime.now(datetime.timezone.utc)


def _stamp(moment=None):
  return (moment or _now()).strftime("%Y-%m-%dT%H:%M:%SZ")


def commit_name():
  """A name that sorts by time and is unique across hosts and processes."""
  host = "".join(c if c.isalnum() or c in "-_" else "_" for c in socket.gethostname())[:40]
  return f"{_now().strftime('%Y%m%dT%H%M%S%fZ')}-{host or 'host'}-{os.getpid()}-" \
         f"{secrets.token_hex(3)}"


def _unit_rows(x):
  """Rows scaled to unit L2 norm, as numpy float32 (all-zero rows stay zero)."""
  return np.asarray(metrics_lib.l2_normalize(np.asarray(x, np.float32)))


def _write_json_atomic(path, value):
  staging = f"{path}.tmp-{secrets.token_hex(4)}"
  with open(staging, "w", encoding="utf-8") as f:
    json.dump(value, f, indent=2)
  os.replace(staging, path)


# --- Creating, adding, removing -------------------------------------------------------------------

def check_index_target(directory, overwrite=False, append=False):
  """Raises IndexFileError unless an index may be written to `directory`: it does not exist, or
  append is set and it is an index, or overwrite is set and it is an index (or an empty
  directory). Cheap: call it before the work."""
  if not os.path.exists(directory):
    return
  if append:
    _read_meta(directory)
    return
  if not overwrite:
    raise IndexFileError(f"{directory}: already exists; pass --append to add studies to it or "
                         f"--overwrite to replace the index")
  if not os.path.isdir(directory):
    raise IndexFileError(f"{directory}: exists and is not a directory; refusing to replace it")
  if os.listdir(directory) and not os.path.isfile(os.path.join(directory, META_FILE)):
    raise IndexFileError(f"{directory}: exists and is not an index (no {META_FILE}); "
                         f"refusing to replace it")


def _index_meta(dim, model, dtype):
  if dtype not in DTYPES:
    raise IndexFileError(f"index dtype {dtype!r}: expected one of {DTYPES}")
  return {"format": INDEX_FORMAT, "version": INDEX_VERSION, "dim": int(dim), "dtype": dtype,
          "created": _stamp(), "model": dict(model)}


def open_or_create(directory, dim, model, dtype="float16"):
  """The meta of the index at `directory`, created (empty) when absent. Safe when several
  writers start at once: index.json is linked into place, never replaced; a writer that finds
  one already there uses it (its dim must match)."""
  os.makedirs(os.path.join(directory, SHARDS_DIR), exist_ok=True)
  os.makedirs(os.path.join(directory, REMOVALS_DIR), exist_ok=True)
  path = os.path.join(directory, META_FILE)
  if not os.path.exists(path):
    staging = f"{path}.tmp-{secrets.token_hex(4)}"
    with open(staging, "w", encoding="utf-8") as f:
      json.dump(_index_meta(dim, model, dtype), f, indent=2)
    try:
      os.link(staging, path)
    except FileExistsError:
      pass
    finally:
      os.remove(staging)
  meta = _read_meta(directory)
  if meta["dim"] != int(dim):
    raise IndexFileError(f"{path}: the index holds {meta['dim']}-d embeddings, the studies to add "
                         f"are {dim}-d (another model); use another index directory")
  return meta


def build_index(directory, embeddings, model, overwrite=False, dtype="float16", thumbnails=None):
  """A new index at `directory` holding `embeddings` (an interchange.EmbeddingSet or its fields)
  in one shard. The directory appears complete or not at all (written next to it, renamed)."""
  embeddings = _as_set(embeddings, directory)
  check_index_target(directory, overwrite)
  parent = os.path.dirname(os.path.abspath(directory))
  os.makedirs(parent, exist_ok=True)
  staging = tempfile.mkdtemp(dir=parent, prefix=".tmp-index-")
  try:
    open_or_create(staging, embeddings.dim, model, dtype)
    add_studies(staging, embeddings, thumbnails=thumbnails)
    if os.path.exists(directory):
      shutil.rmtree(directory)
    os.replace(staging, directory)
  finally:
    if os.path.exists(staging):
      shutil.rmtree(staging)
  return directory


def _as_set(embeddings, source):
  if isinstance(embeddings, interchange.EmbeddingSet):
    return embeddings
  return interchange.validate(embeddings, source)


def add_studies(directory, embeddings, thumbnails=None, replace=False):
  """Adds one shard of studies to the index at `directory` (it must exist: open_or_create).

  A study id the index already holds is a DuplicateStudyError naming some of them, unless
  `replace` (the new rows then supersede the old ones). thumbnails: None or one PNG (bytes,
  b"" for none) per study. Returns the shard's commit name."""
  embeddings = _as_set(embeddings, directory)
  meta = _read_meta(directory)
  if embeddings.dim != meta["dim"]:
    raise IndexFileError(f"{directory}: the index holds {meta['dim']}-d embeddings, the studies "
                         f"to add are {embeddings.dim}-d")
  ids = [str(s) for s in embeddings.study_ids]
  present = sorted(set(ids) & live_study_ids(directory))
  if present and not replace:
    shown = ", ".join(present[:5]) + (f" and {len(present) - 5} more" if len(present) > 5 else "")
    raise DuplicateStudyError(f"{directory}: {len(present)} of the {len(ids)} studies to add are "
                              f"already in the index ({shown}); pass --replace to replace them")
  name = commit_name()
  shards = os.path.join(directory, SHARDS_DIR)
  staging = os.path.join(shards, STAGING_PREFIX + name)
  os.makedirs(staging)
  try:
    _write_shard(staging, embeddings, meta["dtype"], thumbnails, replaces=present)
    os.replace(staging, os.path.join(shards, name))
  finally:
    if os.path.exists(staging):
      shutil.rmtree(staging)
  return name


def _write_shard(folder, embeddings, dtype, thumbnails, replaces):
  import pyarrow as pa  # pylint: disable=import-outside-toplevel  (only index users pay for it)
  n = embeddings.n
  blank = [""] * n
  reports = blank if embeddings.reports is None else [str(r) for r in embeddings.reports]
  paths = blank if embeddings.source_paths is None else [str(p) for p in embeddings.source_paths]
  thumbnails = [b""] * n if thumbnails is None else [bytes(t or b"") for t in thumbnails]
  if len(thumbnails) != n:
    raise ValueError(f"{len(thumbnails)} thumbnails for {n} studies")
  lengths = np.array([len(t) for t in thumbnails], np.int64)
  offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
  with open(os.path.join(folder, THUMBNAILS_FILE), "wb") as f:
    for t in thumbnails:
      f.write(t)
  for name, values in ((IMAGE_FILE, embeddings.image_embeddings),
                       (TEXT_FILE, embeddings.text_embeddings)):
    np.save(os.path.join(folder, name), _unit_rows(values).astype(dtype))
  table = pa.table({
      "study_id": pa.array([str(s) for s in embeddings.study_ids], pa.string()),
      "source_path": pa.array(paths, pa.string()),
      "report": pa.array(reports, pa.string()),
      "has_report": pa.array([bool(r.strip()) for r in reports], pa.bool_()),
      "thumbnail": pa.array([THUMBNAILS_FILE if k else "" for k in lengths], pa.string()),
      "thumbnail_offset": pa.array(offsets, pa.int64()),
      "thumbnail_length": pa.array(lengths, pa.int64())})
  with pa.OSFile(os.path.join(folder, TABLE_FILE), "wb") as sink:
    with pa.ipc.new_file(sink, table.schema) as writer:
      writer.write_table(table)
  _write_json_atomic(os.path.join(folder, SHARD_META), {
      "n": n, "dim": embeddings.dim, "dtype": dtype, "created": _stamp(),
      "writer": {"host": socket.gethostname(), "pid": os.getpid()}, "replaces": list(replaces)})


def remove_studies(directory, study_ids):
  """Removes studies by id (a removal commit; the shards stay as written). An id the index does
  not hold is an IndexFileError naming it, and nothing is removed. Returns the count."""
  _read_meta(directory)
  ids = sorted({str(s) for s in study_ids})
  if not ids:
    raise IndexFileError(f"{directory}: no study ids to remove")
  missing = sorted(set(ids) - live_study_ids(directory))
  if missing:
    raise IndexFileError(f"{directory}: {len(missing)} of the study ids to remove are not in the "
                         f"index: {', '.join(missing[:5])}")
  _write_json_atomic(os.path.join(directory, REMOVALS_DIR, commit_name() + ".json"),
                     {"created": _stamp(), "study_ids": ids})
  return len(ids)


# --- Reading --------------------------------------------------------------------------------------

def _read_meta(directory):
  path = os.path.join(directory, META_FILE)
  if not os.path.isdir(directory):
    raise IndexFileError(f"{directory}: no such index directory")
  try:
    with open(path, encoding="utf-8") as f:
      meta = json.load(f)
  except FileNotFoundError:
    raise IndexFileError(f"{directory}: not a MedFinder index (no {META_FILE}); build one "
                         f"with launch.py embed") from None
  except (OSError, json.JSONDecodeError) as err:
    raise IndexFileError(f"{path}: unreadable ({err})") from None
  if not isinstance(meta, dict) or meta.get("format") != INDEX_FORMAT or (
      meta.get("version") != INDEX_VERSION):
    found = meta if isinstance(meta, dict) else {}
    raise IndexFileError(f"{path}: format {found.get('format')!r} version "
                         f"{found.get('version')!r}, this version of launch.py reads "
                         f"{INDEX_FORMAT!r} version {INDEX_VERSION}: rebuild the index with "
                         f"launch.py embed")
  return meta


def _commits(directory):
  """[(name, "shard" | "removal")] in commit order (staging folders and files ignored)."""
  found = []
  shards = os.path.join(directory, SHARDS_DIR)
  if os.path.isdir(shards):
    found += [(n, "shard") for n in os.listdir(shards) if not n.startswith(".")
              and os.path.isdir(os.path.join(shards, n))]
  removals = os.path.join(directory, REMOVALS_DIR)
  if os.path.isdir(removals):
    found += [(n[:-5], "removal") for n in os.listdir(removals) if n.endswith(".json")
              and not n.startswith(".")]
  return sorted(found)


def _shard_ids(folder):
  return [str(s) for s in _open_table(folder).column("study_id").to_pylist()]


def _open_table(folder):
  import pyarrow as pa  # pylint: disable=import-outside-toplevel
  path = os.path.join(folder, TABLE_FILE)
  try:
    return pa.ipc.open_file(pa.memory_map(path, "r")).read_all()
  except (OSError, pa.ArrowInvalid) as err:
    raise IndexFileError(f"{path}: unreadable metadata table ({err}); remove this shard or "
                         f"rebuild the index") from None


def _read_removal(path):
  try:
    with open(path, encoding="utf-8") as f:
      return [str(s) for s in json.load(f)["study_ids"]]
  except (OSError, ValueError, KeyError, TypeError) as err:
    raise IndexFileError(f"{path}: unreadable removal record ({err})") from None


def _replay(directory):
  """{study id: (commit name, local row)} of the live studies, and the commit list."""
  live = {}
  commits = _commits(directory)
  for name, kind in commits:
    if kind == "removal":
      for study in _read_removal(os.path.join(directory, REMOVALS_DIR, name + ".json")):
        live.pop(study, None)
      continue
    for row, study in enumerate(_shard_ids(os.path.join(directory, SHARDS_DIR, name))):
      live.pop(study, None)          # a later copy supersedes (and goes to the end)
      live[study] = (name, row)
  return live, commits


def live_study_ids(directory):
  return set(_replay(directory)[0])


class MappedRows:
  """An (n, D) .npy file memory-mapped read-only: `rows` reads from the file's pages without a
  copy, `release` unmaps pages this process has read, `read` reads a few rows without mapping.

  Mapped pages count in the process's RSS while mapped, and the kernel maps whole page-cache
  folios (up to megabytes) per fault: one exact scan would leave the gallery's gigabyte resident
  in the server, and so would a few hundred random rows read through the mapping (840 rows of a
  1M index mapped 800 MiB). Released, the pages stay in the page cache and the next scan maps
  them again cheaply (measured: a scan that releases as it goes is as fast)."""

  def __init__(self, path):
    self.path = path
    with open(path, "rb") as f:
      shape, dtype, offset = _npy_header(f)
      self.mapping = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    self.offset = offset
    self.row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
    self.rows = np.frombuffer(self.mapping, dtype, count=int(np.prod(shape, dtype=np.int64)),
                              offset=offset).reshape(shape)

  def read(self, local_rows):
    """(len(local_rows), D) copies of some rows, read with pread (faster than faulting their
    pages in for a few rows, and nothing stays mapped)."""
    fd = os.open(self.path, os.O_RDONLY)
    try:
      data = b"".join(os.pread(fd, self.row_bytes, self.offset + int(r) * self.row_bytes)
                      for r in local_rows)
    finally:
      os.close(fd)
    return np.frombuffer(data, self.rows.dtype).reshape(len(local_rows), *self.rows.shape[1:])

  def release(self, start=0, stop=None):
    """Unmaps the pages holding rows [start, stop) (all rows by default) from this process."""
    stop = self.rows.shape[0] if stop is None else stop
    first = (self.offset + start * self.row_bytes) // mmap.PAGESIZE * mmap.PAGESIZE
    last = min(len(self.mapping), self.offset + stop * self.row_bytes)
    if hasattr(mmap, "MADV_DONTNEED") and last > first:
      self.mapping.madvise(mmap.MADV_DONTNEED, first, last - first)


def _npy_header(f):
  """(shape, dtype, data offset) of an open .npy file; ValueError when it is not a C-order one."""
  version = np.lib.format.read_magic(f)
  readers = {(1, 0): np.lib.format.read_array_header_1_0,
             (2, 0): np.lib.format.read_array_header_2_0}
  if version not in readers:
    raise ValueError(f"npy format version {version}, expected 1.0 or 2.0")
  shape, fortran, dtype = readers[version](f)
  if fortran or len(shape) != 2:
    raise ValueError(f"a {'Fortran-order ' if fortran else ''}array of shape {shape}, expected "
                     f"a C-order (rows, dim) one")
  return shape, dtype, f.tell()


@dataclasses.dataclass
class Shard:
  """One shard, memory-mapped: embeddings, metadata, and which of its rows are live."""
  name: str
  folder: str
  mapped: dict               # {"image" | "text": MappedRows}
  table: object              # pyarrow.Table (memory-mapped)
  global_rows: np.ndarray    # (n,) int64: the row among the index's live studies, -1 if dead
  has_report: np.ndarray     # (n,) bool

  @property
  def image(self):
    return self.mapped["image"].rows

  @property
  def text(self):
    return self.mapped["text"].rows

  def gallery(self, against):
    return self.mapped[against].rows

  def release(self, against, start=0, stop=None):
    self.mapped[against].release(start, stop)


def _open_shard(directory, name, meta):
  folder = os.path.join(directory, SHARDS_DIR, name)
  mapped = {}
  for target, file in zip(TARGETS, (IMAGE_FILE, TEXT_FILE)):
    path = os.path.join(folder, file)
    try:
      mapped[target] = MappedRows(path)
    except (OSError, ValueError) as err:
      raise IndexFileError(f"{path}: unreadable embeddings ({err}); remove this shard or rebuild "
                           f"the index") from None
  table = _open_table(folder)
  n = table.num_rows
  for target, file in zip(TARGETS, (IMAGE_FILE, TEXT_FILE)):
    array = mapped[target].rows
    if array.shape != (n, meta["dim"]) or array.dtype != np.dtype(meta["dtype"]):
      raise IndexFileError(f"{os.path.join(folder, file)}: {array.shape} {array.dtype}, expected "
                           f"({n}, {meta['dim']}) {meta['dtype']} ({TABLE_FILE} has {n} rows)")
  return Shard(name, folder, mapped, table, np.full((n,), -1, np.int64),
               np.asarray(table.column("has_report").to_numpy(zero_copy_only=False), bool))


class ArchiveIndex(interchange.PairedEmbeddings):
  """A loaded index: live studies numbered 0..n-1 in commit order, over memory-mapped shards."""

  def __init__(self, directory, meta, shards, locations, commits):
    self.directory = directory
    self.meta = meta
    self.shards = shards
    self.commits = [f"{kind}:{name}" for name, kind in commits]   # what an ANN index was built on
    self._location = locations        # (n, 2) int64: shard ordinal, local row
    self._row_of = None
    self.cache = {}                    # per-index memo (e.g. keyword relevance), for servers

  @property
  def n(self):
    return int(self._location.shape[0])

  @property
  def dim(self):
    return int(self.meta["dim"])

  def column(self, name):
    """One metadata column of the live rows, in row order, as a list (one pass per shard)."""
    out = [None] * self.n
    for shard in self.shards:
      values = shard.table.column(name).to_pylist()
      for local in np.flatnonzero(shard.global_rows >= 0):
        out[shard.global_rows[local]] = values[local]
    return out

  @property
  def study_ids(self):
    return np.asarray(self.column("study_id"), dtype=str)

  @property
  def reports(self):
    return np.asarray(self.column("report"), dtype=str)

  @property
  def source_paths(self):
    return np.asarray(self.column("source_path"), dtype=str)

  @property
  def image_embeddings(self):
    return self.embeddings("image")

  @property
  def text_embeddings(self):
    return self.embeddings("text")

  def embeddings(self, against="image", dtype=np.float32):
    """(n, D) live rows of one gallery, in row order (a copy: for tests and ANN builds)."""
    out = np.empty((self.n, self.dim), dtype)
    for shard in self.shards:
      live = shard.global_rows >= 0
      out[shard.global_rows[live]] = shard.gallery(against)[live]
      shard.release(against)
    return out

  def vectors(self, rows, against="image"):
    """(len(rows), D) float32 embeddings of some live rows (e.g. candidates to re-score), read
    from each shard's file in file order (see MappedRows.read)."""
    out = np.empty((len(rows), self.dim), np.float32)
    locations = self.locations(np.asarray(rows, np.int64))
    for ordinal in np.unique(locations[:, 0]):
      picked = np.flatnonzero(locations[:, 0] == ordinal)
      picked = picked[np.argsort(locations[picked, 1])]
      out[picked] = as_float32(self.shards[ordinal].mapped[against].read(locations[picked, 1]))
    return out

  def locations(self, rows):
    """(len(rows), 2) int64: shard ordinal and local row of each live row."""
    return self._location[rows]

  def locate(self, row):
    ordinal, local = self._location[row]
    return self.shards[ordinal], int(local)

  def field(self, row, name):
    shard, local = self.locate(row)
    return shard.table.column(name)[local].as_py()

  def study_id(self, row):
    return str(self.field(row, "study_id"))

  def row_of(self, study_id):
    """The row of a study id, or None (ids are dictionary keys here, never paths)."""
    if self._row_of is None:
      self._row_of = {str(s): r for r, s in enumerate(self.column("study_id"))}
    return self._row_of.get(str(study_id))

  def study(self, row):
    """{study_id, source_path, report, has_thumbnail} of one live row."""
    shard, local = self.locate(row)
    values = {name: shard.table.column(name)[local].as_py()
              for name in ("study_id", "source_path", "report", "thumbnail_length")}
    return {"study_id": values["study_id"], "source_path": values["source_path"],
            "report": values["report"], "has_thumbnail": values["thumbnail_length"] > 0}

  def thumbnail(self, row):
    """The PNG bytes of a row's thumbnail (b"" when none), read from its shard's file."""
    shard, local = self.locate(row)
    name = shard.table.column("thumbnail")[local].as_py()
    length = shard.table.column("thumbnail_length")[local].as_py()
    if not name or length <= 0:
      return b""
    with open(os.path.join(shard.folder, THUMBNAILS_FILE), "rb") as f:   # a fixed file name
      f.seek(shard.table.column("thumbnail_offset")[local].as_py())
      return f.read(length)

  def has_report(self, row):
    shard, local = self.locate(row)
    return bool(shard.has_report[local])

  @property
  def reports_count(self):
    return int(sum(shard.has_report[shard.global_rows >= 0].sum() for shard in self.shards))


def load_index(directory):
  """Opens an index (memory-mapped); IndexFileError naming the file for anything unusable."""
  meta = _read_meta(directory)
  live, commits = _replay(directory)
  names = [name for name, kind in commits if kind == "shard"]
  shards = [_open_shard(directory, name, meta) for name in names]
  ordinal_of = {name: i for i, name in enumerate(names)}
  locations = np.array([(ordinal_of[name], row) for name, row in live.values()],
                       np.int64).reshape(-1, 2)
  for row, (ordinal, local) in enumerate(locations):
    shards[ordinal].global_rows[local] = row
  used = [i for i, shard in enumerate(shards) if (shard.global_rows >= 0).any()]
  renumber = np.full((len(shards),), -1, np.int64)
  renumber[used] = np.arange(len(used))
  shards = [shards[i] for i in used]
  if len(locations):
    locations[:, 0] = renumber[locations[:, 0]]
  return ArchiveIndex(directory, meta, shards, locations, commits)


def describe(index):
  """{"n", "dim", "dtype", "shards", "bytes"} for `launch.py index --info` and the server."""
  total = 0
  for shard in index.shards:
    total += sum(os.path.getsize(os.path.join(shard.folder, f)) for f in os.listdir(shard.folder))
  return {"n": index.n, "dim": index.dim, "dtype": index.meta["dtype"],
          "shards": len(index.shards), "bytes": total}


# --- Search ---------------------------------------------------------------------------------------

def excerpt(text, max_chars=200):
  """The start of a report on one line, cut at a word boundary, with "…" when shortened."""
  text = " ".join(str(text).split())
  if len(text) <= max_chars:
    return text
  cut = text[:max_chars].rsplit(" ", 1)[0] or text[:max_chars]
  return cut + "…"


def top_k_rows(scores, k):
  """Row indices of the k highest scores, best first (ties: lower row first); O(N + k log k)."""
  k = min(int(k), scores.shape[0])
  if k <= 0:
    return np.zeros((0,), np.int64)
  return score_pass_host.top_k(np.asarray(scores)[None], k)[0]


def query_vectors(index, query_embedding):
  """(B, D) float32 unit query rows from one vector or a batch; ValueError when unusable."""
  query = np.asarray(query_embedding, np.float32)
  if query.ndim == 1:
    query = query[None]
  if query.ndim != 2 or query.shape[1] != index.dim:
    raise ValueError(f"query embedding has shape {query.shape}; the index {index.directory} "
                     f"expects vectors of dimension {index.dim}")
  if not np.all(np.isfinite(query)):
    raise ValueError("query embedding contains NaN or Inf")
  return _unit_rows(query)


def exact_top_k(index, queries, k, against="image", only_with_report=False):
  """(rows (B, k'), scores (B, k')) of the best live rows for each unit query, best first
  (ties: lower row first), k' = min(k, candidates).

  Exhaustive, block by block over the memory-mapped shards, each block's best merged into a
  running top k, so memory stays at one block whatever the index size (and each block's pages
  are released after it is scored: see MappedRows). A few float16 queries are a matrix-vector
  product bound by memory bandwidth: faiss's scanner reads the mapped float16 bytes in place and
  converts them in SIMD registers (decoding to float32 first would move three times the bytes),
  its blocks spread over SCAN_THREADS. A batch is a matrix product bound by arithmetic: each block
  is converted once and multiplied by all queries (jax; float32 accumulation)."""
  queries = np.ascontiguousarray(queries, np.float32)     # faiss reads the rows by pointer
  batch = queries.shape[0]
  k = min(int(k), index.n)
  scan = _scannable(index, batch)
  blocks = _live_blocks(index, against, only_with_report, SCAN_ROWS if scan else GEMM_ROWS)
  if k < 1:
    found = ()
  elif scan:
    score = lambda block: _scan_block(block, queries, k, against)
    found = _scan_pool(SCAN_THREADS).map(score, blocks)
  else:
    found = (_gemm_block(block, queries, k, against) for block in blocks)
  best_rows = np.zeros((batch, 0), np.int64)
  best_scores = np.zeros((batch, 0), np.float32)
  for rows, scores in found:
    best_rows, best_scores = _merge(best_rows, best_scores, rows, scores, k)
  live = np.isfinite(best_scores)
  count = int(live.all(axis=0).sum()) if best_scores.size else 0
  return best_rows[:, :count], best_scores[:, :count]


class _Block(NamedTuple):
  shard: Shard
  start: int              # local rows [start, stop) of the shard
  stop: int
  keep: np.ndarray        # (stop - start,) bool: rows that may be results


def _live_blocks(index, against, only_with_report, rows_per_block):
  """The blocks of every shard that hold a row that may be a result, in row order."""
  for shard in index.shards:
    for start in range(0, shard.gallery(against).shape[0], rows_per_block):
      stop = min(start + rows_per_block, shard.gallery(against).shape[0])
      keep = shard.global_rows[start:stop] >= 0
      if only_with_report:
        keep &= shard.has_report[start:stop]
      if keep.any():
        yield _Block(shard, start, stop, keep)


def _global(block, local, scores):
  """Block-local candidates as index rows; a missing one (local -1, or a score of -inf: a dead
  or padding row) is row -1, -inf."""
  valid = (local >= 0) & np.isfinite(scores)
  rows = np.where(valid, block.shard.global_rows[block.start + np.where(valid, local, 0)], -1)
  return rows, np.where(valid, scores, -np.inf).astype(np.float32)


def _scannable(index, batch):
  return batch <= SCAN_MAX_QUERIES and index.meta["dtype"] == "float16" and (
      _half_quantizer(index.dim) is not None)


def _scan_block(block, queries, k, against):
  """A float16 block's best kept rows per query by faiss's scanner over the mapped bytes (no
  copy); dead rows are skipped by a bitmap selector."""
  import faiss  # pylint: disable=import-outside-toplevel
  codes = block.shard.gallery(against)[block.start:block.stop]
  selector = None
  if not block.keep.all():
    selector = faiss.IDSelectorBitmap(np.packbits(block.keep, bitorder="little"))
  scanner = _half_quantizer(queries.shape[1]).select_InvertedListScanner(
      faiss.METRIC_INNER_PRODUCT, None, True, selector, False)
  scanner.list_no = 0           # with store_pairs, a label is (list_no << 32) | local row
  k = min(k, codes.shape[0])
  scores = np.full((queries.shape[0], k), -np.inf, np.float32)
  local = np.full((queries.shape[0], k), -1, np.int64)
  pointer = faiss.swig_ptr(codes.reshape(-1).view(np.uint8))
  for q, query in enumerate(queries):
    scanner.set_query(faiss.swig_ptr(query))
    scanner.scan_codes(codes.shape[0], pointer, None, faiss.swig_ptr(scores[q]),
                       faiss.swig_ptr(local[q]), k)
  block.shard.release(against, block.start, block.stop)
  return _global(block, local, scores)


def _gemm_block(block, queries, k, against):
  """A block's best kept rows per query by one matrix product; the block is padded to
  GEMM_ROWS rows so that one compiled shape serves every block of every shard."""
  codes = block.shard.gallery(against)[block.start:block.stop]
  keep = block.keep
  if codes.shape[0] < GEMM_ROWS:
    codes = np.concatenate([codes, np.zeros((GEMM_ROWS - codes.shape[0], codes.shape[1]),
                                            codes.dtype)])
    keep = np.concatenate([keep, np.zeros((GEMM_ROWS - keep.shape[0],), bool)])
  scores, local = _block_top_k(queries, codes, keep, min(k, GEMM_ROWS))
  block.shard.release(against, block.start, block.stop)
  return _global(block, np.asarray(local, np.int64), np.asarray(scores))


@functools.partial(jax.jit, static_argnames="k")
def _block_top_k(queries, codes, keep, k):
  scores = jnp.matmul(queries, codes.astype(jnp.float32).T, precision=jax.lax.Precision.HIGHEST)
  return jax.lax.top_k(jnp.where(keep, scores, -jnp.inf), k)   # ties: lower index first


@functools.lru_cache(maxsize=None)
def _scan_pool(threads):
  """The threads that scan blocks (faiss releases the GIL while scanning), made on first use."""
  return concurrent.futures.ThreadPoolExecutor(threads, "exact-scan")


@functools.lru_cache(maxsize=8)
def _half_quantizer(dim):
  """faiss's float16 scalar quantizer: its codes are float16 bytes (None without faiss)."""
  try:
    import faiss  # pylint: disable=import-outside-toplevel
  except ImportError:
    return None
  return faiss.ScalarQuantizer(dim, faiss.ScalarQuantizer.QT_fp16)


def as_float32(block):
  """A (rows, D) float16 or float32 block as float32 (the same values as numpy's cast; faiss's
  decoder when present, faster than numpy's scalar cast)."""
  if block.dtype == np.float16 and block.shape[0]:
    decoder = _half_quantizer(block.shape[1])
    if decoder is not None:
      return decoder.decode(np.ascontiguousarray(block).view(np.uint8))
  return np.asarray(block, np.float32)


def _merge(rows_a, scores_a, rows_b, scores_b, k):
  """The top k (by score, then lower row) of two candidate sets, per query."""
  rows = np.concatenate([rows_a, rows_b], axis=1)
  scores = np.concatenate([scores_a, scores_b], axis=1)
  by_row = np.argsort(rows, axis=1, kind="stable")   # then "lower position" is "lower row"
  rows, scores = np.take_along_axis(rows, by_row, axis=1), np.take_along_axis(scores, by_row, axis=1)
  best = score_pass_host.top_k(scores, min(k, scores.shape[1]))
  return np.take_along_axis(rows, best, axis=1), np.take_along_axis(scores, best, axis=1)


def results_of(index, rows, scores, excerpt_chars=200):
  return [SearchResult(rank=i + 1, study_id=index.study_id(int(row)), score=float(score),
                       excerpt=excerpt(index.field(int(row), "report"), excerpt_chars),
                       source_path=str(index.field(int(row), "source_path")), row=int(row))
          for i, (row, score) in enumerate(zip(rows, scores))]


def search(index, query_embedding, top_k=10, against="image", excerpt_chars=200,
           only_with_report=False):
  """Ranks the index's studies for one query embedding by cosine similarity (exact).

  against="image": compare with the image embeddings (a text or keyword query finds studies);
  "text": compare with the report embeddings (a volume query finds reports).
  Returns up to top_k SearchResult, best first (top_k larger than N returns all N).
  """
  if against not in TARGETS:
    raise ValueError(f"against must be one of {TARGETS}, got {against!r}")
  if top_k < 1:
    raise ValueError(f"top_k must be at least 1, got {top_k}")
  queries = query_vectors(index, query_embedding)
  if queries.shape[0] != 1:
    raise ValueError(f"search takes one query; use exact_top_k for a batch of {len(queries)}")
  rows, scores = exact_top_k(index, queries, top_k, against, only_with_report)
  return results_of(index, rows[0], scores[0], excerpt_chars)

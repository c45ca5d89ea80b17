"""Interchange files: `embeddings.npz` (paired embeddings, from this or any other system) and
`metrics.json`, with validation that names the file and field of every problem. Formats only:
computing metrics is metrics.py's job, writing an evaluation's files the commands'.

embeddings.npz — a numpy .npz archive (np.savez; strings as unicode arrays, no pickled objects):
  image_embeddings    (N, D) float   image (CT volume) embedding of study i
  text_embeddings     (N, D) float   report embedding of study i: row i is paired with image row i
  study_ids           (N,)   str     unique study identifiers, in row order
  reports             (N,)   str     optional: report texts (keyword relevance is derived from them)
  source_paths        (N,)   str     optional: volume file of each study, relative to the data root
  keywords            (Q,)   str     optional: keyword queries, e.g. "atelectasis"
  keyword_embeddings  (Q, D) float   with keywords: the text embedding of each keyword query
  keyword_relevance   (Q, N) bool    optional with keywords: relevance labels; without it they come
                                     from `reports` via findings.keyword_relevance (negation-aware)
  scan_ids            (N,)   str     optional: the scan each volume is a reconstruction of (CT-RATE);
                                     the "scan" gallery merges the rows of one scan
  labels              (N, L) 0/1     optional: finding labels per study (zero-shot classification,
                                     volume->volume relevance)
  label_names         (L,)   str     with labels or prompt_embeddings: the finding of each column
  prompt_embeddings   (L, 2, D) float  optional: text embeddings of each label's positive and
                                     negative prompt (after any ensembling)
  label_thresholds    (L,)   float   optional: each label's operating point on P(present), chosen
                                     on a validation split (NaN: none); without it, Youden's J on
                                     this file's own scores
  logit_scale         ()     float   optional: the model's similarity scale (inverse temperature)
                                     for P(present); default 1
All embeddings must be finite; they need not be normalized (metrics L2-normalize them).

metrics.json — metrics.embedding_metrics's dict (+ "keywords" when keyword queries are present,
+ "embeddings": the source file), R@K and P@K in percent, ranks 1-based:
  {"t2i": {"R@1", "R@5", "R@10", "MdR", "MnR"}, "i2t": {...}, "n": N,
   "chance": {...}, "ties": {...}, "ci": {"level", "samples", "seed", "t2i": {m: [lo, hi]}, ...},
   "keywords": {kw: {"P@20", "P@50", "P@100", "n_relevant", "chance", "ci"}},
   "gallery": {"unit": "volume" | "scan", "size"},
   "volume_retrieval": {"P@K", "MAP@K", "Jaccard@K", "n_queries", "gallery", ...},
   "zeroshot": {label: {"AUROC", "AUPRC", "F1", "accuracy", "sensitivity", "specificity",
                "threshold", "n_positive", "prevalence", "ci"}, "macro": {...},
                "weighted": {...}, ...}}   (AUROC and AUPRC are fractions in [0, 1])
"""

import dataclasses
import json
import os
import tempfile
import zipfile
import zlib
from typing import Optional

import numpy as np

from medfinder_jax import errors

REQUIRED_FIELDS = ("image_embeddings", "text_embeddings", "study_ids")
OPTIONAL_FIELDS = ("reports", "source_paths", "keywords", "keyword_embeddings",
                   "keyword_relevance", "scan_ids", "labels", "label_names", "prompt_embeddings",
                   "label_thresholds", "logit_scale")


class InterchangeError(errors.UserError):
  """A file that cannot be used as given; the message names the file, field and the fix."""


class PairedEmbeddings:
  """Shape accessors shared by the dataclasses that hold paired (N, D) image/text embeddings."""

  @property
  def n(self):
    return int(self.image_embeddings.shape[0])

  @property
  def dim(self):
    return int(self.image_embeddings.shape[1])


@dataclasses.dataclass
class EmbeddingSet(PairedEmbeddings):
  """The contents of an embeddings.npz (see the module docstring for shapes and meaning)."""
  image_embeddings: np.ndarray
  text_embeddings: np.ndarray
  study_ids: np.ndarray
  reports: Optional[np.ndarray] = None
  source_paths: Optional[np.ndarray] = None
  keywords: Optional[np.ndarray] = None
  keyword_embeddings: Optional[np.ndarray] = None
  keyword_relevance: Optional[np.ndarray] = None
  scan_ids: Optional[np.ndarray] = None
  labels: Optional[np.ndarray] = None
  label_names: Optional[np.ndarray] = None
  prompt_embeddings: Optional[np.ndarray] = None
  label_thresholds: Optional[np.ndarray] = None
  logit_scale: Optional[np.ndarray] = None

  def fields(self):
    """{name: array} of the fields that are present."""
    return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
            if getattr(self, f.name) is not None}


# --- Validation -----------------------------------------------------------------------------------

def _fail(path, field, problem):
  where = f"{path}: field {field!r}" if field else f"{path}"
  raise InterchangeError(f"{where}: {problem}")


def _check_matrix(path, field, array, rows=None, dim=None):
  """A finite (rows, dim) float matrix, returned as float32."""
  if array.ndim != 2:
    _fail(path, field, f"expected a 2-D (N, D) array, found shape {array.shape}")
  if not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)):
    _fail(path, field, f"expected float values, found dtype {array.dtype}")
  if rows is not None and array.shape[0] != rows:
    _fail(path, field, f"has {array.shape[0]} rows, expected {rows} (one per study, paired "
                       f"row by row with image_embeddings)")
  if dim is not None and array.shape[1] != dim:
    _fail(path, field, f"has dimension D={array.shape[1]}, expected D={dim} like "
                       f"image_embeddings")
  if array.shape[0] == 0 or array.shape[1] == 0:
    _fail(path, field, f"is empty (shape {array.shape})")
  array = np.asarray(array, np.float32)
  bad = np.flatnonzero(~np.all(np.isfinite(array), axis=1))
  if bad.size:
    shown = ", ".join(map(str, bad[:5])) + (", ..." if bad.size > 5 else "")
    _fail(path, field, f"{bad.size} row(s) contain NaN or Inf (rows {shown}); "
                       f"all embeddings must be finite")
  return array


def _check_strings(path, field, array, rows):
  if array.ndim != 1 or array.shape[0] != rows:
    _fail(path, field, f"expected {rows} strings (shape ({rows},)), found shape {array.shape}")
  if array.dtype.kind not in "US":
    _fail(path, field, f"expected strings (a unicode array, e.g. np.array(values, dtype=str)), "
                       f"found dtype {array.dtype}")
  if array.dtype.kind == "S":   # bytes: they must be UTF-8 text
    for row, value in enumerate(array):
      try:
        value.decode("utf-8")
      except UnicodeDecodeError as err:
        _fail(path, field, f"row {row} is not UTF-8 text ({err.reason} at byte {err.start}); "
                           f"store strings as a unicode array (np.array(values, dtype=str))")
    return np.char.decode(array, "utf-8").astype(str)
  return array.astype(str)


def _check_unique_ids(path, ids):
  values, first, counts = np.unique(ids, return_index=True, return_counts=True)
  if np.any(counts > 1):
    dup = values[counts > 1][0]
    rows = np.flatnonzero(ids == dup)[:3].tolist()
    _fail(path, "study_ids", f"{int(np.sum(counts > 1))} id(s) appear more than once, e.g. "
                             f"{dup!r} at rows {rows}; each study must appear exactly once")


def validate(fields, path="<arrays>"):
  """An EmbeddingSet from a {name: array} mapping, or InterchangeError naming path and field."""
  missing = [f for f in REQUIRED_FIELDS if f not in fields]
  if missing:
    _fail(path, None, f"missing required field(s) {missing}; found {sorted(fields)}; "
                      f"expected {list(REQUIRED_FIELDS)} (+ optional {list(OPTIONAL_FIELDS)})")
  arrays = {k: np.asarray(v) for k, v in fields.items()}
  image = _check_matrix(path, "image_embeddings", arrays["image_embeddings"])
  n, dim = image.shape
  out = {"image_embeddings": image,
         "text_embeddings": _check_matrix(path, "text_embeddings", arrays["text_embeddings"],
                                          rows=n, dim=dim),
         "study_ids": _check_strings(path, "study_ids", arrays["study_ids"], n)}
  _check_unique_ids(path, out["study_ids"])
  for field in ("reports", "source_paths", "scan_ids"):
    if field in arrays:
      out[field] = _check_strings(path, field, arrays[field], n)
  out.update(_validate_keywords(path, arrays, n, dim, has_reports="reports" in out))
  out.update(_validate_labels(path, arrays, n, dim))
  return EmbeddingSet(**out)


def _validate_labels(path, arrays, n, dim):
  """labels, label_names, prompt_embeddings, label_thresholds, logit_scale, checked together."""
  out = {}
  needs_names = [f for f in ("labels", "prompt_embeddings", "label_thresholds") if f in arrays]
  if needs_names and "label_names" not in arrays:
    _fail(path, None, f"found {needs_names} but no 'label_names' (L strings naming the finding "
                      f"of each label column)")
  if "label_names" in arrays:
    names = arrays["label_names"]
    if names.ndim != 1 or names.shape[0] == 0:
      _fail(path, "label_names", f"expected a 1-D array of L >= 1 strings, found shape "
                                 f"{names.shape}")
    out["label_names"] = _check_strings(path, "label_names", names, names.shape[0])
    num_labels = names.shape[0]
  if "labels" in arrays:
    labels = arrays["labels"]
    if labels.shape != (n, num_labels) or labels.dtype.kind not in "bui" or (
        labels.size and not np.all((labels == 0) | (labels == 1))):
      _fail(path, "labels", f"expected an ({n}, {num_labels}) array of 0/1 (study x label), "
                            f"found shape {labels.shape} dtype {labels.dtype}")
    out["labels"] = labels.astype(np.int8)
  if "prompt_embeddings" in arrays:
    prompts = arrays["prompt_embeddings"]
    if prompts.shape != (num_labels, 2, dim):
      _fail(path, "prompt_embeddings", f"expected shape ({num_labels}, 2, {dim}) (label x "
                                       f"positive/negative x D), found {prompts.shape}")
    out["prompt_embeddings"] = _check_matrix(path, "prompt_embeddings",
                                             prompts.reshape(-1, dim)).reshape(prompts.shape)
  if "label_thresholds" in arrays:
    thresholds = arrays["label_thresholds"]
    if thresholds.shape != (num_labels,) or thresholds.dtype.kind != "f":
      _fail(path, "label_thresholds", f"expected ({num_labels},) floats, found shape "
                                      f"{thresholds.shape} dtype {thresholds.dtype}")
    out["label_thresholds"] = thresholds.astype(np.float32)
  if "logit_scale" in arrays:
    scale = arrays["logit_scale"]
    if scale.shape != () or scale.dtype.kind not in "fi" or not np.isfinite(scale) or scale <= 0:
      _fail(path, "logit_scale", f"expected one positive number (the similarity scale), found "
                                 f"{scale!r}")
    out["logit_scale"] = np.asarray(scale, np.float32)
  return out


def _validate_keywords(path, arrays, n, dim, has_reports):
  present = [f for f in ("keywords", "keyword_embeddings", "keyword_relevance") if f in arrays]
  if not present:
    return {}
  if "keywords" not in arrays or "keyword_embeddings" not in arrays:
    _fail(path, None, f"found {present} but keyword retrieval needs both 'keywords' (Q strings) "
                      f"and 'keyword_embeddings' (Q, D)")
  keywords = arrays["keywords"]
  if keywords.ndim != 1:
    _fail(path, "keywords", f"expected a 1-D array of strings, found shape {keywords.shape}")
  q = keywords.shape[0]
  out = {"keywords": _check_strings(path, "keywords", keywords, q),
         "keyword_embeddings": _check_matrix(path, "keyword_embeddings",
                                             arrays["keyword_embeddings"], rows=q, dim=dim)}
  if "keyword_relevance" in arrays:
    relevance = arrays["keyword_relevance"]
    if relevance.shape != (q, n) or relevance.dtype.kind not in "bui":
      _fail(path, "keyword_relevance", f"expected a ({q}, {n}) bool array (keyword x study), "
                                       f"found shape {relevance.shape} dtype {relevance.dtype}")
    out["keyword_relevance"] = relevance.astype(bool)
  elif not has_reports:
    _fail(path, None, "keyword queries need relevance labels: add 'reports' (N strings) or "
                      "'keyword_relevance' (Q, N bool)")
  return out


# --- embeddings.npz -------------------------------------------------------------------------------

def load_embeddings(path, max_bytes=None):
  """Reads and validates an embeddings.npz; InterchangeError for any problem, naming the field.

  Only the known fields are read (other members are ignored unread), and each one's declared
  size is checked against the bytes the archive holds for it, and against `max_bytes` (default:
  half this machine's memory), before anything is allocated.
  """
  if not os.path.isfile(path):
    _fail(path, None, "no such file (expected an embeddings .npz archive)")
  limit = _memory_budget() if max_bytes is None else int(max_bytes)
  try:
    with zipfile.ZipFile(path) as archive:
      members = {name[:-len(".npy")]: archive.getinfo(name) for name in archive.namelist()
                 if name.endswith(".npy")}
      if not members:
        _fail(path, None, f"holds no .npy arrays; expected an .npz archive with fields "
                          f"{list(REQUIRED_FIELDS)}")
      fields = {name: _read_member(path, archive, members[name], name, limit)
                for name in REQUIRED_FIELDS + OPTIONAL_FIELDS if name in members}
  except zipfile.BadZipFile as err:
    _fail(path, None, f"not a readable .npz archive ({err}); a single .npy array or another "
                      f"file? expected an .npz archive with fields {list(REQUIRED_FIELDS)}")
  except OSError as err:
    _fail(path, None, f"cannot be read ({err.strerror or err})")
  return validate(fields, path)


def _read_member(path, archive, info, name, limit):
  """One .npy member as an array, after checking its header against its stored size."""
  try:
    with archive.open(info) as stream:
      version = np.lib.format.read_magic(stream)
      shape, fortran, dtype = (np.lib.format.read_array_header_1_0(stream) if version == (1, 0)
                               else np.lib.format.read_array_header_2_0(stream))
      if dtype.hasobject:
        _fail(path, name, "holds Python objects, which cannot be read without unpickling "
                          "(refused for safety); store strings as a unicode array "
                          "(np.array(values, dtype=str))")
      declared = int(np.prod(shape, dtype=np.float64)) * dtype.itemsize
      stored = info.file_size - stream.tell()
      if declared != stored:
        _fail(path, name, f"declares {shape} {dtype} ({declared} bytes) but the archive holds "
                          f"{stored} bytes for it: truncated or corrupt")
      if declared > limit:
        _fail(path, name, f"declares {shape} {dtype} ({declared / 2**30:.1f} GiB), more than "
                          f"the {limit / 2**30:.1f} GiB this reader allows (half this machine's "
                          f"memory)")
      flat = np.empty(declared // max(dtype.itemsize, 1), dtype)
      got = stream.readinto(flat.view(np.uint8)) if declared else 0
  except InterchangeError:
    raise
  except (ValueError, EOFError, zipfile.BadZipFile, zlib.error) as err:
    _fail(path, name, f"is truncated or corrupt ({err})")
  if got != declared:
    _fail(path, name, f"is truncated: {got} of {declared} bytes")
  return flat.reshape(shape, order="F" if fortran else "C")


def _memory_budget():
  """Half of this machine's physical memory, in bytes."""
  try:
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2
  except (ValueError, OSError):
    return 8 * 2**30


def _atomic_write(path, write):
  """Calls write(file) on a temporary file next to `path`, then renames it into place."""
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=os.path.basename(path))
  try:
    with os.fdopen(fd, "wb") as f:
      write(f)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def save_embeddings(path, embeddings):
  """Validates an EmbeddingSet (or {name: array}) and writes it as an .npz at exactly `path`."""
  if not isinstance(embeddings, EmbeddingSet):
    embeddings = validate(embeddings, path)
  else:
    embeddings = validate(embeddings.fields(), path)
  _atomic_write(path, lambda f: np.savez(f, **embeddings.fields()))
  return path


# --- metrics.json ---------------------------------------------------------------------------------

def json_safe(value, nonfinite_as_none=False):
  """JSON copy: tuples/arrays -> lists, numpy scalars -> python; non-finite floats -> None when
  asked (else kept, so that a strict json.dumps refuses them)."""
  if isinstance(value, dict):
    return {str(k): json_safe(v, nonfinite_as_none) for k, v in value.items()}
  if isinstance(value, (list, tuple, np.ndarray)):
    return [json_safe(v, nonfinite_as_none) for v in value]
  if isinstance(value, np.generic):
    value = value.item()
  if nonfinite_as_none and isinstance(value, float) and not np.isfinite(value):
    return None
  return value


def write_metrics_json(path, metrics):
  """Writes a metrics dict as strict JSON (no NaN; None for metrics that do not apply)."""
  text = json.dumps(json_safe(metrics), indent=2, allow_nan=False) + "\n"
  _atomic_write(path, lambda f: f.write(text.encode("utf-8")))
  return path


def read_metrics_json(path):
  try:
    with open(path, encoding="utf-8") as f:
      data = json.load(f)
  except (OSError, json.JSONDecodeError) as err:
    raise InterchangeError(f"{path}: not a readable metrics.json ({err})") from None
  for field in ("t2i", "i2t", "n"):
    if field not in data:
      raise InterchangeError(f"{path}: field {field!r} missing; expected a metrics.json with "
                             f"'t2i', 'i2t' and 'n'")
  return data

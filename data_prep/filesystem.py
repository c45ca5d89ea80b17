"""Paths on any file system Apache Beam supports (local, gs://, s3://, hdfs://): the corpus the
converter reads and the output it writes.

A local path (no scheme) goes through `os`, exactly as the converter always read and wrote, and
needs no Beam; a path with a scheme goes through apache_beam.io.filesystems.FileSystems, so that
the same converter (the local pool or the Beam pipeline of data_prep/beam_convert.py) reads a
corpus from a bucket and writes to one when apache-beam (requirements-beam.txt) is installed.

Reading: object stores have no folders, only names with '/' in them, so on a remote file system
a folder is a prefix with files under it (an empty one does not exist) and a listing is one
recursive listing of the prefix. Files are opened as stored (no decompression by extension:
data_prep/sources.py decodes a .nii.gz itself).

Writing: every write is atomic: a temporary name, then a rename, so a reader (and a rerun) sees
a file whole or not at all, and a retried write (a Beam bundle run twice) replaces a file with
the same bytes.
"""

import contextlib
import errno
import json
import logging
import os
import re
import shutil
import uuid

from medfinder_jax import errors

BEAM_REQUIREMENT = "pip install -r requirements-beam.txt"
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_CHUNK = 16 << 20
_EXTRAS = {"gs": "gcp", "s3": "aws", "azfs": "azure"}
_GLOB = re.compile(r"([\[*?])")


class BeamNotInstalled(errors.UserError):
  """apache-beam is needed (a Beam pipeline, or a path with a scheme) and is not installed."""


def require_beam(why):
  """The FileSystems class of apache-beam; BeamNotInstalled saying what to install if absent."""
  root = logging.getLogger()
  level = root.level
  root.setLevel(logging.ERROR)      # importing beam warns "apitools not found" (BigQuery: unused)
  try:
    from apache_beam.io import filesystems  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise BeamNotInstalled(f"{why} needs apache-beam, which is not installed: "
                           f"{BEAM_REQUIREMENT}") from None
  finally:
    root.setLevel(level)
  return filesystems.FileSystems


def is_remote(path):
  """Whether `path` names a file system by its scheme (gs://, s3://, ...), not a local path."""
  return bool(_SCHEME.match(str(path)))


def _fs(path):
  """The Beam FileSystem of `path`; BeamNotInstalled naming what to install when Beam or the
  file system's extra (apache-beam[gcp] for gs://, [aws] for s3://) is missing."""
  file_systems = require_beam(f"the path {path!r}")
  try:
    return file_systems.get_filesystem(path)
  except ValueError:
    scheme = str(path).split("://", 1)[0]
    extra = _EXTRAS.get(scheme)
    hint = f'pip install "apache-beam[{extra}]"' if extra else "the Beam extra that provides it"
    raise BeamNotInstalled(f"the path {path!r}: no Beam file system for {scheme}:// is "
                           f"installed; install {hint}") from None


def join(base, *parts):
  """`base`/`parts`, with the separator of the file system `base` is on."""
  if is_remote(base):
    return "/".join([str(base).rstrip("/"), *parts])
  return os.path.join(base, *parts)


def makedirs(path):
  """Creates `path` and its parents (object stores have no folders: nothing to do there)."""
  if not is_remote(path):
    os.makedirs(path, exist_ok=True)
    return
  fs = _fs(path)
  if not fs.exists(path):
    with contextlib.suppress(IOError):     # GCS, S3: folders are implicit
      fs.mkdirs(path)


def size(path):
  """The bytes of the regular file `path`, or None if there is none."""
  if not is_remote(path):
    return os.path.getsize(path) if os.path.isfile(path) else None
  try:
    return _fs(path).metadata(path).size_in_bytes
  except IOError:
    return None


# --- Reading --------------------------------------------------------------------------------------

def open_read(path):
  """`path` opened for reading bytes, as stored (a .gz is not decompressed). OSError when it
  cannot be opened (FileNotFoundError when there is no such file)."""
  if not is_remote(path):
    return open(path, "rb")
  from apache_beam.io.filesystem import CompressionTypes  # pylint: disable=import-outside-toplevel
  fs = _fs(path)
  if not fs.exists(path):
    raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), path)
  return fs.open(path, compression_type=CompressionTypes.UNCOMPRESSED)


def read_bytes(path):
  """Every byte of the file `path` (OSError as open_read)."""
  with open_read(path) as file:
    return file.read()


def absolute(path):
  """`path` as it names its place from anywhere: absolute locally, as it is with a scheme."""
  return str(path) if is_remote(path) else os.path.abspath(path)


def isabs(path):
  """Whether `path` names its place on its own: a path with a scheme, or an absolute one."""
  return is_remote(path) or os.path.isabs(path)


def isdir(path):
  """Whether `path` is a folder (remote: a prefix with at least one file under it)."""
  if not is_remote(path):
    return os.path.isdir(path)
  return bool(_match(path, _pattern_of(_prefix(path)) + "**", limit=1))


def isfile(path):
  """Whether `path` is a file (locally a regular file or a link to one)."""
  if not is_remote(path):
    return os.path.isfile(path)
  return _fs(path).exists(path) and not isdir(path)


def exists(path):
  """Whether `path` is a file or a folder."""
  if not is_remote(path):
    return os.path.exists(path)
  return _fs(path).exists(path) or isdir(path)


def listdir(path):
  """The names of the files and folders directly in the folder `path` (remote: sorted; [] for
  a prefix with nothing under it)."""
  if not is_remote(path):
    return os.listdir(path)
  return sorted({name.split("/", 1)[0] for name in _listing(path)})


def files_in(folder):
  """[(name, bytes)] of the regular files directly in `folder`, sorted by name."""
  if not is_remote(folder):
    with os.scandir(folder) as entries:
      return sorted((e.name, e.stat().st_size) for e in entries if e.is_file())
  return sorted((name, size) for name, size in _listing(folder).items() if "/" not in name)


def walk(top):
  """os.walk(top) for any file system: (folder, [subfolder names], [file names]) top-down;
  sorting or pruning the subfolder list in place steers the walk, as with os.walk."""
  if not is_remote(top):
    yield from os.walk(top)
    return
  tree = {}
  for name in _listing(top):
    *parents, leaf = name.split("/")
    node = tree
    for parent in parents:
      node = node.setdefault(parent, {})
    node[leaf] = None
  yield from _walk_tree(str(top).rstrip("/"), tree)


def _walk_tree(folder, tree):
  dirs = sorted(name for name, node in tree.items() if node is not None)
  files = sorted(name for name, node in tree.items() if node is None)
  yield folder, dirs, files
  for name in dirs:
    yield from _walk_tree(join(folder, name), tree[name])


def relpath(path, start):
  """`path` relative to its folder `start`, with '/' separators."""
  if not is_remote(path):
    return os.path.relpath(path, start).replace(os.sep, "/")
  prefix = _prefix(start)
  if not str(path).startswith(prefix):
    raise ValueError(f"{path!r} is not under {start!r}")
  return str(path)[len(prefix):]


def _prefix(folder):
  return str(folder).rstrip("/") + "/"


def _pattern_of(path):
  """`path` as a Beam match pattern that matches only itself ([, *, ? as one-character sets)."""
  return _GLOB.sub(r"[\1]", str(path))


def _match(path, pattern, limit=None):
  """FileMetadata of the files matching the Beam glob `pattern` on the file system of `path`."""
  return _fs(path).match([pattern], limits=[limit])[0].metadata_list


def _listing(folder):
  """{path relative to `folder`: bytes} of every file under the remote `folder` (one recursive
  listing; placeholder objects of folder consoles, names ending in '/', left out)."""
  prefix = _prefix(folder)
  found = _match(folder, _pattern_of(prefix) + "**")
  return {f.path[len(prefix):]: f.size_in_bytes for f in found
          if f.path.startswith(prefix) and not f.path.endswith("/")}


# --- Writing --------------------------------------------------------------------------------------

def read_json(path):
  """The JSON value in `path`, or None if it is missing or not JSON."""
  try:
    if not is_remote(path):
      with open(path, encoding="utf-8") as file:
        return json.load(file)
    with _fs(path).open(path) as file:
      return json.loads(file.read().decode("utf-8"))
  except (OSError, ValueError):
    return None


def write_json_atomic(path, value):
  """Writes `value` as JSON to `path` via a temporary name (OSError when it cannot)."""
  data = (json.dumps(value, indent=1, sort_keys=True, ensure_ascii=False) + "\n").encode()
  tmp = f"{path}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
  if not is_remote(path):
    try:
      with open(tmp, "wb") as file:
        file.write(data)
      os.replace(tmp, path)
    except OSError:
      remove_quietly(tmp)
      raise
    return
  fs = _fs(path)
  with fs.create(tmp) as file:
    file.write(data)
  fs.rename([tmp], [path])


def publish(local_tmp, path, staging_dir):
  """Moves the complete local file `local_tmp` to `path` atomically: a rename on a local disk;
  elsewhere a copy to a temporary name in `staging_dir` (same file system as `path`), then a
  rename. OSError (or Beam's IOError) when it fails; the partial copy is removed."""
  if not is_remote(path):
    os.replace(local_tmp, path)
    return
  fs = _fs(path)
  staged = join(staging_dir, f"{os.path.basename(local_tmp)}.{uuid.uuid4().hex[:8]}")
  try:
    with open(local_tmp, "rb") as source, fs.create(staged) as target:
      shutil.copyfileobj(source, target, _CHUNK)
    if fs.exists(path):                  # some file systems refuse to rename onto a file
      fs.delete([path])
    fs.rename([staged], [path])
  except BaseException:
    with contextlib.suppress(Exception):
      fs.delete([staged])
    raise
  remove_quietly(local_tmp)


def empty_dir(path):
  """Removes what `path` holds (an interrupted run's temporary files) and recreates it."""
  if not is_remote(path):
    shutil.rmtree(path, ignore_errors=True)
    os.makedirs(path)
    return
  fs = _fs(path)
  found = fs.match([join(path, "*")])[0].metadata_list
  if found:
    fs.delete([f.path for f in found])
  makedirs(path)


def remove_quietly(path):
  with contextlib.suppress(OSError):
    os.remove(path)

"""The converter's output on any file system Apache Beam supports (local, gs://, s3://, hdfs://).

A local path (no scheme) goes through `os`, exactly as the converter always wrote; a path with
a scheme goes through apache_beam.io.filesystems.FileSystems, so that the same converter (the
local pool or the Beam pipeline of data_prep/beam_convert.py) writes to a bucket when
apache-beam (requirements-beam.txt) is installed. Every write is atomic: a temporary name, then
a rename, so a reader (and a rerun) sees a file whole or not at all, and a retried write (a Beam
bundle run twice) replaces a file with the same bytes.
"""

import contextlib
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
  return require_beam(f"the path {path!r}")


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
    found = _fs(path).match([path])[0].metadata_list
  except IOError:
    return None
  return found[0].size_in_bytes if found else None


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

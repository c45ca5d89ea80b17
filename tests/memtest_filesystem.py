"""A test-only Beam file system: `memtest://<path>` is $MEMTEST_ROOT/<path> on the local disk.

Importing this module registers it (Beam picks a file system by its scheme among the
FileSystem subclasses defined in the process). No `os` call can see a memtest:// path, so a
reader that goes around data_prep/filesystem.py fails to find its file: a conversion from
memtest:// that equals the local one shows every read went through the layer. Worker processes
(the local pool's spawned workers, the DirectRunner's) import it by unpickling `convert_study`
below, and find the root in the environment they inherit.
"""

import os

from apache_beam.io import filesystem as beam_filesystem
from apache_beam.io import localfilesystem

from data_prep import convert

SCHEME = "memtest"
ROOT_VARIABLE = "MEMTEST_ROOT"


def url(local_path):
  """The memtest:// name of `local_path` (under $MEMTEST_ROOT)."""
  relative = os.path.relpath(local_path, os.environ[ROOT_VARIABLE])
  return f"{SCHEME}://{relative.replace(os.sep, '/')}"


def convert_study(study):
  """convert.convert_study, importable by name: a worker that unpickles it imports this module,
  and with it the memtest:// file system."""
  return convert.convert_study(study)


_DISK = localfilesystem.LocalFileSystem(None)


class MemtestFileSystem(localfilesystem.LocalFileSystem):
  """LocalFileSystem with memtest:// names: every path in and out is translated, and the work
  done by a plain LocalFileSystem (whose own calls then see local paths only)."""

  @classmethod
  def scheme(cls):
    return SCHEME

  @staticmethod
  def _local(path):
    prefix = f"{SCHEME}://"
    if not path.startswith(prefix):
      raise ValueError(f"not a {prefix} path: {path!r}")
    return os.path.join(os.environ[ROOT_VARIABLE], path[len(prefix):])

  def _meta(self, meta):
    return beam_filesystem.FileMetadata(url(meta.path), meta.size_in_bytes,
                                        meta.last_updated_in_seconds)

  def join(self, basepath, *paths):
    return "/".join([basepath.rstrip("/"), *paths])

  def split(self, path):
    head, _, tail = path.rstrip("/").rpartition("/")
    return head, tail

  def _url_dirname(self, url_or_path):
    return beam_filesystem.FileSystem._url_dirname(self, url_or_path)

  def mkdirs(self, path):
    _DISK.mkdirs(self._local(path))

  def _list(self, dir_or_prefix):
    for meta in _DISK._list(self._local(dir_or_prefix)):
      yield self._meta(meta)

  def create(self, path, *args, **kwargs):
    return _DISK.create(self._local(path), *args, **kwargs)

  def open(self, path, *args, **kwargs):
    return _DISK.open(self._local(path), *args, **kwargs)

  def copy(self, source_file_names, destination_file_names):
    _DISK.copy([self._local(p) for p in source_file_names],
                 [self._local(p) for p in destination_file_names])

  def rename(self, source_file_names, destination_file_names):
    _DISK.rename([self._local(p) for p in source_file_names],
                   [self._local(p) for p in destination_file_names])

  def exists(self, path):
    return _DISK.exists(self._local(path))

  def size(self, path):
    return _DISK.size(self._local(path))

  def last_updated(self, path):
    return _DISK.last_updated(self._local(path))

  def checksum(self, path):
    return _DISK.checksum(self._local(path))

  def metadata(self, path):
    return self._meta(_DISK.metadata(self._local(path)))

  def delete(self, paths):
    _DISK.delete([self._local(p) for p in paths])

"""`launch.py embed`: a search index of a converted split, or of a folder of NIfTI files.

A split is embedded as `launch.py eval` embeds it (evaluate.embed_split); its volumes are what
conversion made, so the index records the dataset's preprocessing for volume queries. A folder
of NIfTI files (study id = the file's path under the folder, an optional report <name>.txt
beside <name>.nii.gz) is preprocessed exactly as at conversion, with the preprocessing the
model records (ours), or that of the dataset named with --tfrecord_dir (a released-code file,
which records none). Unreadable files are skipped and listed, on every process count: each
process reads only its own rows of each global batch and the skip reasons are gathered.

Each run writes one shard (index.py): a new index, or with --append one more shard of an
existing one (created when absent, so runs on many hosts can each add theirs); a study id the
index holds already is an error unless --replace. Thumbnails (thumbnails.py) are rendered from
the record volumes the model embedded.
"""

import os

import jax
import numpy as np

from data_prep import corpus_base
from data_prep import preprocess
from data_prep import sources
from medfinder_jax import distributed
from medfinder_jax import encode
from medfinder_jax import errors
from medfinder_jax import evaluate
from medfinder_jax import index as index_lib
from medfinder_jax import input_pipeline
from medfinder_jax import interchange
from medfinder_jax import loading
from medfinder_jax import logging as logging_lib
from medfinder_jax import sharding
from medfinder_jax import thumbnails
from medfinder_jax.commands import eval as eval_command

REPORT_SUFFIX = ".txt"          # optional report beside a volume: <name>.txt for <name>.nii.gz
_REASON_BYTES = 240             # skip reasons travel between processes as fixed-width UTF-8


class EmbedError(errors.UserError):
  """The embed command cannot run as asked (no source, an empty folder)."""


def run(config, model_path, index_dir, *, split=None, volumes_dir=None, overwrite=False,
        append=False, replace=False, dtype="float16", log=None):
  """Writes the index (a new one, or with append/replace one more shard of an existing or
  absent index); returns {"index", "n", "skipped": [(file, reason)], "shard"} on process 0,
  else None."""
  log = log or eval_command.stderr_log
  if (split is None) == (volumes_dir is None):
    raise EmbedError("pass exactly one of --split (a converted dataset) or --volumes DIR")
  if dtype not in index_lib.DTYPES:
    raise EmbedError(f"--dtype {dtype!r}: expected one of {index_lib.DTYPES}")
  append = append or replace
  if append and overwrite:
    raise EmbedError("--append/--replace add to an index, --overwrite replaces it: pass one")
  index_lib.check_index_target(index_dir, overwrite, append)   # before the (long) embedding
  if split is not None:
    embeddings, record, skipped, thumbs = _embed_split(config, model_path, split, log)
  else:
    embeddings, record, skipped, thumbs = _embed_volume_folder(config, model_path, volumes_dir,
                                                               log)
  if not distributed.is_main_process():
    return None
  try:
    if append:
      shard = _append(index_dir, embeddings, record, thumbs, replace, dtype)
    else:
      index_lib.build_index(index_dir, embeddings, record, overwrite=overwrite, dtype=dtype,
                            thumbnails=thumbs)
      shard = None
  except OSError as err:
    raise index_lib.IndexFileError(f"{index_dir}: cannot write the index "
                                   f"({err.strerror or err})") from None
  return {"index": index_dir, "n": embeddings.n, "skipped": skipped, "shard": shard}


def _append(index_dir, embeddings, record, thumbs, replace, dtype):
  """One more shard; the index must have been built by the same model."""
  meta = index_lib.open_or_create(index_dir, embeddings.dim, record, dtype)
  differ = loading.identity_differences(meta["model"], record)
  if differ:
    raise EmbedError(f"{index_dir}: the index was built by another model ({', '.join(differ)} "
                     f"differ; index checkpoint {meta['model'].get('checkpoint') or '?'}, this "
                     f"one {record.get('checkpoint')}): embed into a new index")
  return index_lib.add_studies(index_dir, embeddings, thumbnails=thumbs, replace=replace)


def split_thumbnails(builder, spec, split, study_ids):
  """PNG thumbnails of a converted split's record volumes, in the order of `study_ids`."""
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  rendered = {}
  for example in tfds.as_numpy(builder.as_dataset(split=split, shuffle_files=False)):
    rendered[example["study_id"].decode()] = thumbnails.render(example["volume"],
                                                               spec.preprocess)
  return [rendered.get(str(s), b"") for s in study_ids]


def _embed_split(config, model_path, split, log):
  builder, spec = eval_command.open_split(config, model_path, split)
  mesh = sharding.make_mesh(config.mesh)
  loaded = loading.load_model(model_path, config, spec=spec, mesh=mesh)
  eval_command.log_notes(loaded.notes + [loaded.preprocessing_note(spec)], log)
  per_device = int(config.eval.batch_size_per_device)
  _, local_rows = sharding.batch_rows(per_device, mesh)
  total = input_pipeline.num_eval_batches(input_pipeline.split_files(builder, split), local_rows,
                                          jax.process_count())
  with logging_lib.progress_bar(total, desc=f"embed {split}", leave=False) as bar:
    embeddings = evaluate.embed_split(loaded.model, loaded.variables, builder, spec, split,
                                      loaded.tokenizer, mesh, per_device,
                                      progress=lambda done: bar.update(1))
  record = {**loaded.identity, "preprocess": spec.preprocess.to_dict(),   # the gallery's volumes
            "embedded_from": {"dataset": os.path.abspath(spec.directory), "split": split}}
  thumbs = (split_thumbnails(builder, spec, split, embeddings.study_ids)
            if distributed.is_main_process() else None)
  return embeddings, record, [], thumbs


# --- A folder of NIfTI files ----------------------------------------------------------------------

def list_volume_files(directory):
  """Relative paths ('/' separators) of the NIfTI files under `directory`, in natural order."""
  if not os.path.isdir(directory):
    raise EmbedError(f"--volumes {directory}: not a directory")
  found = []
  for root, dirs, files in os.walk(directory):
    dirs.sort()
    for name in files:
      if name.endswith(corpus_base.VOLUME_SUFFIXES):
        found.append(os.path.relpath(os.path.join(root, name), directory).replace(os.sep, "/"))
  if not found:
    raise EmbedError(f"--volumes {directory}: no .nii or .nii.gz files in it")
  return sorted(found, key=corpus_base.natural_key)


def read_report_beside(path):
  """The report of a volume from <name>.txt beside <name>.nii(.gz), or "" when there is none."""
  report_path = corpus_base.study_id_of(path) + REPORT_SUFFIX
  if not os.path.isfile(report_path):
    return ""
  with open(report_path, encoding="utf-8", errors="replace") as f:
    return f.read().strip()


def _embed_volume_folder(config, model_path, directory, log):
  files = list_volume_files(directory)
  mesh = sharding.make_mesh(config.mesh)
  named = input_pipeline.resolve_dataset_dir(config.data, required=False)
  spec = None   # a released-code file takes the named dataset's preprocessing; ours its own
  if named and loading.model_kind(model_path) == "released":
    spec = input_pipeline.open_dataset(named)[1]
  loaded = loading.load_model(model_path, config, spec=spec, mesh=mesh)
  eval_command.log_notes(loaded.notes, log)
  paths = [os.path.join(directory, f) for f in files]
  image, ok, reasons, pixels = _embed_files(loaded, paths, mesh,
                                            int(config.eval.batch_size_per_device),
                                            config.data.get("max_volume_mib"))
  skipped = [(files[i], reasons[i]) for i in np.flatnonzero(~ok)]
  if not ok.any():
    raise EmbedError(f"--volumes {directory}: none of the {len(files)} files could be used; "
                     f"e.g. {skipped[0][0]}: {skipped[0][1]}")
  keep = np.flatnonzero(ok)
  reports = [read_report_beside(paths[i]) for i in keep]
  text = np.zeros_like(image[keep])
  with_report = [j for j, r in enumerate(reports) if r]
  if with_report:
    text[with_report] = encode.texts(loaded.model, loaded.variables, loaded.tokenizer,
                                     [reports[j] for j in with_report], mesh,
                                     config.eval.batch_size_per_device)
  embeddings = interchange.EmbeddingSet(
      image_embeddings=image[keep], text_embeddings=text,
      study_ids=np.asarray([corpus_base.study_id_of(files[i]) for i in keep], dtype=str),
      reports=np.asarray(reports, dtype=str),
      source_paths=np.asarray([files[i] for i in keep], dtype=str))
  record = {**loaded.identity, "embedded_from": {
      "volumes": os.path.abspath(directory), "files": len(files), "skipped": len(skipped)}}
  return embeddings, record, skipped, [thumbnails.png(pixels[i]) for i in keep]


def _embed_files(loaded, paths, mesh, batch_size_per_device, max_volume_mib=None):
  """Image embeddings of NIfTI files: (N, D) float32, ok (N,) bool, reasons (N,) str, and the
  thumbnail pixels (N, H, W) uint8 (thumbnails.panels).

  Each process preprocesses only its own rows of each global batch; unreadable files become
  masked rows with the reason (gathered so that every process knows all of them).
  """
  params = loaded.preprocess
  global_rows, local_rows = sharding.batch_rows(batch_size_per_device, mesh)
  first = jax.process_index() * local_rows
  images, ok, reasons, pixels = [], [], [], []
  panel = (thumbnails.PANEL, 3 * thumbnails.PANEL)
  for start in range(0, len(paths), global_rows):
    mine = paths[start + first:start + first + local_rows]
    volumes = np.zeros((local_rows, *params.shape), params.volume_dtype)
    status = np.zeros((local_rows,), bool)
    why = [""] * local_rows
    shown = np.zeros((local_rows, *panel), np.uint8)
    for row, path in enumerate(mine):
      try:
        volumes[row] = preprocess.volume_from_file(path, params, max_volume_mib)
        shown[row] = thumbnails.panels(volumes[row], params)
        status[row] = True
      except sources.BadVolume as err:
        why[row] = str(err).removeprefix(f"{path}: ")
    images.append(encode.volumes(loaded.model, loaded.variables, volumes, params.intensity,
                                 mesh))
    ok.append(sharding.gather_to_host(status))
    pixels.append(sharding.gather_to_host(shown))
    reasons += _decode_reasons(sharding.gather_to_host(_encode_reasons(why)))
  n = len(paths)
  return (np.concatenate(images)[:n], np.concatenate(ok)[:n], np.asarray(reasons[:n], dtype=str),
          np.concatenate(pixels)[:n])


def _encode_reasons(reasons):
  """Strings -> (len, _REASON_BYTES) uint8 rows (UTF-8, zero-padded, cut to fit)."""
  out = np.zeros((len(reasons), _REASON_BYTES), np.uint8)
  for i, reason in enumerate(reasons):
    data = reason.encode("utf-8")[:_REASON_BYTES]
    out[i, :len(data)] = np.frombuffer(data, np.uint8)
  return out


def _decode_reasons(rows):
  return [bytes(r).rstrip(b"\0").decode("utf-8", "replace") for r in rows]


def format_result(done):
  """(stderr lines: the skipped files, the stdout summary line)."""
  skipped = [f"skipped {path}: {reason}" for path, reason in done["skipped"]]
  note = f" ({len(done['skipped'])} unreadable files skipped)" if done["skipped"] else ""
  if done.get("shard"):
    return skipped, f"added {done['n']} studies to index {done['index']} (shard " \
                    f"{done['shard']}){note}"
  return skipped, f"wrote index {done['index']}: {done['n']} studies{note}"

"""Trained models at work: load one, encode queries, and the drivers of `launch.py eval`, `embed`
and `search`.

Which model (`model_path`):
- a training run of ours (its output_dir, its checkpoints dir or one step dir): config, weights
  and the volume preprocessing come from the checkpoint (checkpoint.load_for_inference);
- the released code's PyTorch file (`best_model.pt`, `checkpoint_epoch_N.pt`; also .pth, .bin,
  .safetensors): the architecture comes from the config (model.*, text.*; BERT's config.json and
  tokenizer from text.model_path). Such a file has no fusion weights and the released code never
  ran its fusion, so the model runs with fusion disabled (a note says so when the config asked
  for fusion). There is deliberately no way to evaluate freshly initialised weights.

Model identity (kept in indexes and metrics.json): retrieval.model_identity with
  fingerprint   sha256 of the variables + the settings that change embeddings
                (`embedding_settings`: the model section except remat/dtype, text max_tokens and
                the tokenizer's lowercasing)
  kind          "checkpoint" (ours) | "released" (a PyTorch file)
  checkpoint    absolute path it was loaded from; step (ours)
  config        {"model": ..., "text": ...} sections, to rebuild a released-code model
  preprocess    data_prep.preprocess.PreprocessParams (dict) turning a NIfTI file into model input
so `search` can load the same model again and check it is the one that built the index.

Raw NIfTI files (embed --volumes, search --volume) are preprocessed exactly as at conversion
(data_prep.preprocess). The parameters: for `embed --volumes`, those the model was trained with
(our checkpoint: its training dataset's metadata.json, else that of the dataset named by
data.tfrecord_dir, else its data config -- the last two with a note; a released-code file: the converted
dataset named by data.tfrecord_dir, else the config's `data` section); for `embed --split` and
`eval`, those of the converted dataset embedded; for a volume query, those of the index's
gallery, recorded in the index.
"""

import contextlib
import dataclasses
import json
import os
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from data_prep import corpus
from data_prep import preprocess as preprocess_lib
from data_prep import schema
from medfinder_jax import config_utils
from medfinder_jax import convert_weights
from medfinder_jax import distributed
from medfinder_jax import errors
from medfinder_jax import evaluate
from medfinder_jax import findings
from medfinder_jax import interchange
from medfinder_jax import loading
from medfinder_jax import losses
from medfinder_jax import metrics as metrics_lib
from medfinder_jax import retrieval
from medfinder_jax import sharding
from medfinder_jax import text as text_lib
from medfinder_jax.models import medfinder as medfinder_lib

RELEASED_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")
REPORT_SUFFIX = ".txt"          # optional report beside a volume: <name>.txt for <name>.nii.gz
QUERY_KINDS = ("text", "keyword", "volume")
RECORDED_SECTIONS = ("model", "text", "loss")   # config sections an index records of its model
QUERY_LENGTHS = (16, 32, 64)    # token lengths text queries are padded to (else text.max_tokens)
_REASON_BYTES = 240             # skip reasons travel between processes as fixed-width UTF-8


class InferenceError(errors.UserError):
  """A user mistake (missing checkpoint, bad flag, unusable file); the message says what to do."""


_USER_ERRORS = (InferenceError, config_utils.ConfigError, interchange.InterchangeError,
                convert_weights.WeightImportError, text_lib.TextModelError,
                preprocess_lib.BadVolume)


@contextlib.contextmanager
def user_errors(*more):
  """Re-raises the user-error types of the modules used here (and `more`) as InferenceError."""
  try:
    yield
  except InferenceError:
    raise
  except _USER_ERRORS + tuple(more) as err:
    raise InferenceError(str(err)) from None


# --- Loading a model ------------------------------------------------------------------------------

@dataclasses.dataclass
class LoadedModel:
  """A model ready for inference (place its variables on a mesh with `replicate`)."""
  model: Any                # medfinder.MedFinder
  variables: Any            # {"params", ["batch_stats"]}: numpy arrays (released-code file), or jax.Arrays
                            # already replicated on load_model's mesh (ours; replicate is then free)
  config: Any               # ConfigDict the model was built from
  tokenizer: Any            # text.ReportTokenizer
  preprocess: Any           # preprocess.PreprocessParams of raw volumes
  identity: dict            # retrieval.model_identity(...) (see module docstring)
  notes: list               # what the user should know (e.g. fusion disabled)
  info: dict                # our checkpoint's info (step, val metrics, ...); {} for released-code files


def embedding_settings(config, tokenizer):
  """The settings besides the weights that change embeddings (part of the fingerprint)."""
  model = config_utils.to_dict(config.model)
  for field in ("remat", "dtype"):      # same embeddings (up to bf16 rounding) either way
    model.pop(field, None)
  return {"model": model, "text": {"max_tokens": int(config.text.max_tokens),
                                   "lowercase": bool(tokenizer.lowercase),
                                   "pooling": config.text.get("pooling", "cls")}}


def make_identity(kind, path, config, variables, tokenizer, params, step=None):
  """retrieval.model_identity of a loaded model (see module docstring).

  variables: numpy arrays or replicated jax.Arrays (hashed from one device's copy).
  """
  host = jax.tree.map(_host_copy, variables)
  fingerprint = retrieval.model_fingerprint(host, embedding_settings(config, tokenizer))
  return retrieval.model_identity(
      backbone=config.model.backbone, embed_dim=config.model.embed_dim, fingerprint=fingerprint,
      checkpoint=os.path.abspath(path), kind=kind, step=step,
      config={name: config_utils.to_dict(config[name]) for name in RECORDED_SECTIONS},
      preprocess=params.to_dict())


def load_model(model_path, config, recorded=None, mesh=None):
  """LoadedModel from our checkpoint or a released-code PyTorch file (module docstring).

  recorded: the "model" record of an index (search): a released-code file is then rebuilt with the
  recorded model/text settings and preprocessing instead of the config's.
  mesh: the mesh the model will run on (all processes must call this together with it).
  """
  if not model_path:
    raise InferenceError("no model: pass --model_path (a run directory of launch.py train, one "
                         "of its step directories, or the released code's best_model.pt)")
  if not os.path.exists(model_path):
    raise InferenceError(f"{model_path}: no such checkpoint (expected a run or step directory "
                         f"of launch.py train, or the released code's best_model.pt / "
                         f"checkpoint_epoch_N.pt)")
  with user_errors():
    if os.path.isdir(model_path):
      return _load_ours(model_path, config, mesh)
    if not model_path.endswith(RELEASED_SUFFIXES):
      raise InferenceError(f"{model_path}: not a checkpoint: expected a directory (ours) or a "
                           f"PyTorch state dict file ({', '.join(RELEASED_SUFFIXES)})")
    return _load_released(model_path, config, recorded)


def _load_released(path, config, recorded=None):
  """The released code's saved model, with the architecture of `config` (or `recorded`)."""
  config = config.copy_and_resolve_references()
  notes = []
  if recorded:
    config = _with_recorded_sections(config, recorded)
  if recorded and isinstance(recorded.get("preprocess"), dict):
    params = params_from_dict(recorded["preprocess"], f"{path} (recorded in an index)")
  else:
    params = volume_preprocessing(config, path)
  if config.model.fusion.enabled:
    config.model.fusion.enabled = False
    notes.append(f"{os.path.basename(path)}: a released-code checkpoint has no fusion weights (the "
                 f"released code trains and evaluates without fusion): fusion disabled")
  tokenizer, bert_config = loading.text_tower(config.text)
  model = loading.build_model(config, bert_config)
  template = jax.eval_shape(lambda: medfinder_lib.init_variables(
      model, jax.random.key(0), params.shape, config.text.max_tokens))
  scalars = {k: np.float32(v) for k, v in losses.learnable_scalars(config.loss).items()}
  template = {**template, "params": {**template["params"], **scalars}}
  variables, _ = convert_weights.import_released_checkpoint(path, template, config.model.backbone)
  identity = make_identity("released", path, config, variables, tokenizer, params)
  return LoadedModel(model, variables, config, tokenizer, params, identity, notes, {})


def _host_copy(x):
  """numpy copy of one device's data of a (replicated) jax.Array; numpy arrays as they are."""
  return np.asarray(x.addressable_data(0)) if isinstance(x, jax.Array) else np.asarray(x)


def _with_recorded_sections(config, recorded):
  """`config` with the recorded model/text sections; the recorded text.model_path gives way to a
  non-empty config text.model_path (e.g. --config.text.model_path) when it is not on this machine."""
  import ml_collections  # pylint: disable=import-outside-toplevel
  sections = recorded.get("config") or {}
  fallback = config.text.model_path
  for name in RECORDED_SECTIONS:
    if name in sections:
      config[name] = ml_collections.ConfigDict(sections[name])
  if fallback and not _text_model_available(config.text.model_path):
    config.text.model_path = fallback
  return config


def _text_model_available(path):
  try:
    text_lib.resolve_text_model_path(path)
  except text_lib.TextModelError:
    return False
  return True


def _load_ours(path, config, mesh=None):
  """A checkpoint of launch.py train: its own config, weights and training dataset.

  The checkpoint's text.model_path is used for the tokenizer; when that folder is not on this
  machine, config text.model_path (e.g. --config.text.model_path) stands in for it. The variables
  stay where load_for_inference put them (replicated on `mesh`).
  """
  from medfinder_jax import checkpoint  # pylint: disable=import-outside-toplevel
  with user_errors(checkpoint.CheckpointError):
    try:
      ckpt_config, model, variables, info = checkpoint.load_for_inference(path, mesh=mesh)
    except checkpoint.CheckpointError as err:
      if "text.model_path" not in str(err) or not config.text.model_path:
        raise
      ckpt_config, model, variables, info = checkpoint.load_for_inference(
          path, mesh=mesh, text_model_path=config.text.model_path)
  try:
    params = schema.DatasetSpec.from_dict(info["dataset"], info["checkpoint_path"]).preprocess
  except ValueError as err:
    raise InferenceError(str(err)) from None
  tokenizer = text_lib.load_tokenizer(ckpt_config.text)
  identity = make_identity("checkpoint", info["checkpoint_path"], ckpt_config, variables,
                           tokenizer, params, step=info["step"])
  notes = [checkpoint.describe(info)]
  return LoadedModel(model, variables, ckpt_config, tokenizer, params, identity, notes, info)


def dataset_directory(config, required=True):
  """The converted dataset to read: data.tfrecord_dir, or data.data_root when it is converted."""
  if config.data.tfrecord_dir:
    return config.data.tfrecord_dir
  root = config.data.data_root
  if root and os.path.isfile(os.path.join(root, "dataset_info.json")):
    return root
  if root:
    raise InferenceError(f"--data_root {root}: not a converted dataset (no dataset_info.json); "
                         f"convert it first (launch.py convert --data_root {root} --output_dir "
                         f"D) and pass --config.data.tfrecord_dir D")
  if required:
    raise InferenceError("no dataset: pass --config.data.tfrecord_dir DIR (a dataset converted "
                         "with launch.py convert) or --data_root DIR of a converted dataset")
  return ""


def params_from_dict(values, source):
  """PreprocessParams recorded at `source` (to_dict() form); InferenceError naming it."""
  try:
    return schema.PreprocessParams.from_dict(values, source)
  except ValueError as err:
    raise InferenceError(str(err)) from None


def dataset_preprocessing(directory):
  """PreprocessParams recorded in a converted dataset's metadata.json."""
  path = os.path.join(directory, "metadata.json")
  try:
    with open(path, encoding="utf-8") as f:
      values = json.load(f).get("preprocess")
  except (OSError, ValueError, AttributeError) as err:
    raise InferenceError(f"{path}: cannot read the preprocessing parameters ({err}); is "
                         f"{directory} a dataset written by launch.py convert?") from None
  return params_from_dict(values, path)


def volume_preprocessing(config, path):
  """PreprocessParams for raw volumes given to the released code's file `path`: the file
  records none, so they are those of the converted dataset named in the config."""
  directory = dataset_directory(config, required=False)
  if not directory:
    raise InferenceError(f"{path}: a released-code checkpoint does not record how its volumes "
                         f"were preprocessed; pass --tfrecord_dir DIR (or "
                         f"--config.data.tfrecord_dir), a dataset converted as this model "
                         f"expects (its metadata.json holds the preprocessing)")
  return dataset_preprocessing(directory)


# --- Placing and encoding -------------------------------------------------------------------------

def replicate(variables, mesh):
  """Host variables -> jax.Arrays held whole by every device of `mesh` (any process count)."""
  return jax.device_put(variables, sharding.replicated(mesh))


def single_device_mesh():
  """A one-device mesh of the default backend (interactive queries: batch of one)."""
  return sharding.make_mesh({"data": 1, "fsdp": 1}, jax.local_devices()[:1])


def encode_text_queries(loaded, variables, texts, mesh):
  """(Q, D) float32 embeddings of free texts or keywords (the projected text embedding).

  Queries are padded only to the shortest of QUERY_LENGTHS (else text.max_tokens) that holds the
  longest one: padding is masked out of attention, so the embedding is the full-length one up to
  float rounding, at a fraction of the cost for short queries (one compile per length).
  """
  texts = list(texts)
  _, mask = loaded.tokenizer(texts)   # a few queries: measuring them costs microseconds
  longest = int(mask.sum(axis=1).max()) if len(texts) else 1
  length = next((n for n in QUERY_LENGTHS if longest <= n < mask.shape[1]), mask.shape[1])
  return evaluate.encode_texts(loaded.model, variables, _Trimmed(loaded.tokenizer, length), texts,
                               mesh, batch_size_per_device=1)


class _Trimmed:
  """A tokenizer whose (ids, mask) are cut to `length` tokens (all real tokens must fit)."""

  def __init__(self, tokenizer, length):
    self.tokenizer, self.length = tokenizer, length

  def __call__(self, texts):
    ids, mask = self.tokenizer(texts)
    return ids[:, :self.length], mask[:, :self.length]


def load_volume(path, params):
  """A NIfTI file -> stored model input (params.shape, params.volume_dtype), as at conversion.

  InferenceError naming the file when it is not a readable 3D CT volume (e.g. a 2D image).
  """
  if not os.path.isfile(path):
    raise InferenceError(f"{path}: no such volume file")
  try:
    volume, _ = preprocess_lib.preprocess(preprocess_lib.load_source(path), params)
  except preprocess_lib.BadVolume as err:
    raise InferenceError(f"{path}: {err}") from None
  return volume


def encode_volumes(loaded, variables, volumes, params, mesh):
  """(B, D) image embeddings of stored volumes (B, X, Y, Z) made with PreprocessParams `params`,
  on a one-process mesh."""
  batch = sharding.make_global_batch({"volume": np.asarray(volumes)}, mesh)
  return evaluate.gather_to_host(evaluate.encode_image_batch(
      loaded.model, variables, batch["volume"], params.intensity))


# --- eval -----------------------------------------------------------------------------------------

def run_eval(config, model_path, *, split=None, plots=False, bootstrap_samples=None, log=None):
  """`launch.py eval`: embeddings of a split -> embeddings.npz + metrics.json in config.output_dir.

  Keyword queries (config.eval.keywords) are encoded and saved with the embeddings, so
  `launch.py metrics` on the npz gives the same numbers. Runs on every process (the mesh spans
  all devices); only process 0 writes. Returns (metrics, written paths) on process 0, else None.
  """
  log = log or _stderr_log
  split = split or config.eval.split
  metrics_lib.MetricSettings.from_config(config.eval, config.seed, bootstrap_samples)
  loaded, variables, mesh, directory, embeddings = embed_split(config, model_path, split, log)
  keywords = tuple(config.eval.keywords)
  if keywords:
    embeddings.keywords = np.asarray(keywords, dtype=str)
    embeddings.keyword_embeddings = evaluate.encode_texts(
        loaded.model, variables, loaded.tokenizer, keywords, mesh,
        config.eval.batch_size_per_device)
  if not distributed.is_main_process():
    return None
  return _write_eval(config, embeddings, loaded, split, directory, plots, bootstrap_samples)


def embed_split(config, model_path, split, log=None):
  """Loads the model and embeds a converted split on a mesh of every device (all processes).

  The dataset: data.tfrecord_dir, a converted data.data_root, else our checkpoint's own.
  Returns (LoadedModel, replicated variables, mesh, dataset directory, EmbeddingSet).
  """
  from medfinder_jax import input_pipeline  # pylint: disable=import-outside-toplevel
  log = log or _stderr_log
  with user_errors(input_pipeline.DatasetError):
    directory = dataset_directory(config, required=not os.path.isdir(model_path or ""))
    mesh = sharding.make_mesh(config.mesh)
    loaded = load_model(model_path, _with_dataset(config, directory), mesh=mesh)
    directory = directory or _checkpoint_dataset(loaded)
    builder, spec = input_pipeline.open_dataset(directory)
    input_pipeline.split_files(builder, split)
    _use_dataset_preprocessing(loaded, directory)
  _log_notes(loaded, log)
  variables = replicate(loaded.variables, mesh)
  embeddings = _extract(loaded, variables, builder, spec, split, mesh, config)
  return loaded, variables, mesh, directory, embeddings


def _with_dataset(config, directory):
  """Config whose raw-volume preprocessing default is the dataset's (released-code files)."""
  if not directory or config.data.tfrecord_dir == directory:
    return config
  config = config.copy_and_resolve_references()
  config.data.tfrecord_dir = directory
  return config


def _use_dataset_preprocessing(loaded, directory):
  """Makes the embedded dataset's preprocessing the loaded model's (and its identity's): volume
  queries of an index of it must be prepared like its volumes. A note when the model was
  trained on volumes prepared otherwise."""
  params = dataset_preprocessing(directory)
  if params != loaded.preprocess:
    differ = [f.name for f in dataclasses.fields(params)
              if getattr(params, f.name) != getattr(loaded.preprocess, f.name)]
    loaded.notes.append(f"{directory} was converted with other preprocessing than the model's "
                        f"({', '.join(differ)} differ): embedding its volumes as they are")
  loaded.preprocess = params
  loaded.identity["preprocess"] = params.to_dict()


def _checkpoint_dataset(loaded):
  """The dataset our checkpoint was trained on (fallback when none is given)."""
  directory = (loaded.info.get("dataset") or {}).get("directory", "")
  directory = directory or loaded.config.data.get("tfrecord_dir", "")
  if not directory:
    raise InferenceError(f"{loaded.identity['checkpoint']}: records no dataset; pass "
                         f"--config.data.tfrecord_dir DIR")
  return directory


def _extract(loaded, variables, builder, spec, split, mesh, config):
  from medfinder_jax import input_pipeline  # pylint: disable=import-outside-toplevel
  from medfinder_jax import logging as logging_lib  # pylint: disable=import-outside-toplevel
  per_device = config.eval.batch_size_per_device
  total = input_pipeline.num_eval_batches(input_pipeline.split_files(builder, split),
                                          per_device * mesh.local_mesh.size, jax.process_count())
  with logging_lib.progress_bar(total, desc=f"embed {split}", leave=False) as bar:
    return evaluate.extract_split(loaded.model, variables, builder, spec, split,
                                  loaded.tokenizer, mesh, per_device,
                                  progress=lambda done: bar.update(1))


def _write_eval(config, embeddings, loaded, split, directory, plots, bootstrap_samples):
  output_dir = config.output_dir or "."
  npz = os.path.join(output_dir, "embeddings.npz")
  extra = {"split": split, "dataset": os.path.abspath(directory),
           "model": {k: v for k, v in loaded.identity.items() if k != "config"}}
  with user_errors():
    try:
      interchange.save_embeddings(npz, embeddings)
    except OSError as err:
      raise InferenceError(f"{npz}: cannot write ({err.strerror or err})") from None
    result, written = interchange.evaluate_embeddings_file(
        npz, config.eval, seed=config.seed, plots_dir=output_dir if plots else None,
        bootstrap_samples=bootstrap_samples, extra=extra)
  return result, [npz] + written


def _log_notes(loaded, log):
  if distributed.is_main_process():
    for note in loaded.notes:
      log(f"note: {note}")


def _stderr_log(message):
  import sys  # pylint: disable=import-outside-toplevel
  print(message, file=sys.stderr, flush=True)


# --- embed ----------------------------------------------------------------------------------------

def run_embed(config, model_path, index_dir, *, split=None, volumes_dir=None, overwrite=False,
              log=None):
  """`launch.py embed`: a search index of a converted split or of a folder of NIfTI files.

  Returns {"index", "n", "skipped": [(file, reason)]} on process 0, else None.
  """
  log = log or _stderr_log
  if (split is None) == (volumes_dir is None):
    raise InferenceError("pass exactly one of --split (a converted dataset) or --volumes DIR")
  with user_errors():
    retrieval.check_index_target(index_dir, overwrite)   # before the (long) embedding
  if split is not None:
    embeddings, loaded, source, skipped = _embed_split(config, model_path, split, log)
  else:
    embeddings, loaded, source, skipped = _embed_volume_folder(config, model_path, volumes_dir,
                                                               log)
  if not distributed.is_main_process():
    return None
  with user_errors():
    try:
      retrieval.build_index(index_dir, embeddings, {**loaded.identity, "embedded_from": source},
                            overwrite=overwrite)
    except OSError as err:
      raise InferenceError(f"{index_dir}: cannot write the index ({err.strerror or err})") from None
  return {"index": index_dir, "n": embeddings.n, "skipped": skipped}


def _embed_split(config, model_path, split, log):
  loaded, _, _, directory, embeddings = embed_split(config, model_path, split, log)
  source = {"dataset": os.path.abspath(directory), "split": split}
  return embeddings, loaded, source, []


# --- embed: a folder of NIfTI files ---------------------------------------------------------------

def list_volume_files(directory):
  """Relative paths ('/' separators) of the NIfTI files under `directory`, in natural order."""
  if not os.path.isdir(directory):
    raise InferenceError(f"--volumes {directory}: not a directory")
  found = []
  for root, dirs, files in os.walk(directory):
    dirs.sort()
    for name in files:
      if name.endswith(corpus.VOLUME_SUFFIXES):
        found.append(os.path.relpath(os.path.join(root, name), directory).replace(os.sep, "/"))
  if not found:
    raise InferenceError(f"--volumes {directory}: no .nii or .nii.gz files in it")
  return sorted(found, key=corpus.natural_key)


def read_report_beside(path):
  """The report of a volume from <name>.txt beside <name>.nii(.gz), or "" when there is none."""
  report_path = corpus.study_id_of(path) + REPORT_SUFFIX
  if not os.path.isfile(report_path):
    return ""
  with open(report_path, encoding="utf-8", errors="replace") as f:
    return f.read().strip()


def _embed_volume_folder(config, model_path, directory, log):
  files = list_volume_files(directory)
  with user_errors():
    mesh = sharding.make_mesh(config.mesh)
  loaded = load_model(model_path, config, mesh=mesh)
  _log_notes(loaded, log)
  variables = replicate(loaded.variables, mesh)
  paths = [os.path.join(directory, f) for f in files]
  image, ok, reasons = _embed_files(loaded, variables, paths, mesh,
                                    config.eval.batch_size_per_device)
  skipped = [(files[i], reasons[i]) for i in np.flatnonzero(~ok)]
  if not ok.any():
    raise InferenceError(f"--volumes {directory}: none of the {len(files)} files could be used; "
                         f"e.g. {skipped[0][0]}: {skipped[0][1]}")
  keep = np.flatnonzero(ok)
  reports = [read_report_beside(paths[i]) for i in keep]
  text = np.zeros_like(image[keep])
  with_report = [j for j, r in enumerate(reports) if r]
  if with_report:
    text[with_report] = evaluate.encode_texts(loaded.model, variables, loaded.tokenizer,
                                              [reports[j] for j in with_report], mesh,
                                              config.eval.batch_size_per_device)
  embeddings = interchange.EmbeddingSet(
      image_embeddings=image[keep], text_embeddings=text,
      study_ids=np.asarray([corpus.study_id_of(files[i]) for i in keep], dtype=str),
      reports=np.asarray(reports, dtype=str),
      source_paths=np.asarray([files[i] for i in keep], dtype=str))
  source = {"volumes": os.path.abspath(directory), "files": len(files), "skipped": len(skipped)}
  return embeddings, loaded, source, skipped


def _embed_files(loaded, variables, paths, mesh, batch_size_per_device):
  """Image embeddings of NIfTI files: (N, D) float32, ok (N,) bool, reasons (N,) str.

  Each process preprocesses only its own rows of each global batch; unreadable files become
  masked rows with the reason (gathered so that every process knows all of them).
  """
  params = loaded.preprocess
  global_batch = batch_size_per_device * mesh.size
  local = global_batch // jax.process_count()
  first = jax.process_index() * local
  images, ok, reasons = [], [], []
  for start in range(0, len(paths), global_batch):
    mine = paths[start + first:start + first + local]
    volumes = np.zeros((local, *params.shape), params.volume_dtype)
    status = np.zeros((local,), bool)
    why = [""] * local
    for row, path in enumerate(mine):
      try:
        volumes[row] = load_volume(path, params)
        status[row] = True
      except InferenceError as err:
        why[row] = str(err).removeprefix(f"{path}: ")
    batch = sharding.make_global_batch({"volume": volumes}, mesh)
    images.append(evaluate.gather_to_host(evaluate.encode_image_batch(
        loaded.model, variables, batch["volume"], params.intensity)))
    ok.append(_all_processes(status))
    reasons += _decode_reasons(_all_processes(_encode_reasons(why)))
  n = len(paths)
  return (np.concatenate(images)[:n].astype(np.float32), np.concatenate(ok)[:n],
          np.asarray(reasons[:n], dtype=str))


def _encode_reasons(reasons):
  """Strings -> (len, _REASON_BYTES) uint8 rows (UTF-8, zero-padded, cut to fit)."""
  out = np.zeros((len(reasons), _REASON_BYTES), np.uint8)
  for i, reason in enumerate(reasons):
    data = reason.encode("utf-8")[:_REASON_BYTES]
    out[i, :len(data)] = np.frombuffer(data, np.uint8)
  return out


def _decode_reasons(rows):
  return [bytes(r).rstrip(b"\0").decode("utf-8", "replace") for r in rows]


def _all_processes(rows):
  """This process's host rows -> the rows of every process, in process order (numpy)."""
  if jax.process_count() == 1:
    return rows
  return np.asarray(multihost_utils.process_allgather(rows, tiled=True))


# --- search ---------------------------------------------------------------------------------------

def run_search(config, index_dir, *, text=None, keyword=None, volume=None, top_k=None,
               model_path=None):
  """`launch.py search`: ranked studies for a text / keyword query, ranked reports for a volume.

  The model is the one recorded in the index (model_path overrides its location); its
  fingerprint must match the index's. Returns a plain dict (see format_search / --json).
  """
  kind, value = _query_kind(text, keyword, volume)
  top_k = int(config.eval.search_top_k if top_k is None else top_k)
  if top_k < 1:
    raise InferenceError(f"--top_k must be at least 1, got {top_k}")
  if kind == "keyword":
    _check_keyword(value)
  with user_errors():
    index = retrieval.load_index(index_dir)
  if kind == "volume":   # read before the model loads: a bad file fails fast
    params = index_preprocessing(index)
    volume = load_volume(value, params)
  mesh = single_device_mesh()
  loaded = load_index_model(index, config, model_path, mesh)
  variables = replicate(loaded.variables, mesh)
  if kind == "volume":
    query = encode_volumes(loaded, variables, volume[None], params, mesh)
  else:
    query = encode_text_queries(loaded, variables, [value], mesh)
  results = search_embedding(index, query[0], kind, top_k, config.eval.excerpt_chars)
  return _search_output(index, kind, value, results, loaded)


def load_index_model(index, config, model_path=None, mesh=None):
  """The model that built `index` (or `model_path`), checked against the index's fingerprint.

  mesh: where the model will run (default: single_device_mesh()).
  """
  recorded = index.meta.get("model", {})
  path = model_path or recorded.get("checkpoint", "")
  if not model_path and path and not os.path.exists(path):
    raise InferenceError(f"{index.directory}: built by the model at {path}, which no longer "
                         f"exists; pass --model_path with the same model's new location")
  loaded = load_model(path, config, recorded=recorded, mesh=mesh or single_device_mesh())
  with user_errors():
    retrieval.check_model(index, loaded.identity)
  return loaded


def index_preprocessing(index):
  """PreprocessParams of the index's gallery volumes (volume queries must match them)."""
  recorded = index.meta.get("model", {}).get("preprocess")
  if not isinstance(recorded, dict):
    raise InferenceError(f"{index.directory}: the index records no volume preprocessing, so a "
                         f"volume query cannot be prepared like its gallery; rebuild it with "
                         f"launch.py embed")
  return params_from_dict(recorded, os.path.join(index.directory, retrieval.META_FILE))


def _query_kind(text, keyword, volume):
  given = [(k, v) for k, v in zip(QUERY_KINDS, (text, keyword, volume)) if v is not None]
  if len(given) != 1:
    raise InferenceError("pass exactly one query: --text \"...\", --keyword K or --volume FILE")
  kind, value = given[0]
  if not str(value).strip():
    raise InferenceError(f"--{kind}: empty query")
  return kind, value


def _check_keyword(keyword):
  try:
    findings.keyword_pattern(keyword)
  except ValueError as err:
    raise InferenceError(f"--keyword: {err}") from None


def search_embedding(index, query, kind, top_k, excerpt_chars=200):
  """SearchResults of one query embedding: studies (text/keyword) or reports (volume).

  A volume query ranks only the studies that have a report.
  """
  if kind != "volume":
    return retrieval.search(index, query, top_k, "image", excerpt_chars)
  has_report = np.char.str_len(index.reports) > 0
  if not has_report.any():
    raise InferenceError(f"{index.directory}: the index has no reports to rank (it was built "
                         f"from volumes without <name>.txt reports)")
  limit = top_k + int(np.count_nonzero(~has_report))
  ranked = [r for r in retrieval.search(index, query, limit, "text", excerpt_chars)
            if has_report[r.row]][:top_k]
  return [r._replace(rank=i + 1) for i, r in enumerate(ranked)]


def _search_output(index, kind, value, results, loaded):
  relevance = findings.keyword_relevance(index.reports, value) if kind == "keyword" else None
  rows = []
  for r in results:
    row = {"rank": r.rank, "study_id": r.study_id, "score": r.score, "excerpt": r.excerpt,
           "source_path": r.source_path, "report": str(index.reports[r.row])}
    if kind == "keyword":
      row["states_finding"] = bool(relevance[r.row])
    rows.append(row)
  out = {"query": {"type": kind, "value": value}, "index": os.path.abspath(index.directory),
         "n": index.n, "ranked": "reports" if kind == "volume" else "studies",
         "model": {k: loaded.identity.get(k) for k in ("checkpoint", "kind", "step", "backbone",
                                                     "fingerprint")},
         "results": rows}
  if kind == "keyword":
    out["relevant_in_results"] = sum(row["states_finding"] for row in rows)
    out["relevant_in_index"] = int(relevance.sum())
  return out


def format_search(result):
  """The human-readable ranking of run_search's result."""
  query = result["query"]
  shown = (query["value"] if query["type"] == "volume"
           else repr(retrieval.excerpt(query["value"], 80)))
  lines = [f"{query['type']} query {shown}: top {len(result['results'])} of {result['n']} "
           f"{result['ranked']} (index {result['index']})"]
  keyword = query["type"] == "keyword"
  header = ["rank", "study_id", "score"] + (["finding"] if keyword else []) + ["report"]
  table = [header]
  for row in result["results"]:
    cells = [str(row["rank"]), row["study_id"], f"{row['score']:.4f}"]
    if keyword:
      cells.append("stated" if row["states_finding"] else "-")
    table.append(cells + [row["excerpt"]])
  widths = [max(len(r[c]) for r in table) for c in range(len(header) - 1)]
  for r in table:
    lines.append("  ".join(cell.rjust(w) if c in (0, 2) else cell.ljust(w)
                           for c, (cell, w) in enumerate(zip(r, widths))) + "  " + r[-1])
  if keyword:
    lines.append(f"{result['relevant_in_results']} of {len(result['results'])} results state "
                 f"{query['value']!r} ({result['relevant_in_index']} of {result['n']} studies "
                 f"in the index do)")
  return "\n".join(lines)

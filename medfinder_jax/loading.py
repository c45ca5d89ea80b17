"""A MedFinder model from its settings or its files: ours (a `launch.py train` run) or the
released code's PyTorch checkpoint.

Every model is built here: `text_tower` reads the text model folder (config.text.model_path)
once and checks that the tokenizer fits the BERT's vocabulary, `build_model` makes the Flax
module from the config's model, text and loss sections, and `load_model` fills it with weights.

Which model (`model_path`):
- a training run of ours (its output_dir, its checkpoints dir or one step dir): config, weights
  and the dataset spec (so the volume preprocessing) come from the checkpoint; the best
  validated step, else the latest;
- the released code's PyTorch file (`best_model.pt`, `checkpoint_epoch_N.pt`; also .pth, .bin,
  .safetensors): the architecture comes from the config (model.*, text.*, loss.*; BERT's
  config.json and tokenizer from text.model_path), the volume preprocessing from the dataset the
  caller names (or an index's record). Such a file has no fusion weights and the released code
  never ran its fusion, so the model runs with fusion disabled (a note says so when the config
  asked for fusion). There is deliberately no way to evaluate freshly initialised weights.

Model identity (kept in indexes and metrics.json), `identity`:
  fingerprint   sha256 of the variables + the settings that change embeddings
  kind          "checkpoint" (ours) | "released" (a PyTorch file)
  checkpoint    absolute path it was loaded from; step (ours)
  config        the model, text and loss sections, to rebuild a released-code model
  preprocess    schema.PreprocessParams (dict) of the volumes the model embeds
so that search can load the same model again and check it is the one that built an index.
"""

import dataclasses
import hashlib
import json
import os
from typing import Any

import jax
import ml_collections
import numpy as np

from data_prep import schema
from medfinder_jax import checkpoint
from medfinder_jax import config_utils
from medfinder_jax import convert_weights
from medfinder_jax import errors
from medfinder_jax import losses
from medfinder_jax import sharding
from medfinder_jax import text as text_lib
from medfinder_jax.models import bert as bert_lib
from medfinder_jax.models import medfinder as medfinder_lib

RELEASED_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")
RECORDED_SECTIONS = ("model", "text", "loss")   # config sections an identity records
IDENTITY_FIELDS = ("fingerprint", "backbone", "embed_dim")   # what must match to reuse embeddings


class LoadingError(errors.UserError):
  """A model path that cannot be loaded as asked (missing, not a checkpoint, no preprocessing)."""


# --- Building -------------------------------------------------------------------------------------

def text_tower(text_config, bert_config=None):
  """(ReportTokenizer, BertConfig) of config `text` (model_path, max_tokens, lowercase).

  bert_config: the BERT architecture when it is recorded elsewhere (our checkpoints); else read
  from the folder's config.json. text.TextModelError (a user error) when the folder is missing,
  incomplete, or its tokenizer and the BERT come from different models."""
  tokenizer = text_lib.load_tokenizer(text_config)
  bert_config = bert_config or convert_weights.load_bert_config(tokenizer.folder)
  text_lib.check_vocab_fits(tokenizer, bert_config)
  return tokenizer, bert_config


def build_model(config, bert_config, mesh=None):
  """The MedFinder module of `config` (its model, text and loss sections) with a text tower of
  `bert_config`; the loss scalars the configured loss learns are parameters of it. mesh: the
  mesh it will run on; with mesh.spatial > 1 its image tower splits each volume over the
  spatial devices (sharding.activation_sharding; same parameters and results)."""
  return medfinder_lib.build_model(config.model, config.text, bert_config,
                                   losses.learnable_scalars(config.loss),
                                   activation_sharding=sharding.activation_sharding(mesh))


def init_model(config, image_shape, rng):
  """(model, variables): `config`'s model initialised from `rng` for volumes of `image_shape`
  (X, Y, Z), with the pretrained BERT of config.text.model_path as its text tower (numpy
  variables on the host; training creates its state sharded instead, train_step).
  """
  tokenizer, _ = text_tower(config.text)
  bert_config, bert_params = convert_weights.load_hf_bert(tokenizer.folder)
  model = build_model(config, bert_config)
  variables = medfinder_lib.initialize(model, rng, image_shape, config.text.max_tokens,
                                       bert_params)
  return model, jax.device_get(variables)


def abstract_variables(model, config, image_shape, placement):
  """The model's variables as ShapeDtypeStructs with sharding `placement` (nothing computed)."""
  shapes = jax.eval_shape(lambda: medfinder_lib.init_variables(
      model, jax.random.key(0), tuple(image_shape), config.text.max_tokens))
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=placement),
                      shapes)


# --- Loading --------------------------------------------------------------------------------------

@dataclasses.dataclass
class LoadedModel:
  """A model ready for inference."""
  model: Any                # medfinder.MedFinder
  variables: Any            # {"params", ["batch_stats"]}: jax.Arrays replicated on load's mesh
  config: Any               # ConfigDict the model was built from
  tokenizer: Any            # text.ReportTokenizer
  spec: Any                 # schema.DatasetSpec of the volumes it embeds (ours: trained on)
  identity: dict            # see the module docstring
  notes: list               # what the user should know (e.g. fusion disabled)

  @property
  def preprocess(self):
    return self.spec.preprocess

  @property
  def similarity_scale(self):
    """The model's inverse temperature on cosine similarities (zero-shot P(present))."""
    return losses.similarity_scale(self.variables["params"], self.config.loss)

  def preprocessing_note(self, spec):
    """A note when volumes of dataset `spec` were prepared otherwise than this model's, else
    None (embedding them still works: their own preprocessing is what they are)."""
    if spec.preprocess == self.preprocess:
      return None
    differ = [f.name for f in dataclasses.fields(spec.preprocess)
              if getattr(spec.preprocess, f.name) != getattr(self.preprocess, f.name)]
    return (f"{spec.directory} was converted with other preprocessing than the model's "
            f"({', '.join(differ)} differ): embedding its volumes as they are")


def model_kind(model_path):
  """"checkpoint" (a run or step directory of ours) or "released" (a PyTorch file); a
  LoadingError naming the path otherwise. Cheap: call it before other work."""
  if not model_path:
    raise LoadingError("no model: pass --model_path (a run directory of launch.py train, one "
                       "of its step directories, or the released code's best_model.pt)")
  if not os.path.exists(model_path):
    raise LoadingError(f"{model_path}: no such checkpoint (expected a run or step directory "
                       f"of launch.py train, or the released code's best_model.pt / "
                       f"checkpoint_epoch_N.pt)")
  if os.path.isdir(model_path):
    checkpoint.resolve(model_path)
    return "checkpoint"
  if not model_path.endswith(RELEASED_SUFFIXES):
    raise LoadingError(f"{model_path}: not a checkpoint: expected a directory (ours) or a "
                       f"PyTorch state dict file ({', '.join(RELEASED_SUFFIXES)})")
  return "released"


def trained_on(model_path):
  """The dataset directory our checkpoint was trained on, "" for a released-code file."""
  if model_kind(model_path) == "released":
    return ""
  return checkpoint.dataset_spec(checkpoint.read_meta(model_path)).directory


def load_model(model_path, config, *, spec=None, recorded=None, mesh=None):
  """LoadedModel from our checkpoint or a released-code file (see the module docstring).

  spec: the schema.DatasetSpec whose volumes a released-code file will embed (its
  preprocessing); recorded: an index's "model" record (a released-code file is then rebuilt
  with the recorded sections and preprocessing instead of the config's). mesh: where the
  variables are replicated (default: one local device); all processes call this together.
  """
  mesh = mesh or sharding.single_device_mesh()
  if model_kind(model_path) == "checkpoint":
    return _load_ours(model_path, config, mesh)
  return _load_released(model_path, config, spec, recorded, mesh)


def _load_ours(path, config, mesh):
  """A checkpoint of launch.py train: its own config, weights and dataset spec.

  Its text.model_path gives the tokenizer; when that folder is not on this machine, the
  config's text.model_path (e.g. --config.text.model_path) stands in for it."""
  meta = checkpoint.read_meta(path)
  ckpt_config = checkpoint.config_from_meta(meta)
  if config.text.model_path and not _text_model_available(ckpt_config.text.model_path):
    ckpt_config.text.model_path = config.text.model_path
  recorded_bert = meta.get("bert_config")
  try:
    tokenizer, bert_config = text_tower(
        ckpt_config.text, bert_lib.BertConfig.from_dict(recorded_bert) if recorded_bert else None)
  except text_lib.TextModelError as err:
    raise LoadingError(f"checkpoint {meta['checkpoint_path']} was trained with text.model_path "
                       f"{ckpt_config.text.model_path!r}, which cannot be used here ({err}); "
                       "pass the folder of the same text model (its tokenizer is needed) as "
                       "--config.text.model_path") from None
  model = build_model(ckpt_config, bert_config, mesh)
  spec = checkpoint.dataset_spec(meta)
  variables = checkpoint.read_variables(
      meta["checkpoint_path"], abstract_variables(model, ckpt_config, spec.shape,
                                                  sharding.replicated(mesh)))
  identity = make_identity("checkpoint", meta["checkpoint_path"], ckpt_config, variables,
                           tokenizer, spec.preprocess, step=meta["step"])
  return LoadedModel(model, variables, ckpt_config, tokenizer, spec, identity,
                     [describe_checkpoint(meta)])


def _load_released(path, config, spec, recorded, mesh):
  """The released code's saved model, with the architecture of `config` (or `recorded`)."""
  config = config.copy_and_resolve_references()
  notes = []
  if recorded:
    config = _with_recorded_sections(config, recorded)
  spec = _released_spec(path, spec, recorded)
  if config.model.fusion.enabled:
    config.model.fusion.enabled = False
    notes.append(f"{os.path.basename(path)}: a released-code checkpoint has no fusion weights "
                 f"(the released code trains and evaluates without fusion): fusion disabled")
  tokenizer, bert_config = text_tower(config.text)
  model = build_model(config, bert_config, mesh)
  template = jax.eval_shape(lambda: medfinder_lib.init_variables(
      model, jax.random.key(0), spec.shape, config.text.max_tokens))
  scalars = {k: np.float32(v) for k, v in losses.learnable_scalars(config.loss).items()}
  template = {**template, "params": {**template["params"], **scalars}}   # kept at their init
  variables, _ = convert_weights.import_released_checkpoint(path, template, config.model.backbone)
  identity = make_identity("released", path, config, variables, tokenizer, spec.preprocess)
  return LoadedModel(model, sharding.replicate(variables, mesh), config, tokenizer, spec,
                     identity, notes)


def _released_spec(path, spec, recorded):
  """The DatasetSpec of the volumes a released-code file embeds: the one given, else the
  preprocessing an index recorded, else an error naming the flag that supplies it."""
  if spec is not None:
    return spec
  if recorded and recorded.get("preprocess") is not None:
    try:
      return schema.DatasetSpec("", schema.PreprocessParams.from_dict(
          recorded["preprocess"], f"{path} (recorded in an index)"))
    except ValueError as err:
      raise LoadingError(str(err)) from None
  raise LoadingError(f"{path}: a released-code checkpoint does not record how its volumes were "
                     f"preprocessed; pass --tfrecord_dir DIR (or --config.data.tfrecord_dir), a "
                     f"dataset converted as this model expects (its metadata.json holds the "
                     f"preprocessing)")


def _with_recorded_sections(config, recorded):
  """`config` with the recorded sections; the recorded text.model_path gives way to a non-empty
  config text.model_path (e.g. --config.text.model_path) when it is not on this machine."""
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


def describe_checkpoint(meta):
  """One line for logs: which checkpoint was loaded and how it scored at validation."""
  metrics = meta.get("val_metrics") or {}
  score = metrics.get("t2i", {}).get("R@10") if isinstance(metrics.get("t2i"), dict) else None
  scored = f", val t2i R@10 {score:.2f}" if score is not None else ""
  return f"checkpoint step {meta['step']} (epoch {meta['epoch']}){scored}: " \
         f"{meta['checkpoint_path']}"


# --- Identity -------------------------------------------------------------------------------------

def embedding_settings(config, tokenizer):
  """The settings besides the weights that change embeddings (part of the fingerprint)."""
  model = config_utils.to_dict(config.model)
  for field in ("remat", "dtype"):      # same embeddings (up to bf16 rounding) either way
    model.pop(field, None)
  return {"model": model, "text": {"max_tokens": int(config.text.max_tokens),
                                   "lowercase": bool(tokenizer.lowercase),
                                   "pooling": config.text.get("pooling", "cls")}}


def fingerprint(variables, settings):
  """sha256 hex of the variables (paths, shapes, dtypes, bytes) and the settings dict: two
  models with the same fingerprint produce the same embeddings."""
  digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
  for path, leaf in jax.tree_util.tree_flatten_with_path(variables)[0]:
    leaf = np.asarray(leaf.addressable_data(0) if isinstance(leaf, jax.Array) else leaf)
    digest.update(f"{jax.tree_util.keystr(path)}|{leaf.shape}|{leaf.dtype}|".encode())
    digest.update(np.ascontiguousarray(leaf).tobytes())
  return digest.hexdigest()


def make_identity(kind, path, config, variables, tokenizer, preprocess, step=None):
  """The identity of a loaded model (see the module docstring). variables: numpy arrays or
  replicated jax.Arrays (hashed from this process's copy)."""
  return {"backbone": str(config.model.backbone), "embed_dim": int(config.model.embed_dim),
          "fingerprint": fingerprint(variables, embedding_settings(config, tokenizer)),
          "checkpoint": os.path.abspath(path), "kind": kind, "step": step,
          "config": {name: config_utils.to_dict(config[name]) for name in RECORDED_SECTIONS},
          "preprocess": preprocess.to_dict()}


def identity_differences(recorded, identity):
  """The IDENTITY_FIELDS on which two identities differ ([] = the same model)."""
  return [f for f in IDENTITY_FIELDS if str(recorded.get(f)) != str(identity.get(f))]

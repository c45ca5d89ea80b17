"""PyTorch / HF state dicts -> Flax variables: HF BERT folders, MONAI ResNet and ViT, and the
released code's MedFinder checkpoints (`best_model.pt`, `checkpoint_epoch_N.pt`).

The conversion is driven by our own variable tree: every Flax leaf names the PyTorch key it
comes from (module names are mapped by a short list of regex rules per model) and how to lay it
out (Linear weight transposed, Conv OIDHW -> DHWIO, LayerNorm/BatchNorm weight -> scale, BN
running stats -> batch_stats). Missing, unexpected and wrongly shaped keys are gathered into one
WeightImportError. Files are read with safetensors or `torch.load(weights_only=True)` (torch
imported lazily), so no arbitrary object is ever unpickled.
"""

import json
import os
import pickle
import re

import flax
import jax
import jax.numpy as jnp
import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file

from medfinder_jax import errors
from medfinder_jax import text as text_lib
from medfinder_jax.models import bert as bert_lib

# Torch keys that carry no weights we use: BN step counters, HF position id buffers, HF
# pre-training heads, MONAI classification heads and the LayerNorm MONAI's TransformerBlock
# always creates but only uses with cross-attention.
IGNORED_KEYS = (r"(^|\.)num_batches_tracked$", r"(^|\.)position_ids$", r"(^|\.)cls\.",
                r"(^|\.)fc\.", r"(^|\.)classification_head\.", r"(^|\.)cls_token$",
                r"(^|\.)norm_cross_attn\.")

RESNET_RULES = ((r"^layer(\d+)\.block(\d+)\.", r"layer\1.\2."),
                (r"\.downsample_conv\.", ".downsample.0."),
                (r"\.downsample_bn\.", ".downsample.1."))
VIT_RULES = ((r"^patch_embedding\.", "patch_embedding.patch_embeddings."),
             (r"^position_embeddings$", "patch_embedding.position_embeddings"),
             (r"^block(\d+)\.", r"blocks.\1."))
BERT_RULES = ((r"^encoder\.layer_(\d+)\.", r"encoder.layer.\1."),)
# What a released-code checkpoint does not hold: fusion weights and learnable loss scalars.
RELEASED_LACKS = ("params/fusion", "params/logit_scale", "params/logit_bias")


class WeightImportError(errors.UserError):
  """A state dict does not match the Flax model it is imported into."""


# --- Reading files ------------------------------------------------------------------------------

def _to_numpy(value):
  if hasattr(value, "detach"):  # torch.Tensor
    value = value.detach().cpu()
    if value.is_floating_point():
      value = value.float()
    return value.numpy()
  return np.asarray(value)


def _torch_load(path):
  import torch  # pylint: disable=import-outside-toplevel  (optional: only for .pt/.bin files)
  try:
    return torch.load(path, map_location="cpu", weights_only=True)
  except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as err:
    raise WeightImportError(f"{path}: not a PyTorch state dict readable with "
                            f"weights_only=True ({type(err).__name__}: {err})") from err


def load_state_dict(path):
  """A .safetensors / .bin / .pt / .pth file -> {name: np.ndarray} (floats as float32).

  A released-code training checkpoint (dict with `model_state_dict`) yields its model state dict; a
  DDP `module.` prefix shared by all keys is removed.
  """
  if not os.path.isfile(path):
    raise WeightImportError(f"{path}: no such file")
  if path.endswith(".safetensors"):
    try:
      state = load_file(path)
    except (SafetensorError, OSError) as err:
      raise WeightImportError(f"{path}: not a readable safetensors file ({err})") from err
  else:
    state = _torch_load(path)
  if isinstance(state, dict) and isinstance(state.get("model_state_dict"), dict):
    state = state["model_state_dict"]
  if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
    raise WeightImportError(f"{path}: expected a state dict (names -> tensors), found "
                            f"{type(state).__name__}")
  state = {k: _to_numpy(v) for k, v in state.items()}
  if state and all(k.startswith("module.") for k in state):
    state = {k[len("module."):]: v for k, v in state.items()}
  return state


# --- Flax path -> torch key ---------------------------------------------------------------------

def _leaf_to_torch(leaf, array):
  """Flax leaf name -> (torch parameter name, function turning the torch array into ours)."""
  if leaf == "kernel" and array.ndim == 5:  # Conv3d: (O, I, D, H, W) -> (D, H, W, I, O)
    return "weight", lambda w: np.transpose(w, (2, 3, 4, 1, 0))
  if leaf == "kernel":  # Linear: (out, in) -> (in, out)
    return "weight", np.transpose
  names = {"scale": "weight", "embedding": "weight", "bias": "bias", "mean": "running_mean",
           "var": "running_var"}
  return names.get(leaf, leaf), lambda w: w


def rule_key_fn(rules):
  """Key function: Flax module path joined by "." + torch leaf name, then regex `rules`."""
  def key_fn(path):
    key = ".".join(path)
    for pattern, replacement in rules:
      key = re.sub(pattern, replacement, key)
    return key
  return key_fn


def grouped_key_fn(groups):
  """Key function for a model made of towers: {top-level name: (torch prefix, rules)}."""
  def key_fn(path):
    prefix, rules = groups[path[0]]
    return prefix + rule_key_fn(rules)(path[1:])
  return key_fn


def convert_tree(template, state, key_fn, source, fresh=()):
  """Fills `template` (a variables dict {collection: tree} of arrays or ShapeDtypeStructs) from
  `state` ({torch key: array}); key_fn(module path + (torch leaf name,)) gives the torch key.
  Leaves under a `fresh` prefix (e.g. "params/fusion") keep the template's values.

  Returns (variables as numpy arrays, report {"loaded": n, "fresh": [...], "ignored": [...]}).
  """
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(template))
  result, missing, wrong_shape, kept, used = {}, [], [], [], set()
  for path, target in flat.items():
    where = "/".join(path)
    if any(where == f or where.startswith(f + "/") for f in fresh):
      if isinstance(target, jax.ShapeDtypeStruct):   # abstract: there is no value to keep
        raise ValueError(f"convert_tree: {where} is kept fresh, so the template must hold its "
                         "initialised values, not a jax.eval_shape result")
      result[path] = np.asarray(target)
      kept.append(where)
      continue
    name, layout = _leaf_to_torch(path[-1], target)
    key = key_fn((*path[1:-1], name))  # path[0] is the collection (params / batch_stats)
    if key not in state:
      missing.append(f"{key} (for {where} {tuple(target.shape)})")
      continue
    used.add(key)
    value = layout(state[key])
    if value.shape != tuple(target.shape):
      wrong_shape.append(f"{key}: {tuple(state[key].shape)}, i.e. {value.shape} in Flax layout; "
                         f"the model's {where} is {tuple(target.shape)}")
      continue
    result[path] = value.astype(target.dtype)
  ignored = [k for k in state if k not in used and any(re.search(p, k) for p in IGNORED_KEYS)]
  unexpected = [k for k in state if k not in used and k not in ignored]
  _raise_if_mismatch(source, missing, unexpected, wrong_shape)
  report = {"loaded": len(used), "fresh": kept, "ignored": ignored}
  return flax.traverse_util.unflatten_dict(result), report


def _raise_if_mismatch(source, missing, unexpected, wrong_shape):
  problems = [(f"{len(keys)} {what}", keys) for what, keys in
              (("missing keys", missing), ("unexpected keys", unexpected),
               ("wrongly shaped keys", wrong_shape)) if keys]
  if problems:
    lines = [f"{source}: state dict does not match the model: "
             + ", ".join(head for head, _ in problems)]
    for head, keys in problems:
      lines += [f"  {head}:"] + [f"    {k}" for k in keys]
    raise WeightImportError("\n".join(lines))


def _normalise_bert_keys(state):
  """HF BERT checkpoint naming variants: `bert.` prefix (pre-training checkpoints such as
  BioBERT's) and TF-era LayerNorm `gamma`/`beta`."""
  if any(k.startswith("bert.") for k in state):
    state = {k[len("bert."):] if k.startswith("bert.") else k: v for k, v in state.items()}
  return _rename_layer_norm(state)


def _rename_layer_norm(state):
  return {re.sub(r"LayerNorm\.gamma$", "LayerNorm.weight",
                 re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", k)): v for k, v in state.items()}


# --- Single towers ------------------------------------------------------------------------------

def import_monai_resnet(state, template, source="MONAI ResNet"):
  """MONAI ResNet state dict -> ResNet3D variables {"params", "batch_stats"} (template: the
  ResNet3D variables or their shapes). MONAI's fc head, if any, is ignored."""
  return convert_tree(template, state, rule_key_fn(RESNET_RULES), source)[0]


def import_monai_vit(state, template, source="MONAI ViT"):
  """MONAI ViT (classification=False, conv patches, learnable positions) -> ViT3D variables."""
  return convert_tree(template, state, rule_key_fn(VIT_RULES), source)[0]


def import_hf_bert(state, template, source="HF BERT"):
  """HF BertModel state dict -> BertModel variables {"params": ...}."""
  return convert_tree(template, _normalise_bert_keys(state), rule_key_fn(BERT_RULES), source)[0]


def load_bert_config(folder):
  """BertConfig from `folder/config.json`."""
  path = os.path.join(folder, "config.json")
  try:
    with open(path, encoding="utf-8") as f:
      values = json.load(f)
  except (OSError, json.JSONDecodeError) as err:
    raise text_lib.TextModelError(f"{path}: cannot read a BERT config ({err})") from err
  model_type = values.get("model_type", "bert")
  if model_type != "bert":
    raise text_lib.TextModelError(f"{path}: model_type {model_type!r}, expected 'bert'")
  return bert_lib.BertConfig.from_dict(values, source=path)


def bert_weights_file(folder):
  for name in text_lib.WEIGHT_FILES:
    if os.path.isfile(os.path.join(folder, name)):
      return os.path.join(folder, name)
  raise text_lib.TextModelError(f"{folder}: no {' or '.join(text_lib.WEIGHT_FILES)}")


def bert_template(config, max_tokens=8):
  ids = jnp.zeros((1, max_tokens), jnp.int32)
  return jax.eval_shape(lambda: bert_lib.BertModel(config).init(jax.random.key(0), ids))


def load_hf_bert(folder):
  """Local HF BERT folder (config.json + model.safetensors or pytorch_model.bin) ->
  (BertConfig, params of BertModel as numpy arrays)."""
  config = load_bert_config(folder)
  path = bert_weights_file(folder)
  variables = import_hf_bert(load_state_dict(path), bert_template(config), source=path)
  return config, variables["params"]


# --- The whole model ----------------------------------------------------------------------------

def released_key_fn(backbone):
  """Our MedFinder params -> the released code's module names (`visual_encoder.encoder.*`, ...)."""
  image_rules = RESNET_RULES if backbone == "resnet50" else VIT_RULES
  return grouped_key_fn({
      "image_encoder": ("visual_encoder.encoder.", image_rules),
      "image_projection": ("visual_encoder.projection.", ()),
      "text_encoder": ("text_encoder.", BERT_RULES),
      "text_projection": ("text_projection.", ()),
      "fusion": ("fusion.", ()),
  })


def import_released_checkpoint(path, variables, backbone=None):
  """The released code's `best_model.pt` (state dict) or `checkpoint_epoch_N.pt` (dict with
  model_state_dict) -> MedFinder variables (numpy).

  `variables`: MedFinder variables with the released code's shapes: initialised values, or a
  jax.eval_shape result where every leaf of RELEASED_LACKS is a concrete value. backbone:
  "resnet50" | "vit"; None = read from `variables`. The released code has no fusion parameters
  and a fixed temperature: the leaves under RELEASED_LACKS (when the model has them) keep the
  values of `variables` and are listed in report["fresh"].
  Returns (variables, report {"loaded": n, "fresh": [...], "ignored": [...]}).
  """
  if backbone is None:
    image_params = variables["params"]["image_encoder"]
    backbone = "vit" if "position_embeddings" in image_params else "resnet50"
  state = _rename_layer_norm(load_state_dict(path))
  return convert_tree(variables, state, released_key_fn(backbone), path, fresh=RELEASED_LACKS)

"""Test helpers: models saved in the released code's PyTorch format, and a constructed model whose
image and report embeddings coincide on a set of studies (a stand-in for a trained model).

export_seed_state_dict is the inverse of convert_weights.import_seed_checkpoint (same key rules,
layouts transposed back), so a Flax model of ours can be written as a `best_model.pt`.
"""

import flax
import jax
import numpy as np

from medfinder_jax import convert_weights


def export_seed_state_dict(variables, backbone="resnet50"):
  """MedFinder variables (fusion disabled) -> {seed state-dict key: numpy array}."""
  key_fn = convert_weights.seed_key_fn(backbone)
  state = {}
  for path, value in flax.traverse_util.flatten_dict(jax.device_get(variables)).items():
    value = np.asarray(value)
    name, _ = convert_weights._leaf_to_torch(path[-1], value)  # pylint: disable=protected-access
    if path[-1] == "kernel":   # Flax (D, H, W, I, O) / (in, out) -> torch (O, I, D, H, W) / (out, in)
      value = value.transpose(4, 3, 0, 1, 2) if value.ndim == 5 else value.T
    state[key_fn((*path[1:-1], name))] = np.ascontiguousarray(value)
  return state


def write_seed_checkpoint(path, variables, backbone="resnet50", training_dict=False):
  """Saves variables as the seed's best_model.pt (or checkpoint_epoch_N.pt with training_dict)."""
  import torch  # pylint: disable=import-outside-toplevel
  state = {k: torch.from_numpy(v) for k, v in export_seed_state_dict(variables, backbone).items()}
  torch.save({"epoch": 1, "model_state_dict": state} if training_dict else state, str(path))
  return str(path)


def pooled_image_features(model, variables, unit_volumes):
  """(B, F) pooled image-encoder features of [0, 1] volumes (B, X, Y, Z) (before projection)."""
  return np.asarray(model.apply(variables, unit_volumes[..., None],
                                method=lambda m, x: m.image_encoder(x, False)[0]), np.float64)


def align_image_projection(model, variables, unit_volumes, text_embeddings):
  """Variables whose image projection maps each volume's features onto its paired text embedding.

  Least squares (minimum norm) for the projection kernel and bias: with fewer studies than
  features the fit is exact, so image and text embeddings of these studies coincide, as after
  perfect training. The model must have fusion disabled (the projection is then the last layer).
  """
  features = pooled_image_features(model, variables, unit_volumes)
  design = np.concatenate([features, np.ones((len(features), 1))], axis=1)
  solution, *_ = np.linalg.lstsq(design, np.asarray(text_embeddings, np.float64), rcond=None)
  params = flax.core.unfreeze(jax.device_get(variables["params"]))
  params["image_projection"] = {"kernel": solution[:-1].astype(np.float32),
                                "bias": solution[-1].astype(np.float32)}
  return {**variables, "params": params}
